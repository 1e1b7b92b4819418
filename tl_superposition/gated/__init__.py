"""Gated attention blocks (Mathwin, Akar & Sharkey 2024): a wider attention layer whose heads
are gated per (query, key) pair, trained to reproduce a layer's output with few heads active
per pair, which removes attention-head superposition.

- :class:`GatedAttentionBlock` / :class:`GatedAttentionConfig` -- the block (a
  ``HookedRootModule``: hook and cache it like any TransformerLens model).
- :func:`train_gated_block` / :class:`GatedTrainConfig` -- training on ``(input, target)``
  batches, resumable.
- :func:`splice` -- the block in place of a layer, as a context manager.
- :func:`train_gated` / :class:`GatedLayerConfig` -- a real model's layer end to end (the
  ``train-gated`` command).

Toy settings (skip trigrams, gate maps, the solely-encoded check) live in
:mod:`tl_superposition.toys`.
"""

from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.config import GatedAttentionConfig
from tl_superposition.gated.layer_run import GatedLayerConfig, train_gated
from tl_superposition.gated.splice import splice
from tl_superposition.gated.train import GatedTrainConfig, train_gated_block

__all__ = [
    "GatedAttentionBlock",
    "GatedAttentionConfig",
    "GatedLayerConfig",
    "GatedTrainConfig",
    "splice",
    "train_gated",
    "train_gated_block",
]
