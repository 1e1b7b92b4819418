"""Feature pairs: the bilinear map between query and key features, and step 2 of the method.

Head ``h``'s reconstructed score from destination ``p`` to source ``s`` is bilinear in the
features (see :mod:`.attribution`)::

    score_hat[p, s] = sum_ij fQ[p, i] fK[s, j] M_h^(p-s)[i, j] + (bias terms)
    M_h^(d)[i, j] = <R_d WQ[i, h], WK[j, g(h)]> / attn_scale

``M_h^(0)`` (no rotation) is the map ``<W_dec_Q[i, h], W_dec_K[j, h]>`` of Wynroe & Sharkey
(2024) up to the score scale; with rotary embeddings the map depends on the offset ``d``.

Step 2 (:func:`train_pair_mask`) learns a mask ``m[i, j] in [0, 1]`` per head (initialised to
1, clamped after every step) so that the masked scores
``sum_ij m[i, j] fQ[p, i] fK[s, j] M_h^(p-s)[i, j] + (bias terms)`` still reproduce the true
pattern, with the loss ``KL(P_true || P_masked) + mu * sum_ij sqrt(m[i, j] + eps)``. The pairs
whose mask survives are the head's condensed (query feature, key feature) interactions.

Only pairs of features active at the two positions contribute, so the terms are computed on
the ``max_active`` largest activations of each token (exact for TopK dictionaries with
``k <= max_active``); the pairs beyond the cap, if any, join the unmasked bias terms, so the
masked score with ``m = 1`` is always exactly the reconstructed score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

from tl_superposition.core.config import Config
from tl_superposition.core.training import Trainer
from tl_superposition.qk.attention import (
    FIRST_QUERY_ROW,
    kl_rows,
    layer_attention,
    log_pattern,
    rotate,
    scores_from_rotated,
)
from tl_superposition.qk.config import AttentionShape
from tl_superposition.qk.source import ContextSource, QKBatch, batches_of_layer, check_reads
from tl_superposition.qk.splice import check_heads
from tl_superposition.qk.transcoder import QKOutput, QKTranscoder

log = logging.getLogger(__name__)


@torch.no_grad()
def bilinear_map(qkt: QKTranscoder, model: HookedTransformer, head: int, offset: int = 0) -> Tensor:
    """``M_h^(offset)[i, j]``: the score one unit of query feature ``i`` at a destination and
    one unit of key feature ``j`` at a source ``offset`` positions earlier contribute.

    Returns:
        float32 ``[d_hidden_q, d_hidden_k]`` in score units (divided by ``attn_scale``).

    Raises:
        ValueError: a head out of range or a negative offset.
    """
    s = qkt.shape
    check_heads([head], s.n_heads)
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (the source precedes the destination), got {offset}")
    attn = layer_attention(model, s.layer)
    wq = qkt.q_decoder()[:, head].float()
    wk = qkt.k_decoder()[:, head // s.group_size].float()
    if offset:
        x = torch.zeros(1, offset + 1, wq.shape[0], s.d_head, device=wq.device)
        x[0, offset] = wq
        wq = rotate(attn, x)[0, offset]
    return wq @ wk.T / float(attn.attn_scale)


class PairTerms(NamedTuple):
    """The sparse pair terms of one head on a batch of contexts.

    Attributes:
        iq: query features kept per position, int64 ``[batch, pos, A]`` (the ``A`` largest).
        ik: key features kept per position, int64 ``[batch, pos, B]``.
        terms: ``fQ[p, iq] fK[s, ik] M^(p-s)[iq, ik]``, ``[batch, pos, A, pos, B]`` (zero where
            a kept feature is inactive).
        rest: reconstructed score minus the sum of ``terms``: the bias terms (and pairs
            beyond the cap), ``[batch, pos, pos]``, ``-inf`` on future keys.
        logp_true: the true log pattern of the head, ``[batch, pos, pos]``.
        q_active, k_active: whether each kept feature is active (bool, like ``iq``/``ik``).
    """

    iq: Tensor
    ik: Tensor
    terms: Tensor
    rest: Tensor
    logp_true: Tensor
    q_active: Tensor
    k_active: Tensor


def _kept(f: Tensor, w: Tensor, cap: int, attn: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The ``cap`` largest activations: indices, rotated scaled decoder rows, activity."""
    vals, idx = f.topk(min(cap, f.shape[-1]), dim=-1)
    rows = w[idx] * vals[..., None]  # [batch, pos, A, d_head]
    return idx, rotate(attn, rows), vals > 0


