"""``tl-superposition trace-ioi``: the IOI circuit trace from the command line.

Every argument is checked before the model loads (:func:`check_arguments`): the output folder
must be writable, the thresholds valid (:class:`TraceConfig`), the model name known and the
seed heads inside the model, whose shape is read from its config
(:func:`tl_superposition.models.model_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from tl_superposition.tracing.config import TraceConfig

_DEFAULTS = TraceConfig()
# TraceConfig fields set from the command line (option --pattern-thresh sets pattern_thresh)
_CONFIG_OPTIONS = ("pattern_thresh", "thresh", "edge_thresh", "edge_rule", "batch_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``trace-ioi`` options on ``p``."""
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (offline), a local Hugging Face folder, or a hub name "
        "such as 'gpt2' (default: %(default)s)",
    )
    p.add_argument("--n-prompts", type=int, default=256, help="IOI prompts (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="prompt generation seed (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--prompt-type", choices=["ABBA", "BABA", "mixed"], default="mixed")
    p.add_argument(
        "--prepend-bos",
        action="store_true",
        help="start prompts with BOS (the paper's prompts have none)",
    )
    p.add_argument(
        "--seeds",
        default="dla",
        help="'dla' (heads with the largest direct logit attribution), "
        "'name-movers' (GPT-2 small 9.6, 9.9, 10.0) or a list like '9.6,9.9'",
    )
    p.add_argument(
        "--seed-src",
        choices=["auto", "IO", "S2", "any"],
        default="auto",
        help="END firings of the seeds that start the trace: END->IO, END->S2 or any "
        "(auto: any for DLA seeds, IO otherwise)",
    )
    p.add_argument(
        "--n-seeds", type=int, default=3, help="number of DLA seeds (default: %(default)s)"
    )
    p.add_argument(
        "--pattern-thresh",
        type=float,
        default=_DEFAULTS.pattern_thresh,
        help="firing: pattern >= this (default: %(default)s)",
    )
    p.add_argument(
        "--thresh",
        type=float,
        default=_DEFAULTS.thresh,
        help="sparse set reaches this fraction of the score (default: %(default)s)",
    )
    p.add_argument(
        "--edge-thresh",
        type=float,
        default=_DEFAULTS.edge_thresh,
        help="edges make up this fraction of the upstream contribution (default: %(default)s)",
    )
    p.add_argument(
        "--edge-rule",
        choices=["paper", "positive"],
        default=_DEFAULTS.edge_rule,
        help="'paper': the authors' rule (net sum, ties kept, heads only, layers from 1); "
        "'positive': positive writes only (default: %(default)s)",
    )
    p.add_argument(
        "--validate",
        type=int,
        default=0,
        metavar="N",
        help="validate every edge by interventions on up to N of its records "
        "(validation.json; 0: skip, the default)",
    )
    p.add_argument(
        "--patching-prompts",
        type=int,
        default=0,
        metavar="N",
        help="compare the circuit with activation patching on the first N prompts "
        "(patching.json; one forward pass per head; 0: skip, the default)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="prompts per forward pass (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def trace_config(args: argparse.Namespace) -> TraceConfig:
    """The :class:`TraceConfig` of the command line; errors name the option.

    Raises:
        ValueError: an option outside its range.
    """
    values = {name: getattr(args, name) for name in _CONFIG_OPTIONS}
    try:
        return dataclasses.replace(_DEFAULTS, **values)
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        if field in _CONFIG_OPTIONS:
            message = _option(field) + message[len(field) :]
        raise ValueError(message) from None


def check_output_dir(out: str | os.PathLike) -> Path:
    """Make sure ``out`` is a folder that can be created or written, without creating it.

    The folder itself, or its nearest existing parent when it does not exist yet, must be a
    folder in which a (temporary, at once removed) file can be written.

    Raises:
        ValueError: ``out`` cannot be written (the message says why).
    """
    path = Path(out).expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            problem = f"{existing} is not writable ({exc.strerror or exc})"
    if problem:
        raise ValueError(f"--out {out}: {problem}; pass a folder you can write to")
    return path


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a torch device, e.g. 'cpu' or 'cuda'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use 'cpu'")


def check_arguments(args: argparse.Namespace) -> tuple[TraceConfig, Path]:
    """Check every ``trace-ioi`` argument without loading the model.

    Returns:
        ``(config, out)``: the trace config and the output folder.

    Raises:
        ValueError, FileNotFoundError, RuntimeError: a bad argument (the message names it).
    """
    from tl_superposition.models import model_config
    from tl_superposition.tracing.graph import parse_heads
    from tl_superposition.tracing.ioi_trace import resolve_seed_src, resolve_seeds

    if args.n_prompts < 1:
        raise ValueError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    for option in ("validate", "patching_prompts"):
        if getattr(args, option, 0) < 0:
            raise ValueError(f"{_option(option)} must be >= 0, got {getattr(args, option)}")
    config = trace_config(args)
    if args.seeds not in ("dla", "name-movers"):
        parse_heads(args.seeds)  # the syntax now; the range once the model's shape is known
    resolve_seed_src(args.seed_src, args.seeds)
    _check_device(args.device)
    out = check_output_dir(args.out)
    cfg = model_config(args.model)  # the model's shape, without its weights
    try:
        resolve_seeds(args.seeds, args.n_seeds, cfg.n_layers, cfg.n_heads)
    except ValueError as exc:
        option = "--n-seeds" if args.seeds == "dla" else "--seeds"
        raise ValueError(f"{option}: {exc}") from None
    return config, out


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the model, generate prompts, trace, write, print the summary."""
    from tl_superposition.ioi import make_ioi_dataset
    from tl_superposition.models import load_model
    from tl_superposition.tracing.ioi_trace import format_summary, trace_ioi

    config, out = check_arguments(args)
    model = load_model(args.model, device=args.device)
    dataset = make_ioi_dataset(
        model,
        args.n_prompts,
        prompt_type=args.prompt_type,
        seed=args.seed,
        prepend_bos=args.prepend_bos,
    )
    result = trace_ioi(
        model,
        dataset,
        seeds=args.seeds,
        n_seeds=args.n_seeds,
        seed_src=args.seed_src,
        config=config,
    )
    result.summary["model_arg"] = args.model
    validation = None
    if args.validate:
        from tl_superposition.tracing.validate import validate_edges

        validation = validate_edges(model, result, max_instances=args.validate)
        result.summary["validation"] = validation.summary
    patching = None
    if args.patching_prompts:
        from tl_superposition.tracing.patching import compare_with_patching

        patching = compare_with_patching(model, result, n_prompts=args.patching_prompts)
        result.summary["patching"] = patching.summary
    paths = result.save(out, plots=not args.no_plots, validation=validation)
    if patching is not None:
        paths.update(patching.save(out))
    print(format_summary(result.summary))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
