"""QK training with dead-feature resampling, run by ``tests/test_distributed.py`` alone and
under ``torchrun`` (``python tests/distributed_worker.py MODEL_FOLDER TEXT OUT``)."""

from __future__ import annotations

import sys

import torch

from tl_superposition.activations import pack_text
from tl_superposition.core import distributed
from tl_superposition.models import load_model
from tl_superposition.qk import MemorySource, QKTrainConfig, QKTranscoder, train_qk
from tl_superposition.qk.config import AttentionShape


def main(model_folder: str, text: str, out: str) -> None:
    world = distributed.init()
    model = load_model(model_folder)
    tokens = pack_text(model, text, context_size=16, split="valid", max_contexts=40)
    source = MemorySource(model, tokens, AttentionShape.from_model(model, 1))
    qkt = QKTranscoder.for_model(model, 1, d_hidden=48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # features that cannot fire: resampled on schedule
        qkt.q_dict.W_enc[:, :8] = 0
        qkt.k_dict.W_enc[:, :8] = 0
    cfg = QKTrainConfig(
        max_tokens=16 * 8 * 12, batch_contexts=8, lr=3e-3, sparsity_coeff=1e-3,
        log_every_steps=1, dead_window_tokens=256, resample_every_tokens=512,
        resample_until_frac=0.8,
    )  # fmt: skip
    train_qk(qkt, model, source, cfg, out, progress=False)
    distributed.close(world)


if __name__ == "__main__":
    main(*sys.argv[1:4])
