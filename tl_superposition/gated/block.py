"""``GatedAttentionBlock``: an attention layer whose heads are gated per (query, key) pair.

A wider attention layer (``expansion_factor x n_heads`` heads) trained to reproduce an
attention layer's output while a sparsity penalty on the gates discourages two heads from
serving the same (query, key) pair. It follows C. Mathwin, D. Akar and L. Sharkey, "Gated
Attention Blocks: Preliminary Progress toward Removing Attention Head Superposition"
(LessWrong, 2024; public code cmathw/gated-attn). With ``x`` the block's input
``[batch, pos, d_model]`` and head ``h``::

    q_h = x W_Q[h] + b_Q[h]        k_h = x W_K[h] + b_K[h]        (rotated for RoPE models)
    v_h = x norm(W_V)[h] + b_V[h]  norm(): each column of W_V, each row of W_O, unit L2 over d_model
    g_q[h] = x W_gate_Q[h] + b_gate_Q[h]        g_k[h] = x W_gate_K[h] + b_gate_K[h]    (scalars)
    gate[h, q, k]    = clamp(g_q[h](q) * g_k[h](k), 0, 1)
    pattern[h, q, k] = gate[h, q, k] * softmax_k(causal(q_h(q) . k_h(k) / attn_scale))
    out(q)           = sum_h sum_k pattern[h, q, k] v_h(k) norm(W_O)[h] + b_O

The loss (:mod:`tl_superposition.gated.train`) is ``MSE(out, target) + alpha *
mean_{b,q,k} ||gate[b, :, q, k]||_0.6``.

Hook points (TransformerLens names where one exists): ``hook_q``, ``hook_k``, ``hook_v``
``[batch, pos, heads, d_head]`` (keys and values have ``n_key_value_heads`` heads),
``hook_rot_q``, ``hook_rot_k`` (rotary only), ``hook_attn_scores`` and ``hook_pattern`` (the
ungated softmax) ``[batch, n_heads, query_pos, key_pos]``, ``hook_gate_q``, ``hook_gate_k``
``[batch, pos, n_heads]``, ``hook_gate`` and ``hook_gated_pattern`` ``[batch, n_heads,
query_pos, key_pos]``, ``hook_z`` ``[batch, pos, n_heads, d_head]``, ``hook_result`` (each
head's output) ``[batch, pos, n_heads, d_model]`` and ``hook_out`` ``[batch, pos, d_model]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule, HookPoint

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.reading import read_json, reading
from tl_superposition.core.rotary import rope_tables, rotate
from tl_superposition.gated.config import GatedAttentionConfig

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "tl_superposition.gated/1"


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last (key) dimension, spelt out: about twice as fast as
    ``torch.softmax`` on a CPU for the toys' rows of 11 keys (the key at the query's own
    position is never masked, so every row has a finite maximum)."""
    e = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
    return e / e.sum(dim=-1, keepdim=True)


