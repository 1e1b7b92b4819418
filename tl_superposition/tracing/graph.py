"""The communication graph of a trace: node names, the firings and edges tables, networkx.

:mod:`~tl_superposition.tracing.trace` fills the records defined or converted here; this module
does no tracing. Nodes are the components writing to the residual stream:

- ``A{layer}.{head}``: attention head (``A9.6`` is layer 9, head 6),
- ``M{layer}``: the MLP of a layer,
- ``E``: the token (and learned position) embeddings.

:class:`Node` builds these names and :meth:`Node.parse` reads them; nothing else in the package
spells them. Edges run from an upstream component to the downstream head whose firing it feeds,
on the source side (``src``, through the key) or the destination side (``dest``, through the
query), following Franco & Crovella 2024 (arXiv 2410.00340, Sec. 5).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tl_superposition._atomic import atomic_path
from tl_superposition.tracing.decompose import LayerFirings

EDGE_COLUMNS = ["upstream", "downstream", "side", "weight", "n_firings"]
_NODE_RE = re.compile(r"A(\d+)\.(\d+)|M(\d+)|E")


class NodeKind(IntEnum):
    """What a node is; the integer values label upstream columns in numpy arrays."""

    ATTN = 0
    MLP = 1
    EMBED = 2

    @property
    def label(self) -> str:
        """``"attn"``, ``"mlp"`` or ``"embed"``: the ``kind`` attribute of graph nodes."""
        return self.name.lower()


@dataclass(frozen=True)
class Node:
    """One component of the graph. ``layer`` is -1 for ``E``; ``head`` is -1 but for heads."""

    kind: NodeKind
    layer: int = -1
    head: int = -1

    @classmethod
    def attn(cls, layer: int, head: int) -> Node:
        """The node of attention head ``(layer, head)``."""
        return cls(NodeKind.ATTN, int(layer), int(head))

    @property
    def name(self) -> str:
        """``A{layer}.{head}``, ``M{layer}`` or ``E``."""
        if self.kind == NodeKind.ATTN:
            return f"A{self.layer}.{self.head}"
        if self.kind == NodeKind.MLP:
            return f"M{self.layer}"
        return "E"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> Node:
        """The node named ``name`` (``"A9.6"``, ``"M3"`` or ``"E"``).

        Raises:
            ValueError: ``name`` is none of these forms.
        """
        m = _NODE_RE.fullmatch(name.strip())
        if m is None:
            raise ValueError(
                f"{name!r} is not a node name: expected A<layer>.<head> (attention head, e.g. "
                "A9.6), M<layer> (MLP, e.g. M3) or E (embeddings)"
            )
        head_layer, head, mlp_layer = m.groups()
        if head_layer is not None:
            return cls.attn(int(head_layer), int(head))
        if mlp_layer is not None:
            return cls(NodeKind.MLP, int(mlp_layer))
        return cls(NodeKind.EMBED)


def head_name(layer: int, head: int) -> str:
    """``A{layer}.{head}``, the node name of an attention head."""
    return Node.attn(layer, head).name


def parse_heads(spec: str | Iterable[Any] | None) -> list[tuple[int, int]] | None:
    """Parse heads given as ``"9.6,9.9"``, node names ``["A9.6", "A9.9"]`` or pairs ``[(9, 6)]``.

    Returns:
        ``[(layer, head), ...]`` (``None`` for ``None``).

    Raises:
        ValueError: an item is not ``LAYER.HEAD`` (optionally written ``A<LAYER>.<HEAD>``).
    """
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    heads = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            try:
                node = Node.parse(text if text.startswith("A") else "A" + text)
            except ValueError:
                raise ValueError(
                    f"head {item!r} is not of the form LAYER.HEAD, e.g. 9.6 or A9.6"
                ) from None
            heads.append((node.layer, node.head))
        else:
            layer, head = (int(x) for x in item)
            heads.append((layer, head))
    return heads


def check_heads(heads: Sequence[tuple[int, int]], n_layers: int, n_heads: int) -> None:
    """Raise ``ValueError`` naming every head outside a model of ``n_layers x n_heads``."""
    bad = [f"{L}.{h}" for L, h in heads if not (0 <= L < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(
            f"head {', '.join(bad)} out of range: the model has {n_layers} layers (0-"
            f"{n_layers - 1}) and {n_heads} heads per layer (0-{n_heads - 1})"
        )


# --------------------------------------------------------------------------- firings table


def firing_columns(layers: Sequence[LayerFirings], prompt_offset: int = 0) -> dict[str, Any]:
    """One batch's firings as numpy columns, layer by layer (see :func:`firings_table`).

    Args:
        layers: the batch's :class:`~tl_superposition.tracing.decompose.LayerFirings`, in
            layer order.
        prompt_offset: index of the batch's first prompt among all prompts.
    """
    cat = lambda key: torch.cat([getattr(fl, key) for fl in layers])  # noqa: E731
    layer = torch.cat([torch.full((len(fl),), fl.layer) for fl in layers])
    contrib, order, count, score = cat("contributions"), cat("order"), cat("count"), cat("score")
    keep = torch.arange(order.shape[1])[None, :] < count[:, None]
    return {
        "prompt_id": cat("prompt").numpy() + prompt_offset,
        "layer": layer.numpy(),
        "head": cat("head").numpy(),
        "dest_pos": cat("dest").numpy(),
        "src_pos": cat("src").numpy(),
        "score": score.numpy(),
        "pattern": cat("pattern").numpy(),
        "n_components": count.numpy(),
        "components": order[keep].numpy(),
        "contributions": torch.gather(contrib, 1, order)[keep].numpy(),
        "residual": (score.to(torch.float64) - contrib.sum(1)).numpy(),
        "traced": cat("traced").numpy(),
    }


def firings_table(parts: Sequence[dict[str, Any]]) -> pa.Table:
    """Arrow table of the firings of every batch (parts from :func:`firing_columns`).

    Columns: prompt_id, layer, head, dest_pos, src_pos, score, pattern, n_components,
    components and contributions (list columns, in the order of selection), residual, traced.
    """

    def cat(key: str, dtype: Any) -> np.ndarray:
        return (
            np.concatenate([p[key] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
        )

    counts = cat("n_components", np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
    columns = {
        "prompt_id": pa.array(cat("prompt_id", np.int64)),
        "layer": pa.array(cat("layer", np.int32)),
        "head": pa.array(cat("head", np.int32)),
        "dest_pos": pa.array(cat("dest_pos", np.int32)),
        "src_pos": pa.array(cat("src_pos", np.int32)),
        "score": pa.array(cat("score", np.float32)),
        "pattern": pa.array(cat("pattern", np.float32)),
        "n_components": pa.array(counts),
        "components": pa.ListArray.from_arrays(offsets, pa.array(cat("components", np.int32))),
        "contributions": pa.ListArray.from_arrays(
            offsets, pa.array(cat("contributions", np.float64))
        ),
        "residual": pa.array(cat("residual", np.float64)),
        "traced": pa.array(cat("traced", bool)),
    }
    return pa.table(columns)


# --------------------------------------------------------------------------- edges table


@dataclass
class EdgeRecords:
    """Selected edges, one row per (traced firing, side, upstream component).

    All arrays have one entry per row. ``up_kind`` holds :class:`NodeKind` values;
    ``up_layer`` / ``up_head`` are -1 where the kind has none. ``weight`` is the upstream
    write into the firing's selected directions (float64, score units).
    """

    prompt_id: np.ndarray
    down_layer: np.ndarray
    down_head: np.ndarray
    up_kind: np.ndarray
    up_layer: np.ndarray
    up_head: np.ndarray
    side: np.ndarray
    weight: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[EdgeRecords]) -> EdgeRecords:
        """All rows of ``parts``, in order."""
        if not parts:
            ints = np.zeros(0, dtype=np.int64)
            return cls(ints, ints, ints, ints, ints, ints, np.zeros(0, dtype="<U4"), np.zeros(0))
        columns = [f.name for f in fields(cls)]
        return cls(**{c: np.concatenate([getattr(p, c) for p in parts]) for c in columns})


def edges_table(records: EdgeRecords) -> pd.DataFrame:
    """Aggregate edge records over firings.

    Returns:
        One row per (upstream, downstream, side): ``weight`` is the summed write over the firings
        where the edge was selected, ``n_firings`` their number; sorted by ``n_firings`` then
        ``weight``, descending.
    """
    if len(records.weight) == 0:
        return pd.DataFrame(columns=EDGE_COLUMNS)
    raw = pd.DataFrame(
        {
            "up_kind": records.up_kind.astype(int),
            "up_layer": records.up_layer.astype(int),
            "up_head": records.up_head.astype(int),
            "down_layer": records.down_layer.astype(int),
            "down_head": records.down_head.astype(int),
            "side": records.side,
            "weight": records.weight,
        }
    )
    keys = ["up_kind", "up_layer", "up_head", "down_layer", "down_head", "side"]
    out = (
        raw.groupby(keys, sort=False)
        .agg(weight=("weight", "sum"), n_firings=("weight", "size"))
        .reset_index()
    )
    out["upstream"] = [
        Node(NodeKind(k), int(layer), int(h)).name
        for k, layer, h in zip(out.up_kind, out.up_layer, out.up_head)
    ]
    out["downstream"] = [head_name(layer, h) for layer, h in zip(out.down_layer, out.down_head)]
    out = out.sort_values(["n_firings", "weight"], ascending=False, ignore_index=True)
    return pd.DataFrame(out[EDGE_COLUMNS])


# --------------------------------------------------------------------------- graph


def build_graph(
    firings: pd.DataFrame,
    edges: pd.DataFrame,
    seeds: Sequence[tuple[int, int]],
    min_firings: int = 1,
) -> nx.MultiDiGraph:
    """The communication graph of a trace: one edge per (upstream, downstream, side).

    Args:
        firings: the firings table (needs layer, head, traced).
        edges: the edges table (:func:`edges_table`).
        seeds: the seed heads, always nodes.
        min_firings: keep edges selected in at least this many firings.

    Returns:
        A ``networkx.MultiDiGraph``. Node attributes: ``kind`` (attn/mlp/embed), ``layer`` (-1
        for E), ``head`` (-1 if none), ``n_traced_firings``. Edge attributes: ``side``,
        ``weight``, ``n_firings``; edge keys are the side, so ``G[u][v]["src"]`` works.
    """
    g = nx.MultiDiGraph()
    kept = edges.loc[edges.n_firings >= min_firings]
    traced = firings.loc[firings.traced]
    counts = Counter(zip(traced.layer.tolist(), traced["head"].tolist()))
    names = set(kept.upstream) | set(kept.downstream) | {head_name(L, h) for L, h in seeds}
    for name in sorted(names):
        node = Node.parse(name)
        n_traced = counts[(node.layer, node.head)] if node.kind == NodeKind.ATTN else 0
        g.add_node(
            name,
            kind=node.kind.label,
            layer=node.layer,
            head=node.head,
            n_traced_firings=int(n_traced),
        )
    for up, down, side, weight, n in zip(
        kept.upstream, kept.downstream, kept.side, kept.weight, kept.n_firings
    ):
        g.add_edge(up, down, key=side, side=side, weight=float(weight), n_firings=int(n))
    return g


def save_trace(
    out_dir: str | os.PathLike, firings: pd.DataFrame, edges: pd.DataFrame, graph: nx.MultiDiGraph
) -> dict[str, Path]:
    """Write ``firings.parquet``, ``edges.csv`` and ``graph.graphml`` into ``out_dir``.

    Each file is written atomically (a crash leaves the old file or none, never half of one).

    Returns:
        ``{file name: path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("firings.parquet", "edges.csv", "graph.graphml")}
    with atomic_path(paths["firings.parquet"]) as tmp:
        pq.write_table(pa.Table.from_pandas(firings, preserve_index=False), tmp)
    with atomic_path(paths["edges.csv"]) as tmp:
        edges.to_csv(tmp, index=False)
    with atomic_path(paths["graph.graphml"]) as tmp:
        nx.write_graphml(graph, tmp)
    return paths
