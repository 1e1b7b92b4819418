"""Recompute attention patterns exactly from stored queries and keys.

Patterns cost ``n_heads x context_size^2`` numbers per context, queries and keys only
``(n_heads + n_key_value_heads) x d_head x context_size``. The collector therefore records,
for every layer whose ``attn.hook_q`` and ``attn.hook_k`` it stores, the few constants the
attention needs (score scale, soft cap, rotary tables, grouped-query layout) so that the reader
can rebuild ``attn.hook_pattern`` without the model. The operations mirror TransformerLens's
own attention forward, so float32 q/k give back the model's pattern to float rounding.

Note: for rotary models ``attn.hook_q``/``attn.hook_k`` hold the vectors *before* rotation
(``attn.hook_rot_q``/``attn.hook_rot_k`` after it); :func:`pattern_from_qk` rotates them.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_superposition.core.rotary import rotate
from tl_superposition.models import nonstandard_attention


def attention_params(model: Any, layer: int) -> dict[str, Any]:
    """Constants needed to recompute layer ``layer``'s pattern from its q and k.

    Returns a JSON-able dict (``recomputable`` False with a ``reason`` for attention variants
    this module does not reproduce: ALiBi, relative position bias, attention sinks, log-n
    scaling, QK-norm, clipped QKV, dynamic NTK RoPE).
    """
    cfg = model.cfg
    attn = model.blocks[layer].attn
    scale = attn.attn_scale
    scale = float(scale.item() if isinstance(scale, Tensor) else scale)
    pos = cfg.positional_embedding_type
    out: dict[str, Any] = {
        "n_heads": int(cfg.n_heads),
        "n_key_value_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "d_head": int(cfg.d_head),
        "attn_scale": scale,
        "soft_cap": float(cfg.attn_scores_soft_cap or -1.0),
        "causal": (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal",
        "rotary": pos == "rotary",
        "rotary_dim": int(cfg.rotary_dim) if pos == "rotary" and cfg.rotary_dim else None,
        "rotary_adjacent_pairs": bool(getattr(cfg, "rotary_adjacent_pairs", False)),
        "recomputable": True,
        "reason": None,
    }
    problems = nonstandard_attention(cfg)
    if problems:
        out["recomputable"] = False
        out["reason"] = "not reproduced from q/k: " + ", ".join(problems)
    return out


def rotary_tables(model: Any, layer: int, n_pos: int) -> tuple[Tensor, Tensor]:
    """The layer's rotary cos/sin tables for positions ``0..n_pos-1``.

    Returns:
        ``(cos, sin)``, float32 ``[n_pos, rotary_dim]``.
    """
    attn = model.blocks[layer].attn
    if attn.rotary_cos.shape[0] < n_pos:
        attn._extend_rotary_embeddings(n_pos)
    return (
        attn.rotary_cos[:n_pos].detach().float().cpu().clone(),
        attn.rotary_sin[:n_pos].detach().float().cpu().clone(),
    )


def pattern_from_qk(
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv_heads d_head"],
    params: dict[str, Any],
    rotary: tuple[Tensor, Tensor] | None = None,
    *,
    already_rotated: bool = False,
    heads: list[int] | None = None,
) -> Float[Tensor, "batch n_sel_heads pos pos"]:
    """Attention pattern ``softmax(causal(q k^T / attn_scale))`` from hook_q / hook_k values.

    Args:
        q: ``attn.hook_q`` values (any float dtype; computed in float32).
        k: ``attn.hook_k`` values; with grouped-query attention ``n_kv_heads`` divides
            ``n_heads`` and each key head serves ``n_heads / n_kv_heads`` consecutive query heads.
        params: :func:`attention_params` of the layer (``store.manifest["attention"][str(layer)]``).
        rotary: ``(cos, sin)`` tables ``[>= pos, rotary_dim]``; required for rotary models
            unless ``already_rotated`` (q, k taken from ``hook_rot_q`` / ``hook_rot_k``).
        heads: keep only these query heads (default all).

    Returns:
        The pattern, float32 ``[batch, len(heads), query_pos, key_pos]``, equal to
        ``attn.hook_pattern`` (rows sum to 1, zero above the diagonal).

    Raises:
        ValueError: the layer's attention variant is not reproducible, or shapes disagree.
    """
    if not params.get("recomputable", True):
        raise ValueError(f"cannot recompute this layer's pattern: {params.get('reason')}")
    q = q.float()
    k = k.float()
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must be [batch, pos, heads, d_head] with matching batch/pos/d_head, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if heads is not None:
        hq = torch.as_tensor(heads, dtype=torch.long, device=q.device)
    if params.get("rotary") and not already_rotated:
        if rotary is None:
            raise ValueError(
                "rotary model: pass the rotary (cos, sin) tables stored by the collector"
            )
        cos, sin = rotary
        rd = int(params["rotary_dim"])
        adj = bool(params.get("rotary_adjacent_pairs", False))
        q = rotate(q, cos[:, :rd], sin[:, :rd], adj)
        k = rotate(k, cos[:, :rd], sin[:, :rd], adj)
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_kv != n_heads:
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads cannot share {n_kv} key heads")
        k = torch.repeat_interleave(k, dim=2, repeats=n_heads // n_kv)
    if heads is not None:
        q = q.index_select(2, hq)
        k = k.index_select(2, hq)
    scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / params["attn_scale"]
    cap = params.get("soft_cap", -1.0)
    if cap is not None and cap > 0:
        scores = cap * torch.tanh(scores / cap)
    if params.get("causal", True):
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        scores = torch.where(mask, scores, torch.tensor(-torch.inf, device=scores.device))
    pattern = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(pattern, nan=0.0)
