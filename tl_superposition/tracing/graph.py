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

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa

EDGE_COLUMNS = ["upstream", "downstream", "side", "weight", "n_firings", "n_prompts"]
WRITER_COLUMNS = ["upstream", "downstream", "side", "weight", "n_firings"]
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


# --------------------------------------------------------------------------- tables


def aggregate_edges(records: pd.DataFrame, n_heads: int, partial: bool = False) -> pd.DataFrame:
    """Edge records aggregated per (upstream head, downstream head, side).

    Args:
        records: edge records (``edge_records.parquet`` columns prompt_id, layer, head, side,
            up_layer, up_head, weight), or with ``partial=False`` also earlier results of
            ``partial=True`` (columns up_layer, up_head, down_layer, down_head, side, weight,
            n_firings, n_prompts), whose sums are added up.
        n_heads: heads per layer (unused by the sums; kept for callers naming nodes).
        partial: return the raw sums (to be combined later) instead of the final table.

    Returns:
        With ``partial=False``, the columns :data:`EDGE_COLUMNS`: ``weight`` is the summed
        write over the firings where the edge was selected, ``n_firings`` their number,
        ``n_prompts`` the number of prompts with at least one. Sorted by ``n_firings`` then
        ``weight`` (descending), then by name, so the order is total.
    """
    del n_heads
    keys = ["up_layer", "up_head", "down_layer", "down_head", "side"]
    if "n_firings" not in records.columns:
        records = records.rename(columns={"layer": "down_layer", "head": "down_head"})
        grouped = records.groupby(keys, sort=True)
        out = pd.DataFrame(
            grouped.agg(
                weight=("weight", "sum"),
                n_firings=("weight", "size"),
                n_prompts=("prompt_id", "nunique"),
            )
        ).reset_index()
    else:
        sums = records.groupby(keys, sort=True)[["weight", "n_firings", "n_prompts"]].sum()
        out = pd.DataFrame(sums).reset_index()
    if partial:
        return out
    out["upstream"] = [head_name(L, h) for L, h in zip(out.up_layer, out.up_head)]
    out["downstream"] = [head_name(L, h) for L, h in zip(out.down_layer, out.down_head)]
    out = out.sort_values(
        ["n_firings", "weight", "upstream", "downstream", "side"],
        ascending=[False, False, True, True, True],
        kind="mergesort",
        ignore_index=True,
    )
    return pd.DataFrame(out[EDGE_COLUMNS])


def aggregate_writers(parts: pd.DataFrame) -> pd.DataFrame:
    """MLP and embedding writes into traced firings, per (writer, downstream head, side).

    Args:
        parts: rows of summed writes per (down_layer, down_head, side) with ``n_firings``
            and one column per writer (``M0`` ... and ``E``).

    Returns:
        The columns :data:`WRITER_COLUMNS`: ``weight`` is the summed write (score units)
        over the ``n_firings`` traced firings of the downstream head; only MLPs below the
        downstream layer appear. Sorted like :func:`aggregate_edges`.
    """
    if parts.empty:
        return pd.DataFrame(columns=WRITER_COLUMNS)
    keys = ["down_layer", "down_head", "side"]
    sums = pd.DataFrame(parts.groupby(keys, sort=True).sum()).reset_index()
    writers = [c for c in sums.columns if c not in (*keys, "n_firings")]
    long = sums.melt(id_vars=[*keys, "n_firings"], value_vars=writers, var_name="upstream")
    up_layer = long.upstream.map(lambda name: Node.parse(name).layer)
    long = pd.DataFrame(long[(long.upstream == "E") | (up_layer < long.down_layer)])
    long.columns = [("weight" if c == "value" else c) for c in long.columns]
    long["downstream"] = [head_name(L, h) for L, h in zip(long.down_layer, long.down_head)]
    long = long.sort_values(
        ["n_firings", "weight", "upstream", "downstream", "side"],
        ascending=[False, False, True, True, True],
        kind="mergesort",
        ignore_index=True,
    )
    return pd.DataFrame(long[WRITER_COLUMNS])


