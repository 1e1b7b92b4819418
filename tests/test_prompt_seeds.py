"""ACC++'s per-prompt seeds and role positions, and the paper rule's bias coordinate."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from tl_superposition.ioi import ROLES, make_ioi_dataset, role_positions
from tl_superposition.tracing import TraceConfig, trace_ioi
from tl_superposition.tracing.cache import run_batch
from tl_superposition.tracing.ioi_trace import logit_attribution
from tl_superposition.tracing.prompt_seeds import end_attribution, seed_mask


def test_seed_mask_on_hand_made_numbers():
    values = torch.tensor(
        [
            [3.0, 1.0, -0.5, 0.2],  # total 3.7: 3 + 1 > 3.7 first, cutoff 1 (< 1.85)
            [5.0, -2.0, 0.1, 0.0],  # total 3.1: 5 > 3.1 at once, cutoff 5 lowered to 1.55
            [1.0, 1.0, 1.0, 0.0],  # no prefix exceeds 3: every positive part
            [-1.0, 0.5, 0.0, 0.0],  # total <= 0: no seed
        ]
    )
    got = seed_mask(values)
    want = torch.tensor(
        [
            [True, True, False, False],
            [True, False, False, False],
            [True, True, True, False],
            [False, False, False, False],
        ]
    )
    assert torch.equal(got, want)
    # a column marked invalid takes no part: without the -0.5, 3 + 1 + 0.2 never exceeds 4.2
    valid = torch.tensor([[True, True, False, True]])
    assert seed_mask(values[:1], valid=valid).tolist() == [[True, True, False, True]]
    with pytest.raises(ValueError, match="beta"):
        seed_mask(values, beta=0)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_end_attribution_sums_to_the_logit_difference(name, request):
    model = request.getfixturevalue(name)
    ds = make_ioi_dataset(model, 6, seed=1)
    cache = run_batch(model, ds.tokens)
    att = end_attribution(model, cache, ds.end_pos, ds.io_tokens, ds.s_tokens)
    logits = model(ds.tokens)
    rows = torch.arange(len(ds))
    end = logits[rows, ds.end_pos]
    ld = end[rows, ds.io_tokens] - end[rows, ds.s_tokens]
    bias_u = model.b_U[ds.io_tokens] - model.b_U[ds.s_tokens]
    assert torch.allclose(att.logit_diff, ld, atol=1e-4)
    assert torch.allclose(att.flat().sum(1), ld - bias_u, atol=1e-4)
    # summed over sources, a head's parts are its direct logit attribution
    z = cache.z[rows, ds.end_pos]
    _, dla = logit_attribution(model, z, cache.resid[rows, ds.end_pos], ds.io_tokens, ds.s_tokens)
    assert torch.allclose(att.heads.sum(-1), dla, atol=1e-5)
    assert torch.equal(att.correct, end.argmax(-1) == ds.io_tokens)
    cols = att.columns()
    assert len(cols) == att.flat().shape[1] and cols.kind.iloc[-1] == "embed"


def test_per_prompt_seeds_start_the_walk_from_their_own_firings(tiny_llama):
    ds = make_ioi_dataset(tiny_llama, 10, seed=2)
    res = trace_ioi(
        tiny_llama, ds, config=TraceConfig(pattern_thresh=0.2), correct_only=False, progress=False
    )
    seeds = res.seed_table
    assert seeds is not None and len(set(seeds.prompt_id)) > len(ds) // 2
    f = res.firings
    heads = seeds[seeds.kind == "head"]
    at_seed = f.merge(
        heads.rename(columns={"prompt_id": "prompt_id", "src": "src_pos"}),
        on=["prompt_id", "layer", "head", "src_pos"],
    )
    at_seed = at_seed[at_seed.dest_pos == ds.end_pos.numpy()[at_seed.prompt_id]]
    assert len(at_seed) > 0 and at_seed.traced.all()  # every seed firing starts the walk
    # a firing at END of a head that is no seed of its prompt does not start it
    end = f[(f.dest_pos == ds.end_pos.numpy()[f.prompt_id]) & (f.layer == f.layer.max())]
    key = set(zip(heads.prompt_id, heads.layer, heads["head"], heads.src))
    others = end[[k not in key for k in zip(end.prompt_id, end.layer, end["head"], end.src_pos)]]
    assert not others.traced.any()


def test_per_prompt_seeds_only_for_correct_prompts(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 8, seed=3)
    res = trace_ioi(tiny_gpt2, ds, progress=False)  # per-prompt seeds by default
    correct = res.prompts.correct.to_numpy()
    assert res.seed_table is not None
    assert set(res.seed_table.prompt_id) <= set(np.nonzero(correct)[0])
    assert res.summary["n_correct"] == int(correct.sum())


def test_role_positions_name_acc_roles(gpt2_tokenizer):
    template = "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to"
    ds = make_ioi_dataset(gpt2_tokenizer, 2, seed=0, prompt_type="ABBA", templates=[template])
    roles = role_positions(ds, gpt2_tokenizer)
    assert list(roles) == list(ROLES)
    # "When Mary and John went to the store, John gave a drink to": one token per word
    want = {"IO": 1, "IO-1": 0, "IO+1": 2, "S1": 3, "S1-1": 2, "S1+1": 4, "S2": 9, "S2-1": 8,
            "S2+1": 10, "END": 13, "END-1": 12, "start": 0, "punct": 8, "verb": 10}  # fmt: skip
    for role, pos in want.items():
        assert roles[role].tolist() == [pos, pos], role
    no_stop = make_ioi_dataset(
        gpt2_tokenizer, 1, seed=0, templates=["Then [A] and [B] saw that [B] gave it to"]
    )
    assert role_positions(no_stop, gpt2_tokenizer)["punct"].tolist() == [-1]


def _authors_rule(m: np.ndarray, frac: float = 0.7) -> set[int]:
    """Franco & Crovella's contrib_ahs, written out plainly: net-sum threshold, ties kept."""
    order = np.argsort(-m, kind="stable")
    cs = np.cumsum(m[order])
    above = np.nonzero(cs > frac * m.sum())[0]
    if not len(above):
        return set()
    cutoff = m[order][above[0]]
    return {int(j) for j in np.nonzero(m >= cutoff)[0]}


