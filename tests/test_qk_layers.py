"""Several layers' QK transcoders trained together: one forward pass, per-layer results equal
to training each layer alone, independent resume (fast tests)."""

from __future__ import annotations

import pytest
import torch
from conftest import data_path
from sae_lens import SAE

from tl_superposition.activations.mix import ContextMix
from tl_superposition.qk import (
    AttentionShape,
    ModelSource,
    QKTrainConfig,
    QKTranscoder,
    layer_folder,
    train_qk,
    train_qk_layers,
)

LAYERS = (0, 2)


def fresh(model, layer, seed=0):
    gen = torch.Generator().manual_seed(seed + layer)
    return QKTranscoder.for_model(model, layer, d_hidden=32, generator=gen)


def streamed(model, layers=LAYERS):
    shapes = [AttentionShape.from_model(model, L) for L in layers]
    mix = ContextMix(bos_frac=0.5, random_offset=True, seed=1)
    return ModelSource(
        model, str(data_path("shakespeare")), shapes, context_size=16, split="valid",
        max_contexts=80, mix=mix,
    )  # fmt: skip


CFG = QKTrainConfig(
    max_tokens=16 * 4 * 14, batch_contexts=4, log_every_steps=3, checkpoint_every_steps=4,
    dead_window_tokens=128, resample_every_tokens=256,
)  # fmt: skip


def test_layers_trained_together_equal_each_trained_alone(tiny_llama, tmp_path):
    source = streamed(tiny_llama)
    together = train_qk_layers(
        [fresh(tiny_llama, L) for L in LAYERS], tiny_llama, source, CFG, tmp_path / "run",
        progress=False,
    )  # fmt: skip
    assert sorted(together) == list(LAYERS)
    for layer in LAYERS:
        alone = train_qk(fresh(tiny_llama, layer), tiny_llama, streamed(tiny_llama, [layer]), CFG)
        assert together[layer].finished and together[layer].steps == alone.steps
        assert together[layer].transcoder.equal(alone.transcoder), layer
        assert together[layer].history.equals(alone.history)
        loaded = QKTranscoder.load(layer_folder(tmp_path / "run", layer))
        assert loaded.equal(alone.transcoder) and loaded.shape.layer == layer


def test_layers_resume_independently_to_the_uninterrupted_result(tiny_llama, tmp_path):
    whole = train_qk_layers(
        [fresh(tiny_llama, L) for L in LAYERS], tiny_llama, streamed(tiny_llama), CFG,
        tmp_path / "whole", progress=False,
    )  # fmt: skip
    run = tmp_path / "part"
    # layer 2 alone first, to step 8 (two checkpoints): it is ahead when both resume
    ahead = train_qk(
        fresh(tiny_llama, 2), tiny_llama, streamed(tiny_llama), CFG, layer_folder(run, 2),
        stop_after_steps=8, progress=False,
    )  # fmt: skip
    assert ahead.steps == 8
    part = train_qk_layers(
        [fresh(tiny_llama, L) for L in LAYERS], tiny_llama, streamed(tiny_llama), CFG, run,
        stop_after_steps=5, progress=False,
    )  # fmt: skip
    assert part[0].steps == 5 and part[2].steps == 8  # layer 2 skipped the batches it had seen
    rest = train_qk_layers(
        [fresh(tiny_llama, L, seed=5) for L in LAYERS], tiny_llama, streamed(tiny_llama), CFG,
        run, progress=False,
    )  # fmt: skip
    for layer in LAYERS:
        assert rest[layer].finished
        assert rest[layer].transcoder.equal(whole[layer].transcoder), layer
        assert rest[layer].history.equals(whole[layer].history)


def test_bad_layer_sets_are_refused(tiny_llama):
    source = streamed(tiny_llama, [0])
    with pytest.raises(ValueError, match="one transcoder per layer"):
        train_qk_layers([fresh(tiny_llama, 0), fresh(tiny_llama, 0)], tiny_llama, source, CFG)
    with pytest.raises(ValueError, match=r"reads layers \[0\]"):
        train_qk_layers([fresh(tiny_llama, 2)], tiny_llama, source, CFG)
    with pytest.raises(ValueError, match="pick one of .shapes"):
        next(streamed(tiny_llama).batches(4, 0))


