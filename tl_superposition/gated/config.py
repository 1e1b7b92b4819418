"""``GatedAttentionConfig``: the shape and wiring of a :class:`GatedAttentionBlock`.

Saved as ``cfg.json`` beside the block's ``weights.safetensors`` (SAELens style). The training
settings (alpha, learning rate, ...) live in
:class:`~tl_superposition.gated.train.GatedTrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tl_superposition.core.config import Config

POSITIONAL = ("none", "rotary")
INITS = ("xavier", "duplicate", "copy")
BIAS_INITS = ("zeros", "xavier")


@dataclass
class GatedAttentionConfig(Config):
    """Shape of a gated attention block and where it attaches to a model.

    Attributes:
        d_model: width of the input and the output (the residual stream).
        n_heads: query heads of the block (``expansion_factor x source_n_heads``).
        d_head: dimension of each head's queries, keys and values.
        n_key_value_heads: key/value heads (grouped-query attention: query head ``i`` uses key
            head ``i // (n_heads // n_key_value_heads)``); None means ``n_heads``.
        positional: ``"none"`` (absolute positions already in the input, as in GPT-2, or none
            at all, as in the toys) or ``"rotary"`` (queries and keys rotated as in Llama).
        rotary_dim: rotated dimensions per head (rotary only).
        rotary_adjacent_pairs: rotate adjacent pairs (GPT-J style) instead of halves.
        rotary_base: base of the rotary frequencies, used when the tables are not copied from
            a model.
        n_ctx: longest context (length of the rotary tables).
        attn_scale: scores are ``q.k / attn_scale``; None means ``sqrt(d_head)``.
        qkv_bias: learn ``b_Q``, ``b_K``, ``b_V`` (GPT-2 and the toys have them).
        bias_init: starting ``b_Q``, ``b_K``, ``b_V`` of a fresh block: ``"zeros"``, or
            ``"xavier"`` -- Xavier-normal draws on the ``[n_heads, d_head]`` bias tensors
            (standard deviation ``sqrt(2 / (n_heads + d_head))``), as cmathw/gated-attn's
            ``ModifiedAttention`` draws them. With ``W_V`` normalised, ``b_V`` sets a fresh
            head's output scale, so this changes how training starts (docs/methods.md).
        out_bias: learn ``b_O``.
        normalize_ov: L2-normalise each ``W_V`` column over ``d_model`` and each ``W_O`` row
            over ``d_model`` at every forward (the method; without it the gates could shrink
            while values grow). False only for exact copies of a layer.
        init: how :meth:`GatedAttentionBlock.from_layer` initialised the weights: ``"xavier"``
            (fresh Xavier-normal), ``"duplicate"`` (the layer's heads repeated
            ``expansion_factor`` times plus Xavier-normal noise) or ``"copy"`` (an exact copy
            with open gates).
        expansion_factor: block heads per original head.
        source_n_heads: heads of the replaced layer.
        layer: index of the replaced layer.
        input_hook: hook (under ``blocks.{layer}.``) holding the block's input, e.g.
            ``"ln1.hook_normalized"``, or ``"hook_resid_pre"`` for models without normalisation.
        target_hook: hook (under ``blocks.{layer}.``) that the block reproduces and replaces.
        model_name: name of the model the block was made for (informational).
        seed: seed of the initialisation.
    """

    d_model: int
    n_heads: int
    d_head: int
    n_key_value_heads: int | None = None
    positional: str = "none"
    rotary_dim: int | None = None
    rotary_adjacent_pairs: bool = False
    rotary_base: float = 10000.0
    n_ctx: int = 2048
    attn_scale: float | None = None
    qkv_bias: bool = True
    bias_init: str = "zeros"
    out_bias: bool = True
    normalize_ov: bool = True
    init: str = "xavier"
    expansion_factor: int = 2
    source_n_heads: int | None = None
    layer: int | None = None
    input_hook: str = "ln1.hook_normalized"
    target_hook: str = "hook_attn_out"
    model_name: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_head", "n_ctx", "expansion_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_key_value_heads < 1 or self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_key_value_heads ({self.n_key_value_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        if self.positional == "rotary":
            if self.rotary_dim is None:
                self.rotary_dim = self.d_head
            if not 0 < self.rotary_dim <= self.d_head or self.rotary_dim % 2:
                raise ValueError(
                    f"rotary_dim must be even and in 1..d_head ({self.d_head}), "
                    f"got {self.rotary_dim}"
                )
        if self.attn_scale is None:
            self.attn_scale = math.sqrt(self.d_head)
        if self.attn_scale <= 0:
            raise ValueError(f"attn_scale must be > 0, got {self.attn_scale}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.bias_init not in BIAS_INITS:
            raise ValueError(f"bias_init must be one of {BIAS_INITS}, got {self.bias_init!r}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        assert self.n_key_value_heads is not None
        return self.n_heads // self.n_key_value_heads

    def shape_fields(self) -> dict[str, Any]:
        """The fields that fix the weights' shapes and meaning (compared on load)."""
        keys = (
            "d_model",
            "n_heads",
            "d_head",
            "n_key_value_heads",
            "positional",
            "rotary_dim",
            "qkv_bias",
            "out_bias",
        )
        return {k: getattr(self, k) for k in keys}
