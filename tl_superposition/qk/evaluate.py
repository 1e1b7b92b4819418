"""Evaluation of a QK transcoder on held-out contexts, against two baselines.

For every batch of token contexts the model runs once in full (clean next-token loss, and
``x``, ``q``, ``k`` and the residual stream entering layer ``L`` are cached); every spliced
variant then reruns only layers ``L..`` from that residual stream (``start_at_layer``), so the
comparison costs a fraction of a forward pass per variant.

Figures (KL in nats per query row: mean of ``KL(P_true || P)`` over contexts, heads and query
rows ``1..ctx-1``; losses in nats per predicted token):

- ``kl_full``, ``kl_q``, ``kl_k``: pattern from (q_hat, k_hat), (q_hat, k), (q, k_hat);
- ``kl_full_heads``: ``kl_full`` over the heads of interest only;
- ``l0_q_median``, ``l0_q_mean`` (and ``_k``): active features per token;
- ``dead_q``, ``dead_k``: fraction of features that fire on none of the evaluated tokens;
- ``loss_delta``: next-token loss with the replacement spliced into every head of the layer
  minus the clean loss; ``loss_delta_heads``: spliced into the heads of interest only.

Methods compared in the same run: ``transcoder``; ``mean_qk``, every query and key replaced by
its data mean (per head; means taken over the evaluated tokens); ``uniform``, the uniform
causal pattern. With absolute positions, constant queries and keys give the uniform pattern,
so the two baselines agree on GPT-2-shaped models; with RoPE they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.activations.batches import run_hooks
from tl_superposition.core.hooks import block_hook
from tl_superposition.qk.attention import (
    FIRST_QUERY_ROW,
    causal_mask,
    kl_rows,
    layer_attention,
    log_pattern,
    rotate,
    scores_from_rotated,
)
from tl_superposition.qk.splice import Hooks, check_heads, qk_hooks, uniform_pattern_hooks
from tl_superposition.qk.transcoder import QKTranscoder

METHODS = ("transcoder", "mean_qk", "uniform")


@dataclass
class QKEvalResult:
    """What :func:`evaluate_qk` measured.

    Attributes:
        metrics: one row per method (``transcoder``, ``mean_qk``, ``uniform``), the columns
            of the module docstring (NaN where a figure does not apply).
        summary: ``n_contexts``, ``n_tokens``, ``context_size``, ``layer``, ``heads``,
            ``clean_loss``.
        firing_counts_q, firing_counts_k: per feature, the evaluated tokens it fired on.
        l0_q, l0_k: active features of every evaluated token (flattened).
    """

    metrics: pd.DataFrame
    summary: dict[str, Any]
    firing_counts_q: Tensor
    firing_counts_k: Tensor
    l0_q: Tensor = field(repr=False)
    l0_k: Tensor = field(repr=False)

    def table(self) -> pd.DataFrame:
        """The metrics rounded to 4 decimals, for display."""
        return self.metrics.round(4)


class _Means:
    """Running sums for the per-head mean query and key."""

    def __init__(self) -> None:
        self.q: Tensor | None = None
        self.k: Tensor | None = None
        self.n = 0

    def add(self, q: Tensor, k: Tensor) -> None:
        sq, sk = q.double().sum((0, 1)), k.double().sum((0, 1))
        self.q = sq if self.q is None else self.q + sq
        self.k = sk if self.k is None else self.k + sk
        self.n += q.shape[0] * q.shape[1]


def _run_clean(
    model: HookedTransformer, tokens: Tensor, layer: int, loss: bool = True
) -> tuple[Tensor | None, dict]:
    """The clean per-token loss (``None`` without ``loss``: the pass stops after ``layer``)
    and the layer's activations."""
    names = {
        block_hook(layer, "hook_resid_pre"),
        block_hook(layer, "ln1.hook_normalized"),
        block_hook(layer, "attn.hook_q"),
        block_hook(layer, "attn.hook_k"),
    }
    if not loss:
        cache = run_hooks(model, tokens, sorted(names))
        return None, {k.split(".", 2)[-1]: v for k, v in cache.items()}
    value, cache = model.run_with_cache(
        tokens, return_type="loss", loss_per_token=True, names_filter=lambda n: n in names
    )
    assert isinstance(value, Tensor)
    return value, {k.split(".", 2)[-1]: v for k, v in cache.items()}


def _spliced_loss(
    model: HookedTransformer, resid: Tensor, tokens: Tensor, layer: int, hooks: Hooks
) -> Tensor:
    with model.hooks(fwd_hooks=hooks):
        return model(
            resid, start_at_layer=layer, tokens=tokens, return_type="loss", loss_per_token=True
        )


