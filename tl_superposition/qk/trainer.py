"""Training of QK transcoders: :func:`train_qk`.

One optimisation step takes a batch of whole contexts from a :mod:`.source`, runs both
dictionaries on ``ln1.hook_normalized``, and minimises :func:`.loss.qk_loss` with Adam
(linear warm-up, constant, linear decay), global gradient-norm clipping and a linear warm-up
of the sparsity coefficient. Dead features are tracked over a window of tokens and resampled
on a schedule (:mod:`.resample`).

Output folder::

    out_dir/
      checkpoint.pt         everything needed to resume (weights, Adam, data position, RNG)
      history.csv           one row per logged step (loss terms, L0, dead fractions, lr)
      train_config.json     the QKTrainConfig and the source description
      qk_transcoder.json, q/, k/   the trained pair (QKTranscoder.load(out_dir)), at the end

The optimisation itself is the shared :class:`~tl_superposition.core.training.Trainer` (this
module supplies the loss of a step and the resampling after it); checkpoints are in the shared
format (:mod:`tl_superposition.core.checkpoint`, kind ``"qk"``), written atomically every
``checkpoint_every_steps`` steps, at the end and on ``KeyboardInterrupt``. A run restarted on
the same folder resumes from the checkpoint and reaches exactly the weights an uninterrupted
run reaches: the data order depends only on (seed, epoch, batch index), the learning rates
only on the step, and the optimiser, the firing counters and the resampling generator are
restored.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.core import distributed
from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.checkpoint import identity_mismatches, load_checkpoint, save_checkpoint
from tl_superposition.core.training import Trainer, warmup_decay
from tl_superposition.qk.attention import layer_attention
from tl_superposition.qk.config import QKTrainConfig
from tl_superposition.qk.dictionaries import init_from_data
from tl_superposition.qk.loss import QKLoss, qk_loss
from tl_superposition.qk.resample import FiringTracker, resample_dead
from tl_superposition.qk.source import ContextSource, Part, QKBatch, check_reads
from tl_superposition.qk.transcoder import QKOutput, QKTranscoder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
TRAIN_CONFIG = "train_config.json"
#: The format of QK checkpoints before the shared one (:mod:`tl_superposition.core.checkpoint`).
LEGACY_FORMAT = "tl_superposition.qk.checkpoint/1"
#: Contexts read to estimate the data means that initialise the biases.
MEAN_CONTEXTS = 64


@dataclass
class TrainResult:
    """What :func:`train_qk` did.

    Attributes:
        transcoder: the (trained or partly trained) QK transcoder.
        history: one row per logged step: step, tokens, lr, sparsity_coeff, the loss terms
            (:class:`.loss.QKLoss`), l0_q, l0_k (mean active features per token in the
            batch), dead_q, dead_k (fractions dead over the window), resampled_q/_k (features
            resampled so far).
        steps: optimisation steps done in total (this call and earlier ones).
        tokens: training tokens seen in total.
        seconds: wall time of this call's training loop.
        tokens_per_s: training tokens per second in this call.
        finished: whether ``max_tokens`` were reached.
        out_dir: the output folder, if any.
    """

    transcoder: QKTranscoder
    history: pd.DataFrame
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    finished: bool
    out_dir: Path | None = None


def lr_factor(step: int, total: int, cfg: QKTrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: warm-up, flat, decay."""
    return warmup_decay(step, total, cfg.warmup_frac, cfg.decay_frac, cfg.lr_end_frac)


def sparsity_factor(step: int, total: int, cfg: QKTrainConfig) -> float:
    """Multiplier of lambda at ``step``: a linear warm-up over ``sparsity_warmup_frac``."""
    warm = int(cfg.sparsity_warmup_frac * total)
    return min(1.0, (step + 1) / warm) if warm else 1.0


def _batch_stream(
    source: ContextSource, batch_contexts: int, epoch: int, start: int, part: Part = None
) -> Iterator[tuple[int, int, dict[int, QKBatch]]]:
    """``(epoch, batch index, {layer: batch})`` from ``(epoch, start)`` on, across epochs
    forever (with ``part``, this rank's rows of each batch)."""
    while True:
        n = 0
        for batch in source.layer_batches(batch_contexts, epoch, start, part):
            yield epoch, start + n, batch
            n += 1
        if n == 0 and start == 0:
            raise ValueError("the source yields no batch: it holds too few contexts")
        epoch, start = epoch + 1, 0


