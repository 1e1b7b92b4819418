"""A mix of context formats: with and without BOS, at random offsets, short and long.

Packed contexts (:func:`~.sources.pack_contexts`) all start with BOS at a packing boundary and
are all ``context_size`` long. A dictionary trained only on them has never seen the format of
short prompts that start without BOS, where the attention sink sits on an ordinary token
(IOI prompts as this project makes them). :class:`ContextMix` cuts contexts from the same
token stream in several formats, and :func:`mix_contexts` yields them, deterministically for
the mix's seed:

- a share ``bos_frac`` of the contexts starts with BOS, the rest with their first text token;
- with ``random_offset`` each context starts a random number of tokens (0 to ``context_size -
  1``) after the end of the previous one, instead of right at it, so contexts start anywhere in
  a document, not only at packing boundaries;
- a share ``short_frac`` of the contexts is ``short_size`` tokens long, the rest
  ``context_size``.

A separator (between documents) is never the first token of a context's text, as in
:func:`~.sources.pack_contexts`. The default mix (every context with BOS, no offsets, no
short contexts) gives exactly :func:`~.sources.pack_contexts`'s contexts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tl_superposition.core.config import Config


@dataclass(frozen=True)
class ContextMix(Config):
    """How contexts are cut from a token stream (module docstring).

    Attributes:
        bos_frac: share of contexts that start with BOS, in [0, 1] (1: every one, as packing).
            Ignored where the model is packed without BOS.
        random_offset: start each context a random 0..``context_size - 1`` tokens after the
            previous one ends.
        short_frac: share of contexts that are ``short_size`` tokens long, in [0, 1].
        short_size: tokens in a short context (at least 2).
        seed: the seed of every draw.

    Raises:
        ValueError: a share outside [0, 1] or ``short_size < 2``.
    """

    bos_frac: float = 1.0
    random_offset: bool = False
    short_frac: float = 0.0
    short_size: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("bos_frac", "short_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.short_size < 2:
            raise ValueError(f"short_size must be >= 2, got {self.short_size}")

    @property
    def is_packing(self) -> bool:
        """Whether this mix gives plain packed contexts (every one with BOS, full length)."""
        return self.bos_frac == 1.0 and not self.random_offset and self.short_frac == 0.0

    def check_context_size(self, context_size: int) -> None:
        """Raise :class:`ValueError` unless short contexts, if any, are shorter than
        ``context_size``."""
        if self.short_frac > 0 and self.short_size >= context_size:
            raise ValueError(
                f"short_size {self.short_size} must be below context_size {context_size}"
            )


def _stream(
    documents: Iterable[Sequence[int]], separator_token_id: int | None
) -> Iterator[tuple[int, bool]]:
    """Every token of the documents joined by the separator, with whether it is one."""
    first = True
    for doc in documents:
        if not first and separator_token_id is not None:
            yield separator_token_id, True
        first = False
        for t in doc:
            yield int(t), False


def mix_contexts(
    documents: Iterable[Sequence[int]],
    context_size: int,
    bos_token_id: int | None,
    separator_token_id: int | None,
    mix: ContextMix,
) -> Iterator[np.ndarray]:
    """Contexts of the token stream in the formats of ``mix`` (module docstring).

    Args:
        documents: token-id lists, one per document.
        context_size: tokens in a full context.
        bos_token_id: BOS (``None``: no context starts with one, whatever ``bos_frac``).
        separator_token_id: placed between documents (``None``: none).
        mix: the formats.

    Yields:
        int64 arrays of ``context_size`` or ``mix.short_size`` tokens; the stream's tail too
        short for the next context is dropped.

    Raises:
        ValueError: ``short_size`` not below ``context_size`` while ``short_frac > 0``
            (:meth:`ContextMix.check_context_size`).
    """
    mix.check_context_size(context_size)
    rng = np.random.default_rng(mix.seed)
    stream = _stream(documents, separator_token_id)
    while True:
        with_bos = bos_token_id is not None and bool(rng.random() < mix.bos_frac)
        size = mix.short_size if rng.random() < mix.short_frac else context_size
        skip = int(rng.integers(0, context_size)) if mix.random_offset else 0
        body = _take(stream, skip, size - int(with_bos))
        if body is None:
            return
        yield np.asarray(([bos_token_id] if with_bos else []) + body, dtype=np.int64)


def _take(stream: Iterator[tuple[int, bool]], skip: int, n: int) -> list[int] | None:
    """Skip ``skip`` tokens, then any separators, and take ``n`` tokens (``None``: too few)."""
    for _ in range(skip):
        if next(stream, None) is None:
            return None
    out: list[int] = []
    for token, is_separator in stream:
        if not out and is_separator:
            continue
        out.append(token)
        if len(out) == n:
            return out
    return None