@torch.no_grad()
def evaluate_qk(
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Tensor,
    *,
    heads: Sequence[int] | None = None,
    batch_contexts: int = 16,
    losses: bool = True,
    progress: bool = True,
) -> QKEvalResult:
    """Measure ``qkt`` and the baselines on the contexts ``tokens`` (held-out text).

    Args:
        qkt: the QK transcoder.
        model: its model.
        tokens: int64 ``[n_contexts, ctx]`` (e.g. :func:`~tl_superposition.activations.pack_text`
            of a test split).
        heads: the heads of interest (default all heads of the layer).
        batch_contexts: contexts per forward pass.
        losses: also measure the next-token loss with each replacement spliced in (six more
            passes through layers ``L..`` per batch). ``False``: patterns, L0 and dead features
            only, from a pass that stops after layer ``L`` (the loss columns are NaN).

    Memory: the first pass keeps ``x``, ``q``, ``k`` and the residual stream of every context
    (the means of ``q`` and ``k`` over all of them are needed before the second pass); for
    SmolLM2 that is about 7.7 KB per token, 0.5 GB for 65,536 tokens.

    Returns:
        A :class:`QKEvalResult`.

    Raises:
        ValueError: ``qkt`` does not fit ``model``, ``tokens`` is not 2-D with at least two
            positions, or a head is out of range.
    """
    qkt.check_model(model)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be [n_contexts >= 1, ctx >= 2], got {tuple(tokens.shape)}")
    shape = qkt.shape
    heads = check_heads(heads, shape.n_heads) or list(range(shape.n_heads))
    layer = shape.layer
    # Pass 1: the means of q and k over the evaluated tokens (the mean-q/k baseline).
    means = _Means()
    batches = [tokens[i : i + batch_contexts] for i in range(0, tokens.shape[0], batch_contexts)]
    acc = _Accumulator(qkt, heads)
    bar = tqdm(batches, desc="eval-qk", disable=not progress, unit="batch")
    cached = []
    for batch in bar:
        batch = batch.to(model.cfg.device)
        clean, cache = _run_clean(model, batch, layer, losses)
        means.add(cache["attn.hook_q"], cache["attn.hook_k"])
        cached.append((batch, clean, cache))
    assert means.q is not None and means.k is not None
    q_mean = (means.q / means.n).float()
    k_mean = (means.k / means.n).float()
    # Pass 2: patterns and spliced losses.
    variants = _variants(model, qkt, q_mean, k_mean, heads) if losses else {}
    for batch, clean, cache in tqdm(cached, desc="eval-qk splices", disable=not progress):
        acc.add_patterns(model, cache, q_mean, k_mean)
        if clean is not None:
            acc.add_loss("clean", clean)
        for name, hooks in variants.items():
            acc.add_loss(name, _spliced_loss(model, cache["hook_resid_pre"], batch, layer, hooks))
    return acc.result(tokens, layer, heads)


def _variants(
    model: HookedTransformer,
    qkt: QKTranscoder,
    q_mean: Tensor,
    k_mean: Tensor,
    heads: list[int],
) -> dict[str, Hooks]:
    shape = qkt.shape

    def mean_q(x: Tensor, q: Tensor) -> Tensor:
        del x
        return q_mean.to(q).expand_as(q)

    def mean_k(x: Tensor, k: Tensor) -> Tensor:
        del x
        return k_mean.to(k).expand_as(k)

    return {
        "transcoder": qk_hooks(model, shape, qkt.reconstruct_q, qkt.reconstruct_k),
        "transcoder_heads": qk_hooks(model, shape, qkt.reconstruct_q, qkt.reconstruct_k, heads),
        "mean_qk": qk_hooks(model, shape, mean_q, mean_k),
        "mean_qk_heads": qk_hooks(model, shape, mean_q, mean_k, heads),
        "uniform": uniform_pattern_hooks(shape),
        "uniform_heads": uniform_pattern_hooks(shape, heads),
    }


