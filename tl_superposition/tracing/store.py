"""The files of a trace, streamed batch by batch and completed once the seeds are known.

:class:`TraceStore` receives each batch of :func:`~tl_superposition.tracing.trace.trace` as
soon as it is decomposed and appends it as one parquet row group to temporary files in a
hidden folder inside the output folder; nothing of a batch stays in memory. When every batch
is done, :meth:`TraceStore.finalize` reads the row groups back one at a time, walks the
candidate edges from the seeds (:func:`~tl_superposition.tracing.trace.walk_upstream`),
writes the final files and aggregates the tables, then moves every file onto its final name
(``os.replace``: a file is either the old one or the complete new one). An interrupted trace
leaves the output folder as it was.

Files (names in :attr:`TraceStore.FILES`):

- ``firings.parquet``: one row per firing: firing_id, prompt_id, layer, head, dest_pos,
  src_pos, dest_role and src_role (with roles), score, pattern, n_components, components,
  contributions, residual, the summed writes into each side's signal by kind
  (``src_from_heads``, ``src_from_mlps``, ``src_from_embed``, ``src_from_bias`` and the same
  for ``dest``), traced.
- ``edge_records.parquet``: one row per edge of a traced firing: firing_id, prompt_id, layer,
  head, dest_pos, src_pos (the downstream firing), side, pos (where the upstream head
  writes), pos_role (with roles), up_layer, up_head, weight.
- ``edges.csv``: edges aggregated over traced firings (:func:`~.graph.aggregate_edges`).
- ``writers.csv``: MLP and embedding writes into traced firings, aggregated the same way
  (not edges: reported beside them).
- ``heads.csv``: one row per head (:func:`~.graph.heads_table`).
- ``nonfirings.parquet``: the decomposed sample of non-firings (firings' columns up to
  residual).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from tl_superposition._atomic import atomic_path
from tl_superposition.tracing.graph import (
    HeadStats,
    aggregate_edges,
    aggregate_writers,
)

if TYPE_CHECKING:
    from tl_superposition.tracing.trace import BatchFirings, CandidateEdges, SideWrites

SIDES = ("src", "dest")
KINDS = ("heads", "mlps", "embed", "bias")


def _roles(role_pos: Mapping[str, Tensor], prompt: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = np.full(len(pos), "", dtype=object)
    for name, where in role_pos.items():
        out[where.numpy()[prompt] == pos] = name
    return out


def firing_table(
    f: BatchFirings,
    prompt_offset: int,
    id_offset: int,
    role_pos: Mapping[str, Tensor],
    writes: SideWrites | None = None,
) -> pa.Table:
    """One batch's firings (or non-firings, without ``writes``) as an arrow table.

    Columns: see the module docstring; components and contributions are list columns in
    the order of selection. Roles are looked up in ``role_pos`` (name -> position per
    prompt, prompts numbered from 0 over the whole trace).
    """
    n = len(f)
    keep = torch.arange(f.order.shape[1])[None, :] < f.count[:, None]
    counts = f.count.numpy().astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
    prompt = f.prompt.numpy() + prompt_offset
    cols: dict[str, Any] = {
        "firing_id": pa.array(np.arange(id_offset, id_offset + n, dtype=np.int64)),
        "prompt_id": pa.array(prompt.astype(np.int64)),
        "layer": pa.array(f.layer.numpy().astype(np.int32)),
        "head": pa.array(f.head.numpy().astype(np.int32)),
        "dest_pos": pa.array(f.dest.numpy().astype(np.int32)),
        "src_pos": pa.array(f.src.numpy().astype(np.int32)),
    }
    if role_pos:
        cols["dest_role"] = pa.array(_roles(role_pos, prompt, f.dest.numpy()), pa.string())
        cols["src_role"] = pa.array(_roles(role_pos, prompt, f.src.numpy()), pa.string())
    cols |= {
        "score": pa.array(f.score.numpy().astype(np.float32)),
        "pattern": pa.array(f.pattern.numpy().astype(np.float32)),
        "n_components": pa.array(counts),
        "components": pa.ListArray.from_arrays(
            offsets, pa.array(f.order[keep].numpy().astype(np.int32))
        ),
        "contributions": pa.ListArray.from_arrays(
            offsets, pa.array(torch.gather(f.contributions, 1, f.order)[keep].numpy())
        ),
        "residual": pa.array((f.score.to(torch.float64) - f.contributions.sum(1)).numpy()),
    }
    if writes is not None:
        sums = {
            "heads": writes.heads.sum(1),
            "mlps": writes.mlps.sum(1),
            "embed": writes.embed,
            "bias": writes.bias,
        }
        for i, side in enumerate(SIDES):
            for kind in KINDS:
                cols[f"{side}_from_{kind}"] = pa.array(sums[kind][i * n : (i + 1) * n].numpy())
    return pa.table(cols)


class TraceStore:
    """Streams a trace to parquet and completes its files (see the module docstring).

    Use as a context manager: on an exception the temporary folder is removed and the
    output folder is left as it was.

    Args:
        out_dir: the output folder (created if missing).
        n_layers, n_heads, d_head: the model's shape.
    """

    FIRINGS = "firings.parquet"
    EDGE_RECORDS = "edge_records.parquet"
    EDGES = "edges.csv"
    WRITERS = "writers.csv"
    HEADS = "heads.csv"
    NONFIRINGS = "nonfirings.parquet"
    FILES = (FIRINGS, EDGE_RECORDS, EDGES, WRITERS, HEADS, NONFIRINGS)

    def __init__(self, out_dir: str | os.PathLike, n_layers: int, n_heads: int, d_head: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shape = (n_layers, n_heads, d_head)
        self.tmp = Path(tempfile.mkdtemp(prefix=".trace-", dir=self.out))
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.n_firings = 0
        self.n_batches = 0
        self.has_roles = False

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def _write(self, name: str, table: pa.Table) -> None:
        if name not in self._writers:
            self._writers[name] = pq.ParquetWriter(self.tmp / name, table.schema)
        self._writers[name].write_table(table, row_group_size=max(len(table), 1))

    def add_batch(
        self,
        prompt_offset: int,
        firings: BatchFirings,
        writes: SideWrites,
        edges: CandidateEdges,
        nonfirings: BatchFirings,
        role_pos: Mapping[str, Tensor],
    ) -> None:
        """Append one batch: its firings, candidate edges, MLP/embedding writes, non-firings.

        Every call writes exactly one row group to each temporary file, so row group ``i``
        of every file belongs to batch ``i``.
        """
        n, first = len(firings), self.n_firings
        self.has_roles = bool(role_pos)
        self._write("firings", firing_table(firings, prompt_offset, first, role_pos, writes))
        self._write(
            "candidates",
            pa.table(
                {
                    "firing_id": pa.array(edges.firing.astype(np.int64) + first),
                    "side": pa.array(edges.side.astype(np.int8)),
                    "up_layer": pa.array(edges.up_layer.astype(np.int32)),
                    "up_head": pa.array(edges.up_head.astype(np.int32)),
                    "weight": pa.array(edges.weight.astype(np.float32)),
                }
            ),
        )
        n_layers = self.shape[0]
        mlps = writes.mlps.numpy().astype(np.float32)
        self._write(
            "leaf",
            pa.table(
                {
                    "mlps": pa.FixedSizeListArray.from_arrays(pa.array(mlps.ravel()), n_layers),
                    "embed": pa.array(writes.embed.numpy().astype(np.float32)),
                }
            ),
        )
        self._write(
            self.NONFIRINGS,
            firing_table(nonfirings, prompt_offset, 0, role_pos).drop(["firing_id"]),
        )
        self.n_firings += n
        self.n_batches += 1

    # ------------------------------------------------------------------ finalize

    def finalize(
        self,
        seeds: Sequence[tuple[int, int]],
        seed_dest: np.ndarray,
        seed_src: np.ndarray | None,
        first_layer: int,
    ) -> dict[str, Any]:
        """Walk from the seeds batch by batch and write the final files.

        Args:
            seeds: the seed heads.
            seed_dest, seed_src: per prompt (over the whole trace), the seed positions.
            first_layer: firings below it are never traced.

        Returns:
            Counts for :attr:`~tl_superposition.tracing.trace.TraceResult.stats`.
        """
        from tl_superposition.tracing.trace import CandidateEdges, seed_firings, walk_upstream

        self._close()
        src = {name: pq.ParquetFile(self.tmp / name) for name in ("firings", "candidates", "leaf")}
        stats = HeadStats(*self.shape)
        edge_parts: list[pd.DataFrame] = []
        writer_parts: list[pd.DataFrame] = []
        n_traced = n_records = 0
        for i in range(self.n_batches):
            f = src["firings"].read_row_group(i)
            c = src["candidates"].read_row_group(i).to_pandas()
            cols = {k: f.column(k).to_numpy() for k in ("prompt_id", "layer", "head")}
            cols |= {k: f.column(k).to_numpy() for k in ("dest_pos", "src_pos", "firing_id")}
            first = int(cols["firing_id"][0]) if len(f) else 0
            cand = CandidateEdges(
                firing=c.firing_id.to_numpy() - first,
                side=c.side.to_numpy(),
                up_layer=c.up_layer.to_numpy(),
                up_head=c.up_head.to_numpy(),
                weight=c.weight.to_numpy(),
            )
            p, ly, h, d, s = (
                cols[k] for k in ("prompt_id", "layer", "head", "dest_pos", "src_pos")
            )
            start = seed_firings(p, ly, h, d, s, seeds, seed_dest, seed_src)
            traced = walk_upstream(p, ly, h, d, s, cand, start, first_layer)
            f = f.append_column("traced", pa.array(traced))
            self._write(self.FIRINGS, f)
            stats.add_firings(f)
            records = self._edge_records(f, c, traced[cand.firing], first)
            self._write(self.EDGE_RECORDS, pa.Table.from_pandas(records, preserve_index=False))
            edge_parts.append(aggregate_edges(records, self.shape[1], partial=True))
            leaf = src["leaf"].read_row_group(i)
            writer_parts.append(self._writer_part(f, leaf, traced))
            n_traced += int(traced.sum())
            n_records += len(records)
        nonfirings = self.tmp / self.NONFIRINGS
        if nonfirings.exists():
            stats.add_nonfirings(
                pq.read_table(nonfirings, columns=["layer", "head", "n_components"])
            )
        self._close()
        edges = aggregate_edges(pd.concat(edge_parts, ignore_index=True), self.shape[1])
        writers = aggregate_writers(pd.concat(writer_parts, ignore_index=True))
        heads = stats.table()
        for name, table in ((self.EDGES, edges), (self.WRITERS, writers), (self.HEADS, heads)):
            table.to_csv(self.tmp / name, index=False)
        self._publish()
        return {
            "n_firings": self.n_firings,
            "n_traced_firings": n_traced,
            "n_edges": len(edges),
            "n_edge_records": n_records,
            "n_nonfirings": int(heads.n_nonfirings.sum()),
            "max_abs_residual": stats.max_abs_residual,
            "median_n_components": stats.median_components(),
        }

    def _edge_records(
        self, f: pa.Table, c: pd.DataFrame, traced: np.ndarray, first: int
    ) -> pd.DataFrame:
        """The candidate edges of traced firings, with their downstream firing's columns."""
        c = pd.DataFrame(c[traced])
        row = c.firing_id.to_numpy() - first
        take = lambda k: f.column(k).to_numpy()[row]  # noqa: E731
        side = c.side.to_numpy()
        dest, srcp = take("dest_pos"), take("src_pos")
        out = {
            "firing_id": c.firing_id.to_numpy(),
            "prompt_id": take("prompt_id"),
            "layer": take("layer"),
            "head": take("head"),
            "dest_pos": dest,
            "src_pos": srcp,
            "side": np.where(side == 0, "src", "dest"),
            "pos": np.where(side == 0, srcp, dest).astype(np.int32),
        }
        if self.has_roles:
            out["pos_role"] = np.where(side == 0, take("src_role"), take("dest_role"))
        out |= {
            "up_layer": c.up_layer.to_numpy(),
            "up_head": c.up_head.to_numpy(),
            "weight": c.weight.to_numpy(),
        }
        return pd.DataFrame(out)

    def _writer_part(self, f: pa.Table, leaf: pa.Table, traced: np.ndarray) -> pd.DataFrame:
        """Per (downstream head, side) of traced firings: summed MLP and embedding writes."""
        n, n_layers = len(f), self.shape[0]
        mlps = leaf.column("mlps").combine_chunks().flatten().to_numpy().reshape(-1, n_layers)
        embed = leaf.column("embed").to_numpy()
        layer, head = f.column("layer").to_numpy(), f.column("head").to_numpy()
        parts = []
        for i, side in enumerate(SIDES):
            rows = slice(i * n, (i + 1) * n)
            frame = pd.DataFrame(mlps[rows][traced], columns=[f"M{L}" for L in range(n_layers)])
            frame["E"] = embed[rows][traced]
            frame["down_layer"], frame["down_head"] = layer[traced], head[traced]
            frame["side"], frame["n_firings"] = side, 1
            sums = frame.groupby(["down_layer", "down_head", "side"]).sum()
            parts.append(pd.DataFrame(sums).reset_index())
        return pd.concat(parts, ignore_index=True)

    def _publish(self) -> None:
        """Move every finished file from the temporary folder onto its final name."""
        for name in self.FILES:
            path = self.tmp / name
            if not path.exists():
                continue
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(path, 0o644)
            os.replace(path, self.out / name)

    @classmethod
    def copy(cls, src_dir: Path, dst_dir: Path, graph: nx.MultiDiGraph) -> dict[str, Path]:
        """Copy a trace's files to ``dst_dir`` (atomically each) and write ``graph.graphml``.

        Returns:
            ``{file name: path}`` of every file in ``dst_dir``.
        """
        dst_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        same = src_dir.resolve() == dst_dir.resolve()
        for name in cls.FILES:
            if not (src_dir / name).exists():
                continue
            paths[name] = dst_dir / name
            if not same:
                with atomic_path(paths[name]) as tmp:
                    shutil.copyfile(src_dir / name, tmp)
        paths["graph.graphml"] = dst_dir / "graph.graphml"
        with atomic_path(paths["graph.graphml"]) as tmp:
            nx.write_graphml(graph, tmp)
        return paths
