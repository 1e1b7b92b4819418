"""Rotary position embedding (RoPE, Su et al. 2021) on tensors, outside a model's forward pass.

Inside a ``HookedTransformer`` the attention module rotates queries and keys itself
(``attn.apply_rotary``; :func:`tl_superposition.qk.attention.rotate` calls it). Stored
activations and gated attention blocks need the same rotation without the module: these two
functions give it, with TransformerLens's conventions (rotate-half, or adjacent pairs as in
GPT-J; a partial ``rotary_dim`` leaves the last dimensions unrotated) and bit-identical results
to ``apply_rotary`` for the same tables.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def rope_tables(
    n_ctx: int, rotary_dim: int, base: float, adjacent_pairs: bool
) -> tuple[Float[Tensor, "n_ctx rotary_dim"], Float[Tensor, "n_ctx rotary_dim"]]:
    """Standard RoPE tables ``(cos, sin)``, float32 ``[n_ctx, rotary_dim]``, computed in float64.

    Frequency ``i`` is ``base ** (-2i / rotary_dim)``; with ``adjacent_pairs`` each frequency
    covers two neighbouring dimensions, otherwise dimension ``i`` and ``i + rotary_dim / 2``.
    A model's own tables (float32 arithmetic in TransformerLens) may differ in the last bit.
    """
    inv = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    inv = inv.repeat_interleave(2) if adjacent_pairs else torch.cat([inv, inv])
    angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
    return angles.cos().float(), angles.sin().float()


def rotate(
    x: Float[Tensor, "batch pos heads d_head"],
    cos: Float[Tensor, "n_ctx rotary_dim"],
    sin: Float[Tensor, "n_ctx rotary_dim"],
    adjacent_pairs: bool,
) -> Float[Tensor, "batch pos heads d_head"]:
    """Rotate the first ``rotary_dim`` dimensions of ``x`` by position (positions from 0).

    The tables are cast to ``x``'s device and dtype; ``x`` needs at most ``n_ctx`` positions.
    """
    rd = cos.shape[1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    if adjacent_pairs:
        pairs = x_rot.unflatten(-1, (rd // 2, 2))
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        half = rd // 2
        turned = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    n = x.shape[1]
    c = cos[None, :n, None, :].to(x.device, x.dtype)
    s = sin[None, :n, None, :].to(x.device, x.dtype)
    return torch.cat([x_rot * c + turned * s, x_pass], dim=-1)
