"""MIB-style scoring: prompts, faithfulness, CPR/CMD, activation patching, EAP and EAP-IG."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

from tl_superposition.evaluation import (
    MIB_FRACTIONS,
    Faithfulness,
    Ranking,
    abc_tokens,
    cpr_cmd,
    eap_ig_scores,
    eap_scores,
    f1_table,
    head_patching_effects,
    important_heads,
    ioi_prompts,
    ioi_split,
    name_split,
    score_rankings,
)
from tl_superposition.evaluation.faithfulness import sizes_for
from tl_superposition.evaluation.patching import logit_diff_metric
from tl_superposition.ioi import make_ioi_dataset


def test_cpr_and_cmd_on_hand_made_numbers():
    cpr, cmd = cpr_cmd([0.1, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert cpr == pytest.approx(0.4 * 0.25 + 0.5 * 0.75)
    assert cmd == pytest.approx(0.4 * 0.75 + 0.5 * 0.25)
    # |1 - f| counts a circuit that overshoots: f = 1.5 is as far from 1 as f = 0.5
    assert cpr_cmd([0.0, 1.0], [1.5, 1.5])[1] == pytest.approx(0.5)
    assert sizes_for(270) == [0, 0, 1, 2, 5, 13, 27, 54, 135, 270]
    with pytest.raises(ValueError, match="increasing"):
        cpr_cmd([0.5, 0.1], [0, 1])


def test_ioi_split_uses_other_names_and_another_seed(gpt2_tokenizer):
    disc, held = ioi_split(gpt2_tokenizer, 20, 20, seed=0)
    a, b = name_split(gpt2_tokenizer)
    assert not set(a) & set(b)
    assert set(disc.io_names) | set(disc.s_names) <= set(a)
    assert set(held.io_names) | set(held.s_names) <= set(b)
    assert held.meta["seed"] == 1
    cf = abc_tokens(gpt2_tokenizer, held, seed=0)  # the counterfactual names are the split's
    ids = {gpt2_tokenizer.encode(" " + n)[0] for n in b}
    rows = torch.arange(len(held))
    assert set(cf[rows, held.io_pos].tolist()) <= ids
    with pytest.raises(ValueError, match="differ"):
        ioi_split(gpt2_tokenizer, 4, 4, seed=3, heldout_seed=3)
    # one half alone is the same prompts, whatever the other half's size
    alone = ioi_prompts(gpt2_tokenizer, 20, 1, "heldout")
    assert alone.prompts == held.prompts and alone.meta["names"] == b
    assert torch.equal(ioi_prompts(gpt2_tokenizer, 20, 0).tokens, disc.tokens)
    with pytest.raises(ValueError, match="half must be"):
        ioi_prompts(gpt2_tokenizer, 4, 0, "test")


def test_faithfulness_is_one_for_every_head_and_zero_for_none(tiny_gpt2):
    model = tiny_gpt2
    ds = make_ioi_dataset(model, 6, seed=1)
    cf = abc_tokens(model, ds, seed=2)
    faith = Faithfulness.prepare(model, ds, cf, batch_size=4)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    every = [(L, h) for L in range(n_layers) for h in range(n_heads)]
    # m(full) is the clean model's metric; m(empty) the run with every z from the
    # counterfactual prompt, both computed here by hand
    metric = logit_diff_metric(ds)
    _, cf_cache = model.run_with_cache(cf)
    hooks = [(f"blocks.{L}.attn.hook_z", lambda z, hook, L=L: cf_cache[f"blocks.{L}.attn.hook_z"])
             for L in range(n_layers)]  # fmt: skip

    def only_head_0(z, hook):  # layer 0's head 0 from the counterfactual run, by hand
        del hook
        z = z.clone()
        z[:, :, 0] = cf_cache["blocks.0.attn.hook_z"][:, :, 0]
        return z

    with torch.no_grad():
        full = float(metric(model(ds.tokens)))
        with model.hooks(fwd_hooks=hooks):
            empty = float(metric(model(ds.tokens)))
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", only_head_0)]):
            one = float(metric(model(ds.tokens)))
    assert faith.m_full == pytest.approx(full, abs=1e-4)
    assert faith.m_empty == pytest.approx(empty, abs=1e-4)
    assert faith.score(every) == 1.0 and faith.score([]) == 0.0
    assert faith.metric(faith.mask(every[1:])) == pytest.approx(one, abs=1e-4)
    curve = faith.curve(every)
    assert curve.faithfulness.iloc[0] == 0.0 and curve.faithfulness.iloc[-1] == 1.0
    assert curve.fraction.tolist() == list(MIB_FRACTIONS)
    with pytest.raises(ValueError, match="every head once"):
        faith.curve(every[:-1])
    with pytest.raises(ValueError, match="outside the model"):
        faith.score([(n_layers, 0)])


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_patching_effects_equal_transformer_lens(name, direction, request):
    model = request.getfixturevalue(name)
    ds = make_ioi_dataset(model, 6, seed=2)
    bad = abc_tokens(model, ds, seed=1)
    effects, m_clean, m_bad = head_patching_effects(model, ds, bad, direction)
    metric = logit_diff_metric(ds)
    _, clean_cache = model.run_with_cache(ds.tokens)
    _, bad_cache = model.run_with_cache(bad)
    if direction == "denoising":
        raw = get_act_patch_attn_head_out_all_pos(model, bad, clean_cache, metric)
        want = (raw - m_bad) / (m_clean - m_bad)
    else:
        raw = get_act_patch_attn_head_out_all_pos(model, ds.tokens, bad_cache, metric)
        want = (m_clean - raw) / (m_clean - m_bad)
    assert torch.allclose(effects, want.float(), atol=1e-4)
    assert effects.abs().max() > 1e-3  # heads do matter here
    assert important_heads(effects, 1e9) == set()


def _linear_model(gpt2_tokenizer) -> HookedTransformer:
    """Two attention-only layers, no normalisation: the logits are linear in layer 1's z."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=gpt2_tokenizer.vocab_size,
        attn_only=True, normalization_type=None, positional_embedding_type="standard",
        act_fn="relu", seed=0, initializer_range=0.3,
    )  # fmt: skip
    return HookedTransformer(cfg, tokenizer=gpt2_tokenizer)


