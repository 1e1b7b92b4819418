"""GatedAttentionBlock: forward, hooks, save/load, splicing, training, the solely-encoded check."""

from __future__ import annotations

import json

import pytest
import torch

from tl_superposition.core.rotary import rope_tables
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.gated.config import GatedAttentionConfig
from tl_superposition.gated.cross_layer import CrossLayerGatedBlocks, cross_layer_source
from tl_superposition.gated.evaluate import evaluate_splice
from tl_superposition.gated.gates import active_head_histogram, summarize_histogram
from tl_superposition.gated.sources import (
    LazyTensorBatches,
    ModelBatches,
    StoreBatches,
    TensorBatches,
    layer_activations,
)
from tl_superposition.gated.splice import splice
from tl_superposition.gated.train import (
    GatedTrainConfig,
    block_objective,
    gate_penalty,
    gated_loss,
    train_gated_block,
)
from tl_superposition.toys.check import solely_encoded
from tl_superposition.toys.datasets import skip_trigram_dataset
from tl_superposition.toys.gates import gate_map
from tl_superposition.toys.models import (
    make_toy_model,
    monosemantic_skip_trigram_model,
    superposed_skip_trigram_model,
)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_gpt2, tiny_llama):
    return tiny_gpt2 if request.param == "gpt2" else tiny_llama


