"""Signal tracing through attention firings, on any prompts (Franco & Crovella 2024, Sec. 5).

:func:`trace` runs the model over the prompts in batches. Per batch, :func:`run_batch` caches
the normalised residual stream, ``ln1.hook_scale``, scores, patterns, ``hook_z``, MLP outputs
and embeddings of every layer (``run_with_cache`` up to the last block, no unembedding), and
:func:`trace_batch` runs three steps on them:

1. :func:`decompose_batch` finds every firing of every head and decomposes its score into
   singular-component contributions, keeping the shortest set reaching ``thresh x score``
   (:mod:`~tl_superposition.tracing.decompose`);
2. :func:`mark_seeds` marks the seed firings as traced;
3. :func:`walk_upstream` walks down the layers: for each traced firing it measures how much
   every upstream component (each attention head, each MLP, the embeddings) writes into the
   firing's selected singular directions at the source position (``side="src"``) and at the
   destination position (``side="dest"``), keeps as edges the upstream components making up
   the top ``edge_thresh`` of the positive contribution (:func:`select_edges`), and marks the
   firings of the upstream heads at that position as traced in turn.

Upstream write of component ``j`` at position ``p`` into a firing of layer ``L``:
``(y_j[p] . g) / ln1.hook_scale_L[p]`` with ``g`` the signal direction of
:func:`~tl_superposition.tracing.decompose.signal_directions` (centred for LayerNorm models,
since LayerNorm subtracts the mean). Over all components, plus the attention output biases,
these writes add up to ``x_p . g`` exactly (:func:`upstream_writes`).

The tables and the graph of the result are built by :mod:`~tl_superposition.tracing.graph`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.tracing.decompose import (
    CHUNK,
    LayerFirings,
    decompose_layer,
    project,
    selected_mask,
    shortest_prefix,
    signal_directions,
)
from tl_superposition.tracing.graph import (
    EdgeRecords,
    NodeKind,
    build_graph,
    check_heads,
    edges_table,
    firing_columns,
    firings_table,
    parse_heads,
    save_trace,
)
from tl_superposition.tracing.qk_svd import QKSVDCache


@dataclass
class TraceConfig:
    """Hyperparameters of the decomposition and the tracing.

    The defaults are Franco & Crovella's (arXiv 2410.00340): a head fires at pattern >= 0.5,
    sparse sets reach the whole score, edges make up 70% of the upstream contribution.

    Attributes:
        pattern_thresh: a head *fires* on ``(dest, src)`` when its attention probability
            (``hook_pattern``) there is at least this and its score is positive. In (0, 1].
            At 0.5 or above a destination fires on at most one source (ties at exactly 0.5
            aside); below, several sources can fire and :func:`walk_upstream` traces one of
            them per (prompt, head, destination).
        thresh: the sparse set of a firing is the shortest prefix of its singular components,
            sorted by contribution, whose sum reaches ``thresh x score``. Greater than 0; 1.0
            is the whole score. Above 1 the target may be out of reach: the set is then every
            component.
        edge_thresh: an upstream component is an edge into a firing when it is among the
            largest positive writes that together make up this fraction of the summed positive
            writes. In (0, 1].
        batch_size: prompts per forward pass (at least 1). Memory grows with it: the
            activations of every layer of a batch are cached at once.
        exclude_first: skip firings whose source is position 0 (BOS, or the attention sink of
            prompts without BOS), as the paper does.

    Raises:
        ValueError: a field outside its range; the message starts with the field's name.
    """

    pattern_thresh: float = 0.5
    thresh: float = 1.0
    edge_thresh: float = 0.7
    batch_size: int = 32
    exclude_first: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.pattern_thresh <= 1:
            raise ValueError(
                f"pattern_thresh must be in (0, 1] (an attention probability), "
                f"got {self.pattern_thresh}"
            )
        if not self.thresh > 0:
            raise ValueError(
                f"thresh must be > 0 (a fraction of the score; 1.0 is the whole score), "
                f"got {self.thresh}"
            )
        if not 0 < self.edge_thresh <= 1:
            raise ValueError(
                f"edge_thresh must be in (0, 1] (a fraction of the upstream contribution), "
                f"got {self.edge_thresh}"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, Integral):
            raise ValueError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.exclude_first, bool):
            raise ValueError(f"exclude_first must be True or False, got {self.exclude_first!r}")


@dataclass
class TraceResult:
    """What :func:`trace` found.

    Attributes:
        firings: one row per firing (see :func:`trace`).
        edges: one row per (upstream, downstream, side) edge with its summed ``weight`` and
            the number of firings ``n_firings`` in which it was selected
            (:func:`~tl_superposition.tracing.graph.edges_table`).
        seeds: the seed heads.
        config: the hyperparameters.
        seconds: wall time.
        model_name: ``model.cfg.model_name``.
    """

    firings: pd.DataFrame
    edges: pd.DataFrame
    seeds: list[tuple[int, int]]
    config: TraceConfig
    seconds: float
    model_name: str = ""

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph (:func:`~tl_superposition.tracing.graph.build_graph`)."""
        return build_graph(self.firings, self.edges, self.seeds, min_firings)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write firings.parquet, edges.csv and graph.graphml atomically; return their paths."""
        return save_trace(out_dir, self.firings, self.edges, self.graph())


# --------------------------------------------------------------------------- activations


def _hook_names(n_layers: int, absolute_positions: bool) -> set[str]:
    names = {"hook_embed"} | ({"hook_pos_embed"} if absolute_positions else set())
    for L in range(n_layers):
        names |= {
            f"blocks.{L}.ln1.hook_normalized",
            f"blocks.{L}.ln1.hook_scale",
            f"blocks.{L}.attn.hook_attn_scores",
            f"blocks.{L}.attn.hook_pattern",
            f"blocks.{L}.attn.hook_z",
            f"blocks.{L}.hook_mlp_out",
        }
    return names


@dataclass
class BatchCache:
    """The activations of one batch that the trace reads, stacked over layers.

    Tensors stay on the model's device, in its dtype.

    Attributes:
        x: ``blocks.{L}.ln1.hook_normalized``, the input of W_Q/W_K of layer L.
        scale: ``blocks.{L}.ln1.hook_scale``.
        z: ``blocks.{L}.attn.hook_z``.
        mlp: ``blocks.{L}.hook_mlp_out``.
        embed: ``hook_embed`` plus ``hook_pos_embed`` where positions are learned.
        pattern, scores: per layer, ``attn.hook_pattern`` and ``attn.hook_attn_scores``
            (``[batch, n_heads, dest, src]``).
    """

    x: Float[Tensor, "batch pos n_layers d_model"]
    scale: Float[Tensor, "batch pos n_layers"]
    z: Float[Tensor, "batch pos n_layers n_heads d_head"]
    mlp: Float[Tensor, "batch pos n_layers d_model"]
    embed: Float[Tensor, "batch pos d_model"]
    pattern: list[Tensor]
    scores: list[Tensor]


@torch.inference_mode()
def run_batch(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> BatchCache:
    """Run ``model`` on ``tokens`` (up to its last block) and keep what the trace reads.

    Args:
        model: a processed ``HookedTransformer`` (:func:`tl_superposition.load_model`).
        tokens: token ids, on the model's device.
    """
    n = model.cfg.n_layers
    names = _hook_names(n, model.cfg.positional_embedding_type == "standard")
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name in names, stop_at_layer=n
    )
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    return BatchCache(
        x=torch.stack([cache[f"blocks.{L}.ln1.hook_normalized"] for L in range(n)], 2),
        scale=torch.stack([cache[f"blocks.{L}.ln1.hook_scale"][..., 0] for L in range(n)], 2),
        z=torch.stack([cache[f"blocks.{L}.attn.hook_z"] for L in range(n)], 2),
        mlp=torch.stack([cache[f"blocks.{L}.hook_mlp_out"] for L in range(n)], 2),
        embed=embed,
        pattern=[cache[f"blocks.{L}.attn.hook_pattern"] for L in range(n)],
        scores=[cache[f"blocks.{L}.attn.hook_attn_scores"] for L in range(n)],
    )


# --------------------------------------------------------------------------- upstream writes


@dataclass
class ResidualWriters:
    """Float64 copies of the weights that write to the residual stream (made once per trace).

    Attributes:
        W_O: every head's output matrix.
        b_O_cumsum: row ``L`` is the sum of ``b_O`` over the layers before ``L``.
        centred: whether the model normalises with LayerNorm (which subtracts the mean, so
            signal directions are centred before the writes are measured).
    """

    W_O: Float[Tensor, "n_layers n_heads d_head d_model"]
    b_O_cumsum: Float[Tensor, "n_layers_plus_1 d_model"]
    centred: bool

    @classmethod
    def from_model(cls, model: HookedTransformer) -> ResidualWriters:
        """Copy the writers of ``model``."""
        b_O = model.b_O.detach().to(torch.float64)
        return cls(
            W_O=model.W_O.detach().to(torch.float64),
            b_O_cumsum=torch.cat([torch.zeros_like(b_O[:1]), b_O.cumsum(0)]),
            centred=model.cfg.normalization_type in ("LN", "LNPre"),
        )


def upstream_writes(
    writers: ResidualWriters | HookedTransformer,
    cache: BatchCache,
    layer: int,
    batch: Int[Tensor, " n"],
    pos: Int[Tensor, " n"],
    g: Float[Tensor, "n d_model"],
) -> Float[Tensor, "n n_upstream_plus_1"]:
    """What each component upstream of ``layer`` writes along ``g`` at ``(batch, pos)``.

    Columns (see :func:`upstream_columns`): every head of layers ``< layer`` (layer-major),
    every MLP of layers ``< layer``, the embeddings, and last the summed attention output
    biases ``b_O`` (not a node). Each write is divided by ``blocks.{layer}.ln1.hook_scale`` at
    that position; for LayerNorm models ``g`` is centred first. The columns sum to
    ``ln1.hook_normalized . g``.

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
    g = g.to(torch.float64)
    if w.centred:
        g = g - g.mean(1, keepdim=True)
    # project W_O on g first: [n, L, H, d_head], then dot with z
    wog = torch.einsum("lhed,nd->nlhe", w.W_O[:layer], g)
    zg = cache.z[batch, pos, :layer].to(torch.float64)  # [n, L, H, d_head]
    heads = (zg * wog).sum(-1).flatten(1)
    mlps = torch.einsum("nld,nd->nl", cache.mlp[batch, pos, :layer].to(torch.float64), g)
    emb = (cache.embed[batch, pos].to(torch.float64) * g).sum(1, keepdim=True)
    bias = (g @ w.b_O_cumsum[layer])[:, None]
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


