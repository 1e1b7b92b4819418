"""Activation collection: stored values, pattern recomputation, resume, bad input, the reader."""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path

import tl_superposition
from tl_superposition.activations import (
    SHORT_HOOKS,
    ActivationStore,
    CollectConfig,
    collect,
    pack_contexts,
    pack_text,
    pattern_from_qk,
    resolve_hooks,
    resolve_source,
    special_tokens,
)
from tl_superposition.activations import collector as collector_mod
from tl_superposition.activations import folder as folder_mod
from tl_superposition.activations import sources as sources_mod

ALL_SHORT = list(SHORT_HOOKS)


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def corpus() -> Path:
    """A small two-split text folder (``valid.txt``, ``test.txt``) in ``tests/data``."""
    return data_path("shakespeare")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


# ------------------------------------------------------------------ stored values


def test_stored_activations_equal_run_with_cache(model, tmp_path):
    out = tmp_path / "acts"
    summary = collect(
        model,
        CollectConfig(
            hooks=ALL_SHORT,
            layers=[1],
            split="valid",
            context_size=32,
            batch_size=3,
            max_tokens=32 * 10,
            shard_tokens=32 * 4,
            out_dir=out,
            progress=False,
        ),
        corpus(),
    )
    assert summary.n_contexts == 10 and summary.n_shards == 3  # shards of 4, 4, 2 contexts
    store = ActivationStore(out)
    assert store.n_tokens == 320
    batch = store.get_contexts(list(range(10)))
    tokens = batch["tokens"]
    assert tokens.shape == (10, 32)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in store.hooks)
    for name in store.hooks:
        assert batch[name].shape == cache[name].shape, name
        torch.testing.assert_close(batch[name], cache[name], rtol=0, atol=1e-5, msg=name)
    # GQA: keys are stored with the model's key/value heads only
    assert store.shape("blocks.1.attn.hook_k")[1] == (
        model.cfg.n_key_value_heads or model.cfg.n_heads
    )


def test_stored_tokens_trace_back_to_text(tiny_gpt2, tmp_path):
    docs = ["The quick brown fox jumps over the lazy dog. " * 6, "Colourless green ideas " * 9]
    collect(
        tiny_gpt2,
        CollectConfig(
            hooks="blocks.0.hook_resid_pre",
            context_size=16,
            out_dir=tmp_path / "a",
            prepend_bos=True,
            progress=False,
        ),
        docs,
    )
    store = ActivationStore(tmp_path / "a")
    toks = store.get_contexts(range(len(store)))["tokens"]
    bos = tiny_gpt2.tokenizer.bos_token_id
    assert (toks[:, 0] == bos).all()
    stream = []
    for d in docs:
        stream += tiny_gpt2.tokenizer.encode(d) + [bos]
    bodies = toks[:, 1:].reshape(-1).tolist()
    assert bodies == stream[: len(bodies)]
    assert len(stream) - len(bodies) < 16  # only the trailing partial context is dropped


def test_stop_at_layer_runs_only_needed_blocks(tiny_gpt2, tmp_path):
    calls = []
    handle = tiny_gpt2.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        collect(
            tiny_gpt2,
            CollectConfig(
                hooks=["blocks.1.attn.hook_q"],
                context_size=16,
                max_tokens=64,
                out_dir=tmp_path / "a",
                progress=False,
            ),
        )
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtype(tiny_llama, tmp_path, dtype):
    collect(
        tiny_llama,
        CollectConfig(
            hooks="blocks.0.ln1.hook_normalized",
            context_size=16,
            max_tokens=64,
            dtype=dtype,
            out_dir=tmp_path / "h",
            progress=False,
        ),
    )
    collect(
        tiny_llama,
        CollectConfig(
            hooks="blocks.0.ln1.hook_normalized",
            context_size=16,
            max_tokens=64,
            out_dir=tmp_path / "f",
            progress=False,
        ),
    )
    half = ActivationStore(tmp_path / "h").get_contexts([0, 1, 2])
    full = ActivationStore(tmp_path / "f").get_contexts([0, 1, 2])
    name = "blocks.0.ln1.hook_normalized"
    assert half[name].dtype == getattr(torch, dtype)
    torch.testing.assert_close(half[name].float(), full[name], rtol=2e-2, atol=2e-2)
    as32 = ActivationStore(tmp_path / "h", dtype=torch.float32).get_contexts([0])[name]
    assert as32.dtype == torch.float32


