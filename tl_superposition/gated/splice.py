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

from tl_superposition.core.splicing import Hooks, replacement_hooks, spliced
from tl_superposition.gated.block import GatedAttentionBlock


def splice_hooks(model: Any, blocks: Mapping[int, GatedAttentionBlock]) -> Hooks:
    """The forward hooks ``[(name, fn), ...]`` that splice ``blocks`` into ``model``.

    Raises:
        ValueError: a block does not fit its layer (see
            :meth:`GatedAttentionBlock.check_fits`).
    """
    hooks: Hooks = []
    for layer, block in sorted(blocks.items()):
        block.check_fits(model, layer)

        def run_block(x: Tensor, out: Tensor, block: GatedAttentionBlock = block) -> Tensor:
            return block(x.to(out.dtype))

        hooks += replacement_hooks(
            layer, block.cfg.input_hook, {block.cfg.target_hook: run_block}, pop=True
        )
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
    with spliced(model, splice_hooks(model, blocks)):
        yield model