@torch.no_grad()
def data_means(
    source: ContextSource, batch_contexts: int, n_contexts: int = MEAN_CONTEXTS
) -> dict[int, dict[str, torch.Tensor]]:
    """Mean ``x``, flattened ``q`` and flattened ``k`` of every layer of ``source`` over the
    first ``n_contexts`` contexts of epoch 0 (at least one batch).

    Returns:
        ``{layer: {"x": [d_model], "q": [n_heads * d_head], "k": [n_key_value_heads *
        d_head]}}``.
    """
    sums: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in source.shapes}
    count = 0
    for _, _, batches in _batch_stream(source, batch_contexts, 0, 0):
        for layer, batch in batches.items():
            for name in ("x", "q", "k"):
                t = getattr(batch, name).flatten(2) if name != "x" else batch.x
                s = t.double().sum((0, 1))
                sums[layer][name] = sums[layer][name] + s if name in sums[layer] else s
        x = next(iter(batches.values())).x
        count += x.shape[0] * x.shape[1]
        if count >= n_contexts * x.shape[1]:
            break
    return {
        layer: {k: (v / count).float() for k, v in layer_sums.items()}
        for layer, layer_sums in sums.items()
    }


def _check_setup(qkt: QKTranscoder, model: HookedTransformer, source: ContextSource) -> None:
    qkt.check_model(model)
    check_reads(source, qkt.shape)


IDENTITY = {"qk_config": "transcoder config", "train_config": "training config",
            "source": "data source"}  # fmt: skip


