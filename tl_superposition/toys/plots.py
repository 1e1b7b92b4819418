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


def _task_head_heatmap(
    frame: pd.DataFrame,
    *,
    cmap: str,
    xlabel: str,
    colorbar: str,
    title: str,
    annotate: bool,
) -> Figure:
    """Heat map of a tasks x heads frame with values in [0, 1], optionally written in cells."""
    fig = Figure(figsize=(0.5 * frame.shape[1] + 2.5, 0.45 * frame.shape[0] + 1.4))
    ax = fig.add_subplot()
    values = frame.to_numpy()
    im = ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_yticks(range(len(frame)), frame.index)
    ax.set_xticks(range(frame.shape[1]), frame.columns)
    ax.set_xlabel(xlabel)
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            color = "black" if v > 0.5 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, label=colorbar)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_gate_map(gmap: pd.DataFrame, title: str = "") -> Figure:
    """Heat map of a :func:`~tl_superposition.toys.gates.gate_map` (tasks x heads)."""
    return _task_head_heatmap(
        gmap, cmap="magma", xlabel="head", colorbar="mean gate", title=title, annotate=True
    )


def plot_fractions(fractions: pd.DataFrame, title: str = "") -> Figure:
    """Heat map of solely-encoding fractions (tasks x heads) from a solely-encoded report."""
    return _task_head_heatmap(
        fractions,
        cmap="viridis",
        xlabel="head kept (every combination of the others ablated)",
        colorbar="fraction still correct",
        title=title,
        annotate=False,
    )


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
