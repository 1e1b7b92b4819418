"""``trace-ioi`` writes whole folders: refused when not empty, replaced only when complete."""

from __future__ import annotations

from pathlib import Path

from tl_superposition.cli import main


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _args(path: Path, out: Path, *extra: str) -> list[str]:
    return ["trace-ioi", "--model", str(path), "--n-prompts", "6", "--heldout-prompts", "4",
            "--pattern-thresh", "0.2", "--no-plots", "--out", str(out), *extra]  # fmt: skip


def test_a_non_empty_out_is_refused_before_loading(tmp_path, capsys, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["trace-ioi", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty; pass --overwrite" in err and err.count("\n") == 1
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_an_interrupted_run_leaves_the_previous_folder_byte_identical(
    hf_models, tmp_path, monkeypatch
):
    _, path = hf_models["gpt2"]
    out = tmp_path / "run"
    assert main(_args(path, out)) == 0
    before = _snapshot(out)
    assert {"summary.json", "firings.parquet", "prompts.csv", "seeds.csv"} <= set(before)

    from tl_superposition.tracing import ioi_trace

    def interrupted(self, *args, **kwargs):
        (Path(args[0]) / "prompts.csv").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(ioi_trace.IOITrace, "save", interrupted)
    assert main(_args(path, out, "--seed", "3", "--overwrite")) == 130  # Ctrl-C: one line
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left


def test_overwrite_replaces_the_whole_folder(hf_models, tmp_path):
    _, path = hf_models["gpt2"]
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    assert main(_args(path, out, "--overwrite")) == 0
    assert "stale.txt" not in _snapshot(out) and (out / "summary.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
