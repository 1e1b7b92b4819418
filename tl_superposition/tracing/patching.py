"""A check of a trace's head set: activation patching, and faithfulness under mean ablation.

Built on :mod:`tl_superposition.evaluation` (ABC prompts, :func:`head_patching_effects`,
:func:`important_heads`, :func:`precision_recall_f1`), it adds what is particular to a trace:

1. :func:`circuit_heads` -- the heads of a trace's edges (all of them, or the frequent ones);
2. :func:`circuit_faithfulness` -- the share of the clean logit difference that the model keeps
   when every head outside a circuit is mean-ablated (its ``hook_z`` replaced by its mean over
   the ABC prompts of the same template, per position, as Wang et al. do), against random
   circuits of the same size.

:func:`compare_with_patching` runs them on a trace and reports the precision, recall and F1
of the traced heads against the important heads. The circuit step
(:mod:`tl_superposition.circuit`) and its MIB-style scoring (counterfactual patching, CPR and
CMD: :mod:`tl_superposition.evaluation.faithfulness`) supersede this check for circuits; it
remains for a trace's raw head set. For GPT-2 small, Franco & Crovella's method has an F1 of
0.644 against Wang et al.'s path-patching circuit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.hooks import block_hook
from tl_superposition.evaluation.patching import (
    head_patching_effects,
    important_heads,
    logit_diff_metric,
    precision_recall_f1,
)
from tl_superposition.evaluation.prompts import abc_tokens
from tl_superposition.ioi import IOIDataset
from tl_superposition.tracing.graph import head_name, parse_heads

Head = tuple[int, int]


def circuit_heads(
    edges: pd.DataFrame, seeds: Iterable[str] = (), min_firings: int = 1
) -> set[Head]:
    """The heads of a traced circuit: both ends of every head-to-head edge, and the seeds.

    Args:
        edges: an ``edges.csv`` table (``upstream``/``downstream`` node names such as
            ``A9.6``, and ``n_firings``).
        seeds: seed node names (``"A9.6"``), which belong to the circuit even without edges.
        min_firings: only edges selected in at least this many traced firings count.
    """
    if min_firings > 1:
        edges = pd.DataFrame(edges[edges.n_firings >= min_firings])
    names = [*edges.upstream.tolist(), *edges.downstream.tolist(), *seeds]
    return set(parse_heads([n for n in names if isinstance(n, str) and n.startswith("A")]) or [])


@torch.inference_mode()
def template_means(
    model: HookedTransformer, dataset: IOIDataset, corrupted: Int[Tensor, "n_prompts pos"]
) -> Float[Tensor, "n_prompts pos n_layers n_heads d_head"]:
    """Each prompt's mean-ablation values: every head's ``hook_z`` averaged over the corrupted
    prompts of the same template (and ABBA/BABA order), per position."""
    dev = model.cfg.device
    _, cache = model.run_with_cache(
        corrupted.to(dev), names_filter=lambda name: name.endswith("hook_z")
    )
    z = torch.stack([cache["z", layer] for layer in range(model.cfg.n_layers)], 2)
    keys = [f"{t}|{p}" for t, p in zip(dataset.templates, dataset.prompt_types)]
    groups = pd.Series(range(len(keys))).groupby(keys).indices
    means = torch.empty_like(z)
    for rows in groups.values():
        idx = torch.as_tensor(rows, device=z.device)
        means[idx] = z[idx].mean(0, keepdim=True)
    return means


@torch.inference_mode()
def ablated_logit_diff(
    model: HookedTransformer,
    dataset: IOIDataset,
    keep: set[Head],
    means: Float[Tensor, "n_prompts pos n_layers n_heads d_head"],
) -> float:
    """Mean ``logit(IO) - logit(S)`` with every head outside ``keep`` mean-ablated."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    mask = torch.ones(n_layers, n_heads, dtype=torch.bool)
    for layer, head in keep:
        mask[layer, head] = False
    mask = mask.to(means.device)

    def hook(z: Tensor, hook: Any) -> Tensor:
        layer = int(hook.layer())
        return torch.where(mask[layer][None, None, :, None], means[:, :, layer], z)

    hooks: list[tuple[str | Callable, Callable]] = [
        (block_hook(layer, "attn.hook_z"), hook) for layer in range(n_layers)
    ]
    logits = model.run_with_hooks(dataset.tokens.to(model.cfg.device), fwd_hooks=hooks)
    return float(logit_diff_metric(dataset)(logits))