def head_pair_terms(
    qkt: QKTranscoder,
    model: HookedTransformer,
    batch: QKBatch,
    out: QKOutput,
    head: int,
    max_active: int = 32,
) -> PairTerms:
    """The pair terms of head ``head`` on ``batch`` (see :class:`PairTerms`).

    ``out`` is ``qkt(batch.x)``. Cost: ``batch x pos^2 x A x B`` numbers; keep batches small.
    """
    s = qkt.shape
    attn = layer_attention(model, s.layer)
    g = head // s.group_size
    iq, rq, aq = _kept(out.q_features, qkt.q_decoder()[:, head], max_active, attn)
    ik, rk, ak = _kept(out.k_features, qkt.k_decoder()[:, g], max_active, attn)
    terms = torch.einsum("bpxd,bsyd->bpxsy", rq, rk) / float(attn.attn_scale)
    q_rot, k_rot = rotate(attn, out.q), rotate(attn, out.k)
    recon = scores_from_rotated(attn, q_rot, k_rot)[:, head]
    rest = recon - terms.sum((2, 4))
    with torch.no_grad():
        true = scores_from_rotated(attn, rotate(attn, batch.q), rotate(attn, batch.k))[:, head]
    return PairTerms(iq, ik, terms, rest, log_pattern(true), aq, ak)


# ---------------------------------------------------------------------------------------
# step 2: the feature-pair mask


@dataclass
class PairMaskConfig(Config):
    """Hyperparameters of :func:`train_pair_mask`.

    Attributes:
        steps: optimisation steps.
        batch_contexts: contexts per step (memory grows as ``batch x pos^2 x A x B``).
        lr: Adam learning rate of the mask.
        mu: weight of the penalty ``sum_ij sqrt(m_ij + eps)`` (summed over all pairs).
        eps: the ``eps`` inside the square root.
        max_active: features kept per token (``A = B``).
        threshold: a pair is kept when its mask is at least this.
        seed: seed of the data order.
    """

    steps: int = 200
    batch_contexts: int = 2
    lr: float = 0.02
    mu: float = 1e-5
    eps: float = 1e-6
    max_active: int = 32
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_contexts": self.batch_contexts >= 1,
            "lr": self.lr > 0,
            "mu": self.mu >= 0,
            "eps": self.eps > 0,
            "max_active": self.max_active >= 1,
            "threshold": 0 < self.threshold <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"PairMaskConfig: invalid {bad} (see the field docs)")


class FeaturePairMask(HookedRootModule):
    """The mask ``m[head, i, j] in [0, 1]`` over (query feature, key feature) pairs.

    Args:
        heads: the query heads it masks.
        d_hidden_q, d_hidden_k: dictionary sizes.

    Hook points: ``hook_masked_scores`` (``[batch, pos, pos]`` masked scores of one head).
    """

    def __init__(self, heads: Sequence[int], d_hidden_q: int, d_hidden_k: int) -> None:
        super().__init__()
        self.heads = [int(h) for h in heads]
        self.mask = nn.Parameter(torch.ones(len(self.heads), d_hidden_q, d_hidden_k))
        self.hook_masked_scores = HookPoint()
        self.setup()

    def slot(self, head: int) -> int:
        """Index of ``head`` in :attr:`heads`."""
        return self.heads.index(head)

    def forward(self, pt: PairTerms, head: int) -> Tensor:  # type: ignore[override]
        """Masked scores ``sum m * terms + rest`` of ``head``, ``[batch, pos, pos]``."""
        m = self.mask[self.slot(head)]
        gathered = m[pt.iq[:, :, :, None, None], pt.ik[:, None, None, :, :]]
        return self.hook_masked_scores((gathered * pt.terms).sum((2, 4)) + pt.rest)


@dataclass
class PairMaskResult:
    """What :func:`train_pair_mask` returns.

    Attributes:
        mask: the trained :class:`FeaturePairMask`.
        history: per step and head: kl (masked vs true), kl_unmasked (reconstruction vs
            true), kept (pairs with mask >= threshold among those seen co-active).
        pairs: the condensed pairs (:func:`condensed_pairs`).
        seen: per head, co-active counts of every pair on the training batches
            (``[d_hidden_q, d_hidden_k]``, int64).
    """

    mask: FeaturePairMask
    history: pd.DataFrame
    pairs: pd.DataFrame
    seen: dict[int, Tensor] = field(repr=False)


