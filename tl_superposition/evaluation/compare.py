"""Circuit-discovery methods side by side: faithfulness curves, CPR/CMD, F1 against patching.

Each method hands in a :class:`Ranking` of every head, found on the discovery prompts; this
module scores all of them on the same held-out prompts and counterfactuals
(:class:`~tl_superposition.evaluation.faithfulness.Faithfulness`). As MIB's results table
does (``print_results.py``), a method with signed scores is ranked by its signed scores for
CPR (the heads that support the answer first) and by their size for CMD (the heads that move
the answer most first); a ranking without sign uses one order for both.

:func:`compare_methods` runs the whole comparison for a circuit from
:func:`~tl_superposition.circuit.extract_circuit`: the baselines' rankings on the discovery
prompts (exact activation patching by noising and by denoising, EAP, EAP-IG, random orders),
every ranking scored on the held-out prompts, and the F1 of each method's circuit against
the heads patching finds important (:class:`Comparison`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.evaluation.attribution import eap_ig_scores, eap_scores
from tl_superposition.evaluation.faithfulness import MIB_FRACTIONS, Faithfulness, cpr_cmd
from tl_superposition.evaluation.patching import (
    head_patching_effects,
    important_heads,
    precision_recall_f1,
    ranking_from_scores,
)
from tl_superposition.evaluation.prompts import abc_tokens
from tl_superposition.ioi import IOIDataset

Head = tuple[int, int]


class HeadCircuit(Protocol):
    """What :func:`compare_methods` reads of a circuit (a
    :class:`~tl_superposition.circuit.Circuit` has it): its heads, and every head ranked."""

    def head_set(self) -> set[Head]: ...

    def ranking(self, signed: bool = False) -> list[Head]: ...


@dataclass
class Ranking:
    """One method's order of every head.

    Attributes:
        name: the method (``svd_trace``, ``eap``, ...).
        signed: the order for CPR (heads supporting the answer first).
        absolute: the order for CMD (largest effect first); the same as ``signed`` for a
            method without sign.
        seconds: the time the method took on the discovery prompts.
        circuit: the method's own circuit where it has one (the SVD trace's pruned heads).
        draws: for random rankings, every draw (``signed`` is then the first).
    """

    name: str
    signed: list[Head]
    absolute: list[Head]
    seconds: float = 0.0
    circuit: set[Head] | None = None
    draws: list[list[Head]] = field(default_factory=list)

    @classmethod
    def from_scores(
        cls, name: str, scores: Float[Tensor, "n_layers n_heads"], seconds: float = 0.0
    ) -> Ranking:
        """A ranking from per-head scores where positive means "supports the answer"."""
        return cls(
            name=name,
            signed=ranking_from_scores(scores, absolute=False),
            absolute=ranking_from_scores(scores, absolute=True),
            seconds=seconds,
        )

    @classmethod
    def random(cls, n_layers: int, n_heads: int, n_draws: int = 5, seed: int = 0) -> Ranking:
        """``n_draws`` uniformly random orders (``random.Random(seed)``), scored by their mean."""
        heads = [(L, h) for L in range(n_layers) for h in range(n_heads)]
        rng = random.Random(seed)
        draws = [rng.sample(heads, len(heads)) for _ in range(n_draws)]
        return cls(name="random", signed=draws[0], absolute=draws[0], draws=draws)

    def top(self, k: int) -> set[Head]:
        """The first ``k`` heads by the absolute order (the method's circuit of size ``k``)."""
        return set(self.absolute[:k])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def score_rankings(
    faith: Faithfulness,
    rankings: Sequence[Ranking],
    fractions: Sequence[float] = MIB_FRACTIONS,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Faithfulness curves of every ranking, and CPR / CMD per method.

    Returns:
        ``(curves, scores)``: curves with method, order (``signed``/``absolute``/``draw{i}``),
        fraction, n_heads, faithfulness; scores ``{"cpr": {method: v}, "cmd": {method: v}}``.
        For random rankings CPR and CMD are the means over the draws.
    """
    parts, cpr, cmd = [], {}, {}
    for r in rankings:
        if r.draws:
            orders = {f"draw{i}": d for i, d in enumerate(r.draws)}
        elif r.signed == r.absolute:
            orders = {"signed": r.signed}
        else:
            orders = {"signed": r.signed, "absolute": r.absolute}
        got = {}
        for order, heads in orders.items():
            curve = faith.curve(heads, fractions).assign(method=r.name, order=order)
            got[order] = cpr_cmd(curve.fraction, curve.faithfulness)
            parts.append(curve)
        if r.draws:
            cpr[r.name] = float(np.mean([v[0] for v in got.values()]))
            cmd[r.name] = float(np.mean([v[1] for v in got.values()]))
        else:
            cpr[r.name] = got["signed"][0]
            cmd[r.name] = got.get("absolute", got["signed"])[1]
    cols = ["method", "order", "fraction", "n_heads", "faithfulness"]
    return pd.DataFrame(pd.concat(parts, ignore_index=True)[cols]), {"cpr": cpr, "cmd": cmd}


def f1_table(
    rankings: Sequence[Ranking], size: int, references: Mapping[str, set[Head]]
) -> pd.DataFrame:
    """Precision, recall and F1 of each method's circuit against each reference head set.

    A method's circuit is its own (``Ranking.circuit``) where it has one, else its top
    ``size`` heads (for random rankings, the mean over draws).

    Returns:
        One row per (method, reference): method, reference, n_heads, precision, recall, f1.
    """
    rows = []
    for r in rankings:
        circuits = [set(d[:size]) for d in r.draws] if r.draws else [r.circuit or r.top(size)]
        for ref_name, ref in references.items():
            scores = [precision_recall_f1(c, ref) for c in circuits]
            rows.append(
                {
                    "method": r.name,
                    "reference": ref_name,
                    "n_heads": len(circuits[0]),
                    **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]},
                }
            )
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """What :func:`compare_methods` measured.

    Attributes:
        rankings: every method's :class:`Ranking` (with its time on the discovery prompts).
        curves: faithfulness at MIB's sizes (:func:`score_rankings`).
        cpr, cmd: per method.
        f1: :func:`f1_table` at the circuit's size, against ``references``.
        references: the important heads by denoising and by noising.
        effects: per direction, the normalised patching effects they come from.
        circuit_faithfulness: the held-out faithfulness of the circuit's own heads.
        discovery_faithfulness: the same on the discovery prompts (what a choice between
            circuit settings may look at; the held-out figure is what to report).
        reference_faithfulness: the held-out faithfulness of each reference set.
        m_full, m_empty: the held-out metric with no head and every head patched.
    """

    rankings: list[Ranking]
    curves: pd.DataFrame
    cpr: dict[str, float]
    cmd: dict[str, float]
    f1: pd.DataFrame
    references: dict[str, set[Head]]
    effects: dict[str, Tensor]
    circuit_faithfulness: float
    discovery_faithfulness: float
    reference_faithfulness: dict[str, float]
    m_full: float
    m_empty: float

    def table(self) -> pd.DataFrame:
        """One row per method: cpr, cmd, seconds, and F1 against each reference."""
        f1 = self.f1.pivot(index="method", columns="reference", values="f1")
        rows = [
            {"method": r.name, "cpr": self.cpr[r.name], "cmd": self.cmd[r.name],
             "seconds": r.seconds,
             **{f"f1_{ref}": float(f1.loc[r.name, ref]) for ref in f1.columns}}
            for r in self.rankings
        ]  # fmt: skip
        return pd.DataFrame(rows)


def compare_methods(
    model: HookedTransformer,
    discovery: IOIDataset,
    heldout: IOIDataset,
    circuit: HeadCircuit,
    circuit_seconds: float = 0.0,
    patching_prompts: int = 64,
    ig_steps: int = 5,
    random_draws: int = 5,
    threshold: float = 0.05,
    seed: int = 0,
    fractions: Sequence[float] = MIB_FRACTIONS,
) -> Comparison:
    """The SVD-sparse circuit against today's methods, MIB-style (module docstring).

    Args:
        model: the model.
        discovery: the prompts the circuit was found on (and the baselines rank heads on).
        heldout: the prompts everything is scored on (other seed, other names:
            :func:`~tl_superposition.evaluation.prompts.ioi_split`).
        circuit: the circuit (its ranking is ``svd_trace``); circuit_seconds: its time.
        patching_prompts: exact activation patching runs on the first this many discovery
            prompts (one pass per layer and head; EAP and EAP-IG use every prompt).
        ig_steps: EAP-IG's points.
        random_draws: random orders averaged.
        threshold: a head is important when its patching effect is at least this in size.
        seed: seed of the ABC counterfactuals and of the random orders (the held-out
            counterfactuals use ``seed + 1``).
        fractions: the circuit sizes, as fractions of every head.

    Raises:
        ValueError: ``patching_prompts`` outside ``1 .. len(discovery)``, or an error of the
            steps.
    """
    if not 1 <= patching_prompts <= len(discovery):
        raise ValueError(
            f"patching_prompts must be in 1 .. {len(discovery)} (the discovery prompts), "
            f"got {patching_prompts}"
        )
    cf_discovery = abc_tokens(model, discovery, seed=seed)
    cf_heldout = abc_tokens(model, heldout, seed=seed + 1)
    rankings = [
        Ranking("svd_trace", circuit.ranking(signed=True), circuit.ranking(), circuit_seconds,
                circuit=circuit.head_set())
    ]  # fmt: skip
    small = discovery[:patching_prompts]
    effects = {}
    for direction in ("noising", "denoising"):
        (eff, _, _), s = timed(
            lambda d=direction: head_patching_effects(model, small, cf_discovery[: len(small)], d)
        )
        effects[direction] = eff
        name = "activation_patching" + ("" if direction == "noising" else "_denoising")
        rankings.append(Ranking.from_scores(name, eff, s))
    scores, s = timed(lambda: eap_scores(model, discovery, cf_discovery))
    rankings.append(Ranking.from_scores("eap", scores, s))
    scores, s = timed(lambda: eap_ig_scores(model, discovery, cf_discovery, ig_steps))
    rankings.append(Ranking.from_scores("eap_ig", scores, s))
    rankings.append(Ranking.random(model.cfg.n_layers, model.cfg.n_heads, random_draws, seed))
    faith = Faithfulness.prepare(model, heldout, cf_heldout)
    curves, mib = score_rankings(faith, rankings, fractions)
    references = {d: important_heads(e, threshold) for d, e in effects.items()}
    return Comparison(
        rankings=rankings,
        curves=curves,
        cpr=mib["cpr"],
        cmd=mib["cmd"],
        f1=f1_table(rankings, len(circuit.head_set()), references),
        references=references,
        effects=effects,
        circuit_faithfulness=faith.score(circuit.head_set()),
        discovery_faithfulness=Faithfulness.prepare(model, discovery, cf_discovery).score(
            circuit.head_set()
        ),
        reference_faithfulness={d: faith.score(h) for d, h in references.items()},
        m_full=faith.m_full,
        m_empty=faith.m_empty,
    )