def _tokens(n=3, pos=24, seed=0):
    return torch.randint(0, 50000, (n, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("expansion", [1, 2])
def test_copied_block_equals_the_layer(model, expansion):
    """Gates fixed at 1 and the layer's weights copied: the block is the attention layer."""
    layer = 1
    block = GatedAttentionBlock.from_layer(model, layer, expansion, init="copy")
    assert block.cfg.n_heads == expansion * model.cfg.n_heads
    _, cache = model.run_with_cache(
        _tokens(),
        names_filter=[f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.hook_attn_out"],
    )
    with torch.no_grad():
        out, gate = block.forward_with_gate(cache[f"blocks.{layer}.ln1.hook_normalized"])
    assert torch.allclose(gate, torch.ones_like(gate))
    torch.testing.assert_close(out, cache[f"blocks.{layer}.hook_attn_out"], atol=2e-5, rtol=1e-4)


def test_splice_of_exact_copies_reproduces_the_logits(model):
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        blocks = {lay: GatedAttentionBlock.from_layer(model, lay, 1, init="copy") for lay in (0, 2)}
        with splice(model, blocks):
            spliced = model(tokens)
        after = model(tokens)
    torch.testing.assert_close(spliced, base, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, base)  # the hooks are gone afterwards
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_splice_changes_the_output_with_a_different_block(tiny_gpt2):
    tokens = _tokens()
    block = GatedAttentionBlock.from_layer(tiny_gpt2, 1, 2, init="xavier")
    with torch.no_grad(), splice(tiny_gpt2, {1: block}):
        spliced = tiny_gpt2(tokens)
    assert not torch.allclose(spliced, tiny_gpt2(tokens), atol=1e-3)


def test_toy_copy_matches_the_toy_layer():
    model = superposed_skip_trigram_model()
    ds = skip_trigram_dataset(3, 200, seed=0)
    block = GatedAttentionBlock.from_layer(model, 0, 2, init="copy")
    assert block.cfg.input_hook == "hook_resid_pre"
    with torch.no_grad(), splice(model, {0: block}):
        spliced = model(ds.tokens)
    torch.testing.assert_close(spliced, model(ds.tokens), atol=1e-5, rtol=1e-5)


def test_hook_points_and_shapes(tiny_llama):
    block = GatedAttentionBlock.from_layer(tiny_llama, 0, 2, seed=3)
    cfg = block.cfg
    assert cfg.positional == "rotary" and cfg.n_key_value_heads == 4 and cfg.normalize_ov
    x = torch.randn(2, 9, cfg.d_model)
    _, cache = block.run_with_cache(x)
    h, kv, dh, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
    shapes = {
        "hook_q": (2, 9, h, dh),
        "hook_k": (2, 9, kv, dh),
        "hook_v": (2, 9, kv, dh),
        "hook_rot_q": (2, 9, h, dh),
        "hook_rot_k": (2, 9, kv, dh),
        "hook_gate_q": (2, 9, h),
        "hook_gate": (2, h, 9, 9),
        "hook_pattern": (2, h, 9, 9),
        "hook_gated_pattern": (2, h, 9, 9),
        "hook_z": (2, 9, h, dh),
        "hook_result": (2, 9, h, d),
        "hook_out": (2, 9, d),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    g = cache["hook_gate"]
    assert float(g.min()) >= 0 and float(g.max()) <= 1
    torch.testing.assert_close(cache["hook_gated_pattern"], g * cache["hook_pattern"])
    torch.testing.assert_close(cache["hook_result"].sum(2), cache["hook_out"])
    assert torch.all(cache["hook_pattern"].triu(1) == 0)  # causal


def test_ov_weights_are_normalised_in_the_forward():
    cfg = GatedAttentionConfig(d_model=6, n_heads=3, d_head=2)
    block = GatedAttentionBlock(cfg)
    with torch.no_grad():
        block.W_V.mul_(7.0)
        block.W_O.mul_(0.1)
    torch.testing.assert_close(block.normalized_W_V().norm(dim=1), torch.ones(3, 2))
    torch.testing.assert_close(block.normalized_W_O().norm(dim=2), torch.ones(3, 2))
    scaled = GatedAttentionBlock(cfg)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        ref = scaled(x)
        scaled.W_V.mul_(3.0)
        scaled.W_O.mul_(5.0)
        torch.testing.assert_close(scaled(x), ref)  # the norms of W_V and W_O do not matter


def test_rotary_tables_match_transformer_lens(tiny_llama):
    attn = tiny_llama.blocks[0].attn
    n = 16
    cos, sin = rope_tables(n, tiny_llama.cfg.rotary_dim, tiny_llama.cfg.rotary_base, False)
    torch.testing.assert_close(cos, attn.rotary_cos[:n].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, attn.rotary_sin[:n].float(), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_refusals(tmp_path, tiny_llama, tiny_gpt2):
    block = GatedAttentionBlock.from_layer(tiny_llama, 2, 2, init="duplicate", seed=5)
    folder = block.save(tmp_path / "blk")
    back = GatedAttentionBlock.load(folder, model=tiny_llama)
    assert back.cfg == block.cfg
    for k, v in block.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(2, 7, block.cfg.d_model)
    with torch.no_grad():
        assert torch.equal(block(x), back(x))
    assert json.loads((folder / "cfg.json").read_text())["layer"] == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    # a model of another shape is refused, naming the difference
    other = GatedAttentionBlock.from_layer(tiny_gpt2, 0, 3)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="another model shape"):
        GatedAttentionBlock.load(tmp_path / "other", model=tiny_llama)
    with pytest.raises(ValueError, match="another model shape"), splice(tiny_llama, {0: other}):
        pass
    with pytest.raises(ValueError, match="does not fit"):
        block.load_weights(other.state_dict())
    with pytest.raises(FileNotFoundError, match="not a saved GatedAttentionBlock"):
        GatedAttentionBlock.load(tmp_path)


def test_config_checks():
    with pytest.raises(ValueError, match="n_key_value_heads"):
        GatedAttentionConfig(d_model=8, n_heads=6, d_head=2, n_key_value_heads=4)
    with pytest.raises(ValueError, match="positional"):
        GatedAttentionConfig(d_model=8, n_heads=2, d_head=2, positional="alibi")
    with pytest.raises(ValueError, match="unknown"):
        GatedAttentionConfig.from_dict({"d_model": 8, "n_heads": 2, "d_head": 2, "nope": 1})


def test_xavier_bias_init_draws_the_biases_and_round_trips(tmp_path):
    model, _ = _toy_block_source()
    zeros = GatedAttentionBlock.from_layer(model, 0, 4, seed=3, qkv_bias=True)
    drawn = GatedAttentionBlock.from_layer(model, 0, 4, seed=3, qkv_bias=True, bias_init="xavier")
    assert zeros.cfg.bias_init == "zeros" and drawn.cfg.bias_init == "xavier"
    assert all(not getattr(zeros, b).any() for b in ("b_Q", "b_K", "b_V"))
    # the same weights, then the biases drawn: Xavier-normal, std sqrt(2 / (n_heads + d_head))
    for w in ("W_Q", "W_K", "W_V", "W_O"):
        assert torch.equal(getattr(zeros, w), getattr(drawn, w)), w
    biases = torch.cat([getattr(drawn, b).flatten() for b in ("b_Q", "b_K", "b_V")])
    std = (2 / (drawn.cfg.n_heads + drawn.cfg.d_head)) ** 0.5
    assert biases.abs().min() > 0 and 0.5 * std < biases.std() < 1.5 * std
    back = GatedAttentionBlock.load(drawn.save(tmp_path / "blk"), model=model)
    assert back.cfg == drawn.cfg
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in drawn.state_dict().items())
    with pytest.raises(ValueError, match="bias_init must be one of"):
        GatedAttentionConfig(d_model=8, n_heads=2, d_head=2, bias_init="ones")


def test_gate_penalty_values():
    gate = torch.zeros(1, 3, 2, 2)
    gate[0, 0, 1, 0] = 1.0  # one head on one pair
    gate[0, :2, 1, 1] = 0.5  # two half-open heads on another
    expected_pair = (2 * 0.5**0.6) ** (1 / 0.6)
    torch.testing.assert_close(gate_penalty(gate), torch.tensor((1.0 + expected_pair) / 4))
    torch.testing.assert_close(
        gate_penalty(gate, pairs="causal"), torch.tensor((1.0 + expected_pair) / 3)
    )
    # two heads on one pair cost more than one head with the same total gate
    one = torch.zeros(1, 2, 1, 1)
    one[0, 0] = 1.0
    assert gate_penalty(torch.full((1, 2, 1, 1), 0.5)) > gate_penalty(one)
    # a list of gates gets the sum of separate penalties; concatenation penalises jointly
    split = gate_penalty([one, one])
    joint = gate_penalty(torch.cat([one, one], dim=1))
    assert joint > split - 1e-6 and torch.isclose(split, torch.tensor(2.0))


def _toy_block_source():
    ds = skip_trigram_dataset(3, 400, seed=0)
    model = make_toy_model(2, ds.d_vocab, seed=0)  # random weights: a modest target
    x, y = layer_activations(model, ds.tokens, 0, "hook_resid_pre")
    return model, TensorBatches(x, y, 100)


def test_training_lowers_the_loss():
    model, source = _toy_block_source()
    block = GatedAttentionBlock.from_layer(model, 0, 2, seed=0)
    result = train_gated_block(
        block,
        source,
        GatedTrainConfig(alpha=0.1, lr=1e-2, epochs=15, log_every_steps=4),
        progress=False,
    )
    h = result.history
    assert result.steps == 60 and h["loss"].iloc[-1] < 0.6 * h["loss"].iloc[0]
    assert h["mse"].iloc[-1] < h["mse"].iloc[0] and h["penalty"].iloc[-1] < h["penalty"].iloc[0]


def test_block_objective_is_the_training_loss_over_all_rows():
    model, source = _toy_block_source()
    block = GatedAttentionBlock.from_layer(model, 0, 2, seed=0)
    cfg = GatedTrainConfig(alpha=0.3)
    got = block_objective(block, source.x, source.y, cfg, batch_size=150)  # 400 rows: 150+150+100
    with torch.no_grad():
        out, gate = block.forward_with_gate(source.x)
        loss, mse, penalty = gated_loss(out, source.y, gate, cfg)
    assert got["mse"] == pytest.approx(mse.item(), rel=1e-5)
    assert got["penalty"] == pytest.approx(penalty.item(), rel=1e-5)
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert block.training  # left as it was
    with pytest.raises(ValueError, match="must match"):
        block_objective(block, source.x, source.y[:5], cfg)


def test_alpha_warmup_rises_linearly_and_starts_without_penalty():
    cfg = GatedTrainConfig(alpha=0.4, alpha_warmup_steps=8)
    assert [cfg.alpha_at(s) for s in (0, 2, 4, 8, 100)] == [0.0, 0.1, 0.2, 0.4, 0.4]
    assert GatedTrainConfig(alpha=0.4).alpha_at(0) == 0.4
    with pytest.raises(ValueError, match="alpha_warmup_steps must be >= 0"):
        GatedTrainConfig(alpha_warmup_steps=-1)
    model, source = _toy_block_source()
    block = GatedAttentionBlock.from_layer(model, 0, 2, seed=0)
    cfg = GatedTrainConfig(alpha=0.4, alpha_warmup_steps=8, lr=1e-2, max_steps=3, log_every_steps=1)
    h = train_gated_block(block, source, cfg, progress=False).history
    assert h["penalty"].iloc[0] > 0 and h["loss"].iloc[0] == h["mse"].iloc[0]
    assert h["loss"].iloc[2] == pytest.approx(h["mse"].iloc[2] + 0.1 * h["penalty"].iloc[2])


@pytest.mark.parametrize("warmup", [0, 10])
def test_resume_is_exact(tmp_path, warmup):
    model, source = _toy_block_source()
    cfg = GatedTrainConfig(
        alpha=0.3,
        lr=1e-2,
        epochs=4,
        log_every_steps=2,
        checkpoint_every_steps=3,
        alpha_warmup_steps=warmup,
    )
    straight = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    train_gated_block(straight, source, cfg, tmp_path / "a", progress=False)
    resumed = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    first = GatedTrainConfig(**{**cfg.__dict__, "max_steps": 7})
    train_gated_block(resumed, source, first, tmp_path / "b", progress=False)
    fresh = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)  # a new process would start here
    result = train_gated_block(fresh, source, cfg, tmp_path / "b", progress=False)
    assert result.resumed_from == 7 and result.steps == 16
    for k, v in straight.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # a checkpoint of another run is refused
    with pytest.raises(ValueError, match="another run"):
        train_gated_block(
            fresh, source, GatedTrainConfig(alpha=0.9, epochs=5), tmp_path / "b", progress=False
        )
    # so is one whose blocks started from other biases
    drawn = GatedAttentionBlock.from_layer(model, 0, 2, seed=1, bias_init="xavier")
    assert drawn.cfg.to_dict() == {**fresh.cfg.to_dict(), "bias_init": "xavier"}
    with pytest.raises(ValueError, match="block config"):
        train_gated_block(drawn, source, cfg, tmp_path / "b", progress=False)


def test_checkpoint_written_before_bias_init_and_the_shared_format_resumes(tmp_path):
    model, source = _toy_block_source()
    cfg = GatedTrainConfig(
        alpha=0.3, lr=1e-2, epochs=2, log_every_steps=2, checkpoint_every_steps=2
    )
    block = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    first = GatedTrainConfig(**{**cfg.__dict__, "max_steps": 4})
    train_gated_block(block, source, first, tmp_path, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["format"] == "tl_superposition.checkpoint/1" and saved["kind"] == "gated"
    legacy = {**saved["identity"], **saved["state"]}  # the layout before the shared format
    del legacy["block_config"]["bias_init"]  # as older versions wrote it
    torch.save(legacy, tmp_path / "checkpoint.pt")
    fresh = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    result = train_gated_block(fresh, source, cfg, tmp_path, progress=False)
    assert result.resumed_from == 4 and result.steps == 8


def test_lazy_pairs_are_not_made_when_a_finished_run_resumes(tmp_path):
    model, source = _toy_block_source()
    calls = []

    def make():
        calls.append(1)
        return source.x, source.y

    lazy = LazyTensorBatches(make, tuple(source.x.shape), source.batch_size)
    assert lazy.describe() == source.describe() and lazy.n_batches == source.n_batches
    cfg = GatedTrainConfig(alpha=0.3, lr=1e-2, epochs=2)
    done = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    train_gated_block(done, lazy, cfg, tmp_path, progress=False)
    assert len(calls) == 1 and all(
        torch.equal(a, b) for a, b in zip(lazy.batch(1, 0), source.batch(1, 0))
    )
    again = GatedAttentionBlock.from_layer(model, 0, 2, seed=1)
    lazy2 = LazyTensorBatches(make, tuple(source.x.shape), source.batch_size)
    result = train_gated_block(again, lazy2, cfg, tmp_path, progress=False)
    assert len(calls) == 1 and result.resumed_from == result.steps  # nothing recomputed
    assert all(torch.equal(v, done.state_dict()[k]) for k, v in again.state_dict().items())
    wrong = LazyTensorBatches(make, (1, 2, 3), 4)
    with pytest.raises(ValueError, match="expected"):
        wrong.batch(0, 0)


def test_solely_encoded_check_fails_with_superposition_and_passes_without():
    ds = skip_trigram_dataset(3, 5000, seed=1)
    sup = solely_encoded(superposed_skip_trigram_model(), ds)
    assert not sup.removed
    assert sup.table["status"].tolist() == ["solely encoded", "distributed", "solely encoded"]
    mono = solely_encoded(monosemantic_skip_trigram_model(), ds)
    assert mono.removed and mono.distinct
    assert mono.table["head"].tolist() == ["0.0", "0.1", "0.2"]
    # the same models as exact copies inside gated blocks give the same verdicts
    for model, want in (
        (superposed_skip_trigram_model(), False),
        (monosemantic_skip_trigram_model(), True),
    ):
        block = GatedAttentionBlock.from_layer(model, 0, 1, init="copy")
        assert solely_encoded(model, ds, {0: block}).removed is want


def test_gate_map_of_a_hand_built_gated_block():
    """Gates open only at (B_t, A) for head t: the gate map is the identity."""
    model = monosemantic_skip_trigram_model()
    ds = skip_trigram_dataset(3, 2000, seed=0)
    block = GatedAttentionBlock.from_layer(model, 0, 1, init="copy")
    with torch.no_grad():
        block.W_gate_Q.zero_()
        block.W_gate_K.zero_()
        block.b_gate_Q.zero_()
        block.b_gate_K.zero_()
        for t, b in enumerate((1, 2, 3)):
            block.W_gate_Q[t, b] = 1.0
            block.W_gate_K[t, 0] = 1.0
    gmap = gate_map(model, {0: block}, ds)
    torch.testing.assert_close(torch.tensor(gmap.to_numpy()), torch.eye(3))
    assert solely_encoded(model, ds, {0: block}).removed


def test_active_head_histogram():
    p = torch.zeros(1, 3, 2, 2)
    p[0, :, 0, 0] = 1.0  # three heads on (0, 0)
    p[0, 0, 1, 1] = 0.6  # one head on (1, 1); (1, 0) has none
    hist = active_head_histogram(p, 0.5)
    assert hist.tolist() == [1, 1, 0, 1]
    stats = summarize_histogram(hist)
    assert stats["active_pairs"] == 2 and stats["share_multi"] == 0.5 and stats["max_heads"] == 3
    assert active_head_histogram(p, 0.5, skip_first_key=True).tolist() == [0, 1, 0, 0]


def test_cross_layer_blocks_train_together():
    ds = skip_trigram_dataset(3, 300, seed=0)
    model = make_toy_model(1, ds.d_vocab, n_layers=2, seed=0)
    blocks = {lay: GatedAttentionBlock.from_layer(model, lay, 2, seed=lay) for lay in (0, 1)}
    unit = CrossLayerGatedBlocks(model, blocks, penalty="joint")
    out, gate = unit.forward_with_gate(ds.tokens[:5])
    assert out.shape == (5, 11, ds.d_vocab) and isinstance(gate, torch.Tensor)
    assert gate.shape[1] == 4  # both blocks' heads in one penalty
    assert not any(p is q for p in unit.parameters() for q in model.parameters())
    with torch.no_grad(), splice(model, blocks):
        _, cache = model.run_with_cache(ds.tokens[:5])
    torch.testing.assert_close(
        out, cache["blocks.0.hook_attn_out"] + cache["blocks.1.hook_attn_out"]
    )
    before = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    source = cross_layer_source(model, ds.tokens, [0, 1], 100)
    train_gated_block(unit, source, GatedTrainConfig(epochs=1, lr=1e-2), progress=False)
    assert any(not torch.equal(before[k], v) for k, v in blocks[0].state_dict().items())
    per_layer = CrossLayerGatedBlocks(model, blocks, penalty="per_layer")
    assert isinstance(per_layer.forward_with_gate(ds.tokens[:2])[1], list)


def test_model_and_store_sources_agree(tiny_gpt2):
    tokens = _tokens(6, 16)
    src = ModelBatches(tiny_gpt2, 1, tokens, batch_size=4, seed=0)
    x, y = src.batch(0, 0)
    assert x.shape == (4, 16, 64) and src.n_batches == 2
    assert torch.equal(src.batch(0, 0)[0], x) and not torch.equal(src.batch(1, 0)[0], x)
    full_x, full_y = layer_activations(tiny_gpt2, tokens, 1, "ln1.hook_normalized")

    class FakeStore:  # the ActivationStore interface StoreBatches reads
        path = "fake"
        hooks = ["blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"]
        n_contexts = 6

        def get_contexts(self, idx, hooks, tokens=False):
            return {hooks[0]: full_x[idx], hooks[1]: full_y[idx]}

    store = StoreBatches(FakeStore(), 1, batch_size=4, seed=0)
    sx, sy = store.batch(0, 0)
    torch.testing.assert_close(sx, x)
    torch.testing.assert_close(sy, y)
    with pytest.raises(KeyError, match="hook_attn_out"):
        StoreBatches(FakeStore(), 2, batch_size=4)


def test_evaluate_splice_of_a_copy(tiny_gpt2):
    block = GatedAttentionBlock.from_layer(tiny_gpt2, 1, 1, init="copy")
    bos = tiny_gpt2.tokenizer.bos_token_id
    tokens = torch.cat([torch.full((4, 1), bos), _tokens(4, 15)], dim=1)
    report = evaluate_splice(tiny_gpt2, block, tokens, threshold=0.2, progress=False)
    assert report["fve"] > 0.9999 and abs(report["loss_change"]) < 1e-4
    assert report["before"] == report["after"]


def test_check_without_the_residual_reads_only_the_heads():
    """The reading of cmathw/gated-attn's script: argmax of the kept heads' outputs alone."""
    from tl_superposition.toys.analysis import subset_ablation

    ds = skip_trigram_dataset(3, 3000, seed=1)
    model = superposed_skip_trigram_model()
    heads_only = subset_ablation(model, ds, include_residual=False)
    with_resid = subset_ablation(model, ds)
    none_kept = heads_only.mask_index([])
    # with no head kept the residual alone predicts the B token (wrong); the heads alone
    # predict token 0 (logits all zero), also wrong
    assert not with_resid.correct[none_kept].any() and not heads_only.correct[none_kept].any()
    report = solely_encoded(model, ds, ablation=heads_only)
    assert report.table["status"].tolist() == ["solely encoded", "distributed", "solely encoded"]
