"""The one data contract of the package's trainers: batches of activations as dicts keyed by
TransformerLens hook name (``{"blocks.3.ln1.hook_normalized": tensor, ..., "tokens": ...}``).

Three backends serve every method, all deterministic in ``(epoch, batch index)`` and shuffled
by the one epoch-order rule (:func:`tl_superposition.core.batches.epoch_order`), so that a
resumed run reads the batches an uninterrupted one reads:

- :class:`StoreActivations` -- disk: contexts of a :func:`~tl_superposition.collect` folder
  (the collector's :class:`~tl_superposition.activations.ActivationStore`);
- :class:`ModelActivations` -- the model run on token contexts for every batch;
- :class:`TensorActivations` -- tensors already in memory.

:func:`run_hooks` is the forward pass behind the model backends (and every "run the model up
to layer L and keep these hooks" in the package). The QK transcoders' sources
(:mod:`tl_superposition.qk.source`) and the gated blocks' (:mod:`tl_superposition.gated.sources`)
read these backends and only shape the dicts into what their models take. Like SAELens's
activation store, which yields a dict of tensors keyed by hook name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_superposition.core.batches import epoch_order

Batch = dict[str, Tensor]
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def n_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` rows in an epoch of ``n_rows``: full ones only with
    ``drop_last``, else the last partial one too."""
    return n_rows // batch_size if drop_last else math.ceil(n_rows / batch_size)


def batch_rows(
    n_rows: int, batch_size: int, seed: int, epoch: int, index: int, shuffle: bool = True
) -> Int[Tensor, " rows"]:
    """The rows of batch ``index`` of ``epoch``: a slice of the epoch's order."""
    order = epoch_order(n_rows, seed, epoch, shuffle)
    return order[index * batch_size : (index + 1) * batch_size]


@torch.no_grad()
def run_hooks(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hooks: Sequence[str],
    forward_batch: int | None = None,
    to_cpu: bool = False,
) -> Batch:
    """``{hook: activations}`` of ``tokens``: forward passes of ``forward_batch`` contexts (all at
    once by default) that stop after the deepest layer among ``hooks``, under ``no_grad``.

    The activations keep the model's dtype and device (``to_cpu``: each chunk is moved to the
    CPU as it comes, for whole datasets kept in memory).

    Raises:
        ValueError: a hook is not a block hook (``blocks.L...``).
    """
    layers = [_LAYER_RE.match(h) for h in hooks]
    if not all(layers):
        raise ValueError(f"hooks must be block hooks blocks.L...., got {list(hooks)}")
    stop = max(int(m.group(1)) for m in layers if m) + 1
    names = set(hooks)
    step = forward_batch or max(1, tokens.shape[0])
    parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for lo in range(0, tokens.shape[0], step):
        _, cache = model.run_with_cache(
            tokens[lo : lo + step], names_filter=lambda n: n in names, stop_at_layer=stop
        )
        for h in hooks:
            parts[h].append(cache[h].cpu() if to_cpu else cache[h])
    return {h: torch.cat(p) if len(p) > 1 else p[0] for h, p in parts.items()}


class StoreActivations:
    """Batches of whole contexts from a collection, in the epoch's order.

    Args:
        store: an :class:`~tl_superposition.activations.ActivationStore`, or anything with its
            ``get_contexts(indices, hooks, tokens=...)``.
        hooks: the hooks each batch holds.
        seed: the shuffle seed.
        contexts: read only these context indices (a split), in the epoch's order of them.
        tokens: add ``"tokens"`` (int64 ``[batch, pos]``) to every batch.
    """

    def __init__(
        self,
        store: Any,
        hooks: Sequence[str],
        seed: int = 0,
        contexts: Tensor | None = None,
        tokens: bool = True,
    ) -> None:
        self.store, self.hooks, self.seed, self.tokens = store, list(hooks), int(seed), tokens
        self.contexts = torch.arange(store.n_contexts) if contexts is None else contexts.long()

    @property
    def n_rows(self) -> int:
        """Contexts per epoch."""
        return int(self.contexts.numel())

    def batch(self, batch_size: int, epoch: int, index: int, rows: slice | None = None) -> Batch:
        """Batch ``index`` of ``epoch`` (``rows``: only those rows of it), as stored (dtype)."""
        idx = self.contexts[batch_rows(self.n_rows, batch_size, self.seed, epoch, index)]
        idx = idx if rows is None else idx[rows]
        return self.store.get_contexts(idx, self.hooks, tokens=self.tokens)


class ModelActivations:
    """Batches computed from token contexts by running the model every time.

    Args:
        model: a ``HookedTransformer``.
        tokens: int ``[n_contexts, pos]``.
        hooks: block hooks to keep (the model stops after the deepest one's layer).
        seed: the shuffle seed.
        forward_batch: contexts per forward pass (default: the whole batch in one).
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "n_contexts pos"],
        hooks: Sequence[str],
        seed: int = 0,
        forward_batch: int | None = None,
    ) -> None:
        self.model, self.tokens, self.hooks = model, tokens.long(), list(hooks)
        self.seed, self.forward_batch = int(seed), forward_batch

    @property
    def n_rows(self) -> int:
        """Contexts per epoch."""
        return int(self.tokens.shape[0])

    def batch(self, batch_size: int, epoch: int, index: int, rows: slice | None = None) -> Batch:
        """Batch ``index`` of ``epoch`` (``rows``: only those rows), on the model's device."""
        idx = batch_rows(self.n_rows, batch_size, self.seed, epoch, index)
        idx = idx if rows is None else idx[rows]
        device = next(self.model.parameters()).device
        tokens = self.tokens[idx].to(device)
        return run_hooks(self.model, tokens, self.hooks, self.forward_batch) | {"tokens": tokens}


class TensorActivations:
    """Batches of tensors held in memory (one row per context or sample).

    Args:
        data: ``{name: [n_rows, ...]}``, every tensor with the same number of rows.
        seed: the shuffle seed.
        shuffle: a new order every epoch; False keeps the rows' order.

    Raises:
        ValueError: the tensors differ in their number of rows.
    """

    def __init__(self, data: Mapping[str, Tensor], seed: int = 0, shuffle: bool = True) -> None:
        lengths = {k: v.shape[0] for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every tensor needs the same number of rows, got {lengths}")
        self.data, self.seed, self.shuffle = dict(data), int(seed), shuffle

    @property
    def n_rows(self) -> int:
        """Rows per epoch."""
        return int(next(iter(self.data.values())).shape[0])

    def batch(self, batch_size: int, epoch: int, index: int, rows: slice | None = None) -> Batch:
        """Batch ``index`` of ``epoch`` (``rows``: only those rows); unshuffled batches are
        slices (views) of the tensors."""
        if not self.shuffle:
            lo = index * batch_size
            sl = slice(lo, lo + batch_size)
            out = {k: v[sl] for k, v in self.data.items()}
            return out if rows is None else {k: v[rows] for k, v in out.items()}
        idx = batch_rows(self.n_rows, batch_size, self.seed, epoch, index)
        idx = idx if rows is None else idx[rows]
        return {k: v[idx.to(v.device)] for k, v in self.data.items()}
