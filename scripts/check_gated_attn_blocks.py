"""Run this project's solely-encoded check on the blocks published with cmathw/gated-attn.

    .venv/bin/python scripts/check_gated_attn_blocks.py path/to/gated-attn

Loads the authors' stored toy models and gated blocks (``gated_attention/experiments/
saved_models/*.st`` and ``tests/test_models/gated_block_8H_5ST.st``, safetensors) into this
project's classes and checks each block on 100,000 fresh sequences (seed 1), with the
residual stream (this project's reading) and without it (the reading of their script).
Prints one line per block and a JSON object last.

Each block's training objective (MSE + alpha x gate quasi-norm, the setting's alpha) is
measured on the sequences ``tl-superposition toy`` trains on (100,000, seed 0).

With ``--export-toys DIR`` it also saves their three toy models in this project's format as
``DIR/<setting>/seed0/toy/``, so that ``tl-superposition toy --settings 4H/5ST --seeds 0
--out DIR`` trains this project's block against their reference model instead of ours.
``--ours RUN`` (repeatable) then checks such a run's block (``RUN/gated/block``, a run
folder like ``DIR/4H-5ST/seed0``) the same way, against their toy model of that setting,
so both blocks are compared on one reference model and one objective.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# the attention weights of a toy model, as their files and ours both name them
ATTN_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
TOY_FILES = {
    "2H/3ST": "toy_model_2H_3ST.st",
    "3H/4ST": "toy_model_3H_4ST.st",
    "4H/5ST": "toy_model_4H_5ST.st",
}


def same_attention(theirs: Path, ours: Path) -> bool:
    """Whether our saved toy model has exactly the attention weights of their toy model file."""
    a, b = load_file(str(theirs)), load_file(str(ours))
    return all(
        f"blocks.0.attn.{n}" in b and torch.equal(a[f"attn.{n}"], b[f"blocks.0.attn.{n}"])
        for n in ATTN_PARAMS
    )


def check_both_ways(model, data, block) -> dict:
    """The solely-encoded check with the residual stream kept ("ours") and without it."""
    from tl_superposition.toys.analysis import subset_ablation
    from tl_superposition.toys.check import solely_encoded

    row = {}
    for label, residual in (("ours", True), ("heads only", False)):
        ab = subset_ablation(model, data, {0: block}, include_residual=residual)
        rep = solely_encoded(model, data, {0: block}, ablation=ab)
        row[f"map ({label})"] = rep.task_to_head()
        row[f"removed ({label})"] = rep.removed
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("repo", type=Path, help="a checkout of cmathw/gated-attn")
    parser.add_argument("--n-check", type=int, default=100_000)
    parser.add_argument(
        "--export-toys", type=Path, default=None, help="also save their toy models here"
    )
    parser.add_argument(
        "--ours",
        type=Path,
        action="append",
        default=[],
        help="a run folder of `tl-superposition toy` trained against their toy model",
    )
    args = parser.parse_args()
    saved = args.repo / "gated_attention" / "experiments" / "saved_models"
    ours = {}
    for run in args.ours:
        summary = run / "summary.json"
        if not summary.is_file() or not (run / "gated" / "block" / "cfg.json").is_file():
            parser.error(f"--ours {run}: not a finished toy run (no summary.json or gated/block)")
        setting = json.loads(summary.read_text())["setting"]
        if setting not in TOY_FILES:
            parser.error(f"--ours {run}: setting {setting} has no published toy model")
        if not same_attention(saved / TOY_FILES[setting], run / "toy" / "toy_weights.safetensors"):
            parser.error(
                f"--ours {run}: its toy model is not their {setting} model; train it against "
                "the models --export-toys writes"
            )
        ours.setdefault(setting, []).append(run)

    from tl_superposition.gated.block import GatedAttentionBlock, import_gated_attn_block
    from tl_superposition.gated.sources import layer_activations
    from tl_superposition.gated.train import GatedTrainConfig, block_objective
    from tl_superposition.toys.check import solely_encoded
    from tl_superposition.toys.datasets import skip_trigram_dataset
    from tl_superposition.toys.gated_runs import TRAIN_SEED, ToyRunOptions
    from tl_superposition.toys.models import make_toy_model, save_toy_model
    from tl_superposition.toys.settings import SETTINGS

    jobs = [
        ("2H/3ST", 2, 3, saved / TOY_FILES["2H/3ST"], saved / "gated_block_4H_3ST.st"),
        ("3H/4ST", 3, 4, saved / TOY_FILES["3H/4ST"], saved / "gated_block_6H_4ST.st"),
        ("4H/5ST", 4, 5, saved / TOY_FILES["4H/5ST"], saved / "gated_block_8H_5ST.st"),
        (
            "4H/5ST (their end-to-end test)",
            4,
            5,
            None,
            args.repo / "tests" / "test_models" / "gated_block_8H_5ST.st",
        ),
    ]
    out = []
    for name, n_heads, k, toy_path, block_path in jobs:
        data = skip_trigram_dataset(k, args.n_check, seed=1)
        model = make_toy_model(n_heads, data.d_vocab, seed=3)
        if toy_path is not None:
            state = load_file(str(toy_path))
            with torch.no_grad():
                for p in ATTN_PARAMS:
                    getattr(model.blocks[0].attn, p).copy_(state[f"attn.{p}"])
            if args.export_toys is not None:
                save_toy_model(model, args.export_toys / SETTINGS[name].slug / "seed0" / "toy")
        blocks = {"theirs": import_gated_attn_block(block_path, model)}
        if toy_path is not None:
            for run in ours.get(name, []):
                blocks[f"ours ({run})"] = GatedAttentionBlock.load(run / "gated" / "block", model)
            toy_map = solely_encoded(model, data).task_to_head()
            train = SETTINGS[name].dataset(ToyRunOptions().n_train, TRAIN_SEED)
            x, y = layer_activations(model, train.tokens, 0, "hook_resid_pre")
            cfg = GatedTrainConfig(alpha=SETTINGS[name].alpha)
        for label, block in blocks.items():
            row = {"block": name, "file": block_path.name if label == "theirs" else label}
            if toy_path is not None:
                row["toy model"] = toy_map
                row["objective"] = block_objective(block, x, y, cfg)
            row.update(check_both_ways(model, data, block))
            print(row)
            out.append(row)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
