"""Feature-level edges: a feature's pre-activation split over upstream writes (fast tests)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import data_path

from tl_superposition.qk import QKTranscoder, attribute_score, pack_text
from tl_superposition.qk.feature_edges import (
    edges_by_upstream,
    feature_edges,
    pre_activation_split,
    upstream_labels,
)
from tl_superposition.tracing.cache import run_batch

LAYER = 2


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def qkt_and_tokens(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    qkt = QKTranscoder.for_model(model, LAYER, d_hidden=48, generator=gen)
    with torch.no_grad():  # encoder biases that are not zero, so the b_enc column is tested
        for sae in (qkt.q_dict, qkt.k_dict):
            sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen) * 0.1)
    tokens = pack_text(
        model, str(data_path("shakespeare")), context_size=24, split="valid", max_contexts=1
    )[0]
    return qkt, tokens


def test_labels_name_every_upstream_column(model):
    labels, kinds, layers, heads = upstream_labels(LAYER, model.cfg.n_heads)
    n_heads = model.cfg.n_heads
    assert len(labels) == LAYER * n_heads + LAYER + 1 + 2
    assert labels[:2] == ["0.0", "0.1"] and labels[-4:] == ["MLP 1", "embed", "b_O", "b_enc"]
    assert kinds.count("attn") == LAYER * n_heads and kinds[-2:] == ["bias", "bias"]
    assert layers.max() == LAYER - 1 and heads.max() == n_heads - 1


def test_pre_activation_split_sums_to_the_pre_activation(model):
    qkt, tokens = qkt_and_tokens(model)
    cache = run_batch(model, tokens[None])
    name = f"blocks.{LAYER}.ln1.hook_normalized"
    _, tl_cache = model.run_with_cache(tokens[None], names_filter=name)
    for sae in (qkt.q_dict, qkt.k_dict):
        for pos in (0, 7, 23):
            split = pre_activation_split(model, cache, LAYER, pos, sae.W_enc, sae.b_enc)
            pre = tl_cache[name][0, pos].double() @ sae.W_enc.double() + sae.b_enc.double()
            torch.testing.assert_close(split.sum(1), pre, atol=1e-5, rtol=1e-5)
            assert torch.equal(split[:, -1], sae.b_enc.double())


def test_feature_edges_sum_to_each_features_part_of_the_score(model):
    qkt, tokens = qkt_and_tokens(model)
    head, dest, src = 3, 20, 6
    a = attribute_score(qkt, model, tokens, head, dest, src)
    edges = feature_edges(qkt, model, tokens, head, dest, src, attribution=a)
    assert set(edges.side) == {"query", "key"}
    shared = run_batch(model, tokens[None])  # a prompt's cache, shared by its firings
    pd.testing.assert_frame_equal(
        feature_edges(qkt, model, tokens, head, dest, src, cache=shared), edges
    )
    per_feature = edges.groupby(["side", "feature"]).agg(
        edge=("edge", "sum"), write=("write", "sum"), act=("act", "first"),
        score=("feature_score", "first"),
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(per_feature.edge.to_numpy()), torch.tensor(per_feature.score.to_numpy())
    )
    # the activation is the sum of the writes and equals the transcoder's
    acts = {"query": qkt.encode_q, "key": qkt.encode_k}
    _, tl_cache = model.run_with_cache(
        tokens[None], names_filter=f"blocks.{LAYER}.ln1.hook_normalized"
    )
    x = tl_cache[f"blocks.{LAYER}.ln1.hook_normalized"][0]
    rows = per_feature.reset_index()
    for side, feature, write, act in zip(rows.side, rows.feature, rows.write, rows.act):
        with torch.no_grad():
            f = acts[side](x[dest if side == "query" else src])[feature]
        assert write == pytest.approx(act) and act == pytest.approx(float(f), abs=1e-5)
    # every query feature's part, with the terms without a query feature, is the score
    t = a.terms
    rest = t[(t.q_feature < 0) & (t.kind != "error")]["value"].sum()
    q_total = per_feature.loc["query"].score.sum()
    assert q_total + rest == pytest.approx(a.reconstructed, abs=1e-5)
    # only earlier layers write
    assert edges.up_layer.max() == LAYER - 1
    by_up = edges_by_upstream(edges)
    for side in ("query", "key"):
        assert by_up[by_up.side == side].edge.sum() == pytest.approx(
            per_feature.loc[side].score.sum(), abs=1e-6
        )


def test_feature_edges_refuse_another_firings_attribution(tiny_llama):
    qkt, tokens = qkt_and_tokens(tiny_llama)
    a = attribute_score(qkt, tiny_llama, tokens, 1, 10, 2)
    with pytest.raises(ValueError, match="another firing"):
        feature_edges(qkt, tiny_llama, tokens, 1, 10, 3, attribution=a)
