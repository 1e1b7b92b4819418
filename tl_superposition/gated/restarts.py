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
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from tl_superposition.core.checkpoint import identity_mismatches, load_checkpoint, save_checkpoint
from tl_superposition.core.training import Trainer
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.sources import TensorBatches
from tl_superposition.gated.train import (
    GatedTrainConfig,
    WithGate,
    block_objective,
    gated_loss,
)

log = logging.getLogger(__name__)

#: The checkpoint file of a restarts run, in its ``checkpoint_dir``.
CHECKPOINT_FILE = "restarts_checkpoint.pt"


#: The columns of :attr:`RestartsResult.history`.
HISTORY_COLUMNS = ["step", "epoch", "restart", "loss", "mse", "penalty"]


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


def _identity(
    blocks: Sequence[GatedAttentionBlock], cfg: GatedTrainConfig, source: TensorBatches
) -> dict[str, Any]:
    keep = ("alpha", "alpha_warmup_steps", "lr", "gate_p", "penalty_pairs")  # not the length
    return {
        "block_config": {**blocks[0].cfg.to_dict(), "seed": None},
        "seeds": [b.cfg.seed for b in blocks],
        "train_config": {k: getattr(cfg, k) for k in keep},
        "source": source.describe(),
    }


_NAMES = {
    "block_config": "block config",
    "seeds": "restart seeds",
    "train_config": "training settings",
    "source": "data source",
}


def _resume(path: Path, identity: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
    """Check the checkpoint at ``path`` against ``identity``; restore ``trainer``; return its
    state (stacked parameters, running loss sums)."""
    saved, state = load_checkpoint(path, "gated_restarts")
    mismatch = identity_mismatches(saved, identity, _NAMES)
    if mismatch:
        raise ValueError(
            f"{path} is a checkpoint of another restarts run ({', '.join(mismatch)} differ); "
            "use a new folder or the same settings"
        )
    trainer.load_state_dict(state)
    return state


def train_gated_restarts(
    blocks: Sequence[GatedAttentionBlock],
    source: TensorBatches,
    config: GatedTrainConfig | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> RestartsResult:
    """Train ``blocks`` (R restarts of one configuration) together and choose one.

    Args:
        blocks: R untrained blocks of the same config (e.g. ``from_layer(..., seed=s)`` for R
            seeds); their weights are replaced by the trained ones.
        source: the training pairs in memory (the objective that chooses is computed on them).
        config: the training settings of every restart (``max_steps``, ``alpha`` warm-up, ...).
        progress: tqdm bar over steps.
        checkpoint_dir: folder for ``restarts_checkpoint.pt`` (every
            ``config.checkpoint_every_steps`` steps and at the end); a checkpoint there is
            resumed, and a resumed run ends with the weights of an uninterrupted one.

    Returns:
        :class:`RestartsResult`.

    Raises:
        ValueError: no block, blocks whose configs differ in more than the seed, or a
            checkpoint of another run (other blocks, seeds, settings or data) in
            ``checkpoint_dir``.
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
    sums = torch.zeros(len(blocks), 3)
    n_sum = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    identity = _identity(blocks, cfg, source)
    if ckpt is not None and ckpt.is_file():
        state = _resume(ckpt, identity, trainer)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        sums, n_sum = state["sums"].clone(), int(state["n_sum"])
        log.info("resuming %s at step %d of %d", ckpt, trainer.step, total)

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        named = {f"block.{k}": v for k, v in (p | b).items()}
        return functional_call(base, named, (x,))  # type: ignore[return-value]

    batched = vmap(one, in_dims=(0, 0, None))
    bar = tqdm(total=total, initial=trainer.step, desc=f"gated x{len(blocks)}",
               disable=not progress, leave=False)  # fmt: skip
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
                trainer.log({"step": trainer.step, "epoch": epoch, "restart": r, "loss": loss,
                             "mse": mse, "penalty": pen})  # fmt: skip
            sums.zero_()
            n_sum = 0
        bar.update(1)
        if ckpt is not None and trainer.due(cfg.checkpoint_every_steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {**trainer.state_dict(), "sums": sums.clone(), "n_sum": n_sum,
                     "params": {k: v.detach().clone() for k, v in params.items()}}  # fmt: skip
            save_checkpoint(ckpt, "gated_restarts", identity, state)
    bar.close()
    with torch.no_grad():
        for r, block in enumerate(blocks):
            for name, p in block.named_parameters():
                p.copy_(params[name][r])
            block.eval()
    objectives = [block_objective(b, source.x, source.y, cfg) for b in blocks]
    chosen = min(range(len(blocks)), key=lambda r: objectives[r]["loss"])
    history = pd.DataFrame(trainer.history, columns=HISTORY_COLUMNS)
    return RestartsResult(list(blocks), objectives, chosen, history, trainer.step)
