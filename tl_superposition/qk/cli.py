"""``tl-superposition train-qk`` and ``tl-superposition eval-qk``.

Two subcommands, each an object with ``add_arguments(parser)`` and ``run(args) -> int``:
:data:`train` and :data:`evaluate` (registered in ``tl_superposition/cli.py`` as
``tl_superposition.qk.cli:train`` and ``tl_superposition.qk.cli:evaluate``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tl_superposition.core.options import add_device, add_model, add_progress
from tl_superposition.core.reading import read_json

HOOKS = "ln1.hook_normalized,attn.hook_q,attn.hook_k"


def _common(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--context-size", type=int, default=128, help="tokens per context (with BOS)")
    p.add_argument("--split", default=None, help="file-name prefix in a source folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_device(p)
    add_progress(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``train-qk`` options on ``p``."""
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layer", type=int, help="the attention layer L (--out is its folder)")
    which.add_argument(
        "--layers",
        help="several layers trained together from one forward pass per step: '16,17,23', or "
        "'circuit:<trace folder>' for every layer holding a head of the pruned circuit there "
        "(--out/layer_L is layer L's folder)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (resumed where it holds checkpoints)"
    )
    p.add_argument(
        "--acts",
        default=None,
        help="collection folder of ln1.hook_normalized, attn.hook_q, attn.hook_k at the layers "
        "(from tl-superposition collect); with --source it is collected first (every layer in "
        "one pass) if incomplete",
    )
    p.add_argument(
        "--source",
        default=None,
        help="text source (file, folder, 'pydoc', dataset name): collected into --acts, or "
        "streamed through the model when --acts is not given",
    )
    p.add_argument("--max-contexts", type=int, default=None, help="streamed: use the first N")
    p.add_argument(
        "--bos-frac",
        type=float,
        default=None,
        help="share of contexts that start with BOS (a context mix; default: all)",
    )
    p.add_argument(
        "--random-offset",
        action="store_true",
        help="contexts start at random offsets of the text, not packed back to back",
    )
    p.add_argument(
        "--short-frac",
        type=float,
        default=0.0,
        help="streamed: share of short contexts (a collection holds one length)",
    )
    p.add_argument(
        "--short-size", type=int, default=24, help="tokens per short context (default: 24)"
    )
    p.add_argument(
        "--d-hidden", type=int, default=1200, help="features per dictionary (default: %(default)s)"
    )
    p.add_argument("--sparsity", choices=["sqrt", "l1", "topk"], default="sqrt")
    p.add_argument("--top-k", type=int, default=32, help="active features per token (topk)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1_536_000,
        help="training tokens in total (default: %(default)s)",
    )
    p.add_argument("--batch-contexts", type=int, default=16, help="contexts per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    p.add_argument("--sparsity-coeff", type=float, default=4e-3, help="lambda")
    p.add_argument("--warmup-frac", type=float, default=0.02)
    p.add_argument("--decay-frac", type=float, default=0.2)
    p.add_argument("--sparsity-warmup-frac", type=float, default=0.05)
    p.add_argument("--dead-window-tokens", type=int, default=65_536)
    p.add_argument("--resample-every-tokens", type=int, default=131_072, help="0: never")
    p.add_argument("--resample-until-frac", type=float, default=0.7)
    p.add_argument(
        "--resample-enc-norm",
        type=float,
        default=1.0,
        help="resampled encoder column norm / mean living norm (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument(
        "--stop-after-steps", type=int, default=None, help="pause after N steps (resume later)"
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh in --out")


def _set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def context_mix(args: argparse.Namespace) -> Any:
    """The :class:`~tl_superposition.activations.mix.ContextMix` of the command line (``None``
    without mix options); checked before the model loads.

    Raises:
        ValueError: short contexts with ``--acts`` (a collection holds one context length), or
            a field out of range (the message names the option).
    """
    from tl_superposition.activations.cli import mix_from_args

    if args.short_frac and getattr(args, "acts", None) is not None:
        raise ValueError(
            "--short-frac applies to a streamed --source (a collection holds one context "
            "length); drop --acts to stream"
        )
    mix = mix_from_args(args)
    if mix is None:
        return None
    if mix.short_frac > 0 and mix.short_size >= args.context_size:
        raise ValueError(
            f"--short-size {mix.short_size} must be below --context-size {args.context_size}"
        )
    return mix


def parse_layers(text: str) -> list[int]:
    """The layers of ``--layers``: comma-separated integers, or ``circuit:<trace folder>`` for
    the layers holding a head of the pruned circuit in that folder's ``circuit.json``.

    Raises:
        ValueError: not integers, a negative layer, or no circuit (or an empty one) there.
    """
    if text.startswith("circuit:"):
        from tl_superposition.circuit import Circuit

        folder = Path(text.removeprefix("circuit:"))
        if not (folder / "circuit.json").is_file():
            raise ValueError(
                f"--layers {text}: {folder} holds no circuit.json; give a trace-ioi output "
                "folder (made with the circuit, the default)"
            )
        layers = sorted({layer for layer, _ in Circuit.load(folder).head_set()})
        if not layers:
            raise ValueError(f"--layers {text}: the circuit holds no attention head")
        return layers
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(
            f"--layers must be comma-separated integers or circuit:<folder>, got {text!r}"
        ) from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--layers needs layers >= 0, got {text!r}")
    return layers


def _train_source(args: argparse.Namespace, model: Any, shapes: list[Any], mix: Any = None) -> Any:
    from tl_superposition.qk.source import ModelSource, StoreSource

    if args.acts is None and args.source is None:
        raise ValueError("give --acts (a collection folder) and/or --source (a text source)")
    if args.acts is None:
        return ModelSource(
            model,
            args.source,
            shapes,
            context_size=args.context_size,
            split=args.split,
            max_contexts=args.max_contexts,
            mix=mix,
        )
    manifest = Path(args.acts) / "manifest.json"
    complete = manifest.is_file() and read_json(manifest).get("complete")
    if not complete:
        if args.source is None:
            raise FileNotFoundError(
                f"{args.acts} holds no complete collection: collect one, or add --source to "
                "collect it first"
            )
        from tl_superposition.activations import CollectConfig, collect

        config = CollectConfig(
            out_dir=args.acts,
            hooks=HOOKS,
            layers=[s.layer for s in shapes],
            context_size=args.context_size,
            split=args.split,
            mix=mix,
            progress=not args.no_progress,
        )
        summary = collect(model, config, args.source)
        print(summary.line())
    return StoreSource(args.acts, shapes, seed=args.seed, device=args.device)


def _check_collection_mix(acts: str | None, mix: Any) -> None:
    """Refuse a collection in ``acts`` cut in another context mix than ``mix`` (before the
    model loads: a run never trains on other contexts than its options say)."""
    manifest = None if acts is None else Path(acts) / "manifest.json"
    if manifest is None or not manifest.is_file():
        return
    stored = read_json(manifest).get("settings", {}).get("mix")
    wanted = None if mix is None else mix.to_dict()
    if stored != wanted:
        raise ValueError(
            f"{acts} holds contexts cut in the mix {stored} (None: packed), these options ask "
            f"for {wanted}: give the same mix options, or another --acts folder"
        )


def _train_config(args: argparse.Namespace) -> Any:
    from tl_superposition.qk.config import QKTrainConfig

    return QKTrainConfig(
        max_tokens=args.max_tokens,
        batch_contexts=args.batch_contexts,
        lr=args.lr,
        sparsity_coeff=args.sparsity_coeff,
        warmup_frac=args.warmup_frac,
        decay_frac=args.decay_frac,
        sparsity_warmup_frac=args.sparsity_warmup_frac,
        dead_window_tokens=args.dead_window_tokens,
        resample_every_tokens=args.resample_every_tokens,
        resample_until_frac=args.resample_until_frac,
        resample_enc_norm=args.resample_enc_norm,
        seed=args.seed,
        checkpoint_every_steps=args.checkpoint_every,
        device=args.device,
    )


def run_train(args: argparse.Namespace) -> int:
    """Build (or resume) the QK transcoders of ``--layer`` or ``--layers`` and train them;
    print a summary line per layer."""
    import torch

    from tl_superposition import load_model
    from tl_superposition.qk.trainer import train_qk, train_qk_layers
    from tl_superposition.qk.transcoder import QKTranscoder

    _set_threads(args.threads)
    cfg = _train_config(args)
    mix = context_mix(args)
    layers = [args.layer] if args.layers is None else parse_layers(args.layers)
    _check_collection_mix(args.acts, mix)
    model = load_model(args.model, device=args.device)
    qkts = [
        QKTranscoder.for_model(
            model, layer, d_hidden=args.d_hidden, sparsity=args.sparsity, top_k=args.top_k,
            generator=torch.Generator().manual_seed(args.seed),
        )
        for layer in layers
    ]  # fmt: skip
    source = _train_source(args, model, [q.shape for q in qkts], mix)
    options = dict(
        overwrite=args.overwrite, stop_after_steps=args.stop_after_steps,
        progress=not args.no_progress,
    )  # fmt: skip
    if args.layers is None:
        results = {args.layer: train_qk(qkts[0], model, source, cfg, args.out, **options)}
    else:
        results = train_qk_layers(qkts, model, source, cfg, args.out, **options)
    for layer, res in results.items():
        last = res.history.iloc[-1].to_dict() if len(res.history) else {}
        print(
            f"layer {layer} {'finished' if res.finished else 'paused'}: {res.steps} steps, "
            f"{res.tokens:,} tokens ({res.tokens_per_s:,.0f} tokens/s in this run, "
            f"{res.seconds:.0f} s); last logged: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        )
    print(f"wrote {args.out}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``eval-qk`` options on ``p``."""
    _common(p)
    p.add_argument(
        "--transcoder",
        required=True,
        help="folder written by train-qk: one layer's, or a --layers run's (every layer is "
        "evaluated, into --out/layer_L)",
    )
    p.add_argument("--source", required=True, help="held-out text (file, folder, 'pydoc', ...)")
    p.add_argument("--max-contexts", type=int, default=256, help="contexts evaluated")
    p.add_argument("--skip-contexts", type=int, default=0, help="skip the first N contexts")
    p.add_argument(
        "--heads",
        default=None,
        help="heads of interest: '0,3' in every layer, or layer.head pairs '23.0,16.2' "
        "(default: all heads)",
    )
    p.add_argument("--batch-contexts", type=int, default=16)
    p.add_argument(
        "--no-losses",
        action="store_true",
        help="skip the spliced next-token losses (six passes per batch): patterns, L0 and "
        "dead features only",
    )
    p.add_argument(
        "--ioi-prompts",
        type=int,
        default=0,
        metavar="N",
        help="also measure the heads on N held-out IOI prompts: error share of END firings, "
        "spliced END -> IO / END -> S2 attention (default: 0, skip)",
    )
    p.add_argument(
        "--ioi-seed",
        type=int,
        default=1,
        help="the IOI prompts' seed, with the held-out half of the names (default: 1, the "
        "circuit's held-out prompts)",
    )
    p.add_argument(
        "--out", default=None, help="folder for metrics.csv, summary.json (and ioi_heads.csv)"
    )


def transcoder_folders(path: str | Path) -> dict[int, Path]:
    """``{layer: folder}`` of a ``train-qk`` output: one layer's folder, or a ``--layers`` run
    folder (``layer_L`` subfolders).

    Raises:
        FileNotFoundError: neither (no ``qk_transcoder.json`` there or in ``layer_*``; a run
            that has not finished has none yet).
    """
    path = Path(path)
    if (path / "qk_transcoder.json").is_file():
        saved = read_json(path / "qk_transcoder.json")
        return {int(saved["config"]["shape"]["layer"]): path}
    found = {
        int(sub.name.removeprefix("layer_")): sub
        for sub in path.glob("layer_*")
        if sub.name.removeprefix("layer_").isdigit() and (sub / "qk_transcoder.json").is_file()
    }
    if not found:
        raise FileNotFoundError(
            f"{path} holds no trained QK transcoder (qk_transcoder.json, or layer_*/ of a "
            "train-qk --layers run): train one, or let the run finish"
        )
    return dict(sorted(found.items()))


def parse_heads(text: str | None, layers: list[int]) -> dict[int, list[int] | None]:
    """``--heads`` per layer: ``'0,3'`` (the same heads in every layer), ``'23.0,16.2'``
    (layer.head), or ``None`` (every head).

    Raises:
        ValueError: neither form, or a layer.head of a layer not evaluated.
    """
    if not text:
        return dict.fromkeys(layers)
    items = [h.strip() for h in text.split(",") if h.strip()]
    try:
        if all("." not in h for h in items):
            return {L: [int(h) for h in items] for L in layers}
        pairs = [tuple(int(x) for x in h.split(".")) for h in items]
    except ValueError:
        raise ValueError(
            f"--heads must be comma-separated heads ('0,3') or layer.head ('23.0,16.2'), "
            f"got {text!r}"
        ) from None
    if any(len(p) != 2 for p in pairs) or {p[0] for p in pairs} - set(layers):
        raise ValueError(f"--heads {text!r}: layer.head pairs of layers {layers} only")
    return {L: sorted(h for layer, h in pairs if layer == L) or None for L in layers}


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate trained QK transcoders (one layer, or every layer of a ``--layers`` run) on
    held-out text and, with ``--ioi-prompts``, on held-out IOI prompts; print the tables."""
    from tl_superposition import load_model
    from tl_superposition.activations.packing import pack_text

    _set_threads(args.threads)
    if args.max_contexts < 1 or args.skip_contexts < 0:
        raise ValueError("--max-contexts must be >= 1 and --skip-contexts >= 0")
    if args.ioi_prompts < 0:
        raise ValueError(f"--ioi-prompts must be >= 0, got {args.ioi_prompts}")
    folders = transcoder_folders(args.transcoder)
    heads = parse_heads(args.heads, list(folders))
    model = load_model(args.model, device=args.device)
    tokens = pack_text(
        model,
        args.source,
        context_size=args.context_size,
        split=args.split,
        max_contexts=args.skip_contexts + args.max_contexts,
    )[args.skip_contexts :]
    several = not (Path(args.transcoder) / "qk_transcoder.json").is_file()
    for layer, folder in folders.items():
        out = None if args.out is None else Path(args.out) / (f"layer_{layer}" if several else "")
        _eval_layer(args, model, folder, tokens, heads[layer], out)
    return 0


def _eval_layer(
    args: argparse.Namespace,
    model: Any,
    folder: Path,
    tokens: Any,
    heads: list[int] | None,
    out: Path | None,
) -> None:
    """Evaluate one layer's transcoder; print and (with ``out``) write its tables."""
    import pandas as pd

    from tl_superposition.core.atomic import atomic_path, write_json_atomic
    from tl_superposition.qk.evaluate import evaluate_qk
    from tl_superposition.qk.transcoder import QKTranscoder

    qkt = QKTranscoder.load(folder, device=args.device)
    qkt.check_model(model)
    print(f"layer {qkt.shape.layer} ({folder}):")
    res = evaluate_qk(
        qkt,
        model,
        tokens,
        heads=heads,
        batch_contexts=args.batch_contexts,
        losses=not args.no_losses,
        progress=not args.no_progress,
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.table().T.to_string())
    fit = _ioi_column(args, qkt, model, heads)
    summary = res.summary if fit is None else {**res.summary, "ioi": fit.summary()}
    print(json.dumps(summary))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "metrics.csv") as tmp:
            res.metrics.to_csv(tmp)
        if fit is not None:
            with atomic_path(out / "ioi_heads.csv") as tmp:
                fit.heads.to_csv(tmp, index=False)
        write_json_atomic(out / "summary.json", {**summary, "transcoder": str(folder)})
        print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def _ioi_column(args: argparse.Namespace, qkt: Any, model: Any, heads: list[int] | None) -> Any:
    """:func:`~tl_superposition.qk.ioi_fit.ioi_fit` on ``--ioi-prompts`` held-out prompts
    (printed per head), or ``None``."""
    if not args.ioi_prompts:
        return None
    import pandas as pd

    from tl_superposition.evaluation.prompts import ioi_prompts
    from tl_superposition.qk.ioi_fit import ioi_fit

    prompts = ioi_prompts(model, args.ioi_prompts, args.ioi_seed, "heldout")
    fit = ioi_fit(qkt, model, prompts, heads=heads)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(fit.heads.round(4).to_string(index=False))
    return fit


#: ``tl-superposition train-qk``
train = SimpleNamespace(add_arguments=add_train_arguments, run=run_train)
#: ``tl-superposition eval-qk``
evaluate = SimpleNamespace(add_arguments=add_eval_arguments, run=run_eval)
