"""Step 3: edges by the rule, and the walk from seed firings down the layers.

An edge into one side of a firing is an upstream head kept by the edge rule
(:mod:`~tl_superposition.tracing.edges`) among the heads of lower layers
(:func:`batch_edges`). The walk starts at the seed firings; every edge of a reached firing,
from head ``(l, h)`` at position ``p`` (the firing's source on the source side, its
destination on the destination side), reaches every firing of ``(l, h)`` in the same prompt
whose destination is ``p`` (Franco & Crovella's recursion, ``full_tracing_build_graph.py``),
unless ``l`` is below the rule's first layer. Layers are visited from the top, so each
firing's edges are computed once, whatever the number of paths reaching it.

Reachability is kept as a bit mask per firing, one bit per candidate seed head, so one walk
answers for every subset of its candidates: :func:`walk_batch` walks a batch from candidate
seeds before the final seeds are known, measuring the upstream writes of the firings it
reaches only (:func:`~tl_superposition.tracing.writes.signal_writes`);
:func:`walk_upstream` is the same walk over edges given in advance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tl_superposition.tracing.cache import BatchCache, Workspace
from tl_superposition.tracing.config import TraceConfig
from tl_superposition.tracing.decompose import BatchFirings
from tl_superposition.tracing.edges import select_edges
from tl_superposition.tracing.qk_svd import QKSVDCache
from tl_superposition.tracing.writes import (
    WRITE_PROMPTS,
    ChunkWriters,
    ResidualWriters,
    SideWrites,
    signal_writes,
)


@dataclass
class CandidateEdges:
    """Edges the rule selects into firing sides (before the walk decides which are kept).

    Attributes:
        firing: row of the downstream firing in the batch's :class:`BatchFirings`.
        side: 0 for the source side, 1 for the destination side.
        up_layer, up_head: the upstream head.
        weight: its value in the rule (the write, score units; plus the bias-coordinate term
            under :attr:`TraceConfig.augmented_bias`).
    """

    firing: np.ndarray
    side: np.ndarray
    up_layer: np.ndarray
    up_head: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.firing)

    @classmethod
    def concat(cls, parts: Sequence[CandidateEdges]) -> CandidateEdges:
        """All rows of ``parts``, sorted by (firing, side, upstream head)."""
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return cls(e, e.astype(np.int8), e, e, np.zeros(0, dtype=np.float32))
        cols = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        order = np.lexsort((cols["up_head"], cols["up_layer"], cols["side"], cols["firing"]))
        return cls(**{k: v[order] for k, v in cols.items()})


def batch_edges(
    firings: BatchFirings,
    writes: SideWrites,
    rows: Int[Tensor, " k"],
    cfg: TraceConfig,
    n_heads: int,
) -> CandidateEdges:
    """The edge rule applied to the head writes of both sides of firings ``rows``.

    Candidates are the heads of the layers below the firing; firings below
    :attr:`TraceConfig.first_layer` get none. Rows are ranked layer by layer, over the
    candidate columns only.

    Args:
        firings: the batch's firings.
        writes: :func:`~tl_superposition.tracing.writes.signal_writes` of ``rows``.
        rows: the firings measured.
        cfg: the edge rule and its fraction.
        n_heads: heads per layer.
    """
    k = len(rows)
    layer = torch.cat([firings.layer[rows], firings.layer[rows]])
    parts = []
    for L in layer.unique().tolist():
        if max(cfg.first_layer, 1) > L:
            continue
        sides = (layer == L).nonzero()[:, 0]
        values = writes.heads[sides, : L * n_heads]
        if cfg.augmented_bias:
            values = values + writes.bias_coord[sides, None]
        mask = select_edges(values, cfg.edge_rule, cfg.edge_thresh)  # type: ignore[arg-type]
        r, c = mask.nonzero(as_tuple=True)
        side_row = sides[r]
        parts.append(
            CandidateEdges(
                firing=rows[side_row % k].numpy(),
                side=(side_row >= k).to(torch.int8).numpy(),
                up_layer=(c // n_heads).numpy(),
                up_head=(c % n_heads).numpy(),
                weight=values[r, c].numpy(),
            )
        )
    return CandidateEdges.concat(parts)


class FiringIndex:
    """Finds the firings of a head at a destination, in one batch (sorted-key lookup).

    Args:
        prompt, layer, head, dest: one entry per firing.
    """

    def __init__(self, prompt: np.ndarray, layer: np.ndarray, head: np.ndarray, dest: np.ndarray):
        self.shape = (
            int(layer.max()) + 1 if len(layer) else 1,
            int(head.max()) + 1 if len(head) else 1,
            int(dest.max()) + 1 if len(dest) else 1,
        )
        keys = self.key(prompt, layer, head, dest)
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    def key(self, prompt: np.ndarray, layer: np.ndarray, head: np.ndarray, dest: np.ndarray):
        """One int64 per (prompt, layer, head, destination); -1 where none can match."""
        n_layers, n_heads, n_pos = self.shape
        ok = (layer < n_layers) & (head < n_heads) & (dest < n_pos)
        key = ((prompt.astype(np.int64) * n_layers + layer) * n_heads + head) * n_pos + dest
        return np.where(ok, key, -1)

    def lookup(
        self, prompt: np.ndarray, layer: np.ndarray, head: np.ndarray, dest: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every (query, firing) pair where firing ``r`` has query ``i``'s key.

        Returns:
            ``(i, r)``: query indices (repeated when a destination has several sources)
            and firing rows.
        """
        key = self.key(prompt, layer, head, dest)
        lo = np.searchsorted(self.sorted, key, side="left")
        hi = np.searchsorted(self.sorted, key, side="right")
        counts = hi - lo
        query = np.repeat(np.arange(len(key)), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        return query, self.order[starts + np.arange(int(counts.sum()))]


def seed_firings(
    prompt: np.ndarray,
    layer: np.ndarray,
    head: np.ndarray,
    dest: np.ndarray,
    src: np.ndarray,
    seeds: Sequence[tuple[int, int]],
    seed_dest: np.ndarray,
    seed_src: np.ndarray | None,
) -> np.ndarray:
    """Mask of the firings that start the walk: a seed head at ``seed_dest[prompt]``.

    Args:
        prompt, layer, head, dest, src: one entry per firing (``prompt`` indexes the seed
            position arrays).
        seeds: the seed heads.
        seed_dest: per prompt, the destination of the seed firings.
        seed_src: per prompt, the required source (``None``: any).
    """
    is_seed = np.zeros(len(prompt), dtype=bool)
    for L, h in seeds:
        is_seed |= (layer == L) & (head == h)
    is_seed &= dest == seed_dest[prompt]
    if seed_src is not None:
        is_seed &= src == seed_src[prompt]
    return is_seed


def propagate(
    index: FiringIndex,
    firings: dict[str, np.ndarray],
    edges: CandidateEdges,
    reach: np.ndarray,
    first_layer: int,
) -> None:
    """Give the upstream firings of ``edges`` the reach bits of their downstream firings.

    Args:
        index: the batch's :class:`FiringIndex`.
        firings: the batch's prompt, layer, src and dest columns (numpy).
        edges: edges of already reached firings.
        reach: ``int64`` bit masks per firing, updated in place.
        first_layer: firings below it are never reached.
    """
    f = edges.firing
    pos = np.where(edges.side == 0, firings["src"][f], firings["dest"][f])
    query, target = index.lookup(firings["prompt"][f], edges.up_layer, edges.up_head, pos)
    keep = firings["layer"][target] >= first_layer
    np.bitwise_or.at(reach, target[keep], reach[f[query[keep]]])


def _columns(firings: BatchFirings) -> dict[str, np.ndarray]:
    return {k: getattr(firings, k).numpy() for k in ("prompt", "layer", "head", "dest", "src")}


def walk_upstream(
    prompt: np.ndarray,
    layer: np.ndarray,
    head: np.ndarray,
    dest: np.ndarray,
    src: np.ndarray,
    edges: CandidateEdges,
    start: np.ndarray,
    first_layer: int = 0,
) -> np.ndarray:
    """The walk over edges known for every firing: the mask of firings reached from ``start``.

    Args:
        prompt, layer, head, dest, src: one entry per firing.
        edges: the candidate edges of the firings (``edges.firing`` indexes these arrays).
        start: mask of the firings the walk starts from (:func:`seed_firings`).
        first_layer: firings below this layer are never reached (but may start the walk).

    Returns:
        The mask of reached firings (``start`` included).
    """
    reach = start.astype(np.int64)
    if len(edges) == 0 or len(prompt) == 0:
        return reach != 0
    cols = {"prompt": prompt, "layer": layer, "head": head, "dest": dest, "src": src}
    index = FiringIndex(prompt, layer, head, dest)
    e_layer = layer[edges.firing]
    for L in range(int(layer.max()), -1, -1):
        at = np.nonzero((e_layer == L) & (reach[edges.firing] != 0))[0]
        part = CandidateEdges(*(getattr(edges, f.name)[at] for f in fields(CandidateEdges)))
        propagate(index, cols, part, reach, first_layer)
    return reach != 0


@dataclass
class WalkResult:
    """What :func:`walk_batch` found in one batch.

    Attributes:
        reach: ``[n]`` int64 bit mask per firing: bit ``j`` when candidate seed ``j`` reaches it.
        rows: ``[k]`` the reached firings, whose writes were measured (sorted).
        sums: ``[k, 2, 4]`` per reached firing and side (source, destination), the summed
            writes of the heads, the MLPs, the embeddings and the attention biases.
        leaf: ``[k, 2, n_layers + 1]`` per side, each MLP's write and the embeddings'.
        edges: the rule's edges into the reached firings.
    """

    reach: np.ndarray
    rows: np.ndarray
    sums: np.ndarray
    leaf: np.ndarray
    edges: CandidateEdges


def _side_arrays(w: SideWrites, k: int) -> tuple[np.ndarray, np.ndarray]:
    sums = torch.stack([w.heads.sum(1), w.mlps.sum(1), w.embed, w.bias], 1)  # [2k, 4]
    leaf = torch.cat([w.mlps, w.embed[:, None]], 1)  # [2k, n_layers + 1]
    as_pairs = lambda t: t.reshape(2, k, -1).transpose(0, 1).numpy()  # noqa: E731
    return as_pairs(sums), as_pairs(leaf)


def walk_batch(
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    firings: BatchFirings,
    start: np.ndarray,
    cfg: TraceConfig,
    workspace: Workspace | None = None,
) -> WalkResult:
    """Walk one batch from the start bits, measuring the writes of reached firings only.

    Prompts are walked :data:`~tl_superposition.tracing.writes.WRITE_PROMPTS` at a time (a
    walk never leaves its prompt), each writer's output at a position of those prompts formed
    once, when a reached firing first reads it; in each, layer by layer from the top, the
    reached firings are measured
    (:func:`~tl_superposition.tracing.writes.signal_writes`), their edges selected
    (:func:`batch_edges`) and their bits passed on (:func:`propagate`).

    Args:
        qk, writers, cache: the layer decompositions, the weights, the batch's activations.
        firings: the batch's firings.
        start: ``[n]`` int64 bit masks of the firings the walk starts from (seed bits).
        cfg: the edge rule.
        workspace: where the writers' outputs are formed; pass the same one to every batch
            of a trace (default: a new one).
    """
    reach = start.astype(np.int64).copy()
    cols = _columns(firings)
    index = FiringIndex(cols["prompt"], cols["layer"], cols["head"], cols["dest"])
    n_heads, n_layers = cache.z.shape[3], cache.z.shape[2]
    rows_parts, sums_parts, leaf_parts, edge_parts = [], [], [], []
    workspace = workspace or Workspace()
    for c0 in range(0, cache.z.shape[0], WRITE_PROMPTS):
        c1 = min(c0 + WRITE_PROMPTS, cache.z.shape[0])
        in_chunk = (cols["prompt"] >= c0) & (cols["prompt"] < c1)
        if not (in_chunk & (reach != 0)).any():
            continue
        chunk = ChunkWriters(writers, cache, c0, c1, workspace)
        for L in range(n_layers - 1, -1, -1):
            rows = np.nonzero(in_chunk & (cols["layer"] == L) & (reach != 0))[0]
            if not len(rows):
                continue
            rows_t = torch.as_tensor(rows)
            w = signal_writes(qk, writers, cache, firings, rows_t, chunk)
            edges = batch_edges(firings, w, rows_t, cfg, n_heads)
            propagate(index, cols, edges, reach, cfg.first_layer)
            sums, leaf = _side_arrays(w, len(rows))
            rows_parts.append(rows)
            sums_parts.append(sums)
            leaf_parts.append(leaf)
            edge_parts.append(edges)
    if not rows_parts:
        empty = np.zeros((0, 2, 4), dtype=np.float32)
        return WalkResult(
            reach, np.zeros(0, dtype=np.int64), empty,
            np.zeros((0, 2, n_layers + 1), dtype=np.float32), CandidateEdges.concat([]),
        )  # fmt: skip
    rows = np.concatenate(rows_parts)
    order = np.argsort(rows, kind="stable")
    return WalkResult(
        reach=reach,
        rows=rows[order],
        sums=np.concatenate(sums_parts)[order],
        leaf=np.concatenate(leaf_parts)[order],
        edges=CandidateEdges.concat(edge_parts),
    )
