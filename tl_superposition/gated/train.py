"""Training a :class:`~tl_superposition.gated.block.GatedAttentionBlock`.

Loss (the gated-attention write-up; METHODS section 2)::

    loss = MSE(block(x), target) + alpha * mean_{b, q, k} ( sum_h gate[b, h, q, k] ** p ) ** (1 / p)

with ``p = 0.6`` (an L0.6 quasi-norm of the gates across heads, which favours one open gate
per (query, key) pair over several half-open ones) and the MSE averaged over every element.
Adam, ``epochs`` passes over a :class:`~tl_superposition.gated.sources.BatchSource`. The
authors' settings: 2H/3ST alpha 0.5, lr 5e-4; 3H/4ST alpha 0.1, lr 5e-4; 4H/5ST alpha 0.3,
lr 1e-3; 1000 epochs of 100 batches of 1000 sequences.

Checkpoints (``checkpoint.pt`` in ``checkpoint_dir``, written atomically) hold the block, the
optimiser state, the step and the loss history; a new call with the same folder resumes from
the last one and ends with bitwise the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_superposition.core import distributed
from tl_superposition.core.checkpoint import load_checkpoint, save_checkpoint
from tl_superposition.core.config import Config
from tl_superposition.core.training import Trainer
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.sources import BatchSource

if TYPE_CHECKING:
    from tl_superposition.gated.cross_layer import CrossLayerGatedBlocks

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PENALTY_PAIRS = ("all", "causal")

#: The authors' settings per toy setting: (alpha, lr); 1000 epochs each.
AUTHORS_SETTINGS: dict[str, tuple[float, float]] = {
    "2H/3ST": (0.5, 5e-4),
    "3H/4ST": (0.1, 5e-4),
    "4H/5ST": (0.3, 1e-3),
}


@dataclass
class GatedTrainConfig(Config):
    """Settings of :func:`train_gated_block`.

    Attributes:
        alpha: weight of the gate penalty.
        alpha_warmup_steps: raise the penalty weight linearly from 0 to ``alpha`` over this
            many steps (as SAELens's ``l1_warm_up_steps``), so the block fits before the
            penalty can shut its gates; 0 (default): the authors' constant ``alpha``.
        lr: Adam learning rate.
        epochs: passes over the source.
        max_steps: stop after this many steps in all (None: ``epochs x n_batches``).
        gate_p: exponent of the quasi-norm across heads (0.6).
        penalty_pairs: ``"all"`` -- average over every (query, key) pair, future keys too, as
            the authors' code does; ``"causal"`` -- only keys at or before the query.
        log_every_steps: steps per history row (losses averaged over them).
        checkpoint_every_steps: steps between checkpoints (0: only at the end).
        compile: run the forward and loss through ``torch.compile`` (after a compilation
            of about a minute; whether it is faster depends on the machine -- on a loaded
            2-core CPU it ran slower than eager, see ``benchmarks/bench_gated.py --compile``).
    """

    alpha: float = 0.5
    alpha_warmup_steps: int = 0
    lr: float = 5e-4
    epochs: int = 1000
    max_steps: int | None = None
    gate_p: float = 0.6
    penalty_pairs: str = "all"
    log_every_steps: int = 100
    checkpoint_every_steps: int = 5000
    renamed: ClassVar[dict[str, str]] = {
        "log_every": "log_every_steps", "checkpoint_every": "checkpoint_every_steps"
    }  # fmt: skip
    compile: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.lr <= 0:
            raise ValueError(f"need alpha >= 0 and lr > 0, got {self.alpha}, {self.lr}")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be >= 1")
        if not 0 < self.gate_p <= 2:
            raise ValueError(f"gate_p must be in (0, 2], got {self.gate_p}")
        if self.penalty_pairs not in PENALTY_PAIRS:
            raise ValueError(f"penalty_pairs must be one of {PENALTY_PAIRS}")
        if self.log_every_steps < 1 or self.checkpoint_every_steps < 0:
            raise ValueError("log_every_steps must be >= 1 and checkpoint_every_steps >= 0")
        if self.alpha_warmup_steps < 0:
            raise ValueError(f"alpha_warmup_steps must be >= 0, got {self.alpha_warmup_steps}")

    def alpha_at(self, step: int) -> float:
        """The penalty weight of step ``step`` (0-based): ``alpha`` after the warm-up."""
        if step >= self.alpha_warmup_steps:
            return self.alpha
        return self.alpha * step / self.alpha_warmup_steps


@dataclass
class GatedTrainResult:
    """What :func:`train_gated_block` did.

    Attributes:
        history: rows ``step, epoch, loss, mse, penalty, seconds``.
        steps: steps done in all (resumed ones included).
        resumed_from: the step the run resumed from (0 for a fresh start).
        seconds: wall time of this call.
    """

    history: pd.DataFrame
    steps: int
    resumed_from: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def gate_penalty(
    gate: Float[Tensor, "batch n_heads pos pos"] | list[Tensor],
    p: float = 0.6,
    pairs: str = "all",
) -> Tensor:
    """``mean_{b,q,k} ||gate[b, :, q, k]||_p``, the gate sparsity penalty.

    Args:
        gate: gates in [0, 1] (``hook_gate``). Several blocks' gates concatenated along the
            head dimension are penalised together (co-attention across blocks counts); a list
            of gate tensors gets the sum of their separate penalties.
        p: quasi-norm exponent.
        pairs: ``"all"`` or ``"causal"`` (only ``k <= q``).
    """
    if isinstance(gate, list):
        return torch.stack([gate_penalty(g, p, pairs) for g in gate]).sum()
    # sum_h gate ** p, spelt out (about twice as fast as linalg.vector_norm on a CPU); the
    # floor keeps the gradient of the power finite where a gate is exactly 0
    norm = gate.clamp_min(1e-30).pow(p).sum(dim=1).pow(1.0 / p)
    if pairs == "causal":
        n = gate.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=gate.device).tril()
        return norm[:, mask].mean()
    return norm.mean()


def gated_loss(
    out: Tensor,
    target: Tensor,
    gate: Tensor | list[Tensor],
    cfg: GatedTrainConfig,
    alpha: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, mse, penalty)`` of one batch (see the module docstring).

    ``alpha`` overrides ``cfg.alpha`` (the warm-up's weight of this step).
    """
    mse = F.mse_loss(out, target)
    penalty = gate_penalty(gate, cfg.gate_p, cfg.penalty_pairs)
    return mse + (cfg.alpha if alpha is None else alpha) * penalty, mse, penalty


@torch.no_grad()
def block_objective(
    block: GatedAttentionBlock,
    x: Float[Tensor, "n pos d_model"],
    y: Float[Tensor, "n pos d_model"],
    cfg: GatedTrainConfig,
    batch_size: int = 1000,
) -> dict[str, float]:
    """The training objective of ``block`` on pairs ``x -> y``, evaluated without training.

    The batch means of :func:`gated_loss` (full weight ``cfg.alpha``, no warm-up), averaged
    over batches of ``batch_size`` rows weighted by their size: with the rows a block was
    trained on, the loss it was trained to lower. This compares two blocks of one layer on
    the objective itself, for example one trained here and one of the authors'
    (:func:`~tl_superposition.gated.block.import_gated_attn_block`).

    Returns:
        ``{"loss", "mse", "penalty"}``.

    Raises:
        ValueError: ``x`` and ``y`` differ in shape, or ``batch_size < 1``.
    """
    if x.shape != y.shape or batch_size < 1:
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)} must match and batch_size "
            f"({batch_size}) be >= 1"
        )
    was_training = block.training
    block.eval()
    device = next(block.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)
    for lo in range(0, len(x), batch_size):
        xb, yb = x[lo : lo + batch_size].to(device), y[lo : lo + batch_size].to(device)
        out, gate = block.forward_with_gate(xb)
        terms = torch.stack(gated_loss(out, yb, gate, cfg)).double().cpu()
        sums += terms * len(xb)
    block.train(was_training)
    loss, mse, penalty = (sums / max(len(x), 1)).tolist()
    return {"loss": loss, "mse": mse, "penalty": penalty}


