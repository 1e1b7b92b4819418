"""pandas tables for inspecting a QK transcoder: feature pairs, feature contexts, partners.

- :func:`pair_table`: per head, the (query feature, key feature) pairs that carry most of the
  head's scores on data, with their bilinear strength, mask value and co-activity;
- :func:`feature_activations` / :func:`top_activating_contexts`: where a feature fires, the
  token in bold (``**token**``) within its surrounding text (cut at document separators);
  :func:`top_tokens`: the tokens it fires on most; :func:`styled` renders the bold;
- :func:`strongest_partners`: the features of the other side a feature interacts with most;
- :func:`feature_density`: how often each feature fires.
"""

from __future__ import annotations

import html
import re
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pandas.io.formats.style import Styler
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations.batches import run_hooks
from tl_superposition.qk.pairs import PairMaskResult, PairStats, bilinear_map
from tl_superposition.qk.transcoder import QKTranscoder

Side = Literal["q", "k"]


def pair_table(
    qkt: QKTranscoder,
    model: HookedTransformer,
    stats: PairStats,
    *,
    mask: PairMaskResult | None = None,
    top: int = 20,
) -> pd.DataFrame:
    """The pairs of ``stats.head`` with the largest total |score term| over the data.

    Args:
        stats: :func:`.pairs.pair_statistics` of the head.
        mask: a trained feature-pair mask covering the head (adds its ``mask`` value).
        top: rows returned.

    Returns:
        Columns head, q_feature, k_feature, strength (the bilinear map at offset 0,
        ``<WQ_i, WK_j> / attn_scale``), mean_term (mean score term where both fire),
        total_abs (sum of |term| over the data), share (of the head's total |pair terms|),
        n_co_active (causal places where both fire), co_active_frac (of all causal places),
        and mask when given.
    """
    total_abs = stats.total_abs.reshape(-1)
    k = min(top, int((total_abs > 0).sum()))
    vals, flat = total_abs.topk(k)
    dk = stats.count.shape[1]
    i, j = flat // dk, flat % dk
    strength = bilinear_map(qkt, model, stats.head)[i, j].detach().cpu()
    count = stats.count[i, j]
    df = pd.DataFrame(
        {
            "head": stats.head,
            "q_feature": i.numpy(),
            "k_feature": j.numpy(),
            "strength": strength.numpy(),
            "mean_term": (stats.total[i, j] / count.clamp_min(1)).numpy(),
            "total_abs": vals.numpy(),
            "share": (vals / total_abs.sum().clamp_min(1e-30)).numpy(),
            "n_co_active": count.numpy(),
            "co_active_frac": (count / max(stats.n_places, 1)).numpy(),
        }
    )
    if mask is not None and stats.head in mask.mask.heads:
        m = mask.mask.mask[mask.mask.slot(stats.head)].detach().cpu()
        df["mask"] = m[i, j].numpy()
    return df


@torch.no_grad()
def feature_activations(
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Tensor,
    *,
    batch_contexts: int = 16,
) -> tuple[Tensor, Tensor]:
    """Query and key feature activations of every token of ``tokens`` (``[n, ctx]``).

    Runs the model up to the transcoder's layer.

    Returns:
        ``(f_q [n, ctx, d_hidden_q], f_k [n, ctx, d_hidden_k])`` on the CPU.
    """
    qkt.check_model(model)
    name = qkt.shape.hook("ln1.hook_normalized")
    fq, fk = [], []
    for lo in range(0, tokens.shape[0], batch_contexts):
        batch = tokens[lo : lo + batch_contexts].to(model.cfg.device)
        cache = run_hooks(model, batch, [name])
        x = cache[name].float()
        fq.append(qkt.encode_q(x).cpu())
        fk.append(qkt.encode_k(x).cpu())
    return torch.cat(fq), torch.cat(fk)