def select_edges(writes: Float[Tensor, "n m"], edge_thresh: float) -> Bool[Tensor, "n m"]:
    """The edges into each firing: the largest positive writes making up ``edge_thresh``.

    Row ``i`` keeps the shortest prefix of its positive writes, sorted descending, whose sum
    reaches ``edge_thresh`` times the sum of its positive writes; a row without a positive
    write keeps nothing.
    """
    positive = writes.clamp(min=0)
    total = positive.sum(1)
    order, count = shortest_prefix(positive, edge_thresh * total)
    count = torch.where(total > 0, count, torch.zeros_like(count))
    return selected_mask(order, count) & (writes > 0)


# --------------------------------------------------------------------------- the steps


@dataclass
class BatchFirings:
    """Every firing of one batch, layer by layer, and where to find each one.

    Attributes:
        layers: one :class:`~tl_superposition.tracing.decompose.LayerFirings` per layer.
        index: ``index[b, L, h, d]`` is the row in ``layers[L]`` of the firing of head
            ``(L, h)`` at destination ``d`` of prompt ``b``; -1 where none. Where a
            destination fires on several sources (possible when ``pattern_thresh`` is 0.5 or
            less) it holds one of them, and only that one can be marked traced.
    """

    layers: list[LayerFirings]
    index: Int[Tensor, "batch n_layers n_heads pos"]

    def mark_traced(
        self,
        batch: Int[Tensor, " n"],
        layer: Int[Tensor, " n"],
        head: Int[Tensor, " n"],
        dest: Int[Tensor, " n"],
        src: Int[Tensor, " n"] | None = None,
    ) -> None:
        """Mark as traced the firings at ``(batch, layer, head, dest)`` that exist.

        With ``src``, only those whose source is ``src``.
        """
        rows = self.index[batch, layer, head, dest]
        found = rows >= 0
        for L in layer[found].unique().tolist():
            here = found & (layer == L)
            if src is not None:
                here &= self.layers[L].src[rows.clamp(min=0)] == src
            self.layers[L].traced[rows[here]] = True


