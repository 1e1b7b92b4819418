"""``collect()``: run a model over a text source and stream hook activations to disk.

The steps, one function each: check the :class:`~.config.CollectConfig` against the model
(:func:`_plan`), open the source and check its first context (:func:`_open_source`), probe the
stored shapes with a one-context forward pass (:func:`probe_shapes`), open, resume or refuse
the output folder (:func:`.folder.open_out_dir`), then write the shards
(:func:`_write_shards`). The folder layout is described in :mod:`.folder`.

Every shard holds ``shard_contexts`` contexts (the last one may hold fewer); shard boundaries
and forward batches depend only on the settings, so a resumed run writes the same bytes as an
uninterrupted one. Every file is written atomically; ``manifest.json`` is rewritten after each
shard with the running token count, and a restart skips the contexts already on disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.activations import ranks
from tl_superposition.activations.config import SHORT_HOOKS, CollectConfig
from tl_superposition.activations.folder import (
    ATTENTION_FILE,
    FORMAT,
    MANIFEST,
    SHARD_PATTERN,
    Existing,
    check_disk,
    open_out_dir,
)
from tl_superposition.activations.packing import Packing, open_packing
from tl_superposition.activations.patterns import attention_params, rotary_tables
from tl_superposition.activations.sources import source_label
from tl_superposition.core import distributed
from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.hooks import block_hook
from tl_superposition.core.reading import read_json

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")

#: Model config fields recorded in the manifest.
MODEL_CONFIG_KEYS = (
    "model_name",
    "n_layers",
    "d_model",
    "n_heads",
    "n_key_value_heads",
    "d_head",
    "n_ctx",
    "d_vocab",
    "normalization_type",
    "positional_embedding_type",
)
# The fields the model fingerprint hashes, in this order: part of the hash's definition, so a
# change here makes collections written before it refuse to resume.
_FINGERPRINT_KEYS = (
    "model_name",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "n_ctx",
    "d_vocab",
    "positional_embedding_type",
    "normalization_type",
)


@dataclass
class CollectSummary:
    """What a :func:`collect` call did.

    Attributes:
        out_dir: the output folder.
        n_tokens: tokens on disk in total (contexts x context_size).
        n_contexts: contexts on disk in total.
        n_shards: shard files on disk.
        new_tokens: tokens collected by this call (0 if the folder was already complete).
        resumed_from_contexts: contexts already on disk when this call started.
        seconds: wall time of this call's collection loop (s).
        tokens_per_s: ``new_tokens / seconds`` (tokens per second, end to end).
        bytes: total size of the shard files (bytes).
        source: the source's description as recorded in the manifest (``"kind"``, and what
            identifies it: path and files, hub name, hash of strings or tokens).
    """

    out_dir: Path
    n_tokens: int
    n_contexts: int
    n_shards: int
    new_tokens: int
    resumed_from_contexts: int
    seconds: float
    tokens_per_s: float
    bytes: int
    source: dict[str, Any]

    def line(self) -> str:
        """One-line human summary."""
        return (
            f"collected {self.new_tokens:,} tokens of {source_label(self.source)} in "
            f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tok/s); {self.out_dir} holds "
            f"{self.n_tokens:,} tokens ({self.n_contexts:,} contexts, {self.n_shards} shards, "
            f"{self.bytes / 2**20:,.1f} MiB)"
            + (
                f", resumed after {self.resumed_from_contexts:,} contexts"
                if self.resumed_from_contexts
                else ""
            )
        )


# --------------------------------------------------------------------------------------
# checks against the model


def resolve_hooks(
    model: HookedTransformer,
    hooks: str | Sequence[str],
    layers: int | Sequence[int] | None = None,
) -> list[str]:
    """Full TransformerLens hook names from names and/or short names plus layers.

    ``hooks`` is a comma-separated string or a list; an entry is either a full name
    (``"blocks.15.attn.hook_q"``) or, when ``layers`` is given, a short block-level name
    (``"attn.hook_q"``) expanded for every layer. Order is kept, duplicates dropped.

    Raises:
        ValueError: unknown hook name, layer out of range, short name without layers, none given.
    """
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    hooks = list(hooks)
    if isinstance(layers, int):
        layers = [layers]
    if not hooks:
        raise ValueError(
            f"no hooks given; e.g. 'blocks.0.ln1.hook_normalized' or short names "
            f"{list(SHORT_HOOKS)} with layers"
        )
    out: list[str] = []
    for h in hooks:
        for name in _expand_hook(model, h, layers):
            if name not in out:
                out.append(name)
    return out


def _expand_hook(model: HookedTransformer, hook: str, layers: Sequence[int] | None) -> list[str]:
    """The full names one ``hooks`` entry stands for, each checked against the model."""
    if _BLOCK_RE.match(hook) or hook in model.hook_dict:
        names = [hook]
    elif layers is not None:
        names = [block_hook(layer, hook) for layer in layers]
    else:
        raise ValueError(
            f"hook {hook!r} is not a hook of this model; give a full name like "
            f"'blocks.0.{hook}' or pass layers= (--layers) to expand short names"
        )
    n_layers = model.cfg.n_layers
    for name in names:
        m = _BLOCK_RE.match(name)
        if m and not 0 <= int(m.group(1)) < n_layers:
            raise ValueError(
                f"hook {name!r}: layer {int(m.group(1))} out of range, model has {n_layers} "
                f"layers (0-{n_layers - 1})"
            )
        if name not in model.hook_dict:
            short = m.group(2) if m else name
            raise ValueError(
                f"hook {name!r}: unknown hook name {short!r} for this model; supported "
                f"block hooks include {list(SHORT_HOOKS)} (see model.hook_dict for all)"
            )
    return names


@dataclass
class _Plan:
    """A config checked against a model: the hooks to record and where to run."""

    hooks: list[str]
    heads: list[int] | None
    stop_at_layer: int | None
    device: torch.device


def _plan(model: HookedTransformer, config: CollectConfig) -> _Plan:
    """Check what needs the model (hooks, layers, n_ctx, heads); nothing runs yet.

    Raises:
        ValueError: a hook or layer the model lacks, ``context_size`` above ``n_ctx``, a head
            index out of range.
    """
    cfg = model.cfg
    if config.context_size > cfg.n_ctx:
        raise ValueError(
            f"context_size {config.context_size} is above the model's n_ctx {cfg.n_ctx}; "
            f"use context_size <= {cfg.n_ctx}"
        )
    hooks = resolve_hooks(model, config.hooks, config.layers)
    heads = list(config.heads) if config.heads is not None else None
    if heads is not None and max(heads) >= cfg.n_heads:
        raise ValueError(
            f"heads {heads}: need distinct head indices in 0-{cfg.n_heads - 1} "
            f"(the model has {cfg.n_heads} heads)"
        )
    device = config.device if config.device is not None else (cfg.device or "cpu")
    return _Plan(hooks, heads, _stop_layer(hooks), torch.device(device))


def _stop_layer(hooks: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook, or None when the whole model is needed."""
    deepest = -1
    for h in hooks:
        m = _BLOCK_RE.match(h)
        if m:
            deepest = max(deepest, int(m.group(1)))
        elif not h.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
            return None  # e.g. ln_final: the full model is needed
    return deepest + 1


