"""Where QK-transcoder training and evaluation get their activations: whole contexts.

The loss compares full attention rows, so a batch is a set of whole contexts, each with its
normalised residual ``x`` (``blocks.L.ln1.hook_normalized``), true queries ``q``
(``attn.hook_q``) and keys ``k`` (``attn.hook_k``). Three sources give the same batches:

- :class:`StoreSource`: contexts stored by :func:`tl_superposition.collect`, read through an
  :class:`~tl_superposition.activations.ActivationStore` (memory-mapped; fast, reusable across
  epochs and runs);
- :class:`ModelSource`: contexts streamed from a text source and run through the model up to
  layer ``L`` on the fly (no disk; pays a forward pass per batch);
- :class:`MemorySource`: a few contexts run through the model once and kept in memory (small
  experiments, notebooks, tests).

Each reads one layer or several: :meth:`~ContextSource.layer_batches` gives ``{layer: batch}``
of the same contexts (one forward pass, or one read of a collection of several layers), which
is how :func:`~tl_superposition.qk.train_qk_layers` trains the dictionaries of many layers at
the price of one. All are deterministic: batch ``b`` of epoch ``e`` is always the same
contexts, so a resumed training run sees exactly the batches the interrupted one would have
seen.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations import ActivationStore
from tl_superposition.activations.batches import (
    StoreActivations,
    TensorActivations,
    n_batches,
    run_hooks,
)
from tl_superposition.activations.mix import ContextMix
from tl_superposition.activations.packing import open_packing
from tl_superposition.qk.config import AttentionShape


class QKBatch(NamedTuple):
    """A batch of whole contexts (float32 on the source's device).

    Attributes:
        x: ``ln1.hook_normalized``, ``[batch, pos, d_model]``.
        q: ``attn.hook_q``, ``[batch, pos, n_heads, d_head]``.
        k: ``attn.hook_k``, ``[batch, pos, n_key_value_heads, d_head]``.
        tokens: int64 ``[batch, pos]``.
    """

    x: Tensor
    q: Tensor
    k: Tensor
    tokens: Tensor


class ContextSource(Protocol):
    """What the trainer and the evaluation read from: batches of one or several layers."""

    shapes: dict[int, AttentionShape]
    context_size: int

    def layer_batches(
        self, batch_contexts: int, epoch: int, start: int = 0, part: Part = None
    ) -> Iterator[dict[int, QKBatch]]:
        """Batches ``start, start+1, ...`` of epoch ``epoch``, each ``{layer: batch}`` of the
        same contexts (every batch full). With ``part=(rank, n)``, only that rank's rows of
        each batch (:func:`part_rows`), for data-parallel training."""
        ...

    def description(self) -> dict[str, Any]:
        """JSON-able description (recorded with checkpoints; a resume must match it). It does
        not name the layers: a layer's run resumes from any source of the same data."""
        ...


Part = tuple[int, int] | None


def part_rows(n: int, part: Part) -> slice:
    """The rows of an ``n``-row batch that rank ``part[0]`` of ``part[1]`` reads: its contiguous
    ``n / part[1]`` rows, so the ranks' rows in rank order are the whole batch.

    Raises:
        ValueError: ``n`` is not a multiple of the number of ranks.
    """
    if part is None:
        return slice(0, n)
    rank, size = part
    if n % size:
        raise ValueError(f"a batch of {n} contexts does not split over {size} processes")
    return slice(rank * n // size, (rank + 1) * n // size)


QK_FIELDS = ("x", "q", "k", "tokens")


def _hooks(shape: AttentionShape) -> tuple[str, str, str]:
    return (
        shape.hook("ln1.hook_normalized"),
        shape.hook("attn.hook_q"),
        shape.hook("attn.hook_k"),
    )


class _Layers:
    """The layers a source reads: one :class:`AttentionShape` or several of one model."""

    shapes: dict[int, AttentionShape]

    def _set_shapes(self, shape: AttentionShape | Sequence[AttentionShape]) -> None:
        shapes = [shape] if isinstance(shape, AttentionShape) else list(shape)
        if not shapes:
            raise ValueError("give at least one layer's AttentionShape")
        self.shapes = {s.layer: s for s in shapes}
        if len(self.shapes) != len(shapes):
            raise ValueError(f"a layer is given twice: {[s.layer for s in shapes]}")

    @property
    def layers(self) -> list[int]:
        """The layers read, ascending."""
        return sorted(self.shapes)

    @property
    def shape(self) -> AttentionShape:
        """The shape of a one-layer source.

        Raises:
            ValueError: the source reads several layers.
        """
        if len(self.shapes) != 1:
            raise ValueError(f"the source reads layers {self.layers}: pick one of .shapes")
        return next(iter(self.shapes.values()))

    def layer_batches(
        self, batch_contexts: int, epoch: int, start: int = 0, part: Part = None
    ) -> Iterator[dict[int, QKBatch]]:
        raise NotImplementedError

    def batches(self, batch_contexts: int, epoch: int, start: int = 0) -> Iterator[QKBatch]:
        """The batches of a one-layer source (:meth:`layer_batches` of its only layer).

        Raises:
            ValueError: the source reads several layers.
        """
        layer = self.shape.layer
        for batch in self.layer_batches(batch_contexts, epoch, start):
            yield batch[layer]


class StoreSource(_Layers):
    """Contexts from a collection folder, shuffled per epoch.

    Args:
        store: an :class:`ActivationStore` (or the path of a collection folder) holding
            ``ln1.hook_normalized``, ``attn.hook_q`` and ``attn.hook_k`` of every layer read
            (one collection of several layers serves them all: ``collect(layers=[...])``).
        shape: the attention shape of the transcoder that will be trained, or the shapes of
            several layers (:meth:`layer_batches` then reads them together).
        seed: shuffle seed; epoch ``e`` visits the contexts in the order
            ``randperm(n_contexts)`` drawn from a generator seeded with ``(seed, e)``.
        device: where batches are put.

    Raises:
        FileNotFoundError / RuntimeError: from the store (no collection, incomplete).
        ValueError: a needed hook is missing, or its stored shape disagrees with ``shape``.
    """

    def __init__(
        self,
        store: ActivationStore | str | os.PathLike,
        shape: AttentionShape | Sequence[AttentionShape],
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self._set_shapes(shape)
        self.seed = int(seed)
        self.device = torch.device(device)
        for layer in self.layers:
            self._check_layer(self.shapes[layer])
        self.context_size = self.store.context_size
        self.n_contexts = self.store.n_contexts
        names = [h for layer in self.layers for h in _hooks(self.shapes[layer])]
        self._rows = StoreActivations(self.store, names, self.seed)

    def _check_layer(self, shape: AttentionShape) -> None:
        hooks = _hooks(shape)
        missing = [h for h in hooks if h not in self.store.hooks]
        if missing:
            raise ValueError(
                f"the collection in {self.store.path} lacks {missing} (it holds "
                f"{self.store.hooks}); collect ln1.hook_normalized, attn.hook_q and attn.hook_k "
                f"at layer {shape.layer}"
            )
        want = {
            hooks[0]: [shape.d_model],
            hooks[1]: [shape.n_heads, shape.d_head],
            hooks[2]: [shape.n_key_value_heads, shape.d_head],
        }
        for hook, dims in want.items():
            got = self.store.shape(hook)[1:]
            if got != dims:
                raise ValueError(
                    f"{hook} is stored with shape {got} per position, the transcoder needs "
                    f"{dims}: the collection is from another model"
                )

    def n_batches(self, batch_contexts: int) -> int:
        """Full batches per epoch."""
        return n_batches(self.n_contexts, batch_contexts, drop_last=True)

    def layer_batches(
        self, batch_contexts: int, epoch: int, start: int = 0, part: Part = None
    ) -> Iterator[dict[int, QKBatch]]:
        """Batches ``start..`` of epoch ``epoch`` (``part``: :class:`ContextSource`); the last
        partial batch is dropped.

        Raises:
            ValueError: the collection holds fewer than ``batch_contexts`` contexts.
        """
        n = self.n_batches(batch_contexts)
        if n == 0:
            raise ValueError(
                f"the collection holds {self.n_contexts} contexts, fewer than one batch of "
                f"{batch_contexts}: collect more or lower the batch size"
            )
        hooks = {layer: _hooks(shape) for layer, shape in self.shapes.items()}
        rows = part_rows(batch_contexts, part)
        for b in range(start, n):
            got = self._rows.batch(batch_contexts, epoch, b, rows)
            tokens = got["tokens"].to(self.device)
            yield {layer: self._batch(got, hooks[layer], tokens) for layer in self.layers}

    def _batch(
        self, got: dict[str, Tensor], hooks: tuple[str, str, str], tokens: Tensor
    ) -> QKBatch:
        x, q, k = (got[h].float().to(self.device) for h in hooks)
        return QKBatch(x, q, k, tokens)

    def description(self) -> dict[str, Any]:
        """Collection path, size, source, model fingerprint and the shuffle seed."""
        settings = self.store.manifest.get("settings", {})
        return {
            "kind": "store",
            "path": str(self.store.path.resolve()),
            "n_contexts": self.n_contexts,
            "context_size": self.context_size,
            "source": settings.get("source"),
            "model_fingerprint": settings.get("model_fingerprint"),
            "seed": self.seed,
        }


@torch.no_grad()
def run_to_layers(
    model: HookedTransformer,
    shapes: Sequence[AttentionShape],
    tokens: Tensor,
    forward_batch: int = 16,
) -> dict[int, QKBatch]:
    """``x``, ``q``, ``k`` of every layer of ``shapes`` for ``tokens`` (``[batch, pos]``), in
    one forward pass per chunk that stops after the last of those layers."""
    hooks = {s.layer: _hooks(s) for s in shapes}
    got = run_hooks(model, tokens, [h for hs in hooks.values() for h in hs], forward_batch)
    return {
        layer: QKBatch(*(got[h].float() for h in hs), tokens=tokens) for layer, hs in hooks.items()
    }


def run_to_layer(
    model: HookedTransformer, shape: AttentionShape, tokens: Tensor, forward_batch: int = 16
) -> QKBatch:
    """``x``, ``q``, ``k`` of ``tokens`` (``[batch, pos]``), running layers ``0..L`` only."""
    return run_to_layers(model, [shape], tokens, forward_batch)[shape.layer]


class ModelSource(_Layers):
    """Contexts packed from a text source and run through ``model`` on the fly.

    Every epoch reads the source in the same (packing) order; with ``max_contexts`` only its
    first contexts are used. Packing follows :func:`tl_superposition.collect` (BOS at the start
    of every context when the model expects one, BOS between documents). With ``mix`` the
    contexts are cut in several formats instead (with and without BOS, at random offsets,
    short and long: :class:`~tl_superposition.activations.mix.ContextMix`); a batch holds
    contexts of one length, in the order they come (the trainer counts every step as
    ``batch_contexts x context_size`` tokens). Several layers are read from one forward pass.

    Args:
        model: the model (its layers up to the last layer read are run).
        source: anything :func:`tl_superposition.activations.resolve_source` accepts (a text
            file or folder, ``"pydoc"``, a list of strings, token tensors, a dataset name).
        shape: the transcoder's attention shape, or several layers' (checked against ``model``).
        context_size: tokens per context.
        split: file-name prefix selecting files of a folder (e.g. ``"test"``).
        max_contexts: use only the first this many contexts.
        forward_batch: contexts per forward pass.
        mix: the context formats (``None``: packed contexts).

    Raises:
        ValueError: the model does not have ``shape``, the source is empty or too short, or
            a mix for pre-packed token contexts (they have no documents to cut).
    """

    def __init__(
        self,
        model: HookedTransformer,
        source: Any,
        shape: AttentionShape | Sequence[AttentionShape],
        *,
        context_size: int = 128,
        split: str | None = None,
        max_contexts: int | None = None,
        forward_batch: int = 16,
        mix: ContextMix | None = None,
    ) -> None:
        self._set_shapes(shape)
        for s in self.shapes.values():
            s.check_model(model)
        if context_size < 2 or context_size > model.cfg.n_ctx:
            raise ValueError(f"context_size must be in 2..{model.cfg.n_ctx}, got {context_size}")
        self.model = model
        self.context_size = int(context_size)
        self.max_contexts = max_contexts
        self.forward_batch = int(forward_batch)
        self.split = split
        self._packing = open_packing(model, source, context_size=context_size, split=split, mix=mix)
        self.mix = mix

    def contexts(self) -> Iterator[np.ndarray]:
        """The token contexts of one pass, in order (int64, ``[context_size]`` or, with a
        mix, ``[mix.short_size]`` for short ones)."""
        it = self._packing.contexts()
        return islice(it, self.max_contexts) if self.max_contexts is not None else it

    def token_batches(self, batch_contexts: int) -> Iterator[np.ndarray]:
        """The token batches of one pass: ``batch_contexts`` contexts of one length each, in
        the order their last context comes; contexts left over at the end are dropped."""
        pending: dict[int, list[np.ndarray]] = {}
        for ctx in self.contexts():
            rows = pending.setdefault(len(ctx), [])
            rows.append(ctx)
            if len(rows) == batch_contexts:
                yield np.stack(rows)
                rows.clear()

    def layer_batches(
        self, batch_contexts: int, epoch: int, start: int = 0, part: Part = None
    ) -> Iterator[dict[int, QKBatch]]:
        """Batches ``start..`` of a pass (the same for every ``epoch``), every layer's from one
        forward pass (``part``: :class:`ContextSource`).

        Raises:
            ValueError: the source has fewer than ``batch_contexts`` contexts.
        """
        del epoch  # a stream is read in the same order every time
        device = self.model.cfg.device
        produced = 0
        shapes = list(self.shapes.values())
        for b, rows in enumerate(self.token_batches(batch_contexts)):
            produced += 1
            if b < start:
                continue
            rows = rows[part_rows(len(rows), part)]
            tokens = torch.as_tensor(rows, dtype=torch.long, device=device)
            yield run_to_layers(self.model, shapes, tokens, self.forward_batch)
        if produced == 0:
            raise ValueError(
                f"the source gives fewer than one batch of {batch_contexts} contexts of "
                f"{self.context_size} tokens"
            )

    def description(self) -> dict[str, Any]:
        """The text source, split, context size and model name."""
        return {
            "kind": "model",
            "model": str(self.model.cfg.model_name),
            "source": self._packing.source.description,
            "split": self.split,
            "context_size": self.context_size,
            "max_contexts": self.max_contexts,
            **({"mix": self.mix.to_dict()} if self.mix is not None else {}),
        }


class MemorySource(_Layers):
    """Contexts run through ``model`` once and kept in memory, shuffled per epoch.

    Args:
        model: the model (layers up to the last layer read are run once, in ``forward_batch``
            chunks).
        tokens: int64 ``[n_contexts, ctx]`` (e.g. :func:`tl_superposition.activations.pack_text`).
        shape: the transcoder's attention shape, or several layers' (checked against ``model``).
        seed: shuffle seed (epoch ``e`` uses a generator seeded with ``(seed, e)``).

    Raises:
        ValueError: ``model`` does not have ``shape``, or ``tokens`` is not 2-D.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Tensor,
        shape: AttentionShape | Sequence[AttentionShape],
        *,
        seed: int = 0,
        forward_batch: int = 16,
    ) -> None:
        self._set_shapes(shape)
        for s in self.shapes.values():
            s.check_model(model)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [n_contexts, ctx >= 2], got {tuple(tokens.shape)}")
        self.context_size = int(tokens.shape[1])
        self.n_contexts = int(tokens.shape[0])
        self.seed = int(seed)
        tokens = tokens.to(model.cfg.device)
        self.data = run_to_layers(model, list(self.shapes.values()), tokens, forward_batch)
        flat = {f"{L}.{n}": getattr(b, n) for L, b in self.data.items() for n in QK_FIELDS}
        self._rows = TensorActivations(flat, self.seed)
        digest = hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]
        self._description = {
            "kind": "memory",
            "model": str(model.cfg.model_name),
            "n_contexts": self.n_contexts,
            "context_size": self.context_size,
            "tokens_sha256_16": digest,
            "seed": self.seed,
        }

    def layer_batches(
        self, batch_contexts: int, epoch: int, start: int = 0, part: Part = None
    ) -> Iterator[dict[int, QKBatch]]:
        """Batches ``start..`` of epoch ``epoch`` (``part``: :class:`ContextSource`); the last
        partial batch is dropped."""
        rows = part_rows(batch_contexts, part)
        for b in range(start, n_batches(self.n_contexts, batch_contexts, drop_last=True)):
            got = self._rows.batch(batch_contexts, epoch, b, rows)
            yield {layer: QKBatch(*(got[f"{layer}.{n}"] for n in QK_FIELDS)) for layer in self.data}

    def description(self) -> dict[str, Any]:
        """Model, size and a digest of the tokens."""
        return dict(self._description)


def batches_of_layer(
    source: ContextSource,
    shape: AttentionShape,
    batch_contexts: int,
    epoch: int,
    start: int = 0,
) -> Iterator[QKBatch]:
    """The batches of ``shape``'s layer from a source of one or several layers.

    Raises:
        ValueError: the source does not read that layer (:func:`check_reads`).
    """
    check_reads(source, shape)
    for batch in source.layer_batches(batch_contexts, epoch, start):
        yield batch[shape.layer]


def check_reads(source: ContextSource, shape: AttentionShape) -> None:
    """Raise :class:`ValueError` unless ``source`` reads ``shape``'s layer with that shape."""
    if source.shapes.get(shape.layer) != shape:
        raise ValueError(
            f"the source reads layers {sorted(source.shapes)} with shapes "
            f"{list(source.shapes.values())}; the transcoder is for {shape}"
        )
