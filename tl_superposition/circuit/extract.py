"""From a trace to a circuit: per-prompt graphs, unification, local edits, pruning (ACC++).

:func:`extract_circuit` follows ACC++ (Franco & Crovella, arXiv 2602.13483; repository
``gaabrielfranco/finding-highly-interpretable-circuits``) on an IOI trace made with
per-prompt seeds (:func:`~tl_superposition.tracing.ioi_trace.trace_ioi`):

1. per-prompt graphs of role nodes and their unification over prompts
   (:mod:`~tl_superposition.circuit.graphs`);
2. every candidate edge is removed by the local edit
   (:mod:`~tl_superposition.circuit.local_edit`) in every prompt where it occurs, and the
   change of ``logit(IO) - logit(S)`` at END is recorded;
3. pruning: edges into the logits are kept; another edge is kept when it occurs in at least
   ``min_prompts`` prompts and the mean change has size at least ``threshold``; nodes with no
   kept path to the logits are dropped.

Edges are measured layer by layer from the top, and only edges into nodes that still have a
kept path to the logits (:func:`measure_edges`): an edge into a node that has none would be
dropped whatever its effect, so this gives the circuit of measuring every edge and pruning
afterwards, at a fraction of the cost. Rare edges (fewer than ``min_prompts`` prompts) are
never measured for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.circuit.circuit import Circuit
from tl_superposition.circuit.config import CircuitConfig
from tl_superposition.circuit.graphs import (
    ROOT,
    UnifiedGraph,
    prompt_edges,
    role_labels,
    seed_edges,
    unify,
)
from tl_superposition.circuit.local_edit import LocalEdits, run_local_edits
from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import IOIDataset
from tl_superposition.tracing.interventions import (
    compact_columns,
    logit_diff_from_resid,
    project_onto,
    singular_directions,
    span_basis,
)
from tl_superposition.tracing.ioi_trace import IOITrace, ioi_roles
from tl_superposition.tracing.qk_svd import QKSVDCache


@dataclass
class CleanRun:
    """What the local edits read from the clean run, per prompt of the dataset.

    Attributes:
        resid_pre: ``blocks.{L}.hook_resid_pre``, stacked over layers.
        z: ``blocks.{L}.attn.hook_z``.
        scale: ``blocks.{L}.ln1.hook_scale``.
        main_source: the source each head attends to most at each destination.
        logit_diff: ``logit(IO) - logit(S)`` at END.
    """

    resid_pre: Float[Tensor, "n_prompts pos n_layers d_model"]
    z: Float[Tensor, "n_prompts pos n_layers n_heads d_head"]
    scale: Float[Tensor, "n_prompts pos n_layers"]
    main_source: Int[np.ndarray, "n_prompts n_layers n_heads pos"]
    logit_diff: Float[Tensor, " n_prompts"]


@torch.inference_mode()
def clean_run(model: HookedTransformer, dataset: IOIDataset, batch_size: int = 32) -> CleanRun:
    """Run ``model`` on ``dataset`` and keep what :func:`measure_edges` reads (on the CPU)."""
    n, P, n_layers = len(dataset), dataset.tokens.shape[1], model.cfg.n_layers
    dev = next(model.parameters()).device
    resid = torch.zeros(n, P, n_layers, model.cfg.d_model)
    z = torch.zeros(n, P, n_layers, model.cfg.n_heads, model.cfg.d_head)
    scale = torch.ones(n, P, n_layers)
    main = np.zeros((n, n_layers, model.cfg.n_heads, P), dtype=np.int64)
    ld = torch.zeros(n)
    keep = ("hook_resid_pre", "attn.hook_z", "ln1.hook_scale", "attn.hook_pattern")
    for lo in range(0, n, batch_size):
        part = dataset[lo : lo + batch_size]
        hi, p = lo + len(part), part.tokens.shape[1]
        final, cache = model.run_with_cache(
            part.tokens.to(dev), names_filter=lambda k: k.endswith(keep), stop_at_layer=n_layers
        )
        for L in range(n_layers):
            resid[lo:hi, :p, L] = cache[block_hook(L, "hook_resid_pre")].float().cpu()
            z[lo:hi, :p, L] = cache[block_hook(L, "attn.hook_z")].float().cpu()
            if block_hook(L, "ln1.hook_scale") in cache:
                scale[lo:hi, :p, L] = cache[block_hook(L, "ln1.hook_scale")][..., 0].float().cpu()
            pattern = cache[block_hook(L, "attn.hook_pattern")]  # [b, head, dest, src]
            main[lo:hi, L, :, :p] = pattern.argmax(-1).cpu().numpy()
        assert isinstance(final, Tensor)
        ld[lo:hi] = logit_diff_from_resid(
            model, final, part.end_pos, part.io_tokens, part.s_tokens
        )  # fmt: skip
    return CleanRun(resid_pre=resid, z=z, scale=scale, main_source=main, logit_diff=ld)


def _records(trace: IOITrace, clean: CleanRun, roles: list[list[str]]) -> pd.DataFrame:
    """The edge records of the traced firings as per-prompt graph edges, one per (prompt,
    edge, position): the record of largest write where several share them."""
    res = trace.result
    cols = ["firing_id", "layer", "head", "dest_pos", "src_pos", "dest_role", "src_role"]
    firings = pd.read_parquet(
        res.path("firings.parquet"), columns=[*cols, "components"], filters=[("traced", "==", True)]
    )
    records = pd.read_parquet(res.path("edge_records.parquet"))
    records = records.drop(columns=["layer", "head", "dest_pos", "src_pos"], errors="ignore")
    rec = prompt_edges(pd.DataFrame(firings[cols]), records, clean.main_source, roles)
    rec = rec.join(firings.set_index("firing_id")[["dest_pos", "src_pos", "components"]],
                   on="firing_id")  # fmt: skip
    rec = rec.assign(size=rec.weight.abs()).sort_values("size", ascending=False, kind="stable")
    rec = rec.drop_duplicates(["up", "down", "side", "prompt_id", "pos"]).drop(columns="size")
    return rec.sort_values(["prompt_id", "firing_id", "side"], kind="stable", ignore_index=True)


def edit_deltas(
    model: HookedTransformer,
    qk: QKSVDCache,
    clean: CleanRun,
    rec: pd.DataFrame,
    chunk: int = 256,
) -> Float[Tensor, "n d_model"]:
    """Each record's edit: the upstream head's output at the record's position, projected
    onto the span of the downstream firing's selected singular directions on the record's
    side (centred for LayerNorm models), divided by the downstream ``ln1.hook_scale`` there.

    The span of each (firing, side) is built once, for all the records that read it, ``chunk``
    spans at a time (each a ``d_model x d_head`` float64 basis).

    Args:
        rec: records with firing_id, prompt_id, pos, up_layer, up_head, layer, head,
            dest_pos, src_pos, side (``"src"``/``"dest"``) and components.
    """
    n = len(rec)
    out = torch.zeros(n, model.cfg.d_model, dtype=torch.float64)
    col = lambda k: torch.as_tensor(rec[k].to_numpy().astype(np.int64))  # noqa: E731
    prompt, pos, up_l, up_h = col("prompt_id"), col("pos"), col("up_layer"), col("up_head")
    side = torch.as_tensor((rec.side.to_numpy() == "dest").astype(np.int64))
    span_of = np.unique(rec.firing_id.to_numpy() * 2 + side.numpy(), return_inverse=True)[1]
    first = np.unique(span_of, return_index=True)[1]  # one record per span
    spans = rec.iloc[first]
    selected = torch.zeros(len(spans), model.cfg.d_head, dtype=torch.bool)
    for i, comps in enumerate(spans.components):
        selected[i, torch.tensor(np.asarray(comps, dtype=np.int64))] = True
    s_col = lambda k: torch.as_tensor(spans[k].to_numpy().astype(np.int64))  # noqa: E731
    layer, head, offset = s_col("layer"), s_col("head"), s_col("dest_pos") - s_col("src_pos")
    centred = model.cfg.normalization_type in ("LN", "LNPre")
    W_O = model.W_O.detach().cpu().to(torch.float64)
    zi = clean.z[prompt, pos, up_l, up_h].to(torch.float64)
    y = torch.einsum("ne,ned->nd", zi, W_O[up_l, up_h])
    order = np.argsort(span_of, kind="stable")
    bounds = np.searchsorted(span_of[order], np.arange(len(spans) + 1))
    for c0 in range(0, len(spans), chunk):
        c1 = min(c0 + chunk, len(spans))
        dirs = singular_directions(qk, layer[c0:c1], head[c0:c1], offset[c0:c1], side[first[c0:c1]])
        basis = span_basis(compact_columns(dirs, selected[c0:c1]), centred)
        mine = order[bounds[c0] : bounds[c1]]
        for r0 in range(0, len(mine), chunk):  # the gathered bases of at most chunk records
            rows = torch.as_tensor(mine[r0 : r0 + chunk])
            at = torch.as_tensor(span_of[rows.numpy()] - c0)
            out[rows] = project_onto(basis[at], y[rows])
    layer_of_rec = col("layer")
    return out / clean.scale[prompt, pos, layer_of_rec].to(torch.float64)[:, None]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def edit_rows(
    model: HookedTransformer,
    clean: CleanRun,
    dataset: IOIDataset,
    layer: int,
    rec: pd.DataFrame,
    delta: Float[Tensor, "n d_model"],
    rows_per_pass: int,
) -> pd.DataFrame:
    """Run one forward pass per (edge, prompt) of ``rec`` (all downstream heads in
    ``layer``), with every record of that edge in that prompt edited.

    Rows are batched by side (key-side edits need grouped-query keys ungrouped, query-side
    edits do not) and by prompt length (less padding).

    Returns:
        One row per (up, down, side, prompt_id): ``effect``, the change of the logit
        difference from the clean run.
    """
    keys = ["up", "down", "side", "prompt_id"]
    first = np.unique(rec.groupby(keys, sort=False).ngroup().to_numpy(), return_index=True)[1]
    groups = rec.iloc[first][keys]
    groups = groups.assign(length=dataset.end_pos.numpy()[groups.prompt_id.to_numpy()])
    groups = groups.sort_values(["side", "length"], kind="stable").reset_index(drop=True)
    groups = groups.drop(columns="length")
    row = rec[keys].merge(groups.reset_index(), on=keys, how="left")["index"].to_numpy()
    prompt = torch.tensor(groups.prompt_id.to_numpy())
    effects = torch.zeros(len(groups))
    rec_head = torch.as_tensor(rec["head"].to_numpy().astype(np.int64))
    rec_side = torch.as_tensor((rec.side.to_numpy() == "dest").astype(np.int64))
    rec_pos = torch.as_tensor(rec.pos.to_numpy().astype(np.int64))
    row_t = torch.tensor(row)
    dev = next(model.parameters()).device
    for sl in _chunks(len(groups), rows_per_pass):
        p = prompt[sl]
        length = int(dataset.end_pos[p].max()) + 1
        mine = ((row_t >= sl.start) & (row_t < sl.stop)).nonzero()[:, 0]
        edits = LocalEdits(
            layer=layer,
            row=row_t[mine] - sl.start,
            head=rec_head[mine],
            side=rec_side[mine],
            pos=rec_pos[mine],
            delta=delta[mine],
        )
        ld = run_local_edits(
            model,
            clean.resid_pre[p, :length, layer].to(dev),
            edits,
            dataset.end_pos[p],
            dataset.io_tokens[p],
            dataset.s_tokens[p],
        )
        effects[sl] = ld - clean.logit_diff[p]
    return groups.assign(effect=effects.numpy())


def prune_top_down(
    edges: pd.DataFrame,
    layer_of: Mapping[str, int],
    measure: Callable[[int, pd.DataFrame], pd.DataFrame],
    min_prompts: int,
    threshold: float,
    progress: bool = False,
) -> pd.DataFrame:
    """ACC++'s pruning, measuring only what can still matter (module docstring).

    Edges into the logits are kept. Going down the layers of the downstream nodes, the edges
    into a node that has a kept path to the logits and that occur in at least
    ``min_prompts`` prompts are measured (``measure(layer, edges)``, returning ``mean``,
    ``std`` and ``size`` indexed by (up, down, side)); those with ``|mean| >= threshold`` are
    kept, and their upstream nodes join the nodes with a kept path.

    Args:
        edges: up, down, side, n_prompts (the unified edges; ``down == "logits"`` for seeds).
        layer_of: each node's layer.
        measure: the intervention.
        min_prompts, threshold: the pruning rule.
        progress: a tqdm bar over layers.

    Returns:
        ``edges`` with ``effect_mean``, ``effect_std``, ``n_measured`` (NaN / 0 where not
        measured) and ``status``: ``root`` (into the logits, kept), ``kept``, ``weak``
        (measured, below the threshold), ``rare`` (fewer than ``min_prompts`` prompts) or
        ``unreached`` (its downstream node had no kept path to the logits).
    """
    edges = edges.copy()
    edges["effect_mean"], edges["effect_std"], edges["n_measured"] = np.nan, np.nan, 0
    is_root = (edges.down == ROOT).to_numpy()
    edges["status"] = np.where(is_root, "root", "unreached")
    rare = ~is_root & (edges.n_prompts < min_prompts).to_numpy()
    edges.loc[rare, "status"] = "rare"
    alive = set(edges.up[is_root])
    down_layer = np.array([layer_of[d] for d in edges.down], dtype=np.int64)
    layers = sorted({int(L) for L in down_layer[~is_root]}, reverse=True)
    index = edges.set_index(["up", "down", "side"]).index
    col = {k: edges.columns.get_loc(k) for k in ("effect_mean", "effect_std", "n_measured")}
    status = edges.columns.get_loc("status")
    for L in tqdm(layers, desc="local edits", unit="layer", disable=not progress):
        todo = (down_layer == L) & ~is_root & ~rare & edges.down.isin(alive).to_numpy()
        if not todo.any():
            continue
        stats = measure(L, edges.loc[todo, ["up", "down", "side"]])
        at = index.get_indexer(stats.index)
        edges.iloc[at, col["effect_mean"]] = stats["mean"].to_numpy()
        edges.iloc[at, col["effect_std"]] = stats["std"].fillna(0).to_numpy()
        edges.iloc[at, col["n_measured"]] = stats["size"].to_numpy()
        kept = stats.index[stats["mean"].abs().to_numpy() >= threshold]
        edges.iloc[at, status] = "weak"
        edges.iloc[index.get_indexer(kept), status] = "kept"
        alive |= {u for u, _, _ in kept}
    return edges


def measure_edges(
    model: HookedTransformer,
    qk: QKSVDCache,
    clean: CleanRun,
    dataset: IOIDataset,
    graph: UnifiedGraph,
    records: pd.DataFrame,
    cfg: CircuitConfig,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`prune_top_down` of the unified edges, each measured by local edits in every
    prompt where it occurs (:func:`edit_deltas`, :func:`edit_rows`)."""
    keys = ["up", "down", "side"]

    def measure(layer: int, wanted: pd.DataFrame) -> pd.DataFrame:
        rec = records.merge(wanted, on=keys)
        delta = edit_deltas(model, qk, clean, rec)
        per_prompt = edit_rows(model, clean, dataset, layer, rec, delta, cfg.rows_per_pass)
        return per_prompt.groupby(keys).effect.agg(["mean", "std", "size"])

    layer_of = dict(zip(graph.nodes.node, graph.nodes.layer))
    return prune_top_down(
        graph.edges, layer_of, measure, cfg.min_prompts, cfg.threshold, progress
    )  # fmt: skip


