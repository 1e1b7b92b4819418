"""Seeds chosen per prompt, as ACC++ does: the components that make up the logit difference.

ACC++ (Franco & Crovella, arXiv 2602.13483; ``accpp_tracer`` ``circuit.py``, ``get_seeds``
and ``get_upstream_contributors_seed``) starts each prompt's trace from its own seeds:

1. the logit difference ``logit(IO) - logit(S)`` at END is split linearly over the
   components that write the final residual stream there (:func:`end_attribution`): every
   head *per source position* (``A[END, s] v_s W_O``), every MLP, every layer's attention
   output bias and the embeddings, each dotted with ``W_U[:, IO] - W_U[:, S]`` and divided by
   ``ln_final.hook_scale`` at END. The parts sum to the logit difference less the unembedding
   bias, exactly;
2. the seeds are the smallest set of parts, largest first, that exceed the total, with the
   cutoff never above half the total (:func:`seed_mask`);
3. only prompts the model answers correctly (END's argmax is the IO token) get seeds.

Heads seeded at a source where they fire start the walk
(:meth:`PromptSeeds.seed_firings`); the other seeds (MLPs, the embeddings, heads that do not
fire there) are kept as circuit nodes next to the logits but are not traced, as in ACC++.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.ioi import IOIDataset
from tl_superposition.tracing.cache import BatchCache
from tl_superposition.tracing.decompose import BatchFirings
from tl_superposition.tracing.seeds import SeedChooser

# Component kinds of the attribution (columns of :class:`EndAttribution`).
HEAD, MLP, BIAS, EMBED = "head", "mlp", "bias", "embed"


def seed_mask(
    values: Float[Tensor, "n m"], beta: float = 1.0, valid: Bool[Tensor, "n m"] | None = None
) -> Bool[Tensor, "n m"]:
    """ACC++'s seed rule, per row: the parts at or above a cutoff.

    ``total`` is the row's sum (over valid columns). Sorted descending, the cutoff is the
    first value at which the running sum is strictly greater than ``beta * total``; where no
    prefix exceeds it (every part >= 0, so the running sum only reaches the total), the
    smallest positive part. The cutoff is then lowered to ``total / 2`` if it is above that,
    and every part ``>= cutoff`` is a seed (ties kept). A row whose total is not positive
    has no seed (ACC++ skips such prompts).

    Args:
        values: one row per prompt, one column per component.
        beta: the share of the total to exceed (ACC++: 1.0).
        valid: the columns that are components (default: all).

    Raises:
        ValueError: ``beta`` not positive.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ok = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    v = torch.where(ok, values, torch.zeros_like(values))
    total = v.sum(1, keepdim=True)
    sorted_v = torch.sort(torch.where(ok, values, -torch.inf), dim=1, descending=True).values
    finite = torch.isfinite(sorted_v)
    cs = torch.where(finite, sorted_v, torch.zeros_like(sorted_v)).cumsum(1)
    above = (cs > beta * total) & finite
    first = sorted_v.gather(1, above.to(torch.int8).argmax(1, keepdim=True))
    positive = torch.where(ok & (values > 0), values, torch.full_like(values, torch.inf))
    cutoff = torch.where(above.any(1, keepdim=True), first, positive.amin(1, keepdim=True))
    cutoff = torch.minimum(cutoff, total / 2)
    return ok & (values >= cutoff) & (total > 0)


@dataclass
class EndAttribution:
    """The logit difference at END split over components, for a batch of prompts.

    Attributes:
        heads: ``[batch, n_layers, n_heads, pos]`` each head's part through each source.
        mlps: ``[batch, n_layers]``; bias: ``[batch, n_layers]`` (each layer's ``b_O``);
        embed: ``[batch]`` the embeddings.
        logit_diff: ``[batch]`` ``logit(IO) - logit(S)`` at END (the parts plus the
            unembedding bias ``b_U[IO] - b_U[S]``).
        correct: ``[batch]`` whether END's argmax is the IO token.
    """

    heads: Float[Tensor, "batch n_layers n_heads pos"]
    mlps: Float[Tensor, "batch n_layers"]
    bias: Float[Tensor, "batch n_layers"]
    embed: Float[Tensor, " batch"]
    logit_diff: Float[Tensor, " batch"]
    correct: Bool[Tensor, " batch"]

    def flat(self) -> Float[Tensor, "batch n_components"]:
        """Every part in one row per prompt: heads (layer, head, source), MLPs, biases,
        embeddings (the column order of :meth:`columns`)."""
        return torch.cat(
            [self.heads.flatten(1), self.mlps, self.bias, self.embed[:, None]], 1
        )  # fmt: skip

    def columns(self) -> pd.DataFrame:
        """``kind``, ``layer``, ``head`` and ``src`` of each column of :meth:`flat`
        (-1 where a component has none)."""
        _, n_layers, n_heads, P = self.heads.shape
        L, h, s = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(P), indexing="ij")
        heads = pd.DataFrame(
            {"kind": HEAD, "layer": L.ravel(), "head": h.ravel(), "src": s.ravel()}
        )
        per_layer = np.arange(n_layers)
        rest = [
            pd.DataFrame({"kind": kind, "layer": per_layer, "head": -1, "src": -1})
            for kind in (MLP, BIAS)
        ]
        embed = pd.DataFrame({"kind": [EMBED], "layer": [-1], "head": [-1], "src": [-1]})
        return pd.concat([heads, *rest, embed], ignore_index=True)