def circuit_faithfulness(
    model: HookedTransformer,
    dataset: IOIDataset,
    circuit: set[Head],
    corrupted: Int[Tensor, "n_prompts pos"],
    m_clean: float,
    n_random: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of the clean logit difference kept by ``circuit`` and by random circuits.

    Random circuits have as many heads as ``circuit``, drawn uniformly from all heads with
    ``random.Random(seed)``.

    Returns:
        ``faithfulness`` (circuit), ``random_mean``, ``random_std``, ``random`` (every draw),
        and ``none`` (every head ablated), each a ratio to ``m_clean``.
    """
    means = template_means(model, dataset, corrupted)
    all_heads = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)]
    rng = random.Random(seed)
    draws = [set(rng.sample(all_heads, min(len(circuit), len(all_heads)))) for _ in range(n_random)]
    score = lambda keep: ablated_logit_diff(model, dataset, keep, means) / m_clean  # noqa: E731
    rand = [score(d) for d in draws]
    return {
        "faithfulness": score(circuit),
        "random_mean": float(np.mean(rand)) if rand else float("nan"),
        "random_std": float(np.std(rand)) if rand else float("nan"),
        "random": rand,
        "none": score(set()),
    }


@dataclass
class PatchingComparison:
    """Result of :func:`compare_with_patching`.

    Attributes:
        effects: one row per head: ``head`` (``"L.H"``), ``layer``, ``head_index``,
            ``effect`` (normalised patching effect), ``important``, ``in_circuit``.
        summary: the figures (counts, precision/recall/F1, faithfulness, settings).
    """

    effects: pd.DataFrame
    summary: dict[str, Any]

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write patching_heads.csv and patching.json (atomically)."""
        out = Path(out_dir)
        paths = {
            "patching_heads.csv": out / "patching_heads.csv",
            "patching.json": out / "patching.json",
        }
        with atomic_path(paths["patching_heads.csv"]) as tmp:
            self.effects.to_csv(tmp, index=False)
        write_json_atomic(paths["patching.json"], self.summary)
        return paths


def effects_table(
    effects: Float[Tensor, "n_layers n_heads"], important: set[Head], circuit: set[Head]
) -> pd.DataFrame:
    """:attr:`PatchingComparison.effects` from the effects and the two head sets."""
    rows = [
        {
            "head": head_name(a, b),
            "layer": a,
            "head_index": b,
            "effect": float(effects[a, b]),
            "important": (a, b) in important,
            "in_circuit": (a, b) in circuit,
        }
        for a in range(effects.shape[0])
        for b in range(effects.shape[1])
    ]
    return pd.DataFrame(rows).sort_values("effect", key=abs, ascending=False, ignore_index=True)


def compare_with_patching(
    model: HookedTransformer,
    trace: Any,
    n_prompts: int | None = 32,
    threshold: float = 0.05,
    n_random: int = 5,
    seed: int = 0,
    effects: Float[Tensor, "n_layers n_heads"] | None = None,
    min_edge_firings: int = 1,
) -> PatchingComparison:
    """Compare a traced IOI circuit with the heads activation patching finds important.

    Args:
        model: the traced model.
        trace: an :class:`~tl_superposition.tracing.ioi_trace.IOITrace`.
        n_prompts: the first this many of the trace's prompts are patched (``None``: all);
            patching costs one forward pass per head.
        threshold: a head is important when its normalised effect is at least this in size.
        n_random: random circuits of the traced circuit's size for the faithfulness baseline.
        seed: seed of the ABC names and of the random circuits.
        effects: reuse effects of an earlier call on the same prompts (another edge rule).
        min_edge_firings: the circuit is made of the edges selected in at least this many
            traced firings (:func:`circuit_heads`); 1 takes every edge.

    Returns:
        :class:`PatchingComparison`.

    Raises:
        ValueError: ``threshold`` not in (0, 1], ``n_prompts < 1`` or ``n_random < 0``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if n_prompts is not None and n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1 or None, got {n_prompts}")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    dataset: IOIDataset = trace.dataset
    dataset = dataset[: len(dataset) if n_prompts is None else n_prompts]
    corrupted = abc_tokens(model, dataset, seed)
    m_clean: float | None = None
    m_corrupt: float | None = None
    if effects is None:
        effects, m_clean, m_corrupt = head_patching_effects(model, dataset, corrupted)
    if m_clean is None:
        metric = logit_diff_metric(dataset)
        with torch.inference_mode():
            m_clean = float(metric(cast(Tensor, model(dataset.tokens.to(model.cfg.device)))))
    important = important_heads(effects, threshold)
    circuit = circuit_heads(trace.edges, trace.summary.get("seeds", ()), min_edge_firings)
    faith = circuit_faithfulness(model, dataset, circuit, corrupted, m_clean, n_random, seed)
    summary = {
        "edge_rule": trace.result.config.edge_rule,
        "n_prompts": len(dataset),
        "threshold": threshold,
        "min_edge_firings": min_edge_firings,
        "logit_diff_clean": m_clean,
        "logit_diff_corrupt": m_corrupt,
        "n_important": len(important),
        "n_circuit": len(circuit),
        "n_both": len(important & circuit),
        **precision_recall_f1(circuit, important),
        **{f"faithfulness_{k}" if k != "faithfulness" else k: v for k, v in faith.items()},
        "important_heads": sorted(head_name(*h) for h in important),
        "circuit_heads": sorted(head_name(*h) for h in circuit),
    }
    return PatchingComparison(effects=effects_table(effects, important, circuit), summary=summary)
