"""Edge validation by interventions: does an edge carry a signal the downstream head uses?

Follows Franco & Crovella's single-edge interventions (arXiv 2410.00340, Sec. 6). For an edge
instance -- upstream head ``(l, h)`` writing at position ``p`` into one side of a downstream
firing -- take the upstream head's output there, ``y = z W_O``, and its projection ``P y`` onto
the span of the firing's selected singular directions on that side (``v_k`` of the sparse set
for the source side, ``u_k`` for the destination side; the ``d_model`` part, centred for
LayerNorm models). Three edits of ``blocks.{l}.hook_attn_out`` at ``p``, each run through the
rest of the model (:func:`~tl_superposition.tracing.interventions.run_output_edits`):

- *ablate*: subtract ``P y``;
- *boost*: add ``P y``;
- *random*: subtract the projection on the span of as many singular directions drawn at random
  from those *not* selected (all of them if fewer remain), the authors' control.

Each records the change of the downstream score (``hook_attn_scores``) and probability
(``hook_pattern``) at the firing's ``(dest, src)`` and of ``logit(IO) - logit(S)`` at END.
An instance is *validated* when ablating lowers the score, and lowers it more than the random
control does (by more than ``atol (1 + |score|)``, far above float rounding); an edge (upstream,
downstream, side) is validated when the means over its intervened instances are.

Edits of different instances and prompts share forward passes (one edit per batch row, rows
sorted by the upstream layer and started from the cached residual stream there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.hooks import block_hook
from tl_superposition.tracing.graph import head_name
from tl_superposition.tracing.interventions import (
    Readout,
    compact_columns,
    logit_diff_from_resid,
    project_onto,
    resid_pre_cache,
    run_output_edits,
    singular_directions,
    span_basis,
)
from tl_superposition.tracing.qk_svd import QKSVDCache

VARIANTS = ("ablate", "boost", "random")
# An instance is validated when d_ablate < min(0, d_random) - ATOL * (1 + |score|).
ATOL = 1e-4


@dataclass
class EdgeValidation:
    """The result of :func:`validate_edges`.

    Attributes:
        instances: one row per intervened edge instance (see :func:`validate_instances`).
        edges: one row per edge (upstream, downstream, side): means over its instances.
        summary: the share of edges validated and the sizes of the effects.
    """

    instances: pd.DataFrame
    edges: pd.DataFrame
    summary: dict[str, Any]

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write validation_instances.parquet, validation_edges.csv, validation.json."""
        out = Path(out_dir)
        paths = {
            "validation_instances.parquet": out / "validation_instances.parquet",
            "validation_edges.csv": out / "validation_edges.csv",
            "validation.json": out / "validation.json",
        }
        with atomic_path(paths["validation_instances.parquet"]) as tmp:
            self.instances.to_parquet(tmp, index=False)
        with atomic_path(paths["validation_edges.csv"]) as tmp:
            self.edges.to_csv(tmp, index=False)
        write_json_atomic(paths["validation.json"], self.summary)
        return paths


def sample_instances(
    edge_records: pd.DataFrame,
    max_instances: int,
    seed: int = 0,
    min_firings: int = 1,
    max_edges: int | None = None,
) -> pd.DataFrame:
    """Up to ``max_instances`` records of every edge (upstream, downstream, side), at random.

    Args:
        edge_records: ``edge_records.parquet`` of a trace.
        max_instances: records kept per edge (all when fewer).
        seed: seed of the draw (a ``numpy`` generator of its own).
        min_firings: only edges selected in at least this many firings.
        max_edges: keep a uniform random sample of this many of those edges (``None``: all),
            an unbiased estimate of the shares for traces with many edges.

    Returns:
        The kept records, sorted by prompt then firing.
    """
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    keys = ["up_layer", "up_head", "layer", "head", "side"]
    rng = np.random.default_rng(seed)
    rec = edge_records.sort_values([*keys, "firing_id"], kind="mergesort", ignore_index=True)
    group = rec.groupby(keys, sort=False).ngroup().to_numpy()
    size = np.bincount(group)[group]
    rank = np.empty(len(rec), dtype=np.int64)
    noise = rng.random(len(rec))
    order = np.lexsort((noise, group))
    rank[order] = np.arange(len(rec)) - np.searchsorted(group[order], group[order])
    keep = (rank < max_instances) & (size >= min_firings)
    eligible = np.unique(group[size >= min_firings])
    if max_edges is not None and len(eligible) > max_edges:
        chosen = rng.choice(eligible, size=max_edges, replace=False)
        keep &= np.isin(group, chosen)
    kept = pd.DataFrame(rec[keep])
    return kept.sort_values(["prompt_id", "firing_id"], kind="mergesort", ignore_index=True)


