"""An alpha sweep on a real layer: the trade-off between fit and co-attention.

The gate penalty's weight ``alpha`` trades the block's fit to the layer for fewer heads per
(query, key) pair. :func:`sweep_alpha` trains one block per alpha with otherwise identical
settings (each point a resumable :func:`~tl_superposition.gated.layer_run.train_gated` run in
``out/alpha<value>/``), then :func:`sweep_table` reads every finished point of the folder and
:func:`plot_tradeoff` draws fraction of variance explained against co-attention, with the
original layer's co-attention for reference. The question it answers is the one of Mathwin,
Akar & Sharkey (2024) on a real model: is there an alpha at which the block serves its
(query, key) pairs with fewer heads than the original layer while still explaining most of
the layer's output?

Output folder: ``sweep.json`` (the settings shared by every point), ``alpha<value>/`` per
point (see :mod:`~tl_superposition.gated.layer_run`), ``sweep.csv`` and ``tradeoff.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tl_superposition.core.atomic import write_json_atomic, write_text_atomic
from tl_superposition.core.checkpoint import identity_mismatches
from tl_superposition.core.reading import read_json
from tl_superposition.gated.layer_run import GatedLayerConfig

#: The columns of :func:`sweep_table`, in order.
COLUMNS = [
    "alpha",
    "alpha_warmup_steps",
    "steps",
    "fve",
    "loss_change",
    "ioi_logit_diff",
    "ioi_kept",
    "mean_heads",
    "share_multi",
    "active_pairs",
]


def point_dir(out: str | os.PathLike, alpha: float) -> Path:
    """The folder of one sweep point: ``out/alpha<alpha>`` (``repr``-free, e.g. ``alpha0.75``)."""
    return Path(out) / f"alpha{alpha:g}"


def _shared(cfg: GatedLayerConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in ("alpha", "device")}


def check_sweep_folder(cfg: GatedLayerConfig, out: str | os.PathLike) -> None:
    """Refuse a sweep folder that holds points trained with other settings (alpha aside).

    Raises:
        ValueError: ``out/sweep.json`` records other settings; the message names them.
    """
    path = Path(out) / "sweep.json"
    if not path.is_file():
        return
    before = read_json(path)
    now = json.loads(json.dumps(_shared(cfg)))
    diff = identity_mismatches(before, now, {k: k for k in sorted(set(before) | set(now))})
    if diff:
        raise ValueError(
            f"{out} holds a sweep with other settings ({', '.join(diff)}); "
            "use another --out or the same settings"
        )


def sweep_alpha(
    model: Any,
    cfg: GatedLayerConfig,
    alphas: Sequence[float],
    out: str | os.PathLike,
    model_name: str | None = None,
    plots: bool = True,
) -> pd.DataFrame:
    """Train and evaluate one block per alpha (``cfg`` otherwise unchanged), then tabulate.

    Points already finished in ``out`` (their ``summary.json`` written) are read, not
    retrained; an interrupted point resumes from its checkpoint. Several processes may fill
    one folder with different alphas (each point has its own folder; the table is rebuilt from
    whatever points are finished).

    Args:
        model: the ``HookedTransformer``.
        cfg: every setting of the points but ``alpha``.
        alphas: penalty weights, one point each.
        out: the sweep folder.
        model_name: how the summaries name the model.
        plots: also write ``tradeoff.png``.

    Returns:
        :func:`sweep_table` of the folder.

    Raises:
        ValueError: no alpha, a negative alpha, or a folder of another sweep
            (:func:`check_sweep_folder`).
    """
    from tl_superposition.gated.layer_run import train_gated

    if not alphas or min(alphas) < 0:
        raise ValueError("give at least one alpha, all >= 0")
    check_sweep_folder(cfg, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "sweep.json", _shared(cfg))
    for alpha in alphas:
        if not (point_dir(out, alpha) / "summary.json").is_file():
            train_gated(model, cfg.replace(alpha=alpha), point_dir(out, alpha), model_name)
    return write_sweep(out, plots)


def write_sweep(out: str | os.PathLike, plots: bool = True) -> pd.DataFrame:
    """Write ``sweep.csv`` (and ``tradeoff.png``) from the finished points of ``out``."""
    table = sweep_table(out)
    write_text_atomic(Path(out) / "sweep.csv", table.to_csv(index=False))
    if plots and len(table):
        fig = plot_tradeoff(table)
        fig.savefig(Path(out) / "tradeoff.png", dpi=110, bbox_inches="tight")
    return table


def _row(summary: dict[str, Any], key: str) -> dict[str, Any]:
    co = summary[key]
    ioi = summary.get("ioi_logit_diff")
    after = key == "after"
    kept = summary.get("ioi_logit_diff_spliced") if after else ioi
    return {
        "alpha": summary["alpha"] if after else math.nan,
        "alpha_warmup_steps": summary.get("alpha_warmup_steps", 0) if after else 0,
        "steps": summary["steps"] if after else 0,
        "fve": summary["fve"] if after else 1.0,
        "loss_change": summary["loss_change"] if after else 0.0,
        "ioi_logit_diff": kept,
        "ioi_kept": kept / ioi if ioi and kept is not None else math.nan,
        "mean_heads": co["mean_heads"],
        "share_multi": co["share_multi"],
        "active_pairs": co["active_pairs"],
    }


def sweep_table(out: str | os.PathLike) -> pd.DataFrame:
    """One row per finished point of the sweep folder ``out``, by alpha, after a first row
    (alpha NaN) with the original layer's figures.

    Columns (:data:`COLUMNS`): ``fve`` (fraction of variance of ``hook_attn_out`` explained on
    held-out text), ``loss_change`` (nats of next-token loss, spliced minus original),
    ``ioi_logit_diff`` and ``ioi_kept`` (its share of the original's), ``mean_heads`` (active
    heads per active (query, key) pair), ``share_multi`` (share of active pairs served by two
    or more heads), ``active_pairs``.
    """
    summaries = [read_json(p) for p in sorted(Path(out).glob("alpha*/summary.json"))]
    rows = [_row(s, "after") for s in summaries]
    if summaries:
        rows.insert(0, _row(summaries[0], "before"))
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values("alpha", na_position="first", kind="stable").reset_index(drop=True)


def below_original(table: pd.DataFrame) -> pd.DataFrame:
    """The points whose co-attention is below the original layer's on both measures (heads per
    active pair and share of pairs served by two or more heads)."""
    original = table[table["alpha"].isna()]
    if original.empty:
        return table.iloc[0:0]
    ref = original.iloc[0]
    points = table[table["alpha"].notna()]
    keep = (points["mean_heads"] < ref["mean_heads"]) & (points["share_multi"] < ref["share_multi"])
    return pd.DataFrame(points[keep])


def best_fve_below_original(table: pd.DataFrame) -> float | None:
    """The highest fraction of variance explained among :func:`below_original`'s points
    (None when no point is below)."""
    below = below_original(table)
    return None if below.empty else float(below["fve"].to_numpy().max())


def plot_tradeoff(table: pd.DataFrame, min_fve: float = 0.6) -> Any:
    """Fraction of variance explained against co-attention, one point per alpha.

    The x axis is the share of active (query, key) pairs served by two or more heads, the
    dashed vertical line the original layer's share (points to its left have less
    co-attention), the dotted horizontal line ``min_fve``. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    points = table[table["alpha"].notna()]
    ax.plot(points["share_multi"], points["fve"], "o-", color="tab:blue", label="gated block")
    for _, r in points.iterrows():
        ax.annotate(f"α={r['alpha']:g}", (r["share_multi"], r["fve"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    pairs = zip(table["alpha"], table["share_multi"], strict=True)
    original = [share for alpha, share in pairs if math.isnan(alpha)]
    if original:
        ax.axvline(float(original[0]), ls="--", color="gray",
                   label="original layer's co-attention")  # fmt: skip
    ax.axhline(min_fve, ls=":", color="tab:red", label=f"FVE {min_fve:g}")
    ax.set_xlabel("share of active (query, key) pairs served by >= 2 heads (held-out text)")
    ax.set_ylabel("fraction of variance of hook_attn_out explained")
    ax.set_title("Gated block: fit against co-attention, by penalty weight α")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
