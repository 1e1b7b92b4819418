"""End-to-end toy runs: reference model -> superposition analysis -> gated block -> check.

One run (:func:`run_toy`) writes everything into ``out/<setting>/seed<k>/`` and can be
interrupted at any point: the reference model, the block's training checkpoints and every
table are files, and a rerun picks up where it stopped. A run whose reference toy model comes
from another seed (``ToyRunOptions.toy_seed``) writes to ``out/<setting>/seed<k>-toy<t>/``.

``out/<setting>/seed<k>/``::

    toy/                     reference toy model (toy_config.json, toy_weights.safetensors)
    toy_history.csv          its training curve
    toy_check.csv            solely-encoded check of the reference (per task)
    toy_ablation.csv         accuracy per task for every subset of heads (+ toy_ablation.png)
    gated/checkpoint.pt      the block's training state (resumable)
    gated/restarts_checkpoint.pt   with restarts: every restart's training state (resumable)
    restarts.csv             with restarts: per restart its seed, objective (loss, mse,
                             penalty), whether its block removes superposition, which is kept
    restarts_history.csv     with restarts: every restart's loss curve
    gated/block/             the trained block (cfg.json, weights.safetensors)
    gated_history.csv        its loss curve
    gated_check.csv          solely-encoded check with the block spliced in
    gated_ablation.csv       per-subset accuracies of the block's heads (copy tasks)
    gate_map.csv / .png      mean gate per task and head at the (query, A) pairs
    summary.json             one row of the reproduction table

:func:`run_cross_layer` does the same for the two-layer setting, side by side for blocks
trained layer by layer (the published method) and blocks trained together with a penalty
across the two layers' heads (:mod:`tl_superposition.gated.cross_layer`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from tl_superposition.core.atomic import write_json_atomic, write_text_atomic
from tl_superposition.core.reading import read_json
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.config import BIAS_INITS
from tl_superposition.gated.restarts import RestartsResult, train_gated_restarts
from tl_superposition.gated.sources import TensorBatches, layer_activations
from tl_superposition.gated.train import GatedTrainConfig, GatedTrainResult, train_gated_block
from tl_superposition.toys.analysis import attention_ranking, minimal_head_sets, subset_ablation
from tl_superposition.toys.check import SolelyEncodedReport, solely_encoded, spliced_accuracy
from tl_superposition.toys.datasets import ToyDataset
from tl_superposition.toys.gates import gate_map
from tl_superposition.toys.models import (
    load_toy_model,
    make_toy_model,
    overlap_copy_model,
    save_toy_model,
)
from tl_superposition.toys.settings import SETTINGS, ToySetting
from tl_superposition.toys.train import ToyTrainConfig, train_toy_model

log = logging.getLogger(__name__)

#: Dataset seeds: training (the authors' seed 0), the 100k-sample check (the authors' 1), and
#: the toy model's early-stopping validation.
TRAIN_SEED, CHECK_SEED, STOP_SEED = 0, 1, 2


@dataclass
class ToyRunOptions:
    """Settings shared by :func:`run_toy` and :func:`run_cross_layer`.

    Attributes:
        epochs: gated-block epochs (None: the setting's, the authors' 1000).
        n_train: training sequences (authors: 100 batches x 1000, seed 0).
        n_check: sequences of the solely-encoded check (authors: 100,000, seed 1).
        batch_size: sequences per training step.
        compile: ``torch.compile`` the block's training step.
        plots: write PNG figures.
        progress: tqdm bars.
        toy_config: training settings of the reference model (None:
            :meth:`ToySetting.toy_train_config`).
        toy_seed: seed of the reference toy model (None: the run's seed). Fixing it varies
            only the block's initialisation across seeds, over one reference model.
        alpha: gate penalty weight of the block (None: the setting's; for sweeps).
        alpha_warmup_steps: steps over which the weight rises from 0 (0: none, the authors').
        lr: Adam learning rate of the block (None: the setting's).
        bias_init: the blocks' starting query/key/value biases, ``"zeros"`` or ``"xavier"``
            (the authors' draw; :attr:`GatedAttentionConfig.bias_init`).
        restarts: blocks trained together from seeds ``seed, seed + 1000, ...``
            (:func:`~tl_superposition.gated.restarts.train_gated_restarts`); the one with the
            lowest training objective is kept and checked, every restart's check is reported
            (one-layer runs; 1: one block, trained resumably as before).
        until_learnt: 0 to train for ``epochs``; N > 0 to train in stages of N epochs and
            stop once the kept block (blocks) answers every task above 99% on 10,000
            sequences of a seed used neither for training nor for the check, ``epochs`` then
            being the most it trains.
    """

    epochs: int | None = None
    n_train: int = 100_000
    n_check: int = 100_000
    batch_size: int = 1000
    compile: bool = False
    plots: bool = True
    progress: bool = True
    toy_config: ToyTrainConfig | None = None
    toy_seed: int | None = None
    alpha: float | None = None
    alpha_warmup_steps: int = 0
    lr: float | None = None
    bias_init: str = "zeros"
    restarts: int = 1
    until_learnt: int = 0

    def __post_init__(self) -> None:
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        if self.until_learnt < 0:
            raise ValueError(f"until_learnt must be >= 0 (0: off), got {self.until_learnt}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or None for the setting's), got {self.epochs}")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (or None for the setting's), got {self.alpha}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0 (or None for the setting's), got {self.lr}")
        if self.alpha_warmup_steps < 0:
            raise ValueError(f"alpha_warmup_steps must be >= 0, got {self.alpha_warmup_steps}")
        if self.bias_init not in BIAS_INITS:
            raise ValueError(f"bias_init must be one of {BIAS_INITS}, got {self.bias_init!r}")
        for name in ("n_train", "n_check", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.n_train:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds n_train {self.n_train}: lower it"
            )

    def train_config(self, setting: ToySetting) -> GatedTrainConfig:
        """The block's training settings: these (or the setting's) alpha, lr and epochs."""
        return GatedTrainConfig(
            alpha=setting.alpha if self.alpha is None else self.alpha,
            alpha_warmup_steps=self.alpha_warmup_steps,
            lr=setting.lr if self.lr is None else self.lr,
            epochs=self.epochs or setting.epochs,
            compile=self.compile,
            log_every_steps=500,
            checkpoint_every_steps=1000,
        )

    def stages(self, epochs: int) -> list[int]:
        """The epochs at which training pauses to test whether the task is relearnt (the
        last one ``epochs``); ``[epochs]`` without :attr:`until_learnt`."""
        every = self.until_learnt
        return [*range(every, epochs, every), epochs] if every else [epochs]

    def reference_seed(self, seed: int) -> int:
        """The reference toy model's seed in a run of block seed ``seed``."""
        return seed if self.toy_seed is None else self.toy_seed

    def run_dir(self, out: str | os.PathLike, setting: ToySetting, seed: int) -> Path:
        """``out/<setting>/seed<seed>``, or ``.../seed<seed>-toy<t>`` for another toy seed."""
        t = self.reference_seed(seed)
        return Path(out) / setting.slug / (f"seed{seed}" if t == seed else f"seed{seed}-toy{t}")


def _min(col: Any) -> float:
    return float(pd.Series(col).to_numpy().min())


def _write_csv(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a run folder removed under a live run
    write_text_atomic(path, df.to_csv(index=index))


def reference_model(
    setting: ToySetting,
    seed: int,
    run_dir: Path,
    train: ToyDataset,
    toy_config: ToyTrainConfig | None = None,
    progress: bool = True,
) -> Any:
    """The setting's reference toy model: hand-built, loaded, or trained.

    Loaded from ``run_dir/toy``, else copied from the run of block seed ``seed`` beside it
    (``../seed<seed>/toy``: training is deterministic for a seed, so it is the same model),
    else trained from ``seed`` and saved to ``run_dir/toy``.
    """
    if setting.constructed:
        return overlap_copy_model()
    for folder in (run_dir / "toy", run_dir.parent / f"seed{seed}" / "toy"):
        if (folder / "toy_config.json").is_file():
            model = load_toy_model(folder)
            if folder != run_dir / "toy":
                save_toy_model(model, run_dir / "toy")
            return model.eval()
    model = make_toy_model(setting.n_heads, train.d_vocab, setting.n_layers, seed=seed)
    stop = setting.dataset(20_000, STOP_SEED)
    cfg = toy_config or setting.toy_train_config()
    result = train_toy_model(model, train, stop, cfg, progress=progress)
    if not result.reached:
        log.warning(
            "%s seed %d: toy model below target accuracy %s",
            setting.name,
            seed,
            result.accuracy.round(4).to_dict(),
        )
    _write_csv(result.history, run_dir / "toy_history.csv")
    save_toy_model(model, run_dir / "toy")
    return model.eval()


def _check_files(
    model: Any,
    val: ToyDataset,
    blocks: dict[int, GatedAttentionBlock],
    run_dir: Path,
    prefix: str,
    plots: bool,
) -> tuple[SolelyEncodedReport, pd.DataFrame]:
    """Solely-encoded check and all-subset ablation table, written as CSV (and PNG)."""
    ablation = subset_ablation(model, val, blocks)
    report = solely_encoded(model, val, blocks, ablation=ablation)
    _write_csv(report.table, run_dir / f"{prefix}_check.csv")
    _write_csv(report.fractions, run_dir / f"{prefix}_fractions.csv", index=True)
    table = ablation.table()
    _write_csv(table, run_dir / f"{prefix}_ablation.csv")
    if plots:
        from tl_superposition.toys.plots import plot_ablation

        plot_ablation(table, title=f"{prefix}: accuracy with only these heads kept").savefig(
            run_dir / f"{prefix}_ablation.png", dpi=110
        )
    return report, table


def _authors_check(
    model: Any, val: ToyDataset, blocks: dict[int, GatedAttentionBlock], path: Path
) -> SolelyEncodedReport:
    """The check as cmathw/gated-attn's script reads it: kept heads' outputs, no residual."""
    ablation = subset_ablation(model, val, blocks, include_residual=False)
    report = solely_encoded(model, val, blocks, ablation=ablation)
    _write_csv(report.table, path)
    return report


def toy_block(
    model: Any, layer: int, setting: ToySetting, seed: int, bias_init: str = "zeros"
) -> GatedAttentionBlock:
    """A fresh gated block for a toy layer, shaped as the authors' toy block.

    Xavier initialisation, ``setting.expansion_factor`` heads per toy head, normalised
    ``W_V``/``W_O``, learnt query/key/value biases and no output bias, as in
    cmathw/gated-attn's ``ModifiedAttention``, whatever biases the reference layer has: a
    hand-built reference (``copy3``) has none, and without value biases a normalised head
    cannot write more than the norm of its one-hot input, below what those references write.
    The biases start at zero, or with ``bias_init="xavier"`` as the authors draw them.
    """
    return GatedAttentionBlock.from_layer(
        model,
        layer,
        setting.expansion_factor,
        seed=seed,
        qkv_bias=True,
        out_bias=False,
        bias_init=bias_init,
    )


def _same_training(
    row: dict[str, Any], cfg: GatedTrainConfig, setting: ToySetting, opts: ToyRunOptions
) -> bool:
    """Whether a saved summary row was trained with ``cfg``'s epochs, alpha, warm-up and lr,
    and ``opts``' initial biases, restarts, stages and data sizes (one-layer runs' restarts).

    Rows written before these were recorded used the setting's values, no warm-up, zero
    biases, one restart, no stages and the default data sizes.
    """
    restarts = opts.restarts if setting.n_layers == 1 else 1
    return (
        row.get("gated_epochs") == cfg.epochs
        and row.get("gated_alpha", setting.alpha) == cfg.alpha
        and row.get("gated_alpha_warmup_steps", 0) == cfg.alpha_warmup_steps
        and row.get("gated_lr", setting.lr) == cfg.lr
        and row.get("gated_bias_init", "zeros") == opts.bias_init
        and row.get("restarts", 1) == restarts
        and row.get("gated_until_learnt", 0) == opts.until_learnt
        and _sizes(row) == _sizes(opts.__dict__)
    )


def _sizes(where: dict[str, Any]) -> tuple[int, int, int]:
    """``(n_train, n_check, batch_size)`` of a summary row or of options (defaults if absent)."""
    return (
        where.get("n_train", 100_000),
        where.get("n_check", 100_000),
        where.get("batch_size", 1000),
    )


def _data_and_reference(
    setting: ToySetting, seed: int, run_dir: Path, opts: ToyRunOptions
) -> tuple[ToyDataset, ToyDataset, Any]:
    """The training and check datasets and the reference toy model of one run."""
    train = setting.dataset(opts.n_train, TRAIN_SEED)
    val = setting.dataset(opts.n_check, CHECK_SEED)
    toy_seed = opts.reference_seed(seed)
    model = reference_model(setting, toy_seed, run_dir, train, opts.toy_config, opts.progress)
    return train, val, model


def run_toy(
    setting: ToySetting,
    seed: int,
    out: str | os.PathLike,
    options: ToyRunOptions | None = None,
) -> dict[str, Any]:
    """One toy setting and seed, end to end; returns (and writes) its summary row.

    Args:
        setting: a one-layer :class:`~tl_superposition.toys.settings.ToySetting`.
        seed: seed of the block's initialisation, and of the toy model's unless
            ``options.toy_seed`` is set.
        out: root folder; the run writes to ``out/<setting.slug>/seed<seed>`` (see
            :meth:`ToyRunOptions.run_dir`).
        options: epochs, data sizes, figures (:class:`ToyRunOptions`; defaults if None).

    Returns:
        The summary row (see :func:`reproduction_table`).

    Raises:
        ValueError: a two-layer setting (use :func:`run_cross_layer`).
    """
    if setting.n_layers != 1:
        raise ValueError(f"{setting.name} has {setting.n_layers} layers: use run_cross_layer")
    opts = options or ToyRunOptions()
    run_dir = opts.run_dir(out, setting, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = opts.train_config(setting)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        row = read_json(summary_path)
        same = _same_training(row, cfg, setting, opts)
        done = same and "removed_authors_check" in row
        if done or setting.task == "ov_coherent":
            return row

    train, val, model = _data_and_reference(setting, seed, run_dir, opts)
    ref, ref_table = _check_files(model, val, {}, run_dir, "toy", opts.plots)
    row: dict[str, Any] = {
        "setting": setting.name,
        "seed": seed,
        "toy_seed": opts.reference_seed(seed),
        "n_train": opts.n_train,
        "n_check": opts.n_check,
        "batch_size": opts.batch_size,
        "reference": "hand-built" if setting.constructed else "trained",
        "toy_accuracy": _min(ref.table["accuracy"]),
        "toy_map": ref.task_to_head(),
        "toy_superposition": not ref.removed,
    }
    if setting.task == "ov_coherent":
        ranking = attention_ranking(model, val)
        _write_csv(ranking, run_dir / "attention_ranking.csv")
        row["ranking"] = ranking.pivot(index="head", columns="token", values="rank").to_dict()
        write_json_atomic(summary_path, row)
        return row

    x, y = layer_activations(model, train.tokens, 0, "hook_resid_pre")
    source = TensorBatches(x, y, opts.batch_size)
    if opts.restarts > 1:
        block, history, steps = _restarts(
            model, val, source, cfg, setting, seed, opts, row, run_dir
        )
    else:
        block = toy_block(model, 0, setting, seed, opts.bias_init)

        def train_to(epochs: int) -> GatedTrainResult:
            return train_gated_block(
                block, source, cfg.replace(epochs=epochs), run_dir / "gated", opts.progress
            )

        result = _in_stages(train_to, lambda _: _learnt(model, setting, {0: block}), cfg, opts, row)
        history, steps = result.history, result.steps
    block.save(run_dir / "gated" / "block")
    _write_csv(history, run_dir / "gated_history.csv")
    report, table = _check_files(model, val, {0: block}, run_dir, "gated", opts.plots)
    authors = _authors_check(model, val, {0: block}, run_dir / "gated_check_authors.csv")
    gmap = gate_map(model, {0: block}, val.subset(slice(0, 20_000)))  # memory: 20k sequences
    _write_csv(gmap, run_dir / "gate_map.csv", index=True)
    if opts.plots:
        from tl_superposition.toys.plots import plot_gate_map

        plot_gate_map(gmap, title=f"{setting.name} seed {seed}: mean gate at (B, A)").savefig(
            run_dir / "gate_map.png", dpi=110
        )
    last = history.iloc[-1]
    row.update(
        {
            "gated_heads": block.cfg.n_heads,
            "gated_epochs": cfg.epochs,
            "gated_alpha": cfg.alpha,
            "gated_alpha_warmup_steps": cfg.alpha_warmup_steps,
            "gated_lr": cfg.lr,
            "gated_bias_init": opts.bias_init,
            "gated_steps": steps,
            "final_mse": float(last["mse"]),
            "final_penalty": float(last["penalty"]),
            "accuracy": _min(report.table["accuracy"]),
            "heads_used": report.heads_used,
            "map": report.task_to_head(),
            "removed": report.removed,
            "distinct": report.distinct,
            "map_authors_check": authors.task_to_head(),
            "removed_authors_check": authors.removed,
        }
    )
    if setting.task == "overlap_copy":
        row["toy_minimal_sets"] = _sets(minimal_head_sets(ref_table))
        row["minimal_sets"] = _sets(minimal_head_sets(table))
        row["sets_disjoint"] = _disjoint(minimal_head_sets(table))
    write_json_atomic(summary_path, row)
    return row


def _restarts(
    model: Any,
    val: ToyDataset,
    source: TensorBatches,
    cfg: GatedTrainConfig,
    setting: ToySetting,
    seed: int,
    opts: ToyRunOptions,
    row: dict[str, Any],
    run_dir: Path,
) -> tuple[GatedAttentionBlock, pd.DataFrame, int]:
    """Train ``opts.restarts`` blocks together (checkpointed in ``run_dir/gated``), keep the
    lowest-objective one; add to ``row`` every restart's objective and whether its block
    removes superposition."""
    seeds = [seed + 1000 * r for r in range(opts.restarts)]
    blocks = [toy_block(model, 0, setting, s, opts.bias_init) for s in seeds]

    def train_to(epochs: int) -> RestartsResult:
        return train_gated_restarts(
            blocks, source, cfg.replace(epochs=epochs), opts.progress, run_dir / "gated"
        )

    res = _in_stages(train_to, lambda r: _learnt(model, setting, {0: r.block}), cfg, opts, row)
    removed = [bool(solely_encoded(model, val, {0: b}).removed) for b in res.blocks]
    table = pd.DataFrame(res.objectives).assign(seed=seeds, removed=removed)
    table.insert(0, "restart", range(len(seeds)))
    table["chosen"] = table["restart"] == res.chosen
    _write_csv(table, run_dir / "restarts.csv")
    _write_csv(res.history, run_dir / "restarts_history.csv")
    row.update(
        {
            "restarts": opts.restarts,
            "restart_seeds": seeds,
            "restart_chosen": res.chosen,
            "restart_objectives": [o["loss"] for o in res.objectives],
            "restart_removed": removed,
            "restart_removal_rate": sum(removed) / len(removed),
        }
    )
    chosen = res.history.loc[res.history["restart"] == res.chosen]
    history = pd.DataFrame(chosen.drop(columns="restart")).reset_index(drop=True)
    return res.block, history, res.steps


def _learnt(model: Any, setting: ToySetting, blocks: dict[int, Any]) -> bool:
    """Whether the model with ``blocks`` spliced in answers every task above 99% on 10,000
    sequences of the stopping seed."""
    data = setting.dataset(10_000, STOP_SEED)
    return bool((spliced_accuracy(model, data, blocks) > 0.99).all())


T = TypeVar("T")


def _in_stages(
    train_to: Callable[[int], T],
    learnt: Callable[[T], bool],
    cfg: GatedTrainConfig,
    opts: ToyRunOptions,
    row: dict[str, Any],
) -> T:
    """Train to ``cfg.epochs``, or in :meth:`ToyRunOptions.stages` until ``learnt``; record
    in ``row`` the epochs trained and, when staged, whether the task was relearnt."""
    stages = opts.stages(cfg.epochs)
    for epochs in stages:
        out = train_to(epochs)  # each stage resumes from the previous one's checkpoint
        done = bool(opts.until_learnt) and learnt(out)
        if done or epochs == stages[-1]:
            row["gated_until_learnt"] = opts.until_learnt
            row["gated_epochs_trained"] = epochs
            row["relearnt"] = done if opts.until_learnt else None
            return out
    raise AssertionError("stages always end at cfg.epochs")


def _sets(minimal: pd.DataFrame) -> dict[str, list[str]]:
    return {str(r["task_name"]): list(r["sets"]) for _, r in minimal.iterrows()}


def _disjoint(minimal: pd.DataFrame) -> bool:
    """Whether some choice of one minimal set per task uses every head at most once."""
    options = [[set(s.split("+")) for s in r["sets"]] for _, r in minimal.iterrows()]
    if any(not o for o in options):
        return False

    def search(i: int, used: set[str]) -> bool:
        if i == len(options):
            return True
        return any(search(i + 1, used | s) for s in options[i] if not used & s)

    return search(0, set())


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def reproduction_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The reproduction table: setting, seed, trigram accuracy, heads used, map, removed (and,
    where used, epochs trained until relearnt, and how many restarts removed superposition).

    Args:
        rows: summary rows of :func:`run_toy`.
    """
    out = []
    for r in rows:
        if "gated_heads" not in r:
            continue
        out.append(
            {
                "setting": r["setting"],
                "seed": r["seed"],
                "toy seed": r.get("toy_seed", r["seed"]),
                "toy model": f"{r['toy_accuracy']:.4f}; " + r["toy_map"],
                "block heads": r["gated_heads"],
                "epochs": r["gated_epochs"],
                "trigram accuracy (min)": round(r["accuracy"], 4),
                "heads used": len(r["heads_used"]),
                "trigram -> head": r["map"],
                "superposition removed": "yes" if r["removed"] else "no",
                "removed, authors' check": _yes(r.get("removed_authors_check")),
                **_staging_columns(r),
                **_restart_columns(r),
            }
        )
    return pd.DataFrame(out)


def _staging_columns(r: dict[str, Any]) -> dict[str, Any]:
    """Epochs trained and whether relearnt, for a run trained until the task was relearnt."""
    if not r.get("gated_until_learnt"):
        return {}
    return {"epochs trained": r["gated_epochs_trained"], "relearnt": _yes(r["relearnt"])}


def _restart_columns(r: dict[str, Any]) -> dict[str, Any]:
    """For a run with restarts: the kept restart and how many restarts removed superposition."""
    if r.get("restarts", 1) == 1:
        return {}
    flags = r["restart_removed"]
    return {"restarts removing it": f"{sum(flags)} of {len(flags)}",
            "kept restart": r["restart_chosen"]}  # fmt: skip


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub-flavoured Markdown table (no index)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def load_rows(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``out``, sorted by setting, seed and toy seed."""
    rows = [read_json(p) for p in Path(out).glob("*/seed*/summary.json")]
    return sorted(rows, key=lambda r: (r["setting"], r["seed"], r.get("toy_seed", r["seed"])))


# --------------------------------------------------------------------------- two layers

#: The three ways :func:`run_cross_layer` replaces the two layers.
CROSS_LAYER_VARIANTS = ("within-layer", "joint, per-layer penalty", "joint, cross-layer penalty")


def _fresh_blocks(
    model: Any, setting: ToySetting, seed: int, bias_init: str
) -> dict[int, GatedAttentionBlock]:
    return {
        layer: toy_block(model, layer, setting, seed * 100 + layer, bias_init)
        for layer in range(model.cfg.n_layers)
    }


def _train_variant(
    variant: str,
    model: Any,
    setting: ToySetting,
    seed: int,
    train: ToyDataset,
    cfg: GatedTrainConfig,
    folder: Path,
    opts: ToyRunOptions,
    record: dict[str, Any],
) -> dict[int, GatedAttentionBlock]:
    """Train one variant's blocks (in stages with ``opts.until_learnt``; epochs trained and
    whether relearnt go to ``record``) and save them."""
    from tl_superposition.gated.cross_layer import CrossLayerGatedBlocks, cross_layer_source

    blocks = _fresh_blocks(model, setting, seed, opts.bias_init)
    if variant == "within-layer":
        sources = {
            layer: TensorBatches(
                *layer_activations(model, train.tokens, layer, "hook_resid_pre"), opts.batch_size
            )
            for layer in blocks
        }

        def train_to(epochs: int) -> dict[int, GatedAttentionBlock]:
            for layer, block in blocks.items():
                train_gated_block(block, sources[layer], cfg.replace(epochs=epochs),
                                  folder / f"layer{layer}", opts.progress)  # fmt: skip
            return blocks
    else:
        penalty = "joint" if variant.endswith("cross-layer penalty") else "per_layer"
        unit = CrossLayerGatedBlocks(model, blocks, penalty)
        source = cross_layer_source(model, train.tokens, sorted(blocks), opts.batch_size)

        def train_to(epochs: int) -> dict[int, GatedAttentionBlock]:
            train_gated_block(unit, source, cfg.replace(epochs=epochs), folder, opts.progress)
            return blocks

    _in_stages(train_to, lambda b: _learnt(model, setting, b), cfg, opts, record)
    for layer, block in blocks.items():
        block.save(folder / f"block{layer}")
    return blocks


def run_cross_layer(
    setting: ToySetting,
    seed: int,
    out: str | os.PathLike,
    options: ToyRunOptions | None = None,
) -> dict[str, Any]:
    """The two-layer setting: within-layer blocks versus blocks trained with a cross-layer penalty.

    Trains (or loads) the two-layer reference model, checks it, then for each of
    :data:`CROSS_LAYER_VARIANTS` trains fresh blocks for both layers (same seeds, epochs, alpha
    and learning rate) and runs the solely-encoded check over the heads of both blocks (a head
    of either layer kept, every combination of all other heads ablated). Files go to
    ``out/<setting.slug>/seed<seed>/<variant>/``.

    Returns:
        The summary row: the reference's map and, per variant, accuracy, map, heads used and
        whether every trigram is solely encoded.
    """
    opts = options or ToyRunOptions()
    run_dir = opts.run_dir(out, setting, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = opts.train_config(setting)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        row = read_json(summary_path)
        if _same_training(row, cfg, setting, opts):
            return row
    train, val, model = _data_and_reference(setting, seed, run_dir, opts)
    ref, _ = _check_files(model, val, {}, run_dir, "toy", opts.plots)
    row: dict[str, Any] = {
        "setting": setting.name,
        "seed": seed,
        "toy_seed": opts.reference_seed(seed),
        "n_train": opts.n_train,
        "n_check": opts.n_check,
        "batch_size": opts.batch_size,
        "reference": "trained",
        "toy_accuracy": _min(ref.table["accuracy"]),
        "toy_map": ref.task_to_head(),
        "toy_superposition": not ref.removed,
        "gated_epochs": cfg.epochs,
        "gated_alpha": cfg.alpha,
        "gated_alpha_warmup_steps": cfg.alpha_warmup_steps,
        "gated_lr": cfg.lr,
        "gated_bias_init": opts.bias_init,
        "gated_until_learnt": opts.until_learnt,
        "variants": {},
    }
    for variant in CROSS_LAYER_VARIANTS:
        folder = run_dir / variant.replace(", ", "_").replace(" ", "-")
        folder.mkdir(exist_ok=True)
        record: dict[str, Any] = {}
        blocks = _train_variant(variant, model, setting, seed, train, cfg, folder, opts, record)
        report, _ = _check_files(model, val, blocks, folder, "gated", opts.plots)
        row["variants"][variant] = {
            **record,
            "accuracy": _min(report.table["accuracy"]),
            "map": report.task_to_head(),
            "heads_used": report.heads_used,
            "removed": report.removed,
        }
    write_json_atomic(summary_path, row)
    return row


def cross_layer_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (seed, variant) of :func:`run_cross_layer` summaries.

    Each block row gives the penalty weight ``alpha`` and the steps of its linear warm-up
    (``alpha warm-up steps``, 0 for none) it was trained with, so runs that differ only
    in those are told apart; the original model's row leaves both blank.
    """
    out = []
    for r in rows:
        alpha = r.get("gated_alpha", SETTINGS[r["setting"]].alpha)
        warmup = r.get("gated_alpha_warmup_steps", 0)
        out.append(
            {
                "seed": r["seed"],
                "alpha": "",
                "alpha warm-up steps": "",
                "variant": "original model",
                "trigram accuracy (min)": round(r["toy_accuracy"], 4),
                "trigram -> head": r["toy_map"],
                "every trigram solely encoded": "no" if r["toy_superposition"] else "yes",
            }
        )
        for name, v in r["variants"].items():
            out.append(
                {
                    "seed": r["seed"],
                    "alpha": alpha,
                    "alpha warm-up steps": warmup,
                    "variant": name,
                    "trigram accuracy (min)": round(v["accuracy"], 4),
                    "trigram -> head": v["map"],
                    "every trigram solely encoded": "yes" if v["removed"] else "no",
                    **_staging_columns({"gated_until_learnt": r.get("gated_until_learnt"), **v}),
                }
            )
    return pd.DataFrame(out)
