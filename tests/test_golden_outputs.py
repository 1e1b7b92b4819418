"""Every command's outputs stay those of the reference written before the shared core.

Issue 27 moved each method onto one training loop, one batch source and shared helpers, with
the promise that the same inputs and seeds write the same files. These tests run a small
instance of every command (``golden_runs.command_runs``) and the pair-mask training, and compare
their fingerprints with ``tests/data/golden_outputs.json``: exact but for float values, which
agree within a tolerance that covers another CPU's rounding (``golden_runs.Fingerprint``).
Checkpoints (``.pt``) are compared by content (torch names its zip archive after the temporary
file).
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import data_path
from golden_runs import GOLDEN, pair_mask_fingerprints, run_all, same

from tl_superposition.cli import main

UPDATE = os.environ.get("TL_SUP_UPDATE_GOLDEN") == "1"


def _compare(name: str, got: dict) -> None:
    ref = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        ref[name] = got
        GOLDEN.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
        pytest.fail(f"wrote the reference of {name}: rerun without TL_SUP_UPDATE_GOLDEN")
    assert name in ref, f"no reference for {name}: see tests/golden_runs.py"
    want = ref[name]
    changed = {
        f"{run}/{f}"
        for run in want.keys() | got.keys()
        for f in want.get(run, {}).keys() | got.get(run, {}).keys()
        if f not in want.get(run, {})
        or f not in got.get(run, {})
        or not same(want[run][f], got[run][f])
    }
    assert not changed, f"outputs changed: {sorted(changed)}"


@pytest.fixture(scope="module")
def runs(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    models = {name: folder for name, (_, folder) in hf_models.items()}
    return root, models, run_all(main, models, data_path("shakespeare"), root)


def test_every_command_writes_the_same_files_as_before_the_shared_core(runs):
    _compare("commands", runs[2])


def test_the_pair_mask_trains_to_the_same_mask_as_before_the_shared_core(runs):
    root, models, _ = runs
    text = data_path("shakespeare")
    got = pair_mask_fingerprints(models["llama"], root / "train-qk-stream", text)
    _compare("pair_mask", {"train_pair_mask": got})