def _co_active(pt: PairTerms) -> tuple[Tensor, Tensor, Tensor]:
    """Query feature, key feature and term of every co-active pair at causal (p, s) places."""
    n = pt.terms.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=pt.terms.device).tril()
    active = (
        pt.q_active[:, :, :, None, None]
        & pt.k_active[:, None, None, :, :]
        & causal[None, :, None, :, None]
    )
    b, p, x, s_, y = active.nonzero(as_tuple=True)
    return pt.iq[b, p, x], pt.ik[b, s_, y], pt.terms[b, p, x, s_, y]


def train_pair_mask(
    qkt: QKTranscoder,
    model: HookedTransformer,
    source: ContextSource,
    heads: Sequence[int],
    cfg: PairMaskConfig | None = None,
    *,
    progress: bool = True,
) -> PairMaskResult:
    """Learn the feature-pair mask of ``heads`` (step 2 of Wynroe & Sharkey 2024).

    The transcoder stays fixed; batches come from epoch 0 of ``source`` (cycling if needed).

    Raises:
        ValueError: a head out of range, or ``source`` belongs to another layer.
    """
    cfg = cfg or PairMaskConfig()
    s = qkt.shape
    heads = check_heads(heads, s.n_heads) or []
    check_reads(source, s)
    dq, dk = qkt.cfg.d_hidden_q, qkt.cfg.d_hidden_k
    mask = FeaturePairMask(heads, dq, dk).to(qkt.q_dict.W_dec.device)
    seen = {h: torch.zeros(dq * dk, dtype=torch.long) for h in heads}
    qkt.eval()
    for p in qkt.parameters():
        p.requires_grad_(False)

    def clamp(*_: Any) -> None:
        with torch.no_grad():
            mask.mask.clamp_(0.0, 1.0)

    trainer = Trainer(torch.optim.Adam(mask.parameters(), lr=cfg.lr), cfg.steps, after_step=[clamp])
    try:
        batches = _cycle(source, s, cfg.batch_contexts)
        for _ in tqdm(range(cfg.steps), desc="pair mask", disable=not progress):
            batch = next(batches)

            def step_fn(step: int, batch: QKBatch = batch) -> None:
                with torch.no_grad():
                    out = qkt(batch.x)
                for h in heads:  # one backward pass per head, gradients summed
                    trainer.log(_head_step(qkt, model, mask, batch, out, h, seen[h], step, cfg))

            trainer.run_step(step_fn)
    finally:
        for p in qkt.parameters():
            p.requires_grad_(True)
    seen2d = {h: v.view(dq, dk) for h, v in seen.items()}
    pairs = condensed_pairs(mask, seen2d, cfg.threshold)
    return PairMaskResult(mask, pd.DataFrame(trainer.history), pairs, seen2d)


def _head_step(
    qkt: QKTranscoder,
    model: HookedTransformer,
    mask: FeaturePairMask,
    batch: QKBatch,
    out: Any,
    h: int,
    seen: Tensor,
    step: int,
    cfg: PairMaskConfig,
) -> dict[str, Any]:
    """Backpropagate head ``h``'s masked KL and penalty on ``batch``; count its co-active pairs
    in ``seen``; return its history row."""
    dk = qkt.cfg.d_hidden_k
    with torch.no_grad():
        pt = head_pair_terms(qkt, model, batch, out, h, cfg.max_active)
        i, j, _ = _co_active(pt)
        seen.index_add_(0, (i * dk + j).cpu(), torch.ones_like(i).cpu())
    masked = mask(pt, h)
    rows_kl = kl_rows(pt.logp_true[:, None], log_pattern(masked)[:, None])
    kl = rows_kl[..., FIRST_QUERY_ROW:].mean()
    m = mask.mask[mask.slot(h)]
    penalty = torch.sqrt(m.abs() + cfg.eps).sum()
    (kl + cfg.mu * penalty).backward()
    with torch.no_grad():
        unmasked = kl_rows(
            pt.logp_true[:, None], log_pattern(pt.rest + pt.terms.sum((2, 4)))[:, None]
        )
        kept = ((m >= cfg.threshold).reshape(-1).cpu() & (seen > 0)).sum()
    return {
        "step": step,
        "head": h,
        "kl": float(kl.detach()),
        "kl_unmasked": float(unmasked[..., FIRST_QUERY_ROW:].mean()),
        "kept": int(kept),
    }


