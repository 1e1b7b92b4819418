"""``ActivationStore``: memory-mapped, shuffled minibatches from a :func:`collect` folder.

Shards are opened with ``safetensors.safe_open``, whose torch tensors are copy-on-write memory
maps of the file: opening reads only the header, and a minibatch reads only the pages of the
contexts it gathers. It replaced a hand-written ``mmap`` reader after a measurement
(safetensors 0.8.0, a 168 MiB shard of 256 SmolLM2-sized contexts, batches of 16 random
contexts, CPU time per batch, medians of 20 alternating rounds on 2 loaded cores):
``safe_open`` 11.5 ms and the own reader 13.0 ms with the file in the page cache, 26.2 ms and
30.9 ms after dropping it from the cache; opening every tensor of the shard with ``safe_open``
raised the resident memory by 3 MiB. Two granularities:

- :meth:`ActivationStore.iter_contexts`: whole contexts ``[batch, context_size, ...]`` (what
  attention losses need, e.g. KL over every query row of a pattern);
- :meth:`ActivationStore.iter_tokens`: single token positions ``[batch, ...]`` mixed across
  contexts through a shuffle buffer (what a sparse autoencoder/transcoder on one position needs).

Both are deterministic for a given ``seed`` and ``epoch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from tl_superposition.activations.folder import ATTENTION_FILE, MANIFEST
from tl_superposition.activations.patterns import pattern_from_qk
from tl_superposition.core.batches import epoch_generator, epoch_order
from tl_superposition.core.hooks import block_hook
from tl_superposition.core.reading import read_json, reading


def open_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a safetensors file as copy-on-write memory maps (nothing read yet).

    Writing to a returned tensor never changes the file.

    Raises:
        CorruptFileError: the file is not a valid safetensors file (the message names it).
    """
    with (
        reading(path, "delete it and rerun the collect command, which resumes"),
        safe_open(str(path), framework="pt") as f,
    ):
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)


