"""The README's trace study: both edge rules traced, validated and checked against patching.

One process, one model load. For each edge rule (``paper``, ``positive``) on the same IOI
prompts: time one bare forward pass and ``trace_ioi`` in this process (ratio), write the trace's
files with the HTML view to ``OUT/<rule>/``, validate the edges by interventions
(``validate_edges``), and compare the circuit with activation patching
(``compare_with_patching``; the patching effects, one forward pass per head, are computed once
on the first ``--patching-prompts`` prompts and shared by both rules). Each step's JSON is
printed as soon as it is done; the last line is one JSON object with everything.

    python scripts/trace_study.py --out runs/trace-study --n-prompts 256 --patching-prompts 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tl_superposition import load_model
from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.tracing import TraceConfig, parse_heads, trace_ioi, validate_edges
from tl_superposition.tracing.ioi_trace import IOITrace
from tl_superposition.tracing.patching import (
    abc_tokens,
    compare_with_patching,
    head_patching_effects,
)
from tl_superposition.tracing.trace import TraceResult


@torch.inference_mode()
def bare_forward(model, tokens: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(tokens), batch_size):
        model(tokens[lo : lo + batch_size])
    return time.perf_counter() - t0


def load_trace(folder: Path, dataset, rule: str) -> IOITrace:
    """An :class:`IOITrace` read back from the files of an earlier run of this script."""
    summary = json.loads((folder / "summary.json").read_text())
    result = TraceResult(
        out_dir=folder,
        seeds=parse_heads(summary["seeds"]) or [],
        config=TraceConfig(edge_rule=rule),
        seconds=summary.get("seconds", 0.0),
    )
    prompts = dataset.to_dataframe()
    return IOITrace(
        dataset=dataset, prompts=prompts, result=result, dla=torch.empty(0), summary=summary
    )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--patching-prompts", type=int, default=16)
    p.add_argument("--max-instances", type=int, default=4, help="0 skips the validation")
    p.add_argument("--min-edge-firings", type=int, default=1, help="circuit: edges this frequent")
    p.add_argument("--n-random", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--rules", default="paper,positive")
    p.add_argument("--max-edges", type=int, default=None, help="validate a sample of edges")
    p.add_argument(
        "--reuse", action="store_true", help="read traces already written to OUT/<rule>/"
    )
    args = p.parse_args()
    out = Path(args.out)
    model = load_model(args.model)
    dataset = make_ioi_dataset(model, args.n_prompts, seed=0)
    report: dict = {"model": args.model, "n_prompts": args.n_prompts}
    report["threads"] = torch.get_num_threads()
    traces = {}
    for rule in args.rules.split(","):
        if args.reuse and (out / rule / "summary.json").exists():
            traces[rule] = load_trace(out / rule, dataset, rule)
            prior = json.loads((out / rule / "study.json").read_text())
            report[rule] = prior
            print(json.dumps({rule: prior}), flush=True)
            continue
        bare_forward(model, dataset.tokens[:32], 32)
        fwd = bare_forward(model, dataset.tokens, 32)
        t0 = time.perf_counter()
        res = trace_ioi(
            model, dataset, seeds="dla", config=TraceConfig(edge_rule=rule), progress=False
        )
        seconds = time.perf_counter() - t0
        traces[rule] = res
        report[rule] = {
            "trace_seconds": round(seconds, 1),
            "forward_seconds": round(fwd, 1),
            "ratio_to_forward": round(seconds / fwd, 2),
            "n_firings": int(len(res.firings)),
            "n_traced_firings": int(res.firings.traced.sum()),
            "n_edges": int(len(res.edges)),
            "seeds": res.summary["seeds"],
        }
        res.save(out / rule)
        (out / rule / "study.json").write_text(json.dumps(report[rule]))
        print(json.dumps({rule: report[rule]}), flush=True)
    for rule, res in traces.items():
        if args.max_instances < 1:
            break
        t0 = time.perf_counter()
        val = validate_edges(
            model,
            res,
            max_instances=args.max_instances,
            max_edges=args.max_edges,
            progress=False,
        )
        res.save(out / rule, validation=val)
        report[rule]["validation"] = {**val.summary, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({rule: report[rule]["validation"]}), flush=True)
    small = dataset[: args.patching_prompts]
    t0 = time.perf_counter()
    effects, m_clean, m_corrupt = head_patching_effects(model, small, abc_tokens(model, small))
    report["patching_seconds"] = round(time.perf_counter() - t0, 1)
    torch.save(effects, out / "patching_effects.pt")
    report["logit_diff_clean"], report["logit_diff_corrupt"] = m_clean, m_corrupt
    for rule, res in traces.items():
        cmp = compare_with_patching(
            model,
            res,
            n_prompts=args.patching_prompts,
            threshold=args.threshold,
            n_random=args.n_random,
            effects=effects,
            min_edge_firings=args.min_edge_firings,
        )
        cmp.save(out / rule)
        report[rule]["patching"] = cmp.summary
        print(json.dumps({rule: cmp.summary}), flush=True)
    (out / "study.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
