"""Damaged files give one line naming the file and the fix; Ctrl-C gives one line too."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tl_superposition.activations.store import open_tensors
from tl_superposition.cli import main
from tl_superposition.core.checkpoint import load_checkpoint, save_checkpoint
from tl_superposition.core.reading import CorruptFileError, read_json
from tl_superposition.gated.block import GatedAttentionBlock
from tl_superposition.qk.dictionaries import load_dictionary
from tl_superposition.toys.models import superposed_skip_trigram_model


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_checkpoint_names_itself(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "gated", {"a": 1}, {"w": torch.ones(1000)})
    assert load_checkpoint(path, "gated")[0] == {"a": 1}
    _truncate(path)
    with pytest.raises(CorruptFileError, match=r"checkpoint\.pt is truncated or corrupt.*delete"):
        load_checkpoint(path, "gated")


def test_a_truncated_block_or_shard_names_the_file(tmp_path):
    block = GatedAttentionBlock.from_layer(superposed_skip_trigram_model(), 0, 2, seed=0)
    block.save(tmp_path / "block")
    _truncate(tmp_path / "block" / "weights.safetensors")
    with pytest.raises(CorruptFileError, match=r"weights\.safetensors is truncated or corrupt"):
        GatedAttentionBlock.load(tmp_path / "block")
    shard = tmp_path / "shard_00000.safetensors"
    save_file({"x": torch.ones(64, 8)}, shard)
    _truncate(shard, 0.01)
    with pytest.raises(CorruptFileError, match="shard_00000.safetensors is truncated.*collect"):
        open_tensors(shard)
    (tmp_path / "summary.json").write_text('{"a": ')
    with pytest.raises(CorruptFileError, match=r"summary\.json is truncated or corrupt"):
        read_json(tmp_path / "summary.json")


def test_a_truncated_dictionary_names_its_folder(tmp_path):
    from tl_superposition.qk.dictionaries import make_dictionary

    sae = make_dictionary(8, 16, 32)
    sae.save_model(str(tmp_path / "q"))
    _truncate(tmp_path / "q" / "sae_weights.safetensors")
    with pytest.raises(CorruptFileError, match=r"q holds a truncated or corrupt file"):
        load_dictionary(tmp_path / "q")


def test_commands_report_a_damaged_file_and_an_interrupt_in_one_line(tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    run = tmp_path / "2H-3ST" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"setting": "2H/3ST", ')
    args = ["toy", "--settings", "2H/3ST", "--seeds", "0", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json is truncated or corrupt" in err

    def interrupted(args):
        raise KeyboardInterrupt

    from tl_superposition.toys import cli as toy_cli

    monkeypatch.setattr(toy_cli, "run", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("tl-superposition toy: interrupted; finished files and the last checkpoint "
                   "are kept: rerun the same command to resume")  # fmt: skip


def test_saved_files_get_the_users_umask(hf_models, tmp_path):
    import os

    from tl_superposition.core.atomic import write_text_atomic
    from tl_superposition.qk.transcoder import QKTranscoder

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o640
        from tl_superposition.models import load_model

        model = load_model(str(hf_models["gpt2"][1]))
        QKTranscoder.for_model(model, 0, d_hidden=8).save(tmp_path / "qk")
        for p in [tmp_path / "qk", *(tmp_path / "qk").rglob("*")]:
            want = 0o750 if p.is_dir() else 0o640
            assert os.stat(p).st_mode & 0o777 == want, p
    finally:
        os.umask(old)
