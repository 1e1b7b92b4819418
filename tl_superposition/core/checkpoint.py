"""The one checkpoint format of every resumable training run (QK transcoders, gated blocks).

A checkpoint is a ``torch.save`` file holding only tensors, numbers, strings, lists and dicts,
so that it always loads with ``torch.load(weights_only=True)`` (no pickled code runs)::

    {"format": "tl_superposition.checkpoint/1",
     "kind": "qk" | "gated" | ...,      # which trainer wrote it
     "identity": {...},                 # what a resuming run must match (configs, data source)
     "state": {...}}                    # the trainer's state: step, weights, optimiser, history...

It is written atomically into an open file (so the bytes depend on the contents only, not on
the temporary file's name). Checkpoints written before this format (``format``
``tl_superposition.qk.checkpoint/1``, and the gated blocks' files without a format) still load:
:func:`load_checkpoint` takes a ``legacy`` converter from the trainer that wrote them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tl_superposition.core.atomic import atomic_path
from tl_superposition.core.reading import reading

FORMAT = "tl_superposition.checkpoint/1"

Legacy = Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]] | None]


def check_plain(obj: Any, where: str = "state") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not load back (subclasses of
    the plain types too: ``numpy.float64`` is a ``float``).

    Raises:
        TypeError: naming the first offending entry (a numpy scalar, a dataclass, a path...).
    """
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not (obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor)):
        raise TypeError(f"{where} is a {type(obj).__name__}: checkpoints hold plain values only")


def save_checkpoint(
    path: str | os.PathLike, kind: str, identity: Mapping[str, Any], state: Mapping[str, Any]
) -> None:
    """Write a checkpoint atomically (see the module docstring).

    Raises:
        TypeError: ``identity`` or ``state`` holds something other than plain values.
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    check_plain(identity, "identity")
    check_plain(state, "state")
    obj = {"format": FORMAT, "kind": kind, "identity": dict(identity), "state": dict(state)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(
    path: str | os.PathLike, kind: str, legacy: Legacy | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(identity, state)`` of the checkpoint at ``path``, loaded with ``weights_only=True``.

    Args:
        kind: the trainer that must have written it.
        legacy: converts a checkpoint of an earlier layout into ``(identity, state)``, or
            returns None when it is not one.

    Raises:
        ValueError: the file is not a checkpoint of ``kind``.
    """
    path = Path(path)
    with reading(path, "delete it to start the run over, or restore it"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a tl_superposition checkpoint")
    if raw.get("format") == FORMAT:
        if raw.get("kind") != kind:
            raise ValueError(f"{path} is a checkpoint of a {raw.get('kind')} run, not of {kind}")
        return raw["identity"], raw["state"]
    converted = legacy(raw) if legacy is not None else None
    if converted is None:
        raise ValueError(f"{path} is not a {kind} checkpoint")
    return converted


def identity_mismatches(
    saved: Mapping[str, Any], expected: Mapping[str, Any], names: Mapping[str, str]
) -> list[str]:
    """Names (``names[key]``) of the identity entries where ``saved`` differs from ``expected``."""
    return [what for key, what in names.items() if saved.get(key) != expected.get(key)]
