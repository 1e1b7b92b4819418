"""Batched restarts of a gated block: each restart as if trained alone; the lowest objective
is chosen."""

from __future__ import annotations

import pytest
import torch
from test_gated import _toy_block_source

from tl_superposition.gated import GatedAttentionBlock, GatedTrainConfig, train_gated_block
from tl_superposition.gated.restarts import train_gated_restarts
from tl_superposition.gated.train import block_objective


def test_batched_restarts_equal_separate_runs_and_the_lowest_objective_is_chosen():
    model, source = _toy_block_source()
    cfg = GatedTrainConfig(alpha=0.1, alpha_warmup_steps=4, lr=1e-2, epochs=3, log_every_steps=4)
    seeds = [0, 1, 2]
    blocks = [GatedAttentionBlock.from_layer(model, 0, 2, seed=s) for s in seeds]
    res = train_gated_restarts(blocks, source, cfg, progress=False)
    for r, seed in enumerate(seeds):
        alone = GatedAttentionBlock.from_layer(model, 0, 2, seed=seed)
        train_gated_block(alone, source, cfg, progress=False)
        a, b = alone.state_dict(), res.blocks[r].state_dict()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, seed
        assert res.objectives[r] == pytest.approx(block_objective(alone, source.x, source.y, cfg))
    losses = [o["loss"] for o in res.objectives]
    assert res.chosen == losses.index(min(losses)) and res.block is res.blocks[res.chosen]
    assert len(set(losses)) == 3  # the restarts did differ
    assert set(res.history.restart) == {0, 1, 2} and res.history.step.max() == 12


def test_restarts_of_different_blocks_are_refused():
    model, source = _toy_block_source()
    blocks = [GatedAttentionBlock.from_layer(model, 0, n, seed=0) for n in (1, 2)]
    with pytest.raises(ValueError, match="all of one config"):
        train_gated_restarts(blocks, source, GatedTrainConfig(epochs=1), progress=False)


def test_the_toy_command_keeps_the_lowest_objective_of_its_restarts(tmp_path):
    import json

    from tl_superposition.cli import main

    args = ["toy", "--settings", "2H/3ST", "--seeds", "0", "--epochs", "1", "--n-train", "2000",
            "--n-check", "2000", "--toy-max-epochs", "2", "--no-plots", "--no-progress",
            "--restarts", "3", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    row = json.loads((tmp_path / "2H-3ST" / "seed0" / "summary.json").read_text())
    losses = row["restart_objectives"]
    assert row["restarts"] == 3 and row["restart_seeds"] == [0, 1000, 2000]
    assert row["restart_chosen"] == losses.index(min(losses)) and len(row["restart_removed"]) == 3
    assert row["removed"] == row["restart_removed"][row["restart_chosen"]]
    assert main([*args[:-4], "--out", str(tmp_path)]) == 0  # one restart: not the same run
    assert "restarts" not in json.loads(
        (tmp_path / "2H-3ST" / "seed0" / "summary.json").read_text()
    )


def test_an_interrupted_restarts_run_resumes_to_the_uninterrupted_weights(tmp_path):
    model, source = _toy_block_source()
    cfg = GatedTrainConfig(alpha=0.1, lr=1e-2, epochs=3, log_every_steps=4,
                           checkpoint_every_steps=5)  # fmt: skip

    def blocks() -> list[GatedAttentionBlock]:
        return [GatedAttentionBlock.from_layer(model, 0, 2, seed=s) for s in (0, 1)]

    whole = train_gated_restarts(blocks(), source, cfg, progress=False)
    part = cfg.replace(max_steps=7)  # stops between a log row (4) and a checkpoint (5, 7)
    first = train_gated_restarts(blocks(), source, part, progress=False, checkpoint_dir=tmp_path)
    assert first.steps == 7 and (tmp_path / "restarts_checkpoint.pt").is_file()
    resumed = train_gated_restarts(blocks(), source, cfg, progress=False, checkpoint_dir=tmp_path)
    assert resumed.steps == whole.steps == 12
    for a, b in zip(whole.blocks, resumed.blocks, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.chosen == whole.chosen and resumed.objectives == whole.objectives
    # the stop at step 7 logged a row of its own; the rows both runs logged agree
    both = [4, 12]
    assert (
        resumed.history[resumed.history.step.isin(both)]
        .reset_index(drop=True)
        .equals(whole.history[whole.history.step.isin(both)].reset_index(drop=True))
    )


def test_a_restarts_checkpoint_of_other_seeds_is_refused(tmp_path):
    model, source = _toy_block_source()
    cfg = GatedTrainConfig(epochs=1, checkpoint_every_steps=2)
    one = [GatedAttentionBlock.from_layer(model, 0, 2, seed=s) for s in (0, 1)]
    train_gated_restarts(one, source, cfg, progress=False, checkpoint_dir=tmp_path)
    other = [GatedAttentionBlock.from_layer(model, 0, 2, seed=s) for s in (0, 2)]
    with pytest.raises(ValueError, match="restart seeds differ"):
        train_gated_restarts(other, source, cfg, progress=False, checkpoint_dir=tmp_path)