def _cycle(source: ContextSource, shape: AttentionShape, batch_contexts: int):
    epoch = 0
    while True:
        n = 0
        for batch in batches_of_layer(source, shape, batch_contexts, epoch):
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the source yields no batch")
        epoch += 1


def condensed_pairs(
    mask: FeaturePairMask, seen: dict[int, Tensor], threshold: float = 0.5
) -> pd.DataFrame:
    """The (head, query feature, key feature) pairs the mask keeps.

    Args:
        mask: a trained :class:`FeaturePairMask`.
        seen: per head, co-active counts ``[d_hidden_q, d_hidden_k]`` (pairs never seen
            together carry no evidence and are left out).
        threshold: keep pairs with ``mask >= threshold``.

    Returns:
        Columns head, q_feature, k_feature, mask, n_co_active; sorted by head, then mask
        and co-activity (largest first).
    """
    frames = []
    for h in mask.heads:
        m = mask.mask[mask.slot(h)].detach().cpu()
        keep = (m >= threshold) & (seen[h] > 0)
        i, j = keep.nonzero(as_tuple=True)
        frames.append(
            pd.DataFrame(
                {
                    "head": h,
                    "q_feature": i.numpy(),
                    "k_feature": j.numpy(),
                    "mask": m[i, j].numpy(),
                    "n_co_active": seen[h][i, j].numpy(),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(out):
        out = out.sort_values(["head", "mask", "n_co_active"], ascending=[True, False, False])
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# statistics over data


@dataclass
class PairStats:
    """Per head, statistics of every (query feature, key feature) pair over causal places.

    Attributes:
        head: the query head.
        n_places: causal (destination, source) places seen (contexts x pos (pos+1) / 2).
        count: places where both features are active, int64 ``[d_hidden_q, d_hidden_k]``.
        total: sum of the pair's score terms there, float64 (same shape).
        total_abs: sum of their absolute values.
    """

    head: int
    n_places: int
    count: Tensor
    total: Tensor
    total_abs: Tensor

    def mean_term(self) -> Tensor:
        """Mean score term where co-active (NaN where never)."""
        return self.total / self.count.clamp_min(1) + torch.where(self.count > 0, 0.0, torch.nan)


@torch.no_grad()
def pair_statistics(
    qkt: QKTranscoder,
    model: HookedTransformer,
    source: ContextSource,
    heads: Sequence[int],
    *,
    n_contexts: int = 64,
    batch_contexts: int = 2,
    max_active: int = 32,
    progress: bool = True,
) -> dict[int, PairStats]:
    """Co-activity counts and score terms of all pairs of ``heads`` on ``n_contexts`` contexts.

    Returns:
        ``{head: PairStats}``.
    """
    s = qkt.shape
    heads = check_heads(heads, s.n_heads) or []
    dq, dk = qkt.cfg.d_hidden_q, qkt.cfg.d_hidden_k
    stats = {
        h: PairStats(
            h,
            0,
            torch.zeros(dq * dk, dtype=torch.long),
            torch.zeros(dq * dk, dtype=torch.float64),
            torch.zeros(dq * dk, dtype=torch.float64),
        )
        for h in heads
    }
    seen = 0
    bar = tqdm(total=n_contexts, desc="pair statistics", disable=not progress, unit="ctx")
    for batch in batches_of_layer(source, qkt.shape, batch_contexts, 0):
        out = qkt(batch.x)
        n = batch.x.shape[1]
        for h in heads:
            pt = head_pair_terms(qkt, model, batch, out, h, max_active)
            i, j, v = _co_active(pt)
            flat = (i * dk + j).cpu()
            st = stats[h]
            st.count.index_add_(0, flat, torch.ones_like(flat))
            st.total.index_add_(0, flat, v.double().cpu())
            st.total_abs.index_add_(0, flat, v.double().abs().cpu())
            st.n_places += batch.x.shape[0] * n * (n + 1) // 2
        seen += batch.x.shape[0]
        bar.update(batch.x.shape[0])
        if seen >= n_contexts:
            break
    bar.close()
    for st in stats.values():
        st.count = st.count.view(dq, dk)
        st.total = st.total.view(dq, dk)
        st.total_abs = st.total_abs.view(dq, dk)
    return stats
