"""Gate maps of gated attention blocks on toy tasks.

:func:`gate_map` gives, on a toy task, each head's mean gate (or gated attention) from the query
of a task instance to its A token: one row per task, one column per head. A block without
superposition shows one bright cell per row (Jermyn et al. 2023 / Keurti et al. 2024 figures).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from tl_superposition.gated.splice import splice
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