def random_complement(
    selected: Bool[Tensor, "n k"], generator: torch.Generator
) -> Bool[Tensor, "n k"]:
    """Per row, ``min(|selected|, k - |selected|)`` components drawn from the unselected."""
    score = torch.rand(selected.shape, generator=generator)
    score = torch.where(selected, torch.full_like(score, 2.0), score)
    rank = torch.argsort(torch.argsort(score, dim=1), dim=1)
    n_sel = selected.sum(1, keepdim=True)
    n_draw = torch.minimum(n_sel, selected.shape[1] - n_sel)
    return (rank < n_draw) & ~selected


@dataclass
class InstanceBatch:
    """The edge instances of one batch of prompts, as tensors (prompts within the batch).

    Attributes:
        prompt: prompt of each instance, within the batch.
        layer, head, dest, src: the downstream firing.
        side: 0 for the source side, 1 for the destination side.
        pos: where the upstream head writes (``src`` or ``dest``).
        up_layer, up_head: the upstream head.
        selected: ``[n, d_head]`` the firing's sparse set.
    """

    prompt: Int[Tensor, " n"]
    layer: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    dest: Int[Tensor, " n"]
    src: Int[Tensor, " n"]
    side: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    up_layer: Int[Tensor, " n"]
    up_head: Int[Tensor, " n"]
    selected: Bool[Tensor, "n d_head"]

    @classmethod
    def from_frame(cls, inst: pd.DataFrame, prompt_offset: int, d_head: int) -> InstanceBatch:
        """Read instances (edge-record columns plus ``components``) of one prompt batch."""
        col = lambda k: torch.as_tensor(inst[k].to_numpy().astype(np.int64))  # noqa: E731
        side = torch.as_tensor((inst.side.to_numpy() == "dest").astype(np.int64))
        selected = torch.zeros(len(inst), d_head, dtype=torch.bool)
        for i, comps in enumerate(inst.components):
            selected[i, torch.as_tensor(np.asarray(comps, dtype=np.int64))] = True
        dest, src = col("dest_pos"), col("src_pos")
        return cls(
            prompt=col("prompt_id") - prompt_offset,
            layer=col("layer"),
            head=col("head"),
            dest=dest,
            src=src,
            side=side,
            pos=torch.where(side == 0, src, dest),
            up_layer=col("up_layer"),
            up_head=col("up_head"),
            selected=selected,
        )


def edit_vectors(
    model: HookedTransformer,
    qk: QKSVDCache,
    z: Float[Tensor, "batch pos n_layers n_heads d_head"],
    it: InstanceBatch,
    generator: torch.Generator,
    chunk: int = 256,
) -> tuple[Tensor, Tensor, Tensor, Bool[Tensor, "n d_head"]]:
    """``P y`` on the selected span and on a random span of the same size, per instance.

    ``y = z W_O`` is the upstream head's output at the instance's position; the spans are
    those of the firing's singular directions on the instance's side (centred for LayerNorm
    models), the random one drawn by :func:`random_complement`. Instances are taken
    ``chunk`` at a time (each needs a ``d_model x d_head`` float64 matrix).

    Returns:
        ``(y, p_selected, p_random, random_mask)``, float64 on the CPU (``[n, d_model]``).
    """
    dev = z.device
    zi = z[it.prompt.to(dev), it.pos.to(dev), it.up_layer.to(dev), it.up_head.to(dev)]
    w_o = model.W_O[it.up_layer.to(dev), it.up_head.to(dev)]
    y = torch.einsum("ne,ned->nd", zi.to(torch.float64), w_o.to(torch.float64)).cpu()
    rand = random_complement(it.selected, generator)
    centred = model.cfg.normalization_type in ("LN", "LNPre")
    p_sel, p_rand = torch.zeros_like(y), torch.zeros_like(y)
    for c0 in range(0, len(y), chunk):
        r = slice(c0, c0 + chunk)
        offset = it.dest[r] - it.src[r]
        dirs = singular_directions(qk, it.layer[r], it.head[r], offset, it.side[r])
        p_sel[r] = project_onto(span_basis(compact_columns(dirs, it.selected[r]), centred), y[r])
        p_rand[r] = project_onto(span_basis(compact_columns(dirs, rand[r]), centred), y[r])
    return y, p_sel, p_rand, rand


