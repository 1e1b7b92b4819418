"""Benchmark a QK transcoder of one layer on held-out text and on held-out IOI prompts.

Trains (or resumes, in ``--out``) a QK transcoder of ``--layer`` on text streamed through the
model, packed as the collector packs it or cut in a context mix (``--bos-frac``,
``--random-offset``, ``--short-frac``, ``--short-size``: :class:`ContextMix`), then measures it

- on held-out text (``--eval-split``, ``--eval-contexts`` contexts of ``--context-size``):
  :func:`~tl_superposition.qk.evaluate_qk`'s KL of the reconstructed pattern (nats per query
  row), median L0 and dead features;
- on held-out IOI prompts (``--ioi-prompts`` of seed ``--ioi-seed``, the held-out half of the
  names, as the circuit benchmark's held-out prompts): for ``--heads``, the error share of END
  firings and the spliced attention on END -> IO and END -> S2 against the true one
  (:func:`~tl_superposition.qk.ioi_fit.ioi_fit`).

    python benchmarks/bench_qk_ioi.py --source path/to/wikitext-2 --layer 23 --heads 0,3 \\
        --out runs/qk-l23-packed
    python benchmarks/bench_qk_ioi.py --source path/to/wikitext-2 --layer 23 --heads 0,3 \\
        --bos-frac 0.5 --random-offset --short-frac 0.25 --out runs/qk-l23-mix

The last line printed is one JSON object: ``layers``, ``heads``, ``mix``, ``kl_full``,
``l0_q``, ``l0_k`` (medians), ``dead_frac`` (the larger of the two dictionaries'),
``error_frac_ioi``, ``attn_end_io_true``, ``attn_end_io_spliced``, ``attn_end_s2_true``,
``attn_end_s2_spliced``, ``per_head`` and the run's settings and seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", required=True, help="training and held-out text (a folder)")
    p.add_argument("--train-split", default="valid")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--layer", type=int, default=23)
    p.add_argument("--heads", default="0,3", help="heads of interest of --layer")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d-hidden", type=int, default=1200)
    p.add_argument("--max-tokens", type=int, default=512_000)
    p.add_argument("--batch-contexts", type=int, default=16)
    p.add_argument("--bos-frac", type=float, default=None)
    p.add_argument("--random-offset", action="store_true")
    p.add_argument("--short-frac", type=float, default=0.0)
    p.add_argument("--short-size", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-contexts", type=int, default=256)
    p.add_argument("--ioi-prompts", type=int, default=256)
    p.add_argument("--ioi-seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="the run folder (resumed if it holds one)")
    return p.parse_args(argv)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tl_superposition import load_model
    from tl_superposition.activations import pack_text
    from tl_superposition.evaluation.prompts import ioi_prompts
    from tl_superposition.qk import ModelSource, QKTrainConfig, QKTranscoder, evaluate_qk, train_qk
    from tl_superposition.qk.cli import context_mix
    from tl_superposition.qk.ioi_fit import ioi_fit

    mix = context_mix(args)  # checked before the model loads
    heads = [int(h) for h in args.heads.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = commit()
    model = load_model(args.model)
    qkt = QKTranscoder.for_model(
        model, args.layer, d_hidden=args.d_hidden,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    source = ModelSource(
        model, args.source, qkt.shape, context_size=args.context_size, split=args.train_split,
        mix=mix,
    )  # fmt: skip
    cfg = QKTrainConfig(
        max_tokens=args.max_tokens, batch_contexts=args.batch_contexts, seed=args.seed
    )
    t0 = time.perf_counter()
    res = train_qk(qkt, model, source, cfg, args.out, progress=False)
    seconds_train = time.perf_counter() - t0
    qkt = QKTranscoder.load(args.out)
    tokens = pack_text(
        model, args.source, context_size=args.context_size, split=args.eval_split,
        max_contexts=args.eval_contexts,
    )  # fmt: skip
    ev = evaluate_qk(qkt, model, tokens, heads=heads, progress=False)
    row = ev.metrics.loc["transcoder"]
    heldout = ioi_prompts(model, args.ioi_prompts, args.ioi_seed, "heldout")
    fit = ioi_fit(qkt, model, heldout, heads=heads)
    result = {
        "layers": [args.layer],
        "heads": heads,
        "mix": None if mix is None else mix.to_dict(),
        "kl_full": float(row["kl_full"]),
        "l0_q": float(row["l0_q_median"]),
        "l0_k": float(row["l0_k_median"]),
        "dead_frac": max(float(row["dead_q"]), float(row["dead_k"])),
        **fit.summary(),
        "per_head": json.loads(fit.heads.to_json(orient="records") or "[]"),
        "error_frac_by_role": fit.by_role(),
        "steps": res.steps,
        "tokens": res.tokens,
        "seconds_train": round(seconds_train, 1),
        "settings": vars(args),
        "commit": started,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