def _piece(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""


def top_activating_contexts(
    acts: Tensor,
    tokens: Tensor,
    tokenizer: Any,
    feature: int,
    *,
    n: int = 10,
    window: int = 10,
    separators: Collection[int] = (),
) -> pd.DataFrame:
    """The ``n`` tokens where ``feature`` fires most strongly, each with its context.

    Args:
        acts: feature activations ``[n_contexts, ctx, d_hidden]`` (:func:`feature_activations`).
        tokens: the same contexts' token ids ``[n_contexts, ctx]``.
        tokenizer: to decode tokens.
        feature: the feature.
        window: tokens shown before the firing token (and half as many after it).
        separators: token ids that end a document (BOS, EOS): the text shown stops at them,
            so a context never runs into another document.

    Returns:
        Columns context_id, pos, activation, token, text (``... **token** ...``).

    Raises:
        ValueError: ``feature`` out of range.
    """
    if not 0 <= feature < acts.shape[-1]:
        raise ValueError(f"feature must be in 0..{acts.shape[-1] - 1}, got {feature}")
    a = acts[..., feature].reshape(-1)
    k = min(n, int((a > 0).sum()))
    vals, flat = a.topk(k) if k else (a[:0], torch.zeros(0, dtype=torch.long))
    ctx = acts.shape[1]
    rows = []
    for v, f in zip(vals.tolist(), flat.tolist(), strict=True):
        c, p = divmod(f, ctx)
        ids = tokens[c].tolist()
        lo, hi = _document(ids, p, separators)
        before = _piece(tokenizer, ids[max(lo, p - window) : p])
        tok = _piece(tokenizer, [ids[p]])
        after = _piece(tokenizer, ids[p + 1 : min(hi, p + 1 + max(1, window // 2))])
        text = f"{before}**{tok}**{after}".replace("\n", "\\n")
        rows.append({"context_id": c, "pos": p, "activation": v, "token": tok, "text": text})
    return pd.DataFrame(rows, columns=["context_id", "pos", "activation", "token", "text"])


def _document(ids: list[int], pos: int, separators: Collection[int]) -> tuple[int, int]:
    """``[lo, hi)``: the span around ``pos`` between separators (``pos`` itself allowed)."""
    lo = max((i + 1 for i in range(pos) if ids[i] in separators), default=0)
    hi = min((i for i in range(pos + 1, len(ids)) if ids[i] in separators), default=len(ids))
    return lo, hi


def top_tokens(
    acts: Tensor, tokens: Tensor, tokenizer: Any, feature: int, *, n: int = 10
) -> pd.DataFrame:
    """The tokens ``feature`` fires on most: by total activation over ``acts``.

    Args:
        acts: feature activations ``[n_contexts, ctx, d_hidden]``.
        tokens: the same contexts' token ids ``[n_contexts, ctx]``.
        tokenizer: to decode tokens.
        feature: the feature.
        n: rows returned.

    Returns:
        Columns token, token_id, firings, mean_activation, share (of the feature's total
        activation), sorted by total activation.
    """
    a = acts[..., feature].reshape(-1)
    ids = tokens.reshape(-1)[a > 0].numpy()
    vals = a[a > 0].double().numpy()
    table = pd.DataFrame({"token_id": ids, "act": vals}).groupby("token_id")["act"]
    out = pd.DataFrame(
        {"firings": table.size(), "total": table.sum(), "mean_activation": table.mean()}
    ).sort_values("total", ascending=False)
    out = pd.DataFrame(out.head(n)).reset_index()
    out["share"] = out.total / max(float(vals.sum()), 1e-30)
    out["token"] = [_piece(tokenizer, [int(t)]) for t in out.token_id]
    return pd.DataFrame(out[["token", "token_id", "firings", "mean_activation", "share"]])


def styled(df: pd.DataFrame) -> Styler:
    """A Styler showing ``**token**`` in the ``text`` column in bold (HTML-escaped otherwise)."""

    def bold(s: str) -> str:
        return re.sub(r"\*\*(.*?)\*\*", r"<b>\1</b>", html.escape(s), flags=re.S)

    styler = df.style.format({"text": bold})
    assert isinstance(styler, Styler)
    return styler


def strongest_partners(
    stats: PairStats,
    feature: int,
    side: Side = "q",
    *,
    n: int = 10,
) -> pd.DataFrame:
    """The features of the other side that share most score with ``feature`` on ``stats.head``.

    Args:
        stats: pair statistics of the head.
        feature: a query feature (``side="q"``) or a key feature (``side="k"``).

    Returns:
        Columns partner, total_abs, mean_term, n_co_active; largest ``total_abs`` first.
    """
    if side not in ("q", "k"):
        raise ValueError(f"side must be 'q' or 'k', got {side!r}")
    take = (lambda t: t[feature]) if side == "q" else (lambda t: t[:, feature])
    total_abs, total, count = take(stats.total_abs), take(stats.total), take(stats.count)
    k = min(n, int((total_abs > 0).sum()))
    vals, idx = total_abs.topk(k)
    return pd.DataFrame(
        {
            "partner": idx.numpy(),
            "total_abs": vals.numpy(),
            "mean_term": (total[idx] / count[idx].clamp_min(1)).numpy(),
            "n_co_active": count[idx].numpy(),
        }
    )


def feature_density(acts: Tensor) -> np.ndarray:
    """Fraction of tokens on which each feature fires, ``[d_hidden]`` (from ``[..., d_hidden]``)."""
    flat = acts.reshape(-1, acts.shape[-1])
    return (flat > 0).float().mean(0).numpy()
