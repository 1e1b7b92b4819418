"""Studies of gated blocks: training until a toy task is relearnt, restarts in the toy
command, and the alpha sweep on a real layer."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import data_path

from tl_superposition.cli import main
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.sweep import (
    below_original,
    best_fve_below_original,
    point_dir,
    sweep_table,
    write_sweep,
)
from tl_superposition.toys import gated_runs
from tl_superposition.toys.check import solely_encoded, spliced_accuracy
from tl_superposition.toys.gated_runs import ToyRunOptions, run_toy
from tl_superposition.toys.models import superposed_skip_trigram_model
from tl_superposition.toys.settings import SETTINGS
from tl_superposition.toys.train import ToyTrainConfig

TINY = {"n_train": 1000, "n_check": 1000, "batch_size": 250, "plots": False, "progress": False,
        "toy_config": ToyTrainConfig(lr=5e-3, max_epochs=2, loss_positions="all")}  # fmt: skip


def test_spliced_accuracy_is_the_checks_accuracy_with_every_head():
    model = superposed_skip_trigram_model()
    data = SETTINGS["2H/3ST"].dataset(2000, seed=1)
    block = GatedAttentionBlock.from_layer(model, 0, 2, seed=0)
    for blocks in ({}, {0: block}):
        got = spliced_accuracy(model, data, blocks)
        want = solely_encoded(model, data, blocks).table.set_index("task_name")["accuracy"]
        assert got.to_list() == pytest.approx(want.loc[got.index].to_list()), blocks


def test_until_learnt_stages_resume_exactly_and_stop_once_relearnt(tmp_path, monkeypatch):
    setting = SETTINGS["2H/3ST"]
    whole = run_toy(setting, 0, tmp_path / "whole", ToyRunOptions(epochs=3, **TINY))
    staged = run_toy(setting, 0, tmp_path / "staged", ToyRunOptions(epochs=3, until_learnt=1,
                                                                    **TINY))  # fmt: skip
    assert staged["gated_epochs_trained"] == 3 and staged["gated_steps"] == whole["gated_steps"]
    a = GatedAttentionBlock.load(tmp_path / "whole" / "2H-3ST" / "seed0" / "gated" / "block")
    b = GatedAttentionBlock.load(tmp_path / "staged" / "2H-3ST" / "seed0" / "gated" / "block")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(bool((sa[k] == sb[k]).all()) for k in sa)  # stages resume bit for bit

    calls = []
    monkeypatch.setattr(gated_runs, "_learnt", lambda *a: calls.append(1) or len(calls) == 2)
    early = run_toy(setting, 0, tmp_path / "early", ToyRunOptions(epochs=5, until_learnt=1,
                                                                  restarts=2, **TINY))  # fmt: skip
    assert early["gated_epochs_trained"] == 2 and early["relearnt"] is True
    assert early["gated_steps"] == 2 * 1000 // 250 and len(calls) == 2
    restarts = pd.read_csv(tmp_path / "early" / "2H-3ST" / "seed0" / "restarts.csv")
    assert restarts["seed"].to_list() == [0, 1000] and restarts["chosen"].sum() == 1
    assert restarts.loc[restarts["chosen"], "restart"].item() == early["restart_chosen"]


def test_the_toy_table_shows_restarts_and_stages(tmp_path):
    args = ["toy", "--settings", "2H/3ST", "--seeds", "0", "--epochs", "2", "--until-learnt",
            "1", "--restarts", "2", "--n-train", "1000", "--n-check", "1000", "--batch-size",
            "500", "--toy-max-epochs", "2", "--no-plots", "--no-progress", "--out",
            str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    text = (tmp_path / "tables.md").read_text()
    assert "| epochs trained | relearnt | restarts removing it | kept restart |" in text


def test_toy_command_refuses_restarts_of_a_two_layer_setting(tmp_path, capsys):
    assert main(["toy", "--settings", "2L/3ST", "--restarts", "2", "--out", str(tmp_path)]) == 2
    assert "--restarts is for one-layer settings" in capsys.readouterr().err
    assert main(["toy", "--until-learnt", "-1", "--out", str(tmp_path)]) == 2
    assert "--until-learnt >= 0" in capsys.readouterr().err


def _point(out, alpha, fve, mean_heads, share_multi):
    summary = {
        "alpha": alpha, "alpha_warmup_steps": 10, "steps": 100, "fve": fve,
        "loss_change": 0.01, "ioi_logit_diff": 4.0, "ioi_logit_diff_spliced": 2.0,
        "before": {"mean_heads": 1.6, "share_multi": 0.3, "active_pairs": 50},
        "after": {"mean_heads": mean_heads, "share_multi": share_multi, "active_pairs": 60},
    }  # fmt: skip
    point_dir(out, alpha).mkdir(parents=True)
    (point_dir(out, alpha) / "summary.json").write_text(json.dumps(summary))


def test_the_sweep_table_and_the_best_fit_below_the_original_coattention(tmp_path):
    _point(tmp_path, 0.1, 0.7, 2.0, 0.4)  # more co-attention than the original
    _point(tmp_path, 1.0, 0.5, 1.4, 0.25)  # less on both measures
    _point(tmp_path, 0.75, 0.62, 1.5, 0.31)  # fewer heads per pair, more shared pairs
    table = sweep_table(tmp_path)
    assert math.isnan(table["alpha"][0]) and table["alpha"][1:].to_list() == [0.1, 0.75, 1.0]
    assert table["fve"][0] == 1.0 and table["ioi_kept"][1:].to_list() == [0.5] * 3
    assert below_original(table)["alpha"].to_list() == [1.0]
    assert best_fve_below_original(table) == 0.5
    assert best_fve_below_original(table[table["alpha"] != 1.0]) is None
    write_sweep(tmp_path)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "sweep.csv").shape == (4, table.shape[1])


def test_train_gated_sweeps_alphas_resumes_and_refuses_other_settings(hf_models, tmp_path, capsys):
    text = data_path("shakespeare")
    out = tmp_path / "sweep"
    args = ["train-gated", "--model", str(hf_models["llama"][1]), "--layer", "1", "--out",
            str(out), "--source", str(text), "--split", "valid", "--eval-source", str(text),
            "--eval-split", "test", "--context-size", "32", "--max-tokens", "256",
            "--max-eval-tokens", "64", "--epochs", "1", "--batch-contexts", "4", "--n-ioi", "2",
            "--alpha-warmup-steps", "1"]  # fmt: skip
    assert main([*args, "--alphas", "0,0.5"]) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert table["alpha"].to_list()[1:] == [0.0, 0.5] and (out / "tradeoff.png").is_file()
    s0 = json.loads((point_dir(out, 0) / "summary.json").read_text())
    s5 = json.loads((point_dir(out, 0.5) / "summary.json").read_text())
    assert (s0["alpha"], s5["alpha"], s5["alpha_warmup_steps"]) == (0.0, 0.5, 1)
    assert main([*args, "--alphas", "0.5,1"]) == 0  # 0.5 is read back, 1 is added
    assert pd.read_csv(out / "sweep.csv")["alpha"].to_list()[1:] == [0.0, 0.5, 1.0]
    capsys.readouterr()
    assert main([*args, "--lr", "0.01", "--alphas", "2"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert main([*args, "--alphas", "a"]) == 2
    assert "--alphas must be comma-separated numbers" in capsys.readouterr().err


def test_a_toy_rerun_with_other_data_sizes_is_not_answered_from_the_old_run(tmp_path, capsys):
    args = ["toy", "--settings", "2H/3ST", "--seeds", "0", "--epochs", "1", "--n-check",
            "1000", "--toy-max-epochs", "2", "--no-plots", "--no-progress", "--out",
            str(tmp_path)]  # fmt: skip
    assert main([*args, "--n-train", "1000"]) == 0
    row = json.loads((tmp_path / "2H-3ST" / "seed0" / "summary.json").read_text())
    assert (row["n_train"], row["n_check"], row["batch_size"]) == (1000, 1000, 1000)
    capsys.readouterr()
    assert main([*args, "--n-train", "2000"]) == 2  # the block's checkpoint holds other data
    assert "data source differ" in capsys.readouterr().err