def extract_circuit(
    model: HookedTransformer,
    trace: IOITrace,
    config: CircuitConfig | None = None,
    qk: QKSVDCache | None = None,
    progress: bool = True,
) -> Circuit:
    """The pruned circuit of an IOI trace made with per-prompt seeds (module docstring).

    Args:
        model: the traced model.
        trace: an :class:`~tl_superposition.tracing.ioi_trace.IOITrace` with per-prompt
            seeds (``trace_ioi(..., seeds="per-prompt")``, the default).
        config: :class:`CircuitConfig`.
        qk: the QK decompositions of ``model`` (default: the trace's, else new ones).
        progress: tqdm bars.

    Returns:
        :class:`~tl_superposition.circuit.circuit.Circuit`.

    Raises:
        ValueError: a trace without per-prompt seeds, or one in which no prompt was seeded
            (the model answers none correctly).
    """
    cfg = config or CircuitConfig()
    if trace.seed_table is None:
        raise ValueError(
            "extract_circuit needs a trace with per-prompt seeds: "
            "trace_ioi(model, dataset, seeds='per-prompt')"
        )
    seeds = trace.seed_table
    n_graphs = int(seeds.prompt_id.nunique())
    if n_graphs == 0:
        raise ValueError("no prompt was seeded (the model answers none correctly): no circuit")
    cores = qk if qk is not None else trace.qk if trace.qk is not None else QKSVDCache(model)
    dataset = trace.dataset
    roles = role_labels(ioi_roles(dataset, model.tokenizer), len(dataset), dataset.tokens.shape[1])
    clean = clean_run(model, dataset, cfg.batch_size)
    records = _records(trace, clean, roles)
    head_edges = pd.DataFrame(records[["prompt_id", "up", "down", "side", "weight"]])
    per_prompt = pd.concat([seed_edges(seeds, roles), head_edges], ignore_index=True)
    graph = unify(per_prompt, n_graphs, cfg.node_frac)
    edges = measure_edges(model, cores, clean, dataset, graph, records, cfg, progress)
    params = {
        **cfg.to_dict(),
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
        "n_prompts": len(dataset),
        "n_prompt_graphs": n_graphs,
        "min_node_prompts": graph.min_node_prompts,
        "head_dla": trace.dla[sorted(set(seeds.prompt_id))].mean(0).tolist(),
        "model": model.cfg.model_name,
        "trace": {k: trace.summary.get(k) for k in ("config", "positions", "seed", "seeding")},
    }
    return Circuit.from_edges(graph.nodes, edges, params)
