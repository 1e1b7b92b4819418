"""SVD-sparse decomposition and signal tracing on tiny GPT-2- and Llama-shaped models."""

from __future__ import annotations

import dataclasses
import json

import networkx as nx
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.tracing import (
    Node,
    NodeKind,
    QKSVDCache,
    ResidualWriters,
    TraceConfig,
    find_firings,
    head_name,
    parse_heads,
    project,
    run_batch,
    selected_mask,
    shortest_prefix,
    trace,
    trace_ioi,
    upstream_writes,
)
from tl_superposition.tracing.cache import Workspace
from tl_superposition.tracing.decompose import (
    basis_to_model,
    decompose_layer,
    firing_signal_coordinates,
    signal_coordinates,
)
from tl_superposition.tracing.qk_svd import LayerQK, core_svd, qk_factors, rotary_matrices

MODELS = ["tiny_gpt2", "tiny_llama"]
# Random tiny models attend diffusely; a lower firing threshold gives enough firings to test.
CFG = TraceConfig(pattern_thresh=0.3, batch_size=8)


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def prompts(model):
    return make_ioi_dataset(model, 12, seed=0)


def _cache(model, ds):
    names = lambda n: n.endswith(("hook_normalized", "hook_attn_scores", "hook_pattern"))  # noqa: E731
    _, cache = model.run_with_cache(ds.tokens, names_filter=names)
    return cache


def test_svd_is_exact_for_every_head_and_offset(model):
    qk = LayerQK.from_model(model, 1)
    wq, wk = qk_factors(model, 1)
    scale = model.blocks[1].attn.attn_scale
    offsets = [0, 1, 5] if qk.rotary else [0]
    rot = rotary_matrices(model, 1, torch.tensor(offsets)) if qk.rotary else None
    for h in range(model.cfg.n_heads):
        for i, off in enumerate(offsets):
            r = rot[i] if rot is not None else torch.eye(model.cfg.d_head, dtype=torch.float64)
            dense = wq[h].double() @ r @ wk[h].double().T / scale
            u, s, v = qk.svd(h, off)
            assert torch.allclose(qk.omega(h, off), dense, atol=1e-9)
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-9)
            assert torch.allclose(v.T @ v, torch.eye(v.shape[1], dtype=v.dtype), atol=1e-9)
            assert (s[:-1] >= s[1:]).all()


def test_core_svd_matches_lapack_including_ill_conditioned_cores():
    g = torch.Generator().manual_seed(0)
    cores = torch.randn(6, 16, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(2, 16, 16, generator=g, dtype=torch.float64))
    spread = torch.logspace(0, -12, 16, dtype=torch.float64)  # eigh alone loses V here
    cores[4] = (q[0] * spread) @ q[1].T
    cores[5, :, -1] = 0  # rank deficient
    u, s, v = core_svd(cores)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose((u * s[:, None, :]) @ v.mT, cores, atol=1e-12)
    assert torch.allclose(u.mT @ u, eye.expand_as(u), atol=1e-9)
    assert torch.allclose(v.mT @ v, eye.expand_as(v), atol=1e-9)
    assert torch.allclose(s, torch.linalg.svdvals(cores), atol=1e-12)


def test_layer_qk_decomposes_only_the_pairs_asked_for(model):
    qk = LayerQK.from_model(model, 1)
    offset, head = torch.tensor([3, 3, 0]), torch.tensor([1, 1, 0])
    u, s, v = qk.row_cores(offset, head)
    assert qk.n_cached == 2  # (3, 1) and (0, 0); offsets are all 0 without rotary
    full = LayerQK.from_model(model, 1)
    fu, fs, fv = full.extend_to(4)
    assert full.n_cached == model.cfg.n_heads * (4 if qk.rotary else 1)
    o = offset if qk.rotary else torch.zeros_like(offset)
    for got, want in ((u, fu), (s, fs), (v, fv)):
        assert torch.allclose(got, want[o, head], atol=1e-12)


