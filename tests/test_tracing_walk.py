"""The walk, the one-pass trace and its files: hand-made walks, determinism, streaming."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import numpy as np
import pandas as pd
import pytest
import torch

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.tracing import (
    QKSVDCache,
    ResidualWriters,
    TraceConfig,
    trace,
    trace_ioi,
    upstream_writes,
    walk_upstream,
)
from tl_superposition.tracing.cache import Workspace, run_batch
from tl_superposition.tracing.decompose import decompose_batch
from tl_superposition.tracing.graph import paper_graph
from tl_superposition.tracing.ioi_trace import ioi_roles
from tl_superposition.tracing.seeds import SeedChooser
from tl_superposition.tracing.trace import start_bits
from tl_superposition.tracing.walk import CandidateEdges, batch_edges, seed_firings, walk_batch
from tl_superposition.tracing.writes import (
    WRITE_PROMPTS,
    ChunkWriters,
    side_directions,
    signal_writes,
)

CFG = TraceConfig(pattern_thresh=0.3, batch_size=4)
# the files two traces that should agree are compared on, byte for byte
COMPARED_FILES = ("firings.parquet", "edges.csv", "edge_records.parquet", "writers.csv")
# the module (the package's attribute ``trace`` is the function of the same name)
trace_module = importlib.import_module("tl_superposition.tracing.trace")
qk_svd_module = importlib.import_module("tl_superposition.tracing.qk_svd")


def _edges(*rows):
    firing, side, up_layer, up_head = (np.array(c) for c in zip(*rows))
    return CandidateEdges(firing, side, up_layer, up_head, np.ones(len(rows)))


def test_walk_follows_edges_down_to_every_firing_at_the_position():
    #            prompt layer head dest src
    firings = [
        (0, 2, 0, 5, 3),  # 0: the seed
        (0, 1, 1, 3, 2),  # 1: head 1.1 at dest 3 (source side of the seed)...
        (0, 1, 1, 3, 1),  # 2: ...from two sources: both traced
        (0, 0, 0, 3, 1),  # 3: head 0.0 at dest 3 (destination side of firing 1)
        (1, 1, 1, 3, 2),  # 4: same head and destination in another prompt: not traced
        (0, 1, 0, 4, 2),  # 5: never reached...
        (0, 0, 1, 2, 1),  # 6: ...so its edge to this one is not followed
        (0, 1, 1, 5, 4),  # 7: head 1.1 at another destination: not traced
    ]
    prompt, layer, head, dest, src = (np.array(c) for c in zip(*firings))
    edges = _edges((0, 0, 1, 1), (1, 1, 0, 0), (5, 0, 0, 1))
    start = seed_firings(prompt, layer, head, dest, src, [(2, 0)], np.array([5, 5]), None)
    assert start.tolist() == [True] + [False] * 7
    got = walk_upstream(prompt, layer, head, dest, src, edges, start)
    assert np.nonzero(got)[0].tolist() == [0, 1, 2, 3]
    got = walk_upstream(prompt, layer, head, dest, src, edges, start, first_layer=1)
    assert np.nonzero(got)[0].tolist() == [0, 1, 2]
    # a required seed source that no seed firing has: nothing starts
    none = seed_firings(
        prompt, layer, head, dest, src, [(2, 0)], np.array([5, 5]), np.array([1, 1])
    )
    assert not walk_upstream(prompt, layer, head, dest, src, edges, none).any()


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def test_batched_writes_equal_the_float64_reference(model):
    ds = make_ioi_dataset(model, 6, seed=3)
    cache = run_batch(model, ds.tokens)
    qk, writers = QKSVDCache(model), ResidualWriters.from_model(model)
    f, _ = decompose_batch(qk, cache, ds.lengths, CFG)
    w = signal_writes(qk, writers, cache, f)
    g = side_directions(qk, f, torch.arange(len(f)), centred=False)[:, :-1]
    n, H = len(f), model.cfg.n_heads
    for L in range(1, model.cfg.n_layers):
        rows = (f.layer == L).nonzero()[:, 0][:30]
        for side, pos in ((0, f.src), (1, f.dest)):
            r = rows + side * n
            ref = upstream_writes(writers, cache, L, f.prompt[rows], pos[rows], g[r])
            got = torch.cat([w.heads[r, : L * H], w.mlps[r, :L], w.embed[r, None]], 1)
            assert torch.allclose(got.double(), ref[:, :-1], atol=1e-4, rtol=1e-3)
            assert torch.allclose(w.bias[r].double(), ref[:, -1], atol=1e-4, rtol=1e-3)


def test_writes_from_a_given_chunk_equal_those_of_one_call_over_two_chunks(tiny_llama):
    """The walk passes one chunk of head outputs per call; the writes do not depend on it."""
    ds = make_ioi_dataset(tiny_llama, WRITE_PROMPTS + 3, seed=5)
    cache = run_batch(tiny_llama, ds.tokens)
    qk, writers = QKSVDCache(tiny_llama), ResidualWriters.from_model(tiny_llama)
    f, _ = decompose_batch(qk, cache, ds.lengths, CFG)
    whole = signal_writes(qk, writers, cache, f)
    n = len(f)
    for lo in (0, WRITE_PROMPTS):
        chunk = ChunkWriters(writers, cache, lo, min(lo + WRITE_PROMPTS, len(ds.tokens)))
        for L in range(tiny_llama.cfg.n_layers):
            rows = (f.prompt >= lo) & (f.prompt < lo + WRITE_PROMPTS) & (f.layer == L)
            rows = rows.nonzero()[:, 0]
            got = signal_writes(qk, writers, cache, f, rows, chunk)
            sides = torch.cat([rows, rows + n])
            torch.testing.assert_close(got.heads, whole.heads[sides])
            torch.testing.assert_close(got.mlps, whole.mlps[sides])
            torch.testing.assert_close(got.bias, whole.bias[sides])


def _every_position(chunk: ChunkWriters, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.arange(chunk.lo, chunk.hi).repeat_interleave(n_pos)
    return prompt, torch.arange(n_pos).repeat(chunk.hi - chunk.lo)


def test_chunk_outputs_are_z_W_O_in_one_workspace_and_a_given_chunk_is_kept(tiny_llama):
    """The walk forms every chunk of a trace in one workspace, position by position."""
    n = WRITE_PROMPTS + 3
    ds = make_ioi_dataset(tiny_llama, n, seed=5)
    cache = run_batch(tiny_llama, ds.tokens)
    qk, writers = QKSVDCache(tiny_llama), ResidualWriters.from_model(tiny_llama)
    L, H, P = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads, ds.tokens.shape[1]
    z_W_O = torch.einsum("bplhe,lhed->bplhd", cache.z, tiny_llama.W_O.detach()).flatten(2, 3)
    workspace = Workspace()
    for lo, hi in ((0, 2), (0, WRITE_PROMPTS), (WRITE_PROMPTS, n)):
        chunk = ChunkWriters(writers, cache, lo, hi, workspace)
        prompt, pos = _every_position(chunk, P)
        chunk.form(prompt[::2], pos[::2], H)  # some positions with the first layer's heads,
        chunk.form(prompt, pos, L * H)  # then every position with every head
        for b, p in zip(prompt.tolist(), pos.tolist()):
            torch.testing.assert_close(chunk.outputs(b, p), z_W_O[b, p])
        # the one-lookup form the walk uses: the same outputs, transposed
        for b, p, out in zip(prompt.tolist(), pos.tolist(), chunk.transposed_outputs(prompt, pos)):
            assert torch.equal(out, chunk.outputs(b, p).T)
    with pytest.raises(KeyError, match="not formed"):
        ChunkWriters(writers, cache, 0, 2).outputs(1, 0)
    with pytest.raises(KeyError, match="position 0 of prompt 1 was not formed"):
        ChunkWriters(writers, cache, 0, 2).transposed_outputs(torch.tensor([1]), torch.tensor([0]))
    # rows outside the given chunk: their chunk is formed apart, the given one is untouched
    chunk = ChunkWriters(writers, cache, 0, WRITE_PROMPTS, workspace)
    prompt, pos = _every_position(chunk, P)
    chunk.form(prompt, pos, L * H)
    before = [chunk.outputs(b, p).clone() for b, p in zip(prompt.tolist(), pos.tolist())]
    f, _ = decompose_batch(qk, cache, ds.lengths, CFG)
    got = signal_writes(qk, writers, cache, f, torch.arange(len(f)), chunk)
    for b, p, old in zip(prompt.tolist(), pos.tolist(), before):
        assert torch.equal(chunk.outputs(b, p), old)
    torch.testing.assert_close(got.heads, signal_writes(qk, writers, cache, f).heads)


def test_dla_seeds_need_one_pass_and_give_the_trace_of_those_seeds(tiny_llama, monkeypatch):
    ds = make_ioi_dataset(tiny_llama, 10, seed=4)
    calls = []
    real = trace_module.run_batch
    monkeypatch.setattr(trace_module, "run_batch", lambda *a: calls.append(1) or real(*a))
    res = trace_ioi(
        tiny_llama, ds, seeds="dla", n_seeds=2, seed_src="any", config=CFG, progress=False
    )
    assert len(calls) == 3  # 10 prompts in batches of 4: each runs once
    again = trace(
        tiny_llama,
        ds.tokens,
        res.result.seeds,
        seed_dest=ds.end_pos,
        lengths=ds.lengths,
        config=CFG,
        progress=False,
        roles=ioi_roles(ds, tiny_llama.tokenizer),
    )
    pd.testing.assert_frame_equal(res.firings, again.firings)
    pd.testing.assert_frame_equal(res.edges, again.edges)
    # the logit difference from the trace's pass is the model's
    logits = tiny_llama(ds.tokens)
    rows = torch.arange(len(ds))
    ld = logits[rows, ds.end_pos, ds.io_tokens] - logits[rows, ds.end_pos, ds.s_tokens]
    assert np.allclose(res.prompts.logit_diff, ld.detach().numpy(), atol=1e-4)


def test_two_runs_write_identical_files(tiny_gpt2, tmp_path):
    ds = make_ioi_dataset(tiny_gpt2, 9, seed=5)
    top = tiny_gpt2.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(tiny_gpt2.cfg.n_heads))
    for run in ("a", "b"):
        trace_ioi(
            tiny_gpt2, ds, seeds=seeds, seed_src="any", config=CFG, progress=False,
            out_dir=tmp_path / run,
        )  # fmt: skip
    for name in COMPARED_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list(tmp_path.glob("*/.trace-*"))  # the temporary folder is gone


def test_a_batch_without_edge_records_keeps_the_later_batches_records(tiny_llama, tmp_path):
    """The first batch's seed position is 0, whose only source (BOS) never fires: it writes no
    edge records, and the next batch writes what a trace seeded in every prompt writes."""
    ds = make_ioi_dataset(tiny_llama, 2 * CFG.batch_size, seed=6)
    top = tiny_llama.cfg.n_layers - 1
    seeds = [(top, h) for h in range(tiny_llama.cfg.n_heads)]
    no_seed = ds.end_pos.clone()
    no_seed[: CFG.batch_size] = 0
    records = {}
    for name, dest in (("first empty", no_seed), ("all", ds.end_pos)):
        trace(
            tiny_llama, ds.tokens, seeds, seed_dest=dest, lengths=ds.lengths, config=CFG,
            progress=False, out_dir=tmp_path / name, roles=ioi_roles(ds),
        )  # fmt: skip
        records[name] = pd.read_parquet(tmp_path / name / "edge_records.parquet")
    later = records["all"][records["all"].prompt_id >= CFG.batch_size].reset_index(drop=True)
    assert len(records["all"]) > len(later) > 0  # both batches of the full trace have records
    pd.testing.assert_frame_equal(records["first empty"], later)
    assert set(later.pos_role) - {""} <= {"IO", "S1", "S2", "END"}


def test_traces_sharing_a_qk_cache_decompose_once_and_write_the_same_files(
    tiny_llama, tmp_path, monkeypatch
):
    """One QKSVDCache passed to several traces: each writes what a trace with its own cache
    writes, and a trace whose cores are all cached decomposes none."""
    top = tiny_llama.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(tiny_llama.cfg.n_heads))
    sets = {
        "a": make_ioi_dataset(tiny_llama, 6, seed=7),
        "b": make_ioi_dataset(tiny_llama, 9, seed=8),
    }
    shared = QKSVDCache(tiny_llama)

    def run(ds, out, qk):
        trace_ioi(
            tiny_llama, ds, seeds=seeds, seed_src="any", config=CFG, progress=False,
            out_dir=out, qk=qk,
        )  # fmt: skip

    for name, ds in sets.items():
        run(ds, tmp_path / "shared" / name, shared)
        run(ds, tmp_path / "own" / name, None)
        for f in COMPARED_FILES:
            assert (tmp_path / "shared" / name / f).read_bytes() == (
                tmp_path / "own" / name / f
            ).read_bytes()
    assert sum(shared[L].n_cached for L in range(tiny_llama.cfg.n_layers)) > 0
    calls = []
    real = qk_svd_module.core_svd
    monkeypatch.setattr(qk_svd_module, "core_svd", lambda *a: calls.append(1) or real(*a))
    run(sets["a"], tmp_path / "again", shared)
    assert not calls


def test_a_qk_cache_of_other_weights_is_refused_before_the_model_runs(
    tiny_llama, tiny_gpt2, monkeypatch
):
    ds = make_ioi_dataset(tiny_llama, 4, seed=1)
    calls = []
    monkeypatch.setattr(trace_module, "run_batch", lambda *a: calls.append(1))
    edits = {
        "in place": lambda attn: attn.W_Q[0, 0, 0].add_(1.0),
        "through .data": lambda attn: attn.W_Q.data[0, 0, 0].add_(1.0),  # no version bump
        "of a grouped key": lambda attn: attn._W_K.data[0, 0, 0].add_(1.0),
        "of a query bias": lambda attn: attn.b_Q.data[0, 0].add_(1.0),
    }
    cases = [(tiny_llama, QKSVDCache(tiny_gpt2), "another model")]
    for edit in edits.values():
        edited = copy.deepcopy(tiny_llama)
        qk = QKSVDCache(edited)
        with torch.no_grad():
            edit(edited.blocks[1].attn)
        cases.append((edited, qk, "query or key weights changed"))
    for model, cache, message in cases:
        with pytest.raises(ValueError, match=message):
            trace_ioi(model, ds, seeds="2.0", config=CFG, progress=False, qk=cache)
    assert not calls


def test_a_qk_cache_outlives_edits_of_value_and_output_weights(tiny_llama, tmp_path):
    """W_V and W_O are not part of any QK form: after editing them, a trace given the cache
    made before writes what a trace with a new cache writes."""
    model = copy.deepcopy(tiny_llama)
    ds = make_ioi_dataset(model, 6, seed=3)
    qk = QKSVDCache(model)
    trace_ioi(model, ds, seeds="2.0", config=CFG, progress=False, qk=qk)
    with torch.no_grad():
        model.blocks[1].attn._W_V.mul_(2.0)
        model.blocks[1].attn.W_O.data.mul_(-1.0)
    for name, cache in (("kept", qk), ("new", None)):
        trace_ioi(
            model, ds, seeds="2.0", config=CFG, progress=False, qk=cache,
            out_dir=tmp_path / name,
        )  # fmt: skip
    for f in COMPARED_FILES:
        assert (tmp_path / "kept" / f).read_bytes() == (tmp_path / "new" / f).read_bytes()


def test_tables_agree_with_the_firings(tiny_llama):
    ds = make_ioi_dataset(tiny_llama, 8, seed=6)
    top = tiny_llama.cfg.n_layers - 1
    seeds = ",".join(f"{top}.{h}" for h in range(tiny_llama.cfg.n_heads))
    cfg = dataclasses.replace(CFG, nonfiring_frac=0.05)
    res = trace_ioi(tiny_llama, ds, seeds=seeds, seed_src="any", config=cfg, progress=False)
    f, heads = res.firings, res.heads.set_index(["layer", "head"])
    assert len(heads) == tiny_llama.cfg.n_layers * tiny_llama.cfg.n_heads
    counts = f.groupby(["layer", "head"]).agg(n=("traced", "size"), t=("traced", "sum"))
    for (L, h), row in counts.iterrows():
        assert heads.loc[(L, h), "n_firings"] == row.n
        assert heads.loc[(L, h), "n_traced"] == row.t
        med = f[(f.layer == L) & (f["head"] == h)].n_components.median()
        assert heads.loc[(L, h), "median_components"] == med
    # MLP and embedding writes into traced firings add up to the firings' per-kind sums
    traced = f[f.traced]
    w = res.result.writers
    for side in ("src", "dest"):
        mlps = w[(w.side == side) & w.upstream.str.startswith("M")].weight.sum()
        emb = w[(w.side == side) & (w.upstream == "E")].weight.sum()
        assert np.isclose(mlps, traced[f"{side}_from_mlps"].sum(), rtol=1e-4, atol=1e-3)
        assert np.isclose(emb, traced[f"{side}_from_embed"].sum(), rtol=1e-4, atol=1e-3)
    # every edge record belongs to a traced firing, and edges.csv counts them
    rec = res.result.edge_records
    assert set(rec.firing_id) <= set(traced.firing_id)
    assert res.edges.n_firings.sum() == len(rec)
    # non-firings are places where the head does not fire, decomposed the same way
    nf = res.result.nonfirings
    assert len(nf) > 0 and ((nf.pattern < cfg.pattern_thresh) | (nf.score <= 0)).all()
    assert (nf.residual.abs() < 1e-4 + 1e-4 * nf.score.abs()).all()


def test_paper_graph_on_hand_made_records():
    rec = pd.DataFrame(
        {
            "prompt_id": [0, 0, 1, 1, 2],
            "layer": [2, 2, 2, 2, 2],
            "head": [0, 0, 0, 0, 0],
            "side": ["src", "src", "src", "dest", "src"],
            "pos": [3, 3, 4, 6, 9],
            "pos_role": ["IO", "IO", "IO", "END", ""],
            "up_layer": [1, 1, 1, 1, 1],
            "up_head": [1, 1, 1, 1, 1],
            "weight": [1.0, 3.0, 4.0, 5.0, 7.0],
        }
    )
    firings = pd.DataFrame({"layer": [0, 1, 2, 2], "head": [0, 1, 0, 0]})
    g = paper_graph(rec, firings, first_layer=1)
    # prompt 0 counts once with its mean (2.0), prompt 1 adds 4.0: mean over prompts 3.0
    assert g["A1.1"]["A2.0@IO"]["weight"] == 3.0 and g["A1.1"]["A2.0@IO"]["n_prompts"] == 2
    assert g["A1.1"]["A2.0@END"]["weight"] == 5.0 and g["A1.1"]["A2.0@END"]["side"] == "dest"
    assert g.has_edge("A2.0@IO", "A2.0") and "A2.0@" not in g  # unnamed position dropped
    assert g.nodes["A2.0"]["n_firings"] == 2 and g.nodes["A1.1"]["n_firings"] == 1


def test_an_interrupted_trace_leaves_the_folder_as_it_was(tiny_gpt2, tmp_path, monkeypatch):
    ds = make_ioi_dataset(tiny_gpt2, 9, seed=7)
    out = tmp_path / "run"
    out.mkdir()
    (out / "firings.parquet").write_bytes(b"an earlier trace")
    calls = []
    real = trace_module.decompose_batch

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trace_module, "decompose_batch", fail_second)
    with pytest.raises(KeyboardInterrupt):
        trace_ioi(tiny_gpt2, ds, seeds="2.0", config=CFG, progress=False, out_dir=out)
    assert [p.name for p in out.iterdir()] == ["firings.parquet"]
    assert (out / "firings.parquet").read_bytes() == b"an earlier trace"


def test_the_batch_walk_reaches_what_the_walk_over_all_edges_reaches(model):
    """Measuring only reached firings changes nothing: same reach as with every edge known."""
    ds = make_ioi_dataset(model, 6, seed=8)
    cache = run_batch(model, ds.tokens)
    qk, writers = QKSVDCache(model), ResidualWriters.from_model(model)
    for rule in ("paper", "positive"):
        cfg = dataclasses.replace(CFG, edge_rule=rule)
        f, _ = decompose_batch(qk, cache, ds.lengths, cfg)
        rows = torch.arange(len(f))
        every = batch_edges(f, signal_writes(qk, writers, cache, f), rows, cfg, model.cfg.n_heads)
        cols = [getattr(f, k).numpy() for k in ("prompt", "layer", "head", "dest", "src")]
        top = model.cfg.n_layers - 1
        heads = [((top, 0), 0), ((top, 1), 1)]
        start = start_bits(f, heads, ds.end_pos.numpy(), None)
        walk = walk_batch(qk, writers, cache, f, start, cfg)
        for head, bit in heads:
            seeds = seed_firings(*cols, [head], ds.end_pos.numpy(), None)
            want = walk_upstream(*cols, every, seeds, cfg.first_layer)
            assert ((walk.reach >> bit) & 1).astype(bool).tolist() == want.tolist()
        # the walk measured exactly the reached firings, and found their edges
        assert walk.rows.tolist() == np.nonzero(walk.reach)[0].tolist()
        reached = set(walk.rows.tolist())
        keep = np.array([i in reached for i in every.firing], dtype=bool)
        assert walk.edges.firing.tolist() == every.firing[keep].tolist()
        assert walk.edges.up_head.tolist() == every.up_head[keep].tolist()


class LateSeeds(SeedChooser):
    """Candidates that never include the final seed: every batch is walked again."""

    def __init__(self, final, decoy):
        self.final, self.decoy = final, decoy

    def candidates(self):
        return [self.decoy]

    def choose(self):
        return [self.final]


def test_batches_whose_candidates_missed_a_seed_are_walked_again(tiny_llama):
    ds = make_ioi_dataset(tiny_llama, 9, seed=9)
    top = tiny_llama.cfg.n_layers - 1
    kwargs = dict(seed_dest=ds.end_pos, lengths=ds.lengths, config=CFG, progress=False)
    late = trace(tiny_llama, ds.tokens, LateSeeds((top, 1), (top, 0)), **kwargs)
    direct = trace(tiny_llama, ds.tokens, [(top, 1)], **kwargs)
    assert late.stats["n_batches_walked_again"] == 3 and direct.stats["n_batches_walked_again"] == 0
    assert late.firings.traced.sum() > 0
    pd.testing.assert_frame_equal(late.firings, direct.firings)
    pd.testing.assert_frame_equal(late.edge_records, direct.edge_records)
