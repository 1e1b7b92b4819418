"""Where QK-transcoder training and evaluation get their activations: whole contexts.

The loss compares full attention rows, so a batch is a set of whole contexts, each with its
normalised residual ``x`` (``blocks.L.ln1.hook_normalized``), true queries ``q``
(``attn.hook_q``) and keys ``k`` (``attn.hook_k``). Three sources give the same batches:

- :class:`StoreSource`: contexts stored by :func:`tl_superposition.collect`, read through an
  :class:`~tl_superposition.activations.ActivationStore` (memory-mapped; fast, reusable across
  epochs and runs);
- :class:`ModelSource`: contexts streamed from a text source and run through the model up to
  layer ``L`` on the fly (no disk; pays a forward pass per batch).

- :class:`MemorySource`: a few contexts run through the model once and kept in memory (small
  experiments, notebooks, tests).

All are deterministic: batch ``b`` of epoch ``e`` is always the same contexts, so a resumed
training run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations import ActivationStore
from tl_superposition.activations.mix import ContextMix, mix_contexts
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
    """What the trainer and the evaluation read from."""

    shape: AttentionShape
    context_size: int

    def batches(self, batch_contexts: int, epoch: int, start: int = 0) -> Iterator[QKBatch]:
        """Batches ``start, start+1, ...`` of epoch ``epoch`` (every batch full)."""
        ...

    def description(self) -> dict[str, Any]:
        """JSON-able description (recorded with checkpoints; a resume must match it)."""
        ...


def _hooks(shape: AttentionShape) -> tuple[str, str, str]:
    return (
        shape.hook("ln1.hook_normalized"),
        shape.hook("attn.hook_q"),
        shape.hook("attn.hook_k"),
    )


class StoreSource:
    """Contexts from a collection folder, shuffled per epoch.

    Args:
        store: an :class:`ActivationStore` (or the path of a collection folder) holding
            ``ln1.hook_normalized``, ``attn.hook_q`` and ``attn.hook_k`` of ``shape.layer``.
        shape: the attention shape of the transcoder that will be trained.
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
        shape: AttentionShape,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.shape = shape
        self.seed = int(seed)
        self.device = torch.device(device)
        self.hooks = _hooks(shape)
        missing = [h for h in self.hooks if h not in self.store.hooks]
        if missing:
            raise ValueError(
                f"the collection in {self.store.path} lacks {missing} (it holds "
                f"{self.store.hooks}); collect ln1.hook_normalized, attn.hook_q and attn.hook_k "
                f"at layer {shape.layer}"
            )
        want = {
            self.hooks[0]: [shape.d_model],
            self.hooks[1]: [shape.n_heads, shape.d_head],
            self.hooks[2]: [shape.n_key_value_heads, shape.d_head],
        }
        for hook, dims in want.items():
            got = self.store.shape(hook)[1:]
            if got != dims:
                raise ValueError(
                    f"{hook} is stored with shape {got} per position, the transcoder needs "
                    f"{dims}: the collection is from another model"
                )
        self.context_size = self.store.context_size
        self.n_contexts = self.store.n_contexts

    def n_batches(self, batch_contexts: int) -> int:
        """Full batches per epoch."""
        return self.n_contexts // batch_contexts

    def _order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        return torch.randperm(self.n_contexts, generator=g)

    def batches(self, batch_contexts: int, epoch: int, start: int = 0) -> Iterator[QKBatch]:
        """Batches ``start..`` of epoch ``epoch``; the last partial batch is dropped.

        Raises:
            ValueError: the collection holds fewer than ``batch_contexts`` contexts.
        """
        n = self.n_batches(batch_contexts)
        if n == 0:
            raise ValueError(
                f"the collection holds {self.n_contexts} contexts, fewer than one batch of "
                f"{batch_contexts}: collect more or lower the batch size"
            )
        order = self._order(epoch)
        for b in range(start, n):
            idx = order[b * batch_contexts : (b + 1) * batch_contexts]
            got = self.store.get_contexts(idx, list(self.hooks))
            yield QKBatch(
                x=got[self.hooks[0]].float().to(self.device),
                q=got[self.hooks[1]].float().to(self.device),
                k=got[self.hooks[2]].float().to(self.device),
                tokens=got["tokens"].to(self.device),
            )

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
def run_to_layer(
    model: HookedTransformer, shape: AttentionShape, tokens: Tensor, forward_batch: int = 16
) -> QKBatch:
    """``x``, ``q``, ``k`` of ``tokens`` (``[batch, pos]``), running layers ``0..L`` only."""
    names = set(_hooks(shape))
    parts = []
    for i in range(0, tokens.shape[0], forward_batch):
        _, cache = model.run_with_cache(
            tokens[i : i + forward_batch],
            names_filter=lambda n: n in names,
            stop_at_layer=shape.layer + 1,
        )
        x, q, k = (cache[h].float() for h in _hooks(shape))
        parts.append((x, q, k))
    return QKBatch(*(torch.cat([p[j] for p in parts]) for j in range(3)), tokens=tokens)


