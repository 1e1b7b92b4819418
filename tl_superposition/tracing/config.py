"""The hyperparameters of a trace (:class:`TraceConfig`), checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_superposition.core.config import Config

EdgeRule = Literal["paper", "positive"]
EDGE_RULES: tuple[str, ...] = ("paper", "positive")


@dataclass
class TraceConfig(Config):
    """Hyperparameters of the decomposition and the tracing.

    The defaults are Franco & Crovella's (arXiv 2410.00340): a head fires at pattern >= 0.5,
    sparse sets reach the whole score, edges make up 70% of the upstream contribution, with
    the bias coordinate added as their code does.

    Attributes:
        pattern_thresh: a head *fires* on ``(dest, src)`` when its attention probability
            (``hook_pattern``) there is at least this and its score is positive. In (0, 1].
            Below 0.5 a destination can fire on several sources; the walk traces all of them.
        dynamic_thresh: ``None`` (default) uses ``pattern_thresh``; a number ``c > 0`` makes
            the threshold depend on the destination: ``min(1, c / (dest + 1))``, ACC++'s
            "dynamic" rule (Franco & Crovella, arXiv 2602.13483; their ``c`` is 2.5), which
            asks a late destination for less attention than an early one. Either way, a
            destination at position 0 (which can only attend to itself) never fires.
        thresh: the sparse set of a firing is the shortest prefix of its singular components,
            sorted by contribution, whose sum reaches ``thresh x score``. Greater than 0; 1.0
            is the whole score. Above 1 the target may be out of reach: the set is then every
            component.
        edge_thresh: the fraction of the upstream contribution the edges make up, in (0, 1]
            (:mod:`~tl_superposition.tracing.edges`).
        edge_rule: ``"paper"`` (the authors' rule: net sum, ties kept, firings from layer 1)
            or ``"positive"`` (the largest positive writes, firings from layer 0). Both rank
            attention heads only; MLP and embedding writes are reported beside them
            (``writers.csv`` and the firings' ``*_from_*`` columns). The default is
            ``"paper"``: on SmolLM2 (256 IOI prompts) more of its edges pass the
            intervention test (83.7% of every edge against 76.7%) with larger effects
            (docs/methods.md).
        augmented_bias: add to every head's value the bias-coordinate term
            ``g~[-1] / ln1.hook_scale`` before the rule, as the authors' code does (their
            head output is augmented with a constant 1, so with query/key biases every
            candidate gains the same constant and the net-sum threshold moves). ``None``
            (default) means "as the rule's authors do": on for ``"paper"``, off for
            ``"positive"``; it is resolved when the config is made. Models without query and
            key biases (SmolLM2) have a zero term, so it changes nothing there.
        batch_size: prompts per forward pass (at least 1). Memory grows with it: the
            activations of every layer of a batch are cached at once.
        exclude_first: skip firings whose source is position 0 (BOS, or the attention sink of
            prompts without BOS), as the paper does.
        nonfiring_frac: share of the non-firing places (causal, source not excluded) that are
            sampled and decomposed the same way, for the firing vs non-firing comparison
            (``nonfirings.parquet``); in [0, 1], 0 samples none.
        seed: seed of the non-firing sample.

    Raises:
        ValueError: a field outside its range; the message starts with the field's name.
    """

    pattern_thresh: float = 0.5
    dynamic_thresh: float | None = None
    thresh: float = 1.0
    edge_thresh: float = 0.7
    edge_rule: str = "paper"
    augmented_bias: bool | None = None
    batch_size: int = 32
    exclude_first: bool = True
    nonfiring_frac: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.pattern_thresh <= 1:
            raise ValueError(
                f"pattern_thresh must be in (0, 1] (an attention probability), "
                f"got {self.pattern_thresh}"
            )
        if not self.thresh > 0:
            raise ValueError(
                f"thresh must be > 0 (a fraction of the score; 1.0 is the whole score), "
                f"got {self.thresh}"
            )
        if not 0 < self.edge_thresh <= 1:
            raise ValueError(
                f"edge_thresh must be in (0, 1] (a fraction of the upstream contribution), "
                f"got {self.edge_thresh}"
            )
        if self.dynamic_thresh is not None and not (
            isinstance(self.dynamic_thresh, Real)
            and not isinstance(self.dynamic_thresh, bool)
            and self.dynamic_thresh > 0
        ):
            raise ValueError(
                f"dynamic_thresh must be None or a number > 0 (ACC++ uses 2.5), "
                f"got {self.dynamic_thresh!r}"
            )
        if self.edge_rule not in EDGE_RULES:
            raise ValueError(f"edge_rule must be one of {EDGE_RULES}, got {self.edge_rule!r}")
        if self.augmented_bias is None:
            self.augmented_bias = self.edge_rule == "paper"
        for name in ("augmented_bias", "exclude_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, Integral):
            raise ValueError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.nonfiring_frac, Real) or not 0 <= self.nonfiring_frac <= 1:
            raise ValueError(
                f"nonfiring_frac must be in [0, 1] (a share of the non-firing places), "
                f"got {self.nonfiring_frac!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def pattern_thresholds(self, n_pos: int) -> Float[Tensor, " n_pos"]:
        """The firing threshold of each destination position ``0 .. n_pos - 1``.

        ``pattern_thresh`` everywhere, or ``min(1, dynamic_thresh / (dest + 1))``; position 0
        gets a threshold above 1, so it never fires.
        """
        dest = torch.arange(n_pos, dtype=torch.float32)
        if self.dynamic_thresh is None:
            thr = torch.full((n_pos,), float(self.pattern_thresh))
        else:
            thr = (float(self.dynamic_thresh) / (dest + 1)).clamp(max=1.0)
        thr[:1] = 2.0
        return thr

    @property
    def first_layer(self) -> int:
        """The lowest layer whose firings are traced: 1 for the paper's rule, else 0."""
        return 1 if self.edge_rule == "paper" else 0
