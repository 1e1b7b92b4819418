"""``tl-superposition collect``: activation collection from the command line.

Every option's default is the :class:`~.config.CollectConfig` default, except ``--source``,
whose default is ``auto`` (WikiText-2 from the Hugging Face hub where it can be reached, else
the built-in ``pydoc`` corpus; the library's default is ``pydoc``, the same on every machine).

Example::

    tl-superposition collect --model smollm2-135m --source path/to/wikitext-2 \\
        --split valid --layers 15 --hooks ln1.hook_normalized,attn.hook_q,attn.hook_k \\
        --context-size 128 --max-tokens 100000 --out acts/wt2_l15
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tl_superposition.activations.config import (
    SEPARATORS,
    SHORT_HOOKS,
    STORAGE_DTYPES,
    CollectConfig,
)
from tl_superposition.core.options import add_device, add_model, add_progress

_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(CollectConfig) if f.name != "out_dir"
}
_PREPEND_BOS = {"auto": None, "yes": True, "no": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``collect`` options on ``parser``."""
    d = _DEFAULTS
    add_model(parser)
    parser.add_argument(
        "--source",
        default="auto",
        help="'auto' (default: WikiText-2 from the Hugging Face hub if reachable, else "
        "'pydoc'), 'pydoc' (built-in offline corpus), a text file or folder, or a Hugging "
        "Face dataset name (optionally name:config)",
    )
    parser.add_argument(
        "--split",
        default=d["split"],
        help="dataset split; for a folder, files whose name starts with it "
        "(e.g. 'valid' for wikitext-2/valid.txt)",
    )
    parser.add_argument("--column", default=d["column"], help="text column (default: %(default)s)")
    parser.add_argument(
        "--hooks",
        default=",".join(d["hooks"]),
        help="comma-separated hook names: full (blocks.15.attn.hook_q) or short "
        f"with --layers; short names: {','.join(SHORT_HOOKS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        type=_int_list,
        default=d["layers"],
        help="comma-separated layers for short hook names (e.g. 15 or 10,15)",
    )
    parser.add_argument(
        "--heads",
        type=_int_list,
        default=d["heads"],
        help="comma-separated heads to keep for attn.hook_pattern (default all)",
    )
    _int_option(parser, "--context-size", "tokens per context including BOS")
    _int_option(parser, "--batch-size", "contexts per forward pass")
    _int_option(parser, "--max-tokens", "stop after this many tokens (default: the whole source)")
    _int_option(parser, "--shard-tokens", "tokens per shard file")
    parser.add_argument(
        "--dtype",
        default=d["dtype"],
        choices=STORAGE_DTYPES,
        help="storage dtype (default %(default)s)",
    )
    parser.add_argument(
        "--prepend-bos",
        default="auto",
        choices=list(_PREPEND_BOS),
        help="start every context with BOS (auto: as the model expects)",
    )
    parser.add_argument(
        "--separator",
        default=d["separator"],
        choices=SEPARATORS,
        help="token placed between documents (default %(default)s)",
    )
    parser.add_argument(
        "--bos-frac",
        type=float,
        default=None,
        help="share of contexts that start with BOS (a context mix; default: every one)",
    )
    parser.add_argument(
        "--random-offset",
        action="store_true",
        help="contexts start at random offsets of the text, not packed back to back",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing collection in --out instead of refusing",
    )
    add_device(parser, d["device"])
    _int_option(parser, "--seed", "seed recorded in the manifest (the reader's shuffle seed)")
    add_progress(parser)


def _int_option(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    default = _DEFAULTS[flag.removeprefix("--").replace("-", "_")]
    if default is not None:
        help_text += " (default %(default)s)"
    parser.add_argument(flag, type=int, default=default, help=help_text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def mix_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~.mix.ContextMix` of ``--bos-frac``, ``--random-offset`` and, where the
    command has them, ``--short-frac`` / ``--short-size``, seeded by ``--seed`` (``None``
    without mix options). Shared by ``collect`` and ``train-qk``.

    Raises:
        ValueError: a field out of range (the message names the option).
    """
    from tl_superposition.activations.mix import ContextMix

    short_frac = getattr(args, "short_frac", 0.0)
    if args.bos_frac is None and not args.random_offset and not short_frac:
        return None
    try:
        return ContextMix(
            bos_frac=1.0 if args.bos_frac is None else args.bos_frac,
            random_offset=args.random_offset,
            short_frac=short_frac,
            short_size=getattr(args, "short_size", ContextMix.short_size),
            seed=args.seed,
        )
    except ValueError as exc:
        raise ValueError("--" + str(exc).replace("_", "-", 1)) from None


def config_from_args(args: argparse.Namespace) -> CollectConfig:
    """The :class:`CollectConfig` of parsed ``collect`` arguments (checked, nothing run).

    Every field comes from the option of the same name, except ``out_dir`` (``--out``),
    ``prepend_bos`` (``--prepend-bos auto|yes|no``), ``progress`` (``--no-progress``) and
    ``mix`` (``--bos-frac``, ``--random-offset``; seeded by ``--seed``).

    Raises:
        ValueError: a field out of range (see :class:`CollectConfig`).
    """
    renamed = {
        "out_dir": args.out,
        "prepend_bos": _PREPEND_BOS[args.prepend_bos],
        "progress": not args.no_progress,
        "mix": mix_from_args(args),
    }
    values = {
        f.name: renamed[f.name] if f.name in renamed else getattr(args, f.name)
        for f in dataclasses.fields(CollectConfig)
    }
    return CollectConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Check the settings, load the model, collect, print the summary line; returns 0."""
    import tl_superposition
    from tl_superposition.activations.collector import collect

    config = config_from_args(args)  # bad settings fail before the model loads
    if args.device:
        model = tl_superposition.load_model(args.model, device=args.device)
    else:
        model = tl_superposition.load_model(args.model)
    summary = collect(model, config, args.source)
    print(summary.line())
    return 0
