"""Views of a pruned circuit by role: a PNG (matplotlib) and a self-contained HTML page.

Nodes sit in a grid: one row per layer (low at the bottom, the logits on top), one column per
destination role in prompt order (``start``, ``IO-1``, ``IO``, ... ``END``); nodes sharing a
cell sit side by side. A node is labelled with its head and role pair (``23.3`` /
``END>IO``). Key-side edges (the signal enters through the key) are blue, query-side edges
orange, edges into the logits grey; width grows with the size of the edge's effect. Each
view's caption says what the circuit is and which part of it is shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tl_superposition.circuit.circuit import Circuit, node_label
from tl_superposition.circuit.graphs import ROOT
from tl_superposition.tracing.html import COLORS, EdgeView, NodeView, render_graph_html

ROLE_ORDER = (
    "start", "IO-1", "IO", "IO+1", "S1-1", "S1", "S1+1", "punct", "S2-1", "S2", "S2+1",
    "verb", "END-1", "END", "other",
)  # fmt: skip
EDGE_COLORS = {**COLORS, "logits": "#999999"}
CELL_W, ROW_H, MARGIN = 74, 46, 50


@dataclass
class Layout:
    """Where each shown node sits (pixels, y down), and the caption of the view."""

    pos: dict[str, tuple[float, float]]
    size: tuple[float, float]
    caption: str
    layers: list[int]


def layout(circuit: Circuit, max_nodes: int = 80) -> Layout:
    """The grid layout of the pruned circuit (module docstring), at most ``max_nodes`` nodes.

    When the circuit has more, the highest-scoring nodes are shown (the logits always), and
    the caption says so.
    """
    nodes = circuit.circuit_nodes
    shown = pd.DataFrame(nodes[nodes.node != ROOT])
    shown = shown.sort_values("score", ascending=False, kind="stable")
    n_all = len(shown)
    shown = shown.head(max_nodes).sort_values(["layer", "head", "src_role"], kind="stable")
    layers = sorted({int(L) for L in shown.layer})
    row_of = {L: i for i, L in enumerate(reversed(layers), start=1)}
    cells: dict[tuple[int, str], list[str]] = {}
    for name, layer, dest in zip(shown.node, shown.layer, shown.dest_role):
        role = dest if dest in ROLE_ORDER else "other"
        cells.setdefault((int(layer), role), []).append(name)
    roles = [r for r in ROLE_ORDER if any(k[1] == r for k in cells)]
    width_of = {r: max(len(v) for k, v in cells.items() if k[1] == r) for r in roles}
    x0, col_x = float(MARGIN), {}
    for r in roles:
        col_x[r] = x0
        x0 += CELL_W * width_of[r]
    pos = {}
    for (L, role), names in cells.items():
        for i, n in enumerate(names):
            pos[n] = (col_x[role] + CELL_W * (i + 0.5), MARGIN + ROW_H * row_of[L])
    width = max(x0 + MARGIN, 320.0)
    pos[ROOT] = (width / 2, MARGIN / 2 + 4)
    p = circuit.params
    subset = (
        "all of its nodes are shown"
        if len(shown) == n_all
        else (f"the {len(shown)} highest-scoring of its {n_all} nodes are shown")
    )
    caption = (
        f"Pruned IOI circuit of {p.get('model', 'the model')}: {len(circuit.head_set())} heads, "
        f"{n_all} nodes, {len(circuit.circuit_edges)} edges, from {p.get('n_prompt_graphs')} "
        f"prompt graphs; an edge is kept when it occurs in at least {p.get('min_prompts')} "
        f"prompts and removing it (local edit) changes logit(IO) - logit(S) by at least "
        f"{p.get('threshold')} on average; {subset}."
    )
    return Layout(pos, (width, MARGIN + ROW_H * (len(layers) + 1)), caption, layers)


def _edge_width(effect: float, top: float) -> float:
    return 0.6 + 3.5 * min(abs(effect) / top, 1.0) if np.isfinite(effect) and top > 0 else 0.8


@dataclass
class _Edge:
    up: str
    down: str
    side: str
    n_prompts: int
    mean_weight: float
    effect_mean: float
    effect_std: float

    @property
    def size(self) -> float:
        """The effect's size where measured, else (edges into the logits) the mean weight's."""
        return abs(self.effect_mean) if np.isfinite(self.effect_mean) else abs(self.mean_weight)


def _shown_edges(circuit: Circuit, pos: dict[str, tuple[float, float]]) -> list[_Edge]:
    e = circuit.circuit_edges
    cols = (e.up, e.down, e.side, e.n_prompts, e.mean_weight, e.effect_mean, e.effect_std)
    return [_Edge(*row) for row in zip(*cols) if row[0] in pos and row[1] in pos]


def write_circuit_png(circuit: Circuit, path: str | os.PathLike, max_nodes: int = 80) -> None:
    """Draw the pruned circuit by role (:func:`circuit_figure`) and save a PNG."""
    circuit_figure(circuit, max_nodes).savefig(path, format="png", dpi=110)


def circuit_figure(circuit: Circuit, max_nodes: int = 80) -> Figure:
    """The pruned circuit by role (module docstring) as a matplotlib figure (no pyplot)."""
    lay = layout(circuit, max_nodes)
    w, h = lay.size
    fig = Figure(figsize=(max(w / 90, 6), max(h / 90, 4) + 0.8))
    ax = fig.subplots()
    edges = _shown_edges(circuit, lay.pos)
    top = max((r.size for r in edges), default=1.0)
    for r in edges:
        (x0, y0), (x1, y1) = lay.pos[r.up], lay.pos[r.down]
        ax.annotate(
            "", xy=(x1, -y1), xytext=(x0, -y0),
            arrowprops=dict(arrowstyle="->", color=EDGE_COLORS.get(r.side, "#777"), alpha=0.6,
                            lw=_edge_width(r.size, top), shrinkA=9, shrinkB=9,
                            connectionstyle="arc3,rad=0.08"),
        )  # fmt: skip
    for n, (x, y) in lay.pos.items():
        ax.text(x, -y, node_label(n), ha="center", va="center", fontsize=6.5,
                bbox=dict(boxstyle="round,pad=0.25", fc="khaki" if n == ROOT else "white",
                          lw=0.6))  # fmt: skip
    for i, L in enumerate(reversed(lay.layers), start=1):
        ax.text(8, -(MARGIN + ROW_H * i), f"L{L}", ha="left", va="center", fontsize=7)
    ax.set_xlim(0, w)
    ax.set_ylim(-h, 0)
    ax.set_axis_off()
    ax.plot([], [], color=COLORS["src"], label="key side")
    ax.plot([], [], color=COLORS["dest"], label="query side")
    ax.plot([], [], color=EDGE_COLORS["logits"], label="into the logits")
    ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(_wrap(lay.caption, 150), fontsize=8)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def write_circuit_html(circuit: Circuit, path: str | os.PathLike, max_nodes: int = 80) -> None:
    """Write the pruned circuit by role as a self-contained page (hover for details)."""
    lay = layout(circuit, max_nodes)
    info = circuit.nodes.set_index("node")
    nodes = []
    for i, (n, (x, y)) in enumerate(lay.pos.items()):
        r = info.loc[n]
        rows = [("prompt graphs", str(int(r.n_prompts))), ("score", f"{float(r.score):.4g}")]
        nodes.append(NodeView(key=f"n{i}", label=node_label(n), x=x, y=y,
                              info={"title": n, "rows": rows},
                              width=64))  # fmt: skip
    edges = []
    shown = _shown_edges(circuit, lay.pos)
    top = max((r.size for r in shown), default=1.0)
    for i, r in enumerate(shown):
        rows = [
            ("side", r.side), ("prompts", str(int(r.n_prompts))),
            ("mean weight", f"{r.mean_weight:.4g}"),
            ("logit-diff change (local edit)",
             f"{r.effect_mean:.4g} +- {r.effect_std:.3g}" if np.isfinite(r.effect_mean) else "-"),
        ]  # fmt: skip
        edges.append(
            EdgeView(
                key=f"e{i}",
                start=lay.pos[r.up],
                end=lay.pos[r.down],
                info={"title": f"{r.up} -> {r.down}", "rows": rows},
                color=EDGE_COLORS.get(r.side, "#777"),
                width=_edge_width(r.size, top),
                bend=12,
            )  # fmt: skip
        )
    legend = (
        f"{lay.caption} Rows are layers, columns destination roles. Blue: key side; orange: "
        "query side; grey: into the logits. Hover a node or an edge for details."
    )
    render_graph_html(path, nodes, edges, "IOI circuit by role", legend, lay.size)