class ModelSource:
    """Contexts packed from a text source and run through ``model`` on the fly.

    Every epoch reads the source in the same (packing) order; with ``max_contexts`` only its
    first contexts are used. Packing follows :func:`tl_superposition.collect` (BOS at the start
    of every context when the model expects one, BOS between documents). With ``mix`` the
    contexts are cut in several formats instead (with and without BOS, at random offsets,
    short and long: :class:`~tl_superposition.activations.mix.ContextMix`); a batch holds
    contexts of one length, in the order they come (the trainer counts every step as
    ``batch_contexts x context_size`` tokens).

    Args:
        model: the model (its layers up to ``shape.layer`` are run).
        source: anything :func:`tl_superposition.activations.resolve_source` accepts (a text
            file or folder, ``"pydoc"``, a list of strings, token tensors, a dataset name).
        shape: the transcoder's attention shape (checked against ``model``).
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
        shape: AttentionShape,
        *,
        context_size: int = 128,
        split: str | None = None,
        max_contexts: int | None = None,
        forward_batch: int = 16,
        mix: ContextMix | None = None,
    ) -> None:
        shape.check_model(model)
        if context_size < 2 or context_size > model.cfg.n_ctx:
            raise ValueError(f"context_size must be in 2..{model.cfg.n_ctx}, got {context_size}")
        self.model = model
        self.shape = shape
        self.context_size = int(context_size)
        self.max_contexts = max_contexts
        self.forward_batch = int(forward_batch)
        self.split = split
        self.hooks = _hooks(shape)
        self._packing = open_packing(model, source, context_size=context_size, split=split)
        self.mix = mix
        if mix is not None:
            if self._packing.source.documents is None:
                raise ValueError("a context mix needs text or token documents, not packed contexts")
            mix.check_context_size(context_size)

    def contexts(self) -> Iterator[np.ndarray]:
        """The token contexts of one pass, in order (int64, ``[context_size]`` or, with a
        mix, ``[mix.short_size]`` for short ones)."""
        p = self._packing
        if self.mix is None:
            it = p.contexts()
        else:
            assert p.source.documents is not None
            it = mix_contexts(
                p.source.documents(), p.context_size, p.bos_token_id, p.separator_token_id,
                self.mix,
            )  # fmt: skip
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

    def batches(self, batch_contexts: int, epoch: int, start: int = 0) -> Iterator[QKBatch]:
        """Batches ``start..`` of a pass (the same for every ``epoch``).

        Raises:
            ValueError: the source has fewer than ``batch_contexts`` contexts.
        """
        del epoch  # a stream is read in the same order every time
        device = self.model.cfg.device
        produced = 0
        for b, rows in enumerate(self.token_batches(batch_contexts)):
            produced += 1
            if b < start:
                continue
            tokens = torch.as_tensor(rows, dtype=torch.long, device=device)
            yield run_to_layer(self.model, self.shape, tokens, self.forward_batch)
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


class MemorySource:
    """Contexts run through ``model`` once and kept in memory, shuffled per epoch.

    Args:
        model: the model (layers ``0..shape.layer`` are run once, in ``forward_batch`` chunks).
        tokens: int64 ``[n_contexts, ctx]`` (e.g. :func:`tl_superposition.activations.pack_text`).
        shape: the transcoder's attention shape (checked against ``model``).
        seed: shuffle seed (epoch ``e`` uses a generator seeded with ``(seed, e)``).

    Raises:
        ValueError: ``model`` does not have ``shape``, or ``tokens`` is not 2-D.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Tensor,
        shape: AttentionShape,
        *,
        seed: int = 0,
        forward_batch: int = 16,
    ) -> None:
        shape.check_model(model)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [n_contexts, ctx >= 2], got {tuple(tokens.shape)}")
        self.shape = shape
        self.context_size = int(tokens.shape[1])
        self.n_contexts = int(tokens.shape[0])
        self.seed = int(seed)
        tokens = tokens.to(model.cfg.device)
        self.data = run_to_layer(model, shape, tokens, forward_batch)
        digest = hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]
        self._description = {
            "kind": "memory",
            "model": str(model.cfg.model_name),
            "n_contexts": self.n_contexts,
            "context_size": self.context_size,
            "tokens_sha256_16": digest,
            "seed": self.seed,
        }

    def batches(self, batch_contexts: int, epoch: int, start: int = 0) -> Iterator[QKBatch]:
        """Batches ``start..`` of epoch ``epoch``; the last partial batch is dropped."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        order = torch.randperm(self.n_contexts, generator=g)
        for b in range(start, self.n_contexts // batch_contexts):
            idx = order[b * batch_contexts : (b + 1) * batch_contexts].to(self.data.x.device)
            yield QKBatch(*(t[idx] for t in self.data))

    def description(self) -> dict[str, Any]:
        """Model, size and a digest of the tokens."""
        return dict(self._description)
