"""Benchmark gated-attention training: toy steps/s, real-layer tokens/s, peak memory.

- ``toy``: a gated block for the 4H/5ST toy (8 heads, d_model 12, d_head 1) on batches of
  1000 sequences of 11 tokens, the authors' step; eager and, with ``--compile``, through
  ``torch.compile``.
- ``restarts``: ``--restarts`` such blocks trained together
  (:func:`~tl_superposition.gated.restarts.train_gated_restarts`);
  ``toy_steps_per_s_batched`` counts restart-steps per second (R per step), timed as the
  difference between a run of ``10 + steps`` and one of 10 steps (so the setup and the final
  choice of the block cancel out).
- ``real``: a gated block for SmolLM2-135M-Instruct layer 23 (18 heads of 64, rotary,
  grouped keys) on batches of 8 contexts of 128 tokens, the training pairs precomputed (the
  block's forward, loss, backward and Adam step only), plus the cost of computing the pairs
  (the model's forward up to the layer).

Each part runs in its own subprocess, so each peak RSS (``ru_maxrss``, whole process) is its
own. The reproduction figures (``n_settings_removed`` of the 3 published settings, counting a
setting when every seed removed its superposition; ``n_settings_removed_any_seed``, when at
least one did; ``n_seeds``, the fewest seeds of any setting; ``seeds_per_setting`` and
``seeds_removed_per_setting``, ``n_toy_seeds``, ``restart_removal_rate`` per setting) are
read from the ``summary.json`` files of a ``tl-superposition toy`` output folder (``--runs``;
null when absent), and ``real_best_fve_below_original_coattention`` from a
``tl-superposition train-gated --alphas`` folder (``--sweep``; :mod:`tl_superposition.gated.sweep`).
The last line printed is one JSON object.

    python benchmarks/bench_gated.py --runs runs/toy --sweep runs/real-sweep
    python benchmarks/bench_gated.py --parts toy --steps 50
    python benchmarks/bench_gated.py --parts toy,restarts --steps 30 --restarts 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _toy_source() -> tuple:
    """The 4H/5ST setting, a toy model of it and its training pairs in batches of 1000."""
    from tl_superposition.gated.sources import TensorBatches, layer_activations
    from tl_superposition.toys.models import make_toy_model
    from tl_superposition.toys.settings import SETTINGS

    setting = SETTINGS["4H/5ST"]
    data = setting.dataset(10_000, 0)
    model = make_toy_model(setting.n_heads, data.d_vocab, seed=0)
    x, y = layer_activations(model, data.tokens, 0, "hook_resid_pre")
    return setting, model, TensorBatches(x, y, 1000)


def child_toy(steps: int, compile: bool) -> dict:
    import torch

    from tl_superposition.gated.block import GatedAttentionBlock
    from tl_superposition.gated.train import GatedTrainConfig, train_gated_block

    setting, model, source = _toy_source()
    block = GatedAttentionBlock.from_layer(model, 0, setting.expansion_factor, seed=0)
    cfg = GatedTrainConfig(alpha=setting.alpha, lr=setting.lr, max_steps=10, compile=compile)
    train_gated_block(block, source, cfg, progress=False)  # warm-up (and compilation)
    cfg = GatedTrainConfig(alpha=setting.alpha, lr=setting.lr, max_steps=steps, compile=compile)
    t0 = time.perf_counter()
    train_gated_block(block, source, cfg, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "part": "toy",
        "compile": compile,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_mb(),
    }


def child_restarts(steps: int, restarts: int) -> dict:
    import torch

    from tl_superposition.gated.block import GatedAttentionBlock
    from tl_superposition.gated.restarts import train_gated_restarts
    from tl_superposition.gated.train import GatedTrainConfig

    setting, model, source = _toy_source()

    def timed(n: int) -> float:
        blocks = [GatedAttentionBlock.from_layer(model, 0, setting.expansion_factor, seed=s)
                  for s in range(restarts)]  # fmt: skip
        cfg = GatedTrainConfig(alpha=setting.alpha, lr=setting.lr, max_steps=n)
        t0 = time.perf_counter()
        train_gated_restarts(blocks, source, cfg, progress=False)
        return time.perf_counter() - t0

    timed(10)  # warm-up
    seconds = timed(10 + steps) - timed(10)
    return {
        "part": "restarts",
        "restarts": restarts,
        "steps": steps,
        "restart_steps_per_s": restarts * steps / seconds,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_mb(),
    }


def child_real(steps: int, layer: int) -> dict:
    import torch

    from tl_superposition.gated.block import GatedAttentionBlock
    from tl_superposition.gated.sources import TensorBatches, layer_activations
    from tl_superposition.gated.train import GatedTrainConfig, train_gated_block
    from tl_superposition.models import load_model

    model = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (8 * (steps + 2), 128), generator=g)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    assert isinstance(bos, int), "the model's tokenizer has no BOS token"
    tokens[:, 0] = bos
    t0 = time.perf_counter()
    x, y = layer_activations(model, tokens, layer, "ln1.hook_normalized", batch_size=8)
    pairs_s = time.perf_counter() - t0
    source = TensorBatches(x, y, 8)
    block = GatedAttentionBlock.from_layer(model, layer, 2, "duplicate", seed=0)
    train_gated_block(
        block, source, GatedTrainConfig(alpha=0.1, lr=1e-3, max_steps=2), progress=False
    )
    t0 = time.perf_counter()
    cfg = GatedTrainConfig(alpha=0.1, lr=1e-3, max_steps=2 + steps)
    train_gated_block(block, source, cfg, progress=False)
    seconds = time.perf_counter() - t0
    n_tokens = (steps + 2) * 8 * 128  # the second call restarts at step 0 (no checkpoint)
    return {
        "part": "real",
        "model": "smollm2-135m",
        "layer": layer,
        "block_heads": block.cfg.n_heads,
        "steps": steps + 2,
        "tokens_per_s": n_tokens / seconds,
        "pairs_tokens_per_s": tokens.numel() / pairs_s,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_mb(),
    }


REPRODUCTION_KEYS = (
    "n_settings_removed",
    "n_settings_removed_any_seed",
    "n_toy_seeds",
    "n_seeds",
    "seeds_per_setting",
    "seeds_removed_per_setting",
    "restart_removal_rate",
    "restarts_per_setting",
    "epochs",
)


def reproduction(runs: Path | None) -> dict:
    """The reproduction counts of the toy-run summaries in ``runs``.

    ``n_settings_removed``: published settings where the kept block of every run (every toy
    seed; with ``--restarts``, the lowest-objective restart) passed the solely-encoded check;
    ``n_settings_removed_any_seed``: where at least one did; ``n_toy_seeds``: the fewest
    toy-model seeds run for a setting; ``seeds_removed_per_setting`` and ``seeds_per_setting``:
    passing and run seeds per setting (``n_seeds``: the fewest); ``restart_removal_rate``: per
    setting, the share of all its restarts whose block passed (None without restarts);
    ``restarts_per_setting``: restarts per run. All None when ``runs`` is not a folder.
    """
    if runs is None or not runs.is_dir():
        return dict.fromkeys(REPRODUCTION_KEYS)
    from tl_superposition.toys.gated_runs import load_rows
    from tl_superposition.toys.settings import PUBLISHED

    rows = load_rows(runs)
    by_setting = {s: [r for r in rows if r["setting"] == s and "removed" in r] for s in PUBLISHED}
    per_setting = {s: len(v) for s, v in by_setting.items()}
    removed = {s: sum(bool(r["removed"]) for r in v) for s, v in by_setting.items()}
    toy_seeds = {s: len({r.get("toy_seed", r["seed"]) for r in v}) for s, v in by_setting.items()}
    rates: dict[str, float | None] = {}
    for s, v in by_setting.items():
        flags = [f for r in v for f in r.get("restart_removed", [])]
        rates[s] = sum(flags) / len(flags) if flags else None
    return {
        "n_settings_removed": sum(bool(v) and removed[s] == len(v) for s, v in by_setting.items()),
        "n_settings_removed_any_seed": sum(n > 0 for n in removed.values()),
        "n_toy_seeds": min(toy_seeds.values()),
        "n_seeds": min(per_setting.values()),
        "seeds_per_setting": per_setting,
        "seeds_removed_per_setting": removed,
        "restart_removal_rate": rates,
        "restarts_per_setting": {
            s: sorted({r.get("restarts", 1) for r in v}) for s, v in by_setting.items()
        },  # fmt: skip
        "epochs": sorted({r["gated_epochs"] for v in by_setting.values() for r in v}),
    }


def real_sweep(sweep: Path | None) -> dict:
    """The alpha sweep's answer from a ``train-gated --alphas`` folder: the best fraction of
    variance explained among points whose co-attention is below the original layer's (None
    when no point is, or without a folder), and the points read."""
    if sweep is None or not sweep.is_dir():
        return {"real_best_fve_below_original_coattention": None, "real_sweep_points": None}
    from tl_superposition.gated.sweep import best_fve_below_original, sweep_table

    table = sweep_table(sweep)
    return {
        "real_best_fve_below_original_coattention": best_fve_below_original(table),
        "real_sweep_points": int(table["alpha"].notna().to_numpy().sum()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--parts", default="toy,restarts,real", help="comma-separated: toy, restarts, real"
    )
    p.add_argument("--restarts", type=int, default=8, help="blocks trained together (default 8)")
    p.add_argument("--steps", type=int, default=100, help="timed toy steps (default 100)")
    p.add_argument("--real-steps", type=int, default=8, help="timed real-layer steps (default 8)")
    p.add_argument("--layer", type=int, default=23)
    p.add_argument("--compile", action="store_true", help="also time the compiled toy step")
    p.add_argument("--runs", type=Path, default=None, help="a `tl-superposition toy` output folder")
    p.add_argument(
        "--sweep", type=Path, default=None, help="a `tl-superposition train-gated --alphas` folder"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "toy":
        print(json.dumps(child_toy(args.steps, False)))
        return 0
    if args.child == "toy-compiled":
        print(json.dumps(child_toy(args.steps, True)))
        return 0
    if args.child == "restarts":
        print(json.dumps(child_restarts(args.steps, args.restarts)))
        return 0
    if args.child == "real":
        print(json.dumps(child_real(args.real_steps, args.layer)))
        return 0
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    children = []
    if "toy" in parts:
        children.append("toy")
        if args.compile:
            children.append("toy-compiled")
    if "restarts" in parts:
        children.append("restarts")
    if "real" in parts:
        children.append("real")
    results = []
    for name in children:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--steps",
            str(args.steps),
            "--real-steps",
            str(args.real_steps),
            "--layer",
            str(args.layer),
            "--restarts",
            str(args.restarts),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res))
        results.append(res)
    toy = [r for r in results if r["part"] == "toy"]
    real = [r for r in results if r["part"] == "real"]
    batched = [r for r in results if r["part"] == "restarts"]
    summary = {
        "toy_steps_per_s": max((r["steps_per_s"] for r in toy), default=None),
        "toy_steps_per_s_batched": batched[0]["restart_steps_per_s"] if batched else None,
        "restarts": args.restarts if batched else None,
        "real_tokens_per_s": real[0]["tokens_per_s"] if real else None,
        "peak_rss_mb": max((r["peak_rss_mb"] for r in results), default=None),
        **reproduction(args.runs),
        **real_sweep(args.sweep),
        "runs": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
