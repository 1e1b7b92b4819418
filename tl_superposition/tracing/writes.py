"""Step 2: how much each upstream component writes into a firing's signal directions.

Upstream write of component ``j`` at position ``p`` into a firing of layer ``L``:
``(y_j[p] . g) / ln1.hook_scale_L[p]`` with ``g`` the signal direction of the firing's side
(:func:`~tl_superposition.tracing.decompose.signal_coordinates`; centred for LayerNorm
models, since LayerNorm subtracts the mean). Over all components, plus the attention output
biases, these writes add up to ``x_p . g`` exactly (:func:`upstream_writes`, the float64
reference; :func:`signal_writes` is the batched float32 version the trace uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.tracing.cache import BatchCache, Workspace
from tl_superposition.tracing.decompose import (
    BatchFirings,
    basis_to_model,
    firing_signal_coordinates,
)
from tl_superposition.tracing.graph import NodeKind
from tl_superposition.tracing.qk_svd import QKSVDCache

# Prompts whose per-head outputs (``z W_O``, n_layers x n_heads x d_model per position) share
# one :class:`ChunkWriters`: bounds its workspace (about 340 MB for 32 SmolLM2 IOI prompts,
# of which the walk fills about 40%). Fewer prompts per chunk mean more calls, each with a
# fixed Python cost.
WRITE_PROMPTS = 32


@dataclass
class ResidualWriters:
    """The weights that write to the residual stream (made once per trace).

    Attributes:
        W_O_model: every head's output matrix, flattened over heads (layer-major), in the
            model's dtype and device (for :func:`signal_writes`).
        b_O_cumsum: row ``L`` is the sum of ``b_O`` over the layers before ``L`` (float64).
        centred: whether the model normalises with LayerNorm (which subtracts the mean, so
            signal directions are centred before the writes are measured).
    """

    W_O_model: Float[Tensor, "n_layers_x_n_heads d_head d_model"]
    b_O_cumsum: Float[Tensor, "n_layers_plus_1 d_model"]
    centred: bool

    @classmethod
    def from_model(cls, model: HookedTransformer) -> ResidualWriters:
        """Copy the writers of ``model``."""
        b_O = model.b_O.detach().to(torch.float64)
        return cls(
            W_O_model=model.W_O.detach().flatten(0, 1),
            b_O_cumsum=torch.cat([torch.zeros_like(b_O[:1]), b_O.cumsum(0)]),
            centred=model.cfg.normalization_type in ("LN", "LNPre"),
        )

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        """Every head's output matrix in float64 (for :func:`upstream_writes`), made on each
        access: the trace itself reads ``W_O_model`` only."""
        n_layers = self.b_O_cumsum.shape[0] - 1
        return self.W_O_model.unflatten(0, (n_layers, -1)).to(torch.float64)


def upstream_writes(
    writers: ResidualWriters | HookedTransformer,
    cache: BatchCache,
    layer: int,
    batch: Int[Tensor, " n"],
    pos: Int[Tensor, " n"],
    g: Float[Tensor, "n d_model"],
) -> Float[Tensor, "n n_upstream_plus_1"]:
    """What each component upstream of ``layer`` writes along ``g`` at ``(batch, pos)``.

    The float64 reference for :func:`signal_writes`. Columns (see :func:`upstream_columns`):
    every head of layers ``< layer`` (layer-major), every MLP of layers ``< layer``, the
    embeddings, and last the summed attention output biases ``b_O`` (not a node). Each write
    is divided by ``blocks.{layer}.ln1.hook_scale`` at that position; for LayerNorm models
    ``g`` is centred first. The columns sum to ``ln1.hook_normalized . g``.

    Args:
        writers: :meth:`ResidualWriters.from_model` (or the model, copied on each call).
        cache: the batch's activations.
        layer: the downstream layer.
        batch, pos: prompt (within the batch) and position of each row.
        g: one direction per row, in ``d_model``.

    Returns:
        float64 writes, in score units of the downstream firing.
    """
    w = writers if isinstance(writers, ResidualWriters) else ResidualWriters.from_model(writers)
    dev = cache.z.device
    batch, pos = batch.to(dev), pos.to(dev)
    g = g.to(device=dev, dtype=torch.float64)
    if w.centred:
        g = g - g.mean(1, keepdim=True)
    # project W_O on g first: [n, L, H, d_head], then dot with z
    wog = torch.einsum("lhed,nd->nlhe", w.W_O[:layer].to(dev), g)
    zg = cache.z[batch, pos, :layer].to(torch.float64)  # [n, L, H, d_head]
    heads = (zg * wog).sum(-1).flatten(1)
    mlps = torch.einsum("nld,nd->nl", cache.mlp[batch, pos, :layer].to(torch.float64), g)
    emb = (cache.embed[batch, pos].to(torch.float64) * g).sum(1, keepdim=True)
    bias = (g @ w.b_O_cumsum[layer].to(dev))[:, None]
    scale = cache.scale[batch, pos, layer].to(torch.float64)[:, None]
    return torch.cat([heads, mlps, emb, bias], 1) / scale


def upstream_columns(layer: int, n_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(kind, layer, head)`` of each column of :func:`upstream_writes` but the bias column.

    ``kind`` holds :class:`~tl_superposition.tracing.graph.NodeKind` values; layer and head
    are -1 where the component has none.
    """
    kinds = [NodeKind.ATTN] * (layer * n_heads) + [NodeKind.MLP] * layer + [NodeKind.EMBED]
    layers = [up for up in range(layer) for _ in range(n_heads)] + list(range(layer)) + [-1]
    heads = [h for _ in range(layer) for h in range(n_heads)] + [-1] * layer + [-1]
    return np.array([int(k) for k in kinds]), np.array(layers), np.array(heads)