def _clean_values(
    model: HookedTransformer,
    cache: dict[str, Tensor],
    it: InstanceBatch,
    logits: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Score, pattern and logit difference of each instance in the clean run."""
    n_layers = model.cfg.n_layers
    scores = torch.stack(
        [cache[block_hook(L, "attn.hook_attn_scores")] for L in range(n_layers)], 1
    )
    pattern = torch.stack([cache[block_hook(L, "attn.hook_pattern")] for L in range(n_layers)], 1)
    dev = scores.device
    idx = tuple(t.to(dev) for t in (it.prompt, it.layer, it.head, it.dest, it.src))
    ld = None
    if logits is not None:
        end, io, s = (t[it.prompt] for t in logits)
        ld = logit_diff_from_resid(model, cache["resid_final"][idx[0]], end, io, s)
    return scores[idx].float().cpu(), pattern[idx].float().cpu(), ld


def _run_rows(
    model: HookedTransformer,
    resid_pre: Float[Tensor, "batch pos n_layers d_model"],
    it: InstanceBatch,
    delta: Float[Tensor, "n d_model"],
    logits: tuple[Tensor, Tensor, Tensor] | None,
    rows_per_pass: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run one edit per instance, batched; rows are sorted by upstream layer."""
    n = len(it.prompt)
    score, pattern = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    ld = torch.full((n,), float("nan")) if logits is not None else None
    order = torch.argsort(it.up_layer, stable=True)
    dev = resid_pre.device
    for c0 in range(0, n, rows_per_pass):
        r = order[c0 : c0 + rows_per_pass]
        start = int(it.up_layer[r].min())
        readout = Readout(it.layer[r], it.head[r], it.dest[r], it.src[r])
        if logits is not None:
            end, io, s = logits
            p = it.prompt[r]
            readout.end_pos, readout.io_tokens, readout.s_tokens = end[p], io[p], s[p]
        vals = run_output_edits(
            model,
            resid_pre[it.prompt[r].to(dev), :, start],
            start,
            it.up_layer[r],
            it.pos[r],
            delta[r],
            readout,
        )
        score[r], pattern[r] = vals.score, vals.pattern
        if ld is not None and vals.logit_diff is not None:
            ld[r] = vals.logit_diff
    return score, pattern, ld


@torch.inference_mode()
def validate_instances(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_prompts pos"],
    instances: pd.DataFrame,
    end_pos: Int[Tensor, " n_prompts"] | None = None,
    io_tokens: Int[Tensor, " n_prompts"] | None = None,
    s_tokens: Int[Tensor, " n_prompts"] | None = None,
    prompts_per_batch: int = 16,
    rows_per_pass: int = 96,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate, boost and control every edge instance of ``instances``; measure the changes.

    Args:
        model: the traced model.
        tokens: the traced prompts (right-padded), indexed by ``prompt_id``.
        instances: edge records (``edge_records.parquet`` columns) with the downstream
            firing's ``components`` (its sparse set) added; any (upstream head, position,
            firing side) triple can be given, edge or not.
        end_pos, io_tokens, s_tokens: per prompt, for the logit difference (``None``: not
            measured, and runs stop after the downstream layer).
        prompts_per_batch: prompts whose clean activations are cached at once.
        rows_per_pass: edited rows per forward pass.
        seed: seed of the random control (a ``torch.Generator`` of its own).
        progress: a tqdm bar over prompt batches.

    Returns:
        ``instances`` with, per variant ``v`` in ablate/boost/random, ``d_score_v``,
        ``d_pattern_v`` and ``d_logit_diff_v`` (changes from the clean run), and
        ``score_clean``, ``pattern_clean``, ``logit_diff_clean``, ``n_selected``,
        ``n_random``, ``frac_removed`` (``|P y| / |y|``), ``frac_removed_random``,
        ``validated``.
    """
    out = instances.reset_index(drop=True).copy()
    n = len(out)
    res = {
        k: np.full(n, np.nan)
        for k in ("score_clean", "pattern_clean", "logit_diff_clean")
        + tuple(f"d_{m}_{v}" for v in VARIANTS for m in ("score", "pattern", "logit_diff"))
        + ("frac_removed", "frac_removed_random", "n_selected", "n_random")
    }
    qk = QKSVDCache(model)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt_ids = out.prompt_id.to_numpy()
    starts = range(0, int(prompt_ids.max()) + 1 if n else 0, prompts_per_batch)
    for lo in tqdm(starts, desc="validate", unit="batch", disable=not progress):
        rows = np.nonzero((prompt_ids >= lo) & (prompt_ids < lo + prompts_per_batch))[0]
        if not len(rows):
            continue
        resid_pre, cache = resid_pre_cache(model, tokens[lo : lo + prompts_per_batch].to(device))
        it = InstanceBatch.from_frame(out.iloc[rows], lo, model.cfg.d_head)
        z = torch.stack([cache[block_hook(L, "attn.hook_z")] for L in range(model.cfg.n_layers)], 2)
        y, p_sel, p_rand, rand = edit_vectors(model, qk, z, it, gen)
        logits = None
        if end_pos is not None and io_tokens is not None and s_tokens is not None:
            sl = slice(lo, lo + prompts_per_batch)
            logits = (end_pos[sl], io_tokens[sl], s_tokens[sl])
        clean = _clean_values(model, cache, it, logits)
        for v, delta in (("ablate", -p_sel), ("boost", p_sel), ("random", -p_rand)):
            score, pattern, ld = _run_rows(model, resid_pre, it, delta, logits, rows_per_pass)
            res[f"d_score_{v}"][rows] = (score - clean[0]).numpy()
            res[f"d_pattern_{v}"][rows] = (pattern - clean[1]).numpy()
            if ld is not None and clean[2] is not None:
                res[f"d_logit_diff_{v}"][rows] = (ld - clean[2]).numpy()
        res["score_clean"][rows], res["pattern_clean"][rows] = clean[0].numpy(), clean[1].numpy()
        if clean[2] is not None:
            res["logit_diff_clean"][rows] = clean[2].numpy()
        y_norm = y.norm(dim=1).clamp(min=1e-30)
        res["frac_removed"][rows] = (p_sel.norm(dim=1) / y_norm).numpy()
        res["frac_removed_random"][rows] = (p_rand.norm(dim=1) / y_norm).numpy()
        res["n_selected"][rows] = it.selected.sum(1).numpy()
        res["n_random"][rows] = rand.sum(1).numpy()
    for k, v in res.items():
        out[k] = v.astype(np.int64) if k.startswith("n_") else v
    tol = ATOL * (1 + np.abs(out.score_clean.to_numpy()))
    ablate, random = out.d_score_ablate.to_numpy(), out.d_score_random.to_numpy()
    out["validated"] = ablate < np.minimum(0, random) - tol
    return out


def summarise_edges(instances: pd.DataFrame) -> pd.DataFrame:
    """Per edge (upstream, downstream, side): means over its intervened instances.

    Returns:
        Columns upstream, downstream, side, n_instances, score_clean and the mean of every
        ``d_*`` column, rel_drop (mean ``d_score_ablate`` over mean ``|score_clean|``),
        frac_instances_validated, and validated (the means satisfy the instance criterion).
    """
    keys = ["up_layer", "up_head", "layer", "head", "side"]
    means = [c for c in instances.columns if c.startswith("d_")] + ["score_clean"]
    g = instances.assign(abs_score=instances.score_clean.abs()).groupby(keys, sort=True)
    out = pd.DataFrame(g[means].mean())
    out["n_instances"] = g.size()
    out["abs_score"] = g.abs_score.mean()
    out["frac_instances_validated"] = g.validated.mean()
    out = pd.DataFrame(out.reset_index())
    out["upstream"] = [head_name(L, h) for L, h in zip(out.up_layer, out.up_head)]
    out["downstream"] = [head_name(L, h) for L, h in zip(out.layer, out["head"])]
    out["rel_drop"] = out.d_score_ablate / out.abs_score.clip(lower=1e-30)
    tol = ATOL * (1 + out.abs_score)
    out["validated"] = out.d_score_ablate < np.minimum(0, out.d_score_random) - tol
    first = ["upstream", "downstream", "side", "n_instances", "validated", "rel_drop"]
    rest = [c for c in out.columns if c not in first and c not in keys and c != "abs_score"]
    return pd.DataFrame(out[first + rest])


def summarise(edges: pd.DataFrame, instances: pd.DataFrame, n_edges: int) -> dict[str, Any]:
    """The validation summary: shares validated and the sizes of the effects.

    Args:
        edges: :func:`summarise_edges`.
        instances: :func:`validate_instances`.
        n_edges: the number of edges of the trace (``edges.csv`` rows).
    """

    def mean(frame: pd.DataFrame, col: str) -> float:
        values = frame[col].to_numpy(dtype=np.float64)
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")

    return {
        "n_edges": int(n_edges),
        "n_edges_intervened": int(len(edges)),
        "n_instances": int(len(instances)),
        "frac_edges_validated": mean(edges, "validated"),
        "frac_instances_validated": mean(instances, "validated"),
        "mean_score_clean": mean(instances, "score_clean"),
        "mean_d_score_ablate": mean(instances, "d_score_ablate"),
        "mean_d_score_random": mean(instances, "d_score_random"),
        "mean_d_score_boost": mean(instances, "d_score_boost"),
        "median_rel_drop_edges": float(np.median(edges.rel_drop.to_numpy()))
        if len(edges)
        else float("nan"),
        "mean_d_pattern_ablate": mean(instances, "d_pattern_ablate"),
        "mean_d_pattern_random": mean(instances, "d_pattern_random"),
        "mean_d_logit_diff_ablate": mean(instances, "d_logit_diff_ablate"),
        "mean_d_logit_diff_random": mean(instances, "d_logit_diff_random"),
        "mean_d_logit_diff_boost": mean(instances, "d_logit_diff_boost"),
        "frac_instances_boost_raises": float((instances.d_score_boost > 0).mean())
        if len(instances)
        else float("nan"),
        "mean_frac_removed": mean(instances, "frac_removed"),
        "mean_frac_removed_random": mean(instances, "frac_removed_random"),
    }


def validate_edges(
    model: HookedTransformer,
    trace: Any,
    max_instances: int = 8,
    min_firings: int = 1,
    max_edges: int | None = None,
    logit_diff: bool = True,
    seed: int = 0,
    prompts_per_batch: int = 16,
    rows_per_pass: int = 96,
    progress: bool = True,
    tokens: Int[Tensor, "n_prompts pos"] | None = None,
) -> EdgeValidation:
    """Validate the edges of a trace by interventions (see the module docstring).

    Every edge of ``edges.csv`` selected in at least ``min_firings`` firings is intervened
    on in up to ``max_instances`` of its records, drawn at random (:func:`sample_instances`).

    Args:
        model: the traced model.
        trace: an :class:`~tl_superposition.tracing.ioi_trace.IOITrace` (its prompts give the
            tokens and the logit difference) or a
            :class:`~tl_superposition.tracing.trace.TraceResult` with ``tokens``.
        max_instances: records intervened on per edge.
        min_firings: edges selected in fewer firings are skipped.
        max_edges: validate a uniform random sample of this many edges (``None``: all).
        logit_diff: also measure ``logit(IO) - logit(S)`` (IOI traces only; runs then go
            through the whole model).
        seed: seed of the draws of instances and random controls.
        prompts_per_batch, rows_per_pass: batching (:func:`validate_instances`).
        progress: tqdm bars.
        tokens: the prompts, for a plain :class:`TraceResult`.

    Returns:
        :class:`EdgeValidation`; its summary also names the edge rule and the settings.

    Raises:
        ValueError: no tokens for a plain trace result, or ``max_instances < 1``.
    """
    result = getattr(trace, "result", trace)
    dataset = getattr(trace, "dataset", None)
    if tokens is None:
        if dataset is None:
            raise ValueError("validate_edges needs tokens=... for a plain TraceResult")
        tokens = dataset.tokens
    assert tokens is not None
    inst = sample_instances(result.edge_records, max_instances, seed, min_firings, max_edges)
    firings = pq.read_table(
        result.path("firings.parquet"),
        columns=["firing_id", "components"],
        filters=[("firing_id", "in", sorted(set(inst.firing_id.tolist())) or [-1])],
    ).to_pandas()
    inst = inst.merge(firings, on="firing_id", how="left")
    ioi = dataset if logit_diff else None
    table = validate_instances(
        model,
        tokens,
        inst,
        end_pos=None if ioi is None else ioi.end_pos,
        io_tokens=None if ioi is None else ioi.io_tokens,
        s_tokens=None if ioi is None else ioi.s_tokens,
        prompts_per_batch=prompts_per_batch,
        rows_per_pass=rows_per_pass,
        seed=seed,
        progress=progress,
    )
    edges = summarise_edges(table)
    summary = {
        "edge_rule": result.config.edge_rule,
        "max_instances": max_instances,
        "min_firings": min_firings,
        "max_edges": max_edges,
        "seed": seed,
        **summarise(edges, table, result.stats.get("n_edges", len(result.edges))),
    }
    return EdgeValidation(instances=table, edges=edges, summary=summary)
