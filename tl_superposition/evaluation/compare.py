"""Circuit-discovery methods side by side: faithfulness curves, CPR/CMD, F1 against patching.

Each method hands in a :class:`Ranking` of every head, found on the discovery prompts; this
module scores all of them on the same held-out prompts and counterfactuals
(:class:`~tl_superposition.evaluation.faithfulness.Faithfulness`). As MIB's results table
does (``print_results.py``), a method with signed scores is ranked by its signed scores for
CPR (the heads that support the answer first) and by their size for CMD (the heads that move
the answer most first); a ranking without sign uses one order for both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from tl_superposition.evaluation.faithfulness import MIB_FRACTIONS, Faithfulness, cpr_cmd
from tl_superposition.evaluation.patching import precision_recall_f1, ranking_from_scores

Head = tuple[int, int]


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
