"""Benchmark data-parallel runs: 1 against N processes (``torchrun``) on the same work.

Runs, each under ``torchrun --standalone --nproc-per-node P`` for P = 1 and P = ``--nproc``:

- ``collect`` of ``ln1.hook_normalized``, ``attn.hook_q`` and ``attn.hook_k`` of ``--layers``
  over the first ``--max-tokens`` tokens of ``--source``; ``collect_tokens_per_s_P`` is the
  command's own figure (tokens over the collection loop's wall time, model loading excluded);
  ``identical_collection``: every file of the P-process collection equals the 1-process one,
  byte for byte;
- ``train-qk`` of those layers from the 1-process collection (``--acts``), the same global
  batch on every P; ``train_tokens_per_s_P`` is the command's figure for the first layer
  (training tokens over the training loop's wall time); ``max_weight_diff`` /
  ``mean_weight_diff``: the largest and mean absolute difference between the 1- and
  P-process dictionaries' weights (``max_abs_weight`` for scale).

``wall_s_*`` give each command's whole wall time (process start and model loading included).
On a machine with several GPUs pass ``--device cuda`` (one process per GPU, NCCL); on CPUs the
processes use gloo and share the cores (``OMP_NUM_THREADS`` = cores / P each), so the figures
show the engine's overhead rather than a speed-up. The last line printed is one JSON object.

    python benchmarks/bench_distributed.py --model smollm2-135m --source path/to/wikitext-2 \\
        --split valid --layers 15 --max-tokens 16384
    python benchmarks/bench_distributed.py --model path/to/tiny-hf-model --source \\
        tests/data/shakespeare --split valid --layers 0,1 --context-size 32   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def torchrun(nproc: int, args: list[str], threads: int) -> tuple[str, float]:
    """Run a ``tl-superposition`` command on ``nproc`` processes; its stdout and wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "tl_superposition", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} on {nproc} processes failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t0


def per_s(text: str, pattern: str) -> float:
    """The first ``N tok/s``-style figure after ``pattern`` in a command's output."""
    m = re.search(pattern + r"[^(]*\(([\d,.]+) tok", text)
    if m is None:
        sys.exit(f"no throughput in the output:\n{text[-2000:]}")
    return float(m.group(1).replace(",", ""))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def weight_diffs(a: Path, b: Path, layers: list[int]) -> dict[str, float]:
    """Largest and mean absolute difference between two runs' weights, and the largest
    absolute weight (for scale)."""
    import torch

    from tl_superposition.qk import QKTranscoder

    diffs, weights = [], []
    for layer in layers:
        sub = f"layer_{layer}" if (a / f"layer_{layer}").is_dir() else "."
        sa = QKTranscoder.load(a / sub).state_dict()
        sb = QKTranscoder.load(b / sub).state_dict()
        diffs += [(sa[k] - sb[k]).abs().flatten() for k in sa]
        weights += [sa[k].abs().flatten() for k in sa]
    d = torch.cat(diffs)
    return {"max_weight_diff": float(d.max()), "mean_weight_diff": float(d.mean()),
            "max_abs_weight": float(torch.cat(weights).max())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description="1 against N processes of collect and train-qk")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", required=True, help="text file or folder")
    p.add_argument("--split", default=None)
    p.add_argument("--layers", default="15", help="comma-separated layers")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=16_384, help="collected tokens")
    p.add_argument("--train-tokens", type=int, default=None, help="default: --max-tokens")
    p.add_argument("--d-hidden", type=int, default=1200)
    p.add_argument("--batch-contexts", type=int, default=8, help="global batch (contexts)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, a GPU each)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    if args.batch_contexts % args.nproc:
        sys.exit(f"--batch-contexts {args.batch_contexts} must be a multiple of --nproc")
    layers = [int(x) for x in args.layers.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-distributed-"))
    cores = os.cpu_count() or 1
    split = ["--split", args.split] if args.split else []
    common = ["--model", args.model, "--context-size", str(args.context_size), "--device",
              args.device, "--no-progress", "--overwrite"]  # fmt: skip
    out: dict[str, object] = {"model": args.model, "layers": layers, "nproc": args.nproc,
                              "device": args.device, "cores": cores}  # fmt: skip
    for n in (1, args.nproc):
        threads = max(1, cores // n) if args.device == "cpu" else 1
        collect = ["collect", *common, "--source", args.source, *split, "--layers", args.layers,
                   "--max-tokens", str(args.max_tokens),
                   "--out", str(work / f"acts{n}")]  # fmt: skip
        text, wall = torchrun(n, collect, threads)
        out[f"collect_tokens_per_s_{n}"] = per_s(text, "collected")
        out[f"wall_s_collect_{n}"] = round(wall, 1)
        train = ["train-qk", *common, "--acts", str(work / "acts1"), "--layers", args.layers,
                 "--d-hidden", str(args.d_hidden), "--batch-contexts", str(args.batch_contexts),
                 "--max-tokens", str(args.train_tokens or args.max_tokens),
                 "--out", str(work / f"qk{n}")]  # fmt: skip
        text, wall = torchrun(n, train, threads)
        m = re.search(r"\(([\d,.]+) tokens/s in this run", text)
        if m is None:
            sys.exit(f"no training throughput in the output:\n{text[-2000:]}")
        out[f"train_tokens_per_s_{n}"] = float(m.group(1).replace(",", ""))
        out[f"wall_s_train_{n}"] = round(wall, 1)
    n = args.nproc
    out["identical_collection"] = same_files(work / "acts1", work / f"acts{n}")
    out |= weight_diffs(work / "qk1", work / f"qk{n}", layers)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
