"""Seed choosers: which heads' firings start a trace, chosen from the trace's own pass.

:func:`~tl_superposition.tracing.trace.trace` shows every batch's activations to its chooser
(:meth:`SeedChooser.observe`) before the activations are dropped, and asks for the seeds
(:meth:`SeedChooser.choose`) once every batch is decomposed, so seeds chosen from statistics
of all prompts (such as the direct logit attribution of the IOI trace,
:class:`~tl_superposition.tracing.ioi_trace.DLASeeds`) cost no second forward pass. Each
batch is walked from the chooser's current :meth:`SeedChooser.candidates`; a batch whose
candidates turn out to miss a final seed is walked again (the only second pass, and only of
that batch).

A chooser can instead pick seed *firings* prompt by prompt (:meth:`SeedChooser.seed_firings`,
as ACC++ does, :class:`~tl_superposition.tracing.prompt_seeds.PromptSeeds`): a prompt's
seeds depend on that prompt alone, so they are final as soon as its batch is observed and
no batch is walked again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from transformer_lens import HookedTransformer

from tl_superposition.tracing.graph import check_heads, parse_heads

if TYPE_CHECKING:
    from tl_superposition.tracing.cache import BatchCache
    from tl_superposition.tracing.decompose import BatchFirings


class SeedChooser(ABC):
    """Picks the seed heads of a trace from what the trace's forward pass computes.

    Attributes:
        final_per_batch: a batch's seeds are final once it is observed (fixed heads, seeds
            per prompt): its batches can then be traced in separate processes
            (:meth:`observed` / :meth:`absorb` carry what one process saw to another).
    """

    final_per_batch = False

    def observe(self, model: HookedTransformer, cache: BatchCache, lo: int, hi: int) -> None:
        """See the activations of prompts ``lo .. hi - 1`` (one batch); by default nothing."""
        del model, cache, lo, hi

    @abstractmethod
    def choose(self) -> list[tuple[int, int]]:
        """The seed heads ``[(layer, head), ...]``, once every batch has been observed."""

    def candidates(self) -> list[tuple[int, int]]:
        """Heads the current batch is walked from, before the seeds are known.

        They should include the final seeds: a batch whose candidates miss one is walked
        again at the end (a second forward pass of that batch). By default, the seeds
        :meth:`choose` would give now.
        """
        return self.choose()

    def observed(self, lo: int, hi: int) -> Any:
        """What :meth:`observe` recorded of prompts ``lo .. hi - 1``, for :meth:`absorb`
        in another process (None: nothing)."""
        del lo, hi
        return None

    def absorb(self, lo: int, hi: int, state: Any) -> None:
        """Take over :meth:`observed` of prompts ``lo .. hi - 1`` from another process."""
        del lo, hi, state

    def seed_firings(self, firings: BatchFirings, lo: int) -> np.ndarray | None:
        """Per firing of the batch starting at prompt ``lo``, whether it starts the walk.

        ``None`` (the default) means seeds are heads: the walk starts from the firings of
        :meth:`candidates` at the trace's ``seed_dest`` / ``seed_src``. A chooser that picks
        seeds per prompt returns a boolean mask (``firings.prompt`` counts from ``lo``).
        """
        del firings, lo
        return None


class FixedSeeds(SeedChooser):
    """Seeds given in advance.

    Attributes:
        heads: the seed heads.
    """

    final_per_batch = True

    def __init__(self, heads: Iterable[tuple[int, int]]):
        self.heads = [(int(L), int(h)) for L, h in heads]

    @classmethod
    def from_spec(cls, spec: str | Iterable[Any], n_layers: int, n_heads: int) -> FixedSeeds:
        """Parse heads such as ``"9.6,9.9"`` or ``[(9, 6)]`` and check them against the model.

        Raises:
            ValueError: a malformed head, or one outside ``n_layers x n_heads``.
        """
        heads = parse_heads(spec) or []
        check_heads(heads, n_layers, n_heads)
        return cls(heads)

    def choose(self) -> list[tuple[int, int]]:
        """The given heads."""
        return list(self.heads)
