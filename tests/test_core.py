"""The shared core: hook names, rotary embedding, splicing and the epoch order."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tl_superposition.activations.mix import ContextMix
from tl_superposition.core.batches import epoch_generator, epoch_order
from tl_superposition.core.checkpoint import load_checkpoint, save_checkpoint
from tl_superposition.core.hooks import block_hook, layer_hooks
from tl_superposition.core.rotary import rope_tables, rotate
from tl_superposition.core.splicing import replacement_hooks, spliced
from tl_superposition.core.training import Trainer
from tl_superposition.gated.train import GatedTrainConfig
from tl_superposition.qk.config import QKTrainConfig


def test_hook_names_are_the_models_own(tiny_gpt2):
    names = set(tiny_gpt2.hook_dict)
    for rel in ("attn.hook_pattern", "ln1.hook_normalized", "hook_attn_out", "attn.hook_z"):
        assert set(layer_hooks(range(tiny_gpt2.cfg.n_layers), rel)) <= names
    with pytest.raises(ValueError, match="already full"):
        block_hook(1, "blocks.1.attn.hook_q")
    with pytest.raises(ValueError, match="negative"):
        block_hook(-1, "attn.hook_q")


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_is_bit_identical_to_transformer_lens(tiny_llama, adjacent, rotary_dim):
    attn = copy.deepcopy(tiny_llama.blocks[0].attn)
    attn.cfg = copy.copy(attn.cfg)
    attn.cfg.rotary_adjacent_pairs, attn.cfg.rotary_dim = adjacent, rotary_dim
    cos, sin = rope_tables(32, rotary_dim, 10000.0, adjacent)
    attn.rotary_cos, attn.rotary_sin = cos, sin
    x = torch.randn(2, 10, 4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(x, cos, sin, adjacent), attn.apply_rotary(x))


def test_rope_tables_match_the_models_to_float_rounding(tiny_llama):
    attn = tiny_llama.blocks[0].attn
    cos, sin = rope_tables(64, tiny_llama.cfg.rotary_dim, tiny_llama.cfg.rotary_base, False)
    torch.testing.assert_close(cos, attn.rotary_cos[:64].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, attn.rotary_sin[:64].float(), atol=1e-5, rtol=0)


def test_a_spliced_identity_reproduces_the_model_and_a_zero_output_changes_it(tiny_gpt2):
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    clean = tiny_gpt2(tokens)
    same = replacement_hooks(1, "ln1.hook_normalized", {"hook_attn_out": lambda x, v: v})
    with spliced(tiny_gpt2, same):
        assert torch.equal(tiny_gpt2(tokens), clean)
    stash: dict[str, torch.Tensor] = {}
    zero = replacement_hooks(1, "ln1.hook_normalized", {"hook_attn_out": lambda x, v: 0 * x},
                             stash=stash, pop=True)  # fmt: skip
    with spliced(tiny_gpt2, zero):
        assert not torch.allclose(tiny_gpt2(tokens), clean)
    assert not stash  # popped after its last reader
    assert not tiny_gpt2.blocks[1].hook_attn_out.fwd_hooks  # removed on exit


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=2)
    assert torch.equal(a, epoch_order(50, seed=3, epoch=2)) and sorted(a.tolist()) == list(
        range(50)
    )
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=2))
    assert torch.equal(epoch_order(5, 3, 2, shuffle=False), torch.arange(5))
    g = epoch_generator(3, 2, offset=7)
    assert torch.equal(torch.randperm(50, generator=g), epoch_order(50, seed=3, epoch=9))


def _toy_run(trainer_steps: int, resume_from: dict | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    seen = []
    trainer = Trainer(
        opt, 6, lr_at=lambda s: 0.05 * (s + 1) / 6, clip=(model.parameters(), 0.5),
        after_step=[lambda t, out: seen.append(t.step)],
    )  # fmt: skip
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        trainer.load_state_dict(resume_from)
    x = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(1))
    while trainer.step < trainer_steps:
        out = trainer.run_step(lambda s: (model(x[s]) ** 2).mean())
        trainer.log({"step": trainer.step, "loss": out.item()})
    return model, trainer, seen


def test_a_resumed_trainer_reaches_the_uninterrupted_weights(tmp_path):
    whole, t_whole, seen = _toy_run(6)
    assert seen == [1, 2, 3, 4, 5, 6] and t_whole.finished
    assert t_whole.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    half, t_half, _ = _toy_run(3)
    save_checkpoint(tmp_path / "c.pt", "toy", {"run": "a"},
                    {**t_half.state_dict(), "model": half.state_dict()})  # fmt: skip
    identity, state = load_checkpoint(tmp_path / "c.pt", "toy")
    assert identity == {"run": "a"}
    resumed, t_resumed, _ = _toy_run(6, resume_from=state)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert t_resumed.history == t_whole.history


def test_checkpoints_hold_plain_values_and_name_their_kind(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['x'\]\[0\] is a float64"):
        save_checkpoint(tmp_path / "c.pt", "toy", {}, {"x": [np.float64(1.0)]})
    assert not list(tmp_path.iterdir())  # nothing written
    save_checkpoint(tmp_path / "c.pt", "toy", {}, {"w": torch.ones(2)})
    first = (tmp_path / "c.pt").read_bytes()
    save_checkpoint(tmp_path / "c.pt", "toy", {}, {"w": torch.ones(2)})
    assert (tmp_path / "c.pt").read_bytes() == first  # bytes depend on the contents only
    with pytest.raises(ValueError, match="a toy run, not of qk"):
        load_checkpoint(tmp_path / "c.pt", "qk")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a qk checkpoint"):
        load_checkpoint(tmp_path / "other.pt", "qk", legacy=lambda raw: None)


@pytest.mark.parametrize(
    "cfg",
    [QKTrainConfig(adam_betas=(0.8, 0.9)), GatedTrainConfig(alpha=0.2), ContextMix(0.5, True)],
    ids=lambda c: type(c).__name__,
)
def test_configs_round_trip_through_json_and_refuse_unknown_fields(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert type(cfg).from_dict(d) == type(cfg).from_dict(cfg.to_dict())
    assert type(cfg).from_dict(d).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=f"unknown {type(cfg).__name__} fields"):
        type(cfg).from_dict({**d, "no_such_field": 1})


def test_a_config_reads_fields_under_their_former_names():
    old = {"alpha": 0.2, "log_every": 5, "checkpoint_every": 7}  # as gated runs wrote them
    cfg = GatedTrainConfig.from_dict(old)
    assert (cfg.log_every_steps, cfg.checkpoint_every_steps) == (5, 7)
    assert "log_every" not in cfg.to_dict() and cfg.to_dict()["log_every_steps"] == 5
