"""Signal tracing through attention firings, on any prompts (Franco & Crovella 2024, Sec. 5).

:func:`trace` runs the model over the prompts in batches and, per batch:

1. caches the normalised residual stream, ``ln1.hook_scale``, scores, patterns, ``hook_z``,
   MLP outputs and embeddings of every layer (``run_with_cache`` up to the last block, no
   unembedding);
2. finds every firing of every head and decomposes its score into singular-component
   contributions, keeping the shortest set reaching ``thresh x score``
   (:mod:`~tl_superposition.tracing.decompose`);
3. starting from the seed firings, walks down the layers: for each traced firing it measures
   how much every upstream component (each attention head, each MLP, the embeddings) writes
   into the firing's selected singular directions at the source position (``side="src"``)
   and at the destination position (``side="dest"``), keeps as edges the upstream components
   making up the top ``edge_thresh`` of the positive contribution, and traces the firings of
   the upstream heads at that position in turn.

Upstream write of component ``j`` at position ``p`` into a firing of layer ``L``:
``(y_j[p] . g) / ln1.hook_scale_L[p]`` with ``g`` the signal direction of
:func:`~tl_superposition.tracing.decompose.signal_directions` (centred for LayerNorm models,
since LayerNorm subtracts the mean). Over all components, plus the attention output biases,
these writes add up to ``x_p . g`` exactly.

Edges are aggregated over firings into a table (upstream, downstream, side, weight,
n_firings): ``weight`` is the summed write of the edge over the firings where it was selected.
Node names: ``A9.6`` (layer 9, head 6), ``M3`` (MLP of layer 3), ``E`` (embeddings).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.tracing.decompose import (
    find_firings,
    project,
    selected_mask,
    shortest_prefix,
    signal_directions,
)
from tl_superposition.tracing.qk_svd import QKSVDCache

# Firings projected at once: bounds the gathered d_head x d_head cores (64 KiB per firing).
CHUNK = 2048
KIND_HEAD, KIND_MLP, KIND_EMBED = 0, 1, 2


def node_name(kind: int, layer: int, head: int) -> str:
    """``A{layer}.{head}``, ``M{layer}`` or ``E``."""
    return f"A{layer}.{head}" if kind == KIND_HEAD else (f"M{layer}" if kind == KIND_MLP else "E")


def parse_heads(spec: str | Sequence[Any] | None) -> list[tuple[int, int]] | None:
    """Parse ``"9.6,9.9"`` (or ``[(9, 6), "9.9"]``) into ``[(9, 6), (9, 9)]``.

    Raises:
        ValueError: an item is not ``LAYER.HEAD``.
    """
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    heads = []
    for item in items:
        if isinstance(item, str):
            item = item.strip().lstrip("A")
            try:
                layer, head = (int(x) for x in item.split("."))
            except ValueError:
                raise ValueError(f"head {item!r} is not of the form LAYER.HEAD, e.g. 9.6") from None
        else:
            layer, head = (int(x) for x in item)
        heads.append((layer, head))
    return heads


@dataclass
class TraceConfig:
    """Hyperparameters of the decomposition and the tracing (defaults: Franco & Crovella)."""

    pattern_thresh: float = 0.5
    thresh: float = 1.0
    edge_thresh: float = 0.7
    batch_size: int = 32
    exclude_first: bool = True


@dataclass
class TraceResult:
    """What :func:`trace` found.

    Attributes:
        firings: one row per firing (see :func:`trace`).
        edges: one row per (upstream, downstream, side) edge with its summed ``weight`` and
            the number of firings ``n_firings`` in which it was selected.
        seeds: the seed heads.
        config: the hyperparameters.
        seconds: wall time.
    """

    firings: pd.DataFrame
    edges: pd.DataFrame
    seeds: list[tuple[int, int]]
    config: TraceConfig
    seconds: float
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph: nodes ``A{L}.{h}``/``M{L}``/``E``, one edge per (pair, side).

        Node attributes: ``kind`` (attn/mlp/embed), ``layer`` (-1 for E), ``head`` (-1 if none),
        ``n_traced_firings``. Edge attributes: ``side``, ``weight``, ``n_firings``; edge keys
        are the side, so ``G[u][v]["src"]`` works.
        """
        g = nx.MultiDiGraph()
        edges = self.edges[self.edges.n_firings >= min_firings]
        traced = self.firings[self.firings.traced]
        counts = traced.groupby(["layer", "head"]).size()
        names = set(edges.upstream) | set(edges.downstream)
        names |= {f"A{layer}.{head}" for layer, head in self.seeds}
        for name in sorted(names):
            kind, layer, head = _parse_node(name)
            g.add_node(
                name,
                kind=kind,
                layer=layer,
                head=head,
                n_traced_firings=int(counts.get((layer, head), 0)) if kind == "attn" else 0,
            )
        for row in edges.itertuples(index=False):
            g.add_edge(
                row.upstream,
                row.downstream,
                key=row.side,
                side=row.side,
                weight=float(row.weight),
                n_firings=int(row.n_firings),
            )
        return g


