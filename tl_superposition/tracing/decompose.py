"""Firings and their sparse singular-component decomposition (Franco & Crovella 2024, Sec. 3-4).

A head *fires* on ``(dest, src)`` when its attention pattern there is at least
``pattern_thresh`` (default 0.5) and the score is positive; source position 0 (BOS, or the
attention sink of prompts without BOS) is excluded.

For a firing, singular component ``k`` of the head's QK form contributes
``c_k = S_k (x~_dest . u_k)(x~_src . v_k)`` to the score; the ``c_k`` sum to the value of
``blocks.L.attn.hook_attn_scores`` at that place. The *sparse set* is the shortest prefix of
the components sorted by contribution (descending; ascending for a negative score) whose
cumulative sum reaches ``thresh x score``. Sorting makes that prefix the smallest subset of
any kind reaching the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_superposition.tracing.qk_svd import LayerQK, QKSVDCache

if TYPE_CHECKING:
    from tl_superposition.tracing.cache import BatchCache
    from tl_superposition.tracing.config import TraceConfig

# Relative tolerance (of sum |c_k|) when testing "the cumulative sum reaches the target":
# float rounding must not make a prefix that reaches the score exactly look one short.
REACH_RTOL = 1e-6
# Firings projected at once: bounds the gathered d_head x d_head cores (64 KiB per firing).
CHUNK = 2048


def firing_mask(
    pattern: Float[Tensor, "batch n_heads dest src"],
    scores: Float[Tensor, "batch n_heads dest src"],
    pattern_thresh: float | Float[Tensor, " dest"] = 0.5,
    exclude_first: bool = True,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> Bool[Tensor, "batch n_heads dest src"]:
    """Where the heads of one layer fire: ``pattern >= threshold`` and ``score > 0``.

    Args:
        pattern, scores: the layer's ``hook_pattern`` and ``hook_attn_scores``.
        pattern_thresh: minimum attention probability, one number or one per destination
            (:meth:`~tl_superposition.tracing.config.TraceConfig.pattern_thresholds`).
        exclude_first: skip source position 0 (BOS / attention sink).
        positions: where firings may be: both the destination and the source must be
            ``True`` (``None``: everywhere).
    """
    thr = torch.as_tensor(pattern_thresh, dtype=pattern.dtype, device=pattern.device)
    if thr.ndim == 1:
        thr = thr[: pattern.shape[2], None]
    fire = (pattern >= thr) & (scores > 0)
    if exclude_first:
        fire[..., 0] = False
    if positions is not None:
        ok = positions.to(pattern.device)
        fire &= ok[:, None, :, None] & ok[:, None, None, :]
    return fire


def find_firings(
    pattern: Float[Tensor, "batch n_heads dest src"],
    scores: Float[Tensor, "batch n_heads dest src"],
    lengths: Int[Tensor, " batch"] | None = None,
    pattern_thresh: float | Float[Tensor, " dest"] = 0.5,
    exclude_first: bool = True,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Indices ``(batch, head, dest, src)`` of every firing in one layer (:func:`firing_mask`).

    Args:
        pattern, scores: the layer's ``hook_pattern`` and ``hook_attn_scores``.
        lengths: real length of each (right-padded) prompt; positions at or beyond it are
            ignored. ``None``: every position is real.
        pattern_thresh, exclude_first, positions: the firing rule (:func:`firing_mask`).
    """
    fire = firing_mask(pattern, scores, pattern_thresh, exclude_first, positions)
    if lengths is not None:
        dest_ok = (
            torch.arange(pattern.shape[2], device=pattern.device)[None, :]
            < lengths.to(pattern.device)[:, None]
        )
        fire &= dest_ok[:, None, :, None]
    b, h, d, s = fire.nonzero(as_tuple=True)
    return b, h, d, s