def test_cores_allocated_up_front_and_grown_later_equal_those_grown_on_demand(model):
    """Allocating for a few offsets, then asking for more, changes no core."""
    offset = torch.tensor([0, 2, 7, 5, 11])
    head = torch.arange(len(offset)) % model.cfg.n_heads
    small = LayerQK.from_model(model, 0, n_offsets=3)
    want = LayerQK.from_model(model, 0).row_cores(offset, head)
    for got, ref in zip(small.row_cores(offset, head), want):
        assert torch.equal(got, ref)


def test_float32_coordinates_give_the_float64_contributions(model, prompts):
    """The coordinates on the bases are taken in the model's dtype; float64 inputs give the
    same contributions to float32 rounding of the residual stream."""
    cache = run_batch(model, prompts.tokens)
    lq, x = QKSVDCache(model)[1], cache.x[:, :, 1]
    fl = decompose_layer(lq, x, cache.pattern[1], cache.scores[1], prompts.lengths, 0.3)
    b, h, d, s = fl.prompt, fl.head, fl.dest, fl.src
    got = project(lq, x[b, d], x[b, s], h, d - s).contributions
    want = project(lq, x[b, d].double(), x[b, s].double(), h, d - s).contributions
    assert len(got) > 0 and x.dtype == torch.float32
    tol = 1e-5 * want.abs().sum(1, keepdim=True)
    assert ((got - want).abs() <= tol).all()
    assert not torch.equal(got, want)  # the float32 path was taken


def test_rotary_depends_only_on_offset(tiny_llama):
    mats = rotary_matrices(tiny_llama, 0, torch.arange(12))
    for p in range(12):
        for s in range(p + 1):
            assert torch.allclose(mats[p] @ mats[s].T, mats[p - s], atol=1e-6)


def test_bilinear_form_reproduces_model_scores(model, prompts):
    """x~_dest Omega x~_src equals hook_attn_scores at every causal place (RoPE offsets, GQA)."""
    cache = _cache(model, prompts)
    qks = QKSVDCache(model)
    P = prompts.tokens.shape[1]
    dest, src = torch.tril_indices(P, P)
    for L in range(model.cfg.n_layers):
        x = cache[f"blocks.{L}.ln1.hook_normalized"]
        scores = cache[f"blocks.{L}.attn.hook_attn_scores"]
        for h in range(model.cfg.n_heads):
            b = torch.arange(len(prompts)).repeat_interleave(len(dest))
            d, s = dest.repeat(len(prompts)), src.repeat(len(prompts))
            proj = project(qks[L], x[b, d], x[b, s], torch.full_like(b, h), d - s)
            got = proj.contributions.sum(1)
            want = scores[b, h, d, s].double()
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (L, h, (got - want).abs().max())


def test_run_batch_holds_the_hooked_activations_in_a_reused_workspace(model, prompts):
    """Every stacked activation equals TransformerLens's cache, also when the workspace was
    laid out for another (larger) batch before."""
    n = model.cfg.n_layers
    _, ref = model.run_with_cache(prompts.tokens)
    workspace = Workspace()
    run_batch(model, prompts.tokens[:, :-1].repeat(2, 1), workspace)  # overwritten below
    got = run_batch(model, prompts.tokens, workspace)
    assert got.x.data_ptr() == workspace.take(1, got.x.dtype, got.x.device).data_ptr()
    stacked = {"x": "ln1.hook_normalized", "z": "attn.hook_z", "mlp": "hook_mlp_out"}
    for field, name in stacked.items():
        want = torch.stack([ref[f"blocks.{L}.{name}"] for L in range(n)], 2)
        assert torch.equal(getattr(got, field), want), field
    assert torch.equal(
        got.scale, torch.stack([ref[f"blocks.{L}.ln1.hook_scale"][..., 0] for L in range(n)], 2)
    )
    for L in range(n):
        assert torch.equal(got.pattern[L], ref[f"blocks.{L}.attn.hook_pattern"])
        assert torch.equal(got.scores[L], ref[f"blocks.{L}.attn.hook_attn_scores"])
    embed = (
        ref["hook_embed"] + ref["hook_pos_embed"] if "hook_pos_embed" in ref else ref["hook_embed"]
    )
    assert torch.equal(got.embed, embed)
    assert torch.equal(got.resid, ref[f"blocks.{n - 1}.hook_resid_post"])