def _parse_node(name: str) -> tuple[str, int, int]:
    if name == "E":
        return "embed", -1, -1
    if name.startswith("M"):
        return "mlp", int(name[1:]), -1
    layer, head = name[1:].split(".")
    return "attn", int(layer), int(head)


def _hook_names(model: HookedTransformer) -> list[str]:
    names = ["hook_embed"]
    if model.cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for L in range(model.cfg.n_layers):
        names += [
            f"blocks.{L}.ln1.hook_normalized",
            f"blocks.{L}.ln1.hook_scale",
            f"blocks.{L}.attn.hook_attn_scores",
            f"blocks.{L}.attn.hook_pattern",
            f"blocks.{L}.attn.hook_z",
            f"blocks.{L}.hook_mlp_out",
        ]
    return names


@dataclass
class _BatchCache:
    """Stacked activations of one batch (float32, on the model's device)."""

    x: Float[Tensor, "batch pos n_layers d_model"]
    scale: Float[Tensor, "batch pos n_layers"]
    z: Float[Tensor, "batch pos n_layers n_heads d_head"]
    mlp: Float[Tensor, "batch pos n_layers d_model"]
    embed: Float[Tensor, "batch pos d_model"]
    pattern: list[Tensor]
    scores: list[Tensor]


@torch.inference_mode()
def _run_batch(model: HookedTransformer, tokens: Tensor) -> _BatchCache:
    names = _hook_names(model)
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n in names, stop_at_layer=model.cfg.n_layers
    )
    n = model.cfg.n_layers
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    return _BatchCache(
        x=torch.stack([cache[f"blocks.{L}.ln1.hook_normalized"] for L in range(n)], 2),
        scale=torch.stack([cache[f"blocks.{L}.ln1.hook_scale"][..., 0] for L in range(n)], 2),
        z=torch.stack([cache[f"blocks.{L}.attn.hook_z"] for L in range(n)], 2),
        mlp=torch.stack([cache[f"blocks.{L}.hook_mlp_out"] for L in range(n)], 2),
        embed=embed,
        pattern=[cache[f"blocks.{L}.attn.hook_pattern"] for L in range(n)],
        scores=[cache[f"blocks.{L}.attn.hook_attn_scores"] for L in range(n)],
    )


@dataclass
class _Writers:
    """Float64 copies of the weights that write to the residual stream (made once per trace)."""

    W_O: Float[Tensor, "n_layers n_heads d_head d_model"]
    b_O_cumsum: Float[Tensor, "n_layers_plus_1 d_model"]  # row L: sum of b_O over layers < L
    centred: bool

    @classmethod
    def from_model(cls, model: HookedTransformer) -> _Writers:
        b_O = model.b_O.detach().to(torch.float64)
        return cls(
            W_O=model.W_O.detach().to(torch.float64),
            b_O_cumsum=torch.cat([torch.zeros_like(b_O[:1]), b_O.cumsum(0)]),
            centred=model.cfg.normalization_type in ("LN", "LNPre"),
        )


