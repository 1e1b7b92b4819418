"""The feature pairs that carry a head's IOI firings, and what names those features.

For a circuit head and its roles (``END -> IO`` for a name mover, ``S2 -> S1+1`` for an
S-inhibition input, ...), :func:`ioi_pairs` sums the head's (query feature, key feature) pair
terms (:func:`~tl_superposition.qk.pairs.head_pair_terms`) at those positions over IOI prompts
and ranks the pairs by their mean part of the score. :func:`feature_card` then names a
feature from ordinary text: its top-activating contexts (:func:`~.tables.top_activating_contexts`,
cut at document separators) and the tokens it fires on most (:func:`~.tables.top_tokens`).
Together they answer "which features make head 23.0 attend from END to IO, and what are
they?" (a name token, a duplicate name, a position).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.ioi import IOIDataset, role_positions
from tl_superposition.qk.attention import layer_attention, rotate, scores_from_rotated
from tl_superposition.qk.pairs import head_pair_terms
from tl_superposition.qk.source import run_to_layer
from tl_superposition.qk.tables import top_activating_contexts, top_tokens
from tl_superposition.qk.transcoder import QKTranscoder

PAIR_COLUMNS = [
    "q_feature", "k_feature", "n_prompts", "mean_term", "share_of_score", "mean_q_act",
    "mean_k_act",
]  # fmt: skip


@torch.no_grad()
def ioi_pairs(
    qkt: QKTranscoder,
    model: HookedTransformer,
    dataset: IOIDataset,
    head: int,
    dest_role: str = "END",
    src_role: str = "IO",
    *,
    top: int | None = 10,
    max_active: int = 32,
    batch_size: int = 32,
) -> pd.DataFrame:
    """The pairs that carry head ``head``'s score from ``dest_role`` to ``src_role``.

    Args:
        qkt: the QK transcoder of the head's layer.
        model: its model.
        dataset: IOI prompts (held out from what the dictionary or the circuit was chosen on).
        head: query head of ``qkt``'s layer.
        dest_role, src_role: roles of :data:`tl_superposition.ioi.ROLES` (``"END"``,
            ``"IO"``, ``"S1+1"``, ...); prompts where a role has no position, or where the
            source comes after the destination, are skipped.
        top: pairs returned (``None``: every active pair).
        max_active: features kept per position (the largest activations).
        batch_size: prompts per forward pass.

    Returns:
        The ``top`` pairs by ``|mean_term|``: q_feature, k_feature, n_prompts (prompts where
        both are active), mean_term (the pair's term averaged over all prompts, score units),
        share_of_score (``mean_term`` / the mean score), mean_q_act, mean_k_act (over the
        prompts where the pair is active). ``attrs`` holds ``mean_score`` (the model's),
        ``mean_rest`` (the bias terms and pairs beyond ``max_active``), ``mean_error`` (score
        minus reconstructed score) and ``n_prompts``: over every pair, ``mean_term`` sums with
        ``mean_rest`` and ``mean_error`` to ``mean_score``.

    Raises:
        ValueError: a head out of range or an unknown role.
    """
    s = qkt.shape
    if not 0 <= head < s.n_heads:
        raise ValueError(f"head must be in 0..{s.n_heads - 1}, got {head}")
    roles = role_positions(dataset, model)
    for role in (dest_role, src_role):
        if role not in roles:
            raise ValueError(f"unknown role {role!r}; roles: {sorted(roles)}")
    sums: dict[tuple[int, int], np.ndarray] = {}
    totals = np.zeros(4)  # score, error, rest, prompts
    for lo in range(0, len(dataset), batch_size):
        dest = roles[dest_role][lo : lo + batch_size]
        src = roles[src_role][lo : lo + batch_size]
        ok = (dest >= 0) & (src >= 0) & (src <= dest)
        if ok.any():
            tokens = dataset.tokens[lo : lo + batch_size][ok].to(model.cfg.device)
            totals += _add_batch(sums, qkt, model, tokens, head, dest[ok], src[ok], max_active)
    return _pair_frame(sums, totals, top)


def _add_batch(
    sums: dict[tuple[int, int], np.ndarray],
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"],
    head: int,
    dest: Int[Tensor, " n"],
    src: Int[Tensor, " n"],
    max_active: int,
) -> np.ndarray:
    """Add one batch's active pairs at ``(dest, src)`` to ``sums[(q, k)]`` (term, count,
    q act, k act); returns the batch's sums of score, error and rest, and its prompts."""
    batch = run_to_layer(model, qkt.shape, tokens)
    out = qkt(batch.x)
    pt = head_pair_terms(qkt, model, batch, out, head, max_active)
    b = torch.arange(len(dest))
    iq, ik = pt.iq[b, dest], pt.ik[b, src]  # [n, A], [n, B]
    terms = pt.terms[b, dest, :, src]  # [n, A, B]
    q_act = out.q_features[b, dest].gather(-1, iq)
    k_act = out.k_features[b, src].gather(-1, ik)
    active = pt.q_active[b, dest][:, :, None] & pt.k_active[b, src][:, None, :]
    n_i, a_i, b_i = active.nonzero(as_tuple=True)
    rows = torch.stack(
        [terms[n_i, a_i, b_i], torch.ones_like(q_act[n_i, a_i]), q_act[n_i, a_i], k_act[n_i, b_i]],
        1,
    ).double()
    for q, k, row in zip(iq[n_i, a_i].tolist(), ik[n_i, b_i].tolist(), rows.numpy()):
        if (q, k) in sums:
            sums[(q, k)] += row
        else:
            sums[(q, k)] = row.copy()
    attn = layer_attention(model, qkt.shape.layer)
    true = scores_from_rotated(attn, rotate(attn, batch.q), rotate(attn, batch.k))[:, head]
    score = true[b, dest, src].double()
    rest = pt.rest[b, dest, src].double()
    error = score - rest - terms.sum((1, 2)).double()
    return np.array([float(score.sum()), float(error.sum()), float(rest.sum()), len(b)])


def _pair_frame(
    sums: dict[tuple[int, int], np.ndarray], totals: np.ndarray, top: int | None
) -> pd.DataFrame:
    """The ``top`` pairs of ``sums`` by ``|mean_term|`` (:func:`ioi_pairs`' table)."""
    score, error, rest, n = totals
    out = pd.DataFrame(columns=PAIR_COLUMNS)
    if sums and n:
        keys = list(sums)
        vals = np.stack([sums[k] for k in keys])
        count = vals[:, 1]
        out = pd.DataFrame(
            {
                "q_feature": [k[0] for k in keys],
                "k_feature": [k[1] for k in keys],
                "n_prompts": count.astype(int),
                "mean_term": vals[:, 0] / n,
                "share_of_score": vals[:, 0] / score,
                "mean_q_act": vals[:, 2] / count,
                "mean_k_act": vals[:, 3] / count,
            }
        )
        order = np.argsort(-np.abs(out.mean_term.to_numpy()), kind="stable")[:top]
        out = pd.DataFrame(out.iloc[order]).reset_index(drop=True)
    n_div = max(n, 1)
    out.attrs.update(
        mean_score=score / n_div, mean_error=error / n_div, mean_rest=rest / n_div,
        n_prompts=int(n),
    )  # fmt: skip
    return out


def feature_card(
    acts: Float[Tensor, "n_contexts ctx d_hidden"],
    tokens: Int[Tensor, "n_contexts ctx"],
    tokenizer,
    feature: int,
    *,
    separators: Collection[int] = (),
    n_contexts: int = 5,
    n_tokens: int = 5,
) -> dict[str, object]:
    """What names a feature: its top tokens and top-activating contexts on held-out text.

    Args:
        acts: one side's activations (:func:`~.tables.feature_activations`).
        tokens: the same contexts' token ids.
        tokenizer: to decode them.
        feature: the feature.
        separators: token ids (BOS, EOS) that end a document: contexts are cut there.
        n_contexts, n_tokens: how many of each.

    Returns:
        ``{"feature", "density" (share of tokens where it fires), "top_tokens" (a
        :func:`~.tables.top_tokens` table), "contexts" (a
        :func:`~.tables.top_activating_contexts` table)}``.
    """
    fires = acts[..., feature] > 0
    return {
        "feature": int(feature),
        "density": float(fires.float().mean()),
        "top_tokens": top_tokens(acts, tokens, tokenizer, feature, n=n_tokens),
        "contexts": top_activating_contexts(
            acts, tokens, tokenizer, feature, n=n_contexts, separators=separators
        ),
    }
