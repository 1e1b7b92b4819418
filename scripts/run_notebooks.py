"""Execute notebooks in place, so that the committed files carry the outputs of the current code.

    .venv/bin/python scripts/run_notebooks.py                      # every notebook in notebooks/
    .venv/bin/python scripts/run_notebooks.py notebooks/trace_ioi.ipynb

Each notebook runs top to bottom in a fresh kernel with the repository root as its working
directory (the same way ``tests/test_notebooks.py`` runs them) and tqdm bars switched off, and
is written back atomically only if every cell succeeded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 1200
# The kernel inherits this: progress bars would fill the committed outputs with redraws.
os.environ.setdefault("TQDM_DISABLE", "1")


def execute(path: Path) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh kernel from the repository root; return the executed notebook.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; its traceback is in the message.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)"
    )
    args = parser.parse_args()
    paths = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path)
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
        print(f"{path}: executed in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
