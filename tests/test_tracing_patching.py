"""The activation-patching check: ABC prompts, head effects, precision/recall/F1, faithfulness."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.tracing import TraceConfig, trace_ioi
from tl_superposition.tracing.patching import (
    abc_tokens,
    circuit_faithfulness,
    circuit_heads,
    compare_with_patching,
    head_patching_effects,
    logit_diff_metric,
    precision_recall_f1,
)


def test_precision_recall_f1_on_hand_made_sets():
    found = {(1, 0), (2, 3), (4, 4), (5, 1)}
    truth = {(1, 0), (2, 3), (7, 7)}
    got = precision_recall_f1(found, truth)
    assert got["precision"] == pytest.approx(2 / 4)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert precision_recall_f1(set(), truth) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_circuit_heads_takes_head_ends_and_seeds():
    edges = pd.DataFrame({"upstream": ["A1.2", "M0", "E"], "downstream": ["A3.0", "A3.0", "A2.1"]})
    assert circuit_heads(edges, ["A5.5"]) == {(1, 2), (3, 0), (2, 1), (5, 5)}


def test_abc_tokens_replace_the_three_names_only(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 12, seed=3)
    bad = abc_tokens(tiny_gpt2, ds, seed=0)
    rows = torch.arange(len(ds))
    names = torch.stack([ds.io_pos, ds.s1_pos, ds.s2_pos], 1)
    changed = bad != ds.tokens
    expected = torch.zeros_like(changed)
    expected[rows[:, None], names] = True
    assert (changed == expected).all()
    new = bad[rows[:, None], names]
    assert all(len(set(r.tolist())) == 3 for r in new)  # three different names
    for old in (ds.io_tokens, ds.s_tokens):
        assert not (new == old[:, None]).any()
    assert torch.equal(bad, abc_tokens(tiny_gpt2, ds, seed=0))


def test_patching_effect_matches_a_hand_patch(tiny_llama):
    """The TransformerLens effect of one head equals patching its clean hook_z by hand."""
    model = tiny_llama
    ds = make_ioi_dataset(model, 8, seed=2)
    bad = abc_tokens(model, ds, seed=1)
    effects, m_clean, m_corrupt = head_patching_effects(model, ds, bad)
    assert effects.shape == (model.cfg.n_layers, model.cfg.n_heads)
    metric = logit_diff_metric(ds)
    _, cache = model.run_with_cache(ds.tokens)
    layer, head = 1, 2

    def patch(z, hook):
        z[:, :, head] = cache[hook.name][:, :, head]
        return z

    with torch.inference_mode():
        logits = model.run_with_hooks(bad, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
    expected = (float(metric(logits)) - m_corrupt) / (m_clean - m_corrupt)
    assert float(effects[layer, head]) == pytest.approx(expected, abs=1e-4)


def test_faithfulness_of_every_head_is_one_and_of_none_is_the_mean_run(tiny_gpt2):
    model = tiny_gpt2
    ds = make_ioi_dataset(model, 8, seed=4)
    bad = abc_tokens(model, ds)
    with torch.inference_mode():
        m_clean = float(logit_diff_metric(ds)(model(ds.tokens)))
    everything = {(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)}
    got = circuit_faithfulness(model, ds, everything, bad, m_clean, n_random=3)
    assert got["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert len(got["random"]) == 3
    # random circuits as large as the whole model are the whole model
    assert got["random_mean"] == pytest.approx(1.0, abs=1e-4)
    assert got["none"] != pytest.approx(1.0, abs=1e-3)


def test_compare_with_patching_on_a_trace(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 8, seed=0)
    res = trace_ioi(tiny_gpt2, ds, config=TraceConfig(edge_rule="paper"), progress=False)
    cmp = compare_with_patching(tiny_gpt2, res, n_prompts=8, threshold=0.05, n_random=2)
    s = cmp.summary
    assert s["n_circuit"] == len(circuit_heads(res.edges, res.summary["seeds"]))
    assert s["n_important"] == int(cmp.effects.important.sum())
    assert s["n_both"] == int((cmp.effects.important & cmp.effects.in_circuit).sum())
    assert 0 <= s["f1"] <= 1
    with pytest.raises(ValueError, match="threshold"):
        compare_with_patching(tiny_gpt2, res, threshold=0)


def test_circuit_heads_drops_rare_edges():
    edges = pd.DataFrame(
        {"upstream": ["A1.2", "A0.1"], "downstream": ["A3.0", "A2.2"], "n_firings": [9, 2]}
    )
    assert circuit_heads(edges, [], min_firings=3) == {(1, 2), (3, 0)}
    assert circuit_heads(edges, []) == {(1, 2), (3, 0), (0, 1), (2, 2)}
