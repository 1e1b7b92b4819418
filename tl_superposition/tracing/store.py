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

from tl_superposition.core.atomic import atomic_path, default_mode
from tl_superposition.tracing.graph import (
    HeadStats,
    aggregate_edges,
    aggregate_writers,
)

if TYPE_CHECKING:
    from tl_superposition.tracing.decompose import BatchFirings
    from tl_superposition.tracing.walk import WalkResult

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
    sums: np.ndarray | None = None,
) -> pa.Table:
    """One batch's firings (or non-firings, without ``sums``) as an arrow table.

    Columns: see the module docstring; components and contributions are list columns in
    the order of selection. Roles are looked up in ``role_pos`` (name -> position per
    prompt, prompts numbered from 0 over the whole trace). ``sums`` (``[n, 2, 4]``, NaN for
    firings not measured) gives the ``*_from_*`` columns.
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
    if sums is not None:
        for i, side in enumerate(SIDES):
            for j, kind in enumerate(KINDS):
                cols[f"{side}_from_{kind}"] = pa.array(sums[:, i, j].astype(np.float32))
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
        self.first_ids: list[int] = []
        self.prompt_offsets: list[int] = []

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
            # no dictionary pages: a third of the write time, files about the same size;
            # the batch tables that finalize reads back once are neither compressed nor
            # given statistics (faster to write and five times faster to read)
            final = name in self.FILES
            self._writers[name] = pq.ParquetWriter(
                self.tmp / name,
                table.schema,
                use_dictionary=False,
                compression="snappy" if final else "none",
                write_statistics=final,
            )
        self._writers[name].write_table(table, row_group_size=max(len(table), 1))

    def _tables(
        self,
        prompt_offset: int,
        first: int,
        firings: BatchFirings,
        walk: WalkResult,
        role_pos: Mapping[str, Tensor],
    ) -> dict[str, pa.Table]:
        """The temporary tables of one batch: firings (with reach bits), edges, writes."""
        n, n_layers = len(firings), self.shape[0]
        sums = np.full((n, 2, len(KINDS)), np.nan, dtype=np.float32)
        sums[walk.rows] = walk.sums
        table = firing_table(firings, prompt_offset, first, role_pos, sums)
        table = table.append_column("reach", pa.array(walk.reach.astype(np.int64)))
        e = walk.edges
        candidates = pa.table(
            {
                "firing_id": pa.array(e.firing.astype(np.int64) + first),
                "side": pa.array(e.side.astype(np.int8)),
                "up_layer": pa.array(e.up_layer.astype(np.int32)),
                "up_head": pa.array(e.up_head.astype(np.int32)),
                "weight": pa.array(e.weight.astype(np.float32)),
            }
        )
        width = 2 * (n_layers + 1)
        leaf = pa.table(
            {
                "firing_id": pa.array(walk.rows.astype(np.int64) + first),
                "leaf": pa.FixedSizeListArray.from_arrays(
                    pa.array(walk.leaf.astype(np.float32).ravel()), width
                ),
            }
        )
        return {"firings": table, "candidates": candidates, "leaf": leaf}

    def add_batch(
        self,
        prompt_offset: int,
        firings: BatchFirings,
        walk: WalkResult,
        nonfirings: BatchFirings,
        role_pos: Mapping[str, Tensor],
    ) -> None:
        """Append one batch: its firings, the walk's edges and writes, the non-firings.

        Every call writes exactly one row group to each temporary file, so row group ``i``
        of every file belongs to batch ``i``.
        """
        first = self.n_firings
        self.has_roles = bool(role_pos)
        self.first_ids.append(first)
        for name, table in self._tables(prompt_offset, first, firings, walk, role_pos).items():
            self._write(name, table)
        table = firing_table(nonfirings, prompt_offset, 0, role_pos).drop(["firing_id"])
        self._write(self.NONFIRINGS, table)
        self.prompt_offsets.append(prompt_offset)
        self.n_firings += len(firings)
        self.n_batches += 1

    def replace_batch(
        self, i: int, firings: BatchFirings, walk: WalkResult, role_pos: Mapping[str, Tensor]
    ) -> None:
        """Replace batch ``i``'s firings, edges and writes (a batch walked again)."""
        tables = self._tables(self.prompt_offsets[i], self.first_ids[i], firings, walk, role_pos)
        for name, table in tables.items():
            pq.write_table(table, self.tmp / f"replaced-{i}-{name}")

    def _read(self, name: str, i: int, replaced: Sequence[int]) -> pa.Table:
        if i in replaced:
            return pq.read_table(self.tmp / f"replaced-{i}-{name}")
        return pq.ParquetFile(self.tmp / name).read_row_group(i)

    # ------------------------------------------------------------------ finalize

    def finalize(self, mask: int, replaced: Sequence[int] = ()) -> dict[str, Any]:
        """Keep the firings reached from the seeds and write the final files.

        Args:
            mask: the reach bits of the chosen seeds: a firing is traced when its reach
                mask shares a bit with it.
            replaced: batches whose tables :meth:`replace_batch` replaced.

        Returns:
            Counts for :attr:`~tl_superposition.tracing.trace.TraceResult.stats`.
        """
        self._close()
        stats = HeadStats(*self.shape)
        edge_parts: list[pd.DataFrame] = []
        writer_parts: list[pd.DataFrame] = []
        n_traced = n_records = 0
        for i in range(self.n_batches):
            f = self._read("firings", i, replaced)
            traced = (f.column("reach").to_numpy() & np.int64(mask)) != 0
            f = self._final_firings(f, traced)
            self._write(self.FIRINGS, f)
            stats.add_firings(f)
            c = self._read("candidates", i, replaced).to_pandas()
            first = self.first_ids[i]
            records = self._edge_records(f, c, traced[c.firing_id.to_numpy() - first], first)
            self._write(self.EDGE_RECORDS, pa.Table.from_pandas(records, preserve_index=False))
            edge_parts.append(aggregate_edges(records, self.shape[1], partial=True))
            leaf = self._read("leaf", i, replaced)
            writer_parts.append(self._writer_part(f, leaf, traced, first))
            n_traced += int(traced.sum())
            n_records += len(records)
        nonfirings = self.tmp / self.NONFIRINGS
        if nonfirings.exists():
            columns = ["layer", "head", "n_components"]
            stats.add_nonfirings(pq.read_table(nonfirings, columns=columns))
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

    @staticmethod
    def _final_firings(f: pa.Table, traced: np.ndarray) -> pa.Table:
        """Drop the reach bits, blank the writes of firings not traced, add ``traced``."""
        f = f.drop(["reach"])
        for i, name in enumerate(f.column_names):
            if "_from_" in name:
                values = f.column(name).to_numpy().copy()
                values[~traced] = np.nan
                f = f.set_column(i, name, pa.array(values))
        return f.append_column("traced", pa.array(traced))

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
            # typed as strings even when empty: a batch without edges must write the schema
            # of the batches with edges (an empty object column would be arrow's null type)
            roles = np.where(side == 0, take("src_role"), take("dest_role"))
            out["pos_role"] = pd.array(roles, dtype="str")
        out |= {
            "up_layer": c.up_layer.to_numpy(),
            "up_head": c.up_head.to_numpy(),
            "weight": c.weight.to_numpy(),
        }
        return pd.DataFrame(out)

    def _writer_part(
        self, f: pa.Table, leaf: pa.Table, traced: np.ndarray, first: int
    ) -> pd.DataFrame:
        """Per (downstream head, side) of traced firings: summed MLP and embedding writes."""
        n_layers = self.shape[0]
        row = leaf.column("firing_id").to_numpy() - first
        values = leaf.column("leaf").combine_chunks().flatten().to_numpy()
        values = values.reshape(len(row), 2, n_layers + 1)
        keep = traced[row]
        row, values = row[keep], values[keep]
        layer, head = f.column("layer").to_numpy()[row], f.column("head").to_numpy()[row]
        parts = []
        names = [f"M{L}" for L in range(n_layers)] + ["E"]
        for i, side in enumerate(SIDES):
            frame = pd.DataFrame(values[:, i], columns=names)
            frame["down_layer"], frame["down_head"] = layer, head
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
            os.chmod(path, default_mode())
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
