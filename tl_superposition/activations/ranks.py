"""A collection written by several processes (``torchrun``): who writes which shard.

Shard ``k`` always holds contexts ``k * shard_contexts ..`` of the source, whatever the number
of processes; rank ``r`` of ``n`` writes the shards ``k`` with ``k % n == r``, each rank packing
the whole source and running the model on its shards only. The shards are therefore the same
files, byte for byte, as a single process writes. Each rank records the shards it finished in
``manifest.rank{r}.json`` (its own resume point, whatever the number of processes of the earlier
run); at the end rank 0 merges the records into ``manifest.json``, marks it complete and
removes the rank files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_superposition.activations.folder import MANIFEST, RANK_FILE, RANK_RE
from tl_superposition.core.atomic import write_json_atomic
from tl_superposition.core.reading import read_json


def done_shards(out_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every finished shard's record, by file name: the manifest's and every rank file's."""
    records = {s["file"]: s for s in manifest["shards"]}
    for path in sorted(out_dir.glob("manifest.rank*.json")):
        if RANK_RE.match(path.name):
            records |= {s["file"]: s for s in read_json(path)}
    return records


def record_shard(out_dir: Path, rank: int, mine: list[dict[str, Any]]) -> None:
    """Rewrite this rank's list of finished shards (atomically)."""
    write_json_atomic(out_dir / RANK_FILE.format(rank), mine)


def merge(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, after every rank finished: list every shard in ``manifest.json`` in order,
    mark it complete and remove the rank files.

    Raises:
        RuntimeError: the shards do not cover the contexts from 0 without a gap.
    """
    shards = sorted(done_shards(out_dir, manifest).values(), key=lambda s: s["first_context"])
    n = 0
    for s in shards:
        if s["first_context"] != n:
            raise RuntimeError(f"{out_dir}: no shard holds context {n}; rerun to finish it")
        n += s["n_contexts"]
    manifest["shards"] = shards
    manifest["n_contexts"] = n
    manifest["n_tokens"] = n * manifest["settings"]["context_size"]
    manifest["complete"] = True
    write_json_atomic(out_dir / MANIFEST, manifest)
    for path in out_dir.glob("manifest.rank*.json"):
        if RANK_RE.match(path.name):
            path.unlink()
