"""Attention patterns from (reconstructed) queries and keys, computed by the model's own code.

Scores go through the layer's TransformerLens attention module: its rotary rotation
(``apply_rotary``), its score computation (``calculate_attention_scores``: grouped-query key
sharing, ``attn_scale``) and its causal mask (``apply_causal_mask``, which fills future keys
with ``-inf``, never a small constant). So a pattern computed here from the true
``hook_q``/``hook_k`` equals the model's ``hook_pattern``, and one computed from reconstructions
is what the model would use with them spliced in.

KL convention (Wynroe & Sharkey 2024): the true pattern is the target,
``KL(P_true || P_rec) = sum_k P_true[k] (log P_true[k] - log P_rec[k])`` per query row, over
the causal keys only.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components.abstract_attention import AbstractAttention

#: Query rows from this position on enter the mean KL (row 0 has one key: its KL is always 0).
FIRST_QUERY_ROW = 1


def layer_attention(model: HookedTransformer, layer: int) -> AbstractAttention:
    """The attention module of ``model``'s block ``layer``."""
    attn = model.blocks[layer].attn
    assert isinstance(attn, AbstractAttention)
    return attn


def rotate(
    attn: AbstractAttention, x: Float[Tensor, "batch pos heads d_head"]
) -> Float[Tensor, "batch pos heads d_head"]:
    """Apply the layer's rotary embedding (positions ``0..pos-1``); identity without RoPE."""
    if attn.cfg.positional_embedding_type != "rotary":
        return x
    return attn.apply_rotary(x)


def scores_from_rotated(
    attn: AbstractAttention,
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv_heads d_head"],
) -> Float[Tensor, "batch n_heads pos pos"]:
    """Masked attention scores ``q . k / attn_scale`` (``-inf`` above the diagonal).

    ``q`` and ``k`` are already rotated (:func:`rotate`); this equals the model's
    ``hook_attn_scores``.
    """
    scores = attn.calculate_attention_scores(q, k)
    return attn.apply_causal_mask(scores)


def attention_scores(
    attn: AbstractAttention,
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv_heads d_head"],
) -> Float[Tensor, "batch n_heads pos pos"]:
    """Masked scores from un-rotated ``hook_q``/``hook_k`` values (rotated here)."""
    return scores_from_rotated(attn, rotate(attn, q), rotate(attn, k))


def log_pattern(
    scores: Float[Tensor, "batch n_heads pos pos"],
) -> Float[Tensor, "batch n_heads pos pos"]:
    """``log softmax`` over keys: the log attention pattern (``-inf`` on future keys)."""
    return torch.log_softmax(scores.float(), dim=-1)


def causal_mask(n: int, device: torch.device | str = "cpu") -> Bool[Tensor, "pos pos"]:
    """``True`` where key position <= query position."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def kl_rows(
    logp_true: Float[Tensor, "batch n_heads pos pos"],
    logp_rec: Float[Tensor, "batch n_heads pos pos"],
) -> Float[Tensor, "batch n_heads pos"]:
    """``KL(P_true || P_rec)`` of every query row (nats), over the causal keys.

    Future keys (``-inf`` in both) are left out instead of producing ``nan``; a reconstructed
    pattern that puts zero probability on a key the true one uses gives ``inf``.
    """
    mask = causal_mask(logp_true.shape[-1], logp_true.device)
    diff = torch.where(mask, logp_true - logp_rec, torch.zeros((), device=logp_true.device))
    return (logp_true.exp() * diff).sum(-1)


def mean_kl(
    logp_true: Float[Tensor, "batch n_heads pos pos"],
    logp_rec: Float[Tensor, "batch n_heads pos pos"],
) -> Float[Tensor, ""]:
    """Mean of :func:`kl_rows` over batch, heads and query rows ``1..pos-1`` (nats per row)."""
    return kl_rows(logp_true, logp_rec)[..., FIRST_QUERY_ROW:].mean()
