"""A self-contained interactive view of a traced circuit: one HTML file, inline SVG and JS.

The file loads nothing from the network (no CDN, no fonts): the SVG is drawn here, node and
edge details are embedded as JSON, and a few lines of inline JavaScript show them in a side
panel when the pointer is over a node (its firings, traced firings, median components and
most used singular components) or an edge (its weight, firing count and, when the edges
were validated, the intervention results). Without JavaScript, every element still carries
an SVG ``<title>`` tooltip with the same text.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from tl_superposition.tracing.plots import circuit_subgraph

WIDTH, ROW, MARGIN = 960, 46, 40
COLORS = {"src": "#1f77b4", "dest": "#ff7f0e"}

_SCRIPT = """
const data = JSON.parse(document.getElementById('trace-data').textContent);
const panel = document.getElementById('panel');
function show(el) {
  const info = data[el.dataset.key];
  if (!info) return;
  panel.innerHTML = '';
  const h = document.createElement('h3');
  h.textContent = info.title;
  panel.appendChild(h);
  const table = document.createElement('table');
  for (const [k, v] of info.rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
  panel.appendChild(table);
}
document.querySelectorAll('[data-key]').forEach(el => {
  el.addEventListener('mouseenter', () => { show(el); el.classList.add('hot'); });
  el.addEventListener('mouseleave', () => el.classList.remove('hot'));
});
"""

_STYLE = """
body { font-family: sans-serif; margin: 0; display: flex; }
#view { flex: 1; overflow: auto; }
#panel { width: 320px; padding: 12px; border-left: 1px solid #ccc; font-size: 13px; }
#panel td { padding: 2px 6px; vertical-align: top; }
.node rect { fill: white; stroke: black; stroke-width: 0.8; }
.node.seed rect { stroke: red; stroke-width: 2; }
.node text { font-size: 11px; text-anchor: middle; dominant-baseline: central; }
.edge { fill: none; opacity: 0.55; }
.edge.unvalidated { stroke-dasharray: 4 3; }
.hot { opacity: 1 !important; filter: drop-shadow(0 0 3px #444); }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def top_components(
    usage: pd.DataFrame, layer: int, head: int, k: int = 5
) -> list[tuple[int, float]]:
    """The ``k`` singular components most often in the sparse sets of head ``(layer, head)``.

    Args:
        usage: firings with columns layer, head, components.

    Returns:
        ``[(component, share of the head's firings using it), ...]``, most used first.
    """
    rows = usage[(usage.layer == layer) & (usage["head"] == head)]
    if rows.empty:
        return []
    comps = np.concatenate(rows.components.to_numpy()).astype(int)
    counts = np.bincount(comps)
    top = np.argsort(-counts, kind="stable")[:k]
    return [(int(c), float(counts[c] / len(rows))) for c in top if counts[c] > 0]


def _layout(sub: nx.MultiDiGraph) -> dict[str, tuple[float, float]]:
    by_layer: dict[int, list[str]] = {}
    for n, d in sub.nodes(data=True):
        by_layer.setdefault(int(d["layer"]), []).append(n)
    layers = sorted(by_layer)
    height = ROW * (len(layers) + 1)
    pos = {}
    for i, L in enumerate(layers):
        names = sorted(by_layer[L], key=lambda n: (sub.nodes[n]["head"], n))
        for j, n in enumerate(names):
            pos[n] = (
                MARGIN + (WIDTH - 2 * MARGIN) * (j + 1) / (len(names) + 1),
                height - ROW * (i + 1),
            )
    return pos


def _node_info(
    name: str, d: dict[str, Any], heads: pd.DataFrame, usage: pd.DataFrame | None
) -> dict[str, Any]:
    rows: list[tuple[str, str]] = [("layer, head", f"{d['layer']}, {d['head']}")]
    info = heads[heads.node == name]
    if len(info):
        r = info.iloc[0]
        rows += [
            ("firings (all prompts)", _fmt(int(r.n_firings))),
            ("traced firings", _fmt(int(r.n_traced))),
            ("firings at IOI roles", _fmt(int(r.n_firings_at_roles))),
            ("most frequent role pair", f"{r.top_role_pair} ({int(r.top_role_pair_firings)})"),
            ("median components (firings)", _fmt(float(r.median_components))),
            ("median components (non-firings)", _fmt(float(r.median_components_nonfirings))),
        ]
    if usage is not None:
        top = top_components(usage, int(d["layer"]), int(d["head"]))
        rows.append(("top singular components", ", ".join(f"{c} ({s:.0%})" for c, s in top)))
    return {"title": name, "rows": rows}


def _edge_info(
    u: str, v: str, side: str, d: dict[str, Any], validation: pd.DataFrame | None
) -> tuple[dict[str, Any], bool | None]:
    rows = [
        ("side", side),
        ("weight (summed write, score units)", _fmt(float(d["weight"]))),
        ("firings", _fmt(int(d["n_firings"]))),
        ("prompts", _fmt(int(d.get("n_prompts", 0)))),
    ]
    validated = None
    if validation is not None:
        hit = validation[
            (validation.upstream == u) & (validation.downstream == v) & (validation.side == side)
        ]
        if len(hit):
            r = hit.iloc[0]
            validated = bool(r.validated)
            rows += [
                ("validated", "yes" if validated else "no"),
                ("instances intervened on", _fmt(int(r.n_instances))),
                ("score change, ablate", _fmt(float(r.d_score_ablate))),
                ("score change, random control", _fmt(float(r.d_score_random))),
                ("score change, boost", _fmt(float(r.d_score_boost))),
                ("pattern change, ablate", _fmt(float(r.d_pattern_ablate))),
                ("logit-diff change, ablate", _fmt(float(r.d_logit_diff_ablate))),
            ]
        else:
            rows.append(("validated", "not intervened on"))
    return {"title": f"{u} -> {v} ({side})", "rows": rows}, validated


@dataclass
class NodeView:
    """One node of an HTML graph view: its position, label, style and details."""

    key: str
    label: str
    x: float
    y: float
    info: dict[str, Any]
    css: str = "node"
    width: float = 48


@dataclass
class EdgeView:
    """One edge of an HTML graph view, drawn as a curve from ``start`` to ``end``."""

    key: str
    start: tuple[float, float]
    end: tuple[float, float]
    info: dict[str, Any]
    color: str = "#777"
    width: float = 1.0
    bend: float = 0.0
    css: str = "edge"


def render_graph_html(
    path: str | os.PathLike,
    nodes: Sequence[NodeView],
    edges: Sequence[EdgeView],
    title: str,
    legend: str,
    size: tuple[float, float],
) -> None:
    """Write a self-contained page: the SVG drawing and the details panel (module docstring).

    Args:
        path: the HTML file.
        nodes, edges: what to draw, with the details shown on hover (``info``: a ``title``
            and ``rows`` of (name, value) pairs).
        title: the page's heading; legend: the line under it (say what subset is shown).
        size: the drawing's width and height in pixels.
    """
    data: dict[str, Any] = {}
    parts = []
    for e in edges:
        data[e.key] = e.info
        (x0, y0), (x1, y1) = e.start, e.end
        tip = html.escape("; ".join(f"{k}: {val}" for k, val in e.info["rows"]))
        parts.append(
            f'<path class="{e.css}" data-key="{e.key}" stroke="{e.color}" '
            f'stroke-width="{e.width:.2f}" d="M{x0:.1f},{y0:.1f} Q{(x0 + x1) / 2 + e.bend:.1f},'
            f'{(y0 + y1) / 2:.1f} {x1:.1f},{y1:.1f}"><title>{html.escape(e.info["title"])}: '
            f"{tip}</title></path>"
        )
    for n in nodes:
        data[n.key] = n.info
        tip = html.escape("; ".join(f"{k}: {val}" for k, val in n.info["rows"]))
        lines = n.label.split("\n")
        height = 20 + 12 * (len(lines) - 1)
        text = "".join(
            f'<tspan x="0" dy="{(0 if i else -6 * (len(lines) - 1))}">{html.escape(t)}</tspan>'
            if len(lines) > 1
            else html.escape(t)
            for i, t in enumerate(lines)
        )
        parts.append(
            f'<g class="{n.css}" data-key="{n.key}" transform="translate({n.x:.1f},{n.y:.1f})">'
            f'<rect x="{-n.width / 2:.1f}" y="{-height / 2:.1f}" width="{n.width:.1f}" '
            f'height="{height}" rx="4"/><text>{text}</text>'
            f"<title>{html.escape(n.info['title'])}: {tip}</title></g>"
        )
    width, height = size
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body><div id="view"><h2 style="margin:12px">{html.escape(title)}</h2>
<p style="margin:12px;font-size:13px">{html.escape(legend)}</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">
{"".join(parts)}
</svg></div>
<div id="panel"><h3>details</h3><p>Move the pointer over a node or an edge.</p></div>
<script type="application/json" id="trace-data">{_json_for_html(data)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(doc)


def write_html(
    path: str | os.PathLike,
    graph: nx.MultiDiGraph,
    seeds: Sequence[str],
    heads: pd.DataFrame,
    usage: pd.DataFrame | None = None,
    d_head: int | None = None,
    validation: pd.DataFrame | None = None,
    title: str = "signal graph",
    per_node: int = 3,
    max_nodes: int = 40,
) -> None:
    """Write the signal graph grown from ``seeds`` (:func:`~.plots.circuit_subgraph`) as HTML.

    Layers run bottom (low) to top; source-side edges are blue, destination-side orange,
    edge width grows with the firing count, seeds are outlined in red; with ``validation``
    (the per-edge table of :func:`~tl_superposition.tracing.validate.validate_edges`),
    edges that were intervened on and not validated are dashed.

    Args:
        path: the HTML file to write.
        graph: the trace's graph (:meth:`TraceResult.graph`).
        seeds: seed node names.
        heads: the per-head table (``heads.csv``).
        usage: firings with layer, head, components (for the top singular components).
        d_head: unused by the drawing; kept for callers passing the model's shape.
        validation: per-edge validation table, or ``None``.
        title: page title.
        per_node, max_nodes: as :func:`~.plots.circuit_subgraph`.
    """
    del d_head
    sub = circuit_subgraph(graph, list(seeds), per_node, max_nodes)
    pos = _layout(sub)
    height = ROW * (len({d["layer"] for _, d in sub.nodes(data=True)}) + 1)
    max_n = max((d["n_firings"] for _, _, d in sub.edges(data=True)), default=1)
    edges = []
    for i, (u, v, side, d) in enumerate(sorted(sub.edges(keys=True, data=True))):
        info, validated = _edge_info(u, v, side, d, validation)
        edges.append(
            EdgeView(
                key=f"e{i}", start=pos[u], end=pos[v], info=info,
                color=COLORS.get(side, "#777"), width=0.6 + 4 * d["n_firings"] / max_n,
                bend=18 if side == "src" else -18,
                css="edge unvalidated" if validated is False else "edge",
            )
        )  # fmt: skip
    nodes = [
        NodeView(
            key=f"n{i}",
            label=n,
            x=pos[n][0],
            y=pos[n][1],
            info=_node_info(n, d, heads, usage),
            css="node seed" if n in seeds else "node",
        )  # fmt: skip
        for i, (n, d) in enumerate(sorted(sub.nodes(data=True)))
    ]
    legend = (
        "blue: source-side signal (through the key); orange: destination-side (through the "
        "query); red outline: seeds; dashed: intervened on and not validated. Hover for details. "
        f"Shown: the graph grown from the seeds, each node's {per_node} strongest head inputs, "
        f"at most {max_nodes} nodes ({sub.number_of_nodes()} here)."
    )
    render_graph_html(path, nodes, edges, title, legend, (WIDTH, height))


def _json_for_html(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` can close it early)."""
    return json.dumps(data).replace("</", "<\\/")
