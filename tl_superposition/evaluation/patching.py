"""Exact activation patching per head, by denoising and by noising, and the heads it finds.

Both directions patch one head's output (``hook_z``, every position) between a clean prompt
and its counterfactual and normalise the mean ``logit(IO) - logit(S)`` at END so that 0 is
the counterfactual run and 1 the clean one (the terms are those of Heimersheim & Nanda 2024,
"How to use and interpret activation patching", arXiv 2404.15255):

- **denoising**: the head's clean output patched into the counterfactual run;
  ``(m_patched - m_cf) / (m_clean - m_cf)``, how much of the behaviour the head alone
  restores (sufficiency; what Wang et al. 2022 and this project's first check used);
- **noising**: the head's counterfactual output patched into the clean run;
  ``(m_clean - m_patched) / (m_clean - m_cf)``, how much of the behaviour is lost without it
  (necessity; the counterpart of attribution patching).

A head is *important* by a direction when its effect is at least ``threshold`` in size
(:func:`important_heads`; this project uses 0.05, 5% of the clean-counterfactual gap).

:func:`head_patching_effects` gives the numbers of TransformerLens's
:func:`transformer_lens.patching.get_act_patch_attn_head_out_all_pos` (the tests compare the
two), computed differently: TransformerLens runs the whole model once per head; here every
head of a layer is patched in its own copy of the prompts in one pass that starts at that
layer from the cached residual stream (``start_at_layer``) and reads the logits at END only:
about a third of the arithmetic for SmolLM2 (half the layers on average, and no unembedding
of every position).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.core.hooks import block_hook
from tl_superposition.ioi import IOIDataset, logit_diff_from_resid

Head = tuple[int, int]
Direction = Literal["denoising", "noising"]


def logit_diff_metric(
    dataset: IOIDataset,
) -> Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]:
    """The patching metric: mean ``logit(IO) - logit(S)`` at END over ``dataset``'s prompts."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(len(dataset), device=logits.device)
        end = logits[rows, dataset.end_pos.to(logits.device)]
        io = end[rows, dataset.io_tokens.to(logits.device)]
        s = end[rows, dataset.s_tokens.to(logits.device)]
        return (io - s).mean()

    return metric


def _logit_diffs(
    model: HookedTransformer, dataset: IOIDataset, tokens: Tensor
) -> tuple[Float[Tensor, " n_prompts"], dict[str, Tensor]]:
    """A clean run of ``tokens``: each prompt's logit difference, every ``hook_resid_pre``
    and ``hook_z``."""
    keep = ("hook_resid_pre", "attn.hook_z")
    resid, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith(keep), stop_at_layer=model.cfg.n_layers
    )
    ld = logit_diff_from_resid(
        model, cast(Tensor, resid), dataset.end_pos, dataset.io_tokens, dataset.s_tokens
    )
    return ld, dict(cache.items())


