"""Benchmark the IOI trace: time against one bare forward pass, peak memory, edges validated.

For ``--model`` (default the real SmolLM2-135M-Instruct; ``gpt2-small-random`` is GPT-2 small's
shape with random weights and the real GPT-2 tokenizer) this runs, each size in its own
subprocess so that each peak RSS (``ru_maxrss``, whole process, model included) is its own:

1. ``--n-prompts`` IOI prompts (default 256): one bare forward pass over the prompts (same
   batches, logits only), then :func:`tl_superposition.tracing.trace_ioi` (firings streamed to
   parquet in a temporary folder), then the same trace again, given the first trace's QK
   decompositions (``qk``, as a notebook tracing several prompt sets or both edge rules of
   one model would pass; ``seconds_again``: the first trace of a process also pays for
   touching its memory for the first time, which on a virtual machine costs seconds), then
   the bare forward again;
   ``forward_seconds`` is the faster of the two bare passes (the first full pass can run
   slower on a machine just woken up, which would flatter the ratio), measured in the same
   process as the traces; ``ratio_to_forward`` is the first trace's. Then
   :func:`~tl_superposition.tracing.validate_edges` on the trace
   (``edges_validated_frac``; ``--max-instances`` records of each of ``--max-edges`` edges
   drawn at random).
2. ``--n-prompts-large`` prompts (default 4096; 0 skips it): the trace only, for
   ``peak_rss_mb_4096`` (the key names the size asked for).

    python benchmarks/bench_trace.py
    python benchmarks/bench_trace.py --n-prompts 64 --n-prompts-large 256 --edge-rule positive

``--seeds dla`` (the default) traces from the three heads with the largest mean direct logit
attribution at every position, as this benchmark's figures have been measured since it was
written; ``--seeds per-prompt`` times ``trace-ioi``'s default trace (ACC++'s seeds, role
positions only; the circuit step after it is timed by ``bench_circuit.py``).

The last line printed is one JSON object: ``seconds``, ``forward_seconds``,
``ratio_to_forward``, ``ratio_to_forward_again``, ``peak_rss_mb``, ``peak_rss_mb_<large>``,
``edges_validated_frac`` and the rest of both runs under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO / "tests" / "data" / "gpt2-tokenizer"


def load(name: str, tokenizer: str):
    from tl_superposition.models import gpt2_small_config, load_model, random_model

    if name == "gpt2-small-random":
        from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer

        tok = GPT2Tokenizer.from_pretrained(tokenizer)
        return random_model(gpt2_small_config(tok.vocab_size), tok, seed=0)
    return load_model(name)


@torch.inference_mode()
def bare_forward(model, tokens: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(tokens), batch_size):
        model(tokens[lo : lo + batch_size])
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(args: argparse.Namespace) -> dict:
    from tl_superposition.ioi import make_ioi_dataset
    from tl_superposition.tracing import QKSVDCache, TraceConfig, trace_ioi, validate_edges

    t0 = time.perf_counter()
    model = load(args.model, args.tokenizer)
    load_s = time.perf_counter() - t0
    dataset = make_ioi_dataset(model, args.child_n, seed=0)
    config = TraceConfig(batch_size=args.batch_size, edge_rule=args.edge_rule)
    out: dict = {"model": args.model, "n_prompts": args.child_n, "edge_rule": args.edge_rule,
                 "seeding": args.seeds}  # fmt: skip
    timed = args.child_n == args.n_prompts
    if timed:
        bare_forward(model, dataset.tokens[: args.batch_size], args.batch_size)  # warm-up
        forward = [bare_forward(model, dataset.tokens, args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        qk = QKSVDCache(model, n_offsets=int(dataset.lengths.max()))  # what trace makes
        res = trace_ioi(model, dataset, seeds=args.seeds, config=config, progress=False,
                        out_dir=tmp, qk=qk)  # fmt: skip
        seconds = time.perf_counter() - t0
        out.update(
            seconds=round(seconds, 2),
            prompts_per_s=round(args.child_n / seconds, 2),
            n_firings=int(res.result.stats["n_firings"]),  # not len(res.firings): reads the table
            n_edges=int(len(res.edges)),
            seeds=res.summary["seeds"],
            peak_rss_mb=peak_rss_mb(),
        )
        if timed:
            with tempfile.TemporaryDirectory() as tmp_again:
                t0 = time.perf_counter()
                trace_ioi(model, dataset, seeds=args.seeds, config=config, progress=False,
                          out_dir=tmp_again, qk=qk)  # fmt: skip
                seconds_again = time.perf_counter() - t0
            forward.append(bare_forward(model, dataset.tokens, args.batch_size))
            fwd = min(forward)  # the faster pass: the stricter ratio
            out.update(
                forward_seconds=round(fwd, 2),
                forward_seconds_each=[round(f, 2) for f in forward],
                ratio_to_forward=round(seconds / fwd, 2),
                seconds_again=round(seconds_again, 2),
                ratio_to_forward_again=round(seconds_again / fwd, 2),
            )
            if args.max_instances > 0:
                t0 = time.perf_counter()
                val = validate_edges(
                    model,
                    res,
                    max_instances=args.max_instances,
                    max_edges=args.max_edges,
                    progress=False,
                )
                out.update(
                    edges_validated_frac=round(val.summary["frac_edges_validated"], 3),
                    n_edges_intervened=val.summary["n_edges_intervened"],
                    validate_seconds=round(time.perf_counter() - t0, 2),
                )
    out.update(load_seconds=round(load_s, 2), threads=torch.get_num_threads())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--n-prompts-large", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--edge-rule", default="paper", choices=["paper", "positive"])
    parser.add_argument(
        "--seeds",
        default="dla",
        help="trace_ioi's seeds: 'dla' (default: the three top heads for every prompt, every "
        "position, as the figures of this benchmark have always been measured) or "
        "'per-prompt' (ACC++'s seeds and role positions, trace-ioi's default)",
    )
    parser.add_argument("--max-instances", type=int, default=4, help="0 skips the validation")
    parser.add_argument("--max-edges", type=int, default=200, help="edges validated (a sample)")
    parser.add_argument(
        "--tokenizer",
        default=str(GPT2_TOKENIZER),
        help="GPT-2 tokenizer folder for gpt2-small-random (default: the copy in tests/data)",
    )
    parser.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "gpt2-small-random" and not Path(args.tokenizer, "vocab.json").exists():
        parser.error(f"--tokenizer {args.tokenizer}: no GPT-2 tokenizer (vocab.json) there")
    if args.n_prompts < 1 or args.n_prompts_large < 0:
        parser.error("--n-prompts must be >= 1 and --n-prompts-large >= 0")
    if args.child_n:
        print(json.dumps(child(args)))
        return
    runs = []
    for n in [args.n_prompts] + ([args.n_prompts_large] if args.n_prompts_large else []):
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child-n", str(n)],
            check=True,
            capture_output=True,
            text=True,
        )
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{n} prompts: {json.dumps(run)}", flush=True)
    main_run = runs[0]
    result = {
        key: main_run.get(key)
        for key in (
            "model",
            "edge_rule",
            "n_prompts",
            "seconds",
            "forward_seconds",
            "ratio_to_forward",
            "ratio_to_forward_again",
            "peak_rss_mb",
            "edges_validated_frac",
        )
    }
    if len(runs) > 1:
        large = runs[1]
        result[f"peak_rss_mb_{large['n_prompts']}"] = large["peak_rss_mb"]
        result["rss_ratio"] = round(large["peak_rss_mb"] / main_run["peak_rss_mb"], 3)
        result[f"seconds_{large['n_prompts']}"] = large["seconds"]
    print(json.dumps({**result, "runs": runs}))


if __name__ == "__main__":
    main()
