"""Command-line options every ``tl-superposition`` command shares, declared once.

Each command's ``add_arguments`` calls these for ``--model``, ``--device`` and ``--no-progress``,
so the same option means the same thing (and reads the same in ``--help``) everywhere.
"""

from __future__ import annotations

import argparse


def add_model(p: argparse.ArgumentParser, default: str = "smollm2-135m") -> None:
    """``--model``: what :func:`tl_superposition.load_model` loads."""
    p.add_argument(
        "--model",
        default=default,
        help="'smollm2-135m' (offline), a local Hugging Face folder, or a hub name such as "
        "'gpt2' (default: %(default)s)",
    )


def add_device(p: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    """``--device``: where the model runs (``cuda`` under torchrun: each process's own GPU)."""
    where = "the model's" if default is None else "%(default)s"
    p.add_argument(
        "--device",
        default=default,
        help="torch device: cpu, cuda, cuda:1, ... (under torchrun, cuda is each process's "
        f"own GPU; default: {where})",
    )


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: hide the tqdm bars (for logs)."""
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
