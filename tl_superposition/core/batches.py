"""The one rule for the order of contexts in an epoch.

Every shuffled source (the activation store, the QK store and in-memory sources, the gated
blocks' sources) draws epoch ``e`` of run seed ``s`` from its own CPU generator seeded
``s * 1_000_003 + e``: the order depends on nothing but the seed and the epoch, so a resumed
run reads the batches an uninterrupted one would, whatever device or process reads them.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


def epoch_generator(seed: int, epoch: int, offset: int = 0) -> torch.Generator:
    """CPU generator of epoch ``epoch`` of seed ``seed`` (``offset`` > 0 for a second, independent
    stream of the same epoch, e.g. the order of positions within the contexts)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + int(offset))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Int[Tensor, " n"]:
    """The order of items ``0..n-1`` in epoch ``epoch``: a permutation, or ``arange`` unshuffled."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=epoch_generator(seed, epoch))
