"""What the gates do: gate maps per task, and heads active per (query, key) pair.

- :func:`gate_map` -- on a toy task, each head's mean gate (or gated attention) from the
  query of a task instance to its A token: one row per task, one column per head. A block
  without superposition shows one bright cell per row.
- :func:`active_head_histogram` / :func:`summarize_histogram` -- on any attention patterns
  ``[batch, heads, query, key]``, how many heads are active (value >= threshold) on each
  causal (query, key) pair, and the share of active pairs served by two or more heads: the
  co-attention the gate penalty discourages.
  Applied to a layer's own ``hook_pattern`` (before) and to a block's ``hook_gated_pattern``
  (after).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_superposition.toys.datasets import ToyDataset

GATE_VALUES = ("gate", "gated_pattern")


@torch.inference_mode()
def gate_map(
    model: Any,
    blocks: Mapping[int, Any],
    dataset: ToyDataset,
    layer: int = 0,
    value: str = "gate",
) -> pd.DataFrame:
    """Mean gate per task and head at the (query, A) pair of every asked task instance.

    Args:
        model: the toy model the blocks are spliced into.
        blocks: ``{layer: GatedAttentionBlock}``.
        dataset: task instances (``instances`` with ``query_pos >= 0``).
        layer: the block to read.
        value: ``"gate"`` (``hook_gate``) or ``"gated_pattern"`` (``hook_gated_pattern``).

    Returns:
        DataFrame indexed by task name, one column per block head (``"L.H"``).

    Raises:
        ValueError: ``layer`` has no block, or an unknown ``value``.
    """
    from tl_superposition.gated.splice import splice

    if layer not in blocks:
        raise ValueError(f"no block at layer {layer}")
    if value not in GATE_VALUES:
        raise ValueError(f"value must be one of {GATE_VALUES}")
    inst = dataset.instances[dataset.instances[:, 3] >= 0]
    got: dict[str, Tensor] = {}

    def save(t: Tensor, **_: Any) -> None:
        got["g"] = t

    device = next(model.parameters()).device
    with splice(model, blocks), blocks[layer].hooks(fwd_hooks=[(f"hook_{value}", save)]):
        model(dataset.tokens.to(device))
    g = got["g"].cpu()  # [batch, head, q, k]
    vals = g[inst[:, 0], :, inst[:, 3], inst[:, 1]]  # [n_inst, head]
    sums = torch.zeros(dataset.n_tasks, g.shape[1]).index_add_(0, inst[:, 4], vals)
    counts = torch.bincount(inst[:, 4], minlength=dataset.n_tasks).clamp(min=1)
    cols = [f"{layer}.{h}" for h in range(g.shape[1])]
    return pd.DataFrame((sums / counts[:, None]).numpy(), index=dataset.task_names, columns=cols)


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
