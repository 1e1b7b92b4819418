"""Data-parallel runs: 2 processes (torchrun, gloo on CPU) against 1, on the same work.

- a 2-process collection writes the same files, byte for byte, as a 1-process one, and resumes
  from what either wrote;
- 2-process QK training (DDP, each rank reading half of every batch) reaches the 1-process
  weights within float32 tolerance, with the same dead-feature resampling, and resumes exactly;
- a 2-process gated block reaches the 1-process weights (a last batch of one row included);
- a 2-process trace writes the same firings, edges and tables as a 1-process one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from conftest import data_path

from tl_superposition.cli import main
from tl_superposition.qk import QKTranscoder

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def torchrun(*args: str, nproc: int = 2) -> str:
    """Run ``args`` (a module's ``-m`` and arguments, or a script) under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _collect_args(model: Path, out: Path) -> list[str]:
    return ["collect", "--model", str(model), "--source", str(data_path("shakespeare")),
            "--split", "valid", "--context-size", "16", "--layers", "0,1", "--max-tokens", "1024",
            "--shard-tokens", "128", "--no-progress", "--out", str(out)]  # fmt: skip


def test_a_two_process_collection_writes_the_same_files_and_resumes(hf_models, tmp_path):
    _, model = hf_models["gpt2"]
    assert main(_collect_args(model, tmp_path / "one")) == 0
    out = torchrun("-m", "tl_superposition", *_collect_args(model, tmp_path / "two"))
    assert out.count("collected 1,024 tokens") == 1  # one report, from rank 0
    one = _files(tmp_path / "one")
    assert len(one) == 9 and _files(tmp_path / "two") == one

    # interrupted: 3 shards in the manifest, shard 5 finished by rank 1 (its rank file)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "one", part)
    manifest = json.loads((part / "manifest.json").read_text())
    kept, five = manifest["shards"][:3], manifest["shards"][5]
    manifest |= {"shards": kept, "n_contexts": 24, "n_tokens": 384, "complete": False}
    (part / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for s in manifest_shards(tmp_path / "one")[3:]:
        if s["file"] != five["file"]:
            (part / s["file"]).unlink()
    (part / "manifest.rank1.json").write_text(json.dumps([five]))
    before = (part / five["file"]).stat().st_mtime_ns
    torchrun("-m", "tl_superposition", *_collect_args(model, part))
    assert _files(part) == one
    assert (part / five["file"]).stat().st_mtime_ns == before  # not written again


def manifest_shards(folder: Path) -> list[dict]:
    return json.loads((folder / "manifest.json").read_text())["shards"]


def _train_args(model: Path, acts: Path, out: Path, *extra: str) -> list[str]:
    return ["train-qk", "--model", str(model), "--layers", "0,1", "--acts", str(acts),
            "--context-size", "16", "--d-hidden", "24", "--batch-contexts", "4",
            "--max-tokens", "640", "--seed", "1", "--checkpoint-every", "4", "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = QKTranscoder.load(a).state_dict(), QKTranscoder.load(b).state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_two_process_qk_training_reaches_the_one_process_weights_and_resumes(hf_models, tmp_path):
    _, model = hf_models["gpt2"]
    acts = tmp_path / "acts"
    assert main(_collect_args(model, acts)) == 0
    assert main(_train_args(model, acts, tmp_path / "one")) == 0
    torchrun("-m", "tl_superposition", *_train_args(model, acts, tmp_path / "two"))
    for layer in (0, 1):
        one, two = tmp_path / "one" / f"layer_{layer}", tmp_path / "two" / f"layer_{layer}"
        assert _max_diff(one, two) < 1e-4
        h1, h2 = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
        pd.testing.assert_frame_equal(h1, h2, rtol=1e-4)
    # stopped after 4 steps and resumed, still on 2 processes: exactly the uninterrupted run
    args = _train_args(model, acts, tmp_path / "resumed")
    torchrun("-m", "tl_superposition", *args, "--stop-after-steps", "4")
    torchrun("-m", "tl_superposition", *args)
    for layer in (0, 1):
        resumed = QKTranscoder.load(tmp_path / "resumed" / f"layer_{layer}")
        assert resumed.equal(QKTranscoder.load(tmp_path / "two" / f"layer_{layer}"))


def test_dead_features_are_resampled_alike_on_two_processes(hf_models, tmp_path):
    _, model = hf_models["llama"]
    text = str(data_path("shakespeare"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = [sys.executable, str(WORKER), str(model), text, str(tmp_path / "one")]
    assert subprocess.run(alone, env=env, capture_output=True, timeout=600).returncode == 0
    torchrun(str(WORKER), str(model), text, str(tmp_path / "two"))
    h1 = pd.read_csv(tmp_path / "one" / "history.csv")
    h2 = pd.read_csv(tmp_path / "two" / "history.csv")
    assert h1.resampled_q.iloc[-1] == 8 and (h1.resampled_q == h2.resampled_q).all()
    pd.testing.assert_frame_equal(h1, h2, rtol=1e-4)
    assert _max_diff(tmp_path / "one", tmp_path / "two") < 1e-4
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["kind"] == "qk"


def test_a_two_process_gated_block_reaches_the_one_process_weights(hf_models, tmp_path):
    from tl_superposition.gated import GatedAttentionBlock

    _, model = hf_models["llama"]
    text = str(data_path("shakespeare"))
    # 21 contexts in batches of 4: the last batch has one row, which one rank trains on
    args = ["train-gated", "--model", str(model), "--layer", "1", "--source", text, "--split",
            "valid", "--eval-source", text, "--eval-split", "test", "--context-size", "32",
            "--max-tokens", "672", "--max-eval-tokens", "128", "--epochs", "2",
            "--batch-contexts", "4", "--n-ioi", "0"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun("-m", "tl_superposition", *args, "--out", str(tmp_path / "two"))
    one = GatedAttentionBlock.load(tmp_path / "one" / "block").state_dict()
    two = GatedAttentionBlock.load(tmp_path / "two" / "block").state_dict()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    h1 = pd.read_csv(tmp_path / "one" / "history.csv")
    pd.testing.assert_frame_equal(h1, pd.read_csv(tmp_path / "two" / "history.csv"), rtol=1e-5)
    assert h1.step.iloc[-1] == 12


def test_a_two_process_trace_writes_the_same_files(hf_models, tmp_path):
    from golden_runs import fingerprints  # same machine: floats must agree exactly too

    _, model = hf_models["gpt2"]
    # fixed seeds (random models answer no prompt, so per-prompt seeds would trace nothing);
    # 5 batches of 2 prompts: rank 0 traces 3, rank 1 traces 2
    args = ["trace-ioi", "--model", str(model), "--n-prompts", "10", "--pattern-thresh", "0.05",
            "--batch-size", "2", "--seeds", "1.0,1.1,1.2,1.3", "--seed-src", "any",
            "--no-circuit", "--no-plots"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun("-m", "tl_superposition", *args, "--out", str(tmp_path / "two"))
    one = fingerprints(tmp_path / "one", [tmp_path / "one"])
    two = fingerprints(tmp_path / "two", [tmp_path / "two"])
    assert len(one) == 10 and {k: two[k] for k in one if k != "summary.json"} == {
        k: v for k, v in one.items() if k != "summary.json"
    }
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two")]
    for s in summaries:  # the run's wall time and torch threads (1 per process under torchrun)
        del s["seconds"], s["threads"]
    assert summaries[0] == summaries[1] and summaries[0]["n_traced_firings"] > 100