class ActivationStore:
    """Reader for a folder written by :func:`tl_superposition.collect`.

    Args:
        path: the collection folder (holding ``manifest.json``).
        device: where batches are put (default CPU).
        dtype: float dtype of the returned activations (default: as stored).
        allow_incomplete: read a collection whose run has not finished (its complete shards).

    Attributes:
        manifest: the parsed ``manifest.json`` (settings, shapes, source, versions).
        hooks: the stored hook names.
        context_size: tokens per context.
        n_contexts, n_tokens: totals on disk.

    Raises:
        FileNotFoundError: no manifest in ``path``.
        RuntimeError: the collection is incomplete and ``allow_incomplete`` is False.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {self.path}: not a collection folder")
        self.manifest: dict[str, Any] = read_json(mpath)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise RuntimeError(
                f"the collection in {self.path} is incomplete (run interrupted); rerun collect() "
                "with the same settings to finish it, or pass allow_incomplete=True"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.hooks: list[str] = list(self.manifest["settings"]["hooks"])
        self.context_size: int = int(self.manifest["settings"]["context_size"])
        self.seed: int = int(self.manifest["settings"].get("seed", 0))
        self._shards: list[dict[str, Tensor]] = []
        starts = []
        for s in self.manifest["shards"]:
            self._shards.append(open_tensors(self.path / s["file"]))
            starts.append(int(s["first_context"]))
        self._starts = torch.tensor(starts + [int(self.manifest["n_contexts"])], dtype=torch.long)
        self.n_contexts: int = int(self.manifest["n_contexts"])
        self.n_tokens: int = self.n_contexts * self.context_size
        self._rotary: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.n_contexts

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, contexts={self.n_contexts}, "
            f"context_size={self.context_size}, hooks={self.hooks})"
        )

    # ------------------------------------------------------------------ basic access

    def shape(self, hook: str) -> list[int]:
        """Per-context shape of a stored hook.

        ``[context_size, ...]``; patterns ``[heads, ctx, ctx]``.
        """
        return list(self.manifest["hooks"][hook]["shape"])

    def _check_hooks(self, hooks: Sequence[str] | None) -> list[str]:
        if hooks is None:
            return list(self.hooks)
        if isinstance(hooks, str):
            hooks = [hooks]
        missing = [h for h in hooks if h not in self.hooks]
        if missing:
            raise KeyError(f"hooks {missing} are not stored; stored: {self.hooks}")
        return list(hooks)

    def _out(self, t: Tensor) -> Tensor:
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def get_contexts(
        self,
        indices: Sequence[int] | Tensor,
        hooks: Sequence[str] | None = None,
        *,
        tokens: bool = True,
    ) -> dict[str, Tensor]:
        """Gather contexts by global index (0 .. n_contexts-1), in the order given.

        Returns:
            ``{hook: [len(indices), *shape(hook)]}`` plus ``"tokens"``: int64
            ``[len(indices), context_size]`` when ``tokens``.
        """
        hooks = self._check_hooks(hooks)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n_contexts):
            raise IndexError(f"context index out of range 0-{self.n_contexts - 1}")
        shard = torch.searchsorted(self._starts, idx, right=True) - 1
        local = idx - self._starts[shard]
        names = hooks + (["tokens"] if tokens else [])
        out: dict[str, Tensor] = {}
        for name in names:
            ref = self._shards[0][name]
            res = torch.empty((idx.numel(),) + tuple(ref.shape[1:]), dtype=ref.dtype)
            for s in torch.unique(shard).tolist():
                sel = (shard == s).nonzero().squeeze(1)
                res[sel] = self._shards[s][name].index_select(0, local[sel])
            if name == "tokens":
                res = res.long()
            out[name] = self._out(res)
        return out

    # ------------------------------------------------------------------ iteration

    def _permutation(self, shuffle: bool, seed: int | None, epoch: int) -> Tensor:
        return epoch_order(self.n_contexts, self.seed if seed is None else seed, epoch, shuffle)

    def iter_contexts(
        self,
        batch_size: int,
        hooks: Sequence[str] | None = None,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        epoch: int = 0,
        drop_last: bool = False,
        tokens: bool = True,
    ) -> Iterator[dict[str, Tensor]]:
        """One epoch of whole-context minibatches.

        Yields:
            ``{hook: [batch, *shape(hook)]}`` (e.g. ``attn.hook_q``: ``[batch, ctx, n_heads,
            d_head]``) plus ``"tokens"`` int64 ``[batch, ctx]``. Contexts are in a random order
            fixed by ``seed`` (default the manifest's) and ``epoch``.
        """
        hooks = self._check_hooks(hooks)
        perm = self._permutation(shuffle, seed, epoch)
        for lo in range(0, self.n_contexts, batch_size):
            idx = perm[lo : lo + batch_size]
            if drop_last and idx.numel() < batch_size:
                return
            yield self.get_contexts(idx, hooks, tokens=tokens)

    def iter_tokens(
        self,
        batch_size: int,
        hooks: Sequence[str] | None = None,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        epoch: int = 0,
        buffer_contexts: int = 256,
        skip_bos: bool = False,
        drop_last: bool = False,
        tokens: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """One epoch of single-position minibatches, mixed across contexts.

        Contexts are visited in a random order; ``buffer_contexts`` of them at a time are
        flattened to positions and shuffled together (a mixing buffer, so memory stays at
        ``buffer_contexts x context_size`` positions).

        Args:
            hooks: position-wise hooks (default: every stored hook but ``attn.hook_pattern``,
                which is not position-wise).
            skip_bos: leave out position 0 (the BOS token, when contexts start with one).
            tokens: also yield ``"tokens"`` (int64 ``[batch]``).

        Yields:
            ``{hook: [batch, *shape(hook)[1:]]}``, e.g. ``ln1.hook_normalized``:
            ``[batch, d_model]``.
        """
        if hooks is None:
            hooks = [h for h in self.hooks if not h.endswith("hook_pattern")]
        hooks = self._check_hooks(hooks)
        bad = [h for h in hooks if h.endswith("hook_pattern")]
        if bad:
            raise ValueError(f"{bad}: patterns are not position-wise; use iter_contexts")
        g = epoch_generator(self.seed if seed is None else seed, epoch, offset=7)
        perm = self._permutation(shuffle, seed, epoch)
        names = hooks + (["tokens"] if tokens else [])
        carry: dict[str, Tensor] | None = None
        start_pos = 1 if skip_bos else 0
        for lo in range(0, self.n_contexts, buffer_contexts):
            ctx = self.get_contexts(perm[lo : lo + buffer_contexts], hooks, tokens=tokens)
            flat = {
                k: ctx[k][:, start_pos:].reshape((-1,) + tuple(ctx[k].shape[2:])) for k in names
            }
            if carry is not None:
                flat = {k: torch.cat([carry[k], flat[k]]) for k in names}
            n = flat[names[0]].shape[0]
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            order = order.to(flat[names[0]].device)
            full = (n // batch_size) * batch_size
            for b in range(0, full, batch_size):
                sel = order[b : b + batch_size]
                yield {k: flat[k][sel] for k in names}
            rest = order[full:]
            carry = {k: flat[k][rest] for k in names} if rest.numel() else None
        if carry is not None and not drop_last:
            yield carry

    # ------------------------------------------------------------------ patterns

    def attention_params(self, layer: int) -> dict[str, Any]:
        """The attention constants recorded for ``layer`` (:func:`patterns.attention_params`)."""
        try:
            return self.manifest["attention"][str(layer)]
        except KeyError:
            raise KeyError(
                f"layer {layer}: queries and keys were not both collected, so its pattern "
                "cannot be recomputed; collect attn.hook_q and attn.hook_k of that layer"
            ) from None

    def attention_pattern(
        self,
        batch: dict[str, Tensor],
        layer: int,
        heads: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch n_sel_heads pos pos"]:
        """Recompute ``blocks.{layer}.attn.hook_pattern`` from a batch's stored q and k.

        Args:
            batch: a dict from :meth:`iter_contexts` / :meth:`get_contexts` holding
                ``blocks.{layer}.attn.hook_q`` and ``.hook_k`` (or ``hook_rot_q``/``hook_rot_k``).
            heads: query heads to return (default all).

        Returns:
            float32 ``[batch, len(heads), ctx, ctx]`` on the batch's device.
        """
        params = self.attention_params(layer)
        q_name, k_name = block_hook(layer, "attn.hook_q"), block_hook(layer, "attn.hook_k")
        rq_name, rk_name = (
            block_hook(layer, "attn.hook_rot_q"),
            block_hook(layer, "attn.hook_rot_k"),
        )
        if q_name in batch and k_name in batch:
            q, k, rotated = batch[q_name], batch[k_name], False
        elif rq_name in batch and rk_name in batch:
            q, k, rotated = batch[rq_name], batch[rk_name], True
        else:
            raise KeyError(f"batch lacks {q_name} and {k_name}")
        rot = None
        if params.get("rotary") and not rotated:
            if self._rotary is None:
                self._rotary = open_tensors(self.path / ATTENTION_FILE)
            rot = (
                self._rotary[block_hook(layer, "rotary_cos")],
                self._rotary[block_hook(layer, "rotary_sin")],
            )
        return pattern_from_qk(
            q,
            k,
            params,
            rot,
            already_rotated=rotated,
            heads=list(heads) if heads is not None else None,
        )
