"""Figures of toy-model superposition and of its removal (matplotlib ``Figure`` objects).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot state, no backend
change); save them with ``fig.savefig(path)`` or show them in a notebook with ``display(fig)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_ablation(table: pd.DataFrame, title: str = "", max_subsets: int = 64) -> Figure:
    """Heat map of task accuracy (rows) for each kept head subset (columns).

    Args:
        table: an :func:`~tl_superposition.toys.analysis.ablation_table`.
        title: figure title.
        max_subsets: show at most this many subsets (the smallest ones first).
    """
    wide = table.pivot_table(index="task_name", columns="kept", values="accuracy", sort=False)
    order = (
        table.drop_duplicates("kept").sort_values(["n_kept", "kept"])["kept"].tolist()[:max_subsets]
    )
    wide = wide[order]
    fig = Figure(figsize=(max(4.0, 0.32 * len(order) + 2), 0.45 * len(wide) + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(wide.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(wide)), wide.index)
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
    ax.set_xlabel("heads kept (all others ablated)")
    fig.colorbar(im, ax=ax, label="accuracy")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_gate_map(gmap: pd.DataFrame, title: str = "") -> Figure:
    """Heat map of a :func:`~tl_superposition.gated.gates.gate_map` (tasks x heads)."""
    fig = Figure(figsize=(0.5 * gmap.shape[1] + 2.5, 0.45 * gmap.shape[0] + 1.4))
    ax = fig.add_subplot()
    im = ax.imshow(gmap.to_numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_yticks(range(len(gmap)), gmap.index)
    ax.set_xticks(range(gmap.shape[1]), gmap.columns)
    ax.set_xlabel("head")
    for (i, j), v in np.ndenumerate(gmap.to_numpy()):
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if v > 0.5 else "white",
        )
    fig.colorbar(im, ax=ax, label="mean gate")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_fractions(fractions: pd.DataFrame, title: str = "") -> Figure:
    """Heat map of solely-encoding fractions (tasks x heads) from a solely-encoded report."""
    fig = Figure(figsize=(0.5 * fractions.shape[1] + 2.5, 0.45 * fractions.shape[0] + 1.4))
    ax = fig.add_subplot()
    im = ax.imshow(fractions.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(fractions)), fractions.index)
    ax.set_xticks(range(fractions.shape[1]), fractions.columns)
    ax.set_xlabel("head kept (every combination of the others ablated)")
    fig.colorbar(im, ax=ax, label="fraction still correct")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_attention_ranking(ranking: pd.DataFrame, title: str = "") -> Figure:
    """Bar chart of each head's mean attention to each important token (attention_ranking)."""
    wide = ranking.pivot(index="token", columns="head", values="attention")
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    width = 0.8 / wide.shape[1]
    for i, head in enumerate(wide.columns):
        ax.bar(np.arange(len(wide)) + i * width, wide[head], width, label=f"head {head}")
    ax.set_xticks(np.arange(len(wide)) + 0.4 - width / 2, [str(t) for t in wide.index])
    ax.set_xlabel("signal token")
    ax.set_ylabel("mean attention from read-off")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