@dataclass
class SideWrites:
    """What the upstream components write into firing sides (score units).

    Rows: the source side of every measured firing (in the order asked for), then the
    destination side of every measured firing. Writes from components at or above the
    firing's layer are 0.

    Attributes:
        heads: ``[2n, n_layers * n_heads]`` per upstream head (layer-major), float32.
        mlps: ``[2n, n_layers]`` per MLP.
        embed: ``[2n]`` the embeddings.
        bias: ``[2n]`` the summed attention output biases of the layers below.
        bias_coord: ``[2n]`` the bias-coordinate term ``g~[-1] / scale`` the authors add to
            every head (:attr:`TraceConfig.augmented_bias`).
    """

    heads: Float[Tensor, "n_sides n_upstream_heads"]
    mlps: Float[Tensor, "n_sides n_layers"]
    embed: Float[Tensor, " n_sides"]
    bias: Float[Tensor, " n_sides"]
    bias_coord: Float[Tensor, " n_sides"]


def side_directions(
    qk: QKSVDCache, firings: BatchFirings, rows: Int[Tensor, " k"], centred: bool
) -> Float[Tensor, "two_k d_model_plus_1"]:
    """The source-side then destination-side signal directions of firings ``rows``, float64.

    In the augmented space: the first ``d_model`` coordinates are the direction in the
    residual stream (centred for LayerNorm models), the last one the bias coordinate.
    """
    k = len(rows)
    d_aug = qk[0].q_basis.shape[1]
    dev = qk[0].q_basis.device
    g = torch.zeros(2 * k, d_aug, dtype=torch.float64, device=dev)
    layer = firings.layer[rows]
    for L in layer.unique().tolist():
        sel = (layer == L).nonzero()[:, 0]
        r, head = rows[sel], firings.head[rows[sel]]
        t_src, t_dest = firing_signal_coordinates(qk[L], firings, r)
        g[sel] = basis_to_model(qk[L].k_basis, t_src.to(dev), head)
        g[sel + k] = basis_to_model(qk[L].q_basis, t_dest.to(dev), head)
    if centred:
        g[:, :-1] -= g[:, :-1].mean(1, keepdim=True)
    return g