def sample_nonfirings(
    patterns: Sequence[Float[Tensor, "batch n_heads dest src"]],
    scores: Sequence[Float[Tensor, "batch n_heads dest src"]],
    lengths: Int[Tensor, " batch"],
    prompt_ids: Int[Tensor, " batch"],
    frac: float,
    seed: int = 0,
    pattern_thresh: float | Float[Tensor, " dest"] = 0.5,
    exclude_first: bool = True,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """A random share ``frac`` of the places where each layer's heads do *not* fire.

    The candidates are the causal places ``src <= dest < length`` (``src >= 1`` with
    ``exclude_first``) that are not firings (:func:`find_firings`). Each prompt draws from its
    own ``torch.Generator``, seeded by ``(seed, prompt id)``, so its sample does not depend on
    the batches it is traced in.

    Args:
        patterns, scores: every layer's ``hook_pattern`` and ``hook_attn_scores``.
        lengths: real length of each prompt.
        prompt_ids: each prompt's index over the whole trace.
        frac: share of the candidates kept, in [0, 1].
        seed: seed of the draws.
        pattern_thresh, exclude_first: the firing rule (:func:`firing_mask`).
        positions: where places may be (destination and source), as for firings.

    Returns:
        Per layer, ``(batch, head, dest, src)`` indices as :func:`find_firings`.
    """
    n_layers = len(patterns)
    B, H, P, _ = patterns[0].shape
    draw = torch.ones(B, n_layers, H, P, P)
    if frac > 0:
        for i, (pid, n) in enumerate(zip(prompt_ids.tolist(), lengths.tolist())):
            state = np.random.SeedSequence([seed, pid]).generate_state(2)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            draw[i, :, :, :n, :n] = torch.rand(n_layers, H, n, n, generator=gen)
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    if exclude_first:
        causal[:, 0] = False
    allowed = causal[None, None]
    if positions is not None:
        ok = positions.cpu()
        allowed = allowed & ok[:, None, :, None] & ok[:, None, None, :]
    out = []
    for L in range(n_layers):
        fire = firing_mask(patterns[L], scores[L], pattern_thresh, exclude_first).cpu()
        keep = (draw[:, L] < frac) & allowed & ~fire
        b, h, d, s = keep.nonzero(as_tuple=True)
        out.append((b, h, d, s))
    return out


def shortest_prefix(
    values: Float[Tensor, "n m"],
    target: Float[Tensor, " n"],
    rtol: float = REACH_RTOL,
) -> tuple[Int[Tensor, "n m"], Int[Tensor, " n"]]:
    """Sort each row towards ``target`` and find the shortest prefix that reaches it.

    For a positive target the values are sorted descending and the prefix must reach
    ``cumsum >= target``; for a negative target, ascending and ``cumsum <= target``. The
    comparison allows ``rtol * sum |values|`` of rounding.

    Returns:
        ``(order, count)``: ``order[i]`` are the column indices of row ``i`` in selection order;
        ``count[i]`` the length of the shortest prefix (``m`` if none reaches the target).
    """
    sign = torch.where(target >= 0, 1.0, -1.0).to(values.dtype)
    v = values * sign[:, None]
    order = torch.argsort(v, dim=1, descending=True, stable=True)
    cs = torch.gather(v, 1, order).cumsum(1)
    tol = rtol * values.abs().sum(1)
    reached = cs >= (target * sign - tol)[:, None]
    count = torch.where(
        reached.any(1),
        reached.to(torch.int8).argmax(1) + 1,
        torch.full_like(target, values.shape[1], dtype=torch.long),
    )
    return order, count.long()


def selected_mask(order: Int[Tensor, "n m"], count: Int[Tensor, " n"]) -> Bool[Tensor, "n m"]:
    """Boolean ``[n, m]`` mask of the columns in each row's selected prefix."""
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank < count[:, None]


class RowCores:
    """The core factors ``U_c``, ``V_c`` of each row's (head, offset), applied group by group.

    Rows sharing a (head, offset) share their ``d_head x d_head`` factors, so instead of
    gathering one pair of matrices per row (64 KiB per firing in float64), rows are sorted by
    (offset, head) once and every product is one matrix product per group, on contiguous
    slices.

    Args:
        qk: the layer's QK decomposition.
        head, offset: per row (``offset`` is ignored by non-rotary models).
    """

    def __init__(self, qk: LayerQK, head: Int[Tensor, " n"], offset: Int[Tensor, " n"]):
        n_heads = qk.q_basis.shape[0]
        offset = offset.long().cpu() if qk.rotary else torch.zeros(len(head), dtype=torch.long)
        head = head.long().cpu()
        self.u, s, self.v = qk.ensure(offset, head)
        self.s = s[offset.to(s.device), head.to(s.device)]
        key = offset * n_heads + head
        self.order = torch.argsort(key, stable=True)
        keys, counts = torch.unique_consecutive(key[self.order], return_counts=True)
        self.groups = [divmod(int(k), n_heads) for k in keys.tolist()]
        self.bounds = [0, *counts.cumsum(0).tolist()]

    def apply(
        self, xu: Float[Tensor, "n d_head"], xv: Float[Tensor, "n d_head"], transpose: bool = False
    ) -> tuple[Float[Tensor, "n d_head"], Float[Tensor, "n d_head"]]:
        """``(xu[i] @ U_c,i, xv[i] @ V_c,i)`` per row, in one pass of the groups.

        With ``transpose``, ``U_c,i^T`` and ``V_c,i^T`` instead (that is ``U_c,i xu[i]``).
        """
        dev = self.u.device
        order = self.order.to(dev)
        xs = [xu.to(dev)[order], xv.to(dev)[order]]
        outs = [torch.empty_like(x) for x in xs]
        for (t, h), lo, hi in zip(self.groups, self.bounds[:-1], self.bounds[1:]):
            for x, mats, out in zip(xs, (self.u, self.v), outs):
                m = mats[t, h]
                torch.mm(x[lo:hi], m.T if transpose else m, out=out[lo:hi])
        out_u, out_v = (torch.empty_like(out).index_copy_(0, order, out) for out in outs)
        return out_u, out_v


@dataclass
class Projections:
    """Per-firing projections of the two residual vectors on a head's singular directions.

    ``a[:, k] = x~_dest . u_k`` and ``b[:, k] = x~_src . v_k`` (float64); ``s[:, k] = S_k`` in
    score units. ``cores`` applies each row's core factors (for signal directions).
    """

    a: Float[Tensor, "n d_head"]
    b: Float[Tensor, "n d_head"]
    s: Float[Tensor, "n d_head"]
    cores: RowCores

    @property
    def contributions(self) -> Float[Tensor, "n d_head"]:
        """``c_k = S_k a_k b_k``, the contribution of each singular component to the score."""
        return self.s * self.a * self.b


def _by_head(
    x: Float[Tensor, "n d_in"],
    head: Int[Tensor, " n"],
    n_heads: int,
    width: int,
    product: Callable[[int, Tensor, Tensor], object],
) -> Float[Tensor, "n width"]:
    """``product(h, rows, out)`` once per head, on the rows of ``x`` of that head.

    The rows are sorted by head once, so each head's rows and outputs are contiguous slices;
    ``product`` writes ``out`` (``[rows, width]``). The result comes back in the order of ``x``.
    The loop is over heads, never over rows.
    """
    head = head.to(x.device)
    order = torch.argsort(head, stable=True)
    counts = torch.bincount(head, minlength=n_heads).tolist()
    xs = x[order]
    out = xs.new_empty(len(head), width)
    start = 0
    for h, c in enumerate(counts):
        if c:
            product(h, xs[start : start + c], out[start : start + c])
            start += c
    return torch.empty_like(out).index_copy_(0, order, out)


def _on_basis(
    x: Float[Tensor, "n d_model"],
    basis: Float[Tensor, "n_heads d_model_plus_1 d_head"],
    head: Int[Tensor, " n"],
) -> Float[Tensor, "n d_head"]:
    """``[x, 1] @ basis[head]`` per row, one matrix product per head, returned as float64.

    The product is taken in ``basis``'s dtype (pass the basis in ``x``'s dtype, see
    :meth:`LayerQK.basis`): the columns are orthonormal, so a float32 product keeps each
    coordinate to float32 rounding of ``|x~|``, the precision ``x`` was cached in.
    """
    xs = x.to(device=basis.device, dtype=basis.dtype)
    n_heads, _, d_head = basis.shape

    def product(h: int, rows: Tensor, out: Tensor) -> None:
        torch.addmm(basis[h, -1], rows, basis[h, :-1], out=out)

    return _by_head(xs, head, n_heads, d_head, product).to(torch.float64)


def project(
    qk: LayerQK,
    x_dest: Float[Tensor, "n d_model"],
    x_src: Float[Tensor, "n d_model"],
    head: Int[Tensor, " n"],
    offset: Int[Tensor, " n"],
) -> Projections:
    """Project each firing's normalised residual vectors on its head's singular directions.

    Args:
        qk: the layer's QK decomposition.
        x_dest, x_src: ``ln1.hook_normalized`` at the destination and source positions.
        head: query head of each firing.
        offset: ``dest - src`` (ignored by non-rotary models).

    The loops are over heads and (head, offset) groups (:class:`RowCores`), never over
    firings.
    """
    pd = _on_basis(x_dest, qk.basis("q", x_dest.dtype), head)
    ps = _on_basis(x_src, qk.basis("k", x_src.dtype), head)
    cores = RowCores(qk, head, offset)
    a, b = cores.apply(pd, ps)
    return Projections(a=a, b=b, s=cores.s.to(a.device), cores=cores)


def _weighted_coordinates(
    cores: RowCores,
    dest_sign: Float[Tensor, "n d_head"],
    selected: Bool[Tensor, "n d_head"],
) -> tuple[Float[Tensor, "n d_head"], Float[Tensor, "n d_head"]]:
    """``(V_c w, U_c w)`` with ``w_k = dest_sign_k sqrt(S_k)`` on the selected components."""
    s = cores.s.to(dest_sign.device)
    w = torch.where(selected, dest_sign * s.sqrt(), torch.zeros_like(s))
    t_dest, t_src = cores.apply(w, w, transpose=True)
    return t_src, t_dest


def signal_coordinates(
    proj: Projections, selected: Bool[Tensor, "n d_head"]
) -> tuple[Float[Tensor, "n d_head"], Float[Tensor, "n d_head"]]:
    """The signal directions of each firing in the coordinates of its head's bases.

    Following Franco & Crovella, component ``k`` of the selected set is weighted by
    ``w_k = sign(x~_dest . u_k) sqrt(S_k)``; the source-side direction is ``sum_k w_k v_k`` and
    the destination-side direction ``sum_k w_k u_k``. With ``v_k = k_basis V_c[:, k]`` and
    ``u_k = q_basis U_c[:, k]`` these are ``k_basis t_src`` and ``q_basis t_dest``; this returns
    ``(t_src, t_dest)`` = ``(V_c w, U_c w)`` (float64). :func:`basis_to_model` maps them to
    ``d_model``; :func:`firing_signal_coordinates` gives the same from a trace's stored rows.
    """
    selected = selected.to(proj.a.device)
    return _weighted_coordinates(proj.cores, torch.sign(proj.a), selected)


def firing_signal_coordinates(
    qk: LayerQK, firings: FiringRows, rows: Int[Tensor, " k"]
) -> tuple[Float[Tensor, "k d_head"], Float[Tensor, "k d_head"]]:
    """:func:`signal_coordinates` of decomposed places ``rows`` of one layer, from their rows.

    The trace keeps each place's sparse set (``order``, ``count``) and the signs of its
    destination projections (``dest_sign``), not its signal directions: the walk needs those
    of the firings it reaches only (about one in eight of an IOI trace's).

    Args:
        qk: the layer's QK decomposition (the rows' layer).
        firings: decomposed places (:func:`decompose_places`, or a batch's rows).
        rows: the places wanted.

    Returns:
        ``(t_src, t_dest)``, float64, one row per entry of ``rows``.
    """
    head, dest, src = firings.head[rows], firings.dest[rows], firings.src[rows]
    cores = RowCores(qk, head, dest - src)
    selected = selected_mask(firings.order[rows], firings.count[rows])
    return _weighted_coordinates(cores, firings.dest_sign[rows].to(torch.float64), selected)


def basis_to_model(
    basis: Float[Tensor, "n_heads d_model_plus_1 d_head"],
    coords: Float[Tensor, "n d_head"],
    head: Int[Tensor, " n"],
) -> Float[Tensor, "n d_model_plus_1"]:
    """``basis[head[i]] @ coords[i]`` for every row: a direction in the augmented space.

    The last coordinate is the bias coordinate of ``x~ = [x, 1]``; the first ``d_model`` are
    the direction in the residual stream. The loop is over heads, never over rows.
    """
    n_heads, d_aug, _ = basis.shape
    return _by_head(
        coords,
        head,
        n_heads,
        d_aug,
        lambda h, c, o: torch.mm(c, basis[h].T.to(coords.dtype), out=o),
    )


def signal_directions(
    qk: LayerQK,
    proj: Projections,
    selected: Bool[Tensor, "n d_head"],
    head: Int[Tensor, " n"],
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
    """The source-side and destination-side signal directions of each firing, in d_model.

    :func:`signal_coordinates` mapped by each head's key and query bases, dropping the bias
    coordinate of ``x~``. An upstream write ``y`` at the source (destination) position carries
    ``(y . g_src) / ln1.hook_scale`` (``g_dest``) of the signal.

    Returns:
        ``(g_src, g_dest)``, float64.
    """
    t_src, t_dest = signal_coordinates(proj, selected)
    d_model = qk.q_basis.shape[1] - 1
    g_src = basis_to_model(qk.k_basis, t_src, head)[:, :d_model]
    g_dest = basis_to_model(qk.q_basis, t_dest, head)[:, :d_model]
    return g_src, g_dest


@dataclass
class FiringRows:
    """Places (firings, or sampled non-firings) with their decomposition, one row each.

    The fields shared by :class:`LayerFirings` (one layer) and :class:`BatchFirings` (every
    layer of a batch). Every tensor lives on the CPU.

    Attributes:
        prompt, head, dest, src: ``[n]`` prompt (within the batch), query head, destination
            and source positions.
        score: ``[n]`` the ``hook_attn_scores`` value (model dtype).
        pattern: ``[n]`` the ``hook_pattern`` value.
        contributions: ``[n, d_head]`` float64 contribution of each singular component,
            indexed by descending singular value.
        order: ``[n, d_head]`` component indices in the order of selection (see
            :func:`shortest_prefix`).
        count: ``[n]`` size of the sparse set: its components are ``order[i, :count[i]]``.
        dest_sign: ``[n, d_head]`` int8 sign of ``x~_dest . u_k``, indexed as
            ``contributions``: with the sparse set, it gives the signal directions
            (:func:`firing_signal_coordinates`).
    """

    prompt: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    dest: Int[Tensor, " n"]
    src: Int[Tensor, " n"]
    score: Float[Tensor, " n"]
    pattern: Float[Tensor, " n"]
    contributions: Float[Tensor, "n d_head"]
    order: Int[Tensor, "n d_head"]
    count: Int[Tensor, " n"]
    dest_sign: Int[Tensor, "n d_head"]

    def __len__(self) -> int:
        return len(self.prompt)

    @staticmethod
    def row_fields() -> list[str]:
        """Names of the per-row tensor fields (every field but ``layer``)."""
        return [f.name for f in fields(FiringRows)]


@dataclass
class LayerFirings(FiringRows):
    """Firings (or any other places) of one layer in one batch (:class:`FiringRows`).

    Rows are in the order of :func:`find_firings` (prompt, head, destination, source).

    Attributes:
        layer: the layer index.
    """

    layer: int

    def rows(self, sl: slice) -> LayerFirings:
        """The rows ``sl`` of every field."""
        return LayerFirings(
            layer=self.layer, **{k: getattr(self, k)[sl] for k in self.row_fields()}
        )


def decompose_places(
    qk: LayerQK,
    x: Float[Tensor, "batch pos d_model"],
    pattern: Float[Tensor, "batch n_heads dest src"],
    scores: Float[Tensor, "batch n_heads dest src"],
    places: tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]],
    thresh: float = 1.0,
) -> LayerFirings:
    """Decompose the scores of one layer at ``places = (batch, head, dest, src)``.

    Each score is split into singular-component contributions (:func:`project`) and its sparse
    set is the shortest prefix reaching ``thresh x score`` (:func:`shortest_prefix`); the signs
    of the destination projections are kept for its signal directions
    (:func:`firing_signal_coordinates`).

    Args:
        qk: the layer's QK decomposition.
        x: the layer's ``ln1.hook_normalized``.
        pattern, scores: the layer's ``hook_pattern`` and ``hook_attn_scores``.
        places: indices of the places (firings, or a sample of non-firings).
        thresh: the sparse set reaches ``thresh x score``.
    """
    b, h, d, s = (t.cpu() for t in places)
    dev = x.device
    score = scores[b.to(dev), h.to(dev), d.to(dev), s.to(dev)].cpu()
    d_head = qk.q_basis.shape[-1]
    contrib = torch.empty(len(b), d_head, dtype=torch.float64)
    dest_sign = torch.empty(len(b), d_head, dtype=torch.int8)
    order = torch.empty(len(b), d_head, dtype=torch.long)
    count = torch.empty(len(b), dtype=torch.long)
    for c0 in range(0, len(b), CHUNK):
        sl = slice(c0, c0 + CHUNK)
        bd, dd, sd = b[sl].to(dev), d[sl].to(dev), s[sl].to(dev)
        proj = project(qk, x[bd, dd], x[bd, sd], h[sl], d[sl] - s[sl])
        c = proj.contributions
        o, n = shortest_prefix(c, score[sl].to(c) * thresh)
        contrib[sl], order[sl], count[sl] = c.cpu(), o.cpu(), n.cpu()
        dest_sign[sl] = torch.sign(proj.a).to(torch.int8).cpu()
    return LayerFirings(
        layer=qk.layer,
        prompt=b,
        head=h,
        dest=d,
        src=s,
        score=score,
        pattern=pattern[b.to(dev), h.to(dev), d.to(dev), s.to(dev)].cpu(),
        contributions=contrib,
        order=order,
        count=count,
        dest_sign=dest_sign,
    )


