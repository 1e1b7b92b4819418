"""The query and key dictionaries, built on SAELens's ``Transcoder``.

A dictionary maps ``x = blocks.L.ln1.hook_normalized`` (``d_in = d_model``) to the flattened
queries or keys of every head (``d_out = n_heads * d_head`` or ``n_key_value_heads * d_head``)::

    f = act(x W_enc + b_enc)        # [..., d_sae] feature activations
    y = f W_dec + b_dec             # [..., d_out] reconstructed queries or keys

with ``act`` ReLU (SAELens's ``Transcoder``, architecture ``"transcoder"``) or TopK
(:class:`TopKTranscoder`, architecture ``"topk_transcoder"``, registered with SAELens when this
module is imported). Both are saved in SAELens's own format (``cfg.json`` beside
``sae_weights.safetensors``), so ``sae_lens.SAE.load_from_disk`` reads them back.

SAELens transcoders have no input-side bias (``apply_b_dec_to_input`` is refused): the
authors' ``(x - b_dec) W_enc + b_enc`` is the same map with ``b_enc - b_dec W_enc`` as the
encoder bias, which is how :func:`init_from_data` centres the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, Transcoder, TranscoderConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.topk_sae import TopK
from torch import Tensor, nn
from typing_extensions import override

from tl_superposition.core.reading import reading

TOPK_ARCHITECTURE = "topk_transcoder"


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """A :class:`sae_lens.TranscoderConfig` with a TopK activation.

    Attributes:
        k: active features per token (SAELens's ``TopKSAEConfig.k``).
    """

    k: int = 32

    @override
    @classmethod
    def architecture(cls) -> str:
        return TOPK_ARCHITECTURE

    def to_dict(self) -> dict[str, Any]:
        """SAELens's transcoder dict plus ``k``."""
        d = super().to_dict()
        d["k"] = self.k
        return d

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKTranscoderConfig:
        """Build from a ``cfg.json`` dict (unknown keys ignored, as SAELens does)."""
        base = TranscoderConfig.from_dict(config_dict)
        cfg = cls(**{**base.__dict__, "k": int(config_dict.get("k", 32))})
        cfg.metadata = base.metadata
        return cfg


class TopKTranscoder(Transcoder):
    """A SAELens ``Transcoder`` whose activation keeps the ``k`` largest ReLU pre-activations.

    The activation is SAELens's own ``TopK`` module (top ``k`` pre-activations, ReLU applied,
    every other feature zero), as in its TopK SAEs (Gao et al. 2024).
    """

    cfg: TopKTranscoderConfig  # type: ignore[assignment]

    def __init__(self, cfg: TopKTranscoderConfig):
        super().__init__(cfg)
        self.cfg = cfg

    @override
    def get_activation_fn(self):
        return TopK(self.cfg.k)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKTranscoder:
        """Build an untrained dictionary from a ``cfg.json`` dict."""
        return cls(TopKTranscoderConfig.from_dict(config_dict))


if TOPK_ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(TOPK_ARCHITECTURE, TopKTranscoder, TopKTranscoderConfig)


def make_dictionary(
    d_in: int,
    d_out: int,
    d_sae: int,
    *,
    top_k: int | None = None,
    hook_name: str = "",
    hook_name_out: str = "",
    model_name: str = "",
    dtype: str = "float32",
    device: str = "cpu",
    generator: torch.Generator | None = None,
) -> Transcoder:
    """A new dictionary: SAELens's ``Transcoder`` (ReLU) or, with ``top_k``, a TopK one.

    Weights are initialised as SAELens initialises transcoders (Kaiming-uniform encoder and
    decoder, zero biases). With ``generator`` they are redrawn from it, so the result depends
    only on its seed (SAELens's constructor still draws once from torch's global generator).

    Args:
        d_in: input width (``d_model``).
        d_out: output width (flattened queries or keys).
        d_sae: number of features.
        top_k: active features per token for a TopK dictionary; ``None`` for ReLU.
        hook_name, hook_name_out: input and output hook names, stored in the SAELens metadata.
        model_name: stored in the SAELens metadata.

    Raises:
        ValueError: a width below 1, or ``top_k`` outside ``1..d_sae``.
    """
    for name, v in (("d_in", d_in), ("d_out", d_out), ("d_sae", d_sae)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    kwargs: dict[str, Any] = dict(
        d_in=d_in, d_sae=d_sae, d_out=d_out, dtype=dtype, device=device, apply_b_dec_to_input=False
    )
    if top_k is None:
        sae: Transcoder = Transcoder(TranscoderConfig(**kwargs))
    else:
        if not 1 <= top_k <= d_sae:
            raise ValueError(f"top_k must be in 1..{d_sae}, got {top_k}")
        sae = TopKTranscoder(TopKTranscoderConfig(**kwargs, k=top_k))
    meta = sae.cfg.metadata
    meta.hook_name = hook_name
    meta.hook_name_out = hook_name_out
    meta.model_name = model_name
    if generator is not None:
        _kaiming_uniform_(sae.W_enc, generator)
        _kaiming_uniform_(sae.W_dec, generator)
    return sae


@torch.no_grad()
def _kaiming_uniform_(w: nn.Parameter, generator: torch.Generator) -> None:
    """``nn.init.kaiming_uniform_`` (a=0, fan_in = size(1)) drawn from ``generator``."""
    bound = (6.0 / w.shape[1]) ** 0.5
    noise = torch.rand(w.shape, generator=generator, dtype=w.dtype, device=generator.device)
    w.copy_((noise * 2 - 1) * bound)


@torch.no_grad()
def init_from_data(
    sae: Transcoder,
    x_mean: Float[Tensor, " d_in"],
    y_mean: Float[Tensor, " d_out"],
    *,
    decoder_norm: float | None,
) -> None:
    """Centre a new dictionary on the data: ``b_dec = mean(y)``, inputs centred on ``mean(x)``.

    The authors initialise both decoder biases to the data means. Here the output bias
    ``b_dec`` is set to the mean query/key, and the input centring ``(x - mean(x)) W_enc`` is
    folded into ``b_enc = -mean(x) W_enc`` (SAELens transcoders have no input bias). With
    ``decoder_norm``, every decoder row is rescaled to that norm (SAELens's
    ``decoder_init_norm``, 0.1 by default there), so that a new dictionary starts near the
    mean-q/k baseline instead of adding large random outputs.
    """
    sae.b_dec.copy_(y_mean.to(sae.b_dec))
    sae.b_enc.copy_(-(x_mean.to(sae.W_enc) @ sae.W_enc))
    if decoder_norm is not None:
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(decoder_norm)


def load_dictionary(path: Any, device: str = "cpu") -> Transcoder:
    """Load a dictionary saved by ``save_model`` with SAELens's own loader.

    Raises:
        ValueError: the folder holds an SAE that is not a transcoder.
    """
    with reading(path, "retrain it, or restore the folder"):
        sae = SAE.load_from_disk(str(path), device=device)
    if not isinstance(sae, Transcoder):
        raise ValueError(f"{path} holds a {type(sae).__name__}, not a SAELens Transcoder")
    return sae


def dictionary_equal(a: Transcoder, b: Transcoder) -> bool:
    """Whether two dictionaries have the same architecture, sizes and exactly equal weights."""
    if type(a) is not type(b) or a.cfg.to_dict() != b.cfg.to_dict():
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
