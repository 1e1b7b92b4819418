"""load_model on local Hugging Face folders and the offline error for hub names."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from tl_superposition import load_model
from tl_superposition.models import (
    hub_reachable,
    model_config,
    model_source,
    random_model,
)


def _centred(logits):
    return logits - logits.mean(-1, keepdim=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_folder_matches_transformers(hf_models, gpt2_tokenizer, arch):
    hf_model, path = hf_models[arch]
    model = load_model(path)
    tokens = torch.tensor(
        [gpt2_tokenizer.encode("When Mary and John went to the store, John gave")]
    )
    with torch.no_grad():
        want = _centred(hf_model(tokens).logits)
        got = _centred(model(tokens))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # the standard processing was applied
    assert model.cfg.normalization_type in ("LNPre", "RMSPre")
    assert torch.allclose(model.W_U.mean(-1), torch.zeros(()), atol=1e-5)
    if arch == "llama":
        assert model.cfg.n_key_value_heads == 2 and model.cfg.positional_embedding_type == "rotary"
    # the cheap config (no weights) is the loaded model's
    cfg = model_config(path)
    for key in ("n_layers", "n_heads", "d_model", "d_head", "n_key_value_heads", "d_vocab"):
        assert getattr(cfg, key) == getattr(model.cfg, key), key


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_hub_name_offline_names_the_offline_options(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # an empty Hugging Face cache, so that a cached gpt2 on this machine cannot answer
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    with pytest.raises(RuntimeError) as err:
        load_model("gpt2")
    assert "smollm2-135m" in str(err.value) and "local" in str(err.value)


def test_unknown_name_suggests_close_names_before_any_network(monkeypatch, no_model_loading):
    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr("tl_superposition.models.hub_reachable", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    for call in (load_model, model_config, model_source):
        with pytest.raises(ValueError) as err:
            call("gtp2")
        message = str(err.value)
        assert "'gpt2'" in message and "smollm2-135m" in message and len(message) < 600
    with pytest.raises(ValueError, match="'smollm2-135m'"):
        model_source("smolm2-135m")
    with pytest.raises(ValueError, match="No known name is close"):
        model_source("zzzzqqqq")
    assert model_source("GPT2") == ("hub", "GPT2")  # TransformerLens names are case-blind
    assert model_source("SmolLM2-135M") == ("smollm2", "SmolLM2-135M")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        model_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_config(tmp_path)


def test_random_model_depends_on_its_seed_only():
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_ctx=8,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=50,
        act_fn="relu",
        normalization_type="LN",
    )
    state = torch.random.get_rng_state()
    a = random_model(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    torch.manual_seed(1234)  # a different global state changes nothing
    b, c = random_model(cfg, seed=3), random_model(cfg, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.W_Q, c.W_Q)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m", dtype="float8")


def test_trace_ioi_cli_on_a_local_folder(hf_models, tmp_path):
    """The main job end to end on a tiny random GPT-2 saved as a Hugging Face folder."""
    from tl_superposition.cli import main

    _, path = hf_models["gpt2"]
    out = tmp_path / "run"
    assert (
        main(
            [
                "trace-ioi",
                "--model",
                str(path),
                "--n-prompts",
                "6",
                "--seed",
                "1",
                "--pattern-thresh",
                "0.2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    for name in (
        "prompts.csv",
        "firings.parquet",
        "edges.csv",
        "graph.graphml",
        "summary.json",
        "seeds.csv",
        "signal_graph.png",
        "components.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_trace_ioi_cli_checks_seeds_against_the_folder_config(
    hf_models, tmp_path, capsys, no_model_loading
):
    """Seed heads are checked against config.json, before any weights are read."""
    from tl_superposition.cli import main

    _, path = hf_models["gpt2"]  # 2 layers x 4 heads
    for extra, message in (
        (["--seeds", "2.0"], "head 2.0 out of range: the model has 2 layers"),
        (["--seeds", "1.0,0.4"], "head 0.4 out of range"),
        (["--seeds", "name-movers"], "2 layers x 4 heads"),
        (["--seeds", "dla", "--n-seeds", "9"], "between 1 and the number of heads (8)"),
        (["--seeds", "dla"], "the circuit needs per-prompt seeds; pass --seeds per-prompt"),
    ):
        out = tmp_path / "run"
        assert main(["trace-ioi", "--model", str(path), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
