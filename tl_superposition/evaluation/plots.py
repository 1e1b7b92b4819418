"""Faithfulness curves of several methods in one figure (matplotlib, no pyplot state)."""

from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure


def plot_curves(
    curves: pd.DataFrame, path: str | os.PathLike | None = None, title: str = ""
) -> Figure:
    """Faithfulness against the fraction of heads kept, one line per method (log x axis).

    Each method is drawn with its ``signed`` order (the one CPR integrates); random
    rankings as the mean of their draws.

    Args:
        curves: :func:`~tl_superposition.evaluation.compare.score_rankings`'s curves.
        path: where to save a PNG (``None``: only return the figure).
        title: the figure's title.
    """
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for method, part in curves.groupby("method", sort=False):
        if (part.order == "signed").any():
            line = part[part.order == "signed"]
        else:
            line = part.groupby("fraction", as_index=False).faithfulness.mean()
        ax.plot(line.fraction, line.faithfulness, marker="o", ms=3, label=str(method))
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("fraction of heads in the circuit (MIB's sizes)")
    ax.set_ylabel("faithfulness f(C)")
    ax.set_title(title or "faithfulness")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png", dpi=110)
    return fig