# ------------------------------------------------------------------ patterns from q and k


def test_patterns_recomputed_from_q_k_equal_hook_pattern(model, tmp_path):
    hooks = ["attn.hook_q", "attn.hook_k"]
    collect(
        model,
        CollectConfig(
            hooks=hooks,
            layers=[0, 2],
            split="test",
            context_size=48,
            max_tokens=48 * 6,
            out_dir=tmp_path / "qk",
            progress=False,
        ),
        corpus(),
    )
    store = ActivationStore(tmp_path / "qk")
    batch = next(store.iter_contexts(6))
    _, cache = model.run_with_cache(batch["tokens"], names_filter=lambda n: "hook_pattern" in n)
    for layer in (0, 2):
        ref = cache[f"blocks.{layer}.attn.hook_pattern"]
        got = store.attention_pattern(batch, layer)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            store.attention_pattern(batch, layer, heads=[3, 1]), ref[:, [3, 1]], rtol=0, atol=1e-6
        )
    if model.cfg.positional_embedding_type == "rotary":
        # hook_q is stored before rotation: skipping the rotation must give another pattern
        params = dict(store.attention_params(0))
        unrotated = pattern_from_qk(
            batch["blocks.0.attn.hook_q"],
            batch["blocks.0.attn.hook_k"],
            params,
            already_rotated=True,
        )
        assert not torch.allclose(unrotated, cache["blocks.0.attn.hook_pattern"], atol=1e-3)


