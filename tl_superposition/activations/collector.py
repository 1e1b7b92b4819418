"""``collect()``: run a model over a text source and stream hook activations to disk.

Layout of an output folder::

    out_dir/
      manifest.json              settings, shapes, dtypes, source, versions, progress, shards
      attention.safetensors      per-layer rotary tables for pattern recomputation (if q and k
                                 of a rotary model are collected)
      shard_00000.safetensors    "tokens": int32 [n, context_size], and one tensor per hook,
      shard_00001.safetensors    [n, context_size, ...hook dims] (patterns: [n, heads, ctx, ctx])
      ...

Every shard holds ``shard_contexts`` contexts (the last one may hold fewer); shard boundaries and
forward batches depend only on the settings, so a resumed run writes the same bytes as an
uninterrupted one. Every file is written atomically; ``manifest.json`` is rewritten after each
shard with the running token count, and a restart skips the contexts already on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tl_superposition._atomic import atomic_path, write_json_atomic
from tl_superposition.activations.patterns import attention_params, rotary_tables
from tl_superposition.activations.sources import iter_contexts, resolve_source
from tl_superposition.dtypes import parse_dtype

log = logging.getLogger(__name__)

FORMAT = "tl_superposition.activations/1"
MANIFEST = "manifest.json"
ATTENTION_FILE = "attention.safetensors"
SHARD_PATTERN = "shard_{:05d}.safetensors"
_SHARD_RE = re.compile(r"^shard_\d{5}\.safetensors$")

#: The hooks the collector is built for (any other hook point of the model also works).
SHORT_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_z",
    "attn.hook_pattern",
    "hook_attn_out",
)

#: Storage dtypes of shards (names for :func:`tl_superposition.dtypes.parse_dtype`).
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


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

    def line(self) -> str:
        """One-line human summary."""
        return (
            f"collected {self.new_tokens:,} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tok/s); {self.out_dir} holds {self.n_tokens:,} tokens "
            f"({self.n_contexts:,} contexts, {self.n_shards} shards, "
            f"{self.bytes / 2**20:,.1f} MiB)"
            + (
                f", resumed after {self.resumed_from_contexts:,} contexts"
                if self.resumed_from_contexts
                else ""
            )
        )


# --------------------------------------------------------------------------------------
# validation helpers


def resolve_hooks(
    model: Any, hooks: str | Sequence[str], layers: int | Sequence[int] | None = None
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
    n_layers = model.cfg.n_layers
    out: list[str] = []
    for h in hooks:
        names: list[str]
        if _BLOCK_RE.match(h) or h in model.hook_dict:
            names = [h]
        elif layers is not None:
            names = [f"blocks.{layer}.{h}" for layer in layers]
        else:
            raise ValueError(
                f"hook {h!r} is not a hook of this model; give a full name like "
                f"'blocks.0.{h}' or pass layers= (--layers) to expand short names"
            )
        for name in names:
            m = _BLOCK_RE.match(name)
            if m:
                layer = int(m.group(1))
                if not 0 <= layer < n_layers:
                    raise ValueError(
                        f"hook {name!r}: layer {layer} out of range, model has {n_layers} "
                        f"layers (0-{n_layers - 1})"
                    )
            if name not in model.hook_dict:
                short = m.group(2) if m else name
                raise ValueError(
                    f"hook {name!r}: unknown hook name {short!r} for this model; supported "
                    f"block hooks include {list(SHORT_HOOKS)} (see model.hook_dict for all)"
                )
            if name not in out:
                out.append(name)
    return out


def _stop_layer(hooks: Iterable[str], n_layers: int) -> int | None:
    deepest = -1
    for h in hooks:
        m = _BLOCK_RE.match(h)
        if m:
            deepest = max(deepest, int(m.group(1)))
        elif not h.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
            return None  # e.g. ln_final: the full model is needed
    return deepest + 1 if deepest + 1 < n_layers + 1 else None


def _model_fingerprint(model: Any) -> str:
    """A cheap hash of the model: its config shape and the first values of every weight."""
    h = hashlib.sha256()
    cfg = model.cfg
    for key in (
        "model_name",
        "n_layers",
        "d_model",
        "n_heads",
        "d_head",
        "n_ctx",
        "d_vocab",
        "positional_embedding_type",
        "normalization_type",
    ):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
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


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot create output folder {out_dir}: permission denied") from exc
    except FileExistsError as exc:
        raise FileExistsError(f"output path {out_dir} exists and is not a folder") from exc
    except OSError as exc:
        raise PermissionError(f"cannot create output folder {out_dir}: {exc.strerror}") from exc
    if not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"output folder {out_dir} is not writable ({exc.strerror}); choose another out_dir"
        ) from exc


def _our_file(name: str) -> bool:
    return (
        name in (MANIFEST, ATTENTION_FILE)
        or bool(_SHARD_RE.match(name))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _remove_temp_files(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink()


def _check_disk(out_dir: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed + (16 << 20):
        raise RuntimeError(
            f"not enough disk space in {out_dir} for {what}: needs {needed / 2**20:,.1f} MiB, "
            f"{free / 2**20:,.1f} MiB free. Free some space or choose another out_dir; "
            "completed shards are kept and a rerun resumes after them."
        )


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now"
        for k in keys
        if old.get(k) != new.get(k)
    ]


# --------------------------------------------------------------------------------------
# main entry point


def collect(
    model: Any,
    source: Any = None,
    hooks: str | Sequence[str] = ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k"),
    *,
    out_dir: str | os.PathLike,
    layers: int | Sequence[int] | None = None,
    context_size: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shard_tokens: int = 32768,
    dtype: str | torch.dtype = "float32",
    heads: Sequence[int] | None = None,
    split: str | None = None,
    column: str = "text",
    prepend_bos: bool | None = None,
    separator: str = "bos",
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> CollectSummary:
    """Collect hook activations of ``model`` over ``source`` into safetensors shards.

    One forward pass per batch records every requested hook, running only up to the deepest
    requested layer (``stop_at_layer``) under ``torch.inference_mode()``.

    Args:
        model: a ``HookedTransformer`` (with a tokenizer unless ``source`` is token ids).
        source: see :func:`tl_superposition.activations.sources.resolve_source`; default the
            built-in offline ``"pydoc"`` corpus.
        hooks: full hook names (``"blocks.15.attn.hook_q"``) and/or short names with ``layers``;
            list or comma-separated string. Stored shapes per context: ``hook_resid_pre``,
            ``ln1.hook_normalized``, ``hook_attn_out``: ``[ctx, d_model]``; ``ln1.hook_scale``:
            ``[ctx, 1]``; ``attn.hook_q``/``hook_z``: ``[ctx, n_heads, d_head]``;
            ``attn.hook_k``: ``[ctx, n_key_value_heads, d_head]``; ``attn.hook_pattern``:
            ``[len(heads), ctx, ctx]``.
        out_dir: output folder (created). Must be empty, or hold a run with the same settings
            (which is then resumed, or returned at once if complete).
        layers: layers for short hook names.
        context_size: tokens per context, BOS included (<= ``model.cfg.n_ctx``).
        batch_size: contexts per forward pass.
        max_tokens: stop after ``max_tokens // context_size`` contexts (default: whole source).
        shard_tokens: tokens per shard (rounded down to whole contexts, at least one).
        dtype: storage dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        heads: query heads to keep for ``attn.hook_pattern`` (default all).
        split, column: dataset split / text column (see ``resolve_source``).
        prepend_bos: start every context with BOS; default ``model.cfg.default_prepend_bos``.
        separator: token between documents: ``"bos"``, ``"eos"`` or ``"none"``.
        seed: recorded in the manifest; the default shuffling seed of :class:`ActivationStore`.
        device: where the forward pass runs (default the model's device).
        overwrite: delete an existing collection in ``out_dir`` instead of refusing.
        progress: show a tqdm bar (tokens, tokens/s). verbose: print the summary line.

    Returns:
        A :class:`CollectSummary`.

    Raises:
        ValueError: unknown hook or layer out of range, bad dtype/heads/sizes, context_size above
            ``n_ctx``, an empty source or missing column.
        FileNotFoundError: a source path that does not exist.
        FileExistsError: ``out_dir`` holds other data (other settings or foreign files).
        PermissionError: ``out_dir`` cannot be created or written.
        RuntimeError: not enough disk space; Hugging Face hub unreachable for a hub dataset.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cfg = model.cfg
    out_dir = Path(out_dir).expanduser()

    # ---- validate settings (cheap checks first, nothing written yet)
    if not isinstance(context_size, int) or context_size < 2:
        raise ValueError(f"context_size must be an integer >= 2, got {context_size!r}")
    if context_size > cfg.n_ctx:
        raise ValueError(
            f"context_size {context_size} is above the model's n_ctx {cfg.n_ctx}; "
            f"use context_size <= {cfg.n_ctx}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < context_size:
        raise ValueError(
            f"max_tokens {max_tokens} is below context_size {context_size}: not one context "
            "would be collected"
        )
    dtype_name, store_dtype = parse_dtype(dtype, STORAGE_DTYPES, "storage dtype")
    hook_names = resolve_hooks(model, hooks, layers)
    if separator not in ("bos", "eos", "none"):
        raise ValueError(f"separator must be 'bos', 'eos' or 'none', got {separator!r}")
    pattern_hooks = [h for h in hook_names if h.endswith("attn.hook_pattern")]
    if heads is not None:
        heads = [int(h) for h in heads]
        if not pattern_hooks:
            raise ValueError("heads= selects heads of attn.hook_pattern, which is not requested")
        bad = [h for h in heads if not 0 <= h < cfg.n_heads]
        if bad or not heads or len(set(heads)) != len(heads):
            raise ValueError(
                f"heads {heads}: need distinct head indices in 0-{cfg.n_heads - 1} "
                f"(the model has {cfg.n_heads} heads)"
            )
    shard_contexts = max(1, int(shard_tokens) // context_size)
    target_contexts = None if max_tokens is None else max_tokens // context_size

    tokenizer = getattr(model, "tokenizer", None)
    if prepend_bos is None:
        prepend_bos = bool(cfg.default_prepend_bos)
    bos_id = eos_id = None
    if tokenizer is not None:
        bos_id = tokenizer.bos_token_id
        eos_id = tokenizer.eos_token_id
        if bos_id is None:
            bos_id = eos_id
    if prepend_bos and bos_id is None:
        raise ValueError("prepend_bos=True but the model's tokenizer has no BOS or EOS token")
    sep_id = {"bos": bos_id, "eos": eos_id, "none": None}[separator]

    # ---- the source (errors for missing paths, unreachable hub, empty lists come here)
    if tokenizer is None and not isinstance(source, (torch.Tensor, np.ndarray, list, tuple)):
        raise ValueError("the model has no tokenizer: pass already tokenised data as source")
    token_source = resolve_source(
        source, tokenizer, context_size=context_size, split=split, column=column
    )
    # pre-packed contexts are taken as they are
    bos_used = bos_id if prepend_bos and token_source.contexts is None else None
    contexts_iter = iter_contexts(token_source, context_size, bos_used, sep_id)
    first = next(contexts_iter, None)  # raises here for a missing column / empty dataset
    if first is None:
        raise ValueError(
            f"the source yields no complete context of {context_size} tokens (empty or too "
            "short); give more text or a smaller context_size"
        )
    if int(first.max()) >= cfg.d_vocab or int(first.min()) < 0:
        raise ValueError(f"token ids must lie in 0-{cfg.d_vocab - 1} (the model's vocabulary)")

    # ---- shapes from a one-context dry run
    if device is None:
        device = cfg.device if cfg.device is not None else "cpu"
    device = torch.device(device)
    stop_at = _stop_layer(hook_names, cfg.n_layers)
    heads_t = torch.tensor(heads, dtype=torch.long, device=device) if heads is not None else None
    shapes: dict[str, list[int]] = {}

    def shape_hook(act: torch.Tensor, hook: Any) -> None:
        shp = list(act.shape[1:])
        if hook.name.endswith("attn.hook_pattern") and heads is not None:
            shp[0] = len(heads)
        shapes[hook.name] = shp

    with torch.inference_mode():
        model.run_with_hooks(
            torch.as_tensor(first[None], device=device),
            fwd_hooks=[(h, shape_hook) for h in hook_names],
            stop_at_layer=stop_at,
            return_type=None,
        )

    # ---- attention constants for pattern recomputation
    attention: dict[str, Any] = {}
    rotary: dict[str, torch.Tensor] = {}
    for h in hook_names:
        m = _BLOCK_RE.match(h)
        if m and m.group(2) in ("attn.hook_q", "attn.hook_rot_q"):
            layer = int(m.group(1))
            if (
                f"blocks.{layer}.attn.hook_k" in hook_names
                or f"blocks.{layer}.attn.hook_rot_k" in hook_names
            ):
                params = attention_params(model, layer)
                attention[str(layer)] = params
                if params["rotary"] and params["recomputable"]:
                    cos, sin = rotary_tables(model, layer, context_size)
                    rotary[f"blocks.{layer}.rotary_cos"] = cos.contiguous()
                    rotary[f"blocks.{layer}.rotary_sin"] = sin.contiguous()

    settings = {
        "model": getattr(cfg, "model_name", None),
        "model_fingerprint": _model_fingerprint(model),
        "hooks": hook_names,
        "heads": heads,
        "context_size": context_size,
        "batch_size": batch_size,
        "shard_contexts": shard_contexts,
        "max_tokens": max_tokens,
        "dtype": dtype_name,
        "prepend_bos": bool(bos_used is not None),
        "bos_token_id": bos_used,
        "separator_token_id": sep_id if token_source.contexts is None else None,
        "seed": seed,
        "source": token_source.description,
    }

    # ---- output folder: new, resume, or refuse
    _prepare_out_dir(out_dir)
    manifest_path = out_dir / MANIFEST
    done_shards: list[dict[str, Any]] = []
    old_complete = False
    if overwrite:
        foreign = [p.name for p in out_dir.iterdir() if not _our_file(p.name)]
        if foreign:
            raise FileExistsError(
                f"overwrite=True but {out_dir} also holds files that are not a collection "
                f"({foreign[:5]}); choose an empty or new out_dir"
            )
        for p in out_dir.iterdir():
            p.unlink()
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FileExistsError(
                f"{manifest_path} is unreadable ({exc}); use a new out_dir "
                "or overwrite=True (--overwrite)"
            ) from exc
        if old.get("format") != FORMAT or old.get("settings") != settings:
            diff = _settings_diff(old.get("settings", {}), settings) or ["format"]
            raise FileExistsError(
                f"{out_dir} already holds a collection with different settings ("
                + "; ".join(diff[:6])
                + "). Refusing to mix data: use a new out_dir, or overwrite=True (--overwrite) "
                "to replace it."
            )
        done_shards = list(old.get("shards", []))
        old_complete = bool(old.get("complete"))
        for s in done_shards:
            p = out_dir / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise RuntimeError(
                    f"shard {p} listed in the manifest is missing or has the wrong size; the "
                    "collection is damaged: rerun with overwrite=True (--overwrite)"
                )
        _remove_temp_files(out_dir)
    else:
        leftovers = [
            p.name
            for p in out_dir.iterdir()
            if not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if leftovers:
            raise FileExistsError(
                f"output folder {out_dir} is not empty ({leftovers[:5]}) and holds no "
                f"{MANIFEST}; choose an empty or new out_dir"
            )
        _remove_temp_files(out_dir)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "settings": settings,
        "hooks": {h: {"shape": shapes[h], "dtype": dtype_name} for h in hook_names},
        "tokens": {"shape": [context_size], "dtype": "int32"},
        "attention": attention,
        "model_config": {
            k: getattr(cfg, k, None)
            for k in (
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
        },
        "versions": _versions(),
        "n_contexts": sum(s["n_contexts"] for s in done_shards),
        "n_tokens": sum(s["n_contexts"] for s in done_shards) * context_size,
        "complete": False,
        "shards": done_shards,
    }
    for h in pattern_hooks:
        manifest["hooks"][h]["heads"] = heads if heads is not None else list(range(cfg.n_heads))
    n_done = manifest["n_contexts"]
    if old_complete:
        manifest["complete"] = True
        summary = _summary(out_dir, manifest, 0, n_done, time.perf_counter() - t_start)
        if verbose:
            log.info("%s is already complete with these settings: %s", out_dir, summary.line())
        return summary

    if rotary:
        with atomic_path(out_dir / ATTENTION_FILE) as tmp:
            save_file(rotary, str(tmp), metadata={"format": "pt"})
    if target_contexts is not None:
        per_ctx = context_size * 4 + sum(
            int(np.prod(s)) * store_dtype.itemsize for s in shapes.values()
        )
        _check_disk(out_dir, (target_contexts - n_done) * per_ctx, "this collection")
    write_json_atomic(manifest_path, manifest)

    # ---- resume: skip the contexts already on disk
    contexts_iter = chain([first], contexts_iter)
    if n_done:
        skipped = sum(1 for _ in islice(contexts_iter, n_done))
        if skipped < n_done:
            raise RuntimeError(
                f"the source now yields only {skipped} contexts but {n_done} "
                "are on disk: it has changed; rerun with overwrite=True"
            )

    # ---- buffers for one shard, reused shard after shard
    buffers = {h: torch.empty([shard_contexts] + shapes[h], dtype=store_dtype) for h in hook_names}
    tok_buf = torch.empty(shard_contexts, context_size, dtype=torch.int32)
    window = [0, 0]

    def make_hook(name: str):
        buf = buffers[name]
        select = heads_t if name.endswith("attn.hook_pattern") else None

        def hook(act: torch.Tensor, hook: Any) -> None:  # noqa: ARG001 (TL passes hook=)
            lo, hi = window
            if select is not None:
                act = act.index_select(1, select)
            buf[lo:hi].copy_(act)

        return hook

    fwd_hooks = [(h, make_hook(h)) for h in hook_names]
    total = None if target_contexts is None else target_contexts * context_size
    bar = tqdm(
        total=total,
        initial=n_done * context_size,
        unit="tok",
        unit_scale=True,
        desc="collect",
        disable=not progress,
        dynamic_ncols=True,
    )
    new_contexts = 0
    t_loop = time.perf_counter()
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
            shard_idx = len(done_shards)
            while target_contexts is None or n_done < target_contexts:
                want = shard_contexts
                if target_contexts is not None:
                    want = min(want, target_contexts - n_done)
                rows = list(islice(contexts_iter, want))
                if not rows:
                    break
                n = len(rows)
                tok_buf[:n] = torch.from_numpy(np.stack(rows)).to(torch.int32)
                for lo in range(0, n, batch_size):
                    hi = min(lo + batch_size, n)
                    window[0], window[1] = lo, hi
                    model(
                        tok_buf[lo:hi].to(device=device, dtype=torch.long),
                        stop_at_layer=stop_at,
                        return_type=None,
                    )
                    bar.update((hi - lo) * context_size)
                tensors = {"tokens": tok_buf[:n]}
                tensors.update({h: buffers[h][:n] for h in hook_names})
                name = SHARD_PATTERN.format(shard_idx)
                nbytes = _save_shard(out_dir / name, tensors)
                done_shards.append(
                    {"file": name, "first_context": n_done, "n_contexts": n, "bytes": nbytes}
                )
                n_done += n
                new_contexts += n
                shard_idx += 1
                manifest["n_contexts"] = n_done
                manifest["n_tokens"] = n_done * context_size
                write_json_atomic(manifest_path, manifest)
                if n < want:
                    break
    finally:
        bar.close()
    seconds = time.perf_counter() - t_loop
    if n_done == 0:
        raise ValueError("the source yielded no complete context")
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest)
    summary = _summary(
        out_dir, manifest, new_contexts * context_size, n_done - new_contexts, seconds
    )
    if verbose:
        log.info(summary.line())
    return summary


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write one shard atomically after a free-space check; returns its size in bytes."""
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    _check_disk(path.parent, needed, path.name)
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
    )


__all__ = ["collect", "CollectSummary", "resolve_hooks", "SHORT_HOOKS", "STORAGE_DTYPES"]
