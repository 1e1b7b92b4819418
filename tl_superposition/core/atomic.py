"""Atomic file writes: a file either appears whole under its final name or not at all.

Every writer in the package goes through :func:`atomic_path`, which hands out a temporary
path in the destination folder and renames it onto the final name only when the block exits
without an exception (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The permissions a new file (or folder) gets from ``open`` under the user's umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the permissions of the user's umask.

    Temporary files and folders (``mkstemp``, ``mkdtemp``) and some writers (SAELens's
    ``sae_weights.safetensors``) are readable by their owner only; a result moved into place
    from them should look like any file the user writes.
    """
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        os.chmod(p, default_mode(folder=p.is_dir()))


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = "", mode: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` if the block succeeds.

    The file gets permissions ``mode`` (default: those of the user's umask, as ``open`` gives;
    ``mkstemp`` would leave it readable by its owner only).

    Args:
        path: final destination. Its parent folder must exist.
        suffix: suffix for the temporary file (some writers pick the format from it).

    Raises:
        FileNotFoundError: the parent folder does not exist.
        PermissionError: the folder is not writable.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, default_mode() if mode is None else mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_empty_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is missing or an empty folder (what a new run may write into)."""
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; if the block succeeds it becomes ``path``.

    A run writes every file into the temporary folder; only when the block exits without an
    exception does the folder take ``path``'s place (the previous folder, if any, is moved
    aside by one ``os.replace`` and removed after the new one is in place). On an exception
    or an interrupt the temporary folder is removed and ``path`` is left as it was, so a
    folder holds the files of one complete run, never a mix.

    Args:
        path: the final folder. Its parent is created if missing.
        overwrite: replace a non-empty ``path``.

    Raises:
        FileExistsError: ``path`` is not empty and ``overwrite`` is false, or is a file.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} is a file, not a folder")
    if not overwrite and not is_empty_dir(final):
        raise FileExistsError(f"{final} is not empty (replace it with overwrite=True)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        apply_umask(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old / final.name, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