# --------------------------------------------------------------------------------------
# the source


def _open_source(
    model: HookedTransformer, config: CollectConfig, source: Any
) -> tuple[Packing, Iterator[np.ndarray]]:
    """Resolve ``source`` and read its first context, so that a bad source fails here.

    Raises:
        ValueError: no tokenizer for a text source, no complete context, token ids outside the
            vocabulary (and the errors of :func:`.sources.resolve_source`).
    """
    packing = open_packing(
        model,
        source,
        context_size=config.context_size,
        split=config.split,
        column=config.column,
        prepend_bos=config.prepend_bos,
        separator=config.separator,
        mix=config.mix,  # type: ignore[arg-type]  # a dict became a ContextMix
    )
    contexts = packing.contexts()
    first = next(contexts, None)  # raises here for a missing column / empty dataset
    if first is None:
        raise ValueError(
            f"the source yields no complete context of {config.context_size} tokens (empty or "
            "too short); give more text or a smaller context_size"
        )
    d_vocab = model.cfg.d_vocab
    if int(first.max()) >= d_vocab or int(first.min()) < 0:
        raise ValueError(f"token ids must lie in 0-{d_vocab - 1} (the model's vocabulary)")
    return packing, chain([first], contexts)


# --------------------------------------------------------------------------------------
# shapes, attention constants, manifest