class WithGate(torch.nn.Module):
    """A block whose ``forward`` is its ``forward_with_gate``, for the wrappers that call
    ``forward``: DDP (it syncs the gradients of what ran through ``forward``) and
    ``torch.func.functional_call`` (batched restarts)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Any:
        return self.block.forward_with_gate(x)  # type: ignore[operator]


def _ddp(block: torch.nn.Module) -> torch.nn.Module:
    device = next(block.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(WithGate(block), device_ids=ids)


def _identity(
    block: GatedAttentionBlock | CrossLayerGatedBlocks, cfg: GatedTrainConfig, source: dict
) -> dict[str, Any]:
    return {"block_config": block.cfg.to_dict(), "train_config": cfg.to_dict(), "source": source}


def _legacy(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(identity, state)`` of a checkpoint written before the shared format."""
    if "format" in raw or "block_config" not in raw:
        return None
    identity = {k: raw[k] for k in ("block_config", "train_config", "source")}
    return identity, {k: raw[k] for k in ("step", "optimizer", "history", "block")}


def _resume(
    path: Path,
    block: GatedAttentionBlock | CrossLayerGatedBlocks,
    trainer: Trainer,
    cfg: GatedTrainConfig,
    source: dict[str, Any],
) -> None:
    saved, state = load_checkpoint(path, "gated", _legacy)
    mismatch = []
    # through from_dict: fields added since the checkpoint was written take their defaults
    if type(block.cfg).from_dict(saved["block_config"]).to_dict() != block.cfg.to_dict():
        mismatch.append("block config")
    keep = ("alpha", "alpha_warmup_steps", "lr", "gate_p", "penalty_pairs")
    old = {k: saved["train_config"].get(k, 0) for k in keep}  # no warm-up key: none
    if old != {k: getattr(cfg, k) for k in keep}:
        mismatch.append("alpha/alpha_warmup_steps/lr/gate_p/penalty_pairs")
    if saved["source"] != source:
        mismatch.append("data source")
    if mismatch:
        raise ValueError(
            f"{path} is a checkpoint of another run ({', '.join(mismatch)} differ); "
            "use a new checkpoint folder or the same settings"
        )
    block.load_state_dict(state["block"])
    trainer.load_state_dict(state)