def decompose_layer(
    qk: LayerQK,
    x: Float[Tensor, "batch pos d_model"],
    pattern: Float[Tensor, "batch n_heads dest src"],
    scores: Float[Tensor, "batch n_heads dest src"],
    lengths: Int[Tensor, " batch"],
    pattern_thresh: float | Float[Tensor, " dest"] = 0.5,
    thresh: float = 1.0,
    exclude_first: bool = True,
) -> LayerFirings:
    """Find every firing of one layer and decompose its score into singular components.

    Args:
        qk: the layer's QK decomposition.
        x: the layer's ``ln1.hook_normalized``.
        pattern, scores: the layer's ``hook_pattern`` and ``hook_attn_scores``.
        lengths: real length of each prompt.
        pattern_thresh, exclude_first: the firing rule (:func:`find_firings`).
        thresh: the sparse set reaches ``thresh x score`` (:func:`shortest_prefix`).

    Returns:
        :class:`LayerFirings` (:func:`decompose_places` at every firing).
    """
    places = find_firings(pattern, scores, lengths, pattern_thresh, exclude_first)
    return decompose_places(qk, x, pattern, scores, places, thresh)


@dataclass
class BatchFirings(FiringRows):
    """The firings (or sampled non-firings) of one batch, every layer in one set of rows.

    Rows are layer-major, then in the order of :func:`find_firings`; the fields are those
    of :class:`FiringRows` and ``layer``, one entry per row.
    """

    layer: Int[Tensor, " n"]

    @classmethod
    def concat(cls, layers: Sequence[LayerFirings], d_head: int) -> BatchFirings:
        """The rows of ``layers`` (one :class:`LayerFirings` per layer), in order."""
        if not layers:
            ints, floats = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
            mat = torch.zeros(0, d_head, dtype=torch.float64)
            empty = {k: ints for k in cls.row_fields()}
            empty |= {k: floats for k in ("score", "pattern")}
            empty["contributions"] = mat
            empty["order"] = ints[:, None].expand(0, d_head)
            empty["dest_sign"] = torch.zeros(0, d_head, dtype=torch.int8)
            return cls(layer=ints, **empty)
        return cls(
            layer=torch.cat([torch.full((len(fl),), fl.layer) for fl in layers]),
            **{k: torch.cat([getattr(fl, k) for fl in layers]) for k in cls.row_fields()},
        )


