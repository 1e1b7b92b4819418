"""``tl-superposition trace-ioi``: the IOI circuit trace from the command line."""

from __future__ import annotations

import argparse

from tl_superposition.tracing.trace import TraceConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``trace-ioi`` options on ``p``."""
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (offline), a local Hugging Face folder, or a hub name "
        "such as 'gpt2' (default: %(default)s)",
    )
    p.add_argument("--n-prompts", type=int, default=256, help="IOI prompts (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="prompt generation seed (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--prompt-type", choices=["ABBA", "BABA", "mixed"], default="mixed")
    p.add_argument(
        "--prepend-bos",
        action="store_true",
        help="start prompts with BOS (the paper's prompts have none)",
    )
    p.add_argument(
        "--seeds",
        default="dla",
        help="'dla' (heads with the largest direct logit attribution), "
        "'name-movers' (GPT-2 small 9.6, 9.9, 10.0) or a list like '9.6,9.9'",
    )
    p.add_argument(
        "--seed-src",
        choices=["auto", "IO", "S2", "any"],
        default="auto",
        help="END firings of the seeds that start the trace: END->IO, END->S2 or any "
        "(auto: any for DLA seeds, IO otherwise)",
    )
    p.add_argument(
        "--n-seeds", type=int, default=3, help="number of DLA seeds (default: %(default)s)"
    )
    p.add_argument("--pattern-thresh", type=float, default=0.5, help="firing: pattern >= this")
    p.add_argument(
        "--thresh",
        type=float,
        default=1.0,
        help="sparse set reaches this fraction of the score (default: %(default)s)",
    )
    p.add_argument(
        "--edge-thresh",
        type=float,
        default=0.7,
        help="edges make up this fraction of the upstream contribution",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def run(args: argparse.Namespace) -> int:
    """Load the model, generate prompts, trace, write the outputs, print the summary."""
    from tl_superposition.ioi import make_ioi_dataset
    from tl_superposition.models import load_model
    from tl_superposition.tracing.ioi_trace import format_summary, trace_ioi

    if args.n_prompts < 1:
        raise ValueError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    for name in ("pattern_thresh", "edge_thresh"):
        if not 0 < getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if args.thresh <= 0:
        raise ValueError("--thresh must be > 0")
    model = load_model(args.model, device=args.device)
    dataset = make_ioi_dataset(
        model,
        args.n_prompts,
        prompt_type=args.prompt_type,
        seed=args.seed,
        prepend_bos=args.prepend_bos,
    )
    config = TraceConfig(
        pattern_thresh=args.pattern_thresh,
        thresh=args.thresh,
        edge_thresh=args.edge_thresh,
        batch_size=args.batch_size,
    )
    result = trace_ioi(
        model,
        dataset,
        seeds=args.seeds,
        n_seeds=args.n_seeds,
        seed_src=args.seed_src,
        config=config,
    )
    result.summary["model_arg"] = args.model
    paths = result.save(args.out, plots=not args.no_plots)
    print(format_summary(result.summary))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
