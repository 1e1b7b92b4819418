"""The ``toy`` and ``train-gated`` subcommands end to end, at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import data_path
from safetensors.torch import load_file

from tl_superposition.cli import main
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.toys.gated_runs import CROSS_LAYER_VARIANTS, ToyRunOptions, toy_block
from tl_superposition.toys.models import make_toy_model, overlap_copy_model
from tl_superposition.toys.settings import SETTINGS


def test_toy_run_options_check_sizes_and_give_the_authors_settings():
    with pytest.raises(ValueError, match="batch_size 2000 exceeds n_train 1000"):
        ToyRunOptions(n_train=1000, batch_size=2000)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        ToyRunOptions(epochs=0)
    cfg = ToyRunOptions().train_config(SETTINGS["4H/5ST"])
    assert (cfg.alpha, cfg.lr, cfg.epochs) == (0.3, 1e-3, 1000)
    assert ToyRunOptions(epochs=7).train_config(SETTINGS["2H/3ST"]).epochs == 7
    cfg = ToyRunOptions(alpha=0.05, lr=2e-3).train_config(SETTINGS["2H/3ST"])
    assert (cfg.alpha, cfg.lr, cfg.epochs) == (0.05, 2e-3, 1000)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        ToyRunOptions(alpha=-0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        ToyRunOptions(lr=0.0)
    assert ToyRunOptions(alpha_warmup_steps=500).train_config(SETTINGS["2L/3ST"]).alpha_at(250) == (
        pytest.approx(0.15)
    )


def test_toy_blocks_have_value_biases_even_over_a_hand_built_reference():
    """The hand-built copy3 model has no biases; its block must still get the authors' value
    biases (without them a normalised head writes at most its input's norm, 1), so it is
    shaped exactly as the block over a trained toy of the same size."""
    built, trained = overlap_copy_model(), make_toy_model(3, 19, seed=0)
    assert all(b.abs().sum() == 0 for b in (built.b_Q, built.b_K, built.b_V))
    cfgs = [toy_block(m, 0, SETTINGS["copy3"], seed=0).cfg.to_dict() for m in (built, trained)]
    assert (cfgs[0]["qkv_bias"], cfgs[0]["out_bias"], cfgs[0]["normalize_ov"]) == (
        True,
        False,
        True,
    )
    assert cfgs[0] == cfgs[1]


def test_toy_command_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "toy"
    args = [
        "toy",
        "--settings",
        "2H/3ST",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--n-train",
        "2000",
        "--n-check",
        "2000",
        "--toy-max-epochs",
        "2",
        "--no-plots",
        "--no-progress",
    ]
    assert main(args) == 0
    run = out / "2H-3ST" / "seed0"
    for name in (
        "toy/toy_weights.safetensors",
        "toy_check.csv",
        "toy_ablation.csv",
        "gated/checkpoint.pt",
        "gated/block/cfg.json",
        "gated_check.csv",
        "gate_map.csv",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    row = json.loads((run / "summary.json").read_text())
    assert row["gated_heads"] == 4 and row["gated_epochs"] == 1 and row["gated_steps"] == 2
    assert (row["gated_alpha"], row["gated_lr"], row["gated_bias_init"]) == (0.5, 5e-4, "zeros")
    assert "| 2H/3ST | 0 |" in (out / "tables.md").read_text()
    before = (run / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # everything on disk: nothing is recomputed
    assert (run / "summary.json").stat().st_mtime_ns == before
    assert "2H/3ST" in capsys.readouterr().out

    # another alpha into the same folder: refused before training, the saved run untouched
    assert main([*args, "--alpha", "0.05"]) == 2
    assert "alpha/alpha_warmup_steps/lr" in capsys.readouterr().err
    assert (run / "summary.json").stat().st_mtime_ns == before
    assert main([*args, "--bias-init", "xavier"]) == 2
    assert "block config" in capsys.readouterr().err
    assert (run / "summary.json").stat().st_mtime_ns == before

    # another block seed over the same reference toy model: the model is reused, not retrained
    assert main([*args[:3], "--seeds", "1", "--toy-seed", "0", *args[5:]]) == 0
    other = out / "2H-3ST" / "seed1-toy0"
    assert not (other / "toy_history.csv").exists()
    toy = [load_file(d / "toy" / "toy_weights.safetensors") for d in (run, other)]
    assert toy[0].keys() == toy[1].keys()
    assert all(torch.equal(toy[0][k], toy[1][k]) for k in toy[0])
    blocks = [GatedAttentionBlock.load(d / "gated" / "block") for d in (run, other)]
    assert not torch.equal(blocks[0].W_Q, blocks[1].W_Q)
    row = json.loads((other / "summary.json").read_text())
    assert (row["seed"], row["toy_seed"]) == (1, 0)
    assert "| 2H/3ST | 1 | 0 |" in (out / "tables.md").read_text()


def test_toy_command_two_layers_creates_nested_folders(tmp_path):
    out = tmp_path / "not" / "yet" / "there"
    args = ["toy", "--settings", "2L/3ST", "--seeds", "0", "--out", str(out), "--epochs", "1"]
    args += ["--n-train", "1000", "--n-check", "1000", "--toy-max-epochs", "1"]
    args += ["--alpha-warmup-steps", "2"]
    assert main([*args, "--no-plots", "--no-progress"]) == 0
    run = out / "2L-3ST" / "seed0"
    row = json.loads((run / "summary.json").read_text())
    assert list(row["variants"]) == list(CROSS_LAYER_VARIANTS)
    for variant in ("within-layer", "joint_cross-layer-penalty"):
        assert (run / variant / "block0" / "cfg.json").is_file(), variant
        assert (run / variant / "block1" / "cfg.json").is_file(), variant
    assert "within-layer versus cross-layer" in (out / "tables.md").read_text()
    assert (row["gated_alpha"], row["gated_alpha_warmup_steps"]) == (0.3, 2)
    assert "| 0 | 0.3 | 2 | within-layer |" in (out / "tables.md").read_text()


def test_toy_command_rejects_bad_input(tmp_path, capsys):
    assert main(["toy", "--settings", "7H/9ST", "--out", str(tmp_path)]) == 2
    assert "unknown settings" in capsys.readouterr().err
    assert main(["toy", "--seeds", "a,b", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    assert main(["toy", "--alpha", "-1", "--out", str(tmp_path)]) == 2
    assert "--alpha must be >= 0" in capsys.readouterr().err
    assert main(["toy", "--alpha-warmup-steps", "-5", "--out", str(tmp_path)]) == 2
    assert "--alpha-warmup-steps must be >= 0" in capsys.readouterr().err


def test_train_gated_command(hf_models, tmp_path):
    llama_folder = hf_models["llama"][1]
    out = tmp_path / "real"
    text = data_path("shakespeare")
    args = [
        "train-gated",
        "--model",
        str(llama_folder),
        "--layer",
        "1",
        "--out",
        str(out),
        "--source",
        str(text),
        "--split",
        "valid",
        "--eval-source",
        str(text),
        "--eval-split",
        "test",
        "--context-size",
        "32",
        "--max-tokens",
        "512",
        "--max-eval-tokens",
        "128",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--n-ioi",
        "4",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["block_heads"] == 8
    for key in ("fve", "loss_change", "ioi_change", "before", "after"):
        assert key in summary, key
    block = GatedAttentionBlock.load(out / "block")
    assert block.cfg.positional == "rotary" and block.cfg.n_key_value_heads == 4
    assert (out / "checkpoint.pt").is_file() and (out / "history.csv").is_file()
    assert main(args) == 0  # resumes from the finished checkpoint
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_train_gated_command_rejects_bad_input(tmp_path, capsys):
    base = ["train-gated", "--layer", "0", "--out", str(tmp_path), "--eval-source", "x"]
    assert main(base) == 2
    assert "--source" in capsys.readouterr().err
    assert main([*base, "--acts", str(tmp_path)]) == 2
    assert "not a collect folder" in capsys.readouterr().err
    bad_layer = ["train-gated", "--layer", "-1", "--out", str(tmp_path), "--eval-source", "x"]
    assert main([*bad_layer, "--source", "x", "--model", "no-such-model"]) == 2
    assert "--layer must be >= 0" in capsys.readouterr().err  # before any model loads


def test_bench_gated_counts_settings_removed_by_every_seed_and_by_any(tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "bench_gated.py"
    spec = importlib.util.spec_from_file_location("bench_gated", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 2H/3ST: both seeds pass; 3H/4ST: one of two; 4H/5ST: none of one
    runs = {("2H/3ST", 0): True, ("2H/3ST", 1): True, ("3H/4ST", 0): False}
    runs |= {("3H/4ST", 1): True, ("4H/5ST", 0): False}
    for (setting, seed), removed in runs.items():
        folder = tmp_path / setting.replace("/", "-") / f"seed{seed}"
        folder.mkdir(parents=True)
        row = {"setting": setting, "seed": seed, "removed": removed, "gated_epochs": 1000}
        if setting == "3H/4ST":  # 4 restarts per run, one of them removed it in seed 0
            row |= {"restarts": 4, "restart_removed": [seed == 1, False, False, seed == 0]}
        (folder / "summary.json").write_text(json.dumps(row))
    counts = bench.reproduction(tmp_path)
    assert counts["n_settings_removed"] == 1
    assert counts["n_settings_removed_any_seed"] == 2
    assert counts["seeds_per_setting"] == {"2H/3ST": 2, "3H/4ST": 2, "4H/5ST": 1}
    assert counts["seeds_removed_per_setting"] == {"2H/3ST": 2, "3H/4ST": 1, "4H/5ST": 0}
    assert counts["n_seeds"] == 1 and counts["n_toy_seeds"] == 1
    assert counts["restart_removal_rate"] == {"2H/3ST": None, "3H/4ST": 0.25, "4H/5ST": None}
    assert counts["restarts_per_setting"] == {"2H/3ST": [1], "3H/4ST": [4], "4H/5ST": [1]}
    assert bench.real_sweep(tmp_path / "missing") == {
        "real_best_fve_below_original_coattention": None,
        "real_sweep_points": None,
    }
    assert bench.reproduction(tmp_path / "missing")["n_settings_removed_any_seed"] is None
