"""A gated attention block for one layer of a real model, end to end: :func:`train_gated`.

The Python function behind ``tl-superposition train-gated``. It trains a
:class:`~tl_superposition.gated.block.GatedAttentionBlock` to reproduce ``blocks.L.hook_attn_out``
from ``blocks.L.ln1.hook_normalized`` on one text source (the layer's inputs and outputs
computed once and kept in memory; or streamed, the model running up to the layer on every
batch; or read from a ``collect`` folder), checkpointing as it goes (calling it again on the
same folder resumes), then splices it in on held-out text and reports the fraction of variance
explained, the loss change, the IOI logit-difference change and the co-attention statistics
before and after (Mathwin, Akar & Sharkey 2024's gated attention blocks).

Output folder: ``block/`` (cfg.json, weights.safetensors), ``checkpoint.pt``, ``history.csv``,
``summary.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from tl_superposition.core import distributed
from tl_superposition.core.atomic import write_json_atomic, write_text_atomic
from tl_superposition.core.config import Config
from tl_superposition.gated.config import INITS


@dataclass
class GatedLayerConfig(Config):
    """What :func:`train_gated` trains on and how (the ``train-gated`` options).

    Attributes:
        layer: the attention layer to replace.
        eval_source: held-out text (file, folder or dataset name) for the report.
        source: training text (file, folder or dataset name); not needed with ``acts``.
        split: split (file-name prefix) of ``source``.
        acts: a ``collect`` folder holding the layer's ``ln1.hook_normalized`` and
            ``hook_attn_out``, read instead of running the model on ``source``.
        stream: run the model up to the layer on every batch instead of keeping the training
            pairs in memory (memory: 2 x 4 x d_model bytes per training token).
        eval_split: split of ``eval_source``.
        context_size: tokens per context.
        max_tokens, max_eval_tokens: training and held-out tokens.
        expansion_factor: block heads per original head.
        init: how the block's heads start (:data:`~tl_superposition.gated.config.INITS`
            but ``"copy"``).
        alpha, alpha_warmup_steps, lr, epochs: the block's training
            (:class:`~tl_superposition.gated.train.GatedTrainConfig`).
        batch_contexts: contexts per step.
        seed: the block's initialisation and the order of the batches.
        n_ioi: IOI prompts for the logit-difference figure (0: skip it).
        threshold: attention at which a head counts as active.
        checkpoint_every_steps: steps between checkpoints.
        device: where the block trains.

    Raises:
        ValueError: a field out of range, or neither ``source`` nor ``acts``.
        FileNotFoundError: ``acts`` is not a collect folder.
    """

    layer: int
    eval_source: str
    source: str | None = None
    split: str | None = None
    acts: str | None = None
    stream: bool = False
    eval_split: str | None = None
    context_size: int = 128
    max_tokens: int = 200_000
    max_eval_tokens: int = 32_768
    expansion_factor: int = 2
    init: str = "duplicate"
    alpha: float = 0.05
    alpha_warmup_steps: int = 0
    lr: float = 1e-3
    epochs: int = 2
    batch_contexts: int = 8
    seed: int = 0
    n_ioi: int = 128
    threshold: float = 0.1
    checkpoint_every_steps: int = 200
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"--layer must be >= 0, got {self.layer}")
        if self.acts is None and self.source is None:
            raise ValueError("give --source (text to stream) or --acts (a collect folder)")
        for name in ("context_size", "max_tokens", "max_eval_tokens", "expansion_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if self.batch_contexts < 1 or self.alpha < 0 or self.lr <= 0 or self.n_ioi < 0:
            raise ValueError("need --batch-contexts >= 1, --alpha >= 0, --lr > 0, --n-ioi >= 0")
        if self.alpha_warmup_steps < 0:
            raise ValueError("--alpha-warmup-steps must be >= 0")
        if not 0 < self.threshold <= 1:
            raise ValueError("--threshold must be in (0, 1]")
        if self.init not in INITS or self.init == "copy":
            raise ValueError(f"--init must be one of {[i for i in INITS if i != 'copy']}")
        if self.acts is not None and not (Path(self.acts) / "manifest.json").is_file():
            raise FileNotFoundError(
                f"--acts {self.acts} is not a collect folder (no manifest.json)"
            )


def _training_source(model: Any, cfg: GatedLayerConfig, input_hook: str) -> Any:
    """The block's ``(input, target)`` batches: a collection, the model streamed, or pairs
    computed once (lazily: not at all when a finished run resumes)."""
    from tl_superposition.gated.sources import (
        LazyTensorBatches,
        ModelBatches,
        StoreBatches,
        layer_activations,
        text_contexts,
    )

    if cfg.acts is not None:
        return StoreBatches(cfg.acts, cfg.layer, cfg.batch_contexts, cfg.seed)
    assert cfg.source is not None  # GatedLayerConfig asks for one of them
    tokens = text_contexts(model, cfg.source, cfg.split, cfg.context_size, cfg.max_tokens)
    if cfg.stream:
        return ModelBatches(model, cfg.layer, tokens, cfg.batch_contexts, cfg.seed)

    def make() -> tuple[Tensor, Tensor]:
        return layer_activations(
            model, tokens, cfg.layer, input_hook, batch_size=cfg.batch_contexts, progress=True
        )

    shape = (*tokens.shape, model.cfg.d_model)
    return LazyTensorBatches(make, shape, cfg.batch_contexts, shuffle=True, seed=cfg.seed)


def train_gated(
    model: Any, cfg: GatedLayerConfig, out: str | os.PathLike, model_name: str | None = None
) -> dict[str, Any]:
    """Train (or resume) a gated block for ``cfg.layer`` of ``model``, splice it in on held-out
    text and write the output folder (module docstring).

    Args:
        model: a ``HookedTransformer`` (its weights are not changed).
        cfg: the run (:class:`GatedLayerConfig`).
        out: output folder (created; resumed when it holds a checkpoint of the same run).
        model_name: how ``summary.json`` names the model (default: ``model.cfg.model_name``).

    Returns:
        The summary written to ``summary.json``: the run's settings, steps, throughput, the
        final loss terms and :func:`~tl_superposition.gated.evaluate.evaluate_splice`'s report.

    Raises:
        ValueError: the layer does not exist, or ``out`` holds a checkpoint of another run.
    """
    from tl_superposition.gated.block import GatedAttentionBlock
    from tl_superposition.gated.evaluate import evaluate_splice
    from tl_superposition.gated.sources import text_contexts
    from tl_superposition.gated.train import GatedTrainConfig, train_gated_block
    from tl_superposition.ioi import make_ioi_dataset

    if not 0 <= cfg.layer < model.cfg.n_layers:
        raise ValueError(f"--layer must be in 0..{model.cfg.n_layers - 1}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    block = GatedAttentionBlock.from_layer(
        model, cfg.layer, cfg.expansion_factor, cfg.init, cfg.seed
    )
    eval_tokens = text_contexts(
        model, cfg.eval_source, cfg.eval_split, cfg.context_size, cfg.max_eval_tokens
    )
    source = _training_source(model, cfg, block.cfg.input_hook)
    train_cfg = GatedTrainConfig(
        alpha=cfg.alpha,
        alpha_warmup_steps=cfg.alpha_warmup_steps,
        lr=cfg.lr,
        epochs=cfg.epochs,
        log_every_steps=20,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
    )
    t0 = time.perf_counter()
    result = train_gated_block(block.to(cfg.device), source, train_cfg, out)
    train_s = time.perf_counter() - t0
    world = distributed.current()
    if not world.main:  # under torchrun rank 0 saves and evaluates
        return distributed.broadcast_object({}, world)
    block.save(out / "block")
    write_text_atomic(out / "history.csv", result.history.to_csv(index=False))
    ioi = make_ioi_dataset(model, cfg.n_ioi, seed=0) if cfg.n_ioi else None
    report = evaluate_splice(model, block, eval_tokens, ioi=ioi, threshold=cfg.threshold)
    tokens_per_step = cfg.batch_contexts * cfg.context_size
    summary = {
        "model": model.cfg.model_name if model_name is None else model_name,
        "layer": cfg.layer,
        "block_heads": block.cfg.n_heads,
        "init": cfg.init,
        "alpha": cfg.alpha,
        "alpha_warmup_steps": cfg.alpha_warmup_steps,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "steps": result.steps,
        "train_tokens_per_epoch": source.n_batches * tokens_per_step,
        "train_seconds_this_call": round(train_s, 1),
        "tokens_per_s": round(
            (result.steps - result.resumed_from) * tokens_per_step / max(train_s, 1e-9), 1
        ),
        "final_mse": float(result.history["mse"].iloc[-1]),
        "final_penalty": float(result.history["penalty"].iloc[-1]),
        **report,
    }
    write_json_atomic(out / "summary.json", summary)
    return distributed.broadcast_object(summary, world)
