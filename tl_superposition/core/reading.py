"""Reading saved files with one clear error when a file is truncated or corrupt.

A run interrupted while another program copied its folder, a full disk, or a partial
download leaves files that the libraries reject with messages naming neither the file nor the
fix (safetensors' ``incomplete metadata``, PyTorch's ``failed finding central directory``).
:func:`reading` turns those into :class:`CorruptFileError`, a ``ValueError`` whose one line
names the file and what to do; the command line prints it as such.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

#: What the readers of safetensors, torch, json and zip files raise on a damaged file.
DAMAGE: tuple[type[BaseException], ...] = (
    SafetensorError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    json.JSONDecodeError,
    UnicodeDecodeError,
)

#: PyTorch reports a damaged archive as a RuntimeError with one of these phrases.
TORCH_DAMAGE = ("PytorchStreamReader", "zip archive", "unexpected EOF", "invalid header")


class CorruptFileError(ValueError):
    """A saved file that cannot be read back: truncated, or not what its name says."""


def _is_damage(exc: BaseException) -> bool:
    if isinstance(exc, DAMAGE):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc) for p in TORCH_DAMAGE)


@contextmanager
def reading(
    path: str | os.PathLike,
    fix: str = "restore it, or delete it and rerun the command that wrote it",
) -> Iterator[None]:
    """Run the ``with`` body, turning a damaged-file error from it into :class:`CorruptFileError`.

    Args:
        path: the file being read, or the folder whose files are read (named in the message).
        fix: what the user should do, appended to the message.

    Raises:
        CorruptFileError: the body raised one of :data:`DAMAGE`, or PyTorch's damaged-archive
            ``RuntimeError``; other exceptions pass through unchanged.
    """
    try:
        yield
    except Exception as exc:
        if not _is_damage(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = (
            "holds a truncated or corrupt file"
            if os.path.isdir(path)
            else "is truncated or corrupt"
        )
        raise CorruptFileError(f"{os.fspath(path)} {what} ({detail[:120]}); {fix}") from exc


def read_json(path: str | os.PathLike, fix: str | None = None) -> Any:
    """The JSON value in ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: ``path`` is not valid JSON (truncated, or not JSON); the message names
            it and ``fix`` (default: restore it, or delete it and rerun the command that wrote
            it).
    """
    with reading(path, *([fix] if fix else [])):
        return json.loads(Path(path).read_text())
