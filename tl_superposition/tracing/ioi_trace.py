"""The IOI circuit trace: SVD-sparse signal tracing from the components that make the answer.

:func:`trace_ioi` is the main job of the package (``tl-superposition trace-ioi``). It follows
Franco & Crovella 2024 (arXiv 2410.00340) on IOI prompts (Wang et al. 2022): decompose every
firing of every head, seed the trace at END, and recurse upstream. By default it seeds and
labels as their follow-up ACC++ does (arXiv 2602.13483): each prompt the model answers
correctly is traced from its own seeds, the heads (through a source position) whose direct
logit attribution makes up ``logit(IO) - logit(S)``
(:class:`~tl_superposition.tracing.prompt_seeds.PromptSeeds`), and only the positions ACC++
names (IO, S1, S2, END, their neighbours, the first token, punctuation, the verb:
:func:`~tl_superposition.ioi.role_positions`) are traced. The earlier seedings remain:
``seeds="dla"`` (the heads with the largest mean DLA, for every prompt) and, for GPT-2 small,
the paper's name movers 9.6, 9.9 and 10.0 (``seeds="name-movers"``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import IOIDataset, role_positions
from tl_superposition.tracing.cache import BatchCache
from tl_superposition.tracing.config import TraceConfig
from tl_superposition.tracing.graph import check_heads, head_name, parse_heads
from tl_superposition.tracing.prompt_seeds import PromptSeeds
from tl_superposition.tracing.qk_svd import QKSVDCache
from tl_superposition.tracing.seeds import SeedChooser
from tl_superposition.tracing.trace import TraceResult, trace

GPT2_NAME_MOVERS: list[tuple[int, int]] = [(9, 6), (9, 9), (10, 0)]
PER_PROMPT = "per-prompt"


@torch.inference_mode()
def logit_attribution(
    model: HookedTransformer,
    z_end: Float[Tensor, "batch n_layers n_heads d_head"],
    resid_end: Float[Tensor, "batch d_model"],
    io_tokens: Tensor,
    s_tokens: Tensor,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "batch n_layers n_heads"]]:
    """Logit difference and each head's direct logit attribution to it, at one position.

    Args:
        model: the model.
        z_end: every head's ``hook_z`` at END.
        resid_end: the residual stream after the last block at END.
        io_tokens, s_tokens: per prompt, the IO and S token ids.

    Returns:
        ``(logit_diff, dla)`` on the CPU: ``logit(IO) - logit(S)`` from ``ln_final`` and the
        unembedding applied at END only, and ``(z W_O) . (W_U[:, IO] - W_U[:, S]) /
        ln_final.hook_scale`` per head (direction centred for LayerNorm models), in logits.
    """
    dev = resid_end.device
    io, s = io_tokens.to(dev), s_tokens.to(dev)
    scales: list[Tensor] = []
    if model.cfg.normalization_type is not None:
        with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda t, **_: scales.append(t))]):
            normed = model.ln_final(resid_end[:, None, :])[:, 0]
        scale = scales[0][:, 0, 0]
    else:
        normed, scale = resid_end, torch.ones(len(resid_end), device=dev)
    direction = (model.W_U[:, io] - model.W_U[:, s]).T  # [batch, d_model]
    ld = (normed * direction).sum(1) + model.b_U[io] - model.b_U[s]
    if model.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean(1, keepdim=True)
    # layer by layer: ``model.W_O`` would stack every layer's weights on each call
    per_layer = [
        torch.einsum("bhe,hed,bd->bh", z_end[:, L], block.attn.W_O, direction)
        for L, block in enumerate(model.blocks)
    ]
    dla = torch.stack(per_layer, 1) / scale[:, None, None]
    return ld.float().cpu(), dla.float().cpu()


@torch.inference_mode()
def head_logit_attribution(
    model: HookedTransformer, dataset: IOIDataset, batch_size: int = 32, progress: bool = False
) -> tuple[Float[Tensor, " n_prompts"], Float[Tensor, "n_prompts n_layers n_heads"]]:
    """Logit difference and each head's direct logit attribution to it, at END.

    A forward pass of its own (:func:`trace_ioi` gets the same figures from its trace's
    pass); see :func:`logit_attribution`.

    Returns:
        ``(logit_diff, dla)``.
    """
    device = next(model.parameters()).device
    n_layers = model.cfg.n_layers
    names = {block_hook(L, "attn.hook_z") for L in range(n_layers)}
    lds, dlas = [], []
    for lo in tqdm(
        range(0, len(dataset), batch_size),
        desc="logit attribution",
        unit="batch",
        disable=not progress,
    ):
        part = dataset[lo : lo + batch_size]
        resid, cache = model.run_with_cache(
            part.tokens.to(device), names_filter=lambda n: n in names, stop_at_layer=n_layers
        )
        rows = torch.arange(len(part), device=device)
        end = part.end_pos.to(device)
        z = torch.stack(
            [cache[block_hook(L, "attn.hook_z")][rows, end] for L in range(n_layers)], 1
        )
        resid_end = cast(Tensor, resid)[rows, end]
        ld, dla = logit_attribution(model, z, resid_end, part.io_tokens, part.s_tokens)
        lds.append(ld)
        dlas.append(dla)
    return torch.cat(lds), torch.cat(dlas)


def resolve_seeds(
    seeds: str | Iterable[Any] | None, n_seeds: int, n_layers: int, n_heads: int
) -> list[tuple[int, int]] | None:
    """Check a seed request against a model's shape, before any model work.

    Args:
        seeds: ``"dla"`` (the ``n_seeds`` heads with the largest mean DLA),
            ``"name-movers"`` (GPT-2 small's 9.6, 9.9, 10.0), or heads such as ``"9.6,9.9"``.
            (``None`` and ``"per-prompt"``, ACC++'s seeds, are resolved by :func:`trace_ioi`.)
        n_seeds: number of DLA seeds.
        n_layers, n_heads: the model's shape.

    Returns:
        The seed heads, or ``None`` when they are chosen by DLA.

    Raises:
        ValueError: a bad head list, a head out of range, name movers asked of a model that is
            not 12 x 12, or ``n_seeds`` outside ``1..n_layers * n_heads`` for DLA seeds.
    """
    if seeds is None or seeds == PER_PROMPT:
        return None
    if seeds == "dla":
        if not 1 <= n_seeds <= n_layers * n_heads:
            raise ValueError(
                f"n_seeds must be between 1 and the number of heads ({n_layers * n_heads}), "
                f"got {n_seeds}"
            )
        return None
    if seeds == "name-movers":
        if (n_layers, n_heads) != (12, 12):
            raise ValueError(
                "seeds='name-movers' are GPT-2 small's heads 9.6, 9.9, 10.0; this "
                f"model has {n_layers} layers x {n_heads} heads. "
                "Use seeds='dla' or a list such as '9.6,9.9'."
            )
        return list(GPT2_NAME_MOVERS)
    heads = parse_heads(seeds) or []
    if not heads:
        raise ValueError(
            "no seed heads given: pass 'per-prompt', 'dla', 'name-movers' or heads like '9.6,9.9'"
        )
    check_heads(heads, n_layers, n_heads)
    return heads


def resolve_seed_src(seed_src: str, seeds: str | Iterable[Any] | None) -> str:
    """``"IO"``, ``"S2"`` or ``"any"``: which END firings of the seeds start the trace.

    ``"auto"`` is ``"any"`` for DLA seeds and ``"IO"`` for given heads (see
    :func:`trace_ioi`); per-prompt seeds carry their own sources and ignore it.

    Raises:
        ValueError: an unknown value.
    """
    if seed_src == "auto":
        return "any" if seeds in (None, "dla", PER_PROMPT) else "IO"
    if seed_src not in ("IO", "S2", "any"):
        raise ValueError(f"seed_src must be 'IO', 'S2', 'any' or 'auto', got {seed_src!r}")
    return seed_src


def choose_seeds(
    model: HookedTransformer,
    dla: Float[Tensor, "n_prompts n_layers n_heads"],
    seeds: str | Iterable[Any] | None,
    n_seeds: int = 3,
) -> list[tuple[int, int]]:
    """Resolve the seed heads (see :func:`resolve_seeds`); DLA seeds come from ``dla``.

    Raises:
        ValueError: as :func:`resolve_seeds`.
    """
    heads = resolve_seeds(seeds, n_seeds, model.cfg.n_layers, model.cfg.n_heads)
    if heads is not None:
        return heads
    return top_heads(dla, n_seeds)


class DLASeeds(SeedChooser):
    """Seeds of the IOI trace, with the logit difference and DLA of every prompt.

    Observes each batch of the trace's own forward pass (no second pass): at END it takes
    every head's ``hook_z`` and the final residual stream and computes
    :func:`logit_attribution`. :meth:`choose` resolves ``seeds`` as :func:`choose_seeds`.

    Args:
        dataset: the prompts being traced.
        seeds, n_seeds: as :func:`resolve_seeds` (checked at once).
        n_layers, n_heads: the model's shape.
        margin: heads walked beyond ``n_seeds`` while the seeds are not known yet
            (:meth:`candidates`; default ``n_seeds``).

    Attributes:
        logit_diff: ``[n_prompts]`` logit(IO) - logit(S) at END (filled as batches pass).
        dla: ``[n_prompts, n_layers, n_heads]`` direct logit attribution.
    """

    def __init__(
        self,
        dataset: IOIDataset,
        seeds: str | Iterable[Any] | None,
        n_seeds: int,
        n_layers: int,
        n_heads: int,
        margin: int | None = None,
    ):
        self.fixed = resolve_seeds(seeds, n_seeds, n_layers, n_heads)
        self.dataset, self.n_seeds = dataset, n_seeds
        self.margin = min(n_seeds if margin is None else margin, n_layers * n_heads - n_seeds)
        self.logit_diff = torch.full((len(dataset),), float("nan"))
        self.dla = torch.full((len(dataset), n_layers, n_heads), float("nan"))

    @property
    def final_per_batch(self) -> bool:  # type: ignore[override]
        """Given seeds are final from the first batch; DLA seeds only after the last."""
        return self.fixed is not None

    def observed(self, lo: int, hi: int) -> dict[str, Tensor]:
        """The logit differences and DLA of prompts ``lo .. hi - 1``."""
        return {"logit_diff": self.logit_diff[lo:hi], "dla": self.dla[lo:hi]}

    def absorb(self, lo: int, hi: int, state: dict[str, Tensor]) -> None:
        """Take over :meth:`observed` of prompts ``lo .. hi - 1`` from another process."""
        self.logit_diff[lo:hi], self.dla[lo:hi] = state["logit_diff"], state["dla"]

    def observe(self, model: HookedTransformer, cache: BatchCache, lo: int, hi: int) -> None:
        """Logit difference and DLA of prompts ``lo .. hi - 1`` from the batch's cache."""
        part = self.dataset[lo:hi]
        dev = cache.z.device
        rows, end = torch.arange(hi - lo, device=dev), part.end_pos.to(dev)
        ld, dla = logit_attribution(
            model, cache.z[rows, end], cache.resid[rows, end], part.io_tokens, part.s_tokens
        )
        self.logit_diff[lo:hi], self.dla[lo:hi] = ld, dla

    def choose(self) -> list[tuple[int, int]]:
        """The given seeds, or the ``n_seeds`` heads with the largest mean DLA."""
        if self.fixed is not None:
            return list(self.fixed)
        return top_heads(self.dla, self.n_seeds)

    def candidates(self) -> list[tuple[int, int]]:
        """The given seeds, or the ``n_seeds + margin`` heads with the largest mean DLA over
        the prompts observed so far (a margin against a late change of the ranking)."""
        if self.fixed is not None:
            return list(self.fixed)
        seen = ~torch.isnan(self.logit_diff)
        return top_heads(self.dla[seen], self.n_seeds + self.margin)


def top_heads(dla: Float[Tensor, "n_prompts n_layers n_heads"], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest mean of ``dla`` over prompts, largest first."""
    mean = dla.mean(0)
    top = torch.topk(mean.flatten(), k).indices
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in top]


@dataclass
class IOITrace:
    """Result of :func:`trace_ioi`: the prompts, the trace, and a summary.

    Attributes:
        dataset: the prompts.
        prompts: one row per prompt (:meth:`IOIDataset.to_dataframe` plus ``logit_diff``).
        result: the trace (its files and tables).
        dla: ``[n_prompts, n_layers, n_heads]`` direct logit attribution at END.
        summary: the figures of ``summary.json``.
        seed_table: per-prompt seeds (:meth:`PromptSeeds.table`, ``seeds.csv``), or
            ``None`` when seeds are heads.
        qk: the QK decompositions the trace used (the circuit's interventions read them).
    """

    dataset: IOIDataset
    prompts: pd.DataFrame
    result: TraceResult
    dla: Float[Tensor, "n_prompts n_layers n_heads"]
    summary: dict[str, Any]
    seed_table: pd.DataFrame | None = None
    qk: QKSVDCache | None = None

    @property
    def firings(self) -> pd.DataFrame:
        """The firings table, with ``dest_role`` and ``src_role``."""
        return self.result.firings

    @property
    def edges(self) -> pd.DataFrame:
        """The edges table."""
        return self.result.edges

    @property
    def heads(self) -> pd.DataFrame:
        """The per-head table (firing counts, components, firings vs non-firings)."""
        return self.result.heads

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph (:meth:`TraceResult.graph`)."""
        return self.result.graph(min_firings)

    def save(
        self, out_dir: str | Path, plots: bool = True, validation: Any = None
    ) -> dict[str, Path]:
        """Write the trace's files, prompts.csv, paper_graph.graphml, summary.json, figures.

        Figures: ``signal_graph.png``, ``components.png`` and the self-contained
        ``signal_graph.html``
        (:mod:`~tl_superposition.tracing.html`), which shows ``validation`` (a
        :class:`~tl_superposition.tracing.validate.EdgeValidation`) where given; its tables
        are written too. Every file is written atomically. Returns the paths written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"prompts.csv": out / "prompts.csv"}
        with atomic_path(paths["prompts.csv"]) as tmp:
            self.prompts.to_csv(tmp, index=False)
        if self.seed_table is not None:
            paths["seeds.csv"] = out / "seeds.csv"
            with atomic_path(paths["seeds.csv"]) as tmp:
                self.seed_table.to_csv(tmp, index=False)
        graph = self.graph()
        paths.update(self.result.save(out))
        paths["paper_graph.graphml"] = out / "paper_graph.graphml"
        with atomic_path(paths["paper_graph.graphml"]) as tmp:
            nx.write_graphml(self.result.paper_graph(), tmp)
        if validation is not None:
            paths.update(validation.save(out))
        if plots:
            paths.update(self._save_plots(out, graph, validation))
        paths["summary.json"] = out / "summary.json"
        write_json_atomic(paths["summary.json"], self.summary)
        return paths

    def _save_plots(self, out: Path, graph: nx.MultiDiGraph, validation: Any) -> dict[str, Path]:
        from tl_superposition.tracing.html import write_html
        from tl_superposition.tracing.plots import plot_circuit, plot_component_usage

        names = ("signal_graph.png", "components.png", "signal_graph.html")
        paths = {name: out / name for name in names}
        seeds = self.summary["seeds"]
        title = f"IOI signal graph, {self.summary['model']} (seeds {', '.join(seeds)})"
        with atomic_path(paths["signal_graph.png"], suffix=".png") as tmp:
            plot_circuit(graph, tmp, seeds=seeds, title=title)
        usage = pd.read_parquet(
            self.result.path("firings.parquet"),
            columns=["layer", "head", "n_components", "components"],
        )
        with atomic_path(paths["components.png"], suffix=".png") as tmp:
            plot_component_usage(usage, tmp, d_head=self.summary["d_head"])
        with atomic_path(paths["signal_graph.html"], suffix=".html") as tmp:
            write_html(
                tmp,
                graph,
                seeds,
                heads=self.result.heads,
                usage=usage,
                d_head=self.summary["d_head"],
                validation=None if validation is None else validation.edges,
                title=title,
            )
        return paths


def ioi_roles(dataset: IOIDataset, tokenizer: Any = None) -> dict[str, Tensor]:
    """The named positions of each prompt.

    With a tokenizer, ACC++'s roles (:func:`~tl_superposition.ioi.role_positions`: IO, S1,
    S2, END, their neighbours, ``start``, ``punct``, ``verb``); without, IO, S1, S2 and END.
    ``BOS`` comes first when prompts have one (so ``start`` names it with ACC++'s roles).
    """
    roles = dict(dataset.positions()) if tokenizer is None else role_positions(dataset, tokenizer)
    if dataset.prepend_bos:
        roles = {"BOS": torch.zeros_like(dataset.end_pos), **roles}
    return roles


def role_mask(dataset: IOIDataset, roles: dict[str, Tensor]) -> Tensor:
    """``[n_prompts, pos]``: the positions some role names (what an ACC++ trace looks at)."""
    mask = torch.zeros(dataset.tokens.shape, dtype=torch.bool)
    rows = torch.arange(len(dataset))
    for where in roles.values():
        ok = where >= 0
        mask[rows[ok], where[ok]] = True
    return mask


def trace_ioi(
    model: HookedTransformer,
    dataset: IOIDataset,
    seeds: str | Iterable[Any] | None = PER_PROMPT,
    n_seeds: int = 3,
    seed_src: str = "auto",
    config: TraceConfig | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    qk: QKSVDCache | None = None,
    positions: str | None = None,
    beta: float = 1.0,
    correct_only: bool = True,
) -> IOITrace:
    """Trace the IOI circuit of ``model`` on ``dataset``, in one forward pass.

    The seeds come from the direct logit attribution computed on the trace's own forward
    pass: per prompt (ACC++, :class:`PromptSeeds`, the default) or, for ``"dla"``, the heads
    with the largest mean (:class:`DLASeeds`, chosen once every batch is decomposed).

    Args:
        model: a processed ``HookedTransformer`` (see :func:`tl_superposition.load_model`).
        dataset: IOI prompts (:func:`tl_superposition.ioi.make_ioi_dataset`).
        seeds: ``"per-prompt"`` (or ``None``; ACC++'s seeds of each correctly answered
            prompt), or heads for every prompt: see :func:`resolve_seeds`.
        n_seeds: number of DLA seeds (``seeds="dla"``).
        seed_src: which END firings of seed heads start the trace: ``"IO"`` (END -> IO, as
            in the paper), ``"S2"``, or ``"any"`` (every END firing). ``"auto"``: ``"any"`` for
            DLA seeds (a head can raise logit(IO) - logit(S) by attending to S and
            suppressing it), ``"IO"`` for given heads. Per-prompt seeds name their sources.
        config: thresholds and edge rule (:class:`TraceConfig`).
        progress: tqdm bars.
        out_dir: folder the trace's files are streamed to (see
            :func:`~tl_superposition.tracing.trace.trace`); ``None``: a temporary folder.
        qk: QK decompositions of ``model`` shared with other traces (see
            :func:`~tl_superposition.tracing.trace.trace`); ``None``: new ones.
        positions: ``"roles"`` (only the positions ACC++ names are traced) or ``"all"``;
            ``None``: ``"roles"`` for per-prompt seeds, ``"all"`` otherwise.
        beta: per-prompt seeds exceed this share of the logit difference
            (:func:`~tl_superposition.tracing.prompt_seeds.seed_mask`; ACC++: 1.0).
        correct_only: per-prompt seeds only for prompts whose END argmax is the IO token
            (ACC++); ``False`` also seeds the others (every prompt with a positive logit
            difference).

    Returns:
        :class:`IOITrace`; its ``firings`` carry ``dest_role``/``src_role`` (ACC++'s roles,
        BOS, or empty).

    Raises:
        ValueError: bad seeds, ``seed_src``, ``positions`` or ``beta``
            (:func:`resolve_seeds`, :func:`resolve_seed_src`), or a ``qk`` of another model
            or of other weights, checked before the model runs.
        NotImplementedError: an attention variant the decomposition does not cover.
    """
    cfg = config or TraceConfig()
    per_prompt = seeds is None or seeds == PER_PROMPT
    if positions is None:
        positions = "roles" if per_prompt else "all"
    if positions not in ("roles", "all"):
        raise ValueError(f"positions must be 'roles' or 'all', got {positions!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if per_prompt:
        chooser: DLASeeds | PromptSeeds = PromptSeeds(
            dataset, n_layers, n_heads, beta=beta, correct_only=correct_only
        )
    else:
        chooser = DLASeeds(dataset, seeds, n_seeds, n_layers, n_heads)
    seed_src = resolve_seed_src(seed_src, seeds)
    src_positions = {"IO": dataset.io_pos, "S2": dataset.s2_pos, "any": None}
    roles = ioi_roles(dataset, model.tokenizer)
    t0 = time.time()
    result = trace(
        model,
        dataset.tokens,
        chooser,
        seed_dest=dataset.end_pos,
        seed_src=None if per_prompt else src_positions[seed_src],
        lengths=dataset.lengths,
        config=cfg,
        progress=progress,
        out_dir=out_dir,
        roles=roles,
        qk=qk,
        positions=role_mask(dataset, roles) if positions == "roles" else None,
    )
    prompts = dataset.to_dataframe()
    if "worker_rank" in result.stats:  # under torchrun, rank 0 holds the trace
        return IOITrace(dataset, prompts, result, chooser.dla, dict(result.stats), None, result.qk)
    prompts["logit_diff"] = chooser.logit_diff.numpy()
    table = chooser.table() if isinstance(chooser, PromptSeeds) else None
    if isinstance(chooser, PromptSeeds):
        prompts["correct"] = chooser.correct.numpy()
    summary = _summary(
        model, dataset, result, chooser.logit_diff, chooser.dla, seed_src, time.time() - t0
    )
    summary["positions"] = positions
    if table is not None:
        summary |= _seed_summary(table, prompts)
    return IOITrace(
        dataset=dataset,
        prompts=prompts,
        result=result,
        dla=chooser.dla,
        summary=summary,
        seed_table=table,
        qk=result.qk,
    )


def _seed_summary(table: pd.DataFrame, prompts: pd.DataFrame) -> dict[str, Any]:
    """Figures of per-prompt seeds: prompts answered and seeded, seeds per prompt."""
    per_prompt = table.groupby("prompt_id").size().to_numpy()
    heads = table[table.kind == "head"]
    return {
        "seeding": PER_PROMPT,
        "n_correct": int(prompts.correct.sum()),
        "n_seeded_prompts": int(len(per_prompt)),
        "mean_seeds_per_prompt": float(per_prompt.mean()) if len(per_prompt) else 0.0,
        "seed_kinds": {str(k): int(v) for k, v in table.kind.value_counts().sort_index().items()},
        "n_seed_heads": int(heads.groupby(["layer", "head"]).ngroups),
    }


def _summary(
    model: HookedTransformer,
    dataset: IOIDataset,
    result: TraceResult,
    ld: Float[Tensor, " n_prompts"],
    dla: Float[Tensor, "n_prompts n_layers n_heads"],
    seed_src: str,
    seconds: float,
) -> dict[str, Any]:
    """The figures of an IOI trace that ``summary.json`` holds."""
    seed_heads = result.seeds
    f = pd.read_parquet(
        result.path("firings.parquet"),
        columns=["layer", "head", "src_role"],
        filters=[("traced", "==", True), ("dest_role", "==", "END")],
    )
    seed_mask = np.zeros(len(f), dtype=bool)
    for L, h in seed_heads:
        seed_mask |= (f.layer == L).to_numpy() & (f["head"] == h).to_numpy()
    seed_fire = f[seed_mask]
    stats = result.stats
    return {
        "model": model.cfg.model_name,
        "n_prompts": len(dataset),
        "mean_logit_diff": float(ld.mean()),
        "frac_logit_diff_positive": float((ld > 0).float().mean()),
        "n_firings": int(stats["n_firings"]),
        "median_n_components": float(stats["median_n_components"]),
        "seconds": round(seconds, 2),
        "seeds": [head_name(L, h) for L, h in seed_heads],
        "seed_mean_dla": [float(dla[:, L, h].mean()) for L, h in seed_heads],
        "seed_src": seed_src,
        "n_seed_firings": int(len(seed_fire)),
        "seed_firings_by_src_role": {
            str(k): int(v)
            for k, v in seed_fire.src_role.replace("", "other").value_counts().sort_index().items()
        },
        "n_traced_firings": int(stats["n_traced_firings"]),
        "n_edges": int(stats["n_edges"]),
        "n_edge_records": int(stats["n_edge_records"]),
        "n_nonfirings": int(stats["n_nonfirings"]),
        "max_abs_residual": float(stats["max_abs_residual"]),
        "d_head": model.cfg.d_head,
        "config": asdict(result.config),
        "prepend_bos": dataset.prepend_bos,
        "seed": dataset.meta.get("seed"),
        "prompt_type": dataset.meta.get("prompt_type"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of a trace summary (and of its circuit, if any)."""
    seeding = (
        f"seeds per prompt ({summary['n_seeded_prompts']} of {summary['n_prompts']} prompts "
        f"answered correctly and seeded, {summary['mean_seeds_per_prompt']:.1f} seeds each, "
        f"{summary['n_seed_heads']} heads)"
        if summary.get("seeding") == PER_PROMPT
        else f"seeds {', '.join(summary['seeds'])} ({summary['n_seed_firings']} seed firings at "
        f"END, by source: {summary['seed_firings_by_src_role']})"
    )
    lines = [
        f"model {summary['model']}: {summary['n_prompts']} prompts, mean logit diff "
        f"{summary['mean_logit_diff']:.3f} ({summary['frac_logit_diff_positive']:.0%} > 0)",
        f"firings {summary['n_firings']}, median components per firing "
        f"{summary['median_n_components']:.1f}, {seeding}",
        f"traced firings {summary['n_traced_firings']}, edges {summary['n_edges']}, "
        f"max |residual| {summary['max_abs_residual']:.2e}, {summary['seconds']:.1f} s",
    ]
    circuit = summary.get("circuit")
    if circuit and "skipped" in circuit:
        lines.append(f"circuit: none ({circuit['skipped']})")
    elif circuit:
        line = (
            f"circuit: {circuit['n_heads_circuit']} heads ({circuit['n_nodes']} nodes, "
            f"{circuit['n_edges']} edges; {circuit['n_edges_measured']} edges measured by "
            "local edits)"
        )
        if "faithfulness_heldout" in circuit:
            line += (
                f"; held-out faithfulness {circuit['faithfulness_heldout']:.3f} on "
                f"{circuit['heldout_prompts']} prompts (seed {circuit['heldout_seed']}, "
                "other names)"
            )
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "trace_ioi",
    "IOITrace",
    "DLASeeds",
    "ioi_roles",
    "top_heads",
    "logit_attribution",
    "head_logit_attribution",
    "choose_seeds",
    "resolve_seeds",
    "resolve_seed_src",
    "format_summary",
    "GPT2_NAME_MOVERS",
    "PER_PROMPT",
    "role_mask",
]
