"""Context mixes: with and without BOS, random offsets, short contexts (fast tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import data_path

from tl_superposition.activations.mix import ContextMix, mix_contexts
from tl_superposition.activations.sources import pack_contexts
from tl_superposition.qk import AttentionShape, ModelSource

BOS, SEP = 0, 1


def documents(n_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, 500, size=rng.integers(5, 60))) for _ in range(n_docs)]


def test_the_default_mix_is_packing():
    docs = documents()
    packed = list(pack_contexts(docs, 16, BOS, SEP))
    mixed = list(mix_contexts(docs, 16, BOS, SEP, ContextMix()))
    assert len(mixed) == len(packed) > 100
    assert all(np.array_equal(a, b) for a, b in zip(mixed, packed))
    assert ContextMix().is_packing and not ContextMix(bos_frac=0.5).is_packing


def test_bos_and_short_shares_hold_and_are_fixed_by_the_seed():
    docs = documents(2000)
    mix = ContextMix(bos_frac=0.3, random_offset=True, short_frac=0.25, short_size=6, seed=4)
    contexts = list(mix_contexts(docs, 16, BOS, SEP, mix))
    n = len(contexts)
    assert n > 1000
    with_bos = np.mean([c[0] == BOS for c in contexts])
    short = np.mean([len(c) == 6 for c in contexts])
    assert abs(with_bos - 0.3) < 0.05 and abs(short - 0.25) < 0.05
    assert {len(c) for c in contexts} == {6, 16}
    assert all(BOS not in c[1:] and c[c != BOS][0] != SEP for c in contexts if len(c[c != BOS]))
    again = list(mix_contexts(docs, 16, BOS, SEP, mix))
    assert all(np.array_equal(a, b) for a, b in zip(again, contexts)) and len(again) == n
    other = list(mix_contexts(docs, 16, BOS, SEP, ContextMix(**{**mix.to_dict(), "seed": 5})))
    assert not all(np.array_equal(a, b) for a, b in zip(other, contexts))


def test_random_offsets_cut_the_stream_elsewhere():
    docs = documents()
    stream = list(pack_contexts(docs, 1, None, None))
    flat = np.concatenate(stream)  # every text token in order, no separators
    mixed = list(mix_contexts(docs, 16, None, None, ContextMix(random_offset=True, seed=1)))
    starts = []
    for c in mixed[:40]:  # each context is a window of the token stream
        hits = [i for i in range(len(flat) - 15) if np.array_equal(flat[i : i + 16], c)]
        assert hits
        starts.append(hits[0])
    gaps = np.diff(starts)
    assert (gaps >= 16).all() and len(set(gaps.tolist())) > 5  # not packed back to back


def test_mix_round_trips_and_checks_its_fields():
    mix = ContextMix(bos_frac=0.5, random_offset=True, short_frac=0.2, short_size=8, seed=3)
    assert ContextMix.from_dict(mix.to_dict()) == mix
    with pytest.raises(ValueError, match="bos_frac must be in"):
        ContextMix(bos_frac=1.5)
    with pytest.raises(ValueError, match="short_size must be >= 2"):
        ContextMix(short_size=1)
    with pytest.raises(ValueError, match="unknown ContextMix fields"):
        ContextMix.from_dict({"bos": 1})
    with pytest.raises(ValueError, match="must be below context_size"):
        next(mix_contexts(documents(), 8, BOS, SEP, mix))


def test_model_source_batches_one_length_and_resumes_equal(tiny_llama):
    shape = AttentionShape.from_model(tiny_llama, 1)
    mix = ContextMix(bos_frac=0.5, random_offset=True, short_frac=0.3, short_size=8, seed=2)
    src = ModelSource(
        tiny_llama, str(data_path("shakespeare")), shape, context_size=24, split="valid",
        max_contexts=60, mix=mix,
    )  # fmt: skip
    batches = list(src.batches(4, epoch=0))
    assert {b.tokens.shape[1] for b in batches} == {8, 24}
    assert all(b.x.shape[:2] == b.tokens.shape for b in batches)
    resumed = list(src.batches(4, epoch=0, start=3))
    assert len(resumed) == len(batches) - 3
    assert all((a.tokens == b.tokens).all() for a, b in zip(resumed, batches[3:]))
    assert src.description()["mix"] == mix.to_dict()
    with pytest.raises(ValueError, match="must be below context_size"):
        ModelSource(tiny_llama, str(data_path("shakespeare")), shape, context_size=8, mix=mix)


def test_train_qk_streams_a_mix_and_saves_it_with_the_dictionary(
    tiny_gpt2, tmp_path, monkeypatch, capsys
):
    import json

    from sae_lens import SAE

    import tl_superposition
    from tl_superposition.cli import main
    from tl_superposition.qk import QKTranscoder

    loads = []
    monkeypatch.setattr(
        tl_superposition, "load_model", lambda *a, **k: loads.append(1) or tiny_gpt2
    )
    out = tmp_path / "qk"
    base = ["train-qk", "--model", "tiny", "--context-size", "32", "--split", "valid",
            "--layer", "1", "--source", str(data_path("shakespeare")), "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(out), "--bos-frac", "1.5"]) == 2
    assert "--bos-frac must be in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--short-frac", "0.2", "--short-size", "32"]) == 2
    assert "--short-size 32 must be below --context-size 32" in capsys.readouterr().err
    args = [*base, "--out", str(out), "--acts", str(tmp_path / "a"), "--short-frac", "0.2"]
    assert main(args) == 2 and "drop --acts" in capsys.readouterr().err
    assert not loads  # every refusal came before the model
    mix = ["--bos-frac", "0.5", "--random-offset", "--short-frac", "0.25", "--short-size", "8"]
    train = ["--d-hidden", "32", "--max-tokens", "1024", "--batch-contexts", "4", "--seed", "3"]
    assert main([*base, "--out", str(out), *mix, *train]) == 0
    saved = json.loads((out / "train_config.json").read_text())["source"]["mix"]
    assert saved == ContextMix(0.5, True, 0.25, 8, seed=3).to_dict()
    qkt = QKTranscoder.load(out)
    assert qkt.shape.layer == 1
    SAE.load_from_disk(str(out / "q"))


def test_collector_stores_a_mix_and_resumes_it_equal(tiny_llama, tmp_path, monkeypatch):
    from tl_superposition.activations import ActivationStore, CollectConfig, collect
    from tl_superposition.activations import collector as collector_mod

    bos = tiny_llama.tokenizer.bos_token_id  # type: ignore[union-attr]
    mix = ContextMix(bos_frac=0.4, random_offset=True, seed=7)
    kwargs = dict(hooks="ln1.hook_normalized", layers=[0, 2], context_size=16, split="valid",
                  max_tokens=16 * 40, shard_tokens=16 * 8, prepend_bos=True,
                  progress=False)  # fmt: skip
    source = str(data_path("shakespeare"))
    collect(tiny_llama, CollectConfig(tmp_path / "full", mix=mix.to_dict(), **kwargs), source)
    full = ActivationStore(tmp_path / "full")
    tokens = full.get_contexts(range(len(full)))["tokens"]
    starts_with_bos = (tokens[:, 0] == bos).float().mean().item()
    assert 0.2 < starts_with_bos < 0.6  # about bos_frac, not every context
    assert full.manifest["settings"]["mix"] == mix.to_dict()
    assert set(full.hooks) == {"blocks.0.ln1.hook_normalized", "blocks.2.ln1.hook_normalized"}
    packing = packing_of(tiny_llama, source, mix)
    expected = np.stack([c for _, c in zip(range(40), packing.contexts())])
    assert np.array_equal(tokens.numpy(), expected)  # the streamed source's contexts
    real_save, calls = collector_mod._save_shard, []

    def crashing_save(path, tensors):
        calls.append(path)
        if len(calls) == 3:  # die before the third shard
            raise KeyboardInterrupt
        return real_save(path, tensors)

    monkeypatch.setattr(collector_mod, "_save_shard", crashing_save)
    config = CollectConfig(tmp_path / "part", mix=mix, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny_llama, config, source)
    monkeypatch.setattr(collector_mod, "_save_shard", real_save)
    assert collect(tiny_llama, config, source).resumed_from_contexts == 16
    resumed = ActivationStore(tmp_path / "part").get_contexts(range(40))
    for name, value in full.get_contexts(range(40)).items():
        assert torch.equal(resumed[name], value), name
    with pytest.raises(ValueError, match="short_frac must be 0 for a collection"):
        CollectConfig(tmp_path / "s", mix=ContextMix(short_frac=0.2), **kwargs)


def packing_of(model, source, mix):
    from tl_superposition.activations import open_packing

    return open_packing(model, source, context_size=16, split="valid", prepend_bos=True, mix=mix)
