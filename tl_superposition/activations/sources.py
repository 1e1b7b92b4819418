"""Text sources -> documents -> token ids -> fixed-length contexts.

A *source* is anything :func:`resolve_source` understands:

- ``None`` or ``"pydoc"``: the built-in offline corpus, the English help topics shipped with
  every Python installation (``pydoc_data.topics``; about 465k characters, ~110k GPT-2 tokens).
- ``"auto"``: a source every user has. WikiText-2 (Merity et al. 2016, CC BY-SA 3.0) from the
  Hugging Face hub (dataset ``Salesforce/wikitext``, config ``wikitext-2-raw-v1``, ``split``
  default ``"train"``) when the hub can be reached, else the ``pydoc`` corpus. The choice is
  logged and recorded in the source's description (``"requested": "auto"``), so it is in the
  collection's manifest.
- a list/tuple of strings: each string is one document.
- already tokenised data: a 2-D integer tensor/array or a list of lists of token ids. Rows
  whose length equals ``context_size`` are taken as finished contexts (no BOS added); any
  other shape is treated as one document per row and packed like text.
- a path to a text file (``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.parquet``) or a folder of
  such files; read through ``datasets`` in streaming mode (no cache written). For a folder, a
  ``split`` selects the files whose name starts with it (``wikitext-2`` + ``split="valid"`` ->
  ``valid.txt``).
- a ``datasets.Dataset`` or ``datasets.IterableDataset`` object.
- any other string: a Hugging Face hub dataset name, streamed. When the hub cannot be reached
  a :class:`RuntimeError` names the local options instead of hanging.

Packing: documents are tokenised without special tokens and concatenated with a separator
token between them; the stream is cut into bodies of ``context_size - 1`` tokens, each
prefixed with BOS (or of ``context_size`` tokens without BOS when the model does not expect
one). The trailing partial context is dropped, so no padding token is ever produced. Packing
is deterministic: the same source and settings always give the same contexts in the same order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_superposition.models import hub_reachable

log = logging.getLogger(__name__)

PYDOC = "pydoc"
AUTO = "auto"
#: The hub dataset (name, config) that ``"auto"`` takes when the hub can be reached.
AUTO_HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
_HUB_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".raw": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
LOCAL_OPTIONS = (
    "a local text file or folder path (e.g. path/to/wikitext-2 with split 'valid'), "
    "'pydoc' (the built-in offline corpus), a list of strings, or already tokenised data"
)


@dataclass
class TokenSource:
    """A resolved source: how to iterate it, and a JSON-able description for the manifest.

    Exactly one of ``documents`` (yields token-id lists, one per document) and ``contexts``
    (yields finished contexts as int64 arrays of length ``context_size``) is set.
    """

    description: dict[str, Any]
    documents: Callable[[], Iterator[list[int]]] | None = None
    contexts: Callable[[], Iterator[np.ndarray]] | None = None


# --------------------------------------------------------------------------------------
# text -> documents


def pydoc_documents() -> list[str]:
    """The built-in offline corpus: Python's help topics, sorted by topic name."""
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def _tokenize_texts(tokenizer: Any, texts: Iterable[str], chunk: int = 256) -> Iterator[list[int]]:
    """Tokenise texts in chunks (fast batch tokenisation), skipping blank documents."""
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        enc = tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            if ids:
                yield list(ids)

    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"expected text documents (str), got {type(text).__name__}")
        if not text.strip():
            continue
        pending.append(text)
        if len(pending) >= chunk:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def _column_texts(rows: Iterable[dict[str, Any]], column: str, where: str) -> Iterator[str]:
    """The ``column`` field of each row; a clear error on the first row if none or no column."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{where} is empty (no rows)")
    if column not in first:
        raise ValueError(
            f"{where} has no column {column!r}; available columns: {sorted(first)}. "
            "Pass one of them as column= (--column)."
        )
    yield first[column]
    for row in it:
        yield row[column]


def _local_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in _FILE_BUILDERS and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"source folder {path} holds no readable files "
            f"(looked for {', '.join(sorted(_FILE_BUILDERS))})"
        )
    if split is not None:
        chosen = [p for p in files if p.stem == split] or [
            p for p in files if p.stem.startswith(split) or p.parent.name == split
        ]
        if not chosen:
            raise ValueError(
                f"split {split!r} matches no file in {path}; files there: "
                f"{[str(p.relative_to(path)) for p in files]}. Pass split=None to read them all."
            )
        files = chosen
    builders = {_FILE_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(
            f"source folder {path} mixes file types {sorted(builders)}; pick one split"
        )
    return files


def _fingerprint_tokens(rows: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def resolve_source(
    source: Any,
    tokenizer: Any,
    *,
    context_size: int,
    split: str | None = None,
    column: str = "text",
) -> TokenSource:
    """Turn ``source`` into a :class:`TokenSource` (see the module docstring for the kinds).

    Nothing is read yet: errors that need the data (an empty dataset, a missing column) come
    with the first document.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an empty source, a missing split, non-integer token data.
        RuntimeError: a hub dataset name while the Hugging Face hub is unreachable.
    """
    if source is None or (isinstance(source, str) and source == PYDOC):
        return _pydoc_source(tokenizer)
    if isinstance(source, str) and source == AUTO:
        return _auto_source(tokenizer, split, column)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return _array_source(source, context_size)
    if isinstance(source, (list, tuple)):
        return _list_source(source, tokenizer, context_size)
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        desc = {
            "kind": "datasets_object",
            "column": column,
            "fingerprint": getattr(source, "_fingerprint", None),
        }
        return _rows_source(lambda: iter(source), desc, tokenizer, column, "the dataset")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ValueError(f"unsupported source type {type(source).__name__}; use {LOCAL_OPTIONS}")
    path = Path(source).expanduser()
    if path.exists():
        return _local_source(path, tokenizer, split, column)
    # "org/name" is a hub dataset; "./x", "/x", "~/x" or "x.txt" can only be paths.
    if source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS:
        raise FileNotFoundError(f"source path {source!r} does not exist")
    if not hub_reachable(offline_vars=_HUB_OFFLINE_VARS):
        raise RuntimeError(
            f"source {source!r} is neither a local path nor reachable: the Hugging Face hub "
            f"cannot be reached from this machine (or HF_DATASETS_OFFLINE is set). "
            f"Use {LOCAL_OPTIONS}."
        )
    name, _, config = source.partition(":")
    return _hub_source(name, config or None, split, column, tokenizer)


def source_label(description: dict[str, Any]) -> str:
    """A short name for a source description, e.g. ``"pydoc (auto)"`` or ``"wikitext-2 valid"``."""
    kind = description.get("kind")
    if kind == "local":
        label = Path(description["path"]).name
        label += f" {description['split']}" if description.get("split") else ""
    elif kind == "hub":
        config = f":{description['config']}" if description.get("config") else ""
        label = f"{description['name']}{config} {description['split']}"
    else:
        label = str(kind)
    return label + (" (auto)" if description.get("requested") == "auto" else "")


def _pydoc_source(tokenizer: Any) -> TokenSource:
    docs = pydoc_documents()
    return TokenSource(
        description={"kind": "pydoc", "name": "pydoc_data.topics", "n_documents": len(docs)},
        documents=lambda: _tokenize_texts(tokenizer, docs),
    )


def _auto_source(tokenizer: Any, split: str | None, column: str) -> TokenSource:
    """WikiText-2 from the Hugging Face hub where it can be reached, else the pydoc corpus."""
    if hub_reachable(offline_vars=_HUB_OFFLINE_VARS):
        name, config = AUTO_HUB_DATASET
        log.info("source 'auto': the Hugging Face hub is reachable, using %s:%s", name, config)
        source = _hub_source(name, config, split, column, tokenizer)
    else:
        log.info("source 'auto': the Hugging Face hub is unreachable, using the pydoc corpus")
        source = _pydoc_source(tokenizer)
    source.description["requested"] = AUTO
    return source


def _array_source(source: torch.Tensor | np.ndarray, context_size: int) -> TokenSource:
    arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
    if arr.size == 0:
        raise ValueError("the token source is empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token data must be integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"token data must be 1-D or 2-D [n, seq], got shape {tuple(arr.shape)}")
    return _token_rows_source(list(arr.astype(np.int64)), context_size)


def _list_source(
    source: list[Any] | tuple[Any, ...], tokenizer: Any, context_size: int
) -> TokenSource:
    """Strings (one document each) or token-id sequences."""
    if len(source) == 0:
        raise ValueError("the source list is empty: give at least one document")
    if all(isinstance(s, str) for s in source):
        texts = list(source)
        if not any(t.strip() for t in texts):
            raise ValueError("every string in the source list is blank")
        h = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
        return TokenSource(
            description={"kind": "strings", "n_documents": len(texts), "sha256_16": h},
            documents=lambda: _tokenize_texts(tokenizer, texts),
        )
    if all(isinstance(s, (list, tuple, np.ndarray, torch.Tensor)) for s in source):
        rows = [np.asarray(torch.as_tensor(r).cpu(), dtype=np.int64).reshape(-1) for r in source]
        return _token_rows_source(rows, context_size)
    raise ValueError("a list source must hold only strings (documents) or only token-id sequences")


def _local_source(path: Path, tokenizer: Any, split: str | None, column: str) -> TokenSource:
    """A text file or folder, read through ``datasets`` in streaming mode (no cache written)."""
    import datasets

    files = _local_files(path, split)
    builder = _FILE_BUILDERS[files[0].suffix.lower()]
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"source {path} is empty")
    desc = {
        "kind": "local",
        "path": str(path.resolve()),
        "files": [str(f.resolve()) for f in files],
        "bytes": [f.stat().st_size for f in files],
        "split": split,
        "column": column,
    }

    def rows() -> Iterator[dict[str, Any]]:
        data_files = [str(f) for f in files]
        yield from datasets.load_dataset(
            builder, data_files=data_files, split="train", streaming=True
        )

    return _rows_source(rows, desc, tokenizer, column, f"source {path}")


def _hub_source(
    name: str, config: str | None, split: str | None, column: str, tokenizer: Any
) -> TokenSource:
    """A Hugging Face hub dataset, streamed (``split`` default ``"train"``)."""
    import datasets

    hub_split = split or "train"
    desc = {"kind": "hub", "name": name, "config": config, "split": hub_split, "column": column}

    def rows() -> Iterator[dict[str, Any]]:
        yield from datasets.load_dataset(name, config, split=hub_split, streaming=True)

    return _rows_source(rows, desc, tokenizer, column, f"dataset {name!r}")


def _rows_source(
    rows: Callable[[], Iterable[dict[str, Any]]],
    desc: dict[str, Any],
    tokenizer: Any,
    column: str,
    where: str,
) -> TokenSource:
    return TokenSource(
        description=desc,
        documents=lambda: _tokenize_texts(tokenizer, _column_texts(rows(), column, where)),
    )


def _token_rows_source(rows: list[np.ndarray], context_size: int) -> TokenSource:
    rows = [r for r in rows if r.size > 0]
    if not rows:
        raise ValueError("the token source is empty")
    desc = {"kind": "tokens", "n_rows": len(rows), "sha256_16": _fingerprint_tokens(rows)}
    if all(r.size == context_size for r in rows):
        desc["packed"] = True
        return TokenSource(description=desc, contexts=lambda: iter(rows))
    desc["packed"] = False
    return TokenSource(description=desc, documents=lambda: (r.tolist() for r in rows))


# --------------------------------------------------------------------------------------
# packing


def pack_contexts(
    documents: Iterable[Sequence[int]],
    context_size: int,
    bos_token_id: int | None,
    separator_token_id: int | None,
) -> Iterator[np.ndarray]:
    """Pack token documents into contexts of exactly ``context_size`` tokens.

    Each context is ``[BOS] + body`` when ``bos_token_id`` is given (body of
    ``context_size - 1`` tokens), else just the body. Documents are joined with
    ``separator_token_id`` (if not None); a separator is never placed at the very start of a
    body. The trailing partial context is dropped.

    Yields:
        int64 arrays of shape ``[context_size]``.
    """
    body_len = context_size - (1 if bos_token_id is not None else 0)
    if body_len < 1:
        raise ValueError(f"context_size {context_size} leaves no room for tokens after BOS")
    buf: list[int] = []
    for doc in documents:
        if buf and separator_token_id is not None:
            buf.append(separator_token_id)
        buf.extend(doc)
        start = 0
        while len(buf) - start >= body_len:
            body = buf[start : start + body_len]
            start += body_len
            if bos_token_id is not None:
                out = np.empty(context_size, dtype=np.int64)
                out[0] = bos_token_id
                out[1:] = body
            else:
                out = np.asarray(body, dtype=np.int64)
            yield out
        if start:
            del buf[:start]


def iter_contexts(
    token_source: TokenSource,
    context_size: int,
    bos_token_id: int | None,
    separator_token_id: int | None,
) -> Iterator[np.ndarray]:
    """All contexts of a resolved source, in a deterministic order (int64 ``[context_size]``)."""
    if token_source.contexts is not None:
        return token_source.contexts()
    assert token_source.documents is not None
    return pack_contexts(token_source.documents(), context_size, bos_token_id, separator_token_id)