def decompose_batch(
    qk: QKSVDCache,
    cache: BatchCache,
    lengths: Int[Tensor, " batch"],
    cfg: TraceConfig,
    prompt_ids: Int[Tensor, " batch"] | None = None,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[BatchFirings, BatchFirings]:
    """Step 1: find and decompose the firings of every layer, and a sample of non-firings.

    Firings: :func:`~tl_superposition.tracing.decompose.find_firings`, with the thresholds of
    :meth:`TraceConfig.pattern_thresholds`; non-firings: a share ``cfg.nonfiring_frac`` of
    the other places (:func:`~tl_superposition.tracing.decompose.sample_nonfirings`, drawn
    per prompt from ``prompt_ids``, default ``0 .. batch - 1``). Both are decomposed in one
    call per layer (:func:`~tl_superposition.tracing.decompose.decompose_places`) and kept
    to ``positions`` (destination and source) when given.

    Returns:
        ``(firings, nonfirings)``.
    """
    n_layers, B = cache.x.shape[2], cache.x.shape[0]
    ids = torch.arange(B) if prompt_ids is None else prompt_ids
    thr = cfg.pattern_thresholds(cache.x.shape[1])
    samples = sample_nonfirings(
        cache.pattern,
        cache.scores,
        lengths,
        ids,
        cfg.nonfiring_frac,
        cfg.seed,
        thr,
        cfg.exclude_first,
        positions,
    )
    fire_layers, non_layers = [], []
    for L in range(n_layers):
        fire = find_firings(
            cache.pattern[L], cache.scores[L], lengths, thr, cfg.exclude_first, positions
        )
        n_fire = len(fire[0])
        prompt, head, dest, src = (torch.cat([a.cpu(), b]) for a, b in zip(fire, samples[L]))
        places = (prompt, head, dest, src)
        fl = decompose_places(
            qk[L], cache.x[:, :, L], cache.pattern[L], cache.scores[L], places, cfg.thresh
        )
        fire_layers.append(fl.rows(slice(0, n_fire)))
        non_layers.append(fl.rows(slice(n_fire, None)))
    d_head = cache.z.shape[-1]
    return BatchFirings.concat(fire_layers, d_head), BatchFirings.concat(non_layers, d_head)