def test_eap_equals_activation_patching_where_the_model_is_linear(gpt2_tokenizer):
    """Layer 1's heads write straight to the logits: the first-order estimate is exact there,
    and the gradient does not depend on the input, so EAP-IG equals EAP."""
    model = _linear_model(gpt2_tokenizer)
    ds = make_ioi_dataset(model, 6, seed=3)
    bad = abc_tokens(model, ds, seed=4)
    eap = eap_scores(model, ds, bad, batch_size=4)
    effects, m_clean, m_bad = head_patching_effects(model, ds, bad, "noising")
    exact = effects * (m_clean - m_bad)  # m_clean - m(head patched), in logits
    assert torch.allclose(eap[1], exact[1], atol=1e-4, rtol=1e-4)
    assert exact[1].abs().max() > 1e-3
    ig = eap_ig_scores(model, ds, bad, steps=3, batch_size=4)
    assert torch.allclose(ig[1], eap[1], atol=1e-4, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_rankings_curves_and_f1(tiny_gpt2):
    model = tiny_gpt2
    ds = make_ioi_dataset(model, 4, seed=5)
    faith = Faithfulness.prepare(model, ds, abc_tokens(model, ds, seed=0))
    scores = torch.arange(12, dtype=torch.float32).view(3, 4) - 6
    r = Ranking.from_scores("eap", scores)
    assert r.signed[0] == (2, 3) and r.absolute[0] == (0, 0)  # -6 is the largest in size
    rand = Ranking.random(3, 4, n_draws=3, seed=0)
    assert len(rand.draws) == 3 and len(set(rand.draws[0])) == 12
    curves, mib = score_rankings(faith, [r, rand])
    assert set(curves.method) == {"eap", "random"}
    assert set(curves[curves.method == "eap"].order) == {"signed", "absolute"}
    assert set(mib) == {"cpr", "cmd"} and set(mib["cpr"]) == {"eap", "random"}
    ends = curves[curves.fraction == 1.0].faithfulness
    assert (ends == 1.0).all()
    refs = {"ref": {(2, 3), (2, 2), (0, 0)}}
    table = f1_table([r, Ranking("mine", r.signed, r.signed, circuit={(2, 3)})], 2, refs)
    row = table.set_index("method").loc["mine"]
    assert row.precision == 1.0 and row.recall == pytest.approx(1 / 3)
    assert isinstance(table, pd.DataFrame) and set(table.reference) == {"ref"}


def test_compare_methods_scores_every_method_on_the_held_out_prompts(tiny_gpt2):
    from tl_superposition.circuit import Circuit, node_name, parse_node
    from tl_superposition.circuit.graphs import ROOT
    from tl_superposition.evaluation import compare_methods

    model = tiny_gpt2
    discovery, heldout = ioi_split(model, 6, 5, seed=0)
    a, b = node_name(2, 1, "END", "IO"), node_name(1, 3, "S2", "S1")
    nodes = pd.DataFrame([{"node": n, "n_prompts": 6, **parse_node(n)} for n in (a, b, ROOT)])
    edges = pd.DataFrame(
        {"up": [a, b], "down": [ROOT, a], "side": ["logits", "src"], "weight": [1.0, 0.3],
         "n_prompts": [6, 6], "effect_mean": [float("nan"), -0.4], "effect_std": [0.0, 0.1],
         "n_measured": [0, 6], "status": ["root", "kept"]}
    )  # fmt: skip
    circuit = Circuit.from_edges(nodes, edges, {"n_layers": 3, "n_heads": 4, "n_prompt_graphs": 6})
    cmp = compare_methods(model, discovery, heldout, circuit, patching_prompts=3, ig_steps=2,
                          random_draws=2)  # fmt: skip
    table = cmp.table()
    methods = ["svd_trace", "activation_patching", "activation_patching_denoising", "eap",
               "eap_ig", "random"]  # fmt: skip
    assert table.method.tolist() == methods
    assert set(cmp.references) == {"denoising", "noising"}
    svd = cmp.curves[(cmp.curves.method == "svd_trace") & (cmp.curves.n_heads == 2)]
    assert svd.faithfulness.iloc[0] == pytest.approx(cmp.circuit_faithfulness)  # its 2 heads
    assert (table.cpr <= 1.5).all() and cmp.m_full != cmp.m_empty
    with pytest.raises(ValueError, match="patching_prompts"):
        compare_methods(model, discovery, heldout, circuit, patching_prompts=7)
