"""Splicing gated blocks into a ``HookedTransformer`` in place of attention layers.

Inside ``with splice(model, {layer: block}):`` every forward pass of ``model`` replaces
``blocks.{layer}.hook_attn_out`` by the block's output on the layer's input (the block's
``cfg.input_hook``, e.g. ``blocks.{layer}.ln1.hook_normalized``). Later layers therefore see
the block's output, exactly as if the layer had been swapped. Hooks are TransformerLens hooks,
removed when the block exits; the model's weights are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from tl_superposition.gated.block import GatedAttentionBlock


def splice_hooks(model: Any, blocks: Mapping[int, GatedAttentionBlock]) -> list[tuple[str, Any]]:
    """The forward hooks ``[(name, fn), ...]`` that splice ``blocks`` into ``model``.

    Raises:
        ValueError: a block does not fit its layer (see
            :meth:`GatedAttentionBlock.check_fits`).
    """
    hooks: list[tuple[str, Any]] = []
    for layer, block in sorted(blocks.items()):
        block.check_fits(model, layer)
        stash: dict[str, Tensor] = {}

        def keep_input(x: Tensor, stash: dict[str, Tensor] = stash, **_: Any) -> None:
            stash["x"] = x

        def replace(
            out: Tensor,
            stash: dict[str, Tensor] = stash,
            block: GatedAttentionBlock = block,
            **_: Any,
        ) -> Tensor:
            x = stash.pop("x")
            return block(x.to(out.dtype)).to(out.dtype)

        hooks.append((f"blocks.{layer}.{block.cfg.input_hook}", keep_input))
        hooks.append((f"blocks.{layer}.{block.cfg.target_hook}", replace))
    return hooks


@contextlib.contextmanager
def splice(model: Any, blocks: Mapping[int, GatedAttentionBlock]) -> Iterator[Any]:
    """Run ``model`` with gated blocks in place of the given attention layers.

    Args:
        model: a ``HookedTransformer``.
        blocks: ``{layer: block}``; each block reads ``blocks.{layer}.{cfg.input_hook}`` and
            replaces ``blocks.{layer}.{cfg.target_hook}``.

    Yields:
        The model (with the hooks on).

    Raises:
        ValueError: a block does not fit its layer.

    Example::

        with splice(model, {23: block}):
            loss = model(tokens, return_type="loss")
    """
    hooks = splice_hooks(model, blocks)
    with model.hooks(fwd_hooks=hooks):
        yield model
