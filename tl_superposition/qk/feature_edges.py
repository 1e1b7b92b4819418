"""Feature-level edges of one firing: upstream component -> query or key feature -> score.

:func:`~tl_superposition.qk.attribution.attribute_score` splits head ``h``'s score from ``dest``
to ``src`` into terms of (query feature, key feature) pairs. This module goes one step
upstream. A dictionary feature's pre-activation is ``x . W_enc[:, i] + b_enc[i]`` with
``x = blocks.L.ln1.hook_normalized`` at its position; with the normalisation scale frozen (as
the SVD trace freezes it), ``x`` is the sum of every upstream component's write divided by
``ln1.hook_scale`` (centred first for LayerNorm models), so the pre-activation splits exactly
into

    pre_i = sum_c write_c . W_enc[:, i] / scale + b_enc[i]

over the heads and MLPs of earlier layers, the embeddings and the summed attention output
biases (:func:`~tl_superposition.tracing.writes.upstream_writes`, the trace's own float64
split). An active ReLU or TopK feature's activation *is* its pre-activation, and the score
terms are linear in one feature's activation with every other activation held fixed, so the
feature's part of the score (its ``feature_score``: the pair terms it is in plus its term
with the other side's bias) splits in the same shares. A row of :func:`feature_edges` is one
feature-level edge, ``upstream -> feature -> firing``, in score units.

The split is the SVD trace's (Franco & Crovella 2024) with the firing's singular directions
replaced by the encoder rows of its active features (Wynroe & Sharkey 2024).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.qk.attribution import ScoreAttribution, attribute_score
from tl_superposition.qk.transcoder import QKTranscoder
from tl_superposition.tracing.cache import BatchCache, run_batch
from tl_superposition.tracing.graph import NodeKind
from tl_superposition.tracing.writes import upstream_columns, upstream_writes

SIDES = ("query", "key")
COLUMNS = [
    "side", "feature", "act", "feature_score", "upstream", "up_kind", "up_layer", "up_head",
    "write", "share", "edge",
]  # fmt: skip


def upstream_labels(
    layer: int, n_heads: int
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Names of the columns of :func:`pre_activation_split` for a feature of ``layer``.

    Returns:
        ``(labels, kinds, layers, heads)``: labels ``"L.H"`` for heads, ``"MLP L"``,
        ``"embed"``, ``"b_O"`` (the attention output biases), ``"b_enc"`` (the encoder bias);
        kinds ``attn``, ``mlp``, ``embed``, ``bias``; layer and head -1 where none.
    """
    kind, layers, heads = upstream_columns(layer, n_heads)
    labels, kinds = [], []
    for k, L, h in zip(kind, layers, heads):
        node = NodeKind(int(k))
        kinds.append(node.label)
        labels.append(
            f"{L}.{h}" if node is NodeKind.ATTN else f"MLP {L}" if node is NodeKind.MLP else "embed"
        )
    labels += ["b_O", "b_enc"]
    kinds += ["bias", "bias"]
    return labels, kinds, np.append(layers, [-1, -1]), np.append(heads, [-1, -1])


def pre_activation_split(
    model: HookedTransformer,
    cache: BatchCache,
    layer: int,
    pos: int,
    W_enc: Float[Tensor, "d_model n_features"],
    b_enc: Float[Tensor, " n_features"],
) -> Float[Tensor, "n_features n_upstream"]:
    """Each feature's pre-activation at ``pos`` of the cached prompt (batch row 0), split over
    the upstream writes (module docstring), in float64.

    Columns: every head of the layers before ``layer`` (layer-major), their MLPs, the
    embeddings, the attention output biases, the encoder bias (:func:`upstream_labels`). A
    row sums to ``cache.x[0, pos, layer] @ W_enc + b_enc`` to float64 rounding of the cached
    activations.
    """
    n = W_enc.shape[1]
    g = W_enc.detach().T.to(torch.float64)
    rows = torch.zeros(n, dtype=torch.long)
    writes = upstream_writes(model, cache, layer, rows, torch.full((n,), pos), g)
    bias = b_enc.detach().to(device=writes.device, dtype=torch.float64)[:, None]
    return torch.cat([writes, bias], 1)


def _feature_scores(attribution: ScoreAttribution) -> dict[str, pd.Series]:
    """Per side, each active feature's part of the score: the terms it appears in."""
    t = attribution.terms
    t = pd.DataFrame(t[t.kind != "error"])
    values = t["value"].to_numpy(dtype=float)
    out = {}
    for side, col in (("query", "q_feature"), ("key", "k_feature")):
        feature = t[col].to_numpy(dtype=np.int64)
        active = feature >= 0
        out[side] = pd.Series(values[active]).groupby(feature[active]).sum()
    return out