@torch.inference_mode()
def patched_logit_diffs(
    model: HookedTransformer,
    dataset: IOIDataset,
    base: dict[str, Tensor],
    source: dict[str, Tensor],
    max_rows: int = 512,
) -> Float[Tensor, "n_layers n_heads"]:
    """Mean ``logit(IO) - logit(S)`` at END of the ``base`` run with one head's ``hook_z``
    (every position) taken from ``source``, for every head.

    Args:
        model: the model.
        dataset: where and which logits to read.
        base: a cache of the run patched into (``blocks.{L}.hook_resid_pre``).
        source: a cache of the run patched from (``blocks.{L}.attn.hook_z``).
        max_rows: prompts x heads per forward pass.
    """
    n_layers, n_heads, n = model.cfg.n_layers, model.cfg.n_heads, len(dataset)
    out = torch.zeros(n_layers, n_heads)
    per_pass = max(1, max_rows // n)
    for L in range(n_layers):
        resid = base[block_hook(L, "hook_resid_pre")]
        z_src = source[block_hook(L, "attn.hook_z")]
        for h0 in range(0, n_heads, per_pass):
            heads = list(range(h0, min(h0 + per_pass, n_heads)))
            rows_head = torch.tensor(heads).repeat_interleave(n).to(resid.device)
            rows_prompt = torch.arange(n).repeat(len(heads)).to(resid.device)

            def patch(z: Tensor, hook, rh=rows_head, rp=rows_prompt) -> Tensor:
                del hook
                z = z.clone()
                z[torch.arange(len(rh), device=z.device), :, rh] = z_src[rp, :, rh]
                return z

            with model.hooks(fwd_hooks=[(block_hook(L, "attn.hook_z"), patch)]):
                final = model(resid.repeat(len(heads), 1, 1), start_at_layer=L,
                              stop_at_layer=n_layers)  # fmt: skip
            rep = lambda t: t.repeat(len(heads))  # noqa: E731
            ld = logit_diff_from_resid(model, final, rep(dataset.end_pos),
                                       rep(dataset.io_tokens), rep(dataset.s_tokens))  # fmt: skip
            out[L, heads] = ld.view(len(heads), n).mean(1)
    return out


@torch.inference_mode()
def head_patching_effects(
    model: HookedTransformer,
    dataset: IOIDataset,
    corrupted: Int[Tensor, "n_prompts pos"],
    direction: Direction = "denoising",
) -> tuple[Float[Tensor, "n_layers n_heads"], float, float]:
    """Every head's normalised patching effect on ``logit(IO) - logit(S)`` (module docstring).

    Args:
        model: the model.
        dataset: the clean prompts.
        corrupted: their counterfactuals (e.g. :func:`~.prompts.abc_tokens`).
        direction: ``"denoising"`` or ``"noising"``.

    Returns:
        ``(effects, m_clean, m_corrupt)``: effects on the CPU, and the two means in logits.

    Raises:
        ValueError: an unknown direction, counterfactuals not one per prompt, or clean and
            corrupted runs with the same metric.
    """
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    if len(corrupted) != len(dataset) or corrupted.shape[1] < dataset.tokens.shape[1]:
        raise ValueError(
            f"corrupted must hold one prompt per clean prompt ({tuple(dataset.tokens.shape)}), "
            f"got {tuple(corrupted.shape)}"
        )
    dev = next(model.parameters()).device
    clean = dataset.tokens.to(dev)
    bad = corrupted[:, : dataset.tokens.shape[1]].to(dev)  # a slice of a dataset is narrower
    ld_clean, clean_cache = _logit_diffs(model, dataset, clean)
    ld_bad, bad_cache = _logit_diffs(model, dataset, bad)
    m_clean, m_corrupt = float(ld_clean.mean()), float(ld_bad.mean())
    if abs(m_clean - m_corrupt) < 1e-6:
        raise ValueError("clean and corrupted logit differences are equal; no effect to scale")
    if direction == "denoising":
        raw = patched_logit_diffs(model, dataset, bad_cache, clean_cache)
        effects = (raw - m_corrupt) / (m_clean - m_corrupt)
    else:
        raw = patched_logit_diffs(model, dataset, clean_cache, bad_cache)
        effects = (m_clean - raw) / (m_clean - m_corrupt)
    return effects, m_clean, m_corrupt


def important_heads(effects: Float[Tensor, "n_layers n_heads"], threshold: float) -> set[Head]:
    """The heads whose normalised patching effect has ``|effect| >= threshold``."""
    layers, heads = torch.nonzero(effects.abs() >= threshold, as_tuple=True)
    return set(zip(layers.tolist(), heads.tolist()))


def precision_recall_f1(found: set[Head], truth: set[Head]) -> dict[str, float]:
    """Precision, recall and F1 of ``found`` against ``truth`` (0 where undefined)."""
    hits = len(found & truth)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ranking_from_scores(scores: Float[Tensor, "n_layers n_heads"], absolute: bool) -> list[Head]:
    """Every head, by ``scores`` descending (by their size with ``absolute``); ties by index."""
    flat = scores.flatten().double()
    key = flat.abs() if absolute else flat
    order = sorted(range(len(flat)), key=lambda i: (-float(key[i]), i))
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in order]