class _Accumulator:
    """Sums of the per-row KLs, losses, L0 and firing counts over batches."""

    def __init__(self, qkt: QKTranscoder, heads: list[int]) -> None:
        self.qkt = qkt
        self.heads = heads
        self.kl: dict[str, list[float]] = {}
        self.loss: dict[str, list[Tensor]] = {}
        self.l0_q: list[Tensor] = []
        self.l0_k: list[Tensor] = []
        self.count_q = torch.zeros(qkt.cfg.d_hidden_q, dtype=torch.long)
        self.count_k = torch.zeros(qkt.cfg.d_hidden_k, dtype=torch.long)
        self.rows = 0  # query rows entering the mean KL (all heads)
        self.rows_heads = 0  # the same for the heads of interest

    def _kl(self, name: str, logp_true: Tensor, logp: Tensor) -> None:
        rows = kl_rows(logp_true, logp)[..., FIRST_QUERY_ROW:]
        self.kl.setdefault(name, []).append(float(rows.sum()))
        self.kl.setdefault(name + "_heads", []).append(float(rows[:, self.heads].sum()))

    def add_patterns(
        self, model: HookedTransformer, cache: dict, q_mean: Tensor, k_mean: Tensor
    ) -> None:
        qkt = self.qkt
        attn = layer_attention(model, qkt.shape.layer)
        q, k = cache["attn.hook_q"].float(), cache["attn.hook_k"].float()
        out = qkt(cache["ln1.hook_normalized"].float())
        rot = {
            "q": rotate(attn, q),
            "k": rotate(attn, k),
            "q_hat": rotate(attn, out.q),
            "k_hat": rotate(attn, out.k),
            "q_mean": rotate(attn, q_mean.to(q).expand_as(q)),
            "k_mean": rotate(attn, k_mean.to(k).expand_as(k)),
        }

        def lp(a: str, b: str) -> Tensor:
            return log_pattern(scores_from_rotated(attn, rot[a], rot[b]))

        logp_true = lp("q", "k")
        n = q.shape[1]
        per_head = q.shape[0] * (n - FIRST_QUERY_ROW)
        self.rows += per_head * q.shape[2]
        self.rows_heads += per_head * len(self.heads)
        mask = causal_mask(n, q.device)
        uniform = torch.where(
            mask, -torch.log(mask.sum(-1, keepdim=True).float()), -torch.inf
        ).expand_as(logp_true)
        pairs = {
            "transcoder_full": ("q_hat", "k_hat"),
            "transcoder_q": ("q_hat", "k"),
            "transcoder_k": ("q", "k_hat"),
            "mean_qk_full": ("q_mean", "k_mean"),
            "mean_qk_q": ("q_mean", "k"),
            "mean_qk_k": ("q", "k_mean"),
        }
        for name, (a, b) in pairs.items():
            self._kl(name, logp_true, lp(a, b))
        for part in ("full", "q", "k"):
            self._kl(f"uniform_{part}", logp_true, uniform)
        fq = out.q_features.reshape(-1, out.q_features.shape[-1])
        fk = out.k_features.reshape(-1, out.k_features.shape[-1])
        self.l0_q.append((fq > 0).sum(-1).cpu())
        self.l0_k.append((fk > 0).sum(-1).cpu())
        self.count_q += (fq > 0).sum(0).cpu()
        self.count_k += (fk > 0).sum(0).cpu()

    def add_loss(self, name: str, loss: Tensor) -> None:
        self.loss.setdefault(name, []).append(loss.detach().float().cpu().reshape(-1))

    def _mean_loss(self, name: str) -> float:
        return torch.cat(self.loss[name]).mean().item() if name in self.loss else np.nan

    def result(self, tokens: Tensor, layer: int, heads: list[int]) -> QKEvalResult:
        rows, rows_heads = self.rows, self.rows_heads
        clean = torch.cat(self.loss["clean"]).mean().item() if self.loss else np.nan
        l0_q, l0_k = torch.cat(self.l0_q).float(), torch.cat(self.l0_k).float()
        table = []
        for method in METHODS:
            row: dict[str, Any] = {"method": method}
            for part in ("full", "q", "k"):
                row[f"kl_{part}"] = sum(self.kl[f"{method}_{part}"]) / rows
            row["kl_full_heads"] = sum(self.kl[f"{method}_full_heads"]) / rows_heads
            is_tc = method == "transcoder"
            row["l0_q_median"] = float(l0_q.median()) if is_tc else np.nan
            row["l0_q_mean"] = float(l0_q.mean()) if is_tc else np.nan
            row["l0_k_median"] = float(l0_k.median()) if is_tc else np.nan
            row["l0_k_mean"] = float(l0_k.mean()) if is_tc else np.nan
            row["dead_q"] = float((self.count_q == 0).float().mean()) if is_tc else np.nan
            row["dead_k"] = float((self.count_k == 0).float().mean()) if is_tc else np.nan
            row["loss_delta"] = self._mean_loss(method) - clean
            row["loss_delta_heads"] = self._mean_loss(method + "_heads") - clean
            table.append(row)
        summary = {
            "n_contexts": int(tokens.shape[0]),
            "n_tokens": int(tokens.numel()),
            "context_size": int(tokens.shape[1]),
            "layer": layer,
            "heads": heads,
            "clean_loss": clean,
        }
        return QKEvalResult(
            metrics=pd.DataFrame(table).set_index("method"),
            summary=summary,
            firing_counts_q=self.count_q,
            firing_counts_k=self.count_k,
            l0_q=l0_q,
            l0_k=l0_k,
        )