class ChunkWriters:
    """The writers' outputs at positions of prompts ``lo .. hi - 1`` of a batch, formed on demand.

    A position's per-head outputs ``z W_O`` are formed the first time :meth:`form` is asked
    for it, for the heads below the highest layer asked for then: the walk goes down the
    layers, so a later read of that position never needs more heads, and positions no
    reached firing reads (about 60% of the head outputs of an IOI batch) are never formed.
    The positions of one :meth:`form` call are formed together, one batched product per
    head, into a new block of the workspace. The MLP outputs are a view of the cache's.

    Args:
        writers, cache: the weights and the batch's activations.
        lo, hi: the prompts (within the batch).
        workspace: where the outputs are formed (default: new memory); a chunk made later in
            the same workspace overwrites this one.
    """

    def __init__(
        self,
        writers: ResidualWriters,
        cache: BatchCache,
        lo: int,
        hi: int,
        workspace: Workspace | None = None,
    ):
        self.lo, self.hi = lo, hi
        self.mlp: Float[Tensor, "b pos n_layers d_model"] = cache.mlp[lo:hi]
        self._z = cache.z[lo:hi].flatten(2, 3)  # [b, pos, n_up, d_head]
        self._W_O = writers.W_O_model
        b, P, n_up, _ = self._z.shape
        d_model = self._W_O.shape[-1]
        # every position formed once with at most n_up heads: the blocks fit in this
        self._flat = (workspace or Workspace()).take(
            n_up * b * P * d_model, self._z.dtype, self._z.device
        )
        self._used = 0
        self._blocks: list[Tensor] = []  # [width, n_positions, d_model] each
        # per position: (block, row, number of heads formed), -1 and 0 where not formed
        self._where = torch.full((b, P, 3), -1, dtype=torch.long)
        self._where[..., 2] = 0

    def __contains__(self, prompt: int) -> bool:
        return self.lo <= prompt < self.hi

    def form(self, prompt: Int[Tensor, " n"], pos: Int[Tensor, " n"], width: int) -> None:
        """Form the outputs of the first ``width`` heads (layer-major) at ``(prompt[i], pos[i])``.

        Prompts are numbered within the batch and must lie in this chunk. Positions already
        formed with at least ``width`` heads are left as they are.
        """
        prompt, pos = prompt.long().cpu() - self.lo, pos.long().cpu()
        new = self._where[prompt, pos, 2] < width
        if not new.any():
            return
        P = self._z.shape[1]
        key = torch.unique(prompt[new] * P + pos[new])
        bn, pn = key // P, key % P
        z = self._z[bn.to(self._z.device), pn.to(self._z.device), :width]  # [m, width, d_head]
        m, d_model = len(key), self._W_O.shape[-1]
        n = width * m * d_model
        if self._used + n <= len(self._flat):
            block = self._flat[self._used : self._used + n].view(width, m, d_model)
            self._used += n
        else:  # positions formed again with more heads (the walk never asks for that)
            block = z.new_empty(width, m, d_model)
        torch.bmm(z.transpose(0, 1), self._W_O[:width], out=block)
        self._where[bn, pn] = torch.stack(
            [torch.full((m,), len(self._blocks)), torch.arange(m), torch.full((m,), width)], 1
        )
        self._blocks.append(block)

    def transposed_outputs(
        self, prompt: Int[Tensor, " n"], pos: Int[Tensor, " n"]
    ) -> list[Float[Tensor, "d_model width"]]:
        """The outputs formed at each ``(prompt[i], pos[i])``, as transposed views (no copy).

        One lookup for all the positions; :meth:`outputs` is the same for one position.

        Raises:
            KeyError: a position was not formed (:meth:`form`).
        """
        where = self._where[prompt.long().cpu() - self.lo, pos.long().cpu()]
        if (where[:, 0] < 0).any():
            i = int((where[:, 0] < 0).nonzero()[0, 0])
            raise KeyError(
                f"position {int(pos[i])} of prompt {int(prompt[i])} was not formed "
                "(call form first)"
            )
        views = [block.permute(1, 2, 0) for block in self._blocks]  # [m, d_model, width]
        return [views[b][r] for b, r in where[:, :2].tolist()]

    def outputs(self, prompt: int, pos: int) -> Float[Tensor, "width d_model"]:
        """The per-head outputs formed at ``(prompt, pos)`` (prompt within the batch).

        Raises:
            KeyError: that position was not formed (:meth:`form`).
        """
        return self.transposed_outputs(torch.tensor([prompt]), torch.tensor([pos]))[0].T


def _products(
    chunk: ChunkWriters,
    g: Float[Tensor, "n_sides d_model"],
    prompt: Int[Tensor, " m"],
    pos: Int[Tensor, " m"],
    bounds: list[int],
    widths: list[int],
    heads: Float[Tensor, "n_sides n_upstream_heads"],
    mlps: Float[Tensor, "n_sides n_layers"],
) -> None:
    """Fill the head and MLP writes of the sides of ``m`` positions of one chunk.

    Position ``i``'s sides are rows ``bounds[i] .. bounds[i + 1] - 1`` of ``g``, ``heads`` and
    ``mlps``; they read its first ``widths[i]`` head outputs (formed, :meth:`ChunkWriters.form`)
    and every MLP output. Two matrix products per position, written in place: this loop
    runs once per position a walk step reads, so it does nothing else.
    """
    outs = chunk.transposed_outputs(prompt, pos) if any(widths) else [None] * len(widths)
    mlp_t = chunk.mlp.transpose(-1, -2)  # [b, pos, d_model, n_layers], a view
    rel = (prompt - chunk.lo).tolist()
    for bi, p, out, w, lo, hi in zip(rel, pos.tolist(), outs, widths, bounds, bounds[1:]):
        gi = g[lo:hi]
        if w:
            torch.mm(gi, out[:, :w], out=heads[lo:hi, :w])
        torch.mm(gi, mlp_t[bi, p], out=mlps[lo:hi])