def _median_from_histogram(hist: np.ndarray) -> float:
    n = int(hist.sum())
    if n == 0:
        return float("nan")
    cum = np.cumsum(hist)
    lo = int(np.searchsorted(cum, (n - 1) // 2 + 1))
    hi = int(np.searchsorted(cum, n // 2 + 1))
    return (lo + hi) / 2


class HeadStats:
    """Per-head counts accumulated over the batches of a trace (for ``heads.csv``).

    Args:
        n_layers, n_heads, d_head: the model's shape.
    """

    def __init__(self, n_layers: int, n_heads: int, d_head: int):
        shape = (n_layers, n_heads)
        self.n_firings = np.zeros(shape, dtype=np.int64)
        self.n_at_roles = np.zeros(shape, dtype=np.int64)
        self.n_traced = np.zeros(shape, dtype=np.int64)
        self.n_nonfirings = np.zeros(shape, dtype=np.int64)
        self.hist = np.zeros((*shape, d_head + 1), dtype=np.int64)
        self.hist_non = np.zeros((*shape, d_head + 1), dtype=np.int64)
        self.role_pairs: Counter[tuple[int, int, str]] = Counter()
        self.max_abs_residual = 0.0

    def add_firings(self, table: pa.Table) -> None:
        """Count one batch of firings (needs layer, head, n_components, traced, residual)."""
        layer = table.column("layer").to_numpy()
        head = table.column("head").to_numpy()
        comps = table.column("n_components").to_numpy()
        np.add.at(self.n_firings, (layer, head), 1)
        np.add.at(self.n_traced, (layer, head), table.column("traced").to_numpy().astype(int))
        np.add.at(self.hist, (layer, head, comps), 1)
        if len(table):
            res = np.abs(table.column("residual").to_numpy()).max()
            self.max_abs_residual = max(self.max_abs_residual, float(res))
        if "dest_role" in table.column_names:
            dest = table.column("dest_role").to_numpy(zero_copy_only=False)
            src = table.column("src_role").to_numpy(zero_copy_only=False)
            named = (dest != "") & (src != "")
            np.add.at(self.n_at_roles, (layer[named], head[named]), 1)
            pairs = zip(layer[named].tolist(), head[named].tolist(), dest[named], src[named])
            self.role_pairs.update((L, h, f"{d}->{s}") for L, h, d, s in pairs)

    def add_nonfirings(self, table: pa.Table) -> None:
        """Count the sampled non-firings (needs layer, head, n_components)."""
        layer = table.column("layer").to_numpy()
        head = table.column("head").to_numpy()
        np.add.at(self.n_nonfirings, (layer, head), 1)
        np.add.at(self.hist_non, (layer, head, table.column("n_components").to_numpy()), 1)

    def median_components(self) -> float:
        """The median number of components over every firing."""
        return _median_from_histogram(self.hist.sum((0, 1)))

    def table(self) -> pd.DataFrame:
        """One row per head.

        Columns: node (``A9.6``), layer, head, n_firings (all firings), n_firings_at_roles
        (destination and source both at a named role), n_traced, median_components,
        top_role_pair (the most frequent ``dest_role->src_role``, e.g. ``END->IO``) and its
        firings, n_nonfirings (sampled) and their median_components_nonfirings.
        """
        n_layers, n_heads = self.n_firings.shape
        top: dict[tuple[int, int], tuple[str, int]] = {}
        for (L, h, pair), n in sorted(self.role_pairs.items()):
            if n > top.get((L, h), ("", 0))[1]:
                top[(L, h)] = (pair, n)
        rows = []
        for L in range(n_layers):
            for h in range(n_heads):
                pair, n_pair = top.get((L, h), ("", 0))
                rows.append(
                    {
                        "node": head_name(L, h),
                        "layer": L,
                        "head": h,
                        "n_firings": int(self.n_firings[L, h]),
                        "n_firings_at_roles": int(self.n_at_roles[L, h]),
                        "n_traced": int(self.n_traced[L, h]),
                        "median_components": _median_from_histogram(self.hist[L, h]),
                        "top_role_pair": pair,
                        "top_role_pair_firings": n_pair,
                        "n_nonfirings": int(self.n_nonfirings[L, h]),
                        "median_components_nonfirings": _median_from_histogram(self.hist_non[L, h]),
                    }
                )
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- graphs


def build_graph(
    heads: pd.DataFrame,
    edges: pd.DataFrame,
    seeds: Sequence[tuple[int, int]],
    min_firings: int = 1,
) -> nx.MultiDiGraph:
    """The communication graph of a trace: one edge per (upstream, downstream, side).

    Args:
        heads: the per-head table (``heads.csv``; needs node, n_firings, n_traced).
        edges: the edges table (:func:`aggregate_edges`).
        seeds: the seed heads, always nodes.
        min_firings: keep edges selected in at least this many firings.

    Returns:
        A ``networkx.MultiDiGraph``. Node attributes: ``kind`` (attn), ``layer``, ``head``,
        ``n_firings``, ``n_traced_firings``. Edge attributes: ``side``, ``weight``,
        ``n_firings``, ``n_prompts``; edge keys are the side, so ``G[u][v]["src"]`` works.
    """
    g = nx.MultiDiGraph()
    kept = edges.loc[edges.n_firings >= min_firings]
    info = heads.set_index("node") if len(heads) else pd.DataFrame()
    names = set(kept.upstream) | set(kept.downstream) | {head_name(L, h) for L, h in seeds}
    for name in sorted(names):
        node = Node.parse(name)
        row = info.loc[name] if name in info.index else None
        g.add_node(
            name,
            kind=node.kind.label,
            layer=node.layer,
            head=node.head,
            n_firings=int(row.n_firings) if row is not None else 0,
            n_traced_firings=int(row.n_traced) if row is not None else 0,
        )
    for up, down, side, weight, n, n_p in zip(
        kept.upstream, kept.downstream, kept.side, kept.weight, kept.n_firings, kept.n_prompts
    ):
        g.add_edge(
            up,
            down,
            key=side,
            side=side,
            weight=float(weight),
            n_firings=int(n),
            n_prompts=int(n_p),
        )
    return g


def paper_graph(
    edge_records: pd.DataFrame, firings: pd.DataFrame, first_layer: int = 1
) -> nx.DiGraph:
    """The trace as a graph in Franco & Crovella's shape (``full_tracing_build_graph.py``).

    Nodes: each head (``A9.6``) and each (head, token role) it is written to (``A9.6@END``;
    without roles, ``A9.6@pos7``). An edge runs from the upstream head to the downstream
    head at the role of the position written (the source's role on the source side, the
    destination's on the destination side), and from every role node to its head. Edges of
    unnamed positions are dropped, as the authors drop unlabelled tokens.

    Edge weight: per prompt, the mean write of the edge's records in that prompt (one value
    per prompt: duplicates within a prompt are merged; the authors keep the first one
    reached), then the mean over the prompts where it occurs (``n_prompts``), in score units.
    ``side`` is ``src``, ``dest`` or ``src+dest``. Role-to-head edges have weight 0 and
    ``side="role"``. Node attribute ``n_firings``: the head's firings over all prompts in
    layers ``>= first_layer`` (all of them, traced or not).

    Args:
        edge_records: ``edge_records.parquet``.
        firings: ``firings.parquet`` (needs layer, head).
        first_layer: firings counted from this layer.
    """
    g = nx.DiGraph()
    rec = edge_records
    if "pos_role" in rec.columns:
        role = rec.pos_role.fillna("").astype(str)
    else:
        role = "pos" + rec.pos.astype(str)
    rec = rec.assign(role=role)[role != ""]
    counts = firings.loc[firings.layer >= first_layer].groupby(["layer", "head"]).size()
    n_firings = {head_name(L, h): int(n) for (L, h), n in counts.items()}
    if rec.empty:
        return g
    rec = rec.assign(
        up=[head_name(L, h) for L, h in zip(rec.up_layer, rec.up_head)],
        down=[head_name(L, h) for L, h in zip(rec.layer, rec["head"])],
    )
    per_prompt = rec.groupby(["up", "down", "role", "prompt_id"], sort=True).agg(
        weight=("weight", "mean"), side=("side", lambda s: "+".join(sorted(set(s), reverse=True)))
    )
    per_edge = per_prompt.groupby(["up", "down", "role"], sort=True).agg(
        weight=("weight", "mean"),
        n_prompts=("weight", "size"),
        side=(
            "side",
            lambda s: "+".join(sorted({x for v in s for x in v.split("+")}, reverse=True)),
        ),
    )
    for name in sorted(set(per_edge.index.get_level_values(0)) | set(rec.down)):
        node = Node.parse(name)
        g.add_node(
            name, kind="head", layer=node.layer, head=node.head, n_firings=n_firings.get(name, 0)
        )
    for (up, down, role_name), row in per_edge.iterrows():  # type: ignore[misc]
        target = f"{down}@{role_name}"
        if target not in g:
            node = Node.parse(down)
            g.add_node(
                target, kind="role", layer=node.layer, head=node.head, n_firings=0, role=role_name
            )
            g.add_edge(target, down, weight=0.0, n_prompts=0, side="role")
        g.add_edge(
            up, target, weight=float(row.weight), n_prompts=int(row.n_prompts), side=row.side
        )
    return g