def _direction(
    model: HookedTransformer, io: Tensor, s: Tensor
) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, " batch"]]:
    """``W_U[:, IO] - W_U[:, S]`` (centred for LayerNorm models) and ``b_U[IO] - b_U[S]``."""
    direction = (model.W_U[:, io] - model.W_U[:, s]).T
    if model.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean(1, keepdim=True)
    return direction, model.b_U[io] - model.b_U[s]


@torch.inference_mode()
def end_attribution(
    model: HookedTransformer,
    cache: BatchCache,
    end_pos: Int[Tensor, " batch"],
    io_tokens: Int[Tensor, " batch"],
    s_tokens: Int[Tensor, " batch"],
) -> EndAttribution:
    """Split ``logit(IO) - logit(S)`` at END over heads per source, MLPs, biases, embeddings.

    Follows ACC++'s seed attribution (module docstring). A head's part through source ``s``
    is ``A[END, s] (x_s W_V + b_V) W_O . d / scale`` with ``x`` the layer's
    ``ln1.hook_normalized``, ``d`` the logit direction and ``scale`` ``ln_final.hook_scale``
    at END; summed over sources it is the head's direct logit attribution. Every part is
    float32 on the CPU.

    Args:
        model: the model the cache comes from.
        cache: one batch of the trace's forward pass.
        end_pos, io_tokens, s_tokens: per prompt of the batch.
    """
    dev = cache.z.device
    B = cache.z.shape[0]
    rows = torch.arange(B, device=dev)
    end = end_pos.to(dev)
    io, s = io_tokens.to(dev), s_tokens.to(dev)
    resid = cache.resid[rows, end]
    normed, scale = _final_norm(model, resid)
    direction, bias_u = _direction(model, io, s)
    d = direction / scale[:, None]
    heads = []
    for L, block in enumerate(model.blocks):
        u = torch.einsum("hed,bd->bhe", block.attn.W_O, d)  # [B, n_heads, d_head]
        x = cache.x[:, :, L].to(u.dtype)
        through_v = torch.einsum("bpm,hme,bhe->bhp", x, block.attn.W_V, u)
        through_v = through_v + torch.einsum("he,bhe->bh", block.attn.b_V, u)[:, :, None]
        weights = cache.pattern[L][rows, :, end]  # [B, n_heads, pos]
        heads.append(weights * through_v)
    mlps = torch.einsum("bld,bd->bl", cache.mlp[rows, end].to(d.dtype), d)
    bias = torch.einsum("ld,bd->bl", model.b_O, d)
    embed = (cache.embed[rows, end].to(d.dtype) * d).sum(1)
    logits = normed @ model.W_U + model.b_U
    return EndAttribution(
        heads=torch.stack(heads, 1).float().cpu(),
        mlps=mlps.float().cpu(),
        bias=bias.float().cpu(),
        embed=embed.float().cpu(),
        logit_diff=((normed * direction).sum(1) + bias_u).float().cpu(),
        correct=(logits.argmax(1) == io).cpu(),
    )


def _final_norm(
    model: HookedTransformer, resid: Float[Tensor, "batch d_model"]
) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, " batch"]]:
    """``ln_final`` of one position per prompt, and its scale (ones without normalisation)."""
    if model.cfg.normalization_type is None:
        return resid, torch.ones(len(resid), device=resid.device, dtype=resid.dtype)
    scales: list[Tensor] = []
    with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda t, **_: scales.append(t))]):
        normed = model.ln_final(resid[:, None, :])[:, 0]
    return normed, scales[0][:, 0, 0].to(normed.dtype)


