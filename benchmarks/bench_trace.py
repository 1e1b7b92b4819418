"""Benchmark the IOI trace: prompts/s, firings/s and peak memory.

Runs :func:`tl_superposition.tracing.trace_ioi` (logit attribution pass, decomposition of every
firing, tracing from DLA seeds; no file output) on ``--n-prompts`` IOI prompts for

- ``gpt2-small-random``: GPT-2 small's shape (12 layers, 12 heads, d_model 768) with random
  weights and the real GPT-2 tokenizer (pretrained GPT-2 cannot be downloaded here), and
- ``smollm2-135m``: the real SmolLM2-135M-Instruct (RoPE, GQA).

Each model runs in its own subprocess so that each peak RSS (``ru_maxrss``, whole process,
model included) is its own. Model loading is timed apart from the trace. The last line
printed is one JSON object with the SmolLM2 figures at top level and every run under ``runs``.

    python benchmarks/bench_trace.py                       # both models, 256 prompts
    python benchmarks/bench_trace.py --models smollm2-135m --n-prompts 64

The GPT-2 tokenizer comes from ``tests/data/gpt2-tokenizer`` (``--tokenizer PATH`` for another).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO / "tests" / "data" / "gpt2-tokenizer"


def load(name: str, tokenizer: str):
    from tl_superposition.models import gpt2_small_config, load_model, random_model

    if name == "gpt2-small-random":
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(tokenizer)
        return random_model(gpt2_small_config(tok.vocab_size), tok, seed=0)
    return load_model(name)


def child(name: str, n_prompts: int, batch_size: int, tokenizer: str) -> dict:
    from tl_superposition.ioi import make_ioi_dataset
    from tl_superposition.tracing import TraceConfig, trace_ioi

    t0 = time.perf_counter()
    model = load(name, tokenizer)
    load_s = time.perf_counter() - t0
    dataset = make_ioi_dataset(model, n_prompts, seed=0)
    t0 = time.perf_counter()
    res = trace_ioi(model, dataset, config=TraceConfig(batch_size=batch_size), progress=False)
    seconds = time.perf_counter() - t0
    n_firings = int(len(res.firings))
    return {
        "model": name,
        "n_prompts": n_prompts,
        "seconds": round(seconds, 2),
        "prompts_per_s": round(n_prompts / seconds, 2),
        "firings_per_s": round(n_firings / seconds, 1),
        "n_firings": n_firings,
        "n_traced_firings": int(res.firings.traced.sum()),
        "n_edges": int(len(res.edges)),
        "median_n_components": float(res.firings.n_components.median()) if n_firings else None,
        "mean_logit_diff": round(float(res.prompts.logit_diff.mean()), 3),
        "load_seconds": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2-small-random,smollm2-135m")
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--tokenizer",
        default=str(GPT2_TOKENIZER),
        help="GPT-2 tokenizer folder for gpt2-small-random (default: the copy in tests/data)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    wanted = [args.child] if args.child else args.models.split(",")
    if "gpt2-small-random" in wanted and not Path(args.tokenizer, "vocab.json").exists():
        parser.error(f"--tokenizer {args.tokenizer}: no GPT-2 tokenizer (vocab.json) there")
    if args.child:
        print(json.dumps(child(args.child, args.n_prompts, args.batch_size, args.tokenizer)))
        return
    runs = []
    for name in args.models.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--n-prompts",
                str(args.n_prompts),
                "--batch-size",
                str(args.batch_size),
                "--tokenizer",
                args.tokenizer,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"{name}: {run['n_prompts']} prompts in {run['seconds']} s "
            f"({run['prompts_per_s']} prompts/s, {run['firings_per_s']} firings/s, "
            f"{run['n_firings']} firings), peak RSS {run['peak_rss_mb']} MB, "
            f"load {run['load_seconds']} s",
            flush=True,
        )
    main_run = next((r for r in runs if r["model"] == "smollm2-135m"), runs[-1])
    print(json.dumps({**main_run, "runs": runs}))


if __name__ == "__main__":
    main()
