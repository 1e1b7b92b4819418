"""The IOI circuit trace: SVD-sparse signal tracing from the name movers' END -> IO firings.

:func:`trace_ioi` is the main job of the package (``tl-superposition trace-ioi``). It follows
Franco & Crovella 2024 (arXiv 2410.00340) on IOI prompts (Wang et al. 2022): decompose every
firing of every head, seed the trace with the heads that move the IO name to END, and recurse
upstream. Seeds are, by default, the heads with the largest mean direct logit attribution
(DLA) to ``logit(IO) - logit(S)`` at END, which works for any model; for GPT-2 small the
paper's name movers 9.6, 9.9 and 10.0 can be asked for with ``seeds="name-movers"``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition._atomic import atomic_path, write_json_atomic
from tl_superposition.ioi import IOIDataset, logit_diff_from_logits
from tl_superposition.tracing.graph import check_heads, head_name, parse_heads, save_trace
from tl_superposition.tracing.trace import TraceConfig, TraceResult, trace

GPT2_NAME_MOVERS: list[tuple[int, int]] = [(9, 6), (9, 9), (10, 0)]


@torch.inference_mode()
def head_logit_attribution(
    model: HookedTransformer, dataset: IOIDataset, batch_size: int = 32, progress: bool = False
) -> tuple[Float[Tensor, " n_prompts"], Float[Tensor, "n_prompts n_layers n_heads"]]:
    """Logit difference and each head's direct logit attribution to it, at END.

    DLA of head ``(L, h)``: ``(z W_O)[END] . (W_U[:, IO] - W_U[:, S]) / ln_final.hook_scale[END]``
    (direction centred for LayerNorm models), in logits.

    Returns:
        ``(logit_diff, dla)``.
    """
    device = next(model.parameters()).device
    n_layers = model.cfg.n_layers
    names = {f"blocks.{L}.attn.hook_z" for L in range(n_layers)} | {"ln_final.hook_scale"}
    lds, dlas = [], []
    for lo in tqdm(
        range(0, len(dataset), batch_size),
        desc="logit attribution",
        unit="batch",
        disable=not progress,
    ):
        part = dataset[lo : lo + batch_size]
        logits, cache = model.run_with_cache(
            part.tokens.to(device), names_filter=lambda n: n in names
        )
        assert isinstance(logits, Tensor)  # the default return_type, "logits"
        lds.append(logit_diff_from_logits(logits, part))
        rows = torch.arange(len(part), device=device)
        end = part.end_pos.to(device)
        z = torch.stack([cache[f"blocks.{L}.attn.hook_z"][rows, end] for L in range(n_layers)], 1)
        direction = model.W_U[:, part.io_tokens.to(device)] - model.W_U[:, part.s_tokens.to(device)]
        direction = direction.T  # [batch, d_model]
        if model.cfg.normalization_type in ("LN", "LNPre"):
            direction = direction - direction.mean(1, keepdim=True)
        scale = cache["ln_final.hook_scale"][rows, end, 0]
        dla = torch.einsum("blhe,lhed,bd->blh", z, model.W_O, direction) / scale[:, None, None]
        dlas.append(dla.float().cpu())
    return torch.cat(lds), torch.cat(dlas)


def resolve_seeds(
    seeds: str | Iterable[Any] | None, n_seeds: int, n_layers: int, n_heads: int
) -> list[tuple[int, int]] | None:
    """Check a seed request against a model's shape, before any model work.

    Args:
        seeds: ``None`` or ``"dla"`` (the ``n_seeds`` heads with the largest mean DLA),
            ``"name-movers"`` (GPT-2 small's 9.6, 9.9, 10.0), or heads such as ``"9.6,9.9"``.
        n_seeds: number of DLA seeds.
        n_layers, n_heads: the model's shape.

    Returns:
        The seed heads, or ``None`` when they are chosen by DLA.

    Raises:
        ValueError: a bad head list, a head out of range, name movers asked of a model that is
            not 12 x 12, or ``n_seeds`` outside ``1..n_layers * n_heads`` for DLA seeds.
    """
    if seeds is None or seeds == "dla":
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
        raise ValueError("no seed heads given: pass 'dla', 'name-movers' or heads like '9.6,9.9'")
    check_heads(heads, n_layers, n_heads)
    return heads


def resolve_seed_src(seed_src: str, seeds: str | Iterable[Any] | None) -> str:
    """``"IO"``, ``"S2"`` or ``"any"``: which END firings of the seeds start the trace.

    ``"auto"`` is ``"any"`` for DLA seeds and ``"IO"`` otherwise (see :func:`trace_ioi`).

    Raises:
        ValueError: an unknown value.
    """
    if seed_src == "auto":
        return "any" if seeds is None or seeds == "dla" else "IO"
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
    mean = dla.mean(0)
    top = torch.topk(mean.flatten(), n_seeds).indices
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in top]


@dataclass
class IOITrace:
    """Result of :func:`trace_ioi`: the prompts, the trace, and a summary."""

    dataset: IOIDataset
    prompts: pd.DataFrame
    result: TraceResult
    dla: Float[Tensor, "n_prompts n_layers n_heads"]
    summary: dict[str, Any]

    @property
    def firings(self) -> pd.DataFrame:
        """The firings table, with ``dest_role`` and ``src_role``."""
        return self.result.firings

    @property
    def edges(self) -> pd.DataFrame:
        """The edges table."""
        return self.result.edges

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph (:meth:`TraceResult.graph`)."""
        return self.result.graph(min_firings)

    def save(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write prompts.csv, firings.parquet, edges.csv, graph.graphml, summary.json and PNGs.

        Every file is written atomically. Returns the paths written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"prompts.csv": out / "prompts.csv"}
        with atomic_path(paths["prompts.csv"]) as tmp:
            self.prompts.to_csv(tmp, index=False)
        graph = self.graph()
        paths.update(save_trace(out, self.firings, self.edges, graph))
        if plots:
            paths.update(self._save_plots(out, graph))
        paths["summary.json"] = out / "summary.json"
        write_json_atomic(paths["summary.json"], self.summary)
        return paths

    def _save_plots(self, out: Path, graph: nx.MultiDiGraph) -> dict[str, Path]:
        from tl_superposition.tracing.plots import plot_circuit, plot_component_usage

        paths = {name: out / name for name in ("circuit.png", "components.png")}
        seeds = self.summary["seeds"]
        with atomic_path(paths["circuit.png"], suffix=".png") as tmp:
            plot_circuit(
                graph,
                tmp,
                seeds=seeds,
                title=f"IOI signal graph, {self.summary['model']} (seeds {', '.join(seeds)})",
            )
        with atomic_path(paths["components.png"], suffix=".png") as tmp:
            plot_component_usage(self.firings, tmp, d_head=self.summary["d_head"])
        return paths


def _roles(dataset: IOIDataset, prompt_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    roles = np.full(len(pos), "", dtype=object)
    for name, where in dataset.positions().items():
        roles[where.numpy()[prompt_id] == pos] = name
    if dataset.prepend_bos:
        roles[pos == 0] = "BOS"
    return roles


def trace_ioi(
    model: HookedTransformer,
    dataset: IOIDataset,
    seeds: str | Iterable[Any] | None = None,
    n_seeds: int = 3,
    seed_src: str = "auto",
    config: TraceConfig | None = None,
    progress: bool = True,
) -> IOITrace:
    """Trace the IOI circuit of ``model`` on ``dataset``.

    Args:
        model: a processed ``HookedTransformer`` (see :func:`tl_superposition.load_model`).
        dataset: IOI prompts (:func:`tl_superposition.ioi.make_ioi_dataset`).
        seeds: see :func:`resolve_seeds` (default: top ``n_seeds`` heads by DLA).
        n_seeds: number of DLA seeds.
        seed_src: which END firings of the seed heads start the trace: ``"IO"`` (END -> IO, as
            in the paper), ``"S2"``, or ``"any"`` (every END firing). ``"auto"``: ``"any"`` for
            DLA seeds (a head can raise logit(IO) - logit(S) by attending to S and
            suppressing it), ``"IO"`` otherwise.
        config: thresholds (defaults: pattern 0.5, thresh 1.0, edge_thresh 0.7).
        progress: tqdm bars.

    Returns:
        :class:`IOITrace`; its ``firings`` also carry ``dest_role``/``src_role`` (IO, S1, S2,
        END, BOS or empty).

    Raises:
        ValueError: bad seeds or ``seed_src`` (:func:`resolve_seeds`,
            :func:`resolve_seed_src`), checked before the model runs.
        NotImplementedError: an attention variant the decomposition does not cover.
    """
    cfg = config or TraceConfig()
    resolve_seeds(seeds, n_seeds, model.cfg.n_layers, model.cfg.n_heads)  # fail before any work
    seed_src = resolve_seed_src(seed_src, seeds)
    src_positions = {"IO": dataset.io_pos, "S2": dataset.s2_pos, "any": None}
    t0 = time.time()
    ld, dla = head_logit_attribution(model, dataset, cfg.batch_size, progress)
    seed_heads = choose_seeds(model, dla, seeds, n_seeds)
    result = trace(
        model,
        dataset.tokens,
        seed_heads,
        seed_dest=dataset.end_pos,
        seed_src=src_positions[seed_src],
        lengths=dataset.lengths,
        config=cfg,
        progress=progress,
    )
    f = result.firings
    f["dest_role"] = _roles(dataset, f.prompt_id.to_numpy(), f.dest_pos.to_numpy())
    f["src_role"] = _roles(dataset, f.prompt_id.to_numpy(), f.src_pos.to_numpy())
    prompts = dataset.to_dataframe()
    prompts["logit_diff"] = ld.numpy()
    summary = _summary(model, dataset, result, ld, dla, seed_src, time.time() - t0)
    return IOITrace(dataset=dataset, prompts=prompts, result=result, dla=dla, summary=summary)


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
    f, seed_heads = result.firings, result.seeds
    seed_mask = np.zeros(len(f), dtype=bool)
    for L, h in seed_heads:
        seed_mask |= (f.layer == L).to_numpy() & (f["head"] == h).to_numpy()
    seed_fire = f[seed_mask & f.traced.to_numpy() & (f.dest_role == "END").to_numpy()]
    return {
        "model": model.cfg.model_name,
        "n_prompts": len(dataset),
        "mean_logit_diff": float(ld.mean()),
        "frac_logit_diff_positive": float((ld > 0).float().mean()),
        "n_firings": int(len(f)),
        "median_n_components": float(f.n_components.median()) if len(f) else float("nan"),
        "seconds": round(seconds, 2),
        "seeds": [head_name(L, h) for L, h in seed_heads],
        "seed_mean_dla": [float(dla[:, L, h].mean()) for L, h in seed_heads],
        "seed_src": seed_src,
        "n_seed_firings": int(len(seed_fire)),
        "seed_firings_by_src_role": {
            str(k): int(v)
            for k, v in seed_fire.src_role.replace("", "other").value_counts().items()
        },
        "n_traced_firings": int(f.traced.sum()),
        "n_edges": int(len(result.edges)),
        "max_abs_residual": float(f.residual.abs().max()) if len(f) else 0.0,
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
    """A few human-readable lines of a trace summary."""
    return (
        f"model {summary['model']}: {summary['n_prompts']} prompts, mean logit diff "
        f"{summary['mean_logit_diff']:.3f} ({summary['frac_logit_diff_positive']:.0%} > 0)\n"
        f"firings {summary['n_firings']}, median components per firing "
        f"{summary['median_n_components']:.1f}, seeds {', '.join(summary['seeds'])} "
        f"({summary['n_seed_firings']} seed firings at END, by source: "
        f"{summary['seed_firings_by_src_role']})\n"
        f"traced firings {summary['n_traced_firings']}, edges {summary['n_edges']}, "
        f"max |residual| {summary['max_abs_residual']:.2e}, {summary['seconds']:.1f} s"
    )


__all__ = [
    "trace_ioi",
    "IOITrace",
    "head_logit_attribution",
    "choose_seeds",
    "resolve_seeds",
    "resolve_seed_src",
    "format_summary",
    "GPT2_NAME_MOVERS",
]
