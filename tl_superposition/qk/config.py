"""Configurations of QK transcoders and of their training, in the style of SAELens.

Each config is a dataclass whose fields are documented below, checked in ``__post_init__``
(a bad value raises :class:`ValueError` naming the field and the fix, before any work starts),
and saved as JSON beside the safetensors weights (:meth:`to_dict` / :meth:`from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from transformer_lens import HookedTransformer

from tl_superposition.core.config import Config
from tl_superposition.core.hooks import block_hook
from tl_superposition.models import nonstandard_attention

#: Sparsity penalties (and the TopK activation) a dictionary can be trained with.
SPARSITIES = ("sqrt", "l1", "topk")
Sparsity = Literal["sqrt", "l1", "topk"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class AttentionShape:
    """The attention geometry of one layer, which a QK transcoder is tied to.

    Attributes:
        layer: the layer ``L`` (input ``blocks.L.ln1.hook_normalized``, outputs
            ``blocks.L.attn.hook_q`` and ``blocks.L.attn.hook_k``).
        d_model: residual stream width (the dictionaries' ``d_in``).
        n_heads: query heads.
        n_key_value_heads: key/value heads (``n_heads`` without grouped-query attention).
        d_head: width of one head's query/key.
        positional_embedding_type: ``"standard"`` (learned absolute positions) or ``"rotary"``.
    """

    layer: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    positional_embedding_type: str = "standard"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_key_value_heads", "d_head"):
            _check(getattr(self, name) >= 1, f"AttentionShape.{name} must be >= 1")
        _check(self.layer >= 0, f"AttentionShape.layer must be >= 0, got {self.layer}")
        _check(
            self.n_heads % self.n_key_value_heads == 0,
            f"{self.n_heads} query heads cannot share {self.n_key_value_heads} key/value heads",
        )
        _check(
            self.positional_embedding_type in ("standard", "rotary"),
            f"positional_embedding_type must be 'standard' or 'rotary', "
            f"got {self.positional_embedding_type!r}",
        )

    @property
    def d_q(self) -> int:
        """Width of the flattened queries, ``n_heads * d_head``."""
        return self.n_heads * self.d_head

    @property
    def d_k(self) -> int:
        """Width of the flattened keys, ``n_key_value_heads * d_head``."""
        return self.n_key_value_heads * self.d_head

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_key_value_heads

    def hook(self, name: str) -> str:
        """Full hook name in the model, e.g. ``hook("attn.hook_q")`` -> ``blocks.L.attn.hook_q``."""
        return block_hook(self.layer, name)

    @classmethod
    def from_model(cls, model: HookedTransformer, layer: int) -> AttentionShape:
        """Read the shape of ``model``'s layer ``layer``.

        Raises:
            ValueError: the layer does not exist, or the attention is not of the form
                ``softmax(causal(rope(q) . rope(k) / attn_scale))`` with q and k computed from
                ``ln1.hook_normalized`` (ALiBi, QK-norm, soft-capping, split q/k inputs, ...).
        """
        cfg = model.cfg
        _check(
            0 <= layer < cfg.n_layers,
            f"layer {layer} does not exist: the model has layers 0..{cfg.n_layers - 1}",
        )
        problems = nonstandard_attention(cfg)
        if cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0:
            problems.append("attention score soft-capping")
        if cfg.use_split_qkv_input or cfg.use_attn_in:
            problems.append("separate q/k/v inputs (use_split_qkv_input / use_attn_in)")
        if cfg.attention_dir != "causal":
            problems.append("bidirectional attention")
        if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            problems.append(
                f"normalization_type={cfg.normalization_type!r} (no ln1.hook_normalized)"
            )
        _check(
            not problems,
            "QK transcoders need attention of the form softmax(causal(q.k / scale)) with q and "
            f"k read from ln1.hook_normalized; this model has: {', '.join(problems)}",
        )
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        if getattr(cfg, "ungroup_grouped_query_attention", False):
            n_kv = int(cfg.n_heads)  # hook_k then holds one key per query head
        return cls(
            layer=int(layer),
            d_model=int(cfg.d_model),
            n_heads=int(cfg.n_heads),
            n_key_value_heads=n_kv,
            d_head=int(cfg.d_head),
            positional_embedding_type=str(cfg.positional_embedding_type),
        )

    def check_model(self, model: HookedTransformer) -> None:
        """Raise :class:`ValueError` unless ``model`` has this shape at ``layer``.

        The message lists every field that differs, e.g. ``n_heads: transcoder 12, model 9``.
        """
        if self.layer >= model.cfg.n_layers:
            raise ValueError(
                f"the QK transcoder is for layer {self.layer}, the model has only "
                f"{model.cfg.n_layers} layers"
            )
        other = AttentionShape.from_model(model, self.layer)
        diffs = [
            f"{f.name}: transcoder {getattr(self, f.name)}, model {getattr(other, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise ValueError(
                "this QK transcoder was built for another attention shape ("
                + "; ".join(diffs)
                + "): load or train one for this model and layer"
            )


@dataclass
class QKTranscoderConfig(Config):
    """Architecture of a pair of query/key transcoders (Wynroe & Sharkey 2024).

    Attributes:
        shape: the attention geometry of the layer (:class:`AttentionShape`).
        d_hidden_q: features of the query dictionary (the authors: 2400 on GPT-2 small;
            1200 here, the documented SmolLM2 run's size).
        d_hidden_k: features of the key dictionary.
        sparsity: ``"sqrt"`` (the authors' penalty ``sum_i sqrt(f_i ||W_dec_i|| + eps)``),
            ``"l1"`` (``sum_i f_i ||W_dec_i||``), or ``"topk"`` (ReLU then keep the ``top_k``
            largest activations per token, as SAELens's TopK SAEs; no penalty).
        top_k: active features per token with ``sparsity="topk"`` (ignored otherwise).
        model_name: name of the model the dictionaries were trained on (metadata only).
    """

    shape: AttentionShape
    d_hidden_q: int = 1200
    d_hidden_k: int = 1200
    sparsity: Sparsity = "sqrt"
    top_k: int = 32
    model_name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.shape, dict):
            self.shape = AttentionShape(**self.shape)
        _check(self.d_hidden_q >= 1, f"d_hidden_q must be >= 1, got {self.d_hidden_q}")
        _check(self.d_hidden_k >= 1, f"d_hidden_k must be >= 1, got {self.d_hidden_k}")
        _check(
            self.sparsity in SPARSITIES,
            f"sparsity must be one of {SPARSITIES}, got {self.sparsity!r}",
        )
        if self.sparsity == "topk":
            _check(
                1 <= self.top_k <= min(self.d_hidden_q, self.d_hidden_k),
                f"top_k must be in 1..min(d_hidden_q, d_hidden_k), got {self.top_k}",
            )


@dataclass
class QKTrainConfig(Config):
    """Hyperparameters of :func:`tl_superposition.qk.train_qk`.

    Defaults are the settings of the documented SmolLM2 run (about 1.5M tokens on a CPU); see
    ``docs/methods.md`` for each departure from the authors' and why.

    Attributes:
        max_tokens: training tokens in total (contexts x context size); the source is cycled
            through in epochs (each with a new shuffle) until this many are used.
        batch_contexts: whole contexts per optimisation step (the loss needs every key of a
            query row, so batches are contexts, not tokens).
        lr: peak Adam learning rate (the authors: 1e-5 over 10M-100M tokens).
        adam_betas: Adam's (beta1, beta2).
        warmup_frac: fraction of the steps over which the learning rate rises linearly from 0.
        decay_frac: fraction of the steps, at the end, over which it falls linearly to
            ``lr_end_frac * lr``.
        lr_end_frac: final learning rate as a fraction of ``lr``.
        sparsity_coeff: lambda, the weight of each dictionary's sparsity penalty (per token,
            summed over features; ignored for TopK). The authors: 4e-6 with their loss scale.
        sparsity_warmup_frac: fraction of the steps over which lambda rises linearly from 0
            (SAELens's ``l1_warm_up_steps``), so features are not killed before they form.
        sqrt_eps: the ``eps`` inside the square-root penalty.
        kl_full_weight: weight of ``KL(P_true || P(q_hat, k_hat))`` (the authors: 3).
        kl_mixed_weight: weight of each mixed term ``KL(P_true || P(q_hat, k))`` and
            ``KL(P_true || P(q, k_hat))`` (the authors: 1).
        grad_clip: maximum global gradient norm (``None``: no clipping).
        decoder_init_norm: norm of every decoder row at initialisation (SAELens's
            ``decoder_init_norm``; ``None`` keeps SAELens's Kaiming-uniform rows).
        seed: seed of the initialisation, the data order and the resampling.
        dead_window_tokens: a feature is dead if it did not fire on any of the last this many
            training tokens.
        resample_every_tokens: dead features are resampled every this many tokens
            (0: never).
        resample_until_frac: no resampling after this fraction of the training.
        resample_enc_norm: norm of a resampled feature's encoder column, as a fraction of the
            mean norm of the living features' columns (Bricken et al. 2023 use 0.2; under the
            square-root penalty such weak new features are switched off at once).
        checkpoint_every_steps: steps between checkpoints (a checkpoint is also written at
            the end and on interruption).
        log_every_steps: steps between updates of the progress bar and the log.
        device: torch device of the training.
    """

    max_tokens: int = 1_536_000
    batch_contexts: int = 16
    lr: float = 2e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.02
    decay_frac: float = 0.2
    lr_end_frac: float = 0.0
    sparsity_coeff: float = 4e-3
    sparsity_warmup_frac: float = 0.05
    sqrt_eps: float = 1e-6
    kl_full_weight: float = 3.0
    kl_mixed_weight: float = 1.0
    grad_clip: float | None = 1.0
    decoder_init_norm: float | None = 0.1
    seed: int = 0
    dead_window_tokens: int = 65_536
    resample_every_tokens: int = 131_072
    resample_until_frac: float = 0.7
    resample_enc_norm: float = 1.0
    checkpoint_every_steps: int = 200
    log_every_steps: int = 10
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        _check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.batch_contexts >= 1, f"batch_contexts must be >= 1, got {self.batch_contexts}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.adam_betas), "adam_betas must be in [0, 1)")
        for name in ("warmup_frac", "decay_frac", "lr_end_frac", "sparsity_warmup_frac"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")
        _check(self.warmup_frac + self.decay_frac <= 1, "warmup_frac + decay_frac must be <= 1")
        _check(self.sparsity_coeff >= 0, "sparsity_coeff must be >= 0")
        _check(self.sqrt_eps > 0, "sqrt_eps must be > 0")
        _check(
            self.kl_full_weight >= 0 and self.kl_mixed_weight >= 0,
            "the KL weights must be >= 0",
        )
        _check(self.kl_full_weight + self.kl_mixed_weight > 0, "some KL weight must be > 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None")
        _check(
            self.decoder_init_norm is None or self.decoder_init_norm > 0,
            "decoder_init_norm must be > 0 or None",
        )
        _check(self.dead_window_tokens >= 1, "dead_window_tokens must be >= 1")
        _check(self.resample_every_tokens >= 0, "resample_every_tokens must be >= 0")
        _check(0 <= self.resample_until_frac <= 1, "resample_until_frac must be in [0, 1]")
        _check(self.resample_enc_norm > 0, "resample_enc_norm must be > 0")
        _check(self.checkpoint_every_steps >= 1, "checkpoint_every_steps must be >= 1")
        _check(self.log_every_steps >= 1, "log_every_steps must be >= 1")