def test_run_batch_keeps_the_float32_normalisation_of_a_bfloat16_model(tiny_llama):
    """TransformerLens normalises half-precision models in float32; the cache keeps that."""
    cfg = dataclasses.replace(tiny_llama.cfg, dtype=torch.bfloat16)
    model = HookedTransformer(cfg, tokenizer=tiny_llama.tokenizer)
    model.load_state_dict(tiny_llama.state_dict(), strict=False)
    model.to(torch.bfloat16)
    tokens = make_ioi_dataset(tiny_llama, 3, seed=2).tokens
    _, ref = model.run_with_cache(tokens)
    got = run_batch(model, tokens, Workspace())
    assert got.x.dtype == got.scale.dtype == torch.float32
    assert got.z.dtype == got.mlp.dtype == torch.bfloat16
    for L in range(cfg.n_layers):
        assert torch.equal(got.x[:, :, L], ref[f"blocks.{L}.ln1.hook_normalized"])
        assert torch.equal(got.z[:, :, L], ref[f"blocks.{L}.attn.hook_z"])


def test_firings_respect_the_definition(model, prompts):
    cache = _cache(model, prompts)
    pat = cache["blocks.1.attn.hook_pattern"]
    sc = cache["blocks.1.attn.hook_attn_scores"]
    b, h, d, s = find_firings(pat, sc, prompts.lengths, pattern_thresh=0.3)
    assert len(b) > 0
    assert (pat[b, h, d, s] >= 0.3).all() and (sc[b, h, d, s] > 0).all()
    assert (s > 0).all() and (d < prompts.lengths[b]).all() and (s <= d).all()
    expected = ((pat >= 0.3) & (sc > 0)).clone()
    expected[..., 0] = False
    for i, n in enumerate(prompts.lengths.tolist()):
        expected[i, :, n:] = False
    assert len(b) == int(expected.sum())


