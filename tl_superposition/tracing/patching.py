"""An independent check of a trace: head importance by activation patching, and faithfulness.

Three steps, each a function:

1. :func:`abc_tokens` -- the corrupted prompts of Wang et al. (2022, arXiv 2211.00593): the same
   templates with the IO, S1 and S2 names replaced by three different names (their *ABC*
   distribution), so that the name-moving signal is gone while the rest of the text stays.
2. :func:`head_patching_effects` -- every head's importance by TransformerLens's own activation
   patching (:func:`transformer_lens.patching.get_act_patch_attn_head_out_all_pos`): the clean
   head output (``hook_z``, all positions) patched into the corrupted run, scored by the mean
   ``logit(IO) - logit(S)`` at END and normalised so that 0 is the corrupted run and 1 the clean
   one. A head is *important* when ``|effect| >= threshold`` (:func:`important_heads`).
3. :func:`circuit_faithfulness` -- the share of the clean logit difference that the model keeps
   when every head outside a circuit is mean-ablated (its ``hook_z`` replaced by its mean over the
   ABC prompts of the same template, per position, as Wang et al. do), against random circuits
   of the same size.

:func:`compare_with_patching` runs the three on a trace and reports the precision, recall and F1
of the traced circuit's heads against the important heads. For GPT-2 small, Franco & Crovella's
method has an F1 of 0.644 against Wang et al.'s path-patching circuit (arXiv 2410.00340).
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
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

from tl_superposition._atomic import atomic_path, write_json_atomic
from tl_superposition.ioi import NAMES, IOIDataset, single_token_words
from tl_superposition.tracing.graph import head_name, parse_heads

Head = tuple[int, int]


def abc_tokens(
    model: HookedTransformer, dataset: IOIDataset, seed: int = 0
) -> Int[Tensor, "n_prompts pos"]:
    """The ABC corruption of ``dataset``: IO, S1 and S2 replaced by three different names.

    Each prompt gets three distinct names drawn (with ``random.Random(seed)``) from the
    single-token names that are neither its IO nor its S; the tokens elsewhere, and so every
    position, stay the same.

    Returns:
        ``[n_prompts, pos]`` token ids, like ``dataset.tokens``.

    Raises:
        ValueError: a name position does not hold the name's token (a tokenizer that merges a
            name with its neighbour), or fewer than five single-token names.
    """
    names = single_token_words(model.tokenizer, NAMES)
    if len(names) < 5:
        raise ValueError(f"the ABC corruption needs >= 5 single-token names, got {len(names)}")
    ids = {n: model.to_single_token(" " + n) for n in names}
    rng = random.Random(seed)
    out = dataset.tokens.clone()
    rows = torch.arange(len(dataset))
    if not (
        bool((out[rows, dataset.io_pos] == dataset.io_tokens).all())
        and bool((out[rows, dataset.s2_pos] == dataset.s_tokens).all())
    ):
        raise ValueError("IO/S2 positions do not hold the names' tokens; cannot corrupt them")
    for i in range(len(dataset)):
        pool = [n for n in names if n not in (dataset.io_names[i], dataset.s_names[i])]
        a, b, c = rng.sample(pool, 3)
        out[i, dataset.io_pos[i]] = ids[a]
        out[i, dataset.s1_pos[i]] = ids[b]
        out[i, dataset.s2_pos[i]] = ids[c]
    return out


def logit_diff_metric(
    dataset: IOIDataset,
) -> Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]:
    """The patching metric: mean ``logit(IO) - logit(S)`` at END over ``dataset``'s prompts."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(len(dataset), device=logits.device)
        end = logits[rows, dataset.end_pos.to(logits.device)]
        io = end[rows, dataset.io_tokens.to(logits.device)]
        s = end[rows, dataset.s_tokens.to(logits.device)]
        return (io - s).mean()

    return metric


@torch.inference_mode()
def head_patching_effects(
    model: HookedTransformer, dataset: IOIDataset, corrupted: Int[Tensor, "n_prompts pos"]
) -> tuple[Float[Tensor, "n_layers n_heads"], float, float]:
    """Every head's normalised patching effect on ``logit(IO) - logit(S)``.

    One forward pass per head over all of ``dataset`` (keep it to a few dozen prompts on a
    CPU). The effect is ``(m_patched - m_corrupt) / (m_clean - m_corrupt)`` where ``m`` is the
    mean logit difference at END and ``m_patched`` is the corrupted run with the head's clean
    ``hook_z`` at every position (TransformerLens's
    ``get_act_patch_attn_head_out_all_pos``).

    Returns:
        ``(effects, m_clean, m_corrupt)``: effects on the CPU, and the two means in logits.

    Raises:
        ValueError: clean and corrupted runs with the same metric (nothing to normalise by).
    """
    dev = model.cfg.device
    metric = logit_diff_metric(dataset)
    clean_logits, cache = model.run_with_cache(
        dataset.tokens.to(dev), names_filter=lambda name: name.endswith("hook_z")
    )
    m_clean = float(metric(cast(Tensor, clean_logits)))
    del clean_logits
    m_corrupt = float(metric(cast(Tensor, model(corrupted.to(dev)))))
    if abs(m_clean - m_corrupt) < 1e-6:
        raise ValueError("clean and corrupted logit differences are equal; no effect to scale")
    raw = get_act_patch_attn_head_out_all_pos(model, corrupted.to(dev), cache, metric)
    effects = (raw.float().cpu() - m_corrupt) / (m_clean - m_corrupt)
    return effects, m_clean, m_corrupt


def important_heads(effects: Float[Tensor, "n_layers n_heads"], threshold: float) -> set[Head]:
    """The heads whose normalised patching effect has ``|effect| >= threshold``."""
    layers, heads = torch.nonzero(effects.abs() >= threshold, as_tuple=True)
    return set(zip(layers.tolist(), heads.tolist()))


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


def precision_recall_f1(found: set[Head], truth: set[Head]) -> dict[str, float]:
    """Precision, recall and F1 of ``found`` against ``truth`` (0 where undefined)."""
    hits = len(found & truth)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


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
        (f"blocks.{layer}.attn.hook_z", hook) for layer in range(n_layers)
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
