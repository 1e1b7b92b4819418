"""Benchmark activation collection against the bare forward pass, and its peak memory.

Measures, in one run on the same contexts of ``--source`` (default ``auto``: WikiText-2 from
the Hugging Face hub where it can be reached, else the built-in ``pydoc`` corpus; the JSON
records which):

- ``forward_tokens_per_s``: ``model(tokens, stop_at_layer=L+1)`` under ``torch.inference_mode``
  on the contexts of a first (warm-up) collection, read back from its shards;
- ``collect_tokens_per_s``: ``tl_superposition.collect`` of ``ln1.hook_normalized``,
  ``attn.hook_q`` and ``attn.hook_k`` of layer L, end to end (reading and tokenising the text,
  the forward pass with hooks, writing float32 safetensors shards, manifest updates).
  The two alternate for ``--rounds`` rounds and the best of each is kept (robust to other load);
- ``peak_rss_mb_small`` / ``peak_rss_mb_large``: peak resident memory (MiB) of the collection
  for two ``--max-tokens`` sizes, each in its own subprocess; the peak is reset (Linux
  ``/proc/self/clear_refs``) after the model is loaded, so it covers the collection itself
  (model weights included, their one-off conversion excluded). ``*_process`` keys give the
  whole process's peak.

The last line printed is one JSON object.

    python benchmarks/bench_collect.py --source path/to/wikitext-2 --split valid  # SmolLM2 L15
    python benchmarks/bench_collect.py --model gpt2-tiny-random --layer 1   # quick check
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
HOOKS = ["ln1.hook_normalized", "attn.hook_q", "attn.hook_k"]


def load(name: str):
    """The model to benchmark; ``gpt2-tiny-random`` is a small random GPT-2 for quick checks."""
    if name == "gpt2-tiny-random":
        from transformer_lens import HookedTransformerConfig
        from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer

        from tl_superposition.models import random_model

        tok = GPT2Tokenizer.from_pretrained(str(REPO / "tests" / "data" / "gpt2-tokenizer"))
        cfg = HookedTransformerConfig(
            n_layers=4,
            d_model=256,
            n_ctx=512,
            d_head=32,
            n_heads=8,
            d_mlp=1024,
            d_vocab=tok.vocab_size,
            act_fn="gelu_new",
            normalization_type="LN",
            default_prepend_bos=True,
        )
        return random_model(cfg, tok, seed=0)
    from tl_superposition import load_model

    return load_model(name)


def _vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _collect(model, args, max_tokens: int, out: Path):
    from tl_superposition import CollectConfig, collect

    config = CollectConfig(
        out_dir=out,
        hooks=HOOKS,
        layers=args.layer,
        split=args.split,
        context_size=args.context_size,
        batch_size=args.batch_size,
        max_tokens=max_tokens,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
        progress=False,
    )
    return collect(model, config, args.source)


def child(args) -> None:
    """Subprocess: load, reset the peak, collect ``--max-tokens``, print the peaks as JSON."""
    model = load(args.model)
    after_load = _vm("VmRSS")
    reset = _reset_peak()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        s = _collect(model, args, args.max_tokens, Path(tmp) / "acts")
        peak = _vm("VmHWM")
    print(
        json.dumps(
            {
                "max_tokens": args.max_tokens,
                "tokens": s.n_tokens,
                "rss_after_load_mb": after_load,
                "peak_rss_mb": peak if reset else float("nan"),
                "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tokens_per_s": s.tokens_per_s,
                "shard_mb": s.bytes / 2**20 / max(s.n_shards, 1),
            }
        )
    )


def forward_rate(model, contexts: torch.Tensor, batch_size: int, stop: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, contexts.shape[0], batch_size):
            model(contexts[lo : lo + batch_size], stop_at_layer=stop)
    return contexts.numel() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument(
        "--source",
        default="auto",
        help="text source for collect (default auto: WikiText-2 from the hub if reachable, "
        "else the built-in pydoc corpus); e.g. path/to/wikitext-2",
    )
    p.add_argument("--split", default=None, help="split, e.g. valid for path/to/wikitext-2")
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-tokens", type=int, default=32768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens for the throughput runs")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (best kept)")
    p.add_argument("--sizes", default="50000,200000", help="two --max-tokens sizes for peak RSS")
    p.add_argument("--tmp", default=None, help="folder for the temporary collections")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from tl_superposition import ActivationStore
    from tl_superposition.activations.sources import source_label

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    t0 = time.perf_counter()
    model = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n_ctx = args.tokens // args.context_size
    stop = args.layer + 1
    # A warm-up collection; its contexts (read back) are what the bare forward runs on.
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        warm = _collect(model, args, n_ctx * args.context_size, Path(tmp) / "acts")
        store = ActivationStore(Path(tmp) / "acts")
        contexts = store.get_contexts(range(warm.n_contexts), hooks=[])["tokens"]
    print(f"source: {source_label(warm.source)}, {warm.n_tokens:,} tokens", file=sys.stderr)

    forward_rate(model, contexts[: args.batch_size * 2], args.batch_size, stop)  # warm-up
    # Alternate the two measurements and keep the best of each, so that a burst of other
    # load on the machine does not bias the ratio.
    fwd_rates, col_rates = [], []
    for _ in range(args.rounds):
        fwd_rates.append(forward_rate(model, contexts, args.batch_size, stop))
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            s = _collect(model, args, n_ctx * args.context_size, Path(tmp) / "acts")
        col_rates.append(s.tokens_per_s)
    forward, collected = max(fwd_rates), max(col_rates)
    print(
        f"bare forward: {[round(r) for r in fwd_rates]} tok/s; collect: "
        f"{[round(r) for r in col_rates]} tok/s ({s.n_tokens:,} tokens, "
        f"{s.bytes / 2**20:,.0f} MiB per run)",
        file=sys.stderr,
    )
    del model

    small, large = (int(x) for x in args.sizes.split(","))
    peaks = {}
    for label, size in (("small", small), ("large", large)):
        cmd = [sys.executable, __file__, "--child", "--max-tokens", str(size)]
        for key in (
            "model",
            "layer",
            "source",
            "split",
            "context_size",
            "batch_size",
            "shard_tokens",
            "dtype",
            "tmp",
        ):
            val = getattr(args, key)
            if val is not None:
                cmd += [f"--{key.replace('_', '-')}", str(val)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"child run for {size} tokens failed")
        peaks[label] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{label}: {peaks[label]}", file=sys.stderr)

    print(
        json.dumps(
            {
                "model": args.model,
                "source": source_label(warm.source),
                "layer": args.layer,
                "hooks": HOOKS,
                "context_size": args.context_size,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "tokens": s.n_tokens,
                "collect_tokens_per_s": round(collected, 1),
                "forward_tokens_per_s": round(forward, 1),
                "ratio": round(collected / forward, 4),
                "rounds": args.rounds,
                "max_tokens_small": small,
                "max_tokens_large": large,
                "peak_rss_mb_small": round(peaks["small"]["peak_rss_mb"], 1),
                "peak_rss_mb_large": round(peaks["large"]["peak_rss_mb"], 1),
                "rss_after_load_mb": round(peaks["small"]["rss_after_load_mb"], 1),
                "process_peak_rss_mb_small": round(peaks["small"]["process_peak_rss_mb"], 1),
                "process_peak_rss_mb_large": round(peaks["large"]["process_peak_rss_mb"], 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
