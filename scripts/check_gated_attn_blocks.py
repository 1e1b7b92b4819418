"""Run this project's solely-encoded check on the blocks published with cmathw/gated-attn.

    .venv/bin/python scripts/check_gated_attn_blocks.py path/to/gated-attn

Loads the authors' stored toy models and gated blocks (``gated_attention/experiments/
saved_models/*.st`` and ``tests/test_models/gated_block_8H_5ST.st``, safetensors) into this
project's classes and checks each block on 100,000 fresh sequences (seed 1), with the
residual stream (this project's reading) and without it (the reading of their script).
Prints one line per block and a JSON object last.

With ``--export-toys DIR`` it also saves their three toy models in this project's format as
``DIR/<setting>/seed0/toy/``, so that ``tl-superposition toy --settings 4H/5ST --seeds 0
--out DIR`` trains this project's block against their reference model instead of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("repo", type=Path, help="a checkout of cmathw/gated-attn")
    parser.add_argument("--n-check", type=int, default=100_000)
    parser.add_argument(
        "--export-toys", type=Path, default=None, help="also save their toy models here"
    )
    args = parser.parse_args()

    from tl_superposition.gated.block import import_gated_attn_block
    from tl_superposition.gated.check import solely_encoded
    from tl_superposition.toys.analysis import subset_ablation
    from tl_superposition.toys.datasets import skip_trigram_dataset
    from tl_superposition.toys.models import make_toy_model, save_toy_model
    from tl_superposition.toys.settings import SETTINGS

    saved = args.repo / "gated_attention" / "experiments" / "saved_models"
    jobs = [
        ("2H/3ST", 2, 3, saved / "toy_model_2H_3ST.st", saved / "gated_block_4H_3ST.st"),
        ("3H/4ST", 3, 4, saved / "toy_model_3H_4ST.st", saved / "gated_block_6H_4ST.st"),
        ("4H/5ST", 4, 5, saved / "toy_model_4H_5ST.st", saved / "gated_block_8H_5ST.st"),
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
                for p in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                    getattr(model.blocks[0].attn, p).copy_(state[f"attn.{p}"])
            if args.export_toys is not None:
                save_toy_model(model, args.export_toys / SETTINGS[name].slug / "seed0" / "toy")
        block = import_gated_attn_block(block_path, model)
        row = {"block": name, "file": block_path.name}
        if toy_path is not None:
            row["toy model"] = solely_encoded(model, data).task_to_head()
        for label, residual in (("ours", True), ("heads only", False)):
            ab = subset_ablation(model, data, {0: block}, include_residual=residual)
            rep = solely_encoded(model, data, {0: block}, ablation=ab)
            row[f"map ({label})"] = rep.task_to_head()
            row[f"removed ({label})"] = rep.removed
        print(row)
        out.append(row)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
