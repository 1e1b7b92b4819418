"""Benchmark the SVD-sparse circuit against today's methods, MIB-style, in one run.

On ``--model`` (default the real SmolLM2-135M-Instruct, offline), with discovery prompts and
held-out prompts of another seed and other names (:func:`tl_superposition.evaluation.ioi_split`)
and their ABC counterfactuals, each method ranks every head on the discovery prompts:

- ``svd_trace``: :func:`~tl_superposition.tracing.trace_ioi` (per-prompt seeds, ACC++ roles)
  then :func:`~tl_superposition.circuit.extract_circuit`; its pruned circuit first
  (``circuit_heads.csv``'s ranking);
- ``activation_patching``: exact activation patching per head by noising (TransformerLens's
  ``get_act_patch_attn_head_out_all_pos``) on the first ``--patching-prompts`` discovery
  prompts; ``activation_patching_denoising`` the same by denoising;
- ``eap`` and ``eap_ig`` (``--ig-steps`` points, MIB's inputs form) on every discovery prompt;
- ``random``: the mean of ``--random-draws`` random orders.

Every ranking is then scored on the same held-out prompts: faithfulness at MIB's sizes with
every head outside the circuit patched from the counterfactual, CPR and CMD
(:mod:`tl_superposition.evaluation`). Precision, recall and F1 of each method's circuit (the
SVD circuit, the other methods' top heads of its size) are taken against the heads exact
activation patching finds important (``|effect| >= 0.05``) on the patching prompts, by
denoising and by noising.

    python benchmarks/bench_circuit.py                       # the defaults: 256 + 256 prompts
    python benchmarks/bench_circuit.py --n-discovery 32 --n-heldout 32 --patching-prompts 8

The last line printed is one JSON object: ``n_heads_circuit``, ``faithfulness_circuit``
(held-out; ``faithfulness_circuit_discovery`` on the discovery prompts), ``f1_vs_patching``
(denoising), ``f1_vs_patching_noising``, ``cpr`` and ``cmd`` (method -> value), ``seconds``
(method -> seconds on the discovery prompts), and the rest (F1 table, reference heads,
curves, settings). With ``--out`` the curves, the F1 table, the
circuit's files and a plot of the curves are written there too.
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
GPT2_TOKENIZER = REPO / "tests" / "data" / "gpt2-tokenizer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-discovery", type=int, default=256)
    p.add_argument("--n-heldout", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="discovery prompts' seed")
    p.add_argument("--heldout-seed", type=int, default=1)
    p.add_argument("--patching-prompts", type=int, default=64)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--random-draws", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.05, help="importance by patching")
    p.add_argument("--dynamic-thresh", type=float, default=None, help="trace firing rule")
    p.add_argument("--circuit-threshold", type=float, default=0.1)
    p.add_argument("--min-prompts", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="folder for curves, tables, plots")
    args = p.parse_args(argv)
    for name in ("n_discovery", "n_heldout", "patching_prompts", "ig_steps", "random_draws"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.patching_prompts > args.n_discovery:
        p.error("--patching-prompts cannot exceed --n-discovery")
    return args


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tl_superposition.circuit import CircuitConfig, extract_circuit
    from tl_superposition.evaluation import compare_methods, ioi_split
    from tl_superposition.evaluation.compare import timed
    from tl_superposition.models import load_model
    from tl_superposition.tracing import TraceConfig, trace_ioi

    t_start, at_commit = time.perf_counter(), commit()  # the code that runs, not the last
    model = load_model(args.model)
    discovery, heldout = ioi_split(model, args.n_discovery, args.n_heldout, args.seed,
                                   args.heldout_seed)  # fmt: skip
    trace_cfg = TraceConfig(dynamic_thresh=args.dynamic_thresh)
    circuit_cfg = CircuitConfig(min_prompts=args.min_prompts, threshold=args.circuit_threshold)

    def svd():
        trace = trace_ioi(model, discovery, config=trace_cfg, progress=False)
        return trace, extract_circuit(model, trace, circuit_cfg, progress=False)

    (trace, circuit), s_svd = timed(svd)
    print(f"svd_trace: {len(circuit.head_set())} heads, {s_svd:.0f} s", flush=True)
    cmp, s_cmp = timed(
        lambda: compare_methods(
            model, discovery, heldout, circuit, s_svd, args.patching_prompts, args.ig_steps,
            args.random_draws, args.threshold, args.seed,
        )
    )  # fmt: skip
    svd_f1 = cmp.f1[cmp.f1.method == "svd_trace"].set_index("reference")
    result = {
        "model": model.cfg.model_name,
        "n_heads_circuit": len(circuit.head_set()),
        "faithfulness_circuit": cmp.circuit_faithfulness,
        "faithfulness_circuit_discovery": cmp.discovery_faithfulness,
        "f1_vs_patching": float(svd_f1.loc["denoising", "f1"]),
        "f1_vs_patching_noising": float(svd_f1.loc["noising", "f1"]),
        "cpr": cmp.cpr,
        "cmd": cmp.cmd,
        "seconds": {r.name: round(r.seconds, 1) for r in cmp.rankings if r.name != "random"},
        "faithfulness_references": cmp.reference_faithfulness,
        "reference_heads": {
            d: sorted(f"{L}.{h}" for L, h in v) for d, v in cmp.references.items()
        },  # fmt: skip
        "circuit_heads": sorted(f"{L}.{h}" for L, h in circuit.head_set()),
        "f1_table": cmp.f1.to_dict(orient="records"),
        "m_full_heldout": cmp.m_full,
        "m_empty_heldout": cmp.m_empty,
        "circuit_summary": circuit.summary(),
        "trace_summary": {
            k: trace.summary.get(k)
            for k in (
                "n_firings",
                "n_traced_firings",
                "n_edges",
                "n_correct",
                "n_seeded_prompts",
                "seconds",
            )
        },  # fmt: skip
        "curves": cmp.curves.to_dict(orient="records"),
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "seconds_comparison": round(s_cmp, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "commit": at_commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if args.out is not None:
        from tl_superposition.evaluation.plots import plot_curves

        args.out.mkdir(parents=True, exist_ok=True)
        cmp.curves.to_csv(args.out / "curves.csv", index=False)
        cmp.table().to_csv(args.out / "methods.csv", index=False)
        cmp.f1.to_csv(args.out / "f1.csv", index=False)
        circuit.save(args.out / "circuit")
        plot_curves(cmp.curves, args.out / "faithfulness.png",
                    title=f"Faithfulness on {len(heldout)} held-out IOI prompts, "
                    f"{model.cfg.model_name}")  # fmt: skip
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
