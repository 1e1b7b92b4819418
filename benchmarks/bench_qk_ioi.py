"""Benchmark the QK transcoders of one or several layers on held-out text and on held-out IOI
prompts.

Trains (or resumes, in ``--out``) the QK transcoders of ``--layers`` together on text
streamed through the model (one forward pass per step for every layer:
:func:`~tl_superposition.qk.train_qk_layers`), packed as the collector packs it or cut in a
context mix (``--bos-frac``, ``--random-offset``, ``--short-frac``, ``--short-size``:
:class:`ContextMix`), then measures each layer

- on held-out text (``--eval-split``, ``--eval-contexts`` contexts of ``--context-size``):
  :func:`~tl_superposition.qk.evaluate_qk`'s KL of the reconstructed pattern (nats per query
  row), median L0 and dead features (no spliced losses: ``eval-qk`` measures those);
- on held-out IOI prompts (``--ioi-prompts`` of seed ``--ioi-seed``, the held-out half of the
  names, as the circuit benchmark's held-out prompts): for the heads of interest, the error
  share of END firings and the spliced attention on END -> IO and END -> S2 against the true
  one (:func:`~tl_superposition.qk.ioi_fit.ioi_fit`).

``--layers circuit:<trace folder>`` takes every layer that holds a head of the pruned circuit
(``trace-ioi``'s ``circuit.json``) and, as heads of interest, the circuit's heads; otherwise
``--layers 23`` with ``--heads 23.0,23.3`` (default: every head of the layers).

    python benchmarks/bench_qk_ioi.py --source path/to/wikitext-2 --layers 23 \
        --heads 23.0,23.3 --out runs/qk-l23-packed
    python benchmarks/bench_qk_ioi.py --source path/to/wikitext-2 \
        --layers circuit:runs/ioi-smollm2 --bos-frac 0.5 --random-offset --short-frac 0.25 \
        --max-tokens 1024000 --out runs/qk-circuit-mix

The last line printed is one JSON object: ``layers``, ``heads``, ``mix``, and over all layers
``error_frac_ioi``, ``attn_end_io_true``, ``attn_end_io_spliced``, ``attn_end_s2_true``,
``attn_end_s2_spliced``, ``kl_full`` (the largest of the layers'), ``l0_q``, ``l0_k`` (the
largest medians), ``dead_frac`` (the largest); ``error_frac_text`` (the error share of the
same heads' firings on the held-out text, mean over layers: whether IOI prompts in particular
are missed); ``edge_agreement`` (with ``circuit:``: per rule
the two shares of :func:`~tl_superposition.qk.edge_agreement` and the most frequent
disagreements); ``per_layer`` with each layer's figures, ``per_head`` and the run's settings
and seconds. With ``circuit:`` the agreement tables are written to
``--out`` (``EdgeAgreement.save``: ``edge_agreement_*.csv`` and ``edge_agreement.json``), and every
head's IOI figures to ``--out/ioi_heads.csv``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", required=True, help="training and held-out text (a folder)")
    p.add_argument("--train-split", default="valid")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--layers", default="23", help="'16,23' or 'circuit:<trace folder>'")
    p.add_argument("--heads", default=None, help="heads of interest as L.H, e.g. 23.0,23.3")
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
    p.add_argument(
        "--agreement-firings",
        type=int,
        default=8,
        help="with --layers circuit:<folder>: firings per circuit node for edge_agreement",
    )
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


def heads_of_interest(args: argparse.Namespace, layers: list[int]) -> dict[int, list[int] | None]:
    """``{layer: heads}`` (``None``: every head) from ``--heads`` or the circuit."""
    if args.heads:
        pairs = [tuple(int(x) for x in h.split(".")) for h in args.heads.split(",")]
        return {L: sorted(h for layer, h in pairs if layer == L) for L in layers}
    if args.layers.startswith("circuit:"):
        from tl_superposition.circuit import Circuit

        heads = Circuit.load(args.layers.removeprefix("circuit:")).head_set()
        return {L: sorted(h for layer, h in heads if layer == L) for L in layers}
    return dict.fromkeys(layers)


def train(args: argparse.Namespace, model, layers: list[int], mix) -> tuple[dict, float]:
    """Train (or resume) every layer's transcoder; ``({layer: TrainResult}, seconds)``."""
    from tl_superposition.qk import ModelSource, QKTrainConfig, QKTranscoder, train_qk_layers

    qkts = [
        QKTranscoder.for_model(
            model, L, d_hidden=args.d_hidden, generator=torch.Generator().manual_seed(args.seed)
        )
        for L in layers
    ]
    source = ModelSource(
        model, args.source, [q.shape for q in qkts], context_size=args.context_size,
        split=args.train_split, mix=mix,
    )  # fmt: skip
    cfg = QKTrainConfig(
        max_tokens=args.max_tokens, batch_contexts=args.batch_contexts, seed=args.seed
    )
    t0 = time.perf_counter()
    res = train_qk_layers(qkts, model, source, cfg, args.out)
    return res, time.perf_counter() - t0


