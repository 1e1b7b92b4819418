"""How a source becomes token contexts for a model: BOS, separators, packing.

One place decides which special tokens a model's contexts carry, so that every method packs text
the way :func:`tl_superposition.collect` does: the collector, the QK-transcoder sources and the
gated-block sources all call :func:`open_packing` (or :func:`pack_text` for a tensor).

- BOS (falling back to EOS when the tokenizer has none) starts every context when
  ``prepend_bos`` is true, which defaults to the model's ``cfg.default_prepend_bos``;
- documents are joined by a separator: ``"bos"`` (the default), ``"eos"`` or ``"none"``;
- pre-packed sources (token arrays of full contexts) are taken as they are, with neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations.config import SEPARATORS
from tl_superposition.activations.mix import ContextMix, mix_contexts
from tl_superposition.activations.sources import TokenSource, iter_contexts, resolve_source


@dataclass(frozen=True)
class Packing:
    """A resolved source and the special tokens its contexts are packed with.

    Attributes:
        source: the resolved :class:`~.sources.TokenSource`.
        context_size: tokens per context.
        bos_token_id: prepended to every context; ``None`` for no BOS (and for pre-packed
            sources).
        separator_token_id: placed between documents; ``None`` for none.
        mix: the context formats (:class:`~.mix.ContextMix`); ``None``: packed back to back,
            every context ``context_size`` long.
    """

    source: TokenSource
    context_size: int
    bos_token_id: int | None
    separator_token_id: int | None
    mix: ContextMix | None = None

    def contexts(self) -> Iterator[np.ndarray]:
        """Every context of the source in a fixed order, int64 ``[context_size]`` (or, with a
        mix, ``[mix.short_size]`` for short ones)."""
        if self.mix is None:
            return iter_contexts(
                self.source, self.context_size, self.bos_token_id, self.separator_token_id
            )
        assert self.source.documents is not None  # checked by open_packing
        return mix_contexts(
            self.source.documents(), self.context_size, self.bos_token_id,
            self.separator_token_id, self.mix,
        )  # fmt: skip


def special_tokens(
    model: HookedTransformer, prepend_bos: bool | None = None, separator: str = "bos"
) -> tuple[int | None, int | None]:
    """The ``(bos, separator)`` token ids a model's contexts are packed with.

    Args:
        prepend_bos: start contexts with BOS; ``None`` follows ``model.cfg.default_prepend_bos``.
        separator: one of :data:`~.config.SEPARATORS` (``"bos"``, ``"eos"``, ``"none"``).

    Returns:
        ``(bos, separator)``; ``bos`` is ``None`` when no BOS is prepended. BOS falls back to
        the tokenizer's EOS when it has no BOS token.

    Raises:
        ValueError: an unknown ``separator``, or ``prepend_bos`` with a tokenizer that has
            neither BOS nor EOS.
    """
    if separator not in SEPARATORS:
        raise ValueError(f"separator must be one of {SEPARATORS}, got {separator!r}")
    tokenizer = getattr(model, "tokenizer", None)
    bos_id = eos_id = None
    if tokenizer is not None:
        eos_id = tokenizer.eos_token_id
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    bos_id = None if bos_id is None else int(bos_id)  # type: ignore[arg-type]
    eos_id = None if eos_id is None else int(eos_id)  # type: ignore[arg-type]
    if prepend_bos is None:
        prepend_bos = bool(model.cfg.default_prepend_bos)
    if prepend_bos and bos_id is None:
        raise ValueError(
            "prepend_bos=True but the model's tokenizer has no BOS or EOS token; "
            "pass prepend_bos=False"
        )
    sep_id = {"bos": bos_id, "eos": eos_id, "none": None}[separator]
    return (bos_id if prepend_bos else None), sep_id


def open_packing(
    model: HookedTransformer,
    source: Any,
    *,
    context_size: int,
    split: str | None = None,
    column: str = "text",
    prepend_bos: bool | None = None,
    separator: str = "bos",
    mix: ContextMix | None = None,
) -> Packing:
    """Resolve ``source`` for ``model`` and choose its special tokens (reads no text yet).

    Args:
        source: anything :func:`~.sources.resolve_source` accepts (``"pydoc"``, ``"auto"``, a
            text file or folder, a dataset name, strings, token arrays).
        context_size: tokens per context.
        split: dataset split, or the file-name prefix of a folder's files (``"test"``).
        column: the text column of tabular sources.
        prepend_bos, separator: see :func:`special_tokens`.
        mix: cut contexts in these formats (:class:`~.mix.ContextMix`) instead of packing them.

    Raises:
        ValueError: a text source for a model without a tokenizer, a mix for pre-packed
            contexts (they have no documents to cut) or with ``short_size`` not below
            ``context_size``, and the errors of :func:`special_tokens` and
            :func:`~.sources.resolve_source`.
    """
    if mix is not None:
        mix.check_context_size(context_size)
    bos_id, sep_id = special_tokens(model, prepend_bos, separator)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and not isinstance(source, (torch.Tensor, np.ndarray, list, tuple)):
        raise ValueError("the model has no tokenizer: pass already tokenised data as source")
    token_source = resolve_source(
        source, tokenizer, context_size=context_size, split=split, column=column
    )
    if token_source.contexts is not None:  # pre-packed contexts are taken as they are
        bos_id = sep_id = None
        if mix is not None:
            raise ValueError("a context mix needs text or token documents, not packed contexts")
    return Packing(token_source, int(context_size), bos_id, sep_id, mix)


def pack_text(
    model: HookedTransformer,
    source: Any,
    *,
    context_size: int = 128,
    split: str | None = None,
    max_contexts: int | None = None,
    column: str = "text",
    prepend_bos: bool | None = None,
    separator: str = "bos",
) -> Int[Tensor, "n_contexts context_size"]:
    """The first contexts of a source as one tensor, packed as :func:`~.collector.collect` packs.

    Args:
        max_contexts: keep only the first this many contexts (``None``: all of them).
        Others: see :func:`open_packing`.

    Returns:
        int64 ``[n_contexts, context_size]`` on the CPU.

    Raises:
        ValueError: the source gives no full context, and the errors of :func:`open_packing`.
    """
    packing = open_packing(
        model,
        source,
        context_size=context_size,
        split=split,
        column=column,
        prepend_bos=prepend_bos,
        separator=separator,
    )
    it = packing.contexts()
    rows = list(islice(it, max_contexts) if max_contexts is not None else it)
    if not rows:
        raise ValueError(
            f"the source gives no full context of {context_size} tokens; "
            "give more text or a smaller context_size"
        )
    return torch.as_tensor(np.stack(rows), dtype=torch.long)
