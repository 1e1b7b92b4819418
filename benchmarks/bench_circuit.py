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
(held-out), ``f1_vs_patching`` (denoising), ``f1_vs_patching_noising``, ``cpr`` and ``cmd``
(method -> value), ``seconds`` (method -> seconds on the discovery prompts), and the rest
(F1 table, reference heads, curves, settings). With ``--out`` the curves, the F1 table, the
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
    from tl_superposition.evaluation import (
        Faithfulness,
        Ranking,
        abc_tokens,
        eap_ig_scores,
        eap_scores,
        f1_table,
        head_patching_effects,
        important_heads,
        ioi_split,
        score_rankings,
    )
    from tl_superposition.evaluation.compare import timed
    from tl_superposition.models import load_model
    from tl_superposition.tracing import TraceConfig, trace_ioi

    t_start = time.perf_counter()
    model = load_model(args.model)
    cfg = model.cfg
    discovery, heldout = ioi_split(model, args.n_discovery, args.n_heldout, args.seed,
                                   args.heldout_seed)  # fmt: skip
    cf_discovery = abc_tokens(model, discovery, seed=args.seed)
    cf_heldout = abc_tokens(model, heldout, seed=args.heldout_seed)
    rankings: list[Ranking] = []

    def svd() -> tuple:
        trace = trace_ioi(model, discovery, config=TraceConfig(dynamic_thresh=args.dynamic_thresh),
                          progress=False)  # fmt: skip
        circuit = extract_circuit(
            model, trace, CircuitConfig(min_prompts=args.min_prompts,
                                        threshold=args.circuit_threshold), progress=False
        )  # fmt: skip
        return trace, circuit

    (trace, circuit), s = timed(svd)
    order = circuit.ranking()
    rankings.append(Ranking("svd_trace", order, order, s, circuit=circuit.head_set()))
    print(f"svd_trace: {len(circuit.head_set())} heads, {s:.0f} s", flush=True)

    small = discovery[: args.patching_prompts]
    patching = {}
    for direction in ("noising", "denoising"):
        (effects, m_clean, m_cf), s = timed(
            lambda d=direction: head_patching_effects(model, small, cf_discovery[: len(small)], d)
        )
        patching[direction] = {"effects": effects, "seconds": s, "m_clean": m_clean, "m_cf": m_cf}
        name = "activation_patching" + ("" if direction == "noising" else "_denoising")
        rankings.append(Ranking.from_scores(name, effects, s))
        print(f"{name}: {s:.0f} s", flush=True)
    scores, s = timed(lambda: eap_scores(model, discovery, cf_discovery))
    rankings.append(Ranking.from_scores("eap", scores, s))
    scores, s = timed(lambda: eap_ig_scores(model, discovery, cf_discovery, args.ig_steps))
    rankings.append(Ranking.from_scores("eap_ig", scores, s))
    print(f"eap, eap_ig: done, {s:.0f} s for eap_ig", flush=True)
    rankings.append(Ranking.random(cfg.n_layers, cfg.n_heads, args.random_draws, args.seed))

    faith, s_prep = timed(lambda: Faithfulness.prepare(model, heldout, cf_heldout))
    (curves, mib), s_curves = timed(lambda: score_rankings(faith, rankings))
    references = {d: important_heads(patching[d]["effects"], args.threshold)
                  for d in ("denoising", "noising")}  # fmt: skip
    n_circuit = len(circuit.head_set())
    f1 = f1_table(rankings, n_circuit, references)
    svd_f1 = f1[f1.method == "svd_trace"].set_index("reference")
    result = {
        "model": cfg.model_name,
        "n_heads_circuit": n_circuit,
        "faithfulness_circuit": faith.score(circuit.head_set()),
        "f1_vs_patching": float(svd_f1.loc["denoising", "f1"]),
        "f1_vs_patching_noising": float(svd_f1.loc["noising", "f1"]),
        "cpr": mib["cpr"],
        "cmd": mib["cmd"],
        "seconds": {r.name: round(r.seconds, 1) for r in rankings if r.name != "random"},
        "faithfulness_references": {d: faith.score(h) for d, h in references.items()},
        "reference_heads": {d: sorted(f"{L}.{h}" for L, h in v) for d, v in references.items()},
        "circuit_heads": sorted(f"{L}.{h}" for L, h in circuit.head_set()),
        "f1_table": f1.to_dict(orient="records"),
        "m_full_heldout": faith.m_full,
        "m_empty_heldout": faith.m_empty,
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
        "curves": curves.to_dict(orient="records"),
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "seconds_scoring": round(s_prep + s_curves, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "commit": commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if args.out is not None:
        from tl_superposition.evaluation.plots import plot_curves

        args.out.mkdir(parents=True, exist_ok=True)
        curves.to_csv(args.out / "curves.csv", index=False)
        f1.to_csv(args.out / "f1.csv", index=False)
        circuit.save(args.out / "circuit")
        plot_curves(
            curves,
            args.out / "faithfulness.png",
            title=f"Faithfulness on {len(heldout)} held-out IOI prompts, {cfg.model_name}",
        )
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
