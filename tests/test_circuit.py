"""From a trace to a circuit: unification, pruning, the local edit, the Circuit's files."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from tl_superposition.circuit import Circuit, CircuitConfig, node_name, parse_node, unify
from tl_superposition.circuit.extract import prune_top_down
from tl_superposition.circuit.graphs import ROOT, prompt_edges, seed_edges
from tl_superposition.circuit.local_edit import LocalEdits, run_local_edits, ungrouped
from tl_superposition.ioi import logit_diff_from_resid, make_ioi_dataset


def _edges(rows):
    return pd.DataFrame(rows, columns=["prompt_id", "up", "down", "side", "weight"])


def test_node_names_round_trip():
    name = node_name(23, 3, "END", "S2")
    assert name == "A23.3:END>S2"
    assert parse_node(name) == {"kind": "attn", "layer": 23, "head": 3, "dest_role": "END",
                                "src_role": "S2"}  # fmt: skip
    assert parse_node("M29:END")["kind"] == "mlp" and parse_node(ROOT)["kind"] == "logits"
    for bad in ("A23:END>S2", "X1:END", "A1.2"):
        with pytest.raises(ValueError, match="not a circuit node name"):
            parse_node(bad)


def test_unify_keeps_frequent_nodes_and_averages_over_prompt_graphs():
    a, b, c, rare = "A3.0:END>IO", "A1.1:IO>start", "A2.0:S2>S1", "A0.1:S1>start"
    per_prompt = _edges(
        [
            (0, a, ROOT, "logits", 2.0),
            (1, a, ROOT, "logits", 4.0),
            (2, a, ROOT, "logits", 3.0),
            (0, b, a, "src", 1.0),
            (0, b, a, "src", 3.0),  # two records of one edge in one prompt: their mean, 2.0
            (1, b, a, "src", 1.0),
            (1, c, a, "dest", 0.5),
            (2, c, a, "dest", 0.5),
            (2, rare, c, "src", 9.0),  # rare appears in one prompt graph only
        ]
    )
    g = unify(per_prompt, n_graphs=4, node_frac=0.5)  # round(0.5 * 4) = 2 prompt graphs
    assert g.min_node_prompts == 2
    assert set(g.nodes.node) == {a, b, c, ROOT}
    e = g.edges.set_index(["up", "down", "side"])
    assert e.loc[(a, ROOT, "logits")].weight == pytest.approx((2 + 4 + 3) / 4)
    assert e.loc[(b, a, "src")].weight == pytest.approx((2.0 + 1.0) / 4)
    assert e.loc[(b, a, "src")].n_prompts == 2
    assert e.loc[(c, a, "dest")].n_prompts == 2 and len(e) == 3
    nodes = g.nodes.set_index("node")
    assert nodes.loc[a, "n_prompts"] == 3 and nodes.loc[a, "layer"] == 3
    # Python's round, as ACC++: round(0.5 * 5) = 2 (banker's rounding), round(0.5 * 7) = 4
    assert unify(per_prompt, 5, 0.5).min_node_prompts == 2
    assert unify(per_prompt, 7, 0.5).min_node_prompts == 4
    with pytest.raises(ValueError, match="node_frac"):
        unify(per_prompt, 4, 1.5)


def _hand_graph():
    """logits <- s (seed, layer 9) <- m (layer 5) <- u (layer 2); m <- w (layer 1); a branch
    x (layer 3) -> y (layer 4) whose y has no kept path to the logits."""
    where = ((9, "IO"), (5, "S2"), (2, "S1"), (1, "S1"), (3, "IO"), (4, "IO"))
    s, m, u, w, x, y = (node_name(L, 0, "END", r) for L, r in where)
    edges = pd.DataFrame(
        [
            (s, ROOT, "logits", 1.0, 40),
            (m, s, "src", 0.5, 40),
            (u, m, "dest", 0.3, 35),
            (w, m, "src", 0.3, 10),  # rare: never measured
            (x, y, "src", 0.3, 50),
            (y, s, "dest", 0.2, 50),  # weak: y is cut off, so x -> y is never measured
        ],
        columns=["up", "down", "side", "weight", "n_prompts"],
    )
    effects = {(m, s, "src"): -0.5, (u, m, "dest"): 0.2, (x, y, "src"): -1.0,
               (y, s, "dest"): -0.05, (w, m, "src"): -3.0}  # fmt: skip
    layer_of = {ROOT: -1, **{n: parse_node(n)["layer"] for n in (s, m, u, w, x, y)}}
    return edges, effects, layer_of


def test_prune_top_down_measures_only_what_can_matter_and_equals_pruning_everything():
    edges, effects, layer_of = _hand_graph()
    measured: list[tuple[str, str, str]] = []

    def measure(layer, wanted):
        keys = list(wanted.itertuples(index=False, name=None))
        assert all(layer_of[d] == layer for _, d, _ in keys)
        measured.extend(keys)
        index = pd.MultiIndex.from_tuples(keys, names=["up", "down", "side"])
        mean = [effects[k] for k in keys]
        return pd.DataFrame({"mean": mean, "std": 0.0, "size": 30}, index=index)

    out = prune_top_down(edges, layer_of, measure, min_prompts=30, threshold=0.1)
    status = dict(zip(zip(out.up, out.down, out.side), out.status))
    s, m, u, w, x, y = out.up.tolist()
    assert status == {
        (s, ROOT, "logits"): "root",
        (m, s, "src"): "kept",
        (u, m, "dest"): "kept",
        (w, m, "src"): "rare",
        (x, y, "src"): "unreached",
        (y, s, "dest"): "weak",
    }
    assert set(measured) == {(m, s, "src"), (u, m, "dest"), (y, s, "dest")}
    # pruning after measuring every edge gives the same circuit
    keep = {k for k, e in effects.items() if abs(e) >= 0.1} | {(s, ROOT, "logits")}
    keep -= {k for k in keep if edges.set_index(["up", "down", "side"]).n_prompts[k] < 30}
    alive, changed = {ROOT}, True
    while changed:
        new = {a for a, b, _ in keep if b in alive} - alive
        alive |= new
        changed = bool(new)
    reference = {k for k in keep if k[1] in alive}
    assert reference == {k for k, v in status.items() if v in ("kept", "root")}


def test_circuit_marks_ranks_and_loads_back_equal(tmp_path):
    edges, effects, layer_of = _hand_graph()
    nodes = pd.DataFrame([{"node": n, "n_prompts": 40, **parse_node(n)} for n in layer_of])

    def measure(layer, wanted):
        keys = list(wanted.itertuples(index=False, name=None))
        index = pd.MultiIndex.from_tuples(keys, names=["up", "down", "side"])
        return pd.DataFrame({"mean": [effects[k] for k in keys], "std": 0.1, "size": 30},
                            index=index)  # fmt: skip

    measured = prune_top_down(edges, layer_of, measure, 30, 0.1)
    dla = [[0.0, 0.0] for _ in range(10)]
    dla[9][0], dla[7][1], dla[6][0] = 1.0, -0.3, 0.1  # 7.1 and 6.0: outside the circuit
    params = {"n_layers": 10, "n_heads": 2, "n_prompt_graphs": 40, "min_prompts": 30,
              "threshold": 0.1, "model": "hand", "head_dla": dla}  # fmt: skip
    circuit = Circuit.from_edges(nodes, measured, params)
    assert circuit.head_set() == {(9, 0), (5, 0), (2, 0)}
    heads = circuit.heads()
    assert len(heads) == 20 and heads["rank"].tolist() == list(range(1, 21))
    # score: direct attribution + measured out-edges' -effect x share of prompt graphs
    score = heads.set_index("head").score
    assert score["9.0"] == pytest.approx(1.0)  # a seed, no measured out-edge
    assert score["5.0"] == pytest.approx(0.5 * 40 / 40)
    assert score["2.0"] == pytest.approx(-0.2 * 35 / 40)
    assert score["4.0"] == pytest.approx(0.05 * 50 / 40)  # its weak edge counts too
    # the circuit first, each order within it; then the rest
    assert circuit.ranking()[:6] == [(9, 0), (5, 0), (2, 0), (7, 1), (6, 0), (4, 0)]
    assert circuit.ranking(signed=True)[:5] == [(9, 0), (5, 0), (2, 0), (6, 0), (4, 0)]
    assert circuit.ranking(signed=True)[-1] == (7, 1)  # the most opposing head last
    paths = circuit.save(tmp_path)
    assert {p.name for p in paths.values()} == {
        "circuit.json", "circuit.graphml", "circuit_heads.csv", "circuit.png", "circuit.html"
    }  # fmt: skip
    again = Circuit.load(tmp_path)
    pd.testing.assert_frame_equal(again.nodes, circuit.nodes)
    pd.testing.assert_frame_equal(again.edges, circuit.edges)
    assert again.params == circuit.params
    assert "all of its nodes are shown" in paths["circuit.html"].read_text()
    import networkx as nx

    g = nx.read_graphml(paths["circuit.graphml"])
    assert set(g.nodes) == set(circuit.circuit_nodes.node)


def test_prompt_edges_name_upstream_nodes_by_role_and_main_source():
    firings = pd.DataFrame(
        {"firing_id": [7], "layer": [3], "head": [1], "dest_role": ["END"], "src_role": ["IO"]}
    )
    records = pd.DataFrame(
        {"firing_id": [7, 7, 7], "prompt_id": [0, 0, 0], "side": ["src", "dest", "dest"],
         "pos": [1, 4, 3], "up_layer": [1, 2, 0], "up_head": [0, 1, 1], "weight": [1.0, 2.0, 3.0]}
    )  # fmt: skip
    main = np.zeros((1, 4, 2, 5), dtype=np.int64)
    main[0, 1, 0, 1] = 0  # head 1.0 attends from IO (1) to start (0)
    main[0, 2, 1, 4] = 1  # head 2.1 attends from END (4) to IO (1)
    roles = [["start", "IO", "", "", "END"]]
    out = prompt_edges(firings, records, main, roles)
    assert out.up.tolist() == ["A1.0:IO>start", "A2.1:END>IO"]  # position 3 has no role
    assert out.down.tolist() == ["A3.1:END>IO"] * 2
    seeds = pd.DataFrame(
        {"prompt_id": [0, 0, 0], "kind": ["head", "mlp", "bias"], "layer": [3, 2, 1],
         "head": [1, -1, -1], "src": [1, -1, -1], "attribution": [2.0, 1.0, 0.5],
         "total": [3.5] * 3}
    )  # fmt: skip
    se = seed_edges(seeds, roles)
    assert se.up.tolist() == ["A3.1:END>IO", "M2:END"] and (se.down == ROOT).all()


@pytest.mark.parametrize("side", [0, 1])
def test_the_local_edit_changes_only_the_downstream_heads_query_or_key(tiny_llama, side):
    """Grouped-query model: the edit reaches head D's key (or query) only; D's scores equal
    those computed from the edited normalised input; every other activation up to the
    layer, and every other head of it, is unchanged."""
    model = tiny_llama
    ds = make_ioi_dataset(model, 3, seed=4)
    L, D, pos = 2, 1, int(ds.io_pos[0])
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(1, model.cfg.d_model, generator=gen)
    edits = LocalEdits(L, torch.tensor([0]), torch.tensor([D]), torch.tensor([side]),
                       torch.tensor([pos]), delta)  # fmt: skip
    _, clean = model.run_with_cache(ds.tokens)
    with ungrouped(model), model.hooks(fwd_hooks=edits.hooks(model)):
        _, edited = model.run_with_cache(ds.tokens)
    assert not model.cfg.ungroup_grouped_query_attention  # restored
    for name in clean:
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
        else:  # the embeddings come before every block, ln_final after
            layer = -1 if name.startswith("hook_") else model.cfg.n_layers
        if layer < L or (layer == L and ("hook_resid_pre" in name or "ln1" in name)):
            before, after = clean[name], edited[name]
            if before.shape != after.shape:  # keys and values of a group, ungrouped
                before = before.repeat_interleave(after.shape[2] // before.shape[2], dim=2)
            assert torch.allclose(before, after, atol=1e-6), name
    for name in ("attn.hook_attn_scores", "attn.hook_pattern"):
        a, b = clean[f"blocks.{L}.{name}"], edited[f"blocks.{L}.{name}"]
        others = [h for h in range(model.cfg.n_heads) if h != D]
        assert torch.allclose(a[:, others], b[:, others], atol=1e-6), name
        assert torch.equal(a[1:], b[1:])  # the other prompts
        assert not torch.allclose(a[0, D], b[0, D])
    # D's scores are those of its input edited at pos, where only the edited side reads it:
    # the whole layer fed the edited input (its query and key at pos), read at head D only
    twin = copy.deepcopy(model)

    def edit_input(x, hook):
        del hook
        x = x.clone()
        x[0, pos] -= delta[0]
        return x

    with twin.hooks(fwd_hooks=[(f"blocks.{L}.ln1.hook_normalized", edit_input)]):
        _, by_input = twin.run_with_cache(ds.tokens[:1])
    want = by_input[f"blocks.{L}.attn.hook_attn_scores"][0, D]
    got = edited[f"blocks.{L}.attn.hook_attn_scores"][0, D]
    before = clean[f"blocks.{L}.attn.hook_attn_scores"][0, D]
    if side == 0:  # the key at pos: column pos of every later destination
        assert torch.allclose(got[pos + 1 :], want[pos + 1 :], atol=1e-5)
        assert torch.equal(got[:, :pos], before[:, :pos])
    else:  # the query at pos: row pos, before the diagonal (where the key would change too)
        assert torch.allclose(got[pos, :pos], want[pos, :pos], atol=1e-5)
        others = [d for d in range(got.shape[0]) if d != pos]
        assert torch.equal(got[others], before[others])
    assert not torch.allclose(got, before)


def test_zero_local_edits_reproduce_the_clean_logit_difference(tiny_gpt2):
    model = tiny_gpt2
    ds = make_ioi_dataset(model, 5, seed=6)
    L = 1
    _, cache = model.run_with_cache(ds.tokens)
    n = len(ds)
    edits = LocalEdits(L, torch.arange(n), torch.zeros(n, dtype=torch.long),
                       torch.zeros(n, dtype=torch.long), ds.s1_pos,
                       torch.zeros(n, model.cfg.d_model))  # fmt: skip
    got = run_local_edits(model, cache[f"blocks.{L}.hook_resid_pre"], edits, ds.end_pos,
                          ds.io_tokens, ds.s_tokens)  # fmt: skip
    logits = model(ds.tokens)
    rows = torch.arange(n)
    want = logits[rows, ds.end_pos, ds.io_tokens] - logits[rows, ds.end_pos, ds.s_tokens]
    assert torch.allclose(got, want, atol=1e-4)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(
        logit_diff_from_resid(model, final, ds.end_pos, ds.io_tokens, ds.s_tokens), want, atol=1e-4
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("node_frac", 1.5), ("min_prompts", 0), ("threshold", -0.1), ("rows_per_pass", 2.5),
     ("batch_size", True)],
)  # fmt: skip
def test_circuit_config_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        CircuitConfig(**{field: value})


def test_extract_circuit_needs_per_prompt_seeds(tiny_gpt2):
    from tl_superposition.circuit import extract_circuit
    from tl_superposition.tracing import trace_ioi

    ds = make_ioi_dataset(tiny_gpt2, 4, seed=0)
    res = trace_ioi(tiny_gpt2, ds, seeds="dla", progress=False)
    with pytest.raises(ValueError, match="per-prompt seeds"):
        extract_circuit(tiny_gpt2, res)


def tiny_traced_circuit(model):
    """12 IOI prompts traced on a tiny model (every prompt seeded: a random model answers
    none correctly) and a circuit that keeps every measurable edge: (dataset, trace, circuit)."""
    from tl_superposition.circuit import extract_circuit
    from tl_superposition.tracing import TraceConfig, trace_ioi

    ds = make_ioi_dataset(model, 12, seed=7)
    res = trace_ioi(model, ds, config=TraceConfig(pattern_thresh=0.2), correct_only=False,
                    progress=False)  # fmt: skip
    cfg = CircuitConfig(min_prompts=1, threshold=0.0, node_frac=0.0, rows_per_pass=5)
    return ds, res, extract_circuit(model, res, cfg, progress=False)


def test_extract_circuit_end_to_end_on_a_tiny_model(tiny_llama, tmp_path):
    """Every prompt seeded (a random model answers none correctly), every edge measurable:
    kept edges were measured in every prompt where they occur, each circuit node reaches the
    logits, and one edge's effect in one prompt is that of its local edits run alone."""
    import networkx as nx

    from tl_superposition.circuit.extract import _records, clean_run, edit_deltas
    from tl_superposition.circuit.graphs import role_labels
    from tl_superposition.tracing.ioi_trace import ioi_roles
    from tl_superposition.tracing.validate import InstanceBatch, edit_vectors

    model = tiny_llama
    ds, res, circuit = tiny_traced_circuit(model)
    e = circuit.edges
    kept = e[e.status == "kept"]
    assert len(kept) > 0 and (kept.n_measured == kept.n_prompts).all()
    g = circuit.graph()
    assert all(nx.has_path(g, n, ROOT) for n in g.nodes)
    assert circuit.summary()["n_heads_circuit"] == len(circuit.head_set()) > 0
    # the deltas: the validation's projection of the same records, over the frozen scale
    roles = role_labels(ioi_roles(ds, model.tokenizer), len(ds), ds.tokens.shape[1])
    clean = clean_run(model, ds)
    rec = _records(res, clean, roles)
    first = kept[kept.n_prompts == 1].iloc[0]  # its mean effect is its one prompt's
    mine = rec[(rec.up == first.up) & (rec.down == first.down) & (rec.side == first.side)]
    delta = edit_deltas(model, res.qk, clean, mine.reset_index(drop=True), chunk=3)
    _, cache = model.run_with_cache(ds.tokens)
    z = torch.stack([cache[f"blocks.{L}.attn.hook_z"] for L in range(model.cfg.n_layers)], 2)
    it = InstanceBatch.from_frame(mine.reset_index(drop=True), 0, model.cfg.d_head)
    _, p_sel, _, _ = edit_vectors(model, res.qk, z, it, torch.Generator().manual_seed(0))
    scale = clean.scale[it.prompt, it.pos, it.layer].double()[:, None]
    assert torch.allclose(delta * scale, p_sel, atol=1e-4)
    # one prompt's effect, run alone
    p = int(mine.prompt_id.iloc[0])
    sel = (mine.prompt_id == p).to_numpy()
    L = int(parse_node(first.down)["layer"])
    edits = LocalEdits(
        L,
        row=torch.zeros(int(sel.sum()), dtype=torch.long),
        head=torch.tensor(mine["head"].to_numpy()[sel]),
        side=torch.as_tensor((mine.side.to_numpy()[sel] == "dest").astype(np.int64)),
        pos=torch.tensor(mine.pos.to_numpy()[sel]),
        delta=delta[torch.tensor(sel)],
    )
    alone = run_local_edits(model, clean.resid_pre[[p], :, L], edits, ds.end_pos[[p]],
                            ds.io_tokens[[p]], ds.s_tokens[[p]])  # fmt: skip
    assert float(alone[0] - clean.logit_diff[p]) == pytest.approx(first.effect_mean, abs=1e-5)
    paths = circuit.save(tmp_path)
    assert (tmp_path / "circuit_heads.csv").exists() and len(paths) == 5