def probe_shapes(
    model: HookedTransformer,
    hooks: Sequence[str],
    context_size: int,
    heads: Sequence[int] | None = None,
    stop_at_layer: int | None = None,
) -> dict[str, list[int]]:
    """Per-context shape of every hook, from a forward pass on one context of token 0.

    Returns:
        ``{hook: shape without the batch dimension}``; ``attn.hook_pattern`` has
        ``len(heads)`` heads when ``heads`` is given.
    """
    shapes: dict[str, list[int]] = {}

    def record(act: torch.Tensor, hook: Any) -> None:
        shape = list(act.shape[1:])
        if hook.name.endswith("attn.hook_pattern") and heads is not None:
            shape[0] = len(heads)
        shapes[hook.name] = shape

    tokens = torch.zeros(1, context_size, dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(h, record) for h in hooks],
            stop_at_layer=stop_at_layer,
            return_type=None,
        )
    return shapes


def _attention_constants(
    model: HookedTransformer, hooks: Sequence[str], context_size: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """For every layer whose q and k are both collected: its :func:`attention_params` and,
    for rotary models, its cos/sin tables (``{"blocks.{L}.rotary_cos": [ctx, rotary_dim]}``)."""
    attention: dict[str, Any] = {}
    rotary: dict[str, torch.Tensor] = {}
    for h in hooks:
        m = _BLOCK_RE.match(h)
        if not (m and m.group(2) in ("attn.hook_q", "attn.hook_rot_q")):
            continue
        layer = int(m.group(1))
        keys = {block_hook(layer, "attn.hook_k"), block_hook(layer, "attn.hook_rot_k")}
        if not keys & set(hooks):
            continue
        params = attention_params(model, layer)
        attention[str(layer)] = params
        if params["rotary"] and params["recomputable"]:
            cos, sin = rotary_tables(model, layer, context_size)
            rotary[block_hook(layer, "rotary_cos")] = cos.contiguous()
            rotary[block_hook(layer, "rotary_sin")] = sin.contiguous()
    return attention, rotary


def _settings(
    model: HookedTransformer, config: CollectConfig, plan: _Plan, packing: Packing
) -> dict[str, Any]:
    """The manifest's ``settings``: what decides the bytes written (compared on resume)."""
    return {
        "model": getattr(model.cfg, "model_name", None),
        "model_fingerprint": _model_fingerprint(model),
        "hooks": plan.hooks,
        "heads": plan.heads,
        "context_size": config.context_size,
        "batch_size": config.batch_size,
        "shard_contexts": config.shard_contexts,
        "max_tokens": config.max_tokens,
        "dtype": config.dtype,
        "prepend_bos": packing.bos_token_id is not None,
        "bos_token_id": packing.bos_token_id,
        "separator_token_id": packing.separator_token_id,
        "seed": config.seed,
        "source": packing.source.description,
        **({"mix": packing.mix.to_dict()} if packing.mix is not None else {}),
    }


def _model_fingerprint(model: HookedTransformer) -> str:
    """A cheap hash of the model: its config shape and the first values of every weight."""
    h = hashlib.sha256()
    for key in _FINGERPRINT_KEYS:
        h.update(f"{key}={getattr(model.cfg, key, None)};".encode())
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_floating_point(t):
            continue
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "tl_superposition",
        "torch",
        "transformer_lens",
        "safetensors",
        "datasets",
        "transformers",
        "sae_lens",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _manifest(
    model: HookedTransformer,
    settings: dict[str, Any],
    shapes: dict[str, list[int]],
    attention: dict[str, Any],
    existing: Existing,
) -> dict[str, Any]:
    hooks: dict[str, dict[str, Any]] = {
        h: {"shape": shapes[h], "dtype": settings["dtype"]} for h in settings["hooks"]
    }
    for h, entry in hooks.items():
        if h.endswith("attn.hook_pattern"):
            heads = settings["heads"]
            entry["heads"] = heads if heads is not None else list(range(model.cfg.n_heads))
    n_done = existing.n_contexts
    return {
        "format": FORMAT,
        "settings": settings,
        "hooks": hooks,
        "tokens": {"shape": [settings["context_size"]], "dtype": "int32"},
        "attention": attention,
        "model_config": {k: getattr(model.cfg, k, None) for k in MODEL_CONFIG_KEYS},
        "versions": _versions(),
        "n_contexts": n_done,
        "n_tokens": n_done * settings["context_size"],
        "complete": existing.complete,
        "shards": list(existing.shards),
    }


# --------------------------------------------------------------------------------------
# main entry point


def collect(model: HookedTransformer, config: CollectConfig, source: Any = None) -> CollectSummary:
    """Collect hook activations of ``model`` over ``source`` into safetensors shards.

    One forward pass per batch records every requested hook, running only up to the deepest
    requested layer (``stop_at_layer``) under ``torch.inference_mode()``. Every check (the
    config's own, then hooks, layers, ``n_ctx``, heads and the source's first context against
    the model) comes before the output folder is touched. The summary is logged (INFO).

    Example::

        config = CollectConfig(out_dir="acts/l15", hooks=["attn.hook_q", "attn.hook_k"],
                               layers=15, max_tokens=100_000, split="valid")
        summary = collect(model, config, "path/to/wikitext-2")

    Args:
        model: a ``HookedTransformer`` (with a tokenizer unless ``source`` is token ids).
        config: the settings (:class:`~.config.CollectConfig`); its checks run again here, so a
            config changed after construction is checked too.
        source: what to read (see :func:`tl_superposition.activations.sources.resolve_source`):
            default ``None``, the built-in offline ``"pydoc"`` corpus, so that a call gives the
            same data on every machine; ``"auto"`` takes WikiText-2 from the Hugging Face hub
            where it is reachable.

    Returns:
        A :class:`CollectSummary`.

    Raises:
        ValueError: a bad config field, unknown hook or layer out of range, head out of range,
            ``context_size`` above ``n_ctx``, an empty source or missing column.
        FileNotFoundError: a source path that does not exist.
        FileExistsError: ``out_dir`` holds other data (other settings or foreign files).
        PermissionError: ``out_dir`` cannot be created or written.
        RuntimeError: not enough disk space; Hugging Face hub unreachable for a hub dataset.
    """
    t_start = time.perf_counter()
    config = replace(config)
    plan = _plan(model, config)
    packing, contexts = _open_source(model, config, source)
    shapes = probe_shapes(model, plan.hooks, config.context_size, plan.heads, plan.stop_at_layer)
    attention, rotary = _attention_constants(model, plan.hooks, config.context_size)
    settings = _settings(model, config, plan, packing)

    out_dir = Path(config.out_dir)
    world = distributed.current()
    if world.distributed:
        return _collect_ranked(model, config, plan, shapes, attention, rotary, settings, contexts)
    existing = open_out_dir(out_dir, settings, config.overwrite)
    n_before = existing.n_contexts
    manifest = _manifest(model, settings, shapes, attention, existing)
    if existing.complete:
        summary = _summary(out_dir, manifest, 0, n_before, time.perf_counter() - t_start)
        log.info("%s is already complete with these settings: %s", out_dir, summary.line())
        return summary
    _begin_writing(config, shapes, rotary, manifest)
    _skip_done(contexts, n_before)
    t_loop = time.perf_counter()
    new_contexts = _write_shards(model, config, plan, shapes, contexts, manifest, out_dir)
    seconds = time.perf_counter() - t_loop
    manifest["complete"] = True
    write_json_atomic(out_dir / MANIFEST, manifest)
    summary = _summary(out_dir, manifest, new_contexts * config.context_size, n_before, seconds)
    log.info("%s", summary.line())
    return summary


def _begin_writing(
    config: CollectConfig,
    shapes: dict[str, list[int]],
    rotary: dict[str, torch.Tensor],
    manifest: dict[str, Any],
) -> None:
    """Before the first shard of a run: the rotary tables, the disk check for what is left to
    write, and the manifest."""
    out_dir = Path(config.out_dir)
    if rotary:
        with atomic_path(out_dir / ATTENTION_FILE) as tmp:
            save_file(rotary, str(tmp), metadata={"format": "pt"})
    _check_disk_for_run(config, shapes, out_dir, manifest["n_contexts"])
    write_json_atomic(out_dir / MANIFEST, manifest)


def _collect_ranked(
    model: HookedTransformer,
    config: CollectConfig,
    plan: _Plan,
    shapes: dict[str, list[int]],
    attention: dict[str, Any],
    rotary: dict[str, torch.Tensor],
    settings: dict[str, Any],
    contexts: Iterator[np.ndarray],
) -> CollectSummary:
    """:func:`collect` in one of several processes (:mod:`.ranks`): rank 0 opens the folder,
    every rank writes its shards, rank 0 merges the manifest."""
    t_start = time.perf_counter()
    world = distributed.current()
    out_dir = Path(config.out_dir)
    if world.main:
        existing = open_out_dir(out_dir, settings, config.overwrite)
        manifest = _manifest(model, settings, shapes, attention, existing)
        if not existing.complete:
            _begin_writing(config, shapes, rotary, manifest)
    distributed.barrier(world)
    if not world.main:
        manifest = _manifest(
            model, settings, shapes, attention, open_out_dir(out_dir, settings, False)
        )
    n_before = manifest["n_contexts"]
    new = 0
    if not manifest["complete"]:
        t_loop = time.perf_counter()
        new = _write_rank_shards(model, config, plan, shapes, contexts, manifest, world)
        distributed.barrier(world)
        if world.main:
            ranks.merge(out_dir, manifest)
        distributed.barrier(world)
        manifest = read_json(out_dir / MANIFEST)
        seconds = time.perf_counter() - t_loop
    else:
        seconds = time.perf_counter() - t_start
    new_tokens = sum(distributed.gather_objects(new, world)) * config.context_size
    return _summary(out_dir, manifest, new_tokens, n_before, seconds)


def _write_rank_shards(
    model: HookedTransformer,
    config: CollectConfig,
    plan: _Plan,
    shapes: dict[str, list[int]],
    contexts: Iterator[np.ndarray],
    manifest: dict[str, Any],
    world: distributed.World,
) -> int:
    """Write this rank's unfinished shards; returns the contexts it added."""
    out_dir = Path(config.out_dir)
    n_shard, target = config.shard_contexts, config.max_contexts
    done = ranks.done_shards(out_dir, manifest)
    mine = [s for s in done.values() if s["file"] not in {m["file"] for m in manifest["shards"]}]
    mine = [s for s in mine if int(s["first_context"]) // n_shard % world.size == world.rank]
    added, k, first = 0, 0, 0
    desc = f"collect rank {world.rank}"
    with _progress(config, 0, desc) as bar, _shard_runner(model, config, plan, shapes) as run:
        while target is None or first < target:
            want = n_shard if target is None else min(n_shard, target - first)
            rows = list(islice(contexts, want))
            if not rows:
                break
            name = SHARD_PATTERN.format(k)
            if k % world.size == world.rank and name not in done:
                nbytes = _save_shard(out_dir / name, run(rows, bar))
                mine.append({"file": name, "first_context": first, "n_contexts": len(rows),
                             "bytes": nbytes})  # fmt: skip
                ranks.record_shard(out_dir, world.rank, mine)
                added += len(rows)
            k, first = k + 1, first + len(rows)
            if len(rows) < want:
                break
    return added


def _check_disk_for_run(
    config: CollectConfig, shapes: dict[str, list[int]], out_dir: Path, n_done: int
) -> None:
    """With ``max_tokens`` set, check the disk holds what is left to write (before writing)."""
    if config.max_contexts is None:
        return
    itemsize = config.storage_dtype.itemsize
    per_context = config.context_size * 4 + sum(int(np.prod(s)) * itemsize for s in shapes.values())
    check_disk(out_dir, (config.max_contexts - n_done) * per_context, "this collection")


def _skip_done(contexts: Iterator[np.ndarray], n_done: int) -> None:
    """Advance ``contexts`` past the ``n_done`` contexts already on disk."""
    skipped = sum(1 for _ in islice(contexts, n_done))
    if skipped < n_done:
        raise RuntimeError(
            f"the source now yields only {skipped} contexts but {n_done} "
            "are on disk: it has changed; rerun with overwrite=True"
        )


@contextlib.contextmanager
def _shard_runner(
    model: HookedTransformer, config: CollectConfig, plan: _Plan, shapes: dict[str, list[int]]
) -> Iterator[Callable[[list[np.ndarray], Any], dict[str, torch.Tensor]]]:
    """Yield ``run(rows, bar)``: the forward passes over one shard's contexts, returning the
    shard's tensors (views of buffers reused by the next call)."""
    n_shard = config.shard_contexts
    buffers = {
        h: torch.empty([n_shard] + shapes[h], dtype=config.storage_dtype) for h in plan.hooks
    }
    tokens = torch.empty(n_shard, config.context_size, dtype=torch.int32)
    window = [0, 0]  # rows of the shard buffers that the running forward pass fills
    heads = None
    if plan.heads is not None:
        heads = torch.tensor(plan.heads, dtype=torch.long, device=plan.device)

    def make_hook(name: str):
        buf = buffers[name]
        select = heads if name.endswith("attn.hook_pattern") else None

        def hook(act: torch.Tensor, hook: Any) -> None:  # noqa: ARG001 (TL passes hook=)
            if select is not None:
                act = act.index_select(1, select)
            buf[window[0] : window[1]].copy_(act)

        return hook

    def run(rows: list[np.ndarray], bar: Any) -> dict[str, torch.Tensor]:
        n = len(rows)
        tokens[:n] = torch.from_numpy(np.stack(rows)).to(torch.int32)
        for lo in range(0, n, config.batch_size):
            window[:] = lo, min(lo + config.batch_size, n)
            model(
                tokens[window[0] : window[1]].to(device=plan.device, dtype=torch.long),
                stop_at_layer=plan.stop_at_layer,
                return_type=None,
            )
            bar.update((window[1] - window[0]) * config.context_size)
        return {"tokens": tokens[:n]} | {h: buffers[h][:n] for h in plan.hooks}

    fwd_hooks: list[tuple[str | Callable, Callable]] = [(h, make_hook(h)) for h in plan.hooks]
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
        yield run


def _progress(config: CollectConfig, n_done: int, desc: str = "collect") -> Any:
    target = config.max_contexts
    return tqdm(
        total=None if target is None else target * config.context_size,
        initial=n_done * config.context_size,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not config.progress,
        dynamic_ncols=True,
    )


def _write_shards(
    model: HookedTransformer,
    config: CollectConfig,
    plan: _Plan,
    shapes: dict[str, list[int]],
    contexts: Iterator[np.ndarray],
    manifest: dict[str, Any],
    out_dir: Path,
) -> int:
    """Run the model shard by shard and write each shard and the manifest; returns how many
    contexts this call added. Stops at ``config.max_contexts`` or when the source ends."""
    n_shard, target = config.shard_contexts, config.max_contexts
    n_done = start = manifest["n_contexts"]
    with _progress(config, n_done) as bar, _shard_runner(model, config, plan, shapes) as run:
        while target is None or n_done < target:
            want = n_shard if target is None else min(n_shard, target - n_done)
            rows = list(islice(contexts, want))
            if not rows:
                break
            _add_shard(out_dir, manifest, run(rows, bar), len(rows))
            n_done += len(rows)
            if len(rows) < want:
                break
    return n_done - start


def _add_shard(
    out_dir: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], n: int
) -> None:
    """Write the next shard, then the manifest that lists it."""
    shards = manifest["shards"]
    name = SHARD_PATTERN.format(len(shards))
    nbytes = _save_shard(out_dir / name, tensors)
    first = manifest["n_contexts"]
    shards.append({"file": name, "first_context": first, "n_contexts": n, "bytes": nbytes})
    manifest["n_contexts"] = first + n
    manifest["n_tokens"] = manifest["n_contexts"] * manifest["settings"]["context_size"]
    write_json_atomic(out_dir / MANIFEST, manifest)


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write one shard atomically after a free-space check; returns its size in bytes."""
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    check_disk(path.parent, needed, path.name)
    try:
        with atomic_path(path) as tmp:
            # One metadata key only: safetensors keeps metadata in a hash map whose order
            # varies between calls, and shards must be byte-identical across runs.
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RuntimeError(
                f"disk full while writing {path}; no partial shard was kept. Free some space "
                "and rerun to resume after the last complete shard."
            ) from exc
        raise
    return path.stat().st_size


def _summary(
    out_dir: Path, manifest: dict[str, Any], new_tokens: int, resumed: int, seconds: float
) -> CollectSummary:
    return CollectSummary(
        out_dir=out_dir,
        n_tokens=manifest["n_tokens"],
        n_contexts=manifest["n_contexts"],
        n_shards=len(manifest["shards"]),
        new_tokens=new_tokens,
        resumed_from_contexts=resumed,
        seconds=seconds,
        tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0,
        bytes=sum(s["bytes"] for s in manifest["shards"]),
        source=manifest["settings"]["source"],
    )


__all__ = ["collect", "CollectSummary", "resolve_hooks", "probe_shapes"]
