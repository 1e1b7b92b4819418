"""The trace's forward pass: one run per batch, keeping the activations the steps read."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_superposition.core.hooks import block_hook


class Workspace:
    """A flat tensor that successive batches (or chunks) of a trace are laid out in.

    The trace's large per-batch tensors (the stacked activations of :func:`run_batch`, the
    writers' outputs of :class:`~tl_superposition.tracing.writes.ChunkWriters`) take tens to
    hundreds of MB. A fresh allocation of that size is returned to the system when freed
    and paid again in page faults by the next batch, which on CPU costs about as much as
    the work that fills it; one workspace, grown when a batch needs more, is paid once.
    Whatever was laid out in a workspace is overwritten by its next use.
    """

    def __init__(self) -> None:
        self._flats: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of ``n`` elements (its values are whatever was there before).

        Every call with the same ``dtype`` and ``device`` returns the start of the same
        memory (grown when ``n`` needs more): take what one use needs in one call.
        ``device`` is compared as given: pass a tensor's ``.device`` (``cuda:0``, not
        ``cuda``), or the workspace is allocated again on every call.
        """
        flat = self._flats.get((dtype, device))
        if flat is None or len(flat) < n:
            flat = self._flats[dtype, device] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n]


@dataclass
class BatchCache:
    """The activations of one batch that the trace reads, stacked over layers.

    Tensors stay on the model's device, in its dtype; ``x`` and ``scale`` in the dtype
    TransformerLens normalises in (float32 for half-precision models).

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


def _stacked(
    model: HookedTransformer, tokens: Tensor, workspace: Workspace
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty ``(x, scale, z, mlp)`` of :class:`BatchCache` for ``tokens``, laid out in
    ``workspace`` (one take per dtype)."""
    cfg = model.cfg
    B, P, n = *tokens.shape, cfg.n_layers
    # TransformerLens normalises half-precision models in float32 (ln1's hooks see float32)
    norm_dtype = cfg.dtype if cfg.dtype in (torch.float32, torch.float64) else torch.float32
    parts = {
        "x": ((B, P, n, cfg.d_model), norm_dtype),
        "scale": ((B, P, n), norm_dtype),
        "z": ((B, P, n, cfg.n_heads, cfg.d_head), cfg.dtype),
        "mlp": ((B, P, n, cfg.d_model), cfg.dtype),
    }
    out: dict[str, Tensor] = {}
    for dtype in dict.fromkeys(d for _, d in parts.values()):
        names = [k for k, (_, d) in parts.items() if d == dtype]
        sizes = [math.prod(parts[k][0]) for k in names]
        flat = workspace.take(sum(sizes), dtype, model.W_E.device)
        for name, piece in zip(names, flat.split(sizes)):
            out[name] = piece.view(parts[name][0])
    return out["x"], out["scale"], out["z"], out["mlp"]


@torch.inference_mode()
def run_batch(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], workspace: Workspace | None = None
) -> BatchCache:
    """Run ``model`` on ``tokens`` up to its last block and keep what the trace reads.

    Hooks copy each layer's activations into stacked tensors as the forward pass produces
    them (nothing else is kept alive). The unembedding is not run: the logits a caller needs
    (for example the logit difference at END,
    :func:`~tl_superposition.tracing.ioi_trace.logit_attribution`) come from ``resid``.

    Args:
        model: a processed ``HookedTransformer`` (:func:`tl_superposition.load_model`).
        tokens: token ids, on the model's device.
        workspace: where the stacked activations are laid out (default: new memory). A
            trace passes one workspace to every batch, so the returned cache is overwritten
            by the next call with that workspace.
    """
    n = model.cfg.n_layers
    x, scale, z, mlp = _stacked(model, tokens, workspace or Workspace())
    pattern: list[Tensor] = []
    scores: list[Tensor] = []
    embed: list[Tensor] = []

    def into(buffer: Tensor, layer: int, squeeze: bool = False):
        def copy_in(act: Tensor, hook: HookPoint) -> None:
            del hook
            buffer[:, :, layer].copy_(act[..., 0] if squeeze else act)

        return copy_in

    def keep(acts: list[Tensor]):
        def append(act: Tensor, hook: HookPoint) -> None:
            del hook
            acts.append(act)

        return append

    hooks: list[tuple[str | Callable, Callable]] = [("hook_embed", keep(embed))]
    if model.cfg.positional_embedding_type == "standard":
        hooks.append(("hook_pos_embed", keep(embed)))
    for L in range(n):
        hooks += [
            (block_hook(L, "ln1.hook_normalized"), into(x, L)),
            (block_hook(L, "ln1.hook_scale"), into(scale, L, squeeze=True)),
            (block_hook(L, "attn.hook_attn_scores"), keep(scores)),
            (block_hook(L, "attn.hook_pattern"), keep(pattern)),
            (block_hook(L, "attn.hook_z"), into(z, L)),
        ]
        if not model.cfg.attn_only:
            hooks.append((block_hook(L, "hook_mlp_out"), into(mlp, L)))
    if model.cfg.attn_only:
        mlp.zero_()
    resid = model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=n)
    assert isinstance(resid, Tensor)
    return BatchCache(
        x=x,
        scale=scale,
        z=z,
        mlp=mlp,
        embed=embed[0] if len(embed) == 1 else embed[0] + embed[1],
        resid=resid,
        pattern=pattern,
        scores=scores,
    )