def decompose_batch(
    qk: QKSVDCache, cache: BatchCache, lengths: Int[Tensor, " batch"], cfg: TraceConfig
) -> BatchFirings:
    """Step 1: find and decompose the firings of every layer (:func:`decompose_layer`)."""
    B, P, n_layers = cache.x.shape[:3]
    n_heads = cache.z.shape[3]
    index = torch.full((B, n_layers, n_heads, P), -1, dtype=torch.long)
    layers = []
    for L in range(n_layers):
        fl = decompose_layer(
            qk[L],
            cache.x[:, :, L],
            cache.pattern[L],
            cache.scores[L],
            lengths,
            cfg.pattern_thresh,
            cfg.thresh,
            cfg.exclude_first,
        )
        index[fl.prompt, L, fl.head, fl.dest] = torch.arange(len(fl))
        layers.append(fl)
    return BatchFirings(layers, index)


def mark_seeds(
    firings: BatchFirings,
    seeds: Sequence[tuple[int, int]],
    seed_dest: Int[Tensor, " batch"],
    seed_src: Int[Tensor, " batch"] | None,
) -> None:
    """Step 2: mark the firings of each seed head at ``seed_dest`` (from ``seed_src``)."""
    rows = torch.arange(len(seed_dest))
    for L, H in seeds:
        layer, head = torch.full_like(rows, L), torch.full_like(rows, H)
        firings.mark_traced(rows, layer, head, seed_dest, seed_src)


