"""``tl-superposition trace-ioi``: the IOI trace and its circuit from the command line.

The command traces IOI prompts (:func:`~tl_superposition.tracing.ioi_trace.trace_ioi`,
per-prompt seeds by default), extracts the pruned circuit
(:func:`~tl_superposition.circuit.extract_circuit`) and scores it on held-out prompts of
another seed and other names (:class:`~tl_superposition.evaluation.Faithfulness`).

Every argument is checked before the model loads (:func:`check_arguments`): the output folder
must be writable and empty (or ``--overwrite`` given), the thresholds valid
(:class:`TraceConfig`, :class:`~tl_superposition.circuit.CircuitConfig`), the model name
known and the seed heads inside the model, whose shape is read from its config
(:func:`tl_superposition.models.model_config`). Everything is written into a temporary
folder that takes ``--out``'s place only once the run is complete
(:func:`~tl_superposition.core.atomic.atomic_dir`): an interrupted run leaves the previous
results whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tl_superposition.circuit.config import CircuitConfig
from tl_superposition.core.options import add_device, add_model
from tl_superposition.tracing.config import TraceConfig

_CIRCUIT_DEFAULTS = CircuitConfig()
_DEFAULTS = TraceConfig()
# TraceConfig fields set from the command line (option --pattern-thresh sets pattern_thresh)
_CONFIG_OPTIONS = (
    "pattern_thresh", "dynamic_thresh", "thresh", "edge_thresh", "edge_rule", "augmented_bias",
    "batch_size",
)  # fmt: skip
# CircuitConfig fields set from the command line: {option: field}
_CIRCUIT_OPTIONS = {"node_frac": "node_frac", "min_prompts": "min_prompts",
                    "circuit_threshold": "threshold"}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``trace-ioi`` options on ``p``."""
    add_model(p)
    p.add_argument("--n-prompts", type=int, default=256, help="IOI prompts (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="prompt generation seed (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (created if missing; must be empty unless --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (only once the new run is complete)",
    )
    p.add_argument("--prompt-type", choices=["ABBA", "BABA", "mixed"], default="mixed")
    p.add_argument(
        "--prepend-bos",
        action="store_true",
        help="start prompts with BOS (the paper's prompts have none)",
    )
    p.add_argument(
        "--seeds",
        default="per-prompt",
        help="'per-prompt' (ACC++: each correctly answered prompt's components making up its "
        "logit difference; needed for the circuit), 'dla' (the heads with the largest mean "
        "direct logit attribution), 'name-movers' (GPT-2 small 9.6, 9.9, 10.0) or heads like "
        "'9.6,9.9' (default: %(default)s)",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=1.0,
        help="per-prompt seeds exceed this share of the logit difference (default: %(default)s)",
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
        "--dynamic-thresh",
        type=float,
        default=_DEFAULTS.dynamic_thresh,
        metavar="C",
        help="firing: pattern >= min(1, C / (dest + 1)) instead (ACC++: 2.5; default: off)",
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
        "--bias-coordinate",
        dest="augmented_bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the query/key bias coordinate to every head's write before the edge rule, "
        "as the authors' code does (default: on for the paper rule, off for the positive one)",
    )
    p.add_argument(
        "--no-circuit",
        action="store_true",
        help="stop after the trace: no circuit, no held-out faithfulness",
    )
    p.add_argument(
        "--node-frac",
        type=float,
        default=_CIRCUIT_DEFAULTS.node_frac,
        help="circuit: a node appears in at least this share of prompt graphs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--min-prompts",
        type=int,
        default=_CIRCUIT_DEFAULTS.min_prompts,
        help="circuit: an edge occurs in at least this many prompts (default: %(default)s)",
    )
    p.add_argument(
        "--circuit-threshold",
        type=float,
        default=_CIRCUIT_DEFAULTS.threshold,
        help="circuit: removing an edge changes logit(IO) - logit(S) by at least this on "
        "average, in logits (default: %(default)s)",
    )
    p.add_argument(
        "--heldout-prompts",
        type=int,
        default=256,
        metavar="N",
        help="score the circuit on N held-out prompts (another seed, the other half of the "
        "names; 0: skip; default: %(default)s)",
    )
    p.add_argument(
        "--heldout-seed",
        type=int,
        default=None,
        help="the held-out prompts' seed (default: --seed + 1)",
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
    add_device(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _config(args: argparse.Namespace, defaults: Any, options: dict[str, str]) -> Any:
    """``defaults`` with the fields set from their options (``{option: field}``); a field's
    error names its option.

    Raises:
        ValueError: an option outside its range.
    """
    values = {field: getattr(args, option) for option, field in options.items()}
    try:
        return dataclasses.replace(defaults, **values)
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        option = {f: o for o, f in options.items()}.get(field)
        if option is not None:
            message = _option(option) + message[len(field) :]
        raise ValueError(message) from None


def trace_config(args: argparse.Namespace) -> TraceConfig:
    """The :class:`TraceConfig` of the command line; errors name the option.

    Raises:
        ValueError: an option outside its range.
    """
    return _config(args, _DEFAULTS, {name: name for name in _CONFIG_OPTIONS})


def circuit_config(args: argparse.Namespace) -> CircuitConfig:
    """The :class:`~tl_superposition.circuit.CircuitConfig` of the command line; errors name
    the option.

    Raises:
        ValueError: an option outside its range.
    """
    return _config(args, _CIRCUIT_DEFAULTS, _CIRCUIT_OPTIONS)


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


@dataclasses.dataclass
class Checked:
    """What :func:`check_arguments` makes of the command line."""

    config: TraceConfig
    circuit: CircuitConfig | None
    out: Path
    heldout_seed: int


def check_arguments(args: argparse.Namespace) -> Checked:
    """Check every ``trace-ioi`` argument without loading the model.

    Raises:
        ValueError, FileNotFoundError, RuntimeError: a bad argument (the message names it).
    """
    from tl_superposition.core.atomic import is_empty_dir
    from tl_superposition.models import model_config
    from tl_superposition.tracing.graph import parse_heads
    from tl_superposition.tracing.ioi_trace import PER_PROMPT, resolve_seed_src, resolve_seeds

    if args.n_prompts < 1:
        raise ValueError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    for option in ("validate", "patching_prompts", "heldout_prompts"):
        if getattr(args, option, 0) < 0:
            raise ValueError(f"{_option(option)} must be >= 0, got {getattr(args, option)}")
    if not args.beta > 0:
        raise ValueError(f"--beta must be > 0, got {args.beta}")
    config = trace_config(args)
    circuit = None if args.no_circuit else circuit_config(args)
    heldout_seed = args.seed + 1 if args.heldout_seed is None else args.heldout_seed
    if heldout_seed == args.seed and args.heldout_prompts:
        raise ValueError(f"--heldout-seed must differ from --seed ({args.seed})")
    if args.seeds not in ("dla", "name-movers", PER_PROMPT):
        parse_heads(args.seeds)  # the syntax now; the range once the model's shape is known
    resolve_seed_src(args.seed_src, args.seeds)
    _check_device(args.device)
    out = check_output_dir(args.out)
    if not args.overwrite and not is_empty_dir(out):
        raise ValueError(f"--out {args.out} is not empty; pass --overwrite to replace it")
    cfg = model_config(args.model)  # the model's shape, without its weights
    try:
        resolve_seeds(args.seeds, args.n_seeds, cfg.n_layers, cfg.n_heads)
    except ValueError as exc:
        option = "--n-seeds" if args.seeds == "dla" else "--seeds"
        raise ValueError(f"{option}: {exc}") from None
    if circuit is not None and args.seeds != PER_PROMPT:
        raise ValueError(
            f"--seeds {args.seeds}: the circuit needs per-prompt seeds; pass --seeds per-prompt "
            "or --no-circuit"
        )
    return Checked(config, circuit, out, heldout_seed)


def _prompts(model, args: argparse.Namespace, heldout_seed: int):
    """The traced prompts and the held-out ones (``None`` for 0), from the two name halves
    (:func:`~tl_superposition.evaluation.prompts.ioi_prompts`)."""
    from tl_superposition.evaluation.prompts import ioi_prompts

    common = {"prompt_type": args.prompt_type, "prepend_bos": args.prepend_bos}
    traced = ioi_prompts(model, args.n_prompts, args.seed, "discovery", **common)
    if not args.heldout_prompts:
        return traced, None
    return traced, ioi_prompts(model, args.heldout_prompts, heldout_seed, "heldout", **common)


def _circuit(model, result, checked: Checked, heldout, args, out: Path) -> dict:
    """Extract, save and score the circuit; its summary (or why there is none)."""
    from tl_superposition.circuit import extract_circuit

    if result.seed_table is None or result.seed_table.empty:
        return {"skipped": "no prompt is seeded: the model answers none correctly"}
    assert checked.circuit is not None
    circuit = extract_circuit(model, result, checked.circuit)
    circuit.save(out, plots=not args.no_plots)
    summary = circuit.summary()
    if heldout is not None:
        from tl_superposition.evaluation import Faithfulness, abc_tokens

        faith = Faithfulness.prepare(
            model, heldout, abc_tokens(model, heldout, seed=heldout.meta["seed"])
        )
        summary |= {
            "faithfulness_heldout": faith.score(circuit.head_set()),
            "heldout_prompts": len(heldout),
            "heldout_seed": heldout.meta["seed"],
            "logit_diff_heldout_full": faith.m_full,
            "logit_diff_heldout_empty": faith.m_empty,
        }
    return summary


def run(args: argparse.Namespace) -> int:
    """Check the arguments, load the model, trace, extract and score the circuit, write the
    folder (all of it at once), print the summary."""
    from tl_superposition.core import distributed
    from tl_superposition.core.atomic import atomic_dir
    from tl_superposition.models import load_model
    from tl_superposition.tracing.ioi_trace import format_summary, trace_ioi

    checked = check_arguments(args)
    model = load_model(args.model, device=args.device)
    dataset, heldout = _prompts(model, args, checked.heldout_seed)
    if not distributed.current().main:  # under torchrun: trace this rank's batches for rank 0
        trace_ioi(model, dataset, seeds=args.seeds, n_seeds=args.n_seeds,
                  seed_src=args.seed_src, config=checked.config, beta=args.beta)  # fmt: skip
        return 0
    with atomic_dir(checked.out, overwrite=args.overwrite) as tmp:
        result = trace_ioi(
            model,
            dataset,
            seeds=args.seeds,
            n_seeds=args.n_seeds,
            seed_src=args.seed_src,
            config=checked.config,
            out_dir=tmp,
            beta=args.beta,
        )
        result.summary["model_arg"] = args.model
        if checked.circuit is not None:
            result.summary["circuit"] = _circuit(model, result, checked, heldout, args, tmp)
        validation = None
        if args.validate:
            from tl_superposition.tracing.validate import validate_edges

            validation = validate_edges(model, result, max_instances=args.validate)
            result.summary["validation"] = validation.summary
        if args.patching_prompts:
            from tl_superposition.tracing.patching import compare_with_patching

            patching = compare_with_patching(model, result, n_prompts=args.patching_prompts)
            result.summary["patching"] = patching.summary
            patching.save(tmp)
        result.save(tmp, plots=not args.no_plots, validation=validation)
    print(format_summary(result.summary))
    print(f"wrote {checked.out}: " + ", ".join(sorted(p.name for p in checked.out.iterdir())))
    return 0
