"""Signal tracing through attention firings, on any prompts, in one forward pass.

Follows Franco & Crovella 2024 (arXiv 2410.00340, Sec. 5). :func:`trace` runs the model once
over the prompts, batch by batch. Per batch, :func:`run_batch` caches what the steps read
(``run_with_cache`` up to the last block, no unembedding), and

1. :func:`decompose_batch` finds every firing of every head, decomposes its score into
   singular-component contributions, keeps the shortest set reaching ``thresh x score`` and
   its signal directions (:mod:`~tl_superposition.tracing.decompose`);
2. :func:`signal_writes` measures, for *every* firing and both of its sides (the source
   position through the key, ``side="src"``; the destination through the query,
   ``side="dest"``), how much each upstream head, each MLP and the embeddings write into the
   side's signal direction;
3. :func:`batch_edges` applies the edge rule (:mod:`~tl_superposition.tracing.edges`) to the
   head writes of every side: the candidate edges.

Nothing in these steps depends on the seeds, so a seed chooser (:mod:`.seeds`) may pick them
from statistics of the same pass, such as the direct logit attribution of every prompt.
Once every batch is done, :func:`walk_upstream` follows the candidate edges from the seed
firings down the layers, prompt by prompt: an upstream head selected as an edge at a
position has its firings with that destination traced in turn. The batches' rows are
streamed to parquet as they are found and the walk reads them back one row group at a time
(:class:`~tl_superposition.tracing.store.TraceStore`), so memory does not grow with the
number of prompts.

Upstream write of component ``j`` at position ``p`` into a firing of layer ``L``:
``(y_j[p] . g) / ln1.hook_scale_L[p]`` with ``g`` the side's signal direction (centred for
LayerNorm models, since LayerNorm subtracts the mean). Over all components, plus the
attention output biases, these writes add up to ``x_p . g`` exactly (:func:`upstream_writes`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.tracing.decompose import (
    LayerFirings,
    basis_to_model,
    decompose_layer,
    decompose_places,
    sample_nonfirings,
)
from tl_superposition.tracing.edges import EDGE_RULES, select_edges
from tl_superposition.tracing.graph import (
    NodeKind,
    build_graph,
    paper_graph,
)
from tl_superposition.tracing.qk_svd import QKSVDCache
from tl_superposition.tracing.seeds import FixedSeeds, SeedChooser
from tl_superposition.tracing.store import TraceStore

# Prompts whose per-head outputs (``z W_O``, n_layers x n_heads x d_model per position) are
# formed at once in :func:`signal_writes`: bounds that tensor (about 120 MB for SmolLM2).
WRITE_PROMPTS = 8


@dataclass
class TraceConfig:
    """Hyperparameters of the decomposition and the tracing.

    The defaults are Franco & Crovella's (arXiv 2410.00340): a head fires at pattern >= 0.5,
    sparse sets reach the whole score, edges make up 70% of the upstream contribution.

    Attributes:
        pattern_thresh: a head *fires* on ``(dest, src)`` when its attention probability
            (``hook_pattern``) there is at least this and its score is positive. In (0, 1].
            Below 0.5 a destination can fire on several sources; the walk traces all of them.
        thresh: the sparse set of a firing is the shortest prefix of its singular components,
            sorted by contribution, whose sum reaches ``thresh x score``. Greater than 0; 1.0
            is the whole score. Above 1 the target may be out of reach: the set is then every
            component.
        edge_thresh: the fraction of the upstream contribution the edges make up, in (0, 1]
            (:mod:`~tl_superposition.tracing.edges`).
        edge_rule: ``"paper"`` (the authors' rule: net sum, ties kept, firings from layer 1)
            or ``"positive"`` (the largest positive writes, firings from layer 0). Both rank
            attention heads only; MLP and embedding writes are reported beside them
            (``writers.csv`` and the firings' ``*_from_*`` columns).
        augmented_bias: add to every head's value the bias-coordinate term
            ``g~[-1] / ln1.hook_scale`` before the rule, as the authors' code does (their
            head output is augmented with a constant 1).
        batch_size: prompts per forward pass (at least 1). Memory grows with it: the
            activations of every layer of a batch are cached at once.
        exclude_first: skip firings whose source is position 0 (BOS, or the attention sink of
            prompts without BOS), as the paper does.
        nonfiring_frac: share of the non-firing places (causal, source not excluded) that are
            sampled and decomposed the same way, for the firing vs non-firing comparison
            (``nonfirings.parquet``); in [0, 1], 0 samples none.
        seed: seed of the non-firing sample.

    Raises:
        ValueError: a field outside its range; the message starts with the field's name.
    """

    pattern_thresh: float = 0.5
    thresh: float = 1.0
    edge_thresh: float = 0.7
    edge_rule: str = "positive"
    augmented_bias: bool = False
    batch_size: int = 32
    exclude_first: bool = True
    nonfiring_frac: float = 0.001
    seed: int = 0

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
        if self.edge_rule not in EDGE_RULES:
            raise ValueError(f"edge_rule must be one of {EDGE_RULES}, got {self.edge_rule!r}")
        for name in ("augmented_bias", "exclude_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, Integral):
            raise ValueError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.nonfiring_frac, Real) or not 0 <= self.nonfiring_frac <= 1:
            raise ValueError(
                f"nonfiring_frac must be in [0, 1] (a share of the non-firing places), "
                f"got {self.nonfiring_frac!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def first_layer(self) -> int:
        """The lowest layer whose firings are traced: 1 for the paper's rule, else 0."""
        return 1 if self.edge_rule == "paper" else 0


@dataclass
class TraceResult:
    """What :func:`trace` found: files in ``out_dir``, read into pandas on first access.

    Attributes:
        out_dir: the folder holding the files (a temporary folder, removed with this object,
            when :func:`trace` was given none).
        seeds: the seed heads.
        config: the hyperparameters.
        seconds: wall time of the trace.
        model_name: ``model.cfg.model_name``.
        stats: counts written by :meth:`TraceStore.finalize` (``n_firings``,
            ``n_traced_firings``, ``n_edges``, ``n_edge_records``, ``n_nonfirings``,
            ``max_abs_residual``, ``median_n_components``).
    """

    out_dir: Path
    seeds: list[tuple[int, int]]
    config: TraceConfig
    seconds: float
    model_name: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        """The path of file ``name`` of the trace (see :data:`TraceStore.FILES`)."""
        return self.out_dir / name

    @cached_property
    def firings(self) -> pd.DataFrame:
        """Every firing (``firings.parquet``, see :meth:`TraceStore.firing_table`)."""
        return pd.read_parquet(self.path(TraceStore.FIRINGS))

    @cached_property
    def edges(self) -> pd.DataFrame:
        """Head-to-head edges aggregated over traced firings (``edges.csv``)."""
        return pd.read_csv(self.path(TraceStore.EDGES))

    @cached_property
    def edge_records(self) -> pd.DataFrame:
        """One row per edge of a traced firing (``edge_records.parquet``)."""
        return pd.read_parquet(self.path(TraceStore.EDGE_RECORDS))

    @cached_property
    def writers(self) -> pd.DataFrame:
        """MLP and embedding writes into traced firings, aggregated (``writers.csv``)."""
        return pd.read_csv(self.path(TraceStore.WRITERS))

    @cached_property
    def heads(self) -> pd.DataFrame:
        """One row per head: firing counts and median components (``heads.csv``)."""
        return pd.read_csv(self.path(TraceStore.HEADS))

    @cached_property
    def nonfirings(self) -> pd.DataFrame:
        """The decomposed sample of non-firings (``nonfirings.parquet``)."""
        return pd.read_parquet(self.path(TraceStore.NONFIRINGS))

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph (:func:`~tl_superposition.tracing.graph.build_graph`)."""
        return build_graph(self.heads, self.edges, self.seeds, min_firings)

    def paper_graph(self) -> nx.DiGraph:
        """The graph in the authors' shape (:func:`~tl_superposition.tracing.graph.paper_graph`)."""
        return paper_graph(self.edge_records, self.firings, self.config.first_layer)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Copy the trace's files into ``out_dir`` (atomically) and write ``graph.graphml``.

        Returns:
            ``{file name: path}``.
        """
        return TraceStore.copy(self.out_dir, Path(out_dir), self.graph())


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
        mlp: ``blocks.{L}.hook_mlp_out`` (zeros for attention-only models).
        embed: ``hook_embed`` plus ``hook_pos_embed`` where positions are learned.
        resid: the residual stream after the last block (``blocks.{n-1}.hook_resid_post``),
            from which ``ln_final`` and the unembedding give the logits.
        pattern, scores: per layer, ``attn.hook_pattern`` and ``attn.hook_attn_scores``
            (``[batch, n_heads, dest, src]``).
    """

    x: Float[Tensor, "batch pos n_layers d_model"]
    scale: Float[Tensor, "batch pos n_layers"]
    z: Float[Tensor, "batch pos n_layers n_heads d_head"]
    mlp: Float[Tensor, "batch pos n_layers d_model"]
    embed: Float[Tensor, "batch pos d_model"]
    resid: Float[Tensor, "batch pos d_model"]
    pattern: list[Tensor]
    scores: list[Tensor]


@torch.inference_mode()
def run_batch(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> BatchCache:
    """Run ``model`` on ``tokens`` up to its last block and keep what the trace reads.

    The unembedding is not run: the logits a caller needs (for example at one position)
    come from ``resid`` (:func:`end_logits`).

    Args:
        model: a processed ``HookedTransformer`` (:func:`tl_superposition.load_model`).
        tokens: token ids, on the model's device.
    """
    n = model.cfg.n_layers
    names = _hook_names(n, model.cfg.positional_embedding_type == "standard")
    resid, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name in names, stop_at_layer=n
    )
    assert isinstance(resid, Tensor)
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    if model.cfg.attn_only:
        mlp = torch.zeros(
            *resid.shape[:2], n, resid.shape[2], dtype=resid.dtype, device=resid.device
        )
    else:
        mlp = torch.stack([cache[f"blocks.{L}.hook_mlp_out"] for L in range(n)], 2)
    return BatchCache(
        x=torch.stack([cache[f"blocks.{L}.ln1.hook_normalized"] for L in range(n)], 2),
        scale=torch.stack([cache[f"blocks.{L}.ln1.hook_scale"][..., 0] for L in range(n)], 2),
        z=torch.stack([cache[f"blocks.{L}.attn.hook_z"] for L in range(n)], 2),
        mlp=mlp,
        embed=embed,
        resid=resid,
        pattern=[cache[f"blocks.{L}.attn.hook_pattern"] for L in range(n)],
        scores=[cache[f"blocks.{L}.attn.hook_attn_scores"] for L in range(n)],
    )


@torch.inference_mode()
def end_logits(
    model: HookedTransformer,
    cache: BatchCache,
    pos: Int[Tensor, " batch"],
    tokens: Int[Tensor, "batch k"],
) -> Float[Tensor, "batch k"]:
    """The logits of ``tokens`` at position ``pos`` of each prompt, from ``cache.resid``.

    Equal to ``model(tokens)[b, pos[b], tokens[b]]`` up to float rounding, without the full
    unembedding: ``ln_final`` and ``W_U`` are applied to one position and ``k`` columns.
    """
    rows = torch.arange(len(pos), device=cache.resid.device)
    resid = cache.resid[rows, pos.to(rows.device)][:, None, :]  # [batch, 1, d_model]
    normed = model.ln_final(resid)[:, 0] if model.cfg.normalization_type else resid[:, 0]
    tok = tokens.to(rows.device)
    w = model.W_U[:, tok].permute(1, 0, 2)  # [batch, d_model, k]
    return torch.einsum("bd,bdk->bk", normed, w) + model.b_U[tok]


# --------------------------------------------------------------------------- upstream writes


@dataclass
class ResidualWriters:
    """The weights that write to the residual stream (made once per trace).

    Attributes:
        W_O: every head's output matrix (float64, for :func:`upstream_writes`).
        W_O_model: the same, flattened over heads, in the model's dtype and device
            (for :func:`signal_writes`).
        b_O_cumsum: row ``L`` is the sum of ``b_O`` over the layers before ``L`` (float64).
        centred: whether the model normalises with LayerNorm (which subtracts the mean, so
            signal directions are centred before the writes are measured).
    """

    W_O: Float[Tensor, "n_layers n_heads d_head d_model"]
    W_O_model: Float[Tensor, "n_layers_x_n_heads d_head d_model"]
    b_O_cumsum: Float[Tensor, "n_layers_plus_1 d_model"]
    centred: bool

    @classmethod
    def from_model(cls, model: HookedTransformer) -> ResidualWriters:
        """Copy the writers of ``model``."""
        b_O = model.b_O.detach().to(torch.float64)
        return cls(
            W_O=model.W_O.detach().to(torch.float64),
            W_O_model=model.W_O.detach().flatten(0, 1),
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


# --------------------------------------------------------------------------- the steps


@dataclass
class BatchFirings:
    """The firings (or sampled non-firings) of one batch, every layer in one set of rows.

    Rows are layer-major, then in the order of
    :func:`~tl_superposition.tracing.decompose.find_firings`; tensors are on the CPU. The
    fields are those of :class:`~tl_superposition.tracing.decompose.LayerFirings`, with
    ``layer`` one entry per row.
    """

    layer: Int[Tensor, " n"]
    prompt: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    dest: Int[Tensor, " n"]
    src: Int[Tensor, " n"]
    score: Float[Tensor, " n"]
    pattern: Float[Tensor, " n"]
    contributions: Float[Tensor, "n d_head"]
    order: Int[Tensor, "n d_head"]
    count: Int[Tensor, " n"]
    sig_src: Float[Tensor, "n d_head"]
    sig_dest: Float[Tensor, "n d_head"]

    def __len__(self) -> int:
        return len(self.prompt)

    @classmethod
    def concat(cls, layers: Sequence[LayerFirings], d_head: int) -> BatchFirings:
        """The rows of ``layers`` (one :class:`LayerFirings` per layer), in order."""
        if not layers:
            ints, floats = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
            mat = torch.zeros(0, d_head, dtype=torch.float64)
            return cls(ints, ints, ints, ints, ints, floats, floats, mat, ints[:, None], ints,
                       mat, mat)  # fmt: skip
        cat = lambda key: torch.cat([getattr(fl, key) for fl in layers])  # noqa: E731
        return cls(
            layer=torch.cat([torch.full((len(fl),), fl.layer) for fl in layers]),
            **{
                k: cat(k)
                for k in (
                    "prompt",
                    "head",
                    "dest",
                    "src",
                    "score",
                    "pattern",
                    "contributions",
                    "order",
                    "count",
                    "sig_src",
                    "sig_dest",
                )
            },
        )


def decompose_batch(
    qk: QKSVDCache, cache: BatchCache, lengths: Int[Tensor, " batch"], cfg: TraceConfig
) -> BatchFirings:
    """Step 1: find and decompose the firings of every layer (:func:`decompose_layer`)."""
    layers = [
        decompose_layer(
            qk[L],
            cache.x[:, :, L],
            cache.pattern[L],
            cache.scores[L],
            lengths,
            cfg.pattern_thresh,
            cfg.thresh,
            cfg.exclude_first,
        )
        for L in range(cache.x.shape[2])
    ]
    return BatchFirings.concat(layers, cache.z.shape[-1])


def decompose_nonfirings(
    qk: QKSVDCache,
    cache: BatchCache,
    lengths: Int[Tensor, " batch"],
    prompt_ids: Int[Tensor, " batch"],
    cfg: TraceConfig,
) -> BatchFirings:
    """A sample of the non-firings of every layer (``cfg.nonfiring_frac``), decomposed.

    See :func:`~tl_superposition.tracing.decompose.sample_nonfirings`.
    """
    layers = []
    for L in range(cache.x.shape[2]):
        places = sample_nonfirings(
            cache.pattern[L],
            cache.scores[L],
            lengths,
            prompt_ids,
            L,
            cfg.nonfiring_frac,
            cfg.seed,
            cfg.pattern_thresh,
            cfg.exclude_first,
        )
        if len(places[0]):
            x, pat, sc = cache.x[:, :, L], cache.pattern[L], cache.scores[L]
            layers.append(decompose_places(qk[L], x, pat, sc, places, cfg.thresh))
    return BatchFirings.concat(layers, cache.z.shape[-1])


@dataclass
class SideWrites:
    """What the upstream components write into each firing side of a batch (score units).

    Rows: the source side of every firing (in the order of :class:`BatchFirings`), then the
    destination side of every firing. Writes from components at or above the firing's layer
    are 0.

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
    qk: QKSVDCache, firings: BatchFirings, centred: bool
) -> Float[Tensor, "n_sides d_model_plus_1"]:
    """Every firing's source-side then destination-side signal direction, float64.

    In the augmented space: the first ``d_model`` coordinates are the direction in the
    residual stream (centred for LayerNorm models), the last one the bias coordinate.
    """
    n = len(firings)
    d_aug = qk[0].q_basis.shape[1]
    dev = qk[0].q_basis.device
    g = torch.zeros(2 * n, d_aug, dtype=torch.float64, device=dev)
    for L in firings.layer.unique().tolist():
        rows = (firings.layer == L).nonzero()[:, 0]
        head = firings.head[rows]
        g[rows] = basis_to_model(qk[L].k_basis, firings.sig_src[rows].to(dev), head)
        g[rows + n] = basis_to_model(qk[L].q_basis, firings.sig_dest[rows].to(dev), head)
    if centred:
        g[:, :-1] -= g[:, :-1].mean(1, keepdim=True)
    return g


@torch.inference_mode()
def signal_writes(
    qk: QKSVDCache, writers: ResidualWriters, cache: BatchCache, firings: BatchFirings
) -> SideWrites:
    """Step 2: the writes of every upstream component into every firing side.

    The head outputs ``y_j = z_j W_O_j`` of :data:`WRITE_PROMPTS` prompts are formed at once,
    and all the sides that read a position are served by one product with that position's
    ``y``, so the cost is one ``n_layers n_heads d_head d_model`` product per position plus
    ``n_layers n_heads d_model`` per side. Values agree with :func:`upstream_writes` up to
    float32 rounding.
    """
    n, n_layers = len(firings), cache.x.shape[2]
    dev, dtype = cache.z.device, cache.z.dtype
    b = torch.cat([firings.prompt, firings.prompt]).to(dev)
    pos = torch.cat([firings.src, firings.dest]).to(dev)
    layer = torch.cat([firings.layer, firings.layer]).to(dev)
    g_aug = side_directions(qk, firings, writers.centred)
    g = g_aug[:, :-1].to(dtype)
    n_up = writers.W_O_model.shape[0]
    heads = torch.zeros(2 * n, n_up, dtype=dtype, device=dev)
    mlps = torch.zeros(2 * n, n_layers, dtype=dtype, device=dev)
    embed = torch.zeros(2 * n, dtype=dtype, device=dev)
    P = cache.z.shape[1]
    order = torch.argsort(b * P + pos, stable=True)
    keys, counts = torch.unique_consecutive((b * P + pos)[order], return_counts=True)
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    B = cache.z.shape[0]
    for c0 in range(0, B, WRITE_PROMPTS):
        c1 = min(c0 + WRITE_PROMPTS, B)
        z = cache.z[c0:c1].flatten(2, 3)  # [b, pos, n_up, d_head]
        y = torch.einsum("bpje,jed->bpjd", z, writers.W_O_model)
        for key, lo, hi in zip(keys.tolist(), starts, ends):
            bi, p = divmod(key, P)
            if not c0 <= bi < c1:
                continue
            rows = order[lo:hi]
            gr = g[rows]
            heads[rows] = gr @ y[bi - c0, p].T
            mlps[rows] = gr @ cache.mlp[bi, p].T
            embed[rows] = gr @ cache.embed[bi, p]
    scale = cache.scale[b, pos, layer].to(torch.float64)
    bias = (g_aug[:, :-1] * writers.b_O_cumsum.to(dev)[layer]).sum(1) / scale
    scale_m = scale.to(dtype)[:, None]
    col = torch.arange(n_up, device=dev)[None, :] // cache.z.shape[3]
    heads = torch.where(col < layer[:, None], heads / scale_m, torch.zeros_like(heads))
    up = torch.arange(n_layers, device=dev)[None, :]
    mlps = torch.where(up < layer[:, None], mlps / scale_m, torch.zeros_like(mlps))
    return SideWrites(
        heads=heads.float().cpu(),
        mlps=mlps.float().cpu(),
        embed=(embed / scale_m[:, 0]).float().cpu(),
        bias=bias.float().cpu(),
        bias_coord=(g_aug[:, -1] / scale).float().cpu(),
    )


@dataclass
class CandidateEdges:
    """The edges the rule selects for every firing side of one batch (before any walk).

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


def batch_edges(
    firings: BatchFirings, writes: SideWrites, cfg: TraceConfig, n_heads: int
) -> CandidateEdges:
    """Step 3: the edge rule applied to the head writes of every firing side.

    Candidates are the heads of the layers below the firing; firings below
    :attr:`TraceConfig.first_layer` get none.
    """
    n = len(firings)
    layer = torch.cat([firings.layer, firings.layer])
    values = writes.heads
    if cfg.augmented_bias:
        values = values + writes.bias_coord[:, None]
    col_layer = torch.arange(values.shape[1])[None, :] // n_heads
    valid = (col_layer < layer[:, None]) & (layer[:, None] >= cfg.first_layer)
    mask = select_edges(values, cfg.edge_rule, cfg.edge_thresh, valid)  # type: ignore[arg-type]
    side_row, col = mask.nonzero(as_tuple=True)
    return CandidateEdges(
        firing=(side_row % max(n, 1)).numpy(),
        side=(side_row >= n).to(torch.int8).numpy(),
        up_layer=(col // n_heads).numpy(),
        up_head=(col % n_heads).numpy(),
        weight=values[side_row, col].numpy(),
    )


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


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of ``range(lo[i], hi[i])`` over ``i``, without a Python loop."""
    counts = hi - lo
    starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return starts + np.arange(int(counts.sum()))


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
    """Follow the candidate edges from the ``start`` firings down the layers.

    An edge of a traced firing, from head ``(l, h)`` at position ``p`` (the firing's source
    for ``side`` 0, its destination for 1), traces every firing of head ``(l, h)`` in the same
    prompt whose destination is ``p``, unless ``l < first_layer``. Layers are visited from the
    top, so each firing's edges are followed once, whatever the number of paths reaching it.

    Args:
        prompt, layer, head, dest, src: one entry per firing.
        edges: the candidate edges (``edges.firing`` indexes these arrays).
        start: mask of the firings the walk starts from (:func:`seed_firings`).
        first_layer: firings below this layer are never traced.

    Returns:
        The mask of traced firings (``start`` included).
    """
    traced = start.copy()
    if len(edges) == 0 or len(prompt) == 0:
        return traced
    n_layers = int(layer.max()) + 1
    n_heads = int(head.max()) + 1
    n_pos = int(max(dest.max(), src.max())) + 1

    def key(p: np.ndarray, ly: np.ndarray, h: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ((p.astype(np.int64) * n_layers + ly) * n_heads + h) * n_pos + d

    firing_keys = key(prompt, layer, head, dest)
    order = np.argsort(firing_keys, kind="stable")
    sorted_keys = firing_keys[order]
    f = edges.firing
    e_layer = layer[f]
    e_pos = np.where(edges.side == 0, src[f], dest[f])
    # the upstream head must be a head the key can name (the walk never needs others)
    ok = (edges.up_layer < n_layers) & (edges.up_head < n_heads)
    target = np.where(ok, key(prompt[f], edges.up_layer, edges.up_head, e_pos), -1)
    by_layer = np.argsort(e_layer, kind="stable")
    sorted_layer = e_layer[by_layer]
    for L in range(n_layers - 1, -1, -1):
        lo_e, hi_e = np.searchsorted(sorted_layer, [L, L + 1], side="left")
        here = by_layer[lo_e:hi_e]
        here = here[traced[f[here]]]
        if not len(here):
            continue
        tk = target[here]
        lo = np.searchsorted(sorted_keys, tk, side="left")
        hi = np.searchsorted(sorted_keys, tk, side="right")
        hits = order[_expand_ranges(lo, hi)]
        traced[hits[layer[hits] >= first_layer]] = True
    return traced


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


def _seed_chooser(seeds: Any, n_layers: int, n_heads: int) -> SeedChooser:
    if isinstance(seeds, SeedChooser):
        return seeds
    return FixedSeeds.from_spec(seeds, n_layers, n_heads)


@torch.no_grad()
def trace(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_prompts pos"],
    seeds: Iterable[Any] | str | SeedChooser,
    seed_dest: Int[Tensor, " n_prompts"],
    seed_src: Int[Tensor, " n_prompts"] | None = None,
    lengths: Int[Tensor, " n_prompts"] | None = None,
    config: TraceConfig | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    roles: Mapping[str, Tensor] | None = None,
) -> TraceResult:
    """Decompose every firing and trace signals upstream from seed firings, in one pass.

    Args:
        model: a ``HookedTransformer`` with folded normalisation weights (see
            :func:`tl_superposition.load_model`); absolute or rotary positions, MHA or GQA.
        tokens: right-padded prompts.
        seeds: heads ``[(layer, head), ...]`` (or ``"9.6,9.9"``, see
            :func:`~tl_superposition.tracing.graph.parse_heads`) whose firings start the
            trace, or a :class:`~tl_superposition.tracing.seeds.SeedChooser` that picks them
            from the same forward pass.
        seed_dest: per prompt, the destination position of the seed firings (IOI: END).
        seed_src: per prompt, the required source position (IOI: IO); ``None`` accepts any.
        lengths: real length of each prompt (default: all of ``tokens``).
        config: thresholds, edge rule and batch size (:class:`TraceConfig`).
        progress: show a tqdm bar over batches.
        out_dir: folder the files are streamed to (created if missing; files already there
            are replaced only once the trace is complete). ``None``: a temporary folder that
            lives as long as the result.
        roles: named positions per prompt (``{"IO": io_pos, ...}``): the firings table gets
            ``dest_role`` and ``src_role`` columns.

    Returns:
        :class:`TraceResult`; its files are described by
        :class:`~tl_superposition.tracing.store.TraceStore`.

    Raises:
        ValueError: a seed head or a seed position is out of range, or no prompts.
        NotImplementedError: an attention variant the decomposition does not cover.
    """
    cfg = config or TraceConfig()
    chooser = _seed_chooser(seeds, model.cfg.n_layers, model.cfg.n_heads)
    n_prompts = tokens.shape[0]
    if n_prompts == 0:
        raise ValueError("trace needs at least one prompt")
    lengths = torch.full((n_prompts,), tokens.shape[1]) if lengths is None else lengths.cpu()
    dest = _check_positions("seed_dest", seed_dest, lengths)
    src = None if seed_src is None else _check_positions("seed_src", seed_src, lengths)
    role_pos = {k: _check_positions(f"roles[{k!r}]", v, lengths) for k, v in (roles or {}).items()}
    qk = QKSVDCache(model)
    writers = ResidualWriters.from_model(model)
    device = next(model.parameters()).device
    tmpdir = tempfile.TemporaryDirectory(prefix="tl-trace-") if out_dir is None else None
    out = Path(tmpdir.name if tmpdir is not None else out_dir)  # type: ignore[arg-type]

    t0 = time.time()
    with TraceStore(out, model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head) as store:
        for lo in tqdm(
            range(0, n_prompts, cfg.batch_size), desc="trace", unit="batch", disable=not progress
        ):
            hi = min(lo + cfg.batch_size, n_prompts)
            cache = run_batch(model, tokens[lo:hi, : int(lengths[lo:hi].max())].to(device))
            chooser.observe(model, cache, lo, hi)
            firings = decompose_batch(qk, cache, lengths[lo:hi], cfg)
            nonfirings = decompose_nonfirings(qk, cache, lengths[lo:hi], torch.arange(lo, hi), cfg)
            writes = signal_writes(qk, writers, cache, firings)
            edges = batch_edges(firings, writes, cfg, model.cfg.n_heads)
            del cache
            store.add_batch(lo, firings, writes, edges, nonfirings, role_pos)
        seed_heads = chooser.choose()
        stats = store.finalize(
            seed_heads, dest.numpy(), None if src is None else src.numpy(), cfg.first_layer
        )
    return TraceResult(
        out_dir=out,
        seeds=list(seed_heads),
        config=cfg,
        seconds=time.time() - t0,
        model_name=model.cfg.model_name,
        stats=stats,
        tmpdir=tmpdir,
    )


__all__ = [
    "TraceConfig",
    "TraceResult",
    "BatchCache",
    "run_batch",
    "end_logits",
    "ResidualWriters",
    "upstream_writes",
    "upstream_columns",
    "BatchFirings",
    "decompose_batch",
    "decompose_nonfirings",
    "SideWrites",
    "side_directions",
    "signal_writes",
    "CandidateEdges",
    "batch_edges",
    "seed_firings",
    "walk_upstream",
    "trace",
]