def write_circuit(folder, heads):
    import json

    nodes = [
        {"node": f"{L}.{h}", "kind": "attn", "layer": L, "head": h, "in_circuit": inside}
        for L, h, inside in heads
    ]
    edges = [{"up": nodes[0]["node"], "down": nodes[0]["node"], "effect_mean": 0.0,
              "effect_std": 0.0}]  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "circuit.json").write_text(json.dumps({"nodes": nodes, "edges": edges, "params": {}}))


def test_cli_trains_the_circuit_layers_from_one_collection(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    import json

    import tl_superposition
    from tl_superposition.activations import ActivationStore
    from tl_superposition.cli import main

    loads = []
    monkeypatch.setattr(
        tl_superposition, "load_model", lambda *a, **k: loads.append(1) or tiny_llama
    )
    write_circuit(tmp_path / "trace", [(0, 1, True), (2, 3, True), (1, 0, False)])
    out, acts = tmp_path / "qk", tmp_path / "acts"
    base = ["train-qk", "--model", "tiny", "--context-size", "16", "--split", "valid",
            "--source", str(data_path("shakespeare")), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main([*base, "--layers", f"circuit:{tmp_path / 'none'}"]) == 2
    assert "holds no circuit.json" in capsys.readouterr().err
    assert main([*base, "--layers", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert not loads
    train = ["--layers", f"circuit:{tmp_path / 'trace'}", "--acts", str(acts), "--bos-frac",
             "0.5", "--random-offset", "--d-hidden", "16", "--max-tokens", "768",
             "--batch-contexts", "4", "--max-contexts", "64"]  # fmt: skip
    assert main([*base, *train, "--stop-after-steps", "5"]) == 0
    assert "layer 0 paused: 5 steps" in capsys.readouterr().out
    store = ActivationStore(acts)  # both layers, collected in one pass
    assert {h.split(".")[1] for h in store.hooks if h.startswith("blocks.")} == {"0", "2"}
    assert main([*base, *train]) == 0
    printed = capsys.readouterr().out
    assert "layer 0 finished: 12 steps" in printed and "layer 2 finished: 12 steps" in printed
    for layer in (0, 2):
        qkt = QKTranscoder.load(layer_folder(out, layer))
        assert qkt.shape.layer == layer
        SAE.load_from_disk(str(layer_folder(out, layer) / "k"))  # SAELens reads each dictionary
        saved = json.loads((layer_folder(out, layer) / "train_config.json").read_text())
        assert saved["source"]["kind"] == "store"
    assert store.manifest["settings"]["mix"]["bos_frac"] == 0.5
    assert not (out / "layer_1").exists()
    n_loads = len(loads)
    other = [a if a != "0.5" else "0.3" for a in train]  # another mix, the same collection
    assert main([*base, *other]) == 2
    assert "holds contexts cut in the mix" in capsys.readouterr().err and len(loads) == n_loads
    # eval-qk on the whole run: every layer, heads as layer.head
    ev = ["eval-qk", "--model", "tiny", "--context-size", "16", "--split", "test",
          "--source", str(data_path("shakespeare")), "--transcoder", str(out),
          "--max-contexts", "8", "--no-progress"]  # fmt: skip
    assert main([*ev, "--heads", "1.0"]) == 2
    assert "layer.head pairs of layers [0, 2] only" in capsys.readouterr().err
    assert len(loads) == n_loads  # refused before the model loads
    ev_out = ["--heads", "0.1,2.3", "--ioi-prompts", "4", "--no-losses", "--out",
              str(tmp_path / "ev")]  # fmt: skip
    assert main([*ev, *ev_out]) == 0
    for layer, head in ((0, 1), (2, 3)):
        table = (tmp_path / "ev" / f"layer_{layer}" / "ioi_heads.csv").read_text().splitlines()
        assert [row.split(",")[:2] for row in table[1:]] == [[str(layer), str(head)]]
        metrics = (tmp_path / "ev" / f"layer_{layer}" / "metrics.csv").read_text()
        assert "loss_delta" in metrics.splitlines()[0]
