"""The on-disk layout of a collection, and opening an output folder: new, resume or refuse.

Layout of a collection folder::

    out_dir/
      manifest.json              settings, shapes, dtypes, source, versions, progress, shards
      attention.safetensors      per-layer rotary tables for pattern recomputation (if q and k
                                 of a rotary model are collected)
      shard_00000.safetensors    "tokens": int32 [n, context_size], and one tensor per hook,
      shard_00001.safetensors    [n, context_size, ...hook dims] (patterns: [n, heads, ctx, ctx])
      ...
      manifest.rank1.json        while several processes collect: the shards rank 1 finished

Every file is written atomically (:mod:`tl_superposition.core.atomic`), so a folder holds only
whole files, plus at most a few hidden ``.*.tmp`` files of an interrupted write, which the next
run removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "tl_superposition.activations/1"
MANIFEST = "manifest.json"
ATTENTION_FILE = "attention.safetensors"
SHARD_PATTERN = "shard_{:05d}.safetensors"
_SHARD_RE = re.compile(r"^shard_\d{5}\.safetensors$")
#: Progress of one rank of a collection written by several processes (:mod:`.ranks`).
RANK_FILE = "manifest.rank{}.json"
RANK_RE = re.compile(r"^manifest\.rank\d+\.json$")


@dataclass
class Existing:
    """What an output folder already holds of a collection with the same settings.

    Attributes:
        shards: the manifest's shard records (``file``, ``first_context``, ``n_contexts``,
            ``bytes``), all checked to be on disk with their recorded size.
        complete: the earlier run finished.
    """

    shards: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False

    @property
    def n_contexts(self) -> int:
        """Contexts on disk."""
        return sum(s["n_contexts"] for s in self.shards)


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and check that files can be written in it.

    Raises:
        FileExistsError: ``out_dir`` exists and is not a folder.
        PermissionError: it cannot be created or written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot create output folder {out_dir}: permission denied") from exc
    except FileExistsError as exc:
        raise FileExistsError(f"output path {out_dir} exists and is not a folder") from exc
    except OSError as exc:
        raise PermissionError(f"cannot create output folder {out_dir}: {exc.strerror}") from exc
    if not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"output folder {out_dir} is not writable ({exc.strerror}); choose another out_dir"
        ) from exc


def open_out_dir(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> Existing:
    """Prepare ``out_dir`` for a collection with ``settings``; return what it already holds.

    An empty folder starts a new collection; a folder whose manifest has the same format and
    settings is resumed; anything else is refused, or with ``overwrite`` deleted first (only
    if it holds nothing but collection files). Leftover temporary files are removed.

    Raises:
        FileExistsError: other settings, an unreadable manifest, or foreign files.
        PermissionError: the folder cannot be created or written.
        RuntimeError: a shard listed in the manifest is missing or has the wrong size.
    """
    prepare_out_dir(out_dir)
    if overwrite:
        _delete_collection(out_dir)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        existing = _existing(out_dir, settings)
    else:
        leftovers = [p.name for p in out_dir.iterdir() if not _is_temp(p.name)]
        if leftovers:
            raise FileExistsError(
                f"output folder {out_dir} is not empty ({leftovers[:5]}) and holds no "
                f"{MANIFEST}; choose an empty or new out_dir"
            )
        existing = Existing()
    for p in out_dir.iterdir():
        if _is_temp(p.name) and p.is_file():
            p.unlink()
    return existing


def check_disk(out_dir: Path, needed: int, what: str) -> None:
    """Raise before writing ``needed`` bytes (plus 16 MiB) that ``out_dir``'s disk lacks.

    Raises:
        RuntimeError: not enough free space; the message says how much is needed and free.
    """
    free = shutil.disk_usage(out_dir).free
    if free < needed + (16 << 20):
        raise RuntimeError(
            f"not enough disk space in {out_dir} for {what}: needs {needed / 2**20:,.1f} MiB, "
            f"{free / 2**20:,.1f} MiB free. Free some space or choose another out_dir; "
            "completed shards are kept and a rerun resumes after them."
        )


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _delete_collection(out_dir: Path) -> None:
    ours = (MANIFEST, ATTENTION_FILE)
    foreign = [
        p.name
        for p in out_dir.iterdir()
        if not (p.name in ours or _SHARD_RE.match(p.name) or RANK_RE.match(p.name))
        and not _is_temp(p.name)
    ]
    if foreign:
        raise FileExistsError(
            f"overwrite=True but {out_dir} also holds files that are not a collection "
            f"({foreign[:5]}); choose an empty or new out_dir"
        )
    for p in out_dir.iterdir():
        p.unlink()


def _existing(out_dir: Path, settings: dict[str, Any]) -> Existing:
    manifest_path = out_dir / MANIFEST
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileExistsError(
            f"{manifest_path} is unreadable ({exc}); use a new out_dir "
            "or overwrite=True (--overwrite)"
        ) from exc
    if old.get("format") != FORMAT or old.get("settings") != settings:
        diff = _settings_diff(old.get("settings", {}), settings) or ["format"]
        raise FileExistsError(
            f"{out_dir} already holds a collection with different settings ("
            + "; ".join(diff[:6])
            + "). Refusing to mix data: use a new out_dir, or overwrite=True (--overwrite) "
            "to replace it."
        )
    existing = Existing(list(old.get("shards", [])), bool(old.get("complete")))
    for s in existing.shards:
        p = out_dir / s["file"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            raise RuntimeError(
                f"shard {p} listed in the manifest is missing or has the wrong size; the "
                "collection is damaged: rerun with overwrite=True (--overwrite)"
            )
    return existing


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now"
        for k in keys
        if old.get(k) != new.get(k)
    ]