def _side_table(
    model: HookedTransformer,
    cache: BatchCache,
    qkt: QKTranscoder,
    side: str,
    pos: int,
    scores: pd.Series,
) -> pd.DataFrame:
    """The feature-level edges of one side's active features."""
    s = qkt.shape
    sae = qkt.q_dict if side == "query" else qkt.k_dict
    features = torch.tensor(scores.index.to_numpy(dtype=np.int64, copy=True))
    split = pre_activation_split(
        model, cache, s.layer, pos, sae.W_enc[:, features], sae.b_enc[features]
    )  # fmt: skip
    labels, kinds, layers, heads = upstream_labels(s.layer, s.n_heads)
    act = split.sum(1, keepdim=True)
    share = split / act
    score = torch.tensor(scores.to_numpy(dtype=float, copy=True), dtype=share.dtype)
    n_f, n_up = split.shape
    flat = lambda t: t.reshape(-1).cpu().numpy()  # noqa: E731
    return pd.DataFrame(
        {
            "side": side,
            "feature": np.repeat(features.numpy(), n_up),
            "act": np.repeat(flat(act), n_up),
            "feature_score": np.repeat(score.numpy(), n_up),
            "upstream": np.tile(labels, n_f),
            "up_kind": np.tile(kinds, n_f),
            "up_layer": np.tile(layers, n_f),
            "up_head": np.tile(heads, n_f),
            "write": flat(split),
            "share": flat(share),
            "edge": flat(share * score.to(share.device)[:, None]),
        }
    )


@torch.no_grad()
def feature_edges(
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Int[Tensor, " pos"],
    head: int,
    dest: int,
    src: int,
    attribution: ScoreAttribution | None = None,
    cache: BatchCache | None = None,
) -> pd.DataFrame:
    """The feature-level edges of head ``head``'s firing from ``dest`` to ``src``.

    Args:
        qkt: the QK transcoder of the firing's layer.
        model: its model.
        tokens: one prompt, int64 ``[pos]`` or ``[1, pos]``.
        head: query head of ``qkt``'s layer.
        dest, src: destination (query) and source (key) positions.
        attribution: :func:`~tl_superposition.qk.attribution.attribute_score` of the same
            firing, if already computed.
        cache: :func:`~tl_superposition.tracing.cache.run_batch` of ``tokens`` (one row), if
            already computed (several firings of one prompt share it).

    Returns:
        One row per (side, active feature, upstream component): side (``query`` at
        ``dest``, ``key`` at ``src``), feature, act (its activation, the sum of its
        ``write`` column), feature_score (its part of the score, in score units), upstream,
        up_kind, up_layer, up_head (:func:`upstream_labels`), write (pre-activation units),
        share (``write / act``), edge (``share * feature_score``: the upstream component's part
        of the score through that feature). Per side and feature, ``edge`` sums to
        ``feature_score``; a pair term appears once on each side. Sorted by ``|edge|``.

    Raises:
        ValueError: as :func:`~tl_superposition.qk.attribution.attribute_score` (a transcoder
            of another shape, a head or position out of range).
    """
    a = attribution or attribute_score(qkt, model, tokens, head, dest, src)
    if (a.layer, a.head, a.dest, a.src) != (qkt.shape.layer, head, dest, src):
        raise ValueError("attribution is of another firing than (head, dest, src)")
    if cache is None:
        cache = run_batch(model, tokens.reshape(1, -1).to(model.cfg.device))
    scores = _feature_scores(a)
    parts = [
        _side_table(model, cache, qkt, side, dest if side == "query" else src, scores[side])
        for side in SIDES
        if len(scores[side])
    ]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return _by_size(pd.DataFrame(pd.concat(parts, ignore_index=True)[COLUMNS]))


def edges_by_upstream(edges: pd.DataFrame) -> pd.DataFrame:
    """:func:`feature_edges` summed over features: each upstream component's part of the
    score through each side's features (``edge``), sorted by its size.

    Returns:
        side, upstream, up_kind, up_layer, up_head, edge, n_features (active features it
        writes into).
    """
    keys = ["side", "upstream", "up_kind", "up_layer", "up_head"]
    out = pd.DataFrame(
        edges.groupby(keys, as_index=False).agg(
            edge=("edge", "sum"), n_features=("feature", "nunique")
        )
    )
    return _by_size(out)


def _by_size(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` sorted by ``|edge|``, largest first (stable), with a new index."""
    order = np.argsort(-np.abs(table["edge"].to_numpy(dtype=float)), kind="stable")
    return pd.DataFrame(table.iloc[order]).reset_index(drop=True)
