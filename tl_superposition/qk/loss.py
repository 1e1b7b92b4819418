"""The training loss of QK transcoders (Wynroe & Sharkey 2024).

For a batch of whole contexts, with ``P(q, k)`` the layer's causal attention pattern computed
by the model's own code (:mod:`.attention`) and ``q_hat``, ``k_hat`` the reconstructions::

    loss = w_full * KL(P(q, k) || P(q_hat, k_hat))
         + w_mixed * KL(P(q, k) || P(q_hat, k)) + w_mixed * KL(P(q, k) || P(q, k_hat))
         + lambda * (R(f_Q, W_dec_Q) + R(f_K, W_dec_K))

Each KL is taken per query row over the causal keys and averaged over the batch, the heads
and the query rows ``1..ctx-1`` (row 0 has a single key). The authors weight the full term 3
and the mixed terms 1: the mixed terms tie each dictionary to the true other side, which
steadies early training and stops both learning the same arbitrary rotation of q and k.

Sparsity ``R`` per token, summed over features, averaged over tokens, with
``n_i = ||W_dec[i]||`` so that shrinking a decoder row cannot dodge the penalty:

- ``"sqrt"`` (the authors'): ``sum_i sqrt(f_i n_i + eps) - sqrt(eps)``, an L0.5-like penalty;
- ``"l1"``: ``sum_i f_i n_i``;
- ``"topk"``: none (the activation keeps ``k`` features per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.components.abstract_attention import AbstractAttention

from tl_superposition.qk.attention import log_pattern, mean_kl, rotate, scores_from_rotated
from tl_superposition.qk.transcoder import QKOutput


@dataclass
class QKLoss:
    """The loss of one batch and its terms (scalars).

    Attributes:
        total: the weighted sum that is minimised.
        kl_full: ``KL(P_true || P(q_hat, k_hat))``, nats per query row.
        kl_q: ``KL(P_true || P(q_hat, k))``.
        kl_k: ``KL(P_true || P(q, k_hat))``.
        sparsity_q, sparsity_k: the penalties ``R`` of each dictionary, per token (before
            lambda).
    """

    total: Tensor
    kl_full: Tensor
    kl_q: Tensor
    kl_k: Tensor
    sparsity_q: Tensor
    sparsity_k: Tensor

    def items(self) -> dict[str, float]:
        """The terms as floats, for logging."""
        return {k: float(v.detach()) for k, v in self.__dict__.items()}


def sparsity_penalty(
    f: Float[Tensor, "... d_sae"],
    w_dec: Float[Tensor, "d_sae d_out"],
    kind: str,
    eps: float = 1e-6,
) -> Float[Tensor, ""]:
    """The penalty ``R`` of one dictionary: per token, summed over features, mean over tokens.

    Args:
        f: feature activations (non-negative).
        w_dec: the decoder, whose row norms weight the activations.
        kind: ``"sqrt"``, ``"l1"`` or ``"topk"`` (zero).
        eps: the ``eps`` of the square-root penalty.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "topk":
        return f.new_zeros(())
    scaled = f * w_dec.norm(dim=-1)
    if kind == "sqrt":
        per_token = (torch.sqrt(scaled + eps) - eps**0.5).sum(-1)
    elif kind == "l1":
        per_token = scaled.sum(-1)
    else:
        raise ValueError(f"unknown sparsity {kind!r}: use 'sqrt', 'l1' or 'topk'")
    return per_token.mean()


def true_log_pattern(
    attn: AbstractAttention,
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv_heads d_head"],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log P_true, rotated q, rotated k)`` of the true queries and keys, without gradient."""
    with torch.no_grad():
        q_rot, k_rot = rotate(attn, q.float()), rotate(attn, k.float())
        return log_pattern(scores_from_rotated(attn, q_rot, k_rot)), q_rot, k_rot


def qk_loss(
    attn: AbstractAttention,
    q: Float[Tensor, "batch pos n_heads d_head"],
    k: Float[Tensor, "batch pos n_kv_heads d_head"],
    out: QKOutput,
    w_dec_q: Float[Tensor, "d_hidden_q d_q"],
    w_dec_k: Float[Tensor, "d_hidden_k d_k"],
    *,
    sparsity: str,
    sparsity_coeff: float,
    kl_full_weight: float = 3.0,
    kl_mixed_weight: float = 1.0,
    sqrt_eps: float = 1e-6,
) -> QKLoss:
    """The loss of a batch of whole contexts (see the module docstring).

    Args:
        attn: the layer's attention module (rotary, scale, mask).
        q, k: the true ``hook_q`` / ``hook_k`` values.
        out: the transcoder's output on the same contexts' ``ln1.hook_normalized``.
        w_dec_q, w_dec_k: the decoders (for the norm-weighted penalties).
        sparsity_coeff: lambda at this step.
    """
    logp_true, q_rot, k_rot = true_log_pattern(attn, q, k)
    qh_rot, kh_rot = rotate(attn, out.q), rotate(attn, out.k)
    kl_full = mean_kl(logp_true, log_pattern(scores_from_rotated(attn, qh_rot, kh_rot)))
    zero = kl_full.new_zeros(())
    kl_q = kl_k = zero
    if kl_mixed_weight > 0:
        kl_q = mean_kl(logp_true, log_pattern(scores_from_rotated(attn, qh_rot, k_rot)))
        kl_k = mean_kl(logp_true, log_pattern(scores_from_rotated(attn, q_rot, kh_rot)))
    sp_q = sparsity_penalty(out.q_features, w_dec_q, sparsity, sqrt_eps)
    sp_k = sparsity_penalty(out.k_features, w_dec_k, sparsity, sqrt_eps)
    total = (
        kl_full_weight * kl_full + kl_mixed_weight * (kl_q + kl_k) + sparsity_coeff * (sp_q + sp_k)
    )
    return QKLoss(total, kl_full, kl_q, kl_k, sp_q, sp_k)
