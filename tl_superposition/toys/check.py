"""The "solely encoded" check: is every task carried by one head on its own?

The success criterion of the gated-attention write-up (METHODS section 2): on a large
validation set (the authors: 100,000 samples)

1. every task (skip trigram) is still completed correctly at more than ``threshold`` (99%);
2. each task is *solely encoded* by one head: keeping that head and ablating every
   combination of the other heads (zero-ablating their outputs), the argmax of the logits
   stays correct on more than ``threshold`` of the task's asked positions.

A task passing 1 but not 2 is "distributed" (attention-head superposition); one failing 1
is "not learnt". The model's logits are used as they are, residual stream included (the
authors' script argmaxes the sum of the kept heads' outputs without the residual; with a
one-hot residual that adds 1 to the B token's logit, ours is the stricter reading). Every
asked position counts, including sequences holding several trigrams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from tl_superposition.toys.analysis import (
    SubsetAblation,
    solely_encoding_fraction,
    subset_ablation,
)
from tl_superposition.toys.datasets import ToyDataset


@dataclass
class SolelyEncodedReport:
    """Result of :func:`solely_encoded`.

    Attributes:
        table: one row per task: ``task_name``, ``accuracy`` (all heads kept), ``learnt``,
            ``status`` (``"solely encoded"``, ``"distributed"`` or ``"not learnt"``),
            ``head`` (the best solely-encoding head, ``""`` if none), ``heads`` (every head
            that solely encodes it), ``best_fraction`` (largest solely-encoding fraction).
        fractions: tasks x heads, the solely-encoding fraction of each head.
        heads_used: heads whose ablation alone lowers some task's accuracy by more than
            1 - ``threshold`` (the heads the model relies on).
        threshold: the criterion (0.99).
        n_samples: validation samples.
    """

    table: pd.DataFrame
    fractions: pd.DataFrame
    heads_used: list[str]
    threshold: float
    n_samples: int

    @property
    def removed(self) -> bool:
        """Every task learnt and solely encoded by some head (no attention superposition)."""
        return bool((self.table["status"] == "solely encoded").all())

    @property
    def distinct(self) -> bool:
        """The solely-encoding heads of different tasks are different heads."""
        heads = [h for h in self.table["head"] if h]
        return len(heads) == len(set(heads)) == len(self.table)

    def task_to_head(self) -> str:
        """``"task: head, ..."``, with ``distributed`` / ``not learnt`` where no head."""
        parts = []
        for _, r in self.table.iterrows():
            parts.append(f"{r['task_name']}: {r['head'] or r['status']}")
        return ", ".join(parts)


def solely_encoded(
    model: Any,
    dataset: ToyDataset,
    blocks: Mapping[int, Any] | None = None,
    threshold: float = 0.99,
    ablation: SubsetAblation | None = None,
) -> SolelyEncodedReport:
    """Run the solely-encoded check on a toy model, optionally with gated blocks spliced in.

    Args:
        model: a toy ``HookedTransformer`` (attention only, no normalisation).
        dataset: validation samples (the authors: 100,000, a seed not used for training).
        blocks: ``{layer: GatedAttentionBlock}`` replacing those layers.
        threshold: accuracy and solely-encoding threshold (0.99).
        ablation: the all-subset :func:`~tl_superposition.toys.analysis.subset_ablation` of
            the same model, blocks and dataset, if already computed.

    Raises:
        ValueError: more than :data:`~tl_superposition.toys.analysis.MAX_ABLATION_HEADS` heads.
    """
    ab = ablation or subset_ablation(model, dataset, blocks)
    n_tasks, labels, n = ab.n_tasks, ab.labels, len(ab.labels)
    acc_all = ab.accuracy()
    acc = acc_all[ab.mask_index(range(n))]
    frac = solely_encoding_fraction(ab.correct, ab.keep, ab.task, n_tasks)
    used = [
        label
        for i, label in enumerate(labels)
        if bool(
            ((acc - acc_all[ab.mask_index([j for j in range(n) if j != i])]) > 1 - threshold).any()
        )
    ]
    rows = []
    for t in range(n_tasks):
        passing = [labels[i] for i in range(n) if frac[t, i] > threshold]
        best = int(frac[t].argmax()) if n else -1
        learnt = bool(acc[t] > threshold)
        if not learnt:
            status = "not learnt"
        elif passing:
            status = "solely encoded"
        else:
            status = "distributed"
        rows.append(
            {
                "task_name": ab.task_names[t],
                "accuracy": float(acc[t]),
                "learnt": learnt,
                "status": status,
                "head": labels[best] if status == "solely encoded" else "",
                "heads": passing,
                "best_fraction": float(frac[t].max()) if n else float("nan"),
            }
        )
    fractions = pd.DataFrame(frac.numpy(), index=ab.task_names, columns=labels)
    return SolelyEncodedReport(pd.DataFrame(rows), fractions, used, threshold, len(dataset))


def spliced_accuracy(
    model: Any,
    dataset: ToyDataset,
    blocks: Mapping[int, Any] | None = None,
) -> pd.Series:
    """Accuracy per task with every head kept and ``blocks`` spliced in (``{layer: block}``).

    The fraction of each task's asked positions where the model's argmax is the target: the
    first condition of :func:`solely_encoded`, without the ablations.
    """
    from tl_superposition.toys.analysis import correct_under_ablation, heads_of

    keep = torch.ones(1, len(heads_of(model, dict(blocks or {}))), dtype=torch.bool)
    correct = correct_under_ablation(model, dataset, keep, blocks)[0]
    s, p = dataset.asked()
    task = dataset.task[s, p]
    hits = torch.bincount(task[correct], minlength=dataset.n_tasks).float()
    total = torch.bincount(task, minlength=dataset.n_tasks).float()
    return pd.Series((hits / total).tolist(), index=dataset.task_names, name="accuracy")
