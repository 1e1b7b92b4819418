"""Feature-level edges beside the SVD trace's edges (fast tests)."""

from __future__ import annotations

import pandas as pd
import pytest
from test_circuit import tiny_traced_circuit
from test_qk import exact_qkt_at

from tl_superposition.qk.edge_agreement import (
    RULES,
    EdgeAgreement,
    carrier_heads,
    edge_agreement,
)


def edges_table(rows):
    cols = ["side", "feature", "act", "feature_score", "upstream", "up_kind", "write"]
    return pd.DataFrame(rows, columns=cols)


def test_carrier_heads_pick_major_features_and_their_head_by_rule():
    e = edges_table([
        # feature 1: act 4 = 3 (head 2.1) + 1 (MLP 1); a major feature
        ("query", 1, 4.0, 2.0, "2.1", "attn", 3.0), ("query", 1, 4.0, 2.0, "MLP 1", "mlp", 1.0),
        # feature 2: act 4 = 1.5 (head 0.3) + 2.5 (embed); major; no head holds a majority
        ("query", 2, 4.0, -1.0, "0.3", "attn", 1.5), ("query", 2, 4.0, -1.0, "embed", "embed", 2.5),
        # feature 3: a minor feature (0.05 of the side's |feature_score|)
        ("query", 3, 1.0, 0.15, "1.0", "attn", 1.0),
        # key side: one feature carried by a head with a negative write only
        ("key", 7, 1.0, 1.0, "1.1", "attn", -0.5), ("key", 7, 1.0, 1.0, "embed", "embed", 1.5),
    ])  # fmt: skip
    top = carrier_heads(e, "top", min_feature_frac=0.1)
    assert list(zip(top.side, top.feature)) == [("query", 1), ("query", 2), ("key", 7)]
    assert list(top.carrier) == ["2.1", "0.3", None]
    majority = carrier_heads(e, "majority", min_feature_frac=0.1)
    assert list(majority.carrier) == ["2.1", None, None]
    with pytest.raises(ValueError, match="rule must be one of"):
        carrier_heads(e, "most")


def test_edge_agreement_runs_on_a_traced_circuit(tiny_llama, tmp_path):
    model = tiny_llama
    _, res, circuit = tiny_traced_circuit(model)
    res.save(tmp_path, plots=False)
    circuit.save(tmp_path, plots=False)
    layers = sorted({L for L, _ in circuit.head_set()})
    qkts = [exact_qkt_at(model, L) for L in layers]
    a = edge_agreement(qkts, model, tmp_path, max_firings=3, progress=False)
    assert a.n_firings > 0 and len(a.svd_edges) > 0 and len(a.features) > 0
    records = pd.read_parquet(tmp_path / "edge_records.parquet")
    columns = (records.firing_id, records.side, records.up_layer, records.up_head)
    recorded = {(int(f), s, f"{L}.{h}") for f, s, L, h in zip(*columns)}
    side = {"query": "dest", "key": "src"}
    for row in a.svd_edges.to_dict("records"):  # only edges the trace recorded in that firing
        assert (row["firing_id"], side[row["side"]], row["up_head"]) in recorded
    held = a.features.carrier_majority.notna()
    assert (a.features.carrier_majority[held] == a.features.carrier_top[held]).all()
    a.save(tmp_path / "agreement")
    back = EdgeAgreement.load(tmp_path / "agreement")
    pd.testing.assert_frame_equal(back.svd_edges, a.svd_edges, check_dtype=False)
    pd.testing.assert_frame_equal(back.features, a.features, check_dtype=False)
    assert back.n_firings == a.n_firings and back.summary() == a.summary()
    summary = a.summary()
    for rule in RULES:
        for key in ("svd_in_features", "features_in_svd"):
            assert 0.0 <= summary[rule][key] <= 1.0
    a.svd_edges["supported_top"] = a.svd_edges.supported_top.astype(object)  # as after concat
    worst = a.disagreements("top", n=1000)
    assert set(worst) == {"svd_only", "feature_only"}
    unsupported = 1 - a.svd_edges.supported_top.astype(float)
    assert worst["svd_only"].unsupported.between(0, 1).all()
    assert (worst["svd_only"].unsupported * worst["svd_only"].firings).sum() == unsupported.sum()
    with pytest.raises(ValueError, match="no node of the circuit"):
        edge_agreement([exact_qkt_at(model, 0)] if 0 not in layers else [], model, tmp_path)
