"""``tl-superposition collect``: activation collection from the command line.

Example::

    tl-superposition collect --model smollm2-135m --source ../shared/data/wikitext-2 \\
        --split valid --layers 15 --hooks ln1.hook_normalized,attn.hook_q,attn.hook_k \\
        --context-size 128 --max-tokens 100000 --out acts/wt2_l15
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``collect`` options on ``parser``."""
    from tl_superposition.activations.collector import SHORT_HOOKS

    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="model for tl_superposition.load_model (default: smollm2-135m)",
    )
    parser.add_argument(
        "--source",
        default="pydoc",
        help="'pydoc' (built-in offline corpus, default), a text file or folder, "
        "or a Hugging Face dataset name (optionally name:config)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="dataset split; for a folder, files whose name starts with it "
        "(e.g. 'valid' for wikitext-2/valid.txt)",
    )
    parser.add_argument("--column", default="text", help="text column (default: text)")
    parser.add_argument(
        "--hooks",
        default="ln1.hook_normalized,attn.hook_q,attn.hook_k",
        help="comma-separated hook names: full (blocks.15.attn.hook_q) or short "
        f"with --layers; short names: {','.join(SHORT_HOOKS)}",
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers for short hook names (e.g. 15 or 10,15)",
    )
    parser.add_argument(
        "--heads",
        default=None,
        help="comma-separated heads to keep for attn.hook_pattern (default all)",
    )
    parser.add_argument(
        "--context-size",
        type=int,
        default=128,
        help="tokens per context including BOS (default 128)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="stop after this many tokens (default: the whole source)",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=32768, help="tokens per shard file (default 32768)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="storage dtype (default float32)",
    )
    parser.add_argument(
        "--prepend-bos",
        default="auto",
        choices=["auto", "yes", "no"],
        help="start every context with BOS (auto: as the model expects)",
    )
    parser.add_argument(
        "--separator",
        default="bos",
        choices=["bos", "eos", "none"],
        help="token placed between documents (default bos)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing collection in --out instead of refusing",
    )
    parser.add_argument("--device", default=None, help="torch device (default: the model's)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed recorded in the manifest (the reader's default shuffle seed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run the collection described by ``args``; returns 0 on success."""
    from tl_superposition import load_model
    from tl_superposition.activations.collector import collect

    layers = _int_list(args.layers, "layers")
    heads = _int_list(args.heads, "heads")
    prepend = {"auto": None, "yes": True, "no": False}[args.prepend_bos]
    model = load_model(args.model, device=args.device) if args.device else load_model(args.model)
    summary = collect(
        model,
        args.source,
        args.hooks,
        out_dir=args.out,
        layers=layers,
        context_size=args.context_size,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
        heads=heads,
        split=args.split,
        column=args.column,
        prepend_bos=prepend,
        separator=args.separator,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        verbose=False,
    )
    print(summary.line())
    return 0
