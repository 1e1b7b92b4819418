"""``CollectConfig``: the settings of one activation collection, checked before any work.

SAELens style: one dataclass that documents every field and checks, in ``__post_init__``,
everything that can be checked without the model (ranges, dtype names, separator values,
hook lists). What needs the model (hook names, layers, ``n_ctx``, head indices) is checked by
:func:`tl_superposition.activations.collector.collect` before its first forward pass.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_superposition.activations.mix import ContextMix
from tl_superposition.core.config import Config
from tl_superposition.dtypes import parse_dtype

#: The hooks the collector is built for (any other hook point of the model also works).
SHORT_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_z",
    "attn.hook_pattern",
    "hook_attn_out",
)

#: Storage dtypes of shards (names for :func:`tl_superposition.dtypes.parse_dtype`).
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

#: Token placed between documents: the tokenizer's BOS, its EOS, or none.
SEPARATORS = ("bos", "eos", "none")

DEFAULT_HOOKS = ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k")


@dataclass
class CollectConfig(Config):
    """Settings of :func:`tl_superposition.collect`.

    The fields that decide what is written (hooks, layers, heads, sizes, dtype, BOS and
    separator, seed) are recorded in the collection's ``manifest.json``; a later call on the
    same ``out_dir`` resumes only with the same values. ``out_dir``, ``device``, ``overwrite``
    and ``progress`` only say how this call runs. ``__post_init__`` normalises the fields
    (hooks, layers and heads to tuples, ``dtype`` to its canonical name, ``out_dir`` to a
    ``Path``); change a config with ``dataclasses.replace`` so that the checks run again.

    Attributes:
        out_dir: output folder (created). Must be empty, or hold a collection with the same
            settings, which is then resumed (or returned at once if complete).
        hooks: full TransformerLens hook names (``"blocks.15.attn.hook_q"``) and/or short
            block-level names (:data:`SHORT_HOOKS`, e.g. ``"attn.hook_q"``) expanded for every
            layer of ``layers``; a list or a comma-separated string. Stored shapes per
            context: ``hook_resid_pre``, ``ln1.hook_normalized``, ``hook_attn_out``:
            ``[context_size, d_model]``; ``ln1.hook_scale``: ``[context_size, 1]``;
            ``attn.hook_q`` and ``attn.hook_z``: ``[context_size, n_heads, d_head]``;
            ``attn.hook_k``: ``[context_size, n_key_value_heads, d_head]``;
            ``attn.hook_pattern``: ``[len(heads), context_size, context_size]``.
        layers: layers for short hook names (an int or a list).
        heads: query heads kept of ``attn.hook_pattern`` (default all); distinct indices.
        context_size: tokens per context, BOS included; at least 2 and at most the model's
            ``n_ctx``.
        batch_size: contexts per forward pass (at least 1).
        max_tokens: stop after ``max_tokens // context_size`` contexts (default: the whole
            source); at least ``context_size``.
        shard_tokens: tokens per shard file, rounded down to whole contexts (at least one).
        dtype: storage dtype, one of :data:`STORAGE_DTYPES` (a torch dtype or an alias such as
            ``"fp16"`` is accepted).
        split: dataset split; for a local folder, the files whose name starts with it
            (``"valid"`` selects ``wikitext-2/valid.txt``); ignored by the ``pydoc`` corpus.
        column: the text column of tabular sources (JSON lines, CSV, parquet, datasets).
        prepend_bos: start every context with BOS (default: the model's
            ``cfg.default_prepend_bos``).
        separator: token between documents, one of :data:`SEPARATORS`.
        mix: cut contexts in a :class:`~.mix.ContextMix` of formats (a share without BOS, at
            random offsets) instead of packing them back to back; a dict is converted. A
            collection holds one context length, so ``short_frac`` must be 0 (collect short
            contexts into a second folder with a smaller ``context_size``). Recorded in the
            manifest.
        seed: recorded in the manifest; the default shuffling seed of
            :class:`~tl_superposition.activations.store.ActivationStore`.
        device: where the forward pass runs (default the model's device).
        overwrite: delete the collection in ``out_dir`` (any settings) and start again, instead
            of resuming it or refusing other settings.
        progress: show a tqdm bar (tokens, tokens per second).

    Raises:
        ValueError: a field out of range or of the wrong kind; the message names the field.
    """

    out_dir: str | os.PathLike[str]
    hooks: str | Sequence[str] = DEFAULT_HOOKS
    layers: int | Sequence[int] | None = None
    heads: Sequence[int] | None = None
    context_size: int = 128
    batch_size: int = 8
    max_tokens: int | None = None
    shard_tokens: int = 32768
    dtype: str | torch.dtype = "float32"
    split: str | None = None
    column: str = "text"
    prepend_bos: bool | None = None
    separator: str = "bos"
    mix: ContextMix | dict[str, Any] | None = None
    seed: int = 0
    device: str | torch.device | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir).expanduser()
        self.hooks = _hook_list(self.hooks)
        self.layers = _int_tuple(self.layers, "layers")
        self.heads = _int_tuple(self.heads, "heads")
        _check_int(self.context_size, "context_size", 2)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.shard_tokens, "shard_tokens", 1)
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", 1)
            if self.max_tokens < self.context_size:
                raise ValueError(
                    f"max_tokens {self.max_tokens} is below context_size {self.context_size}: "
                    "not one context would be collected"
                )
        self.dtype = parse_dtype(self.dtype, STORAGE_DTYPES, "storage dtype")[0]
        if self.separator not in SEPARATORS:
            raise ValueError(
                f"separator must be one of {', '.join(map(repr, SEPARATORS))}, "
                f"got {self.separator!r}"
            )
        if isinstance(self.mix, dict):
            self.mix = ContextMix.from_dict(self.mix)
        if self.mix is not None and self.mix.short_frac > 0:
            raise ValueError(
                "mix.short_frac must be 0 for a collection (it holds one context length): "
                "collect short contexts into a second folder with a smaller context_size"
            )
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"column must be a column name, got {self.column!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self._check_heads()

    def _check_heads(self) -> None:
        if self.heads is None:
            return
        if not any(h.endswith("attn.hook_pattern") for h in self.hooks):
            raise ValueError("heads= selects heads of attn.hook_pattern, which is not requested")
        if not self.heads or len(set(self.heads)) != len(self.heads) or min(self.heads) < 0:
            raise ValueError(f"heads {list(self.heads)}: need distinct head indices >= 0")

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype of ``dtype``."""
        return parse_dtype(self.dtype, STORAGE_DTYPES, "storage dtype")[1]

    @property
    def shard_contexts(self) -> int:
        """Contexts per shard: ``shard_tokens // context_size``, at least one."""
        return max(1, self.shard_tokens // self.context_size)

    @property
    def max_contexts(self) -> int | None:
        """``max_tokens // context_size``, or None for the whole source."""
        return None if self.max_tokens is None else self.max_tokens // self.context_size


def _hook_list(hooks: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",")]
    out = tuple(h for h in hooks if h)
    if not out or not all(isinstance(h, str) for h in out):
        raise ValueError(
            f"hooks must be hook names, e.g. 'blocks.0.ln1.hook_normalized' or short names "
            f"{list(SHORT_HOOKS)} with layers; got {hooks!r}"
        )
    return out


def _int_tuple(values: Any, name: str) -> tuple[int, ...] | None:
    """``None``, or the integers of an int or an iterable of ints (numpy and torch ints too)."""
    if values is None:
        return None
    with contextlib.suppress(TypeError):
        return (operator.index(values),)
    try:
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be integers, got {values!r}") from None


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