def test_pattern_head_selection_is_stored(tiny_llama, tmp_path):
    collect(
        tiny_llama,
        CollectConfig(
            hooks=["blocks.1.attn.hook_pattern"],
            heads=[2, 0],
            context_size=16,
            max_tokens=64,
            out_dir=tmp_path / "p",
            progress=False,
        ),
    )
    store = ActivationStore(tmp_path / "p")
    assert store.shape("blocks.1.attn.hook_pattern") == [2, 16, 16]
    assert store.manifest["hooks"]["blocks.1.attn.hook_pattern"]["heads"] == [2, 0]
    batch = store.get_contexts([0, 3])
    _, cache = tiny_llama.run_with_cache(batch["tokens"], names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(
        batch["blocks.1.attn.hook_pattern"],
        cache["blocks.1.attn.hook_pattern"][:, [2, 0]],
        rtol=0,
        atol=1e-6,
    )


# ------------------------------------------------------------------ resume and refusal


def test_interrupted_run_resumes_byte_identical(model, tmp_path, monkeypatch):
    kwargs = dict(
        hooks=["ln1.hook_normalized", "attn.hook_q", "attn.hook_k"],
        layers=[1],
        split="valid",
        context_size=32,
        batch_size=3,
        max_tokens=32 * 14,
        shard_tokens=32 * 4,
        progress=False,
    )
    collect(model, CollectConfig(out_dir=tmp_path / "full", **kwargs), corpus())

    real_save = collector_mod._save_shard
    calls = []

    def crashing_save(path, tensors):
        calls.append(path.name)
        if len(calls) == 3:  # die while writing the third shard
            with collector_mod.atomic_path(path) as tmp:
                tmp.write_bytes(b"partial")
                raise KeyboardInterrupt
        return real_save(path, tensors)

    monkeypatch.setattr(collector_mod, "_save_shard", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        collect(model, CollectConfig(out_dir=tmp_path / "resumed", **kwargs), corpus())
    monkeypatch.setattr(collector_mod, "_save_shard", real_save)

    part = tmp_path / "resumed"
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["n_contexts"] == 8
    assert sorted(p.name for p in part.iterdir() if p.name.startswith("shard")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp")]  # no half-written shard
    with pytest.raises(RuntimeError, match="incomplete"):
        ActivationStore(part)

    summary = collect(model, CollectConfig(out_dir=part, **kwargs), corpus())
    assert summary.resumed_from_contexts == 8 and summary.n_contexts == 14
    assert _files(part) == _files(tmp_path / "full")
    m_full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    m_part = json.loads((part / "manifest.json").read_text())
    assert m_part["shards"] == m_full["shards"] and m_part["complete"]

    # a third call with the same settings finds the collection complete and writes nothing
    again = collect(model, CollectConfig(out_dir=part, **kwargs), corpus())
    assert again.new_tokens == 0 and again.n_contexts == 14


def test_different_settings_refuse_instead_of_mixing(tiny_gpt2, tmp_path):
    out = tmp_path / "a"
    base = CollectConfig(
        hooks="blocks.0.hook_resid_pre", context_size=16, max_tokens=64, out_dir=out, progress=False
    )
    collect(tiny_gpt2, base)
    before = _files(out)
    with pytest.raises(FileExistsError, match="context_size"):
        collect(tiny_gpt2, replace(base, context_size=32))
    with pytest.raises(FileExistsError, match="hooks"):
        collect(tiny_gpt2, replace(base, hooks="blocks.1.hook_resid_pre"))
    with pytest.raises(FileExistsError, match="dtype"):
        collect(tiny_gpt2, replace(base, dtype="float16"))
    assert _files(out) == before
    collect(tiny_gpt2, replace(base, overwrite=True, context_size=32))
    assert ActivationStore(out).context_size == 32

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        collect(tiny_gpt2, replace(base, out_dir=foreign))


# ------------------------------------------------------------------ bad input


def test_config_checks_fields_without_a_model(tmp_path):
    ok = CollectConfig(out_dir=tmp_path, hooks=" attn.hook_q, attn.hook_k", layers=15, dtype="fp16")
    assert ok.hooks == ("attn.hook_q", "attn.hook_k") and ok.layers == (15,)
    assert ok.dtype == "float16" and ok.storage_dtype == torch.float16
    assert ok.shard_contexts == 32768 // 128 and ok.max_contexts is None
    numpy_heads = CollectConfig(out_dir=tmp_path, hooks="attn.hook_pattern", heads=np.array([2, 0]))
    assert numpy_heads.heads == (2, 0)
    bad = {
        "context_size": dict(context_size=1),
        "batch_size": dict(batch_size=0),
        "shard_tokens": dict(shard_tokens=0),
        "below context_size": dict(max_tokens=100),
        "storage dtype": dict(dtype="int8"),
        "separator": dict(separator="tab"),
        "hooks must be hook names": dict(hooks=" , "),
        "layers must be integers": dict(layers=["a"]),
        "attn.hook_pattern, which is not requested": dict(heads=[0]),
        "distinct": dict(hooks="attn.hook_pattern", heads=[1, 1]),
        "column": dict(column=""),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message):
            CollectConfig(out_dir=tmp_path, **kwargs)


def test_config_changed_after_construction_is_checked(tiny_gpt2, tmp_path):
    config = CollectConfig(out_dir=tmp_path / "a", hooks="blocks.0.hook_resid_pre")
    config.batch_size = 0
    with pytest.raises(ValueError, match="batch_size"):
        collect(tiny_gpt2, config)
    assert not (tmp_path / "a").exists()


def test_bad_hooks(tiny_gpt2):
    with pytest.raises(ValueError, match=r"layer 40 out of range, model has 3 layers \(0-2\)"):
        resolve_hooks(tiny_gpt2, "blocks.40.attn.hook_q")
    with pytest.raises(ValueError, match="out of range"):
        resolve_hooks(tiny_gpt2, ["attn.hook_q"], layers=[3])
    with pytest.raises(ValueError, match="unknown hook name 'attn.hook_qq'"):
        resolve_hooks(tiny_gpt2, "blocks.0.attn.hook_qq")
    with pytest.raises(ValueError, match="layers"):
        resolve_hooks(tiny_gpt2, "attn.hook_q")
    assert resolve_hooks(tiny_gpt2, "ln1.hook_normalized,attn.hook_q", layers=[0, 2]) == [
        "blocks.0.ln1.hook_normalized",
        "blocks.2.ln1.hook_normalized",
        "blocks.0.attn.hook_q",
        "blocks.2.attn.hook_q",
    ]


def test_bad_inputs_write_nothing(tiny_gpt2, tmp_path):
    out = tmp_path / "out"

    def cfg(hooks="blocks.0.attn.hook_q", **kw):
        return CollectConfig(out_dir=out, hooks=hooks, progress=False, **kw)

    with pytest.raises(ValueError, match="out of range"):
        collect(tiny_gpt2, cfg("blocks.7.attn.hook_q"))
    with pytest.raises(ValueError, match="n_ctx 128"):
        collect(tiny_gpt2, cfg(context_size=256))
    with pytest.raises(ValueError, match="empty"):
        collect(tiny_gpt2, cfg(), [])
    with pytest.raises(ValueError, match="blank"):
        collect(tiny_gpt2, cfg(), ["   ", "\n"])
    with pytest.raises(ValueError, match="no complete context"):
        collect(tiny_gpt2, cfg(context_size=64), ["too short"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        collect(tiny_gpt2, cfg(), empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect(tiny_gpt2, cfg(), tmp_path / "missing.txt")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": "hello world " * 20}) for _ in range(5)))
    with pytest.raises(ValueError, match=r"no column 'text'.*'content'"):
        collect(tiny_gpt2, cfg(), jsonl)
    with pytest.raises(ValueError, match="split 'train' matches no file"):
        collect(tiny_gpt2, cfg(split="train"), corpus())
    with pytest.raises(ValueError, match="heads"):
        collect(tiny_gpt2, cfg("blocks.0.attn.hook_pattern", heads=[4]))
    with pytest.raises(ValueError, match="dtype"):
        collect(tiny_gpt2, cfg(dtype="int8"))
    assert not out.exists() or not any(out.iterdir())
    # the column that does exist works
    collect(tiny_gpt2, cfg(column="content", context_size=16), jsonl)
    assert ActivationStore(out).n_contexts > 0


def test_hub_unreachable_names_local_options(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="pydoc"):
        collect(
            tiny_gpt2,
            CollectConfig(hooks="blocks.0.attn.hook_q", out_dir=tmp_path / "o", progress=False),
            "someone/some-dataset",
        )


def test_unwritable_out_dir(tiny_gpt2, tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(folder_mod.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=str(tmp_path / "ro")):
        collect(
            tiny_gpt2,
            CollectConfig(hooks="blocks.0.attn.hook_q", out_dir=tmp_path / "ro", progress=False),
        )
    monkeypatch.undo()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises((FileExistsError, PermissionError)):
        collect(
            tiny_gpt2,
            CollectConfig(hooks="blocks.0.attn.hook_q", out_dir=afile / "sub", progress=False),
        )


def test_no_disk_space(tiny_gpt2, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(folder_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    config = CollectConfig(
        hooks="blocks.0.attn.hook_q",
        context_size=16,
        max_tokens=64,
        out_dir=tmp_path / "a",
        progress=False,
    )
    with pytest.raises(RuntimeError, match="not enough disk space"):
        collect(tiny_gpt2, config)
    assert not list((tmp_path / "a").glob("shard_*"))
    monkeypatch.undo()

    # the disk fills up while a shard is being written: no partial shard is left behind
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(collector_mod, "save_file", full_disk)
    with pytest.raises(RuntimeError, match="disk full"):
        collect(tiny_gpt2, replace(config, out_dir=tmp_path / "b"))
    names = [p.name for p in (tmp_path / "b").iterdir()]
    assert not [n for n in names if n.startswith("shard_") or n.endswith(".tmp")]


# ------------------------------------------------------------------ sources and packing


def test_pack_contexts_has_bos_and_no_padding():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    ctxs = list(pack_contexts(docs, 4, bos_token_id=0, separator_token_id=99))
    assert all(c.shape == (4,) and c[0] == 0 for c in ctxs)
    stream = np.concatenate([c[1:] for c in ctxs]).tolist()
    # the first document fills a body exactly, so no separator opens the next body
    assert stream == [1, 2, 3, 4, 5, 6, 7, 8, 99, 9, 99, 10, 11, 12, 13, 14, 15, 16]
    assert 99 not in [c[1] for c in ctxs]
    no_bos = list(pack_contexts(docs, 4, bos_token_id=None, separator_token_id=None))
    assert np.concatenate(no_bos).tolist() == list(range(1, 17))


@pytest.mark.parametrize(("prepend_bos", "separator"), [(None, "bos"), (False, "eos")])
def test_pack_text_gives_the_collected_tokens(model, tmp_path, prepend_bos, separator):
    config = CollectConfig(
        hooks="blocks.0.hook_resid_pre",
        context_size=24,
        max_tokens=24 * 10,
        split="valid",
        prepend_bos=prepend_bos,
        separator=separator,
        out_dir=tmp_path / "a",
        progress=False,
    )
    collect(model, config, corpus())
    store = ActivationStore(tmp_path / "a")
    stored = store.get_contexts(range(len(store)))["tokens"]
    packed = pack_text(
        model,
        corpus(),
        context_size=24,
        split="valid",
        max_contexts=len(store),
        prepend_bos=prepend_bos,
        separator=separator,
    )
    assert torch.equal(packed, torch.as_tensor(stored).long())
    starts_with_bos = bool((packed[:, 0] == model.tokenizer.bos_token_id).all())
    wants_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    assert starts_with_bos == wants_bos


def test_special_tokens_refuse_bad_settings(tiny_gpt2):
    with pytest.raises(ValueError, match="separator must be one of"):
        special_tokens(tiny_gpt2, separator="newline")
    assert special_tokens(tiny_gpt2, prepend_bos=False, separator="none") == (None, None)


def test_pretokenised_and_default_sources(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 1000, (5, 16), generator=g)
    config = CollectConfig(
        hooks="blocks.0.hook_resid_pre", context_size=16, out_dir=tmp_path / "t", progress=False
    )
    collect(tiny_llama, config, toks)
    store = ActivationStore(tmp_path / "t")
    assert torch.equal(store.get_contexts(range(5))["tokens"], toks)
    # the built-in offline corpus is the default source
    s = collect(
        tiny_llama, replace(config, context_size=64, max_tokens=640, out_dir=tmp_path / "p")
    )
    assert s.n_tokens == 640
    assert ActivationStore(tmp_path / "p").manifest["settings"]["source"]["kind"] == "pydoc"


def test_dataset_object_missing_column(tiny_gpt2, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["hello world " * 20] * 3})
    config = CollectConfig(out_dir=tmp_path / "a", hooks="blocks.0.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match=r"no column 'text'.*'content'"):
        collect(tiny_gpt2, config, ds)
    summary = collect(tiny_gpt2, replace(config, column="content", context_size=16), ds)
    assert summary.n_contexts > 0 and summary.source["kind"] == "datasets_object"


def test_auto_source_offline_is_pydoc(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources_mod, "hub_reachable", lambda **kw: False)
    config = CollectConfig(
        out_dir=tmp_path / "auto",
        hooks="blocks.0.hook_resid_pre",
        context_size=32,
        max_tokens=32 * 4,
        progress=False,
    )
    with caplog.at_level(logging.INFO, logger="tl_superposition"):
        summary = collect(tiny_llama, config, "auto")
    assert "using the pydoc corpus" in caplog.text and summary.line() in caplog.text
    assert "pydoc (auto)" in summary.line()
    source = ActivationStore(tmp_path / "auto").manifest["settings"]["source"]
    assert source["kind"] == "pydoc" and source["requested"] == "auto"
    collect(tiny_llama, replace(config, out_dir=tmp_path / "pydoc"), "pydoc")
    assert _files(tmp_path / "auto") == _files(tmp_path / "pydoc")


def test_auto_source_online_is_wikitext2_from_the_hub(gpt2_tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter([{"text": " = Valkyria Chronicles = \n"}, {"text": "Senjō no Valkyria"}])

    monkeypatch.setattr(sources_mod, "hub_reachable", lambda **kw: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = resolve_source("auto", gpt2_tokenizer, context_size=8, split="validation")
    assert source.description == {
        "kind": "hub",
        "name": "Salesforce/wikitext",
        "config": "wikitext-2-raw-v1",
        "split": "validation",
        "column": "text",
        "requested": "auto",
    }
    assert calls == []  # nothing is read before the first document is asked for
    assert source.documents is not None
    docs = list(source.documents())
    assert calls == [
        (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "validation", "streaming": True})
    ]
    assert gpt2_tokenizer.decode(docs[1]) == "Senjō no Valkyria"


# ------------------------------------------------------------------ reader


def test_reader_minibatches(tiny_gpt2, tmp_path):
    name = "blocks.0.ln1.hook_normalized"
    collect(
        tiny_gpt2,
        CollectConfig(
            hooks=[name, "blocks.0.attn.hook_pattern"],
            split="valid",
            context_size=16,
            max_tokens=16 * 23,
            shard_tokens=16 * 5,
            seed=3,
            out_dir=tmp_path / "a",
            prepend_bos=True,
            progress=False,
        ),
        corpus(),
    )
    store = ActivationStore(tmp_path / "a")
    all_ctx = store.get_contexts(range(23))

    def order(seed=None, epoch=0):
        seen = []
        for b in store.iter_contexts(5, seed=seed, epoch=epoch):
            assert b[name].shape[1:] == (16, 64)
            assert b["blocks.0.attn.hook_pattern"].shape[1:] == (4, 16, 16)
            for row in range(b["tokens"].shape[0]):
                match = (all_ctx[name] == b[name][row]).all(-1).all(-1).nonzero()
                seen.append(int(match[0, 0]))
        return seen

    first = order()
    assert sorted(first) == list(range(23))  # every context exactly once per epoch
    assert order() == first  # fixed seed (the manifest's) -> same order
    assert order(epoch=1) != first and order(seed=4) != first
    # tokens: every position exactly once, shuffled across contexts
    rows, toks = [], []
    for b in store.iter_tokens(40, tokens=True, buffer_contexts=7):
        assert set(b) == {name, "tokens"}
        rows.append(b[name])
        toks.append(b["tokens"])
    rows_t = torch.cat(rows)
    assert rows_t.shape == (23 * 16, 64)
    assert torch.equal(
        torch.sort(torch.cat(toks)).values, torch.sort(all_ctx["tokens"].reshape(-1)).values
    )
    ref = all_ctx[name].reshape(-1, 64)
    # the yielded rows are the stored rows, each exactly once (rows repeat, e.g. BOS at position
    # 0 of every context, so compare the multisets: distinct rows with their counts)
    got_rows, got_counts = torch.unique(rows_t, dim=0, return_counts=True)
    want_rows, want_counts = torch.unique(ref, dim=0, return_counts=True)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_counts, want_counts)
    no_bos = sum(b[name].shape[0] for b in store.iter_tokens(40, skip_bos=True))
    assert no_bos == 23 * 15


# ------------------------------------------------------------------ command line


def test_cli_subcommand(tiny_gpt2, tmp_path, monkeypatch, capsys):
    import argparse

    from tl_superposition.activations import cli

    monkeypatch.setattr(tl_superposition, "load_model", lambda *a, **k: tiny_gpt2)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "--model",
            "tiny",
            "--source",
            str(corpus()),
            "--split",
            "valid",
            "--layers",
            "1",
            "--hooks",
            "ln1.hook_normalized,attn.hook_q,attn.hook_k",
            "--context-size",
            "32",
            "--max-tokens",
            "320",
            "--dtype",
            "float16",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert cli.run(args) == 0
    assert "collected 320 tokens" in capsys.readouterr().out
    store = ActivationStore(out)
    assert store.n_tokens == 320 and store.manifest["settings"]["dtype"] == "float16"
    bad = parser.parse_args(
        ["--model", "tiny", "--hooks", "blocks.9.attn.hook_q", "--out", str(tmp_path / "bad")]
    )
    with pytest.raises(ValueError, match="layer 9 out of range"):
        cli.run(bad)


def test_cli_defaults_are_the_config_defaults(tmp_path):
    import argparse

    from tl_superposition.activations import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    assert cli.config_from_args(args) == CollectConfig(out_dir=tmp_path)
    assert args.source == "auto"
    args = parser.parse_args(["--out", str(tmp_path), "--layers", "3,5", "--prepend-bos", "no"])
    assert cli.config_from_args(args) == CollectConfig(
        out_dir=tmp_path, layers=[3, 5], prepend_bos=False
    )


def test_cli_top_level_error_exit(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from tl_superposition.cli import main

    monkeypatch.setattr(tl_superposition, "load_model", lambda *a, **k: tiny_gpt2)
    rc = main(
        [
            "collect",
            "--model",
            "tiny",
            "--hooks",
            "blocks.9.attn.hook_q",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert rc == 2
    assert "layer 9 out of range" in capsys.readouterr().err
