"""Splicing: replace activations of a ``HookedTransformer`` by functions of a block's input.

A QK transcoder replaces a layer's queries and keys by reconstructions from ``ln1.hook_normalized``;
a gated attention block replaces ``hook_attn_out`` by its own output on the same input. Both
are the same TransformerLens pattern: a hook stashes the block's input, later hooks of the same
block swap their activation for ``fn(input, activation)``, and ``model.hooks`` removes them all
when the ``with`` block ends (the weights are never touched).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor

from tl_superposition.core.hooks import block_hook

# (hook name or name filter, hook function), as ``model.hooks(fwd_hooks=...)`` takes them
Hooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
Replacement = Callable[[Tensor, Tensor], Tensor]


def replacement_hooks(
    layer: int,
    input_hook: str,
    replacements: Mapping[str, Replacement],
    *,
    stash: dict[str, Tensor] | None = None,
    pop: bool = False,
) -> Hooks:
    """Hooks of block ``layer``: keep ``input_hook``'s activation ``x``, then replace each
    ``replacements`` hook's activation ``value`` by ``fn(x, value)`` cast to ``value``'s dtype.

    Args:
        layer: the block.
        input_hook: name relative to the block (``"ln1.hook_normalized"``).
        replacements: ``{relative hook name: fn}``, in the order the model reaches them.
        stash: the dict the input is kept in (``stash["x"]``), for callers adding hooks of
            their own that read it; a new one by default.
        pop: drop the input after the last replacement has read it (frees it during the pass).

    Returns:
        ``[(full name, hook fn), ...]`` for ``model.hooks(fwd_hooks=...)``, input hook first.
    """
    kept: dict[str, Tensor] = {} if stash is None else stash
    last = list(replacements)[-1] if replacements else None

    def keep_input(x: Tensor, **_: Any) -> None:
        kept["x"] = x

    def swap(name: str, fn: Replacement) -> Callable[..., Tensor]:
        def hook_fn(value: Tensor, **_: Any) -> Tensor:
            x = kept.pop("x") if pop and name == last else kept["x"]
            return fn(x, value).to(value.dtype)

        return hook_fn

    hooks: Hooks = [(block_hook(layer, input_hook), keep_input)]
    return hooks + [(block_hook(layer, n), swap(n, fn)) for n, fn in replacements.items()]


@contextlib.contextmanager
def spliced(model: Any, hooks: Hooks) -> Iterator[Any]:
    """Run ``model`` with ``hooks`` on for the ``with`` block; yields the model."""
    with model.hooks(fwd_hooks=hooks):
        yield model
