"""Batched restarts: R gated blocks trained at once, the one with the lowest objective kept.

A gated block's training has local minima (on the toy settings a seed that misses the
one-trigram-per-head solution also ends at a higher objective), so a result should not hang
on one seed. :func:`train_gated_restarts` trains R blocks of one shape (each from its own
seed) as one module: their parameters are stacked (``torch.func.stack_module_state``) and one
``vmap``-ed forward and one backward serve all R, each restart with its own loss on the same
batches. Adam is element-wise, so each restart follows the steps it would take alone (to float
tolerance). The block kept is the one with the lowest training objective
(:func:`~tl_superposition.gated.train.block_objective` on the training pairs), chosen by the
objective alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from tl_superposition.core.training import Trainer
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.sources import TensorBatches
from tl_superposition.gated.train import (
    GatedTrainConfig,
    WithGate,
    block_objective,
    gated_loss,
)


@dataclass
class RestartsResult:
    """What :func:`train_gated_restarts` returns.

    Attributes:
        blocks: the R trained blocks, in the order of the blocks given.
        objectives: per restart, the training objective ``{"loss", "mse", "penalty"}`` on the
            training pairs after training.
        chosen: the index of the restart with the lowest objective ``loss``.
        history: per logged step and restart: step, epoch, restart, loss, mse, penalty (means
            over the steps since the last row).
        steps: optimisation steps taken (the same for every restart).
    """

    blocks: list[GatedAttentionBlock]
    objectives: list[dict[str, float]]
    chosen: int
    history: pd.DataFrame
    steps: int

    @property
    def block(self) -> GatedAttentionBlock:
        """The chosen block."""
        return self.blocks[self.chosen]


def train_gated_restarts(
    blocks: Sequence[GatedAttentionBlock],
    source: TensorBatches,
    config: GatedTrainConfig | None = None,
    progress: bool = True,
) -> RestartsResult:
    """Train ``blocks`` (R restarts of one configuration) together and choose one.

    Args:
        blocks: R untrained blocks of the same config (e.g. ``from_layer(..., seed=s)`` for R
            seeds); their weights are replaced by the trained ones.
        source: the training pairs in memory (the objective that chooses is computed on them).
        config: the training settings of every restart (``max_steps``, ``alpha`` warm-up, ...).
        progress: tqdm bar over steps.

    Returns:
        :class:`RestartsResult`.

    Raises:
        ValueError: no block, or blocks whose configs differ in more than the seed.
    """
    cfg = config or GatedTrainConfig()
    shapes = [{**b.cfg.to_dict(), "seed": None} for b in blocks]
    if not blocks or any(s != shapes[0] for s in shapes):
        raise ValueError("give at least one block, all of one config (but the seed)")
    params, buffers = stack_module_state(list(blocks))  # type: ignore[arg-type]
    base = WithGate(copy.deepcopy(blocks[0]).to("meta"))  # forward = forward_with_gate
    total = cfg.epochs * source.n_batches
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    trainer = Trainer(torch.optim.Adam(list(params.values()), lr=cfg.lr), total)
    device = next(iter(params.values())).device

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        named = {f"block.{k}": v for k, v in (p | b).items()}
        return functional_call(base, named, (x,))  # type: ignore[return-value]

    batched = vmap(one, in_dims=(0, 0, None))
    rows: list[dict[str, Any]] = []
    sums = torch.zeros(len(blocks), 3)
    n_sum = 0
    bar = tqdm(total=total, desc=f"gated x{len(blocks)}", disable=not progress, leave=False)
    while not trainer.finished:
        epoch, index = divmod(trainer.step, source.n_batches)
        x, y = source.batch(epoch, index)
        x, y = x.to(device), y.to(device)

        def step_fn(step: int, x: Tensor = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
            alpha = torch.tensor(cfg.alpha_at(step), device=device)
            out, gate = batched(params, buffers, x)
            terms = torch.stack([torch.stack(gated_loss(o, y, g, cfg, alpha))
                                 for o, g in zip(out, gate, strict=True)])  # fmt: skip
            return terms[:, 0].sum(), terms.detach()

        _, terms = trainer.run_step(step_fn)
        sums += terms.cpu()
        n_sum += 1
        if trainer.step % cfg.log_every_steps == 0 or trainer.finished:
            for r, (loss, mse, pen) in enumerate((sums / n_sum).tolist()):
                rows.append({"step": trainer.step, "epoch": epoch, "restart": r, "loss": loss,
                             "mse": mse, "penalty": pen})  # fmt: skip
            sums.zero_()
            n_sum = 0
        bar.update(1)
    bar.close()
    with torch.no_grad():
        for r, block in enumerate(blocks):
            for name, p in block.named_parameters():
                p.copy_(params[name][r])
            block.eval()
    objectives = [block_objective(b, source.x, source.y, cfg) for b in blocks]
    chosen = min(range(len(blocks)), key=lambda r: objectives[r]["loss"])
    return RestartsResult(list(blocks), objectives, chosen, pd.DataFrame(rows), trainer.step)
