"""What the gates do: heads active per (query, key) pair (gate maps of toy tasks:
:mod:`tl_superposition.toys.gates`).

- :func:`active_head_histogram` / :func:`summarize_histogram` -- on any attention patterns
  ``[batch, heads, query, key]``, how many heads are active (value >= threshold) on each
  causal (query, key) pair, and the share of active pairs served by two or more heads: the
  co-attention the gate penalty discourages.
  Applied to a layer's own ``hook_pattern`` (before) and to a block's ``hook_gated_pattern``
  (after).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def active_head_histogram(
    pattern: Float[Tensor, "batch n_heads pos pos"],
    threshold: float = 0.1,
    skip_first_key: bool = False,
) -> Tensor:
    """How many causal (query, key) pairs have 0, 1, 2, ... active heads.

    A head is *active* on a pair when its pattern value is at least ``threshold``. Histograms
    of several batches add up.

    Args:
        pattern: attention (or gated attention) patterns.
        threshold: activity threshold.
        skip_first_key: leave out key position 0 (BOS, where many heads park attention).

    Returns:
        int64 ``[n_heads + 1]``: entry ``j`` counts pairs with exactly ``j`` active heads.
    """
    n = pattern.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=pattern.device).tril()
    if skip_first_key:
        mask[:, 0] = False
    active = (pattern >= threshold).sum(dim=1)[:, mask]  # [batch, n_pairs]
    return torch.bincount(active.flatten().cpu(), minlength=pattern.shape[1] + 1)


def summarize_histogram(hist: Tensor) -> dict[str, float]:
    """Co-attention figures of an :func:`active_head_histogram`.

    Returns:
        ``{"active_pairs": pairs with >= 1 active head, "mean_heads": mean active heads per
        active pair, "share_multi": share of active pairs with >= 2 active heads,
        "max_heads": most heads active on one pair}``.
    """
    counts = hist.double()
    j = torch.arange(len(counts), dtype=torch.float64)
    active = counts[1:].sum()
    if active == 0:
        return {"active_pairs": 0, "mean_heads": 0.0, "share_multi": 0.0, "max_heads": 0}
    return {
        "active_pairs": int(active),
        "mean_heads": float((counts * j).sum() / active),
        "share_multi": float(counts[2:].sum() / active),
        "max_heads": int(j[counts > 0].max()),
    }
