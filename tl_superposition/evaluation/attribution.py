"""Attribution patching (EAP) and its integrated-gradients form (EAP-IG), per head.

Attribution patching (Nanda 2023; Syed, Rager & Conmy 2023, arXiv 2310.10348) estimates
what patching a component's activation from the counterfactual run would do to the metric
by a first-order expansion: ``m(patched) - m(clean) ~ (a_cf - a_clean) . dm/da``. EAP-IG
(Hanna, Pezzelle & Belinkov 2024, arXiv 2403.17806) replaces the gradient at the clean input
by its mean along the straight path between the counterfactual and clean token embeddings.
MIB's implementation (``hannamw/EAP-IG``, ``get_scores_eap_ig``, the one its benchmark runs)
takes the points ``e_cf + (k / steps) (e_clean - e_cf)``, ``k = 0 .. steps - 1``, with 5
steps by default; this module does the same.

The scores here are per head, on ``hook_z`` (all positions), for the mean
``logit(IO) - logit(S)`` at END: ``score = (z_clean - z_cf) . grad``, summed over positions
and ``d_head`` and taken over the prompts' mean, so a positive score is a head whose
counterfactual output would lower the logit difference (it supports the answer). They are
computed with TransformerLens hooks: auto-circuit does not import with TransformerLens 3
and has no grouped-query attention; the EAP-IG package is not on PyPI and allocates its
scores on CUDA (both read for this module; see docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.hooks import block_hook
from tl_superposition.evaluation.faithfulness import head_z
from tl_superposition.ioi import IOIDataset, logit_diff_from_resid


def _grads_at(
    model: HookedTransformer,
    embed: Float[Tensor, "batch pos d_model"],
    part: IOIDataset,
    n_total: int,
) -> tuple[Float[Tensor, "batch pos n_layers n_heads d_head"], Float[Tensor, ""]]:
    """The gradient of the summed logit difference / ``n_total`` at every head's ``hook_z``,
    with ``hook_embed`` replaced by ``embed``; and that metric."""
    zs: list[Tensor] = []

    def keep(z: Tensor, hook) -> Tensor:
        del hook
        z.retain_grad()
        zs.append(z)
        return z

    def replace(t: Tensor, hook) -> Tensor:
        del t, hook
        return embed

    n = model.cfg.n_layers
    hooks: list[tuple[str | Callable, Callable]] = [("hook_embed", replace)]
    hooks += [(block_hook(L, "attn.hook_z"), keep) for L in range(n)]
    dev = embed.device
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        resid = model(part.tokens.to(dev), stop_at_layer=n)
        ld = logit_diff_from_resid(model, resid, part.end_pos, part.io_tokens, part.s_tokens)
        metric = ld.sum() / n_total
        metric.backward()
    grads = torch.stack([z.grad for z in zs], 2)  # type: ignore[misc]
    return grads.detach(), metric.detach()


def attribution_scores(
    model: HookedTransformer,
    dataset: IOIDataset,
    counterfactual: Int[Tensor, "n_prompts pos"],
    alphas: Sequence[float] = (1.0,),
    batch_size: int = 32,
) -> Float[Tensor, "n_layers n_heads"]:
    """Per head, ``(z_clean - z_cf) . mean_alpha grad(alpha)`` over the prompts' mean.

    ``grad(alpha)`` is the gradient of the mean logit difference at ``hook_z`` when the token
    embeddings are ``e_cf + alpha (e_clean - e_cf)``; ``alphas=(1.0,)`` is attribution
    patching (the gradient at the clean run), :func:`eap_ig_scores` the integrated form.

    Args:
        model: the model (its parameters are not changed; their gradients are left unset).
        dataset: the clean prompts; counterfactual: their counterfactual tokens.
        alphas: the points of the path.
        batch_size: prompts per forward and backward pass.

    Raises:
        ValueError: no point on the path, or a counterfactual of another shape.
    """
    if not alphas:
        raise ValueError("alphas must hold at least one point")
    if counterfactual.shape != dataset.tokens.shape:
        raise ValueError("counterfactual must have the shape of the prompts' tokens")
    dev = next(model.parameters()).device
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for lo in range(0, len(dataset), batch_size):
            part = dataset[lo : lo + batch_size]
            width = part.tokens.shape[1]
            clean, bad = part.tokens.to(dev), counterfactual[lo : lo + len(part), :width].to(dev)
            with torch.no_grad():
                e_clean, e_cf = model.embed(clean), model.embed(bad)
                z_clean, z_cf = head_z(model, clean), head_z(model, bad)
            grad = torch.zeros_like(z_clean)
            for a in alphas:
                point = (e_cf + a * (e_clean - e_cf)).detach().requires_grad_(True)
                g, _ = _grads_at(model, point, part, len(dataset))
                grad += g / len(alphas)
            per = ((z_clean - z_cf) * grad).sum((0, 1, 4))
            scores += per.double().cpu()
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return scores.float()


def eap_scores(
    model: HookedTransformer,
    dataset: IOIDataset,
    counterfactual: Int[Tensor, "n_prompts pos"],
    batch_size: int = 32,
) -> Float[Tensor, "n_layers n_heads"]:
    """Attribution patching (EAP) per head: the gradient at the clean run."""
    return attribution_scores(model, dataset, counterfactual, (1.0,), batch_size)


def eap_ig_scores(
    model: HookedTransformer,
    dataset: IOIDataset,
    counterfactual: Int[Tensor, "n_prompts pos"],
    steps: int = 5,
    batch_size: int = 32,
) -> Float[Tensor, "n_layers n_heads"]:
    """EAP-IG per head: the gradient averaged at ``steps`` points from the counterfactual
    embeddings towards the clean ones, ``k / steps`` for ``k = 0 .. steps - 1`` (MIB's).

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alphas = [k / steps for k in range(steps)]
    return attribution_scores(model, dataset, counterfactual, alphas, batch_size)