def test_paper_rule_adds_the_bias_coordinate_as_the_authors_do(tiny_gpt2):
    """GPT-2 shape with query and key biases: each edge set equals the authors' rule applied,
    by hand, to the heads' writes plus the bias coordinate of an explicit SVD of the
    augmented QK matrix."""
    model = copy.deepcopy(tiny_gpt2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_Q.copy_(torch.randn(block.attn.b_Q.shape, generator=gen))
            block.attn.b_K.copy_(torch.randn(block.attn.b_K.shape, generator=gen))
    ds = make_ioi_dataset(model, 4, seed=0)
    top = model.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(model.cfg.n_heads))
    cfg = TraceConfig(pattern_thresh=0.3)
    assert cfg.augmented_bias  # the paper rule's default
    res = trace_ioi(model, ds, seeds=seeds, seed_src="any", config=cfg, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ds.tokens)
        w_o = model.W_O.double()
    rec = res.result.edge_records
    traced = res.firings[res.firings.traced & (res.firings.layer >= 1)]
    n_heads, checked, with_bias = model.cfg.n_heads, 0, 0
    for f in traced.head(12).itertuples(index=False):
        L, h = int(f.layer), int(f.head)
        attn = model.blocks[L].attn
        with torch.no_grad():
            wq = torch.cat([attn.W_Q[h], attn.b_Q[h][None]]).double()  # [d_model + 1, d_head]
            wk = torch.cat([attn.W_K[h], attn.b_K[h][None]]).double()
        u, s, vh = torch.linalg.svd(wq @ wk.T)
        x_d = torch.cat([cache[f"blocks.{L}.ln1.hook_normalized"][f.prompt_id, f.dest_pos],
                         torch.ones(1)]).double()  # fmt: skip
        comps = torch.tensor(np.asarray(f.components, dtype=np.int64))
        for side, pos, vecs in (("src", f.src_pos, vh.T), ("dest", f.dest_pos, u)):
            w = torch.sign(x_d @ u[:, comps]) * s[comps].sqrt()
            g = (vecs[:, comps] * w).sum(1)  # the side's signal direction, [d_model + 1]
            g_model = g[:-1] - g[:-1].mean()  # LayerNorm readers see centred writes
            scale = cache[f"blocks.{L}.ln1.hook_scale"][f.prompt_id, pos, 0].double()
            z = cache_z(cache, f.prompt_id, pos, L)
            writes = torch.einsum("lhe,lhed,d->lh", z, w_o[:L], g_model)
            values = (writes.flatten() + g[-1]) / scale
            want = _authors_rule(values.numpy())
            mine = rec[(rec.firing_id == f.firing_id) & (rec.side == side)]
            got = {int(a) * n_heads + int(b) for a, b in zip(mine.up_layer, mine.up_head)}
            assert got == want, (f.firing_id, side)
            checked += 1
            with_bias += _authors_rule((writes.flatten() / scale).numpy()) != want
    assert checked >= 8
    assert with_bias > 0  # the bias coordinate changed some edge sets: it was exercised


def cache_z(cache, prompt: int, pos: int, layer: int) -> torch.Tensor:
    """``hook_z`` of the layers below ``layer`` at one position, float64 ``[L, H, d_head]``."""
    return torch.stack(
        [cache[f"blocks.{u}.attn.hook_z"][prompt, pos] for u in range(layer)]
    ).double()


def test_trace_config_resolves_the_bias_coordinate_per_rule():
    assert TraceConfig().augmented_bias is True
    assert TraceConfig(edge_rule="positive").augmented_bias is False
    assert TraceConfig(edge_rule="paper", augmented_bias=False).augmented_bias is False
    thr = TraceConfig(dynamic_thresh=2.5).pattern_thresholds(6)
    assert thr[0] > 1 and torch.allclose(
        thr[1:], torch.tensor([1.0, 2.5 / 3, 2.5 / 4, 0.5, 2.5 / 6])
    )
    with pytest.raises(ValueError, match="^dynamic_thresh"):
        TraceConfig(dynamic_thresh=0.0)


def test_seed_table_columns(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 4, seed=0)
    table = trace_ioi(tiny_gpt2, ds, correct_only=False, progress=False).seed_table
    assert table is not None
    assert list(table.columns) == ["prompt_id", "kind", "layer", "head", "src", "attribution",
                                   "total"]  # fmt: skip
    per_prompt = table.groupby("prompt_id").attribution.sum()
    totals = table.groupby("prompt_id").total.first()
    pd.testing.assert_index_equal(per_prompt.index, totals.index)
    assert (per_prompt > totals).all()  # the seeds exceed each prompt's total