def walk_upstream(
    firings: BatchFirings,
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    edge_thresh: float,
) -> EdgeRecords:
    """Step 3: from the top layer down, find the edges into every traced firing.

    The firings of upstream heads selected as edges are marked traced before their own layer
    is reached, so the trace recurses down to the embeddings.
    """
    parts = []
    for L in range(len(firings.layers) - 1, -1, -1):
        todo = firings.layers[L].traced.nonzero()[:, 0]
        for c0 in range(0, len(todo), CHUNK):
            parts += _trace_chunk(
                firings, qk, writers, cache, L, todo[c0 : c0 + CHUNK], edge_thresh
            )
    return EdgeRecords.concat(parts)


def _trace_chunk(
    firings: BatchFirings,
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    L: int,
    ids: Int[Tensor, " n"],
    edge_thresh: float,
) -> list[EdgeRecords]:
    """Edges into firings ``ids`` of layer ``L``, source side then destination side."""
    fl = firings.layers[L]
    b, h, d, s = fl.prompt[ids], fl.head[ids], fl.dest[ids], fl.src[ids]
    x = cache.x[:, :, L]
    proj = project(qk[L], x[b, d], x[b, s], h, d - s)
    sel = selected_mask(fl.order[ids], fl.count[ids])
    g_src, g_dest = signal_directions(qk[L], proj, sel, h)
    kinds, up_layers, up_heads = upstream_columns(L, writers.W_O.shape[1])
    out = []
    for side, g, p in (("src", g_src, s), ("dest", g_dest, d)):
        writes = upstream_writes(writers, cache, L, b, p, g.to(cache.x.device)).cpu()[:, :-1]
        n_i, col = select_edges(writes, edge_thresh).nonzero(as_tuple=True)
        col_np = col.numpy()
        out.append(
            EdgeRecords(
                prompt_id=b[n_i].numpy(),
                down_layer=np.full(len(n_i), L),
                down_head=h[n_i].numpy(),
                up_kind=kinds[col_np],
                up_layer=up_layers[col_np],
                up_head=up_heads[col_np],
                side=np.full(len(n_i), side),
                weight=writes[n_i, col].numpy(),
            )
        )
        # the upstream heads' own firings at this position are traced next
        is_head = kinds[col_np] == NodeKind.ATTN
        firings.mark_traced(
            b[n_i][is_head],
            torch.as_tensor(up_layers[col_np][is_head]),
            torch.as_tensor(up_heads[col_np][is_head]),
            p[n_i][is_head],
        )
    return out


