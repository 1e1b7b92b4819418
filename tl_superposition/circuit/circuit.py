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

from tl_superposition.circuit.graphs import ROOT, parse_node
from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.reading import read_json

FILES = ("circuit.json", "circuit.graphml", "circuit_heads.csv", "circuit.png", "circuit.html")


def _indirect(edges: pd.DataFrame, n_graphs: int) -> dict[str, float]:
    """Per node, its expected effect per prompt through its measured out-edges: the sum of
    ``-effect_mean x n_prompts / n_graphs`` (removing a supporting edge lowers the logit
    difference, so a positive value supports the answer)."""
    out: dict[str, float] = {}
    measured = edges.status.isin(["kept", "weak"]).to_numpy()
    for up, effect, n, used in zip(edges.up, edges.effect_mean, edges.n_prompts, measured):
        if used:
            out[up] = out.get(up, 0.0) - float(effect) * float(n) / n_graphs
    return out


def _node_scores(nodes: pd.DataFrame, edges: pd.DataFrame, n_graphs: int) -> np.ndarray:
    """Per node, its expected effect per prompt: its weight into the logits where it is a
    seed (its attribution summed over prompt graphs / their number) plus :func:`_indirect`."""
    score = _indirect(edges, n_graphs)
    for up, w, root in zip(edges.up, edges.weight, (edges.status == "root").to_numpy()):
        if root:
            score[up] = score.get(up, 0.0) + float(w)
    return np.array([score.get(n, 0.0) for n in nodes.node])


@dataclass
class Circuit:
    """A pruned circuit inside the unified role graph of a trace (ACC++).

    Attributes:
        nodes: one row per node of the unified graph: node, kind, layer, head, dest_role,
            src_role, n_prompts (prompt graphs it appears in), in_circuit, score (its
            expected effect on the logit difference per prompt: its weight into the logits
            if it is a seed, plus its measured out-edges' effects, as in :meth:`heads`).
        edges: one row per edge: up, down, side (``src``, ``dest``, ``logits``), weight
            (summed over prompt graphs / their number), mean_weight (over the prompts where
            it occurs), n_prompts, effect_mean and effect_std (change of logit(IO) - logit(S)
            under the local edit, over the prompts where it occurs), n_measured, status
            (``root``, ``kept``, ``weak``, ``rare``, ``unreached``: see
            :func:`~tl_superposition.circuit.extract.measure_edges`), in_circuit.
        params: every setting (:class:`~tl_superposition.circuit.config.CircuitConfig`, the
            trace's, the model's shape, the prompt counts) and ``head_dla``, each head's mean
            direct logit attribution over the prompt graphs (``[n_layers][n_heads]``).
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
        nodes["score"] = _node_scores(nodes, edges, n_graphs)
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
        """Every head of the model, scored and ranked (``circuit_heads.csv``).

        A head's score is its expected effect on ``logit(IO) - logit(S)`` per prompt, in
        logits: its mean direct logit attribution over the prompt graphs (``direct``; from
        the trace's seed step, ``params["head_dla"]``) plus, for every edge out of its nodes
        that was measured by the local edit, the change removing it causes, signed so that a
        supporting edge counts positive, weighted by the share of prompt graphs where the
        edge occurs (``indirect``). The circuit's heads rank first, then every other head;
        ``rank`` orders each group by the size of the score, ``rank_signed`` by the score
        itself (supporting heads first): MIB's two orders (:meth:`ranking`).

        Returns:
            head (``"L.H"``), layer, head_index, in_circuit, score, direct, indirect, n_nodes
            (circuit nodes), roles (their role pairs), rank, rank_signed (1 = first).
        """
        n_layers, n_heads = self.params["n_layers"], self.params["n_heads"]
        dla = np.asarray(self.params.get("head_dla", np.zeros((n_layers, n_heads))), float)
        indirect = _indirect(self.edges, self.params.get("n_prompt_graphs", 1))
        per_head: dict[tuple[int, int], list[int]] = {}
        attn = self.nodes[self.nodes.kind == "attn"]
        for i, (L, h) in enumerate(zip(attn.layer, attn["head"])):
            per_head.setdefault((int(L), int(h)), []).append(i)
        rows = []
        for L in range(n_layers):
            for h in range(n_heads):
                mine = attn.iloc[per_head.get((L, h), [])]
                inside = mine[mine.in_circuit.to_numpy(dtype=bool)]
                through = sum(indirect.get(n, 0.0) for n in mine.node)
                rows.append(
                    {
                        "head": f"{L}.{h}",
                        "layer": L,
                        "head_index": h,
                        "in_circuit": bool(len(inside)),
                        "score": float(dla[L, h]) + through,
                        "direct": float(dla[L, h]),
                        "indirect": through,
                        "n_nodes": int(len(inside)),
                        "roles": ";".join(
                            f"{d}>{s}" for d, s in zip(inside.dest_role, inside.src_role)
                        ),
                    }
                )
        table = pd.DataFrame(rows)
        outside = ~table.in_circuit.to_numpy(dtype=bool)
        for col, key in (("rank_signed", table.score), ("rank", table.score.abs())):
            order = np.lexsort((table.head_index, table.layer, -key.to_numpy(), outside))
            rank = np.empty(len(table), dtype=int)
            rank[order] = np.arange(1, len(table) + 1)
            table[col] = rank
        return table.sort_values("rank", ignore_index=True)

    def ranking(self, signed: bool = False) -> list[tuple[int, int]]:
        """Every head, best first (:meth:`heads`): by the size of its score, or with
        ``signed`` by the score itself (the order MIB's CPR takes)."""
        t = self.heads().sort_values("rank_signed" if signed else "rank")
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
        """Counts of the circuit (its nodes without the logits) and of what was pruned."""
        status = self.edges.status.value_counts()
        nodes = self.circuit_nodes
        nodes = pd.DataFrame(nodes[nodes.node != ROOT])
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
        data = read_json(path)
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
