"""The ``tl-superposition`` command line.

Each subcommand lives beside the method it runs and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this module only wires them together, so
importing it stays cheap and ``tl-superposition --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys

from tl_superposition.core import distributed

# subcommand name -> (module, one-line help); "module:name" takes the object `name` of the
# module (for a cli.py serving several subcommands)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "trace-ioi": (
        "tl_superposition.tracing.cli",
        "SVD-sparse signal tracing of the IOI circuit (Franco & Crovella 2024)",
    ),
    "collect": (
        "tl_superposition.activations.cli",
        "collect activations from a dataset into safetensors shards",
    ),
    "train-qk": (
        "tl_superposition.qk.cli:train",
        "train query/key transcoders of one layer (Wynroe & Sharkey 2024)",
    ),
    "eval-qk": (
        "tl_superposition.qk.cli:evaluate",
        "evaluate QK transcoders on held-out text against mean-q/k and uniform baselines",
    ),
    "toy": (
        "tl_superposition.toys.cli",
        "skip-trigram toy models: superposition analysis and gated attention blocks",
    ),
    "train-gated": (
        "tl_superposition.gated.cli",
        "train a gated attention block on a real model's layer and splice it in",
    ),
}


#: Commands that checkpoint as they go and resume when rerun on the same output folder.
RESUMABLE = ("collect", "train-qk", "train-gated", "toy")


def _after_interrupt(command: str) -> str:
    """What an interrupted ``command`` kept, and how to go on."""
    if command in RESUMABLE:
        return "finished files and the last checkpoint are kept: rerun the same command to resume"
    return "its output is incomplete: rerun the same command to start it again"


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="tl-superposition",
        description="Attention-head superposition tools for TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module_name, _, attr = module_name.partition(":")
        module = importlib.import_module(module_name)
        module = getattr(module, attr) if attr else module
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world = None
    try:
        if distributed.launched():  # under torchrun: join the process group first
            world = distributed.init(getattr(args, "device", None))
            if getattr(args, "device", None) is not None:
                args.device = distributed.device_of(world, args.device)
            if not world.main:  # one report, from rank 0
                with contextlib.redirect_stdout(io.StringIO()):
                    return int(args._module.run(args) or 0)
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"tl-superposition {args.command}: interrupted; {_after_interrupt(args.command)}",
              file=sys.stderr)  # fmt: skip
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, PermissionError) as exc:
        # Bad input: one clear line, no traceback.
        rank = "" if world is None else f" (rank {world.rank})"
        print(f"tl-superposition {args.command}{rank}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if world is not None:
            distributed.close(world)


if __name__ == "__main__":
    sys.exit(main())
