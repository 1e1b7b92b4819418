"""``tl-superposition train-gated``: a gated attention block for a real model's layer.

Trains a :class:`~tl_superposition.gated.block.GatedAttentionBlock` to reproduce
``blocks.L.hook_attn_out`` from ``blocks.L.ln1.hook_normalized`` on one text source (the
layer's input and output computed once and kept in memory; or streamed, the model running up
to the layer on every batch; or read from an existing ``collect`` folder),
checkpointing as it goes (rerun the same command to resume), then splices it in on held-out
text and reports the fraction of variance explained, the loss change, the IOI
logit-difference change and the co-attention statistics before and after.

Output folder: ``block/`` (cfg.json, weights.safetensors), ``checkpoint.pt``,
``history.csv``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_superposition.gated.config import INITS

if TYPE_CHECKING:
    from torch import Tensor


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``train-gated`` options on ``p``."""
    p.add_argument("--model", default="smollm2-135m", help="model name or local folder")
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
        "--alpha-warmup-steps",
        type=int,
        default=0,
        help="steps over which the penalty weight rises from 0 to --alpha (default: 0, none)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="contexts per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ioi", type=int, default=128, help="IOI prompts (0: skip the IOI figure)")
    p.add_argument(
        "--threshold", type=float, default=0.1, help="attention at which a head is active"
    )
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--device", default="cpu")


def _check(args: argparse.Namespace) -> None:
    if args.acts is None and args.source is None:
        raise ValueError("give --source (text to stream) or --acts (a collect folder)")
    for name in ("context_size", "max_tokens", "max_eval_tokens", "expansion_factor", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size < 1 or args.alpha < 0 or args.lr <= 0 or args.n_ioi < 0:
        raise ValueError("need --batch-size >= 1, --alpha >= 0, --lr > 0, --n-ioi >= 0")
    if args.alpha_warmup_steps < 0:
        raise ValueError("--alpha-warmup-steps must be >= 0")
    if not 0 < args.threshold <= 1:
        raise ValueError("--threshold must be in (0, 1]")
    if args.acts is not None and not (Path(args.acts) / "manifest.json").is_file():
        raise FileNotFoundError(f"--acts {args.acts} is not a collect folder (no manifest.json)")


def run(args: argparse.Namespace) -> int:
    """Train (or resume), save, evaluate, print the summary."""
    from tl_superposition.core.atomic import write_json_atomic, write_text_atomic
    from tl_superposition.gated.block import GatedAttentionBlock
    from tl_superposition.gated.evaluate import evaluate_splice
    from tl_superposition.gated.sources import (
        LazyTensorBatches,
        ModelBatches,
        StoreBatches,
        layer_activations,
        text_contexts,
    )
    from tl_superposition.gated.train import GatedTrainConfig, train_gated_block
    from tl_superposition.ioi import make_ioi_dataset
    from tl_superposition.models import load_model

    _check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, device=args.device)
    if not 0 <= args.layer < model.cfg.n_layers:
        raise ValueError(f"--layer must be in 0..{model.cfg.n_layers - 1}")
    block = GatedAttentionBlock.from_layer(
        model, args.layer, args.expansion_factor, args.init, args.seed
    )
    eval_tokens = text_contexts(
        model, args.eval_source, args.eval_split, args.context_size, args.max_eval_tokens
    )
    if args.acts is not None:
        source: Any = StoreBatches(args.acts, args.layer, args.batch_size, args.seed)
    else:
        train_tokens = text_contexts(
            model, args.source, args.split, args.context_size, args.max_tokens
        )
        if args.stream:
            source = ModelBatches(model, args.layer, train_tokens, args.batch_size, args.seed)
        else:

            def make() -> tuple[Tensor, Tensor]:
                return layer_activations(
                    model,
                    train_tokens,
                    args.layer,
                    block.cfg.input_hook,
                    batch_size=args.batch_size,
                    progress=True,
                )

            shape = (*train_tokens.shape, model.cfg.d_model)
            source = LazyTensorBatches(make, shape, args.batch_size, shuffle=True, seed=args.seed)
    cfg = GatedTrainConfig(
        alpha=args.alpha,
        alpha_warmup_steps=args.alpha_warmup_steps,
        lr=args.lr,
        epochs=args.epochs,
        log_every=20,
        checkpoint_every=args.checkpoint_every,
    )
    t0 = time.perf_counter()
    result = train_gated_block(block.to(args.device), source, cfg, out)
    train_s = time.perf_counter() - t0
    block.save(out / "block")
    write_text_atomic(out / "history.csv", result.history.to_csv(index=False))
    ioi = make_ioi_dataset(model, args.n_ioi, seed=0) if args.n_ioi else None
    report = evaluate_splice(model, block, eval_tokens, ioi=ioi, threshold=args.threshold)
    n_train_tokens = source.n_batches * args.batch_size * args.context_size
    summary = {
        "model": args.model,
        "layer": args.layer,
        "block_heads": block.cfg.n_heads,
        "init": args.init,
        "alpha": args.alpha,
        "alpha_warmup_steps": args.alpha_warmup_steps,
        "lr": args.lr,
        "epochs": args.epochs,
        "steps": result.steps,
        "train_tokens_per_epoch": n_train_tokens,
        "train_seconds_this_call": round(train_s, 1),
        "tokens_per_s": round(
            (result.steps - result.resumed_from)
            * args.batch_size
            * args.context_size
            / max(train_s, 1e-9),
            1,
        ),
        "final_mse": float(result.history["mse"].iloc[-1]),
        "final_penalty": float(result.history["penalty"].iloc[-1]),
        **report,
    }
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0
