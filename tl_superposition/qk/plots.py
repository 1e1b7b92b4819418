"""Figures of a QK transcoder: feature density and a pair-strength heatmap (matplotlib).

Each function draws on a given (or new) ``Axes`` and returns the ``Figure``; nothing is shown
or saved, and no global matplotlib state is changed.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_superposition.qk.pairs import PairStats


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        fig = ax.figure
        assert isinstance(fig, Figure)
        return fig, ax
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def plot_feature_density(
    density_q: np.ndarray, density_k: np.ndarray, *, ax: Axes | None = None
) -> Figure:
    """Histogram of log10 firing frequency of the query and key features.

    Features that never fired are counted in the title (they have no logarithm).
    """
    fig, ax = _axes(ax, (6, 3.5))
    bins = np.linspace(-6, 0, 49).tolist()
    for name, d in (("query", density_q), ("key", density_k)):
        alive = d[d > 0]
        ax.hist(np.log10(alive), bins=bins, alpha=0.6, label=f"{name} ({(d == 0).sum()} dead)")
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("features")
    ax.set_title("feature density")
    ax.legend()
    return fig


def plot_pair_heatmap(
    stats: PairStats, *, n: int = 20, value: str = "mean_term", ax: Axes | None = None
) -> Figure:
    """Heatmap of the pair terms of the ``n`` query and ``n`` key features of ``stats.head``
    that carry the most |score| on the data.

    Args:
        value: ``"mean_term"`` (mean score term where both fire; blank where never) or
            ``"total"`` (summed over the data).
    """
    if value not in ("mean_term", "total"):
        raise ValueError(f"value must be 'mean_term' or 'total', got {value!r}")
    fig, ax = _axes(ax, (7, 6))
    q_top = stats.total_abs.sum(1).topk(n).indices
    k_top = stats.total_abs.sum(0).topk(n).indices
    grid = stats.mean_term() if value == "mean_term" else stats.total
    sub = grid[q_top][:, k_top].numpy()
    lim = np.nanmax(np.abs(sub)) if np.isfinite(sub).any() else 1.0
    im = ax.imshow(sub, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(n), [str(int(i)) for i in k_top], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(int(i)) for i in q_top], fontsize=7)
    ax.set_xlabel("key feature")
    ax.set_ylabel("query feature")
    ax.set_title(f"head {stats.head}: {value.replace('_', ' ')} of pair score terms")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig
