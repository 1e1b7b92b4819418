"""Edge rules: which upstream heads count as edges into one side of one firing.

A rule sees, for each firing side (one row), the values ``m_j`` of the candidate upstream
heads: how much head ``j`` writes into the side's signal directions, in score units
(:func:`~tl_superposition.tracing.trace.upstream_writes`). It returns a boolean mask of the
heads kept. Both rules are pure functions of those numbers, vectorised over rows:

- :func:`paper_rule`, Franco & Crovella's rule as their code applies it (arXiv 2410.00340,
  ``full_tracing_build_graph.py``): the cutoff is the first value, in descending order, at
  which the running sum exceeds ``frac`` times the *net* sum of the row (negative values
  included); every head whose value is at least the cutoff is an edge, so ties at the cutoff
  are all kept.
- :func:`positive_rule`, this package's first rule: the shortest run of the largest positive
  values whose sum reaches ``frac`` times the sum of the positive values; ties at the cutoff
  are broken by column order.

Columns a rule must not select (heads of the firing's own layer or above, padding) are
passed as ``valid=False``: they take no part in the sums or the ranking.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_superposition.tracing.config import EDGE_RULES, EdgeRule
from tl_superposition.tracing.decompose import selected_mask, shortest_prefix


def _valid(values: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones_like(values, dtype=torch.bool)
    if valid.shape != values.shape:
        raise ValueError(
            f"valid must have the shape of values {tuple(values.shape)}, got {tuple(valid.shape)}"
        )
    return valid.to(values.device)


def paper_rule(
    values: Float[Tensor, "n m"],
    frac: float = 0.7,
    valid: Bool[Tensor, "n m"] | None = None,
) -> Bool[Tensor, "n m"]:
    """Franco & Crovella's edge rule: net-sum threshold, ties at the cutoff kept.

    For each row ``m`` (over its valid columns): ``t = frac * sum(m)``; sort ``m``
    descending; the cutoff is the first sorted value at which the cumulative sum is strictly
    greater than ``t``; the edges are every column with ``m_j >= cutoff``. A row whose
    cumulative sum never exceeds ``t`` (for example all zeros, or no valid column) has no
    edge.

    Args:
        values: one row per firing side, one column per candidate upstream head (score units).
        frac: the fraction of the net sum, in (0, 1] (the authors' 0.7).
        valid: columns that are candidates (default: all).

    Returns:
        The edge mask, same shape as ``values``.

    Raises:
        ValueError: ``frac`` outside (0, 1] or ``valid`` of another shape.
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    ok = _valid(values, valid)
    v = torch.where(ok, values, torch.full_like(values, -torch.inf))
    sorted_v = torch.sort(v, dim=1, descending=True).values
    finite = torch.isfinite(sorted_v)
    cs = torch.where(finite, sorted_v, torch.zeros_like(sorted_v)).cumsum(1)
    thresh = frac * torch.where(ok, values, torch.zeros_like(values)).sum(1, keepdim=True)
    above = (cs > thresh) & finite
    has_cut = above.any(1)
    first = above.to(torch.int8).argmax(1)
    cutoff = sorted_v.gather(1, first[:, None])
    return ok & (values >= cutoff) & has_cut[:, None]


def positive_rule(
    values: Float[Tensor, "n m"],
    frac: float = 0.7,
    valid: Bool[Tensor, "n m"] | None = None,
) -> Bool[Tensor, "n m"]:
    """The shortest run of the largest positive values reaching ``frac`` of their sum.

    For each row: ``P = sum_j max(m_j, 0)`` over valid columns; sort descending and keep the
    shortest prefix whose sum reaches ``frac * P`` (a relative rounding tolerance of
    :data:`~tl_superposition.tracing.decompose.REACH_RTOL` of ``sum |m|``). Negative values
    are never edges; a row without a positive value has none. Ties at the cutoff are broken
    by column order (the first columns win).

    Args, Returns, Raises: as :func:`paper_rule`.
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    ok = _valid(values, valid)
    positive = torch.where(ok, values.clamp(min=0), torch.zeros_like(values))
    total = positive.sum(1)
    order, count = shortest_prefix(positive, frac * total)
    count = torch.where(total > 0, count, torch.zeros_like(count))
    return selected_mask(order, count) & (positive > 0)


def select_edges(
    values: Float[Tensor, "n m"],
    rule: EdgeRule,
    frac: float = 0.7,
    valid: Bool[Tensor, "n m"] | None = None,
) -> Bool[Tensor, "n m"]:
    """Apply the edge rule named ``rule`` (``"paper"`` or ``"positive"``).

    Raises:
        ValueError: an unknown rule (or the errors of the rule).
    """
    if rule == "paper":
        return paper_rule(values, frac, valid)
    if rule == "positive":
        return positive_rule(values, frac, valid)
    raise ValueError(f"edge rule must be one of {EDGE_RULES}, got {rule!r}")