class GatedAttentionBlock(HookedRootModule):
    rotary_cos: Tensor
    rotary_sin: Tensor

    """A gated, wider replacement for one attention layer (see the module docstring).

    Build one with :meth:`from_layer` (from a ``HookedTransformer`` layer) or directly from a
    :class:`GatedAttentionConfig` (Xavier-normal weights, orthogonal gate projections, zero
    biases). Call it on the layer's input ``[batch, pos, d_model]``; splice it into the model
    with :func:`tl_superposition.gated.splice.splice`.

    Parameters: ``W_Q`` ``[n_heads, d_model, d_head]``, ``W_K``, ``W_V``
    ``[n_key_value_heads, d_model, d_head]``, ``W_O`` ``[n_heads, d_head, d_model]``, ``b_Q``,
    ``b_K``, ``b_V`` (if ``qkv_bias``), ``b_O`` (if ``out_bias``), ``W_gate_Q``, ``W_gate_K``
    ``[n_heads, d_model]``, ``b_gate_Q``, ``b_gate_K`` ``[n_heads]``. Rotary blocks also hold
    their ``rotary_cos`` / ``rotary_sin`` tables as buffers.
    """

    def __init__(self, cfg: GatedAttentionConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        h, kv, d, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        assert kv is not None
        g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.W_Q = nn.Parameter(self._xavier((h, d, dh), g))
        self.W_K = nn.Parameter(self._xavier((kv, d, dh), g))
        self.W_V = nn.Parameter(self._xavier((kv, d, dh), g))
        self.W_O = nn.Parameter(self._xavier((h, dh, d), g))
        if cfg.qkv_bias:
            fresh = self._xavier if cfg.bias_init == "xavier" else lambda s, _: torch.zeros(s)
            self.b_Q = nn.Parameter(fresh((h, dh), g))
            self.b_K = nn.Parameter(fresh((kv, dh), g))
            self.b_V = nn.Parameter(fresh((kv, dh), g))
        if cfg.out_bias:
            self.b_O = nn.Parameter(torch.zeros(d))
        self.W_gate_Q = nn.Parameter(self._orthogonal((h, d), g))
        self.W_gate_K = nn.Parameter(self._orthogonal((h, d), g))
        self.b_gate_Q = nn.Parameter(torch.zeros(h))
        self.b_gate_K = nn.Parameter(torch.zeros(h))
        if cfg.positional == "rotary":
            assert cfg.rotary_dim is not None
            cos, sin = rope_tables(
                cfg.n_ctx, cfg.rotary_dim, cfg.rotary_base, cfg.rotary_adjacent_pairs
            )
            self.register_buffer("rotary_cos", cos)
            self.register_buffer("rotary_sin", sin)

        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_gate_q = HookPoint()
        self.hook_gate_k = HookPoint()
        self.hook_gate = HookPoint()
        self.hook_gated_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()
        self.hook_out = HookPoint()
        self.setup()

    # ------------------------------------------------------------------ init helpers

    @staticmethod
    def _xavier(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
        w = torch.empty(shape)
        nn.init.xavier_normal_(w, generator=g)
        return w

    @staticmethod
    def _orthogonal(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
        w = torch.empty(shape)
        nn.init.orthogonal_(w, generator=g)
        return w

    # ------------------------------------------------------------------ forward

    def normalized_W_V(self) -> Tensor:
        """``W_V`` as used in the forward (columns unit-norm over d_model if ``normalize_ov``)."""
        return F.normalize(self.W_V, dim=1) if self.cfg.normalize_ov else self.W_V

    def normalized_W_O(self) -> Tensor:
        """``W_O`` as used in the forward (rows unit-norm over d_model if ``normalize_ov``)."""
        return F.normalize(self.W_O, dim=2) if self.cfg.normalize_ov else self.W_O

    def _bias(self, name: str) -> Tensor | None:
        return getattr(self, name) if hasattr(self, name) else None

    def _project(self, x: Tensor, w: Tensor, bias_name: str) -> Tensor:
        out = torch.einsum("bpd,hde->bphe", x, w)
        b = self._bias(bias_name)
        return out if b is None else out + b

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """The block's output (the gates are in ``hook_gate``; see :meth:`forward_with_gate`)."""
        return self.forward_with_gate(x)[0]

    def forward_with_gate(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch n_heads pos pos"]]:
        """Output and gates of the block.

        Raises:
            ValueError: ``x`` is not ``[batch, pos, d_model]`` or is longer than ``n_ctx``
                (rotary blocks).
        """
        cfg = self.cfg
        if x.ndim != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"input must be [batch, pos, {cfg.d_model}], got {tuple(x.shape)}")
        n = x.shape[1]
        q = self.hook_q(self._project(x, self.W_Q, "b_Q"))
        k = self.hook_k(self._project(x, self.W_K, "b_K"))
        v = self.hook_v(self._project(x, self.normalized_W_V(), "b_V"))
        if cfg.positional == "rotary":
            if n > cfg.n_ctx:
                raise ValueError(f"context of {n} tokens exceeds the block's n_ctx {cfg.n_ctx}")
            cos, sin = self.rotary_cos, self.rotary_sin
            q = self.hook_rot_q(rotate(q, cos, sin, cfg.rotary_adjacent_pairs))
            k = self.hook_rot_k(rotate(k, cos, sin, cfg.rotary_adjacent_pairs))
        if cfg.group_size > 1:
            k = k.repeat_interleave(cfg.group_size, dim=2)
            v = v.repeat_interleave(cfg.group_size, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / float(cfg.attn_scale or 1.0)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(_softmax(scores))
        g_q = self.hook_gate_q(torch.einsum("bpd,hd->bph", x, self.W_gate_Q) + self.b_gate_Q)
        g_k = self.hook_gate_k(torch.einsum("bpd,hd->bph", x, self.W_gate_K) + self.b_gate_K)
        gate = g_q.transpose(1, 2)[:, :, :, None] * g_k.transpose(1, 2)[:, :, None, :]
        gate = self.hook_gate(gate.clamp(0.0, 1.0))
        gated = self.hook_gated_pattern(gate * pattern)
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", gated, v))
        result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.normalized_W_O()))
        out = result.sum(dim=2)
        b_o = self._bias("b_O")
        out = self.hook_out(out if b_o is None else out + b_o)
        return out, gate

    # ------------------------------------------------------------------ building from a layer

    @classmethod
    def from_layer(
        cls,
        model: Any,
        layer: int,
        expansion_factor: int = 2,
        init: str = "xavier",
        seed: int = 0,
        *,
        normalize_ov: bool | None = None,
        noise_scale: float = 1.0,
        n_ctx: int | None = None,
        qkv_bias: bool | None = None,
        out_bias: bool | None = None,
        bias_init: str = "zeros",
    ) -> GatedAttentionBlock:
        """A block shaped for ``model``'s attention layer ``layer``.

        Args:
            model: a ``HookedTransformer`` (GPT-2 style absolute positions, Llama style RoPE
                and grouped-query attention, or a toy model without normalisation).
            layer: the layer to replace.
            expansion_factor: block heads per layer head (the authors: 2).
            init: ``"xavier"`` (fresh weights, orthogonal gate projections; the method),
                ``"duplicate"`` (the layer's weights repeated, plus Xavier-normal noise times
                ``noise_scale``) or ``"copy"`` (the layer's weights repeated with ``W_O``
                divided by ``expansion_factor``, gates fixed open, no normalisation: the block
                computes exactly what the layer computes).
            seed: seed of the initialisation's ``torch.Generator``.
            normalize_ov: default True, except for ``"copy"``.
            n_ctx: length of the rotary tables (default: the model's, capped by the tables
                the layer holds).
            qkv_bias, out_bias: learn those biases (default: where the layer has non-zero
                ones; toys and GPT-2 have query/key/value biases, Llama none).
            bias_init: ``"zeros"`` or ``"xavier"``, the starting query/key/value biases of
                an ``"xavier"`` block (:attr:`GatedAttentionConfig.bias_init`).

        Raises:
            ValueError: an unknown layer or init, or an attention variant the block does not
                reproduce (ALiBi, soft-capping, QK-norm, ... -- see
                :func:`tl_superposition.models.nonstandard_attention`).
        """
        from tl_superposition.models import nonstandard_attention

        mcfg = model.cfg
        if not 0 <= layer < mcfg.n_layers:
            raise ValueError(f"layer {layer} out of range 0..{mcfg.n_layers - 1}")
        problems = nonstandard_attention(mcfg)
        pos_type = mcfg.positional_embedding_type
        if pos_type not in ("standard", "rotary"):
            problems.append(f"positional embedding {pos_type!r}")
        if problems:
            raise ValueError(f"layer {layer}: the gated block does not reproduce {problems}")
        attn = model.blocks[layer].attn
        w = _layer_weights(attn)
        scale = attn.attn_scale
        scale = float(scale.item() if isinstance(scale, Tensor) else scale)
        rotary = pos_type == "rotary"
        if rotary:
            table_len = int(attn.rotary_cos.shape[0])
            n_ctx = min(n_ctx or mcfg.n_ctx, table_len, mcfg.n_ctx)
        nonzero = lambda *names: any(bool(w[n].abs().sum() > 0) for n in names)  # noqa: E731
        cfg = GatedAttentionConfig(
            d_model=mcfg.d_model,
            n_heads=expansion_factor * mcfg.n_heads,
            d_head=mcfg.d_head,
            n_key_value_heads=expansion_factor * w["W_K"].shape[0],
            positional="rotary" if rotary else "none",
            rotary_dim=mcfg.rotary_dim if rotary else None,
            rotary_adjacent_pairs=bool(getattr(mcfg, "rotary_adjacent_pairs", False)),
            n_ctx=n_ctx or mcfg.n_ctx,
            attn_scale=scale,
            qkv_bias=nonzero("b_Q", "b_K", "b_V") if qkv_bias is None else qkv_bias,
            bias_init=bias_init,
            out_bias=nonzero("b_O") if out_bias is None else out_bias,
            normalize_ov=(init != "copy") if normalize_ov is None else normalize_ov,
            init=init,
            expansion_factor=expansion_factor,
            source_n_heads=mcfg.n_heads,
            layer=layer,
            input_hook="hook_resid_pre"
            if mcfg.normalization_type is None
            else "ln1.hook_normalized",
            model_name=getattr(mcfg, "model_name", None),
            seed=seed,
        )
        g = torch.Generator().manual_seed(seed)
        block = cls(cfg, generator=g)
        if rotary:
            with torch.no_grad():
                block.rotary_cos.copy_(attn.rotary_cos[: cfg.n_ctx].float())
                block.rotary_sin.copy_(attn.rotary_sin[: cfg.n_ctx].float())
        if init != "xavier":
            block._load_duplicates(w, expansion_factor, init, noise_scale, g)
        return block.to(w["W_Q"].device)

    def _load_duplicates(
        self,
        w: dict[str, Tensor],
        e: int,
        init: str,
        noise_scale: float,
        g: torch.Generator,
    ) -> None:
        with torch.no_grad():
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                if not hasattr(self, name):
                    continue
                rep = torch.cat([w[name].float()] * e, dim=0)
                if name == "W_O" and init == "copy":
                    rep = rep / e
                if init == "duplicate" and name.startswith("W_"):
                    rep = rep + noise_scale * self._xavier(tuple(rep.shape), g)
                getattr(self, name).copy_(rep)
            if hasattr(self, "b_O"):
                self.b_O.copy_(w["b_O"].float())
            if init == "copy":
                self.W_gate_Q.zero_()
                self.W_gate_K.zero_()
                self.b_gate_Q.fill_(1.0)
                self.b_gate_K.fill_(1.0)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` and ``weights.safetensors`` into folder ``path`` (atomically).

        Returns:
            The folder.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        write_json_atomic(path / CONFIG_FILE, {"format": FORMAT, **self.cfg.to_dict()})
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        layer: int | None = None,
        device: str | torch.device = "cpu",
    ) -> GatedAttentionBlock:
        """Load a block written by :meth:`save`.

        Args:
            path: the folder.
            model, layer: when given, the block must fit that model's layer (same
                ``d_model``, ``d_head``, head counts and positional scheme) -- see
                :meth:`check_fits`.

        Raises:
            FileNotFoundError: the folder lacks ``cfg.json`` or ``weights.safetensors``.
            ValueError: the files are not a gated block's, their shapes disagree with the
                config, or the block does not fit ``model``'s layer.
        """
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} holds no {name}: not a saved GatedAttentionBlock")
        raw = read_json(path / CONFIG_FILE)
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} config")
        cfg = GatedAttentionConfig.from_dict(raw)
        block = cls(cfg)
        with reading(path / WEIGHTS_FILE):
            state = load_file(str(path / WEIGHTS_FILE))
        block.load_weights(state, str(path))
        if model is not None:
            block.check_fits(model, cfg.layer if layer is None else layer)
        return block.to(device)

    def load_weights(self, state: dict[str, Tensor], where: str = "state dict") -> None:
        """Copy ``state`` into the block, refusing missing, extra or differently shaped tensors.

        Raises:
            ValueError: names or shapes differ (names the tensors and both shapes).
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        bad = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if missing or extra or bad:
            raise ValueError(
                f"{where} does not fit this block: missing {missing}, unexpected {extra}, "
                f"shape mismatches {bad}"
            )
        self.load_state_dict(state)

    def check_fits(self, model: Any, layer: int | None = None) -> None:
        """Raise ``ValueError`` unless the block can replace ``model``'s attention ``layer``."""
        mcfg = model.cfg
        layer = self.cfg.layer if layer is None else layer
        if layer is None or not 0 <= layer < mcfg.n_layers:
            raise ValueError(f"layer {layer} is not a layer of the model ({mcfg.n_layers} layers)")
        n_kv = getattr(mcfg, "n_key_value_heads", None) or mcfg.n_heads
        want = {
            "d_model": mcfg.d_model,
            "d_head": mcfg.d_head,
            "positional": "rotary" if mcfg.positional_embedding_type == "rotary" else "none",
        }
        have = {k: getattr(self.cfg, k) for k in want}
        if self.cfg.source_n_heads is not None:
            want["source_n_heads"] = mcfg.n_heads
            have["source_n_heads"] = self.cfg.source_n_heads
            want["kv_heads_per_expansion"] = n_kv
            assert self.cfg.n_key_value_heads is not None
            have["kv_heads_per_expansion"] = self.cfg.n_key_value_heads // self.cfg.expansion_factor
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if diff:
            raise ValueError(
                "the gated block was made for another model shape: "
                + ", ".join(f"{k} block {a} vs model {b}" for k, (a, b) in diff.items())
            )


def _layer_weights(attn: Any) -> dict[str, Tensor]:
    """A TransformerLens attention layer's weights, key/value heads not repeated (GQA)."""
    out = {}
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        private = "_" + name
        t = getattr(attn, private) if hasattr(attn, private) else getattr(attn, name)
        out[name] = t.detach()
    return out


def import_gated_attn_block(
    path: str | os.PathLike, model: Any, layer: int = 0, expansion_factor: int = 2
) -> GatedAttentionBlock:
    """A block saved by the authors' code (cmathw/gated-attn, ``gated_block_*.st``).

    Their ``ModifiedAttention`` state (``W_Q, W_K, W_V, W_O, b_Q, b_K, b_V`` and gate
    projections ``[n_heads, d_model, 1]``, no ``b_O``) maps one to one onto a
    :class:`GatedAttentionBlock` for ``model``'s toy layer, so their published blocks can be
    checked with :func:`tl_superposition.toys.check.solely_encoded`.

    Raises:
        ValueError: the file's tensors do not fit ``model`` (names or shapes).
    """
    with reading(path):
        state = load_file(str(path))
    block = GatedAttentionBlock.from_layer(
        model, layer, expansion_factor, qkv_bias=True, out_bias=False, normalize_ov=True
    )
    mapped = {}
    for name, t in state.items():
        key = name.split(".")[-1]
        mapped[key] = t[..., 0] if key.startswith(("W_gate", "b_gate")) else t
    block.load_weights({k: v.float() for k, v in mapped.items()}, str(path))
    return block