def _legacy(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(identity, state)`` of a checkpoint written before the shared format."""
    if raw.get("format") != LEGACY_FORMAT:
        return None
    identity = {k: raw[k] for k in IDENTITY}
    return identity, {k: v for k, v in raw.items() if k not in IDENTITY and k != "format"}


def _load_checkpoint(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The state in the checkpoint at ``path``, refused if it holds another run."""
    identity, state = load_checkpoint(path, "qk", _legacy)
    mismatches = identity_mismatches(identity, expected, IDENTITY)
    if mismatches:
        raise ValueError(
            f"{path} holds a run with another {', '.join(mismatches)}: resume it with the same "
            "settings, or train into a new folder (or pass overwrite=True / --overwrite)"
        )
    return state


class _Run:
    """The mutable state of one layer's training run, which is what a checkpoint holds."""

    def __init__(
        self,
        qkt: QKTranscoder,
        model: HookedTransformer,
        source: ContextSource,
        cfg: QKTrainConfig,
        out: Path | None,
    ) -> None:
        self.qkt, self.cfg, self.out = qkt, cfg, out
        self.world = distributed.current()
        self.module: Any = qkt  # the module the forward pass runs: DDP-wrapped under torchrun
        if self.world.distributed:
            ids = [qkt.q_dict.W_dec.device] if qkt.q_dict.W_dec.is_cuda else None
            self.module = torch.nn.parallel.DistributedDataParallel(qkt, device_ids=ids)
        self.source_description = source.description()
        self.attn = layer_attention(model, qkt.shape.layer)
        self.tokens_per_step = cfg.batch_contexts * source.context_size
        total = max(1, math.ceil(cfg.max_tokens / self.tokens_per_step))
        self.trainer = Trainer(
            torch.optim.Adam(qkt.parameters(), lr=cfg.lr, betas=cfg.adam_betas),
            total,
            lr_at=lambda step: cfg.lr * lr_factor(step, total, cfg),
            clip=None if cfg.grad_clip is None else (qkt.parameters(), cfg.grad_clip),
        )
        self.trackers = {
            "q": FiringTracker(qkt.cfg.d_hidden_q),
            "k": FiringTracker(qkt.cfg.d_hidden_k),
        }
        self.gen = torch.Generator().manual_seed(cfg.seed + 17)
        self.means: dict[str, torch.Tensor] = {}
        self.loop: dict[str, int] = dict.fromkeys(
            ("epoch", "batch", "tokens", "resampled_q", "resampled_k"), 0
        )

    @property
    def total(self) -> int:
        return self.trainer.total

    @property
    def steps(self) -> int:
        return self.trainer.step

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.history

    @property
    def finished(self) -> bool:
        return self.trainer.finished

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch index)`` of the next batch this run trains on."""
        return self.loop["epoch"], self.loop["batch"]

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        return {
            "qk_config": self.qkt.cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "source": self.source_description,
        }

    def resume_or_start(self, overwrite: bool) -> bool:
        """Load the checkpoint in the output folder (True), or prepare a new run (False)."""
        out = self.out
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        if out is not None and (out / CHECKPOINT).is_file() and not overwrite:
            distributed.barrier(self.world)  # every rank sees the folder before rank 0 writes
            self.load_state_dict(_load_checkpoint(out / CHECKPOINT, self.identity()))
            log.info("resuming %s at step %d", out, self.steps)
            return True
        distributed.barrier(self.world)
        if out is not None and self.world.main:
            config = {"train": self.cfg.to_dict(), "source": self.source_description}
            write_json_atomic(out / TRAIN_CONFIG, config)
        return False

    def start(self, means: dict[str, torch.Tensor]) -> None:
        """Initialise the biases from the layer's data means (a new run)."""
        self.means = means
        norm = self.cfg.decoder_init_norm
        with torch.no_grad():
            init_from_data(self.qkt.q_dict, means["x"], means["q"], decoder_norm=norm)
            init_from_data(self.qkt.k_dict, means["x"], means["k"], decoder_norm=norm)

    def save(self) -> None:
        if self.out is not None and self.world.main:
            save_checkpoint(self.out / CHECKPOINT, "qk", self.identity(), self.state_dict())
            with atomic_path(self.out / HISTORY) as tmp:
                pd.DataFrame(self.history).to_csv(tmp, index=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.trainer.state_dict(),
            **self.loop,
            "weights": {k: v.detach().clone() for k, v in self.qkt.state_dict().items()},
            "trackers": {k: t.state_dict() for k, t in self.trackers.items()},
            "generator": self.gen.get_state(),
            "means": self.means,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qkt.load_state_dict(state["weights"])
        self.trainer.load_state_dict(state)
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state["trackers"][name])
        self.gen.set_state(state["generator"])
        self.means = state["means"]
        self.loop = {k: int(state[k]) for k in self.loop}

    def step(self, epoch: int, index: int, batch: QKBatch) -> dict[str, Any] | None:
        """One optimisation step on ``batch``; the logged row on logging steps, else None."""
        loop, cfg = self.loop, self.cfg
        _, row = self.trainer.run_step(
            lambda step: _step_loss(self.module, self.qkt, self.attn, batch, step, self.total, cfg)
        )
        loop.update(epoch=epoch, batch=index + 1)
        loop["tokens"] += self.tokens_per_step
        out = row.pop("_out")
        same = {k: row.pop(k) for k in ("lr", "sparsity_coeff")}
        row: dict[str, Any] = same | distributed.mean_over_ranks(row, self.world)  # whole batch
        row.update(
            _dead_and_resample(
                self.qkt,
                self.trackers,
                batch,
                out,
                loop,
                self.trainer.optimizer,
                self.means,
                self.gen,
                cfg,
                self.world,
            )
        )
        for side in ("q", "k"):
            loop[f"resampled_{side}"] += int(row[f"resampled_{side}"])
            row[f"resampled_{side}"] = loop[f"resampled_{side}"]
        if self.steps % cfg.log_every_steps and not self.finished:
            return None
        row = {"step": self.steps, "tokens": loop["tokens"], **row}
        self.trainer.log(row)
        log.info("layer %d step %d: %s", self.qkt.shape.layer, self.steps, row)
        return row

    def result(self, seconds: float, steps_here: int) -> TrainResult:
        """The :class:`TrainResult` of this run after a call that did ``steps_here`` steps."""
        return TrainResult(
            transcoder=self.qkt,
            history=pd.DataFrame(self.history),
            steps=self.steps,
            tokens=self.loop["tokens"],
            seconds=seconds,
            tokens_per_s=steps_here * self.tokens_per_step / seconds if seconds > 0 else 0.0,
            finished=self.finished,
            out_dir=self.out,
        )


def _l0(f: torch.Tensor) -> float:
    return float((f > 0).float().sum(-1).mean())


