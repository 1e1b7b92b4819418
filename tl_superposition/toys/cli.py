"""``tl-superposition toy``: toy superposition, its analysis, and its removal by gated blocks.

For each setting and seed: train (or load) the toy model, run the head-subset ablations and
the solely-encoded check on it, train a gated attention block with the setting's alpha and
learning rate (or ``--alpha``/``--lr``), check the block, and write tables and figures (see
:mod:`tl_superposition.toys.gated_runs` for the files). Runs resume where they stopped.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tl_superposition.core.options import add_progress
from tl_superposition.gated.config import BIAS_INITS
from tl_superposition.toys.settings import PUBLISHED, SETTINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``toy`` options on ``p``."""
    p.add_argument(
        "--settings",
        default=",".join(PUBLISHED),
        help=f"comma-separated settings among {list(SETTINGS)} (default: %(default)s)",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--toy-seed",
        type=int,
        default=None,
        help="seed of the reference toy model for every run (default: each run's own seed); "
        "with it, --seeds varies only the gated block's initialisation",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="gated-block epochs over the training set (default: each setting's, the "
        "authors' 1000)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="gated-block penalty weight (default: each setting's); give each value its own --out",
    )
    p.add_argument(
        "--alpha-warmup-steps",
        type=int,
        default=0,
        help="steps over which the penalty weight rises from 0 (default: 0, the authors')",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="gated-block learning rate (default: each setting's)",
    )
    p.add_argument(
        "--bias-init",
        choices=BIAS_INITS,
        default="zeros",
        help="starting query/key/value biases of the gated blocks: zeros (default) or "
        "Xavier-normal draws, as the authors' code makes them",
    )
    p.add_argument(
        "--n-train", type=int, default=100_000, help="training sequences (default: %(default)s)"
    )
    p.add_argument(
        "--n-check",
        type=int,
        default=100_000,
        help="sequences of the solely-encoded check (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="gated blocks trained together per run (seeds seed, seed+1000, ...); the one with "
        "the lowest training objective is kept (default: %(default)s)",
    )
    p.add_argument(
        "--until-learnt",
        type=int,
        default=0,
        metavar="N",
        help="train the blocks in stages of N epochs and stop once the kept block answers "
        "every task above 99%% (10,000 sequences of a seed used neither for training nor for "
        "the check); --epochs is then the most (default: 0, train --epochs)",
    )
    p.add_argument(
        "--toy-max-epochs",
        type=int,
        default=300,
        help="most epochs of the reference toy model's training (default: %(default)s; it "
        "stops once every task is above 99%%, after at least 20 epochs)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the block's training step (measure first: on a loaded 2-core "
        "machine it ran slower than eager)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    add_progress(p)


def _parse(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not names or not seeds:
        raise ValueError("give at least one setting and one seed")
    layered = [n for n in names if SETTINGS[n].n_layers > 1]
    if layered and args.restarts > 1:
        raise ValueError(f"--restarts is for one-layer settings; drop it for {layered}")
    for name in ("n_train", "n_check", "batch_size", "toy_max_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if args.alpha is not None and args.alpha < 0:
        raise ValueError("--alpha must be >= 0")
    if args.lr is not None and args.lr <= 0:
        raise ValueError("--lr must be > 0")
    if args.alpha_warmup_steps < 0:
        raise ValueError("--alpha-warmup-steps must be >= 0")
    if args.until_learnt < 0 or args.restarts < 1:
        raise ValueError("need --until-learnt >= 0 (0: off) and --restarts >= 1")
    return names, seeds


def run(args: argparse.Namespace) -> int:
    """Run every (setting, seed), seeds in the outer loop; print and write the tables."""
    from tl_superposition.core.atomic import write_text_atomic
    from tl_superposition.toys.gated_runs import (
        ToyRunOptions,
        cross_layer_table,
        load_rows,
        markdown_table,
        reproduction_table,
        run_cross_layer,
        run_toy,
    )

    names, seeds = _parse(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ToyRunOptions(
        epochs=args.epochs,
        n_train=args.n_train,
        n_check=args.n_check,
        batch_size=args.batch_size,
        compile=args.compile,
        plots=not args.no_plots,
        progress=not args.no_progress,
        toy_seed=args.toy_seed,
        alpha=args.alpha,
        alpha_warmup_steps=args.alpha_warmup_steps,
        lr=args.lr,
        bias_init=args.bias_init,
        restarts=args.restarts,
        until_learnt=args.until_learnt,
    )
    for seed in seeds:
        for name in names:
            setting = SETTINGS[name]
            toy_config = replace(
                setting.toy_train_config(),
                max_epochs=args.toy_max_epochs,
                min_epochs=min(20, args.toy_max_epochs),
            )
            runner = run_cross_layer if setting.n_layers > 1 else run_toy
            row = runner(setting, seed, out, replace(common, toy_config=toy_config))
            print(json.dumps(row))
    rows = load_rows(out)
    one_layer = [r for r in rows if "variants" not in r]
    two_layer = [r for r in rows if "variants" in r]
    text = ""
    if any("gated_heads" in r for r in one_layer):
        text += "## Gated blocks on one-layer toys\n\n" + markdown_table(
            reproduction_table(one_layer)
        )
    if two_layer:
        text += "\n## Two layers: within-layer versus cross-layer gating\n\n" + markdown_table(
            cross_layer_table(two_layer)
        )
    write_text_atomic(out / "tables.md", text)
    print(text)
    print(f"wrote {out / 'tables.md'}")
    return 0
