"""Benchmark QK-transcoder training against collection of the same layer, and peak memory.

Measures, in one run, on the same text source and layer:

- ``collect_tokens_per_s``: ``tl_superposition.collect`` of ``ln1.hook_normalized``,
  ``attn.hook_q`` and ``attn.hook_k`` of layer L, end to end (tokenising, the forward pass up to
  L with hooks, float32 shards written), ``--collect-tokens`` tokens into a temporary folder;
- ``train_tokens_per_s``: ``train_qk`` on that collection (``StoreSource``: memory-mapped reads,
  the dictionaries' forward and backward passes, the four patterns and KLs, Adam), timed over
  the ``--train-steps`` steps of the loop (the initial data means are not timed).

The two alternate for ``--rounds`` rounds and the best of each is kept (the machine is shared;
the best round is the least disturbed). Target: training at least as fast as collection
(``train_over_collect >= 1``), so that collecting, not training, bounds a run.

- ``peak_rss_mb_train``: peak resident memory (MiB) of a training phase, reset (Linux
  ``/proc/self/clear_refs``) after the model is loaded and the collection is done, so it counts
  the model, the transcoder, Adam and the batches; ``peak_rss_mb_process``: the whole process.
- Evaluation on ``--eval-contexts`` held-out contexts of ``--eval-source``/``--eval-split``
  (``evaluate_qk``): of ``--transcoder`` (e.g. the documented run) when given, else of the
  transcoder just trained (a few steps: its figures only show that the path works).
  ``kl_full``, ``kl_mean_baseline``, ``kl_uniform_baseline`` (nats per query row), ``l0_q``,
  ``l0_k`` (median active features per token), ``dead_frac`` (features of both dictionaries
  firing on no evaluated token), ``loss_delta`` (nats per token).

The last line printed is one JSON object.

    python benchmarks/bench_qk.py --source path/to/wikitext-2 --split valid \\
        --eval-split test --transcoder runs/qk-smollm2-l23
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

HOOKS = "ln1.hook_normalized,attn.hook_q,attn.hook_k"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def collect_once(model, args, out: Path) -> float:
    from tl_superposition.activations import CollectConfig, collect

    config = CollectConfig(
        out_dir=out,
        hooks=HOOKS,
        layers=[args.layer],
        context_size=args.context_size,
        split=args.split,
        max_tokens=args.collect_tokens,
        overwrite=True,
        progress=False,
    )
    t0 = time.perf_counter()
    summary = collect(model, config, args.source)
    return summary.n_tokens / (time.perf_counter() - t0)


def train_once(model, args, acts: Path) -> tuple[float, float, object]:
    from tl_superposition.qk import QKTrainConfig, QKTranscoder, StoreSource, train_qk

    qkt = QKTranscoder.for_model(
        model,
        args.layer,
        d_hidden=args.d_hidden,
        sparsity=args.sparsity,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(0),
    )
    source = StoreSource(acts, qkt.shape)
    cfg = QKTrainConfig(
        max_tokens=args.train_steps * args.batch_contexts * args.context_size,
        batch_contexts=args.batch_contexts,
        lr=2e-3,
        sparsity_coeff=4e-3,
    )
    _reset_peak()
    res = train_qk(qkt, model, source, cfg, None, progress=False)  # timed: the step loop only
    return res.tokens_per_s, res.seconds, qkt


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=23)
    p.add_argument("--source", required=True, help="text file or folder (e.g. wikitext-2)")
    p.add_argument("--split", default="valid")
    p.add_argument("--eval-source", default=None, help="held-out text (default: --source)")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--transcoder", default=None, help="evaluate this trained transcoder")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--collect-tokens", type=int, default=16_384)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--batch-contexts", type=int, default=16)
    p.add_argument("--d-hidden", type=int, default=1200)
    p.add_argument("--sparsity", default="sqrt", choices=["sqrt", "l1", "topk"])
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tl_superposition import load_model
    from tl_superposition.activations import pack_text
    from tl_superposition.qk import QKTranscoder, evaluate_qk

    model = load_model(args.model)
    if args.transcoder:  # benchmark the documented run's architecture
        cfg = QKTranscoder.load(args.transcoder).cfg
        args.d_hidden, args.sparsity, args.top_k = cfg.d_hidden_q, cfg.sparsity, cfg.top_k
    collect_rates, train_rates, peaks = [], [], []
    trained = None
    with tempfile.TemporaryDirectory() as tmp:
        acts = Path(tmp) / "acts"
        for r in range(args.rounds):
            collect_rates.append(collect_once(model, args, acts))
            rate, seconds, trained = train_once(model, args, acts)
            train_rates.append(rate)
            peaks.append(_rss_mb("VmHWM"))
            print(
                f"round {r}: collect {collect_rates[-1]:,.0f} tokens/s, "
                f"train {rate:,.0f} tokens/s ({seconds:.1f} s), peak {peaks[-1]:,.0f} MiB",
                flush=True,
            )
    qkt = QKTranscoder.load(args.transcoder) if args.transcoder else trained
    assert isinstance(qkt, QKTranscoder)
    tokens = pack_text(
        model,
        args.eval_source or args.source,
        context_size=args.context_size,
        split=args.eval_split,
        max_contexts=args.eval_contexts,
    )
    ev = evaluate_qk(qkt, model, tokens, progress=False)
    m = ev.metrics
    n_q, n_k = qkt.cfg.d_hidden_q, qkt.cfg.d_hidden_k
    dead = (m.loc["transcoder", "dead_q"] * n_q + m.loc["transcoder", "dead_k"] * n_k) / (n_q + n_k)
    result = {
        "model": args.model,
        "layer": args.layer,
        "d_hidden": args.d_hidden,
        "sparsity": args.sparsity,
        "threads": args.threads,
        "context_size": args.context_size,
        "batch_contexts": args.batch_contexts,
        "collect_tokens_per_s": round(max(collect_rates), 1),
        "train_tokens_per_s": round(max(train_rates), 1),
        "train_over_collect": round(max(train_rates) / max(collect_rates), 3),
        "peak_rss_mb_train": round(max(peaks), 1),
        "peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "evaluated": args.transcoder or "transcoder trained in this benchmark",
        "eval_tokens": ev.summary["n_tokens"],
        "kl_full": round(float(m.loc["transcoder", "kl_full"]), 4),
        "kl_mean_baseline": round(float(m.loc["mean_qk", "kl_full"]), 4),
        "kl_uniform_baseline": round(float(m.loc["uniform", "kl_full"]), 4),
        "l0_q": float(m.loc["transcoder", "l0_q_median"]),
        "l0_k": float(m.loc["transcoder", "l0_k_median"]),
        "dead_frac": round(float(dead), 4),
        "loss_delta": round(float(m.loc["transcoder", "loss_delta"]), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
