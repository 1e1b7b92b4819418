"""load_model on local Hugging Face folders and the offline error for hub names."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tl_superposition import load_model
from tl_superposition.models import hub_reachable


def _save(hf_model, tokenizer, path):
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _centred(logits):
    return logits - logits.mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def hf_models(gpt2_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=gpt2_tokenizer.vocab_size
        )
    ).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            vocab_size=gpt2_tokenizer.vocab_size,
        )
    ).eval()
    root = tmp_path_factory.mktemp("hf")
    return {
        "gpt2": (gpt2, _save(gpt2, gpt2_tokenizer, root / "tiny-gpt2")),
        "llama": (llama, _save(llama, gpt2_tokenizer, root / "tiny-llama")),
    }


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
        "circuit.png",
        "components.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
