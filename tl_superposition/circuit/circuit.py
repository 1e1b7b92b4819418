"""The circuit extracted from a trace: its tables, the head ranking, its files.

:class:`Circuit` holds the unified role graph with, for every edge, its frequency, weight,
intervention effect and status, and marks the pruned circuit inside it (``in_circuit``).
:meth:`Circuit.heads` ranks every head of the model (the ranking the evaluation turns into
circuits of any size), :meth:`Circuit.save` writes ``circuit.json``, ``circuit.graphml``,
``circuit_heads.csv`` and the views by role (``circuit.png``, ``circuit.html``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from tl_superposition._atomic import atomic_path, write_json_atomic
from tl_superposition.circuit.graphs import ROOT, parse_node

FILES = ("circuit.json", "circuit.graphml", "circuit_heads.csv", "circuit.png", "circuit.html")


def _node_scores(nodes: pd.DataFrame, edges: pd.DataFrame) -> np.ndarray:
    """Per node, the largest size of the logit-difference change among its out-edges that
    were measured (``kept`` or ``weak``), or of its mean attribution where it is a seed."""
    best: dict[str, float] = {}
    measured = edges.status.isin(["kept", "weak"]).to_numpy()
    root = (edges.status == "root").to_numpy()
    size = np.where(measured, edges.effect_mean.abs(), np.where(root, edges.mean_weight.abs(), 0))
    for up, value, used in zip(edges.up, size, measured | root):
        if used:
            best[up] = max(best.get(up, 0.0), float(value))
    return np.array([best.get(n, 0.0) for n in nodes.node])


@dataclass
class Circuit:
    """A pruned circuit inside the unified role graph of a trace (ACC++).

    Attributes:
        nodes: one row per node of the unified graph: node, kind, layer, head, dest_role,
            src_role, n_prompts (prompt graphs it appears in), in_circuit, score (see
            :meth:`heads`).
        edges: one row per edge: up, down, side (``src``, ``dest``, ``logits``), weight
            (summed over prompt graphs / their number), mean_weight (over the prompts where
            it occurs), n_prompts, effect_mean and effect_std (change of logit(IO) - logit(S)
            under the local edit, over the prompts where it occurs), n_measured, status
            (``root``, ``kept``, ``weak``, ``rare``, ``unreached``: see
            :func:`~tl_superposition.circuit.extract.measure_edges`), in_circuit.
        params: every setting (:class:`~tl_superposition.circuit.extract.CircuitConfig`, the
            trace's, the model's shape, the prompt counts).
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    params: dict[str, Any]

    @classmethod
    def from_edges(
        cls, nodes: pd.DataFrame, edges: pd.DataFrame, params: dict[str, Any]
    ) -> Circuit:
        """Mark the pruned circuit: the kept and root edges and their nodes; score nodes."""
        edges = edges.copy()
        n_graphs = params.get("n_prompt_graphs", 1)
        edges["mean_weight"] = edges.weight * n_graphs / edges.n_prompts.clip(lower=1)
        edges["in_circuit"] = edges.status.isin(["kept", "root"])
        kept = edges[edges.in_circuit]
        inside = set(kept.up) | set(kept.down)
        nodes = nodes.copy()
        nodes["in_circuit"] = nodes.node.isin(inside)
        nodes["score"] = _node_scores(nodes, edges)
        return cls(nodes=nodes, edges=edges, params=params)

    @property
    def circuit_nodes(self) -> pd.DataFrame:
        """The nodes of the pruned circuit."""
        return pd.DataFrame(self.nodes[self.nodes.in_circuit])

    @property
    def circuit_edges(self) -> pd.DataFrame:
        """The edges of the pruned circuit."""
        return pd.DataFrame(self.edges[self.edges.in_circuit])

    def head_set(self) -> set[tuple[int, int]]:
        """The ``(layer, head)`` of every attention node of the pruned circuit."""
        heads = self.circuit_nodes[self.circuit_nodes.kind == "attn"]
        return {(int(L), int(h)) for L, h in zip(heads.layer, heads["head"])}

    def heads(self) -> pd.DataFrame:
        """Every head of the model, ranked (``circuit_heads.csv``).

        A head's score is the largest score of its nodes: the size of the largest
        logit-difference change among a node's measured out-edges, or its mean attribution
        to the logit difference for a seed. Heads of the pruned circuit rank first, by score;
        then the others, by score and then by the summed weight of their edges in the
        unified graph (the trace's evidence); heads the trace never reached come last.

        Returns:
            head (``"L.H"``), layer, head_index, in_circuit, score, trace_weight, n_nodes
            (circuit nodes), roles (their role pairs), rank (1 = first).
        """
        n_layers, n_heads = self.params["n_layers"], self.params["n_heads"]
        touch: dict[str, float] = {}
        for up, down, w in zip(self.edges.up, self.edges.down, self.edges.weight.abs()):
            touch[up] = touch.get(up, 0.0) + float(w)
            touch[down] = touch.get(down, 0.0) + float(w)
        per_head: dict[tuple[int, int], list[int]] = {}
        attn = self.nodes[self.nodes.kind == "attn"]
        for i, (L, h) in enumerate(zip(attn.layer, attn["head"])):
            per_head.setdefault((int(L), int(h)), []).append(i)
        rows = []
        for L in range(n_layers):
            for h in range(n_heads):
                mine = attn.iloc[per_head.get((L, h), [])]
                inside = mine[mine.in_circuit.to_numpy(dtype=bool)]
                rows.append(
                    {
                        "head": f"{L}.{h}",
                        "layer": L,
                        "head_index": h,
                        "in_circuit": bool(len(inside)),
                        "score": float(mine.score.max()) if len(mine) else 0.0,
                        "trace_weight": sum(touch.get(n, 0.0) for n in mine.node),
                        "n_nodes": int(len(inside)),
                        "roles": ";".join(
                            f"{d}>{s}" for d, s in zip(inside.dest_role, inside.src_role)
                        ),
                    }
                )
        table = pd.DataFrame(rows).sort_values(
            ["in_circuit", "score", "trace_weight", "layer", "head_index"],
            ascending=[False, False, False, True, True],
            kind="stable",
            ignore_index=True,
        )
        table["rank"] = np.arange(1, len(table) + 1)
        return table

    def ranking(self) -> list[tuple[int, int]]:
        """Every head, best first (:meth:`heads`)."""
        t = self.heads()
        return [(int(L), int(h)) for L, h in zip(t.layer, t.head_index)]

    def graph(self) -> nx.MultiDiGraph:
        """The pruned circuit as a ``networkx.MultiDiGraph`` (edge keys are the sides)."""
        g = nx.MultiDiGraph()
        nodes = self.circuit_nodes
        for name, kind, L, h, dest, src, n, score in zip(
            nodes.node, nodes.kind, nodes.layer, nodes["head"], nodes.dest_role, nodes.src_role,
            nodes.n_prompts, nodes.score,
        ):  # fmt: skip
            g.add_node(name, kind=kind, layer=int(L), head=int(h), dest_role=dest, src_role=src,
                       n_prompts=int(n), score=float(score))  # fmt: skip
        e = self.circuit_edges
        for up, down, side, w, mw, n, effect, status in zip(
            e.up, e.down, e.side, e.weight, e.mean_weight, e.n_prompts, e.effect_mean, e.status
        ):
            g.add_edge(up, down, key=side, side=side, weight=float(w), mean_weight=float(mw),
                       n_prompts=int(n), status=status,
                       effect_mean=float(effect) if np.isfinite(effect) else 0.0)  # fmt: skip
        return g

    def summary(self) -> dict[str, Any]:
        """Counts of the circuit and of what was pruned."""
        status = self.edges.status.value_counts()
        nodes = self.circuit_nodes
        return {
            "n_heads_circuit": len(self.head_set()),
            "n_nodes": int(len(nodes)),
            "n_attn_nodes": int((nodes.kind == "attn").sum()),
            "n_edges": int(len(self.circuit_edges)),
            "n_unified_nodes": int(len(self.nodes)),
            "n_unified_edges": int(len(self.edges)),
            "edges_by_status": {str(k): int(v) for k, v in status.sort_index().items()},
            "n_edges_measured": int((self.edges.n_measured > 0).sum()),
            "heads": sorted(f"{L}.{h}" for L, h in self.head_set()),
        }

    def to_json(self) -> dict[str, Any]:
        """``circuit.json``: parameters, summary, every node and edge (NaN as ``null``)."""
        clean = lambda df: json.loads(df.to_json(orient="records"))  # noqa: E731
        return {
            "params": self.params,
            "summary": self.summary(),
            "nodes": clean(self.nodes),
            "edges": clean(self.edges),
        }

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a ``circuit.json`` (or the folder holding it) back."""
        path = Path(path)
        if path.is_dir():
            path = path / "circuit.json"
        data = json.loads(path.read_text())
        nodes, edges = pd.DataFrame(data["nodes"]), pd.DataFrame(data["edges"])
        for col in ("effect_mean", "effect_std"):
            edges[col] = edges[col].astype(float)
        return cls(nodes=nodes, edges=edges, params=data["params"])

    def save(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write :data:`FILES` into ``out_dir`` (each atomically; the views with ``plots``)."""
        from tl_superposition.circuit.views import write_circuit_html, write_circuit_png

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / name for name in FILES}
        write_json_atomic(paths["circuit.json"], self.to_json())
        with atomic_path(paths["circuit.graphml"]) as tmp:
            nx.write_graphml(self.graph(), tmp)
        with atomic_path(paths["circuit_heads.csv"]) as tmp:
            self.heads().to_csv(tmp, index=False)
        if not plots:
            return {k: v for k, v in paths.items() if not k.endswith((".png", ".html"))}
        with atomic_path(paths["circuit.png"], suffix=".png") as tmp:
            write_circuit_png(self, tmp)
        with atomic_path(paths["circuit.html"], suffix=".html") as tmp:
            write_circuit_html(self, tmp)
        return paths


def node_label(name: str) -> str:
    """A short label: ``23.3`` and its roles ``END>IO`` on two lines; ``logits``; ``M29``."""
    if name == ROOT:
        return "logits"
    p = parse_node(name)
    if p["kind"] == "attn":
        return f"{p['layer']}.{p['head']}\n{p['dest_role']}>{p['src_role']}"
    return name.split(":")[0]