def test_shortest_prefix_on_known_values():
    values = torch.tensor([[1.0, 4.0, -2.0, 2.0], [-3.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    target = values.sum(1)  # 5.0 and -2.5
    order, count = shortest_prefix(values, target)
    assert order[0].tolist() == [1, 3, 0, 2] and count[0] == 2  # 4 + 2 >= 5
    assert order[1].tolist() == [0, 2, 3, 1] and count[1] == 1  # -3 <= -2.5
    mask = selected_mask(order, count)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_trace_decomposition_sums_and_minimal_sets(model, prompts):
    # one batch of all prompts: the same forward pass as _cache, so values compare exactly
    res = trace(
        model,
        prompts.tokens,
        seeds=[(2, 0), (2, 1)],
        seed_dest=prompts.end_pos,
        lengths=prompts.lengths,
        config=dataclasses.replace(CFG, batch_size=len(prompts)),
        progress=False,
    )
    f = res.firings
    assert len(f) > 0
    cache = _cache(model, prompts)
    scores = torch.stack(
        [cache[f"blocks.{L}.attn.hook_attn_scores"] for L in range(model.cfg.n_layers)], 1
    )
    idx = [
        torch.tensor(f[c].to_numpy()) for c in ("prompt_id", "layer", "head", "dest_pos", "src_pos")
    ]
    # the score column is the model's own hook_attn_scores
    assert torch.allclose(
        torch.tensor(f.score.to_numpy()), scores[tuple(idx)], atol=1e-5, rtol=1e-5
    )
    # every decomposition sums back to its score
    assert (f.residual.abs() <= 1e-5 + 1e-4 * f.score.abs()).all()
    # the selected set reaches thresh * score, and one fewer component cannot
    qks = QKSVDCache(model)
    for L in f.layer.unique():
        rows = f[f.layer == L]
        b, h, d, s = (
            torch.tensor(rows[c].to_numpy()) for c in ("prompt_id", "head", "dest_pos", "src_pos")
        )
        x = cache[f"blocks.{L}.ln1.hook_normalized"]
        full = project(qks[int(L)], x[b, d], x[b, s], h, d - s).contributions
        for i, r in enumerate(rows.itertuples()):
            c = full[i]
            tol = 1e-6 * c.abs().sum()
            assert r.n_components == len(r.components) == len(r.contributions)
            assert torch.allclose(c[torch.tensor(r.components)], torch.tensor(r.contributions))
            assert r.contributions.sum() >= CFG.thresh * r.score - tol
            best_smaller = torch.sort(c, descending=True).values[: r.n_components - 1].sum()
            assert best_smaller < CFG.thresh * r.score - tol


def test_signal_directions_from_stored_rows_equal_those_of_the_projections(model, prompts):
    """The walk rebuilds signal directions from the stored sparse sets and signs."""
    cache = run_batch(model, prompts.tokens)
    qks = QKSVDCache(model)
    for L in range(model.cfg.n_layers):
        lq, x = qks[L], cache.x[:, :, L]
        fl = decompose_layer(
            lq, x, cache.pattern[L], cache.scores[L], prompts.lengths, CFG.pattern_thresh, 0.8
        )
        assert len(fl) > 0
        rows = torch.arange(len(fl)).flip(0)  # any order
        t_src, t_dest = firing_signal_coordinates(lq, fl, rows)
        b, h, d, s = (t[rows] for t in (fl.prompt, fl.head, fl.dest, fl.src))
        proj = project(lq, x[b, d], x[b, s], h, d - s)
        selected = selected_mask(fl.order[rows], fl.count[rows])
        want_src, want_dest = signal_coordinates(proj, selected)
        assert torch.allclose(t_src, want_src, atol=1e-12)
        assert torch.allclose(t_dest, want_dest, atol=1e-12)
        # by definition x~_dest . g_dest = sum over the sparse set of sqrt(S_k) |x~_dest . u_k|
        g_dest = basis_to_model(lq.q_basis, t_dest, h)
        x_aug = torch.cat([x[b, d].double(), torch.ones(len(rows), 1, dtype=torch.float64)], 1)
        expect = (selected * proj.s.sqrt() * proj.a.abs()).sum(1)
        assert torch.allclose((x_aug * g_dest).sum(1), expect, atol=1e-9)


def test_upstream_writes_add_up_to_the_normalised_residual(model, prompts):
    cache = run_batch(model, prompts.tokens)
    n = 20
    g = torch.randn(n, model.cfg.d_model, dtype=torch.float64)
    b = torch.randint(0, len(prompts), (n,))
    p = torch.randint(0, int(prompts.lengths.min()), (n,))
    for L in range(model.cfg.n_layers):
        writes = upstream_writes(model, cache, L, b, p, g)
        assert writes.shape[1] == L * model.cfg.n_heads + L + 1 + 1
        x = cache.x[b, p, L].double()
        gc = g - g.mean(1, keepdim=True) if model.cfg.normalization_type == "LNPre" else g
        assert torch.allclose(writes.sum(1), (x * gc).sum(1), atol=1e-4)
        assert torch.allclose(
            upstream_writes(ResidualWriters.from_model(model), cache, L, b, p, g), writes
        )


def test_graph_is_non_empty_and_round_trips(model, prompts, tmp_path):
    top = model.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(model.cfg.n_heads))
    res = trace_ioi(model, prompts, seeds=seeds, seed_src="any", config=CFG, progress=False)
    assert res.summary["n_seed_firings"] > 0
    assert len(res.edges) > 0 and res.summary["n_traced_firings"] > res.summary["n_seed_firings"]
    g = res.graph()
    assert g.number_of_edges() == len(res.edges)
    paths = res.save(tmp_path)
    back = nx.read_graphml(paths["graph.graphml"])
    assert sorted(back.edges(keys=True)) == sorted(g.edges(keys=True))
    for u, v, k, d in g.edges(keys=True, data=True):
        assert back[u][v][k]["n_firings"] == d["n_firings"]
    firings = pd.read_parquet(paths["firings.parquet"])
    assert len(firings) == len(res.firings)
    assert (firings.n_components == firings.components.map(len)).all()
    for col in (
        "prompt_id",
        "layer",
        "head",
        "dest_pos",
        "src_pos",
        "score",
        "pattern",
        "n_components",
        "components",
        "contributions",
    ):
        assert col in firings.columns
    edges = pd.read_csv(paths["edges.csv"])
    assert list(edges.columns) == [
        "upstream",
        "downstream",
        "side",
        "weight",
        "n_firings",
        "n_prompts",
    ]
    assert set(edges.side) <= {"src", "dest"}
    prompts_csv = pd.read_csv(paths["prompts.csv"])
    assert list(prompts_csv.columns[:9]) == [
        "prompt_id",
        "text",
        "io",
        "s",
        "io_pos",
        "s1_pos",
        "s2_pos",
        "end_pos",
        "prompt_type",
    ]
    assert "logit_diff" in prompts_csv.columns
    summary = json.loads(paths["summary.json"].read_text())
    for key in (
        "model",
        "n_prompts",
        "mean_logit_diff",
        "n_firings",
        "median_n_components",
        "seconds",
    ):
        assert key in summary
    assert (
        paths["signal_graph.png"].stat().st_size > 0 and paths["components.png"].stat().st_size > 0
    )
    # edges only point from lower to higher layers, into heads
    for u, v in zip(edges.upstream, edges.downstream):
        up, down = Node.parse(u), Node.parse(v)
        assert down.kind == NodeKind.ATTN and up.layer < down.layer


def test_dla_seeds_are_the_top_heads(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 8, seed=2)
    res = trace_ioi(tiny_gpt2, ds, seeds="dla", n_seeds=2, config=CFG, progress=False)
    mean = res.dla.mean(0)
    top = torch.topk(mean.flatten(), 2).indices
    assert res.summary["seeds"] == [
        head_name(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in top
    ]


def test_bad_seeds_and_heads(tiny_gpt2, monkeypatch):
    ds = make_ioi_dataset(tiny_gpt2, 4, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        trace(tiny_gpt2, ds.tokens, seeds=[(7, 0)], seed_dest=ds.end_pos, lengths=ds.lengths)
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("9-6")
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("M3")
    assert parse_heads("9.6, A10.0") == [(9, 6), (10, 0)]
    assert parse_heads([(9, 6), "A10.0"]) == [(9, 6), (10, 0)]

    # trace_ioi rejects bad seeds before the logit-attribution pass over the prompts
    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(tiny_gpt2, "run_with_cache", no_forward)
    for seeds, match in (("name-movers", "name-movers"), ("3.0", "out of range"), ("9", "LAYER")):
        with pytest.raises(ValueError, match=match):
            trace_ioi(tiny_gpt2, ds, seeds=seeds, progress=False)
    with pytest.raises(ValueError, match="n_seeds"):
        trace_ioi(tiny_gpt2, ds, seeds="dla", n_seeds=13, progress=False)  # 3 layers x 4 heads
    with pytest.raises(ValueError, match="seed_src"):
        trace_ioi(tiny_gpt2, ds, seed_src="END", progress=False)


def test_node_names_round_trip():
    for name in ("A9.6", "A0.0", "A29.8", "M3", "M0", "E"):
        assert Node.parse(name).name == name
    assert Node.parse("A9.6") == Node(NodeKind.ATTN, 9, 6) == Node.attn(9, 6)
    assert Node.parse("M3") == Node(NodeKind.MLP, 3) and Node.parse("E").layer == -1
    assert head_name(9, 6) == "A9.6" and str(Node.attn(1, 2)) == "A1.2"
    assert [NodeKind(k).label for k in range(3)] == ["attn", "mlp", "embed"]
    for bad in ("A9", "A9.6.1", "M3.2", "X1", "A-1.0", "e", ""):
        with pytest.raises(ValueError, match="node name"):
            Node.parse(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pattern_thresh", 0.0),
        ("pattern_thresh", 1.5),
        ("pattern_thresh", float("nan")),
        ("thresh", 0.0),
        ("thresh", -1.0),
        ("edge_thresh", 0.0),
        ("edge_thresh", 1.01),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("exclude_first", "no"),
        ("edge_rule", "largest"),
        ("augmented_bias", 1),
        ("nonfiring_frac", 1.5),
        ("nonfiring_frac", -0.1),
        ("seed", -1),
    ],
)
def test_trace_config_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        TraceConfig(**{field: value})


def test_cli_defaults_come_from_trace_config():
    from tl_superposition.cli import build_parser

    args = build_parser().parse_args(["trace-ioi", "--out", "x"])
    default = TraceConfig()
    for field in ("pattern_thresh", "thresh", "edge_thresh", "batch_size"):
        assert getattr(args, field) == getattr(default, field), field


def test_layer_qk_repr_is_short(tiny_llama):
    text = repr(QKSVDCache(tiny_llama)[1])
    assert text.startswith("LayerQK(layer=1, n_heads=4") and len(text) < 200


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    import importlib

    import matplotlib

    from tl_superposition.tracing import plots

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        importlib.reload(plots)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-prompts", "0"], "--n-prompts"),
        (["--pattern-thresh", "1.5"], "--pattern-thresh must be in (0, 1]"),
        (["--thresh", "0"], "--thresh must be > 0"),
        (["--edge-thresh", "-0.7"], "--edge-thresh must be in (0, 1]"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--validate", "-1"], "--validate must be >= 0"),
        (["--patching-prompts", "-2"], "--patching-prompts must be >= 0"),
        (["--seeds", "9-6"], "LAYER.HEAD"),
        (["--heldout-seed", "0"], "--heldout-seed must differ from --seed (0)"),
        (["--heldout-prompts", "-1"], "--heldout-prompts must be >= 0"),
        (["--min-prompts", "0"], "--min-prompts must be an int >= 1"),
        (["--circuit-threshold", "-1"], "--circuit-threshold must be >= 0"),
        (["--node-frac", "2"], "--node-frac must be in [0, 1]"),
        (["--dynamic-thresh", "0"], "--dynamic-thresh must be None or a number > 0"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--model", "gtp2"], "Did you mean 'gpt2'"),
        (["--model", "/no/such/folder"], "no model folder"),
    ],
)
def test_cli_rejects_bad_input_before_loading(tmp_path, capsys, no_model_loading, extra, message):
    from tl_superposition.cli import main

    out = tmp_path / "run"
    assert main(["trace-ioi", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err) < 800  # one clear line, not every model name
    assert not out.exists()  # nothing written


def test_cli_rejects_an_unwritable_out_before_loading(tmp_path, capsys, no_model_loading):
    from tl_superposition.cli import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "run"):
        assert main(["trace-ioi", "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trace_on_the_gpu_matches_the_cpu(tiny_llama, tmp_path):
    """--device cuda: every tensor follows the model; the trace equals the CPU one."""
    import copy

    ds = make_ioi_dataset(tiny_llama, 8, seed=0)
    cfg = TraceConfig(edge_rule="paper")
    cpu = trace_ioi(tiny_llama, ds, config=cfg, progress=False, out_dir=tmp_path / "cpu")
    gpu_model = copy.deepcopy(tiny_llama).to("cuda")
    gpu = trace_ioi(gpu_model, ds, config=cfg, progress=False, out_dir=tmp_path / "gpu")
    keys = ["prompt_id", "layer", "head", "dest_pos", "src_pos"]
    assert cpu.firings[keys].equals(gpu.firings[keys])
    assert torch.allclose(
        torch.tensor(cpu.firings.score.to_numpy()),
        torch.tensor(gpu.firings.score.to_numpy()),
        atol=1e-4,
    )
    assert cpu.summary["seeds"] == gpu.summary["seeds"]
