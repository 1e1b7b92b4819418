"""QK transcoders on tiny GPT-2- and Llama-shaped models (fast tests)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import data_path
from sae_lens import SAE

import tl_superposition
from tl_superposition.qk import (
    AttentionShape,
    MemorySource,
    ModelSource,
    QKTrainConfig,
    QKTranscoder,
    QKTranscoderConfig,
    attribute_score,
    evaluate_qk,
    pack_text,
    train_qk,
)
from tl_superposition.qk.attention import (
    attention_scores,
    kl_rows,
    layer_attention,
    log_pattern,
    rotate,
    scores_from_rotated,
)
from tl_superposition.qk.dictionaries import TopKTranscoder
from tl_superposition.qk.loss import sparsity_penalty
from tl_superposition.qk.pairs import (
    PairMaskConfig,
    bilinear_map,
    head_pair_terms,
    pair_statistics,
    train_pair_mask,
)

LAYER = 1


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def corpus() -> str:
    return str(data_path("shakespeare"))


def new_qkt(model, d_hidden=48, sparsity="sqrt", seed=0, **kw) -> QKTranscoder:
    gen = torch.Generator().manual_seed(seed)
    return QKTranscoder.for_model(
        model, LAYER, d_hidden=d_hidden, sparsity=sparsity, generator=gen, **kw
    )


def exact_qkt_at(model, layer: int) -> QKTranscoder:
    """Dictionaries that are exact maps: f = ReLU([x, -x]), decoder [W; -W], b_dec = b."""
    d = model.cfg.d_model
    qkt = QKTranscoder.for_model(model, layer, d_hidden=2 * d)
    attn = layer_attention(model, layer)
    eye = torch.eye(d)
    with torch.no_grad():
        for sae, w, b in (
            (qkt.q_dict, attn.W_Q, attn.b_Q),
            (qkt.k_dict, getattr(attn, "_W_K", attn.W_K), getattr(attn, "_b_K", attn.b_K)),
        ):
            w_flat = w.permute(1, 0, 2).reshape(d, -1)  # [d_model, heads * d_head]
            sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
            sae.b_enc.zero_()
            sae.W_dec.copy_(torch.cat([w_flat, -w_flat], dim=0))
            sae.b_dec.copy_(b.reshape(-1))
    return qkt


def exact_qkt(model) -> QKTranscoder:
    return exact_qkt_at(model, LAYER)


def qkt_shape(model) -> AttentionShape:
    return AttentionShape.from_model(model, LAYER)


def tokens_of(model, n=8, ctx=32):
    return pack_text(model, corpus(), context_size=ctx, split="valid", max_contexts=n)


# ------------------------------------------------------------------ module


def test_shapes_and_hooks(model):
    qkt = new_qkt(model)
    s = qkt.shape
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    assert (s.d_model, s.n_heads, s.n_key_value_heads, s.d_head) == (64, 4, n_kv, 16)
    assert qkt.q_dict.cfg.d_out == 4 * 16 and qkt.k_dict.cfg.d_out == n_kv * 16
    _, cache = model.run_with_cache(tokens_of(model, 2))
    x = cache[f"blocks.{LAYER}.ln1.hook_normalized"]
    out, qcache = qkt.run_with_cache(x)
    assert out.q.shape == cache[f"blocks.{LAYER}.attn.hook_q"].shape
    assert out.k.shape == cache[f"blocks.{LAYER}.attn.hook_k"].shape
    assert qcache["hook_q_features"].shape == (2, 32, 48)
    assert qcache["hook_k_recon"].shape == out.k.shape
    assert torch.equal(qcache["hook_q_recon"], out.q)


def test_topk_dictionary_keeps_k_features(tiny_llama):
    qkt = new_qkt(tiny_llama, sparsity="topk", top_k=5)
    assert isinstance(qkt.q_dict, TopKTranscoder)
    out = qkt(torch.randn(3, 7, 64))
    assert ((out.q_features > 0).sum(-1) <= 5).all()
    assert ((out.k_features > 0).sum(-1) == 5).float().mean() > 0.9


@pytest.mark.parametrize("sparsity", ["sqrt", "topk"])
def test_save_load_round_trip_and_sae_lens_loads(tiny_llama, tmp_path, sparsity):
    qkt = new_qkt(tiny_llama, sparsity=sparsity, seed=3)
    with torch.no_grad():
        qkt.q_dict.b_enc.normal_()
    qkt.save(tmp_path / "qk")
    back = QKTranscoder.load(tmp_path / "qk")
    assert back.equal(qkt) and back.cfg == qkt.cfg
    for name, sae in (("q", qkt.q_dict), ("k", qkt.k_dict)):
        loaded = SAE.load_from_disk(str(tmp_path / "qk" / name))
        assert type(loaded) is type(sae)
        for key, value in sae.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
        cfg = json.loads((tmp_path / "qk" / name / "cfg.json").read_text())
        assert cfg["d_in"] == 64 and cfg["metadata"]["hook_name"] == "blocks.1.ln1.hook_normalized"
    # saving again over the folder replaces it whole
    with torch.no_grad():
        qkt.k_dict.W_dec.mul_(2)
    qkt.save(tmp_path / "qk")
    assert QKTranscoder.load(tmp_path / "qk").equal(qkt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qk"]
    (tmp_path / "qk" / "notes.txt").write_text("kept")
    qkt.save(tmp_path / "qk")
    assert (tmp_path / "qk" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "qk").iterdir()) == [
        "k",
        "notes.txt",
        "q",
        "qk_transcoder.json",
    ]


def test_refuses_other_attention_shape(tiny_gpt2, tiny_llama, tmp_path):
    qkt = new_qkt(tiny_gpt2)
    with pytest.raises(ValueError, match="n_key_value_heads: transcoder 4, model 2"):
        qkt.check_model(tiny_llama)
    with pytest.raises(ValueError, match="another attention shape"), qkt.splice(tiny_llama):
        pass
    far = QKTranscoder(QKTranscoderConfig(shape=AttentionShape(7, 64, 4, 4, 16), d_hidden_q=8))
    with pytest.raises(ValueError, match="layer 7"):
        far.check_model(tiny_gpt2)
    with pytest.raises(FileNotFoundError, match="not a QK transcoder folder"):
        QKTranscoder.load(tmp_path)


def test_config_checks():
    shape = AttentionShape(0, 64, 4, 2, 16)
    with pytest.raises(ValueError, match="sparsity must be one of"):
        QKTranscoderConfig(shape=shape, sparsity="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        QKTranscoderConfig(shape=shape, sparsity="topk", top_k=0)
    with pytest.raises(ValueError, match="cannot share"):
        AttentionShape(0, 64, 4, 3, 16)
    with pytest.raises(ValueError, match="lr must be > 0"):
        QKTrainConfig(lr=0)
    with pytest.raises(ValueError, match="warmup_frac"):
        QKTrainConfig(warmup_frac=0.9, decay_frac=0.5)
    cfg = QKTrainConfig(lr=3e-4)
    assert QKTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------ patterns and splicing


def test_exact_dictionaries_reproduce_the_model(model):
    tokens = tokens_of(model, 4)
    qkt = exact_qkt(model)
    clean, cache = model.run_with_cache(tokens)
    out = qkt(cache[f"blocks.{LAYER}.ln1.hook_normalized"])
    torch.testing.assert_close(out.q, cache[f"blocks.{LAYER}.attn.hook_q"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.k, cache[f"blocks.{LAYER}.attn.hook_k"], atol=1e-5, rtol=0)
    for which, heads in (("both", None), ("q", None), ("k", None), ("both", [1, 2])):
        with qkt.splice(model, which, heads=heads):
            spliced = model(tokens)
        torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
    # and a random dictionary does change the output, until the context exits
    with new_qkt(model).splice(model):
        assert (model(tokens) - clean).abs().max() > 1e-2
    torch.testing.assert_close(model(tokens), clean, atol=0, rtol=0)


def test_head_restricted_splice_changes_only_those_heads(tiny_llama):
    tokens = tokens_of(tiny_llama, 2)
    qkt = new_qkt(tiny_llama)
    name = f"blocks.{LAYER}.attn.hook_pattern"
    _, clean = tiny_llama.run_with_cache(tokens, names_filter=name)
    with qkt.splice(tiny_llama, "k", heads=[0]):
        _, spliced = tiny_llama.run_with_cache(tokens, names_filter=name)
    diff = (spliced[name] - clean[name]).abs().amax((0, 2, 3))
    assert diff[0] > 1e-3 and torch.all(diff[1:] == 0)  # head 1 shares head 0's keys


def test_patterns_equal_the_model_and_mask_future_with_minus_inf(model):
    tokens = tokens_of(model, 2)
    _, cache = model.run_with_cache(tokens)
    attn = layer_attention(model, LAYER)
    q, k = cache[f"blocks.{LAYER}.attn.hook_q"], cache[f"blocks.{LAYER}.attn.hook_k"]
    scores = attention_scores(attn, q, k)
    torch.testing.assert_close(scores, cache[f"blocks.{LAYER}.attn.hook_attn_scores"])
    future = torch.ones(32, 32, dtype=torch.bool).triu(1)
    assert torch.isneginf(scores[..., future]).all()
    # huge reconstructed keys in the future still get exactly zero probability
    k_big = k.clone()
    k_big[:, 16:] *= 1e4
    pattern = log_pattern(attention_scores(attn, q, k_big)).exp()
    assert torch.all(pattern[..., future] == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    logp = log_pattern(scores)
    kl = kl_rows(logp, log_pattern(attention_scores(attn, q, k_big)))
    assert torch.isfinite(kl).all() and (kl >= -1e-6).all()
    assert torch.all(kl_rows(logp, logp).abs() < 1e-6)


def test_evaluation_of_exact_dictionaries(model):
    ev = evaluate_qk(
        exact_qkt(model), model, tokens_of(model, 6), heads=[2], batch_contexts=4, progress=False
    )
    tc = ev.metrics.loc["transcoder"]
    assert tc[["kl_full", "kl_q", "kl_k", "kl_full_heads"]].abs().max() < 1e-5
    assert abs(tc.loss_delta) < 1e-4 and abs(tc.loss_delta_heads) < 1e-4
    assert tc.l0_q_median > 0 and 0 <= tc.dead_q <= 1
    base = ev.metrics.loc[["mean_qk", "uniform"], "kl_full"]
    assert (base > 1e-3).all()
    if model.cfg.positional_embedding_type == "standard":  # constant q, k: uniform pattern
        assert base["mean_qk"] == pytest.approx(base["uniform"], abs=1e-5)
    assert ev.summary["n_tokens"] == 6 * 32
    quick = evaluate_qk(  # without the spliced losses: the same patterns, L0 and dead features
        exact_qkt(model), model, tokens_of(model, 6), heads=[2], batch_contexts=4, losses=False,
        progress=False,
    )  # fmt: skip
    same = [c for c in ev.metrics.columns if not c.startswith("loss")]
    pd.testing.assert_frame_equal(quick.metrics[same], ev.metrics[same])
    assert quick.metrics.loss_delta.isna().all()


def test_sparsity_penalties():
    f = torch.tensor([[0.0, 4.0, 1.0]])
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])  # row norms 5, 2, 1
    assert sparsity_penalty(f, w, "l1").item() == pytest.approx(8 + 1)
    eps = 1e-6
    expect = (8 + eps) ** 0.5 + (1 + eps) ** 0.5 - 2 * eps**0.5
    assert sparsity_penalty(f, w, "sqrt", eps).item() == pytest.approx(expect, rel=1e-6)
    assert sparsity_penalty(f, w, "topk").item() == 0


# ------------------------------------------------------------------ attribution and pairs


def test_attribution_sums_to_the_model_score(model):
    tokens = tokens_of(model, 1)[0]
    qkt = new_qkt(model, seed=5)
    name = f"blocks.{LAYER}.attn.hook_attn_scores"
    _, clean = model.run_with_cache(tokens[None], names_filter=name)
    with qkt.splice(model):
        _, spliced = model.run_with_cache(tokens[None], names_filter=name)
    for head, dest, src in ((0, 20, 3), (3, 31, 31), (2, 5, 0)):
        a = attribute_score(qkt, model, tokens, head, dest, src)
        assert a.score == pytest.approx(float(clean[name][0, head, dest, src]), abs=0)
        assert a.terms["value"].sum() == pytest.approx(a.score, abs=1e-5)
        assert a.reconstructed == pytest.approx(float(spliced[name][0, head, dest, src]), abs=1e-4)
        kinds = set(a.terms["kind"])
        assert {"pair", "error", "bias x bias"} <= kinds
        pairs = a.terms[a.terms.kind == "pair"]
        assert (pairs.q_act > 0).all() and (pairs.k_act > 0).all()
    with pytest.raises(ValueError, match="causal"):
        attribute_score(qkt, model, tokens, 0, 3, 5)


def test_pair_terms_rebuild_the_reconstructed_scores(model):
    qkt = new_qkt(model, d_hidden=24, sparsity="topk", top_k=6)
    src = ModelSource(model, corpus(), qkt.shape, context_size=16, split="valid")
    batch = next(src.batches(2, 0))
    with torch.no_grad():
        out = qkt(batch.x)
        pt = head_pair_terms(qkt, model, batch, out, head=1, max_active=6)
    attn = layer_attention(model, LAYER)
    recon = scores_from_rotated(attn, rotate(attn, out.q), rotate(attn, out.k))[:, 1]
    torch.testing.assert_close(pt.terms.sum((2, 4)) + pt.rest, recon)
    # the bilinear map at offset t gives the pair terms of a destination and a source t earlier
    m0 = bilinear_map(qkt, model, 1, offset=0)
    p = 7
    fq, fk = out.q_features[0, p], out.k_features[0, p]
    assert float(fq @ m0 @ fk) == pytest.approx(float(pt.terms[0, p, :, p, :].sum()), abs=1e-4)
    m3 = bilinear_map(qkt, model, 1, offset=3)
    fk3 = out.k_features[0, p - 3]
    assert float(fq @ m3 @ fk3) == pytest.approx(float(pt.terms[0, p, :, p - 3].sum()), abs=1e-4)


def test_pair_mask_training_and_statistics(tiny_llama):
    qkt = new_qkt(tiny_llama, d_hidden=64, sparsity="topk", top_k=4)
    src = ModelSource(tiny_llama, corpus(), qkt.shape, context_size=16, split="valid")
    cfg = PairMaskConfig(steps=12, batch_contexts=2, max_active=4, mu=1e-3, lr=0.1)
    res = train_pair_mask(qkt, tiny_llama, src, [0, 3], cfg, progress=False)
    m = res.mask.mask.detach()
    assert m.min() >= 0 and m.max() <= 1
    unseen = res.seen[0] == 0
    assert unseen.any() and (m[0][unseen] < 0.5).all()  # only the penalty pulled on them
    first = res.history[res.history.step == 0]
    assert (first.kl - first.kl_unmasked).abs().max() < 1e-5  # mask 1 = reconstruction
    assert set(res.pairs["head"]) <= {0, 3} and (res.pairs["mask"] >= 0.5).all()
    assert (res.pairs["n_co_active"] > 0).all()
    stats = pair_statistics(qkt, tiny_llama, src, [3], n_contexts=4, max_active=4, progress=False)
    st = stats[3]
    assert st.n_places == 4 * 16 * 17 // 2
    # every causal place has exactly 4 x 4 co-active pairs (TopK, no zero activations)
    assert int(st.count.sum()) == 16 * st.n_places
    assert (st.total_abs >= st.total.abs() - 1e-9).all()


# ------------------------------------------------------------------ training


def short_config(**kw) -> QKTrainConfig:
    base = dict(
        max_tokens=32 * 8 * 60,
        batch_contexts=8,
        lr=3e-3,
        sparsity_coeff=1e-3,
        log_every_steps=5,
        checkpoint_every_steps=7,
        dead_window_tokens=512,
        resample_every_tokens=2048,
        resample_until_frac=0.8,
    )
    return QKTrainConfig(**{**base, **kw})


def test_short_training_beats_both_baselines(model, tmp_path):
    qkt = new_qkt(model, d_hidden=96)
    src = MemorySource(model, tokens_of(model, 96), qkt.shape)
    res = train_qk(qkt, model, src, short_config(), tmp_path / "run", progress=False)
    assert res.finished and res.steps == 60
    first, last = res.history.iloc[0], res.history.iloc[-1]
    assert last.kl_full < 0.5 * first.kl_full
    held_out = pack_text(model, corpus(), context_size=32, split="test", max_contexts=16)
    ev = evaluate_qk(
        QKTranscoder.load(tmp_path / "run"), model, held_out, heads=[1], progress=False
    )
    kl = ev.metrics["kl_full"]
    assert kl["transcoder"] < kl["mean_qk"] and kl["transcoder"] < kl["uniform"]
    assert ev.metrics.loc["transcoder", "l0_q_median"] > 0
    assert (tmp_path / "run" / "history.csv").is_file()


def with_dead_features(qkt: QKTranscoder, n: int = 8) -> QKTranscoder:
    """Zero the encoder columns of the first ``n`` features: they can never fire."""
    with torch.no_grad():
        qkt.q_dict.W_enc[:, :n] = 0
        qkt.k_dict.W_enc[:, :n] = 0
    return qkt


def test_dead_features_are_resampled(tiny_llama):
    src = MemorySource(tiny_llama, tokens_of(tiny_llama, 40), qkt_shape(tiny_llama))
    cfg = short_config(max_tokens=32 * 8 * 12, dead_window_tokens=256, resample_every_tokens=512)
    res = train_qk(with_dead_features(new_qkt(tiny_llama)), tiny_llama, src, cfg, progress=False)
    first = res.history.iloc[0]
    assert first.resampled_q >= 8 and first.resampled_k >= 8
    out = res.transcoder(src.data[1].x)
    assert (out.q_features[..., :8] > 0).any() and (out.k_features[..., :8] > 0).any()


def test_resume_gives_identical_weights(tiny_llama, tmp_path):
    src = MemorySource(tiny_llama, tokens_of(tiny_llama, 40), qkt_shape(tiny_llama))
    cfg = short_config(max_tokens=32 * 8 * 24, dead_window_tokens=256)

    def fresh(seed=0):
        return with_dead_features(new_qkt(tiny_llama, seed=seed))

    whole = train_qk(fresh(), tiny_llama, src, cfg, tmp_path / "a", progress=False)
    assert whole.history[["resampled_q", "resampled_k"]].to_numpy().sum() > 0
    part = train_qk(
        fresh(), tiny_llama, src, cfg, tmp_path / "b", stop_after_steps=10, progress=False
    )
    assert not part.finished and part.steps == 10
    # a checkpoint in the layout before the shared format resumes as well
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (saved["format"], saved["kind"]) == ("tl_superposition.checkpoint/1", "qk")
    legacy = {"format": "tl_superposition.qk.checkpoint/1", **saved["identity"], **saved["state"]}
    torch.save(legacy, tmp_path / "b" / "checkpoint.pt")
    # a new process builds a differently initialised transcoder: the checkpoint wins
    rest = train_qk(fresh(seed=9), tiny_llama, src, cfg, tmp_path / "b", progress=False)
    assert rest.finished and rest.steps == 24
    assert rest.transcoder.equal(whole.transcoder)
    assert rest.history.equals(whole.history)
    with pytest.raises(ValueError, match="another training config"):
        train_qk(fresh(), tiny_llama, src, short_config(lr=1e-2), tmp_path / "b")


def test_cli_train_and_eval(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from tl_superposition.cli import main

    monkeypatch.setattr(tl_superposition, "load_model", lambda *a, **k: tiny_gpt2)
    out = tmp_path / "qk"
    common = ["--model", "tiny", "--context-size", "32", "--split", "valid", "--no-progress"]
    rc = main(
        [
            "train-qk",
            *common,
            "--layer",
            "1",
            "--source",
            corpus(),
            "--acts",
            str(tmp_path / "acts"),
            "--out",
            str(out),
            "--d-hidden",
            "32",
            "--max-tokens",
            "2560",
            "--batch-contexts",
            "8",
            "--sparsity",
            "topk",
            "--top-k",
            "4",
        ]
    )
    assert rc == 0 and "finished: 10 steps" in capsys.readouterr().out
    assert QKTranscoder.load(out).cfg.sparsity == "topk"
    rc = main(
        [
            "eval-qk",
            *common,
            "--transcoder",
            str(out),
            "--source",
            corpus(),
            "--max-contexts",
            "8",
            "--heads",
            "0,2",
            "--ioi-prompts",
            "6",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "kl_full" in text and (tmp_path / "ev" / "metrics.csv").is_file()
    ioi = json.loads((tmp_path / "ev" / "summary.json").read_text())["ioi"]
    assert {"error_frac_ioi", "attn_end_io_true", "attn_end_io_spliced"} <= set(ioi)
    assert (tmp_path / "ev" / "ioi_heads.csv").read_text().startswith("layer,head,n_firings")
    rc = main(["train-qk", *common, "--layer", "7", "--source", corpus(), "--out", str(out)])
    assert rc == 2 and "layer 7 does not exist" in capsys.readouterr().err
