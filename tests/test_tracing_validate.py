"""Interventions: exact on the decomposition's own terms, and edge validation that can fail.

- Removing a firing's selected components at the attention input of its own layer, with the
  normalisation scale frozen, leaves exactly the contributions of the other components.
- On a hand-built model where one upstream head provably writes the signal a downstream head
  reads, the trace finds that edge and the interventions validate it; a head writing an
  orthogonal direction at the same position is not validated.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.tracing import QKSVDCache, TraceConfig, trace, trace_ioi, validate_edges
from tl_superposition.tracing.cache import run_batch
from tl_superposition.tracing.decompose import decompose_layer, selected_mask
from tl_superposition.tracing.interventions import (
    Readout,
    component_removal,
    resid_pre_cache,
    run_input_edits,
    run_output_edits,
)
from tl_superposition.tracing.validate import validate_instances


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("side", [0, 1])
def test_removing_selected_components_at_the_input_leaves_the_others(model, side):
    """The decomposition predicts the edited score exactly: sum of the unselected c_k."""
    ds = make_ioi_dataset(model, 6, seed=1)
    cache = run_batch(model, ds.tokens)
    resid_pre, _ = resid_pre_cache(model, ds.tokens)
    qk = QKSVDCache(model)
    L = model.cfg.n_layers - 1
    fl = decompose_layer(
        qk[L], cache.x[:, :, L], cache.pattern[L], cache.scores[L], ds.lengths, 0.3, 0.8
    )
    keep = (fl.dest != fl.src).nonzero()[:, 0][:40]
    assert len(keep) >= 10
    b, h, d, s = fl.prompt[keep], fl.head[keep], fl.dest[keep], fl.src[keep]
    selected = selected_mask(fl.order[keep], fl.count[keep])
    x = cache.x[:, :, L]
    delta = component_removal(qk[L], x[b, d], x[b, s], h, d - s, selected, side)
    got = run_input_edits(
        model,
        resid_pre[b, :, L],
        L,
        edit_pos=s if side == 0 else d,
        delta=-delta,
        readout=Readout(torch.full_like(b, L), h, d, s),
    ).score.double()
    want = (fl.contributions[keep] * ~selected).sum(1)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    # and the edit is not a no-op: the selected components carried most of the score
    assert (got - fl.score[keep].double()).abs().max() > 0.1


def test_zero_output_edits_reproduce_the_clean_run(model):
    ds = make_ioi_dataset(model, 5, seed=2)
    resid_pre, cache = resid_pre_cache(model, ds.tokens)
    n = len(ds)
    L, start = model.cfg.n_layers - 1, 1
    readout = Readout(
        torch.full((n,), L),
        torch.zeros(n, dtype=torch.long),
        ds.end_pos,
        ds.s2_pos,
        ds.end_pos,
        ds.io_tokens,
        ds.s_tokens,
    )
    vals = run_output_edits(
        model,
        resid_pre[:, :, start],
        start,
        torch.full((n,), start),
        ds.s2_pos,
        torch.zeros(n, model.cfg.d_model),
        readout,
    )
    clean = cache[f"blocks.{L}.attn.hook_attn_scores"][torch.arange(n), 0, ds.end_pos, ds.s2_pos]
    assert torch.allclose(vals.score, clean, atol=1e-5)
    logits = model(ds.tokens)
    rows = torch.arange(n)
    ld = logits[rows, ds.end_pos, ds.io_tokens] - logits[rows, ds.end_pos, ds.s_tokens]
    assert vals.logit_diff is not None
    assert torch.allclose(vals.logit_diff, ld, atol=1e-4)


MARKER, POS, END = 1, 2, 7


def _signal_model() -> HookedTransformer:
    """Two attention-only layers; head 0.0 writes e1 at the marker, head 1.0 reads e1.

    Token 1 (the marker) embeds as e0 + e7, other tokens as e7 + 0.1 t e6. In layer 0 both
    heads attend from the marker to itself (their query and key read e0); head 0.0 writes
    4 e1 there, head 0.1 writes e5. Head 1.0 has a constant query and a key reading e1, so
    it attends from the end to the marker, and only head 0.0's write carries that signal.
    """
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=8,
        n_ctx=16,
        d_head=2,
        n_heads=2,
        d_vocab=10,
        attn_only=True,
        normalization_type="RMSPre",
        positional_embedding_type="standard",
        act_fn="relu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    e = torch.eye(8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:] = e[7] + 0.1 * torch.arange(10)[:, None] * e[6]
        model.W_E[MARKER] = e[0] + e[7]
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for h, out in ((0, 4 * e[1]), (1, e[5])):
            a0.W_Q[h, :, 0] = 50 * e[0]
            a0.W_K[h, :, 0] = e[0]
            a0.W_V[h, :, 0] = e[0]
            a0.W_O[h, 0] = out
        a1.b_Q[0, 0] = 60.0
        a1.W_K[0, :, 0] = e[1]
        model.W_U[:] = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    return model


def test_a_provable_edge_is_traced_and_validated_and_a_non_edge_is_not():
    model = _signal_model()
    tokens = torch.tensor([[3, 4, MARKER, 5, 6, 7, 8, 9]])
    # Head 1.0's query is its bias b_Q alone: the authors' bias coordinate adds the same
    # constant to both upstream heads on the destination side, and their rule then keeps both
    # (tied); the provable edges are those of the writes alone.
    expected = {
        ("paper", True): {("src", 0, 0), ("dest", 0, 0), ("dest", 0, 1)},
        ("paper", False): {("src", 0, 0)},
        ("positive", False): {("src", 0, 0)},
    }
    for rule, bias in expected:
        res = trace(
            model,
            tokens,
            seeds=[(1, 0)],
            seed_dest=torch.tensor([END]),
            seed_src=torch.tensor([POS]),
            config=TraceConfig(edge_rule=rule, nonfiring_frac=0.0, augmented_bias=bias),
            progress=False,
        )
        rec = res.edge_records
        seed = rec[(rec.layer == 1) & (rec["head"] == 0) & (rec.dest_pos == END)]
        got = set(zip(seed.side, seed.up_layer, seed.up_head))
        assert got == expected[rule, bias], (rule, bias)
    edge = seed[seed.side == "src"].iloc[[0]]
    non_edge = edge.assign(up_head=1, weight=float("nan"))
    comps = res.firings.set_index("firing_id").components
    inst = pd.concat([edge, non_edge], ignore_index=True)
    inst["components"] = [comps[i] for i in inst.firing_id]
    out = validate_instances(model, tokens, inst, progress=False)
    assert out.validated.tolist() == [True, False]
    assert out.d_score_ablate[0] < -1.0 and out.d_score_boost[0] > 0.1
    assert abs(out.d_score_ablate[1]) < 1e-5 and out.frac_removed[1] < 1e-6


def test_validate_edges_on_an_ioi_trace(tiny_llama, tmp_path):
    ds = make_ioi_dataset(tiny_llama, 6, seed=0)
    top = tiny_llama.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(tiny_llama.cfg.n_heads))
    res = trace_ioi(
        tiny_llama,
        ds,
        seeds=seeds,
        seed_src="any",
        config=TraceConfig(pattern_thresh=0.3, edge_rule="paper"),
        progress=False,
    )
    v = validate_edges(tiny_llama, res, max_instances=2, progress=False)
    assert v.summary["edge_rule"] == "paper"
    assert v.summary["n_edges_intervened"] == len(v.edges) == len(res.edges)
    assert (v.edges.n_instances <= 2).all() and v.instances.d_logit_diff_ablate.notna().all()
    # the boost adds back what the ablation removes: opposite signs on average
    assert v.summary["mean_d_score_boost"] > 0 > v.summary["mean_d_score_ablate"]
    paths = res.save(tmp_path, validation=v)
    html = paths["signal_graph.html"].read_text()
    assert "validated" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert pd.read_csv(paths["validation_edges.csv"]).shape[0] == len(v.edges)


def test_sample_instances_keeps_edges_and_records_as_asked():
    from tl_superposition.tracing.validate import sample_instances

    rows = []
    for edge in range(6):  # edge e has e + 1 records
        for r in range(edge + 1):
            rows.append(
                {
                    "up_layer": 0,
                    "up_head": edge,
                    "layer": 1,
                    "head": 0,
                    "side": "src",
                    "firing_id": 10 * edge + r,
                    "prompt_id": r,
                }
            )
    rec = pd.DataFrame(rows)
    keys = ["up_layer", "up_head", "layer", "head", "side"]
    got = sample_instances(rec, max_instances=2, seed=0)
    assert got.groupby(keys).size().tolist() == [1, 2, 2, 2, 2, 2]
    got = sample_instances(rec, max_instances=2, seed=0, min_firings=3)
    assert sorted(got.up_head.unique().tolist()) == [2, 3, 4, 5]
    got = sample_instances(rec, max_instances=9, seed=1, min_firings=3, max_edges=2)
    heads = got.up_head.unique().tolist()
    assert len(heads) == 2 and set(heads) <= {2, 3, 4, 5}
    assert all((got.up_head == h).sum() == h + 1 for h in heads)  # every record kept
    assert got.equals(sample_instances(rec, max_instances=9, seed=1, min_firings=3, max_edges=2))