def measure_layer(model, qkt, heads, tokens, heldout) -> tuple[dict, object]:
    """Held-out text and IOI figures of one layer's transcoder."""
    from tl_superposition.qk import evaluate_qk
    from tl_superposition.qk.ioi_fit import ioi_fit, text_error_share

    ev = evaluate_qk(qkt, model, tokens, heads=heads, losses=False, progress=False)
    row = ev.metrics.loc["transcoder"]
    fit = ioi_fit(qkt, model, heldout, heads=heads)
    return {
        "layer": qkt.shape.layer,
        "kl_full": float(row["kl_full"]),
        "l0_q": float(row["l0_q_median"]),
        "l0_k": float(row["l0_k_median"]),
        "dead_frac": max(float(row["dead_q"]), float(row["dead_k"])),
        "error_frac_text": text_error_share(qkt, model, tokens, heads),
        **fit.summary(),
    }, fit


def text_share(per_layer: list[dict]) -> float:
    """The layers' text error shares, averaged (each layer's is over its own firings)."""
    shares = [
        r["error_frac_text"] for r in per_layer if r["error_frac_text"] == r["error_frac_text"]
    ]
    return sum(shares) / len(shares) if shares else float("nan")


def records(table) -> list:
    """A table as JSON-able records."""
    return json.loads(table.to_json(orient="records") or "[]")


def agree(args: argparse.Namespace, model, qkts: list) -> dict | None:
    """:func:`~tl_superposition.qk.edge_agreement` on the circuit's trace (``None`` without
    one); its tables go to ``--out/edge_agreement_*.csv``."""
    if not args.layers.startswith("circuit:"):
        return None
    from tl_superposition.qk import edge_agreement

    trace = args.layers.removeprefix("circuit:")
    ea = edge_agreement(qkts, model, trace, max_firings=args.agreement_firings)
    ea.save(args.out)
    worst = {
        rule: {k: records(v) for k, v in ea.disagreements(rule, 5).items()}
        for rule in ("top", "majority")
    }
    return {**ea.summary(), "disagreements": worst}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tl_superposition import load_model
    from tl_superposition.activations import pack_text
    from tl_superposition.core.atomic import atomic_path
    from tl_superposition.evaluation.prompts import ioi_prompts
    from tl_superposition.qk import QKTranscoder, layer_folder
    from tl_superposition.qk.cli import context_mix, parse_layers
    from tl_superposition.qk.ioi_fit import IOIFit

    mix = context_mix(args)  # checked before the model loads
    layers = parse_layers(args.layers)
    heads = heads_of_interest(args, layers)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = commit()
    model = load_model(args.model)
    res, seconds_train = train(args, model, layers, mix)
    tokens = pack_text(
        model, args.source, context_size=args.context_size, split=args.eval_split,
        max_contexts=args.eval_contexts,
    )  # fmt: skip
    heldout = ioi_prompts(model, args.ioi_prompts, args.ioi_seed, "heldout")
    per_layer, fits, qkts = [], [], []
    for layer in tqdm(layers, desc="measure"):
        qkts.append(QKTranscoder.load(layer_folder(args.out, layer)))
        row, fit = measure_layer(model, qkts[-1], heads[layer], tokens, heldout)
        per_layer.append(row)
        fits.append(fit)
    fit = IOIFit.concat(fits)
    with atomic_path(Path(args.out) / "ioi_heads.csv") as tmp:
        fit.heads.to_csv(tmp, index=False)
    agreement = agree(args, model, qkts)
    result = {
        "layers": layers,
        "heads": [f"{L}.{h}" for L, h in zip(fit.heads.layer, fit.heads["head"])],
        "mix": None if mix is None else mix.to_dict(),
        **{k: max(r[k] for r in per_layer) for k in ("kl_full", "l0_q", "l0_k", "dead_frac")},
        "error_frac_text": text_share(per_layer),
        **fit.summary(),
        "error_frac_by_role": fit.by_role(),
        "edge_agreement": agreement,
        "per_layer": per_layer,
        "per_head": records(fit.heads),
        "steps": max(r.steps for r in res.values()),
        "tokens": max(r.tokens for r in res.values()),
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
