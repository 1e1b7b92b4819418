"""Pictures of a trace: the circuit graph and singular-component usage per head (matplotlib).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved directly, without pyplot:
importing or using this module leaves the caller's backend and open figures alone.
"""

from __future__ import annotations

import os

import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tl_superposition.tracing.graph import head_name


def circuit_subgraph(
    graph: nx.MultiDiGraph,
    seeds: list[str],
    per_node: int = 3,
    max_nodes: int = 40,
    heads_only: bool = True,
) -> nx.MultiDiGraph:
    """The readable core of a trace graph: from the seeds, each node's strongest inputs.

    Walks down from the seed nodes; for every node kept, the ``per_node`` upstream nodes
    whose edges (both sides together) were selected in the most firings are kept too, until
    ``max_nodes`` nodes. With ``heads_only`` the inputs considered are attention heads only
    (MLPs and embeddings are leaves of the trace and often the largest writers, which would
    hide the head-to-head communication).
    """
    keep = [s for s in seeds if s in graph]
    seen = set(keep)
    frontier = list(keep)
    edges = []
    while frontier and len(seen) < max_nodes:
        node = frontier.pop(0)
        support: dict[str, int] = {}
        for u, _, d in graph.in_edges(node, data=True):
            if heads_only and graph.nodes[u]["kind"] != "attn":
                continue
            support[u] = support.get(u, 0) + d["n_firings"]
        for u in sorted(support, key=lambda x: -support[x])[:per_node]:
            edges += [(u, node, k, d) for k, d in graph[u][node].items()]
            if u not in seen and len(seen) < max_nodes:
                seen.add(u)
                frontier.append(u)
    sub = nx.MultiDiGraph()
    sub.add_nodes_from((n, graph.nodes[n]) for n in seen)
    for u, v, k, d in edges:
        if u in seen:
            sub.add_edge(u, v, key=k, **d)
    return sub


def plot_circuit(
    graph: nx.MultiDiGraph,
    path: str | os.PathLike,
    seeds: list[str],
    title: str = "",
    per_node: int = 3,
    max_nodes: int = 40,
    heads_only: bool = True,
) -> None:
    """Draw :func:`circuit_subgraph` with layers bottom (embeddings) to top, and save a PNG.

    Edge width grows with ``n_firings``; source-side edges are blue, destination-side
    edges orange; seeds are outlined in red. Options as in :func:`circuit_subgraph`.
    """
    sub = circuit_subgraph(graph, seeds, per_node, max_nodes, heads_only)
    fig = Figure(figsize=(11, 8))
    ax = fig.subplots()
    if sub.number_of_nodes() == 0:
        ax.text(0.5, 0.5, "no traced firings", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, format="png", dpi=110)
        return
    by_row: dict[float, list[str]] = {}
    for n, d in sub.nodes(data=True):
        row = -1 if d["kind"] == "embed" else d["layer"] + (0.5 if d["kind"] == "mlp" else 0)
        by_row.setdefault(row, []).append(n)
    pos = {}
    for row, names in by_row.items():
        names.sort(key=lambda n: (sub.nodes[n]["head"], n))
        for i, n in enumerate(names):
            pos[n] = ((i + 1) / (len(names) + 1), row)
    max_n = max((d["n_firings"] for _, _, d in sub.edges(data=True)), default=1)
    for u, v, side, d in sub.edges(keys=True, data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(
                arrowstyle="->",
                lw=0.5 + 4 * d["n_firings"] / max_n,
                color="tab:blue" if side == "src" else "tab:orange",
                alpha=0.6,
                shrinkA=8,
                shrinkB=8,
                connectionstyle="arc3,rad=0.1" if side == "src" else "arc3,rad=-0.1",
            ),
        )
    for n, (x, y) in pos.items():
        kind = sub.nodes[n]["kind"]
        color = {"attn": "white", "mlp": "lightgrey", "embed": "khaki"}[kind]
        ax.text(
            x,
            y,
            n,
            ha="center",
            va="center",
            fontsize=8,
            bbox=dict(
                boxstyle="round,pad=0.25",
                fc=color,
                lw=1.5 if n in seeds else 0.6,
                ec="red" if n in seeds else "black",
            ),
        )
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_xlim(0, 1)
    ax.set_ylabel("layer (E = -1)")
    ax.set_xticks([])
    ax.plot([], [], color="tab:blue", label="source-side signal")
    ax.plot([], [], color="tab:orange", label="destination-side signal")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "signal graph")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def component_usage(firings: pd.DataFrame, d_head: int, top_heads: int = 20) -> pd.DataFrame:
    """Fraction of each head's firings that use singular component ``k``.

    Returns:
        DataFrame indexed by head name (``A{L}.{h}``, the ``top_heads`` heads with most
        firings), one column per component ``0..d_head-1`` (descending singular value).
    """
    sizes = firings.groupby(["layer", "head"]).size()
    assert isinstance(sizes, pd.Series)
    top = sizes.sort_values(ascending=False).head(top_heads)
    rows = {}
    for layer, head, n in zip(
        top.index.get_level_values(0), top.index.get_level_values(1), top.to_numpy()
    ):
        sub = firings[(firings.layer == layer) & (firings["head"] == head)]
        used = np.zeros(d_head)
        comps = np.concatenate(sub.components.to_numpy()) if len(sub) else np.zeros(0, int)
        np.add.at(used, comps.astype(int), 1)
        rows[head_name(layer, head)] = used / n
    return pd.DataFrame.from_dict(rows, orient="index", columns=range(d_head))


def plot_component_usage(
    firings: pd.DataFrame, path: str | os.PathLike, d_head: int, top_heads: int = 20
) -> None:
    """Heatmap of :func:`component_usage` beside the histogram of components per firing."""
    usage = component_usage(firings, d_head, top_heads)
    fig = Figure(figsize=(13, 6))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    im = ax0.imshow(usage.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax0.set_yticks(range(len(usage)), usage.index, fontsize=8)
    ax0.set_xlabel("singular component (descending singular value)")
    ax0.set_title(f"share of firings using each component ({len(usage)} most active heads)")
    fig.colorbar(im, ax=ax0, fraction=0.03)
    ax1.hist(firings.n_components, bins=np.arange(0, d_head + 2) - 0.5, color="tab:blue")
    ax1.set_xlabel("components per firing")
    ax1.set_ylabel("firings")
    ax1.set_title(f"median {firings.n_components.median():.0f}" if len(firings) else "no firings")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