def trace_batch(
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    lengths: Int[Tensor, " batch"],
    seeds: Sequence[tuple[int, int]],
    seed_dest: Int[Tensor, " batch"],
    seed_src: Int[Tensor, " batch"] | None,
    cfg: TraceConfig,
) -> tuple[BatchFirings, EdgeRecords]:
    """Decompose one batch's firings, mark the seeds, and walk upstream (steps 1-3).

    Prompt indices in the result are within the batch.
    """
    firings = decompose_batch(qk, cache, lengths, cfg)
    mark_seeds(firings, seeds, seed_dest, seed_src)
    edges = walk_upstream(firings, qk, writers, cache, cfg.edge_thresh)
    return firings, edges


def _check_positions(name: str, positions: Tensor, lengths: Tensor) -> Tensor:
    positions = positions.cpu()
    if positions.shape != lengths.shape:
        raise ValueError(
            f"{name} must hold one position per prompt ({len(lengths)}), got shape "
            f"{tuple(positions.shape)}"
        )
    if (positions >= lengths).any() or (positions < 0).any():
        raise ValueError(f"{name} has a position outside its prompt")
    return positions


@torch.no_grad()
def trace(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_prompts pos"],
    seeds: Iterable[Any] | str,
    seed_dest: Int[Tensor, " n_prompts"],
    seed_src: Int[Tensor, " n_prompts"] | None = None,
    lengths: Int[Tensor, " n_prompts"] | None = None,
    config: TraceConfig | None = None,
    progress: bool = True,
) -> TraceResult:
    """Decompose every firing and trace signals upstream from seed firings.

    Args:
        model: a ``HookedTransformer`` with folded normalisation weights (see
            :func:`tl_superposition.load_model`); absolute or rotary positions, MHA or GQA.
        tokens: right-padded prompts.
        seeds: heads ``[(layer, head), ...]`` (or ``"9.6,9.9"``, see
            :func:`~tl_superposition.tracing.graph.parse_heads`) whose firings start the trace.
        seed_dest: per prompt, the destination position of the seed firings (IOI: END).
        seed_src: per prompt, the required source position (IOI: IO); ``None`` accepts any.
        lengths: real length of each prompt (default: all of ``tokens``).
        config: thresholds and batch size (:class:`TraceConfig`).
        progress: show a tqdm bar over batches.

    Returns:
        :class:`TraceResult`. ``firings`` has one row per firing: prompt_id, layer, head,
        dest_pos, src_pos, score (``hook_attn_scores``), pattern, n_components, components
        (component indices, by descending singular value, in the order of selection),
        contributions (their contributions to the score, same order), residual (score minus
        the sum of all components: rounding only), traced (reached from a seed).

    Raises:
        ValueError: a seed head or a seed position is out of range, or no prompts.
        NotImplementedError: an attention variant the decomposition does not cover.
    """
    cfg = config or TraceConfig()
    seed_heads = parse_heads(seeds) or []
    check_heads(seed_heads, model.cfg.n_layers, model.cfg.n_heads)
    n_prompts = tokens.shape[0]
    if n_prompts == 0:
        raise ValueError("trace needs at least one prompt")
    lengths = torch.full((n_prompts,), tokens.shape[1]) if lengths is None else lengths.cpu()
    dest = _check_positions("seed_dest", seed_dest, lengths)
    src = None if seed_src is None else _check_positions("seed_src", seed_src, lengths)
    qk = QKSVDCache(model)
    writers = ResidualWriters.from_model(model)
    device = next(model.parameters()).device

    t0 = time.time()
    firing_parts: list[dict[str, Any]] = []
    edge_parts: list[EdgeRecords] = []
    for lo in tqdm(
        range(0, n_prompts, cfg.batch_size), desc="trace", unit="batch", disable=not progress
    ):
        hi = min(lo + cfg.batch_size, n_prompts)
        cache = run_batch(model, tokens[lo:hi, : int(lengths[lo:hi].max())].to(device))
        f, e = trace_batch(
            qk,
            writers,
            cache,
            lengths[lo:hi],
            seed_heads,
            dest[lo:hi],
            None if src is None else src[lo:hi],
            cfg,
        )
        firing_parts.append(firing_columns(f.layers, prompt_offset=lo))
        e.prompt_id = e.prompt_id + lo
        edge_parts.append(e)
        del cache

    return TraceResult(
        firings=firings_table(firing_parts).to_pandas(),
        edges=edges_table(EdgeRecords.concat(edge_parts)),
        seeds=list(seed_heads),
        config=cfg,
        seconds=time.time() - t0,
        model_name=model.cfg.model_name,
    )
