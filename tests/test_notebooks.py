"""Every notebook in ``notebooks/`` runs top to bottom, and is committed with its outputs.

Marked ``slow``: the notebooks load SmolLM2. Refresh the committed outputs with
``.venv/bin/python scripts/run_notebooks.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.slow


def _runner():
    spec = importlib.util.spec_from_file_location(
        "run_notebooks", REPO / "scripts" / "run_notebooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    not_run = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not not_run, (
        f"{path.name}: code cells {not_run} have no outputs; run "
        "scripts/run_notebooks.py and commit the result"
    )
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name} was not run top to bottom in one kernel"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = _runner().execute(path)  # raises CellExecutionError with the failing cell's traceback
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
