"""The one optimisation loop under every trainer of the package.

QK transcoders (:mod:`tl_superposition.qk.trainer`), the feature-pair mask
(:mod:`tl_superposition.qk.pairs`), gated attention blocks (:mod:`tl_superposition.gated.train`)
and toy models (:mod:`tl_superposition.toys.train`) all train through a :class:`Trainer`: it
owns the optimiser, the step counter, the learning-rate schedule, gradient clipping, the
history and the trainer's part of a checkpoint; each model supplies a *step function* (the
forward pass and the loss of one batch) and optional *after-step hooks* (resampling dead
features, clamping a mask, logging). Like SAELens's ``SAETrainer`` with a model's
``training_forward_pass``, but also serving models that are not dictionaries.

One step, in this order: set the learning rate of every parameter group (``lr_at(step)``),
zero the gradients, run the step function (which returns the loss, or None when it ran the
backward passes itself), backward, clip the global gradient norm, ``optimizer.step()``,
count the step, run the after-step hooks. Checkpoints (:mod:`.checkpoint`) hold
:meth:`Trainer.state_dict`; restoring it resumes the run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[[int], Any]
AfterStep = Callable[["Trainer", Any], None]


class Trainer:
    """One optimisation run: optimiser, step counter, schedule, clipping and history.

    Args:
        optimizer: the run's optimiser (its construction is the model's choice).
        total: steps of the whole run (:attr:`finished` once reached).
        lr_at: learning rate at a 0-based step, set on every parameter group before the step;
            None keeps the optimiser's own.
        clip: ``(parameters, max_norm)`` for global gradient-norm clipping after backward.
        after_step: hooks ``fn(trainer, step_output)`` run after each step, in order.

    Attributes:
        step: steps done (this call and earlier, resumed ones).
        history: the rows the hooks logged (:meth:`log`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total: int,
        *,
        lr_at: Callable[[int], float] | None = None,
        clip: tuple[Iterable[Tensor], float] | None = None,
        after_step: Sequence[AfterStep] = (),
    ) -> None:
        self.optimizer, self.total, self.lr_at = optimizer, int(total), lr_at
        self.clip = None if clip is None else (list(clip[0]), float(clip[1]))
        self.after_step = list(after_step)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @property
    def finished(self) -> bool:
        """Whether ``total`` steps are done."""
        return self.step >= self.total

    def run_step(self, step_fn: StepFn) -> Any:
        """Take one optimisation step; returns what ``step_fn(step)`` returned.

        ``step_fn`` gets the 0-based step and returns either the loss (a scalar tensor, then
        backpropagated here), a tuple or dict whose first element / ``"loss"`` entry is it, or
        None after running its own backward passes.
        """
        if self.lr_at is not None:
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        out = step_fn(self.step)
        loss = _loss_of(out)
        if loss is not None:
            loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(*self.clip)
        self.optimizer.step()
        self.step += 1
        for hook in self.after_step:
            hook(self, out)
        return out

    def log(self, row: dict[str, Any]) -> None:
        """Append a history row."""
        self.history.append(row)

    def due(self, every: int) -> bool:
        """Whether a periodic action (``every`` steps; 0: never) or the last step is now."""
        return bool(every and self.step % every == 0) or self.step == self.total

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "optimizer", "history"}``: the trainer's part of a checkpoint."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's weights are the caller's)."""
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])


def _loss_of(out: Any) -> Tensor | None:
    if out is None or isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return out["loss"]
    return out[0]


def warmup_decay(
    step: int, total: int, warmup_frac: float, decay_frac: float, end_frac: float
) -> float:
    """Learning-rate multiplier at 0-based ``step`` of ``total``: a linear warm-up over the
    first ``warmup_frac`` of the steps (from ``1 / warm``), flat, then a linear decay over the
    last ``decay_frac`` to ``end_frac`` (Wynroe & Sharkey 2024's schedule for QK transcoders)."""
    warm = int(warmup_frac * total)
    decay = int(decay_frac * total)
    if warm and step < warm:
        return (step + 1) / warm
    if decay and step >= total - decay:
        frac = (total - step) / decay
        return end_frac + (1 - end_frac) * frac
    return 1.0