@torch.inference_mode()
def signal_writes(
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    firings: BatchFirings,
    rows: Int[Tensor, " k"] | None = None,
    chunk: ChunkWriters | None = None,
) -> SideWrites:
    """Step 2: the writes of every upstream component into both sides of firings ``rows``.

    The writers' outputs are formed for :data:`WRITE_PROMPTS` prompts at a time, at the
    positions the sides read only, for the heads below their layers (:class:`ChunkWriters`,
    in this call's own memory; ``chunk`` serves the rows whose prompts it holds and gains
    the positions it lacks, while what it holds is never overwritten), and all the sides
    that read one position are served by one product with that position's outputs: at most
    ``n_layers n_heads d_head d_model`` per position and ``n_layers n_heads d_model`` per
    side. Values agree with
    :func:`upstream_writes` up to float32 rounding.

    Args:
        qk, writers, cache: the layer decompositions, the weights, the batch's activations.
        firings: the batch's firings.
        rows: the firings whose sides are measured (default: all).
        chunk: the writers' outputs of some prompts, kept by the caller across calls (the
            walk keeps one per :data:`WRITE_PROMPTS` prompts over its layers).

    Returns:
        :class:`SideWrites` with ``2 * len(rows)`` rows: the source sides, then the
        destination sides.
    """
    rows = torch.arange(len(firings)) if rows is None else rows
    k, n_layers, n_heads = len(rows), cache.x.shape[2], cache.z.shape[3]
    dev, dtype = cache.z.device, cache.z.dtype
    b = torch.cat([firings.prompt[rows], firings.prompt[rows]])
    pos = torch.cat([firings.src[rows], firings.dest[rows]])
    layer = torch.cat([firings.layer[rows], firings.layer[rows]])
    g_aug = side_directions(qk, firings, rows, writers.centred)
    n_up, P = writers.W_O_model.shape[0], cache.z.shape[1]
    # sides sorted by (prompt, position): every position's sides are one contiguous slice
    key = b * P + pos
    order = torch.argsort(key, stable=True)
    g_model = g_aug[:, :-1].to(dtype)  # the residual-stream part, in the model's dtype
    g = g_model[order.to(dev)]
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    bounds = [0, *counts.cumsum(0).tolist()]
    heads = torch.zeros(2 * k, n_up, dtype=dtype, device=dev)
    mlps = torch.empty(2 * k, n_layers, dtype=dtype, device=dev)
    # heads at or above a side's layer write nothing into it: each position reads only the
    # outputs of the heads below the highest layer among its sides
    segment = torch.repeat_interleave(torch.arange(len(keys)), counts)
    top = torch.zeros(len(keys), dtype=torch.long).scatter_reduce_(
        0, segment, layer[order].cpu().long(), "amax"
    )
    own = Workspace()  # the chunks this call makes (a caller's ``chunk`` only gains positions)
    key_b, key_p = keys // P, keys % P
    b_list, top_list = key_b.tolist(), top.tolist()
    start = 0
    while start < len(keys):
        if chunk is None or b_list[start] not in chunk:
            c0 = b_list[start] - b_list[start] % WRITE_PROMPTS
            chunk = ChunkWriters(writers, cache, c0, min(c0 + WRITE_PROMPTS, len(cache.z)), own)
        end = int(torch.searchsorted(key_b, chunk.hi))  # keys are sorted by prompt
        width = max(top_list[start:end]) * n_heads
        if width:
            chunk.form(key_b[start:end], key_p[start:end], width)
        widths = [t * n_heads for t in top_list[start:end]]
        where = (key_b[start:end], key_p[start:end], bounds[start : end + 1], widths)
        _products(chunk, g, *where, heads, mlps)
        start = end
    # back to the order of the sides, scaled, writers at or above the firing's layer zeroed
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    inverse = inverse.to(dev)
    heads, mlps = heads[inverse], mlps[inverse]
    b, pos, layer = b.to(dev), pos.to(dev), layer.to(dev)
    embed = (g_model * cache.embed[b, pos]).sum(1)
    scale = cache.scale[b, pos, layer].to(torch.float64)
    heads /= scale.to(dtype)[:, None]
    mlps /= scale.to(dtype)[:, None]
    up_layer = torch.arange(n_up, device=dev) // n_heads
    heads.masked_fill_(up_layer[None, :] >= layer[:, None], 0)
    mlps.masked_fill_(torch.arange(n_layers, device=dev)[None, :] >= layer[:, None], 0)
    bias = (g_aug[:, :-1] * writers.b_O_cumsum.to(dev)[layer]).sum(1) / scale
    return SideWrites(
        heads=heads.float().cpu(),
        mlps=mlps.float().cpu(),
        embed=(embed / scale.to(dtype)).float().cpu(),
        bias=bias.float().cpu(),
        bias_coord=(g_aug[:, -1] / scale).float().cpu(),
    )