def train_qk(
    qkt: QKTranscoder,
    model: HookedTransformer,
    source: ContextSource,
    cfg: QKTrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``qkt`` in place on ``source`` (Wynroe & Sharkey 2024; see :mod:`.loss`).

    Args:
        qkt: the transcoder to train (new: its biases are initialised from the data means).
        model: the model whose layer ``qkt`` belongs to (its attention module computes the
            patterns; its weights are not changed).
        source: whole-context batches (:class:`.source.StoreSource`,
            :class:`.source.ModelSource` or :class:`.source.MemorySource`) that read the
            transcoder's layer (and possibly others, which are ignored).
        cfg: hyperparameters (default :class:`QKTrainConfig()`).
        out_dir: folder for checkpoints, history and the final transcoder; a folder holding
            a checkpoint of the same run is resumed from it. ``None``: nothing is written and
            nothing can be resumed.
        overwrite: start afresh even if ``out_dir`` holds a checkpoint (of any run).
        stop_after_steps: return (after writing a checkpoint) once this call has done this
            many steps; a later call resumes. ``None``: run to ``max_tokens``.
        progress: show a tqdm bar with the loss terms, L0 and dead fractions.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: ``qkt``, ``model`` and ``source`` disagree on the layer's shape, the
            source holds less than one batch, or ``out_dir`` holds a checkpoint of another
            run (and not ``overwrite``).
    """
    out = None if out_dir is None else Path(out_dir)
    results = _train(
        {qkt.shape.layer: (qkt, out)}, model, source, cfg or QKTrainConfig(), overwrite,
        stop_after_steps, progress,
    )  # fmt: skip
    return results[qkt.shape.layer]


def train_qk_layers(
    qkts: Sequence[QKTranscoder],
    model: HookedTransformer,
    source: ContextSource,
    cfg: QKTrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> dict[int, TrainResult]:
    """Train the transcoders of several layers together on one source.

    Every step reads one batch of the same contexts for all layers (one forward pass of a
    :class:`.source.ModelSource`, one read of a collection of several layers) and takes one
    step per layer, each exactly the step :func:`train_qk` would take for that layer alone:
    the result of a layer is the result of training it alone on the same source. Layers
    resume independently (each from its own checkpoint); a layer that is ahead skips the
    batches it has already seen.

    Args:
        qkts: one transcoder per layer (distinct layers of ``model``).
        model, source, cfg, overwrite, stop_after_steps, progress: as :func:`train_qk`;
            ``source`` reads every layer of ``qkts``.
        out_dir: the run's folder: layer ``L`` is written into ``out_dir/layer_L``
            (:func:`layer_folder`), laid out as :func:`train_qk`'s folder.

    Returns:
        ``{layer: TrainResult}``.

    Raises:
        ValueError: no transcoder or two for one layer, and the errors of :func:`train_qk`.
    """
    layers = [q.shape.layer for q in qkts]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"give one transcoder per layer, got layers {layers}")
    runs = {
        q.shape.layer: (q, None if out_dir is None else layer_folder(out_dir, q.shape.layer))
        for q in qkts
    }
    cfg = cfg or QKTrainConfig()
    return _train(runs, model, source, cfg, overwrite, stop_after_steps, progress)


def layer_folder(out_dir: str | os.PathLike, layer: int) -> Path:
    """Where :func:`train_qk_layers` writes layer ``layer`` of the run in ``out_dir``."""
    return Path(out_dir) / f"layer_{int(layer)}"


def _train(
    runs_in: dict[int, tuple[QKTranscoder, Path | None]],
    model: HookedTransformer,
    source: ContextSource,
    cfg: QKTrainConfig,
    overwrite: bool,
    stop_after_steps: int | None,
    progress: bool,
) -> dict[int, TrainResult]:
    """The loop behind :func:`train_qk` and :func:`train_qk_layers`."""
    device = torch.device(cfg.device)
    world = distributed.current()
    if cfg.batch_contexts % world.size:
        raise ValueError(
            f"batch_contexts {cfg.batch_contexts} does not split over {world.size} processes: "
            "give a multiple of the process count"
        )
    part = (world.rank, world.size) if world.distributed else None
    for qkt, _ in runs_in.values():
        _check_setup(qkt, model, source)
        qkt.to(device)
    runs = {L: _Run(qkt, model, source, cfg, out) for L, (qkt, out) in runs_in.items()}
    new = [L for L, run in runs.items() if not run.resume_or_start(overwrite)]
    if new:
        means = data_means(source, cfg.batch_contexts)
        for layer in new:
            runs[layer].start(means[layer])
    todo = [run for run in runs.values() if not run.finished]
    steps_here = dict.fromkeys(runs, 0)
    t0 = time.perf_counter()
    first = min((run.position for run in todo), default=(0, 0))
    bar = tqdm(
        total=max(run.total for run in runs.values()),
        initial=min(run.steps for run in runs.values()),
        unit="step",
        disable=not progress,
        desc="train-qk" if len(runs) == 1 else f"train-qk {len(runs)} layers",
    )
    stream = _batch_stream(source, cfg.batch_contexts, *first, part=part)
    for run in runs.values():
        run.qkt.train()
    done_here = 0
    try:
        while todo and (stop_after_steps is None or done_here < stop_after_steps):
            epoch, index, batches = next(stream)
            for run in todo:
                if run.position > (epoch, index):
                    continue  # resumed ahead of the others
                batch = QKBatch(*(t.to(device) for t in batches[run.qkt.shape.layer]))
                row = run.step(epoch, index, batch)
                steps_here[run.qkt.shape.layer] += 1
                if row is not None and len(runs) == 1:
                    bar.set_postfix(_postfix(row))
                if run.steps % cfg.checkpoint_every_steps == 0:
                    run.save()
            todo = [run for run in todo if not run.finished]
            done_here += 1
            bar.update(1)
    except KeyboardInterrupt:
        for run in runs.values():
            run.save()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    for run in runs.values():
        run.save()
        run.qkt.eval()
        if run.finished and run.out is not None and world.main:
            run.qkt.save(run.out)
    distributed.barrier(world)
    return {L: run.result(seconds, steps_here[L]) for L, run in runs.items()}


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    return {
        "loss": f"{row['total']:.3f}",
        "kl": f"{row['kl_full']:.3f}",
        "klq": f"{row['kl_q']:.3f}",
        "klk": f"{row['kl_k']:.3f}",
        "l0q": f"{row['l0_q']:.0f}",
        "l0k": f"{row['l0_k']:.0f}",
        "dead": f"{row['dead_q']:.2f}/{row['dead_k']:.2f}",
    }


def _step_loss(
    module: Any,
    qkt: QKTranscoder,
    attn: Any,
    batch: QKBatch,
    step: int,
    total: int,
    cfg: QKTrainConfig,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one step at 0-based ``step`` and the logged values (the output under
    ``"_out"``); the :class:`~tl_superposition.core.training.Trainer` does the rest.
    ``module`` runs the forward pass: ``qkt`` itself, or its DDP wrapper (which averages the
    gradients over ranks)."""
    lr = cfg.lr * lr_factor(step, total, cfg)
    lam = cfg.sparsity_coeff * sparsity_factor(step, total, cfg)
    out: QKOutput = module(batch.x)
    loss: QKLoss = qk_loss(
        attn,
        batch.q,
        batch.k,
        out,
        qkt.q_dict.W_dec,
        qkt.k_dict.W_dec,
        sparsity=qkt.cfg.sparsity,
        sparsity_coeff=lam,
        kl_full_weight=cfg.kl_full_weight,
        kl_mixed_weight=cfg.kl_mixed_weight,
        sqrt_eps=cfg.sqrt_eps,
    )
    return loss.total, {
        "lr": lr,
        "sparsity_coeff": lam,
        **loss.items(),
        "l0_q": _l0(out.q_features),
        "l0_k": _l0(out.k_features),
        "_out": out,
    }


def _dead_and_resample(
    qkt: QKTranscoder,
    trackers: dict[str, FiringTracker],
    batch: QKBatch,
    out: QKOutput,
    loop: dict[str, Any],
    opt: torch.optim.Optimizer,
    means: dict[str, torch.Tensor],
    gen: torch.Generator,
    cfg: QKTrainConfig,
    world: distributed.World,
) -> dict[str, Any]:
    """Update the firing counters; resample dead features when the schedule says so. Under
    torchrun the counters see every rank's rows and the resampling draws from the whole batch,
    identically on every rank."""
    tokens = loop["tokens"]
    for name, f in (("q", out.q_features), ("k", out.k_features)):
        fired = (f.detach().reshape(-1, f.shape[-1]) > 0).any(0)
        trackers[name].update(distributed.any_rank(fired, world)[None].float(), tokens)
    every = cfg.resample_every_tokens
    tokens_per_step = batch.x.shape[0] * batch.x.shape[1] * world.size
    due = (
        every > 0
        and tokens // every > (tokens - tokens_per_step) // every
        and tokens <= cfg.resample_until_frac * cfg.max_tokens
    )
    row: dict[str, Any] = {}
    for name, sae, y, y_hat in (
        ("q", qkt.q_dict, batch.q, out.q),
        ("k", qkt.k_dict, batch.k, out.k),
    ):
        dead = trackers[name].dead(tokens, cfg.dead_window_tokens)
        row[f"dead_{name}"] = float(dead.float().mean())
        n = 0
        if due and dead.any():
            x = distributed.gather_rows(batch.x, world).reshape(-1, batch.x.shape[-1])
            err = distributed.gather_rows(y - y_hat.detach(), world).reshape(x.shape[0], -1)
            n = resample_dead(
                sae,
                dead,
                x,
                err,
                means["x"].to(x.device),
                enc_norm=cfg.resample_enc_norm,
                generator=gen,
                optimizer=opt,
            )
            trackers[name].reset(dead, tokens)
            log.info("resampled %d dead %s features at %d tokens", n, name, tokens)
        row[f"resampled_{name}"] = n
    return row
