"""``tl-superposition train-gated``: a gated attention block for a real model's layer.

The options are the fields of :class:`~tl_superposition.gated.layer_run.GatedLayerConfig`; the
work is :func:`~tl_superposition.gated.layer_run.train_gated` (see there for what is trained
and written). Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tl_superposition.core.options import add_device, add_model
from tl_superposition.gated.config import INITS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``train-gated`` options on ``p``."""
    add_model(p)
    p.add_argument("--layer", type=int, required=True, help="the attention layer to replace")
    p.add_argument(
        "--out", required=True, help="output folder (created; resumed if it holds a run)"
    )
    p.add_argument(
        "--source",
        help="training text: a file or folder (e.g. path/to/wikitext-2), or a Hugging Face "
        "dataset name; not needed with --acts",
    )
    p.add_argument("--split", default=None, help="split of --source (e.g. 'valid')")
    p.add_argument(
        "--acts",
        default=None,
        help="read training pairs from a collect folder holding ln1.hook_normalized and "
        "hook_attn_out of the layer, instead of streaming from --source",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="run the model up to the layer on every batch instead of keeping the training "
        "pairs in memory (memory: 2 x 4 x d_model bytes per training token)",
    )
    p.add_argument("--eval-source", required=True, help="held-out text (file, folder or name)")
    p.add_argument("--eval-split", default=None, help="split of --eval-source (e.g. 'test')")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument(
        "--max-tokens", type=int, default=200_000, help="training tokens (default: %(default)s)"
    )
    p.add_argument(
        "--max-eval-tokens", type=int, default=32_768, help="held-out tokens (default: %(default)s)"
    )
    p.add_argument("--expansion-factor", type=int, default=2)
    p.add_argument("--init", choices=[i for i in INITS if i != "copy"], default="duplicate")
    p.add_argument("--alpha", type=float, default=0.05, help="gate penalty weight")
    p.add_argument(
        "--alphas",
        default=None,
        help="comma-separated penalty weights: an alpha sweep, one run per value in "
        "OUT/alpha<value>/, then OUT/sweep.csv and OUT/tradeoff.png (replaces --alpha)",
    )
    p.add_argument(
        "--alpha-warmup-steps",
        type=int,
        default=0,
        help="steps over which the penalty weight rises from 0 to --alpha (default: 0, none)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--batch-contexts", "--batch-size", dest="batch_contexts", type=int, default=8,
        help="contexts per step (--batch-size: its former name)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ioi", type=int, default=128, help="IOI prompts (0: skip the IOI figure)")
    p.add_argument(
        "--threshold", type=float, default=0.1, help="attention at which a head is active"
    )
    p.add_argument(
        "--checkpoint-every", dest="checkpoint_every_steps", type=int, default=200,
        help="steps between checkpoints",
    )  # fmt: skip
    add_device(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~tl_superposition.gated.layer_run.GatedLayerConfig` of the options (checked:
    bad input fails here, before any model loads)."""
    from tl_superposition.gated.layer_run import GatedLayerConfig

    names = GatedLayerConfig.__dataclass_fields__
    return GatedLayerConfig(**{k: v for k, v in vars(args).items() if k in names})


def alphas_from_args(args: argparse.Namespace) -> list[float] | None:
    """The ``--alphas`` list (None without it); one line naming the problem if malformed."""
    if args.alphas is None:
        return None
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    if not alphas or min(alphas) < 0:
        raise ValueError("--alphas needs at least one value, all >= 0")
    return alphas


def run(args: argparse.Namespace) -> int:
    """Train (or resume), save, evaluate, print the summary (:func:`.layer_run.train_gated`);
    with ``--alphas``, the sweep (:func:`.sweep.sweep_alpha`) and its table."""
    from tl_superposition.gated.layer_run import train_gated
    from tl_superposition.gated.sweep import check_sweep_folder, sweep_alpha
    from tl_superposition.models import load_model

    cfg = config_from_args(args)
    alphas = alphas_from_args(args)
    if alphas is not None:
        check_sweep_folder(cfg, args.out)
    model = load_model(args.model, device=args.device)
    if alphas is not None:
        table = sweep_alpha(model, cfg, alphas, args.out, model_name=args.model)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {args.out}/sweep.csv and {args.out}/tradeoff.png")
        return 0
    summary = train_gated(model, cfg, args.out, model_name=args.model)
    print(json.dumps(summary, indent=2))
    return 0
