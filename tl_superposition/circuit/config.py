"""The settings of the circuit step (:class:`CircuitConfig`), checked when made."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

from tl_superposition.core.config import Config


@dataclass
class CircuitConfig(Config):
    """Settings of :func:`extract_circuit`; ACC++'s values for GPT-2 IOI by default.

    Attributes:
        node_frac: unification keeps a node present in at least
            ``round(node_frac * n_prompt_graphs)`` prompt graphs (ACC++: 0.01). In [0, 1].
        min_prompts: an edge is kept only if it occurs in at least this many prompts
            (ACC++: 30). At least 1.
        threshold: and only if its mean change of the logit difference, when removed by the
            local edit, is at least this in size, in logits (ACC++: 0.1 for GPT-2 IOI). >= 0.
        rows_per_pass: edited prompts per forward pass (memory grows with it). At least 1.
        batch_size: prompts per forward pass of the clean run.

    Raises:
        ValueError: a field outside its range; the message starts with its name.
    """

    node_frac: float = 0.01
    min_prompts: int = 30
    threshold: float = 0.1
    rows_per_pass: int = 128
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.node_frac, Real) or not 0 <= self.node_frac <= 1:
            raise ValueError(f"node_frac must be in [0, 1], got {self.node_frac!r}")
        if not isinstance(self.threshold, Real) or not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (logits), got {self.threshold!r}")
        for name in ("min_prompts", "rows_per_pass", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
