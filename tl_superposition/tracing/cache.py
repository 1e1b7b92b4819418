"""The trace's forward pass: one run per batch, keeping the activations the steps read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


def _hook_names(n_layers: int, absolute_positions: bool) -> set[str]:
    names = {"hook_embed"} | ({"hook_pos_embed"} if absolute_positions else set())
    for L in range(n_layers):
        names |= {
            f"blocks.{L}.ln1.hook_normalized",
            f"blocks.{L}.ln1.hook_scale",
            f"blocks.{L}.attn.hook_attn_scores",
            f"blocks.{L}.attn.hook_pattern",
            f"blocks.{L}.attn.hook_z",
            f"blocks.{L}.hook_mlp_out",
        }
    return names


@dataclass
class BatchCache:
    """The activations of one batch that the trace reads, stacked over layers.

    Tensors stay on the model's device, in its dtype.

    Attributes:
        x: ``blocks.{L}.ln1.hook_normalized``, the input of W_Q/W_K of layer L.
        scale: ``blocks.{L}.ln1.hook_scale``.
        z: ``blocks.{L}.attn.hook_z``.
        mlp: ``blocks.{L}.hook_mlp_out`` (zeros for attention-only models).
        embed: ``hook_embed`` plus ``hook_pos_embed`` where positions are learned.
        resid: the residual stream after the last block (``blocks.{n-1}.hook_resid_post``),
            from which ``ln_final`` and the unembedding give the logits.
        pattern, scores: per layer, ``attn.hook_pattern`` and ``attn.hook_attn_scores``
            (``[batch, n_heads, dest, src]``).
    """

    x: Float[Tensor, "batch pos n_layers d_model"]
    scale: Float[Tensor, "batch pos n_layers"]
    z: Float[Tensor, "batch pos n_layers n_heads d_head"]
    mlp: Float[Tensor, "batch pos n_layers d_model"]
    embed: Float[Tensor, "batch pos d_model"]
    resid: Float[Tensor, "batch pos d_model"]
    pattern: list[Tensor]
    scores: list[Tensor]


@torch.inference_mode()
def run_batch(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> BatchCache:
    """Run ``model`` on ``tokens`` up to its last block and keep what the trace reads.

    The unembedding is not run: the logits a caller needs (for example the logit
    difference at END, :func:`~tl_superposition.tracing.ioi_trace.logit_attribution`) come
    from ``resid``.

    Args:
        model: a processed ``HookedTransformer`` (:func:`tl_superposition.load_model`).
        tokens: token ids, on the model's device.
    """
    n = model.cfg.n_layers
    names = _hook_names(n, model.cfg.positional_embedding_type == "standard")
    resid, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name in names, stop_at_layer=n
    )
    assert isinstance(resid, Tensor)
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    if model.cfg.attn_only:
        mlp = torch.zeros(
            *resid.shape[:2], n, resid.shape[2], dtype=resid.dtype, device=resid.device
        )
    else:
        mlp = torch.stack([cache[f"blocks.{L}.hook_mlp_out"] for L in range(n)], 2)
    return BatchCache(
        x=torch.stack([cache[f"blocks.{L}.ln1.hook_normalized"] for L in range(n)], 2),
        scale=torch.stack([cache[f"blocks.{L}.ln1.hook_scale"][..., 0] for L in range(n)], 2),
        z=torch.stack([cache[f"blocks.{L}.attn.hook_z"] for L in range(n)], 2),
        mlp=mlp,
        embed=embed,
        resid=resid,
        pattern=[cache[f"blocks.{L}.attn.hook_pattern"] for L in range(n)],
        scores=[cache[f"blocks.{L}.attn.hook_attn_scores"] for L in range(n)],
    )