class PromptSeeds(SeedChooser):
    """ACC++'s per-prompt seeds of an IOI trace (module docstring), from the trace's own pass.

    Args:
        dataset: the prompts traced.
        beta: the share of the logit difference the seeds exceed (:func:`seed_mask`).
        correct_only: give seeds only to prompts whose END argmax is the IO token.

    Attributes:
        logit_diff: ``[n_prompts]`` ``logit(IO) - logit(S)`` at END.
        correct: ``[n_prompts]`` whether the model answers the prompt correctly.
        dla: ``[n_prompts, n_layers, n_heads]`` each head's direct logit attribution (its
            parts summed over sources).
    """

    def __init__(
        self, dataset: IOIDataset, n_layers: int, n_heads: int, beta: float = 1.0,
        correct_only: bool = True,
    ):  # fmt: skip
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.dataset, self.beta, self.correct_only = dataset, beta, correct_only
        n = len(dataset)
        self.logit_diff = torch.full((n,), float("nan"))
        self.correct = torch.zeros(n, dtype=torch.bool)
        self.dla = torch.full((n, n_layers, n_heads), float("nan"))
        self._rows: dict[int, pd.DataFrame] = {}  # the seeds of each batch, by first prompt

    def observe(self, model: HookedTransformer, cache: BatchCache, lo: int, hi: int) -> None:
        """Attribute the logit difference of prompts ``lo .. hi - 1`` and choose their seeds."""
        part = self.dataset[lo:hi]
        att = end_attribution(model, cache, part.end_pos, part.io_tokens, part.s_tokens)
        self.logit_diff[lo:hi], self.correct[lo:hi] = att.logit_diff, att.correct
        self.dla[lo:hi] = att.heads.sum(-1)
        flat, cols = att.flat(), att.columns()
        src = torch.tensor(cols.src.to_numpy())
        valid = (src[None, :] <= part.end_pos[:, None]) | (src[None, :] < 0)
        chosen = seed_mask(flat, self.beta, valid)
        if self.correct_only:
            chosen &= att.correct[:, None]
        i, j = chosen.nonzero(as_tuple=True)
        rows = cols.iloc[j.numpy()].reset_index(drop=True)
        rows.insert(0, "prompt_id", (i + lo).numpy())
        rows["attribution"] = flat[i, j].numpy()
        rows["total"] = flat.where(valid, torch.zeros_like(flat)).sum(1)[i].numpy()
        self._rows[lo] = rows

    final_per_batch = True

    def observed(self, lo: int, hi: int) -> dict[str, Any]:
        """The logit differences, answers, DLA and seeds of prompts ``lo .. hi - 1``."""
        return {"logit_diff": self.logit_diff[lo:hi], "correct": self.correct[lo:hi],
                "dla": self.dla[lo:hi], "rows": self._rows[lo]}  # fmt: skip

    def absorb(self, lo: int, hi: int, state: dict[str, Any]) -> None:
        """Take over :meth:`observed` of prompts ``lo .. hi - 1`` from another process."""
        self.logit_diff[lo:hi], self.correct[lo:hi] = state["logit_diff"], state["correct"]
        self.dla[lo:hi] = state["dla"]
        self._rows[lo] = state["rows"]

    def table(self) -> pd.DataFrame:
        """Every seed: prompt_id, kind, layer, head, src, attribution (logits), total (the
        prompt's logit difference less the unembedding bias)."""
        if not self._rows:
            cols = ["prompt_id", "kind", "layer", "head", "src", "attribution", "total"]
            return pd.DataFrame(columns=cols)
        return pd.concat([self._rows[lo] for lo in sorted(self._rows)], ignore_index=True)

    def seed_firings(self, firings: BatchFirings, lo: int) -> np.ndarray:
        """The firings at END of a head seeded, in that prompt, through their source.

        Raises:
            KeyError: the batch starting at ``lo`` was not observed.
        """
        seeds = self._rows[lo]
        heads = seeds[seeds.kind == HEAD]
        n_pos = int(max(firings.src.max(), firings.dest.max(), 0)) + 1 if len(firings) else 1
        n_heads = self.dla.shape[2]

        def key(prompt, layer, head, src):
            return ((np.asarray(prompt) * self.dla.shape[1] + layer) * n_heads + head) * (
                n_pos + 1
            ) + np.minimum(src, n_pos)

        wanted = key(heads.prompt_id - lo, heads.layer, heads["head"], heads.src)
        p = firings.prompt.numpy()
        cols = (p, firings.layer.numpy(), firings.head.numpy(), firings.src.numpy())
        at_end = firings.dest.numpy() == self.dataset.end_pos.numpy()[lo + p]
        return at_end & np.isin(key(*cols), wanted)

    def choose(self) -> list[tuple[int, int]]:
        """Every head seeded in some prompt, by summed attribution over its seeds."""
        heads = self.table()
        heads = heads[heads.kind == HEAD]
        order = heads.groupby(["layer", "head"]).attribution.sum().sort_values(ascending=False)
        return [(int(L), int(h)) for L, h in order.index]

    def candidates(self) -> list[tuple[int, int]]:
        """None: the walk starts from :meth:`seed_firings`."""
        return []