def upstream_writes(
    model: HookedTransformer | _Writers,
    cache: _BatchCache,
    layer: int,
    batch: Int[Tensor, " n"],
    pos: Int[Tensor, " n"],
    g: Float[Tensor, "n d_model"],
) -> Float[Tensor, "n n_upstream_plus_1"]:
    """What each component upstream of ``layer`` writes along ``g`` at ``(batch, pos)``.

    Columns: every head of layers ``< layer`` (layer-major), every MLP of layers ``< layer``,
    the embeddings, and last the summed attention output biases ``b_O`` (not a node). Each
    write is divided by ``blocks.{layer}.ln1.hook_scale`` at that position; for LayerNorm
    models ``g`` is centred first. The columns sum to ``ln1.hook_normalized . g``.
    """
    w = model if isinstance(model, _Writers) else _Writers.from_model(model)
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


def _upstream_nodes(layer: int, n_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kind, layer, head) of each column of :func:`upstream_writes` but the bias column."""
    kinds = [KIND_HEAD] * (layer * n_heads) + [KIND_MLP] * layer + [KIND_EMBED]
    layers = [up for up in range(layer) for _ in range(n_heads)] + list(range(layer)) + [-1]
    heads = [h for _ in range(layer) for h in range(n_heads)] + [-1] * layer + [-1]
    return np.array(kinds), np.array(layers), np.array(heads)


@torch.no_grad()
def trace(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_prompts pos"],
    seeds: Sequence[tuple[int, int]] | str,
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
        seeds: heads ``[(layer, head), ...]`` (or ``"9.6,9.9"``) whose firings start the trace.
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
    seeds = parse_heads(seeds) if isinstance(seeds, str) else [tuple(map(int, s)) for s in seeds]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for layer, head in seeds:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"seed head {layer}.{head} out of range: the model has {n_layers} "
                f"layers and {n_heads} heads per layer"
            )
    n_prompts = tokens.shape[0]
    if n_prompts == 0:
        raise ValueError("trace needs at least one prompt")
    lengths = torch.full((n_prompts,), tokens.shape[1]) if lengths is None else lengths.cpu()
    if (seed_dest.cpu() >= lengths).any() or (seed_dest < 0).any():
        raise ValueError("seed_dest has a position outside its prompt")
    qk = QKSVDCache(model)
    writers = _Writers.from_model(model)
    device = next(model.parameters()).device

    t0 = time.time()
    firing_parts: list[dict[str, Any]] = []
    edge_parts: list[dict[str, np.ndarray]] = []
    batches = range(0, n_prompts, cfg.batch_size)
    for lo in tqdm(batches, desc="trace", unit="batch", disable=not progress):
        hi = min(lo + cfg.batch_size, n_prompts)
        blen = lengths[lo:hi]
        cache = _run_batch(model, tokens[lo:hi, : int(blen.max())].to(device))
        f, e = _trace_batch(
            model,
            qk,
            writers,
            cache,
            blen,
            seeds,
            seed_dest[lo:hi].cpu(),
            None if seed_src is None else seed_src[lo:hi].cpu(),
            cfg,
        )
        f["prompt_id"] = f["prompt_id"] + lo
        e["prompt_id"] = e["prompt_id"] + lo
        firing_parts.append(f)
        edge_parts.append(e)
        del cache

    firings = firings_table(firing_parts).to_pandas()
    edges = _edges_frame(edge_parts)
    return TraceResult(
        firings=firings,
        edges=edges,
        seeds=list(seeds),
        config=cfg,
        seconds=time.time() - t0,
        model_name=model.cfg.model_name,
    )


def _trace_batch(model, qk, writers, cache: _BatchCache, lengths, seeds, seed_dest, seed_src, cfg):
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    B, P = cache.x.shape[0], cache.x.shape[1]
    per_layer: list[dict[str, Tensor]] = []
    index = torch.full((B, n_layers, n_heads, P), -1, dtype=torch.long)  # firing row, per layer

    # 1. firings and their sparse decomposition
    for L in range(n_layers):
        pat, sc = cache.pattern[L], cache.scores[L]
        b, h, d, s = (
            t.cpu() for t in find_firings(pat, sc, lengths, cfg.pattern_thresh, cfg.exclude_first)
        )
        score = sc[b, h, d, s].cpu()
        contrib = torch.empty(len(b), model.cfg.d_head, dtype=torch.float64)
        for c0 in range(0, len(b), CHUNK):
            sl = slice(c0, c0 + CHUNK)
            proj = project(
                qk[L], cache.x[b[sl], d[sl], L], cache.x[b[sl], s[sl], L], h[sl], d[sl] - s[sl]
            )
            contrib[sl] = proj.contributions
        order, count = shortest_prefix(contrib, score.to(torch.float64) * cfg.thresh)
        index[b, L, h, d] = torch.arange(len(b))
        per_layer.append(
            dict(
                b=b,
                h=h,
                d=d,
                s=s,
                score=score,
                pattern=pat[b, h, d, s].cpu(),
                contrib=contrib,
                order=order,
                count=count,
                traced=torch.zeros(len(b), dtype=torch.bool),
            )
        )

    # 2. seeds
    rows = torch.arange(B)
    for L, H in seeds:
        fid = index[rows, L, H, seed_dest]
        ok = fid >= 0
        if seed_src is not None:
            ok &= per_layer[L]["s"][fid.clamp(min=0)] == seed_src
        per_layer[L]["traced"][fid[ok]] = True

    # 3. walk down the layers
    edges: dict[str, list] = {
        k: []
        for k in (
            "prompt_id",
            "down_layer",
            "down_head",
            "up_kind",
            "up_layer",
            "up_head",
            "side",
            "weight",
        )
    }
    for L in range(n_layers - 1, -1, -1):
        fl = per_layer[L]
        todo = fl["traced"].nonzero()[:, 0]
        if len(todo) == 0:
            continue
        kinds, up_layers, up_heads = _upstream_nodes(L, n_heads)
        for c0 in range(0, len(todo), CHUNK):
            ids = todo[c0 : c0 + CHUNK]
            b, h, d, s = fl["b"][ids], fl["h"][ids], fl["d"][ids], fl["s"][ids]
            proj = project(qk[L], cache.x[b, d, L], cache.x[b, s, L], h, d - s)
            sel = selected_mask(fl["order"][ids], fl["count"][ids])
            g_src, g_dest = signal_directions(qk[L], proj, sel, h)
            for side, g, p in (("src", g_src, s), ("dest", g_dest, d)):
                writes = upstream_writes(writers, cache, L, b, p, g.to(cache.x.device)).cpu()
                vals = writes[:, :-1]
                positive = vals.clamp(min=0)
                total = positive.sum(1)
                order, count = shortest_prefix(positive, cfg.edge_thresh * total)
                count = torch.where(total > 0, count, torch.zeros_like(count))
                keep = selected_mask(order, count) & (vals > 0)
                n_i, col = keep.nonzero(as_tuple=True)
                col_np = col.numpy()
                edges["prompt_id"].append(b[n_i].numpy())
                edges["down_layer"].append(np.full(len(n_i), L))
                edges["down_head"].append(h[n_i].numpy())
                edges["up_kind"].append(kinds[col_np])
                edges["up_layer"].append(up_layers[col_np])
                edges["up_head"].append(up_heads[col_np])
                edges["side"].append(np.full(len(n_i), side))
                edges["weight"].append(vals[n_i, col].numpy())
                # the upstream heads' own firings at this position are traced next
                is_head = kinds[col_np] == KIND_HEAD
                ub, up = b[n_i][is_head], p[n_i][is_head]
                ul = torch.as_tensor(up_layers[col_np][is_head])
                uh = torch.as_tensor(up_heads[col_np][is_head])
                fid = index[ub, ul, uh, up]
                for l_up in ul[fid >= 0].unique().tolist():
                    m = (fid >= 0) & (ul == l_up)
                    per_layer[l_up]["traced"][fid[m]] = True

    firings = _collect_firings(per_layer)
    return firings, {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in edges.items()}


def _collect_firings(per_layer: list[dict[str, Tensor]]) -> dict[str, Any]:
    cat = lambda key: torch.cat([fl[key] for fl in per_layer])  # noqa: E731
    layer = torch.cat([torch.full((len(fl["b"]),), L) for L, fl in enumerate(per_layer)])
    contrib, order, count = cat("contrib"), cat("order"), cat("count")
    score = cat("score")
    sorted_c = torch.gather(contrib, 1, order)
    keep = torch.arange(order.shape[1])[None, :] < count[:, None]
    return {
        "prompt_id": cat("b").numpy(),
        "layer": layer.numpy(),
        "head": cat("h").numpy(),
        "dest_pos": cat("d").numpy(),
        "src_pos": cat("s").numpy(),
        "score": score.numpy(),
        "pattern": cat("pattern").numpy(),
        "n_components": count.numpy(),
        "components": order[keep].numpy(),
        "contributions": sorted_c[keep].numpy(),
        "residual": (score.to(torch.float64) - contrib.sum(1)).numpy(),
        "traced": cat("traced").numpy(),
    }


def firings_table(parts: list[dict[str, Any]]) -> pa.Table:
    """Arrow table of per-batch firings, with ``components``/``contributions`` as list columns."""

    def cat(key: str, dtype: Any) -> np.ndarray:
        return (
            np.concatenate([p[key] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
        )

    counts = cat("n_components", np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
    columns = {
        "prompt_id": pa.array(cat("prompt_id", np.int64)),
        "layer": pa.array(cat("layer", np.int32)),
        "head": pa.array(cat("head", np.int32)),
        "dest_pos": pa.array(cat("dest_pos", np.int32)),
        "src_pos": pa.array(cat("src_pos", np.int32)),
        "score": pa.array(cat("score", np.float32)),
        "pattern": pa.array(cat("pattern", np.float32)),
        "n_components": pa.array(counts),
        "components": pa.ListArray.from_arrays(offsets, pa.array(cat("components", np.int32))),
        "contributions": pa.ListArray.from_arrays(
            offsets, pa.array(cat("contributions", np.float64))
        ),
        "residual": pa.array(cat("residual", np.float64)),
        "traced": pa.array(cat("traced", bool)),
    }
    return pa.table(columns)


def _edges_frame(parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    raw = (
        pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        if parts
        else pd.DataFrame()
    )
    columns = ["upstream", "downstream", "side", "weight", "n_firings"]
    if raw.empty:
        return pd.DataFrame(columns=columns)
    raw["upstream"] = [
        node_name(k, up, h)
        for k, up, h in zip(
            raw.up_kind.astype(int), raw.up_layer.astype(int), raw.up_head.astype(int)
        )
    ]
    raw["downstream"] = [
        f"A{down}.{h}" for down, h in zip(raw.down_layer.astype(int), raw.down_head.astype(int))
    ]
    out = (
        raw.groupby(["upstream", "downstream", "side"], sort=False)
        .agg(weight=("weight", "sum"), n_firings=("weight", "size"))
        .reset_index()
        .sort_values(["n_firings", "weight"], ascending=False, ignore_index=True)
    )
    return out[columns]