def train_gated_block(
    block: GatedAttentionBlock | CrossLayerGatedBlocks,
    source: BatchSource,
    config: GatedTrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> GatedTrainResult:
    """Train ``block`` (in place) to reproduce ``source``'s targets with sparse gates.

    Args:
        block: the block (or blocks trained together,
            :class:`~tl_superposition.gated.cross_layer.CrossLayerGatedBlocks`); its device
            is used for the batches.
        source: ``(input, target)`` batches, deterministic in (epoch, index).
        config: :class:`GatedTrainConfig` (defaults if None).
        checkpoint_dir: folder for ``checkpoint.pt``; an existing checkpoint there is resumed
            (it must come from the same block config, loss settings and source).
        progress: tqdm bar over steps.

    Returns:
        :class:`GatedTrainResult` with the loss history.

    Raises:
        ValueError: a checkpoint of another run is in ``checkpoint_dir``.
    """
    cfg = config or GatedTrainConfig()
    device = next(block.parameters()).device
    total = cfg.epochs * source.n_batches
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    trainer = Trainer(torch.optim.Adam(block.parameters(), lr=cfg.lr), total)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    desc = source.describe()
    if ckpt is not None and ckpt.is_file():
        _resume(ckpt, block, trainer, cfg, desc)
        log.info("resuming %s at step %d of %d", ckpt, trainer.step, total)
    resumed_from = trainer.step
    t0 = time.perf_counter()
    sums = torch.zeros(3)
    n_sum = 0

    world = distributed.current()
    forward = block.forward_with_gate if not world.distributed else _ddp(block)

    def batch_loss(x: Tensor, y: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, gate = forward(x)
        return gated_loss(out, y, gate, cfg, alpha)

    loss_fn = torch.compile(batch_loss) if cfg.compile else batch_loss
    block.train()
    bar = tqdm(
        total=total, initial=trainer.step, desc="gated block", disable=not progress, leave=False
    )
    while not trainer.finished:
        epoch, index = divmod(trainer.step, source.n_batches)
        x, y = source.batch(epoch, index)
        share, n_rows, n_mine = 1.0, len(x), len(x)
        if world.distributed:  # this rank's rows; its loss weighted so DDP's mean is the batch's
            rows = torch.tensor_split(torch.arange(n_rows), world.size)[world.rank]
            n_mine, share = len(rows), len(rows) * world.size / n_rows
            rows = rows if n_mine else torch.arange(1)  # no row left: one, weighted 0
            x, y = x[rows], y[rows]

        def step_fn(step: int, x: Tensor = x, y: Tensor = y) -> tuple[Tensor, ...]:
            alpha = torch.tensor(cfg.alpha_at(step), device=device)
            loss, mse, pen = loss_fn(x.to(device), y.to(device), alpha)
            return (loss * share if world.distributed else loss), loss, mse, pen

        _, loss, mse, pen = trainer.run_step(step_fn)
        terms = torch.stack([loss.detach(), mse.detach(), pen.detach()])
        if world.distributed:  # the whole batch's means, from every rank's rows
            terms = distributed.sum_over_ranks(terms * n_mine, world) / n_rows
        sums += terms.cpu()
        n_sum += 1
        if trainer.step % cfg.log_every_steps == 0 or trainer.finished:
            avg = (sums / n_sum).tolist()
            trainer.log(
                {"step": trainer.step, "epoch": epoch, "loss": avg[0], "mse": avg[1],
                 "penalty": avg[2]}
            )  # fmt: skip
            bar.set_postfix(mse=f"{avg[1]:.3g}", penalty=f"{avg[2]:.3g}")
            sums.zero_()
            n_sum = 0
        bar.update(1)
        if ckpt is not None and world.main and trainer.due(cfg.checkpoint_every_steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {**trainer.state_dict(), "block": block.state_dict()}
            save_checkpoint(ckpt, "gated", _identity(block, cfg, desc), state)
    bar.close()
    block.eval()
    distributed.barrier(world)
    seconds = time.perf_counter() - t0
    return GatedTrainResult(pd.DataFrame(trainer.history), trainer.step, resumed_from, seconds)
