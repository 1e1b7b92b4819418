"""Small runs of every command, and fingerprints of every file they write.

``tests/test_golden_outputs.py`` compares these fingerprints with
``tests/data/golden_outputs.json``, first written before the shared core (issue 27) replaced
each method's own training loop, sources and helpers: the refactor had to leave every output
the same. A fingerprint (:class:`Fingerprint`) is exact on everything but float values (text
with its float literals masked, integer tensors, keys, shapes, dtypes) and compares the floats
by statistics within a relative tolerance: byte digests, the first version of this test, held
on the machine that wrote them and failed on another CPU, whose floating-point rounding
differs in the last bits. Normalisations: the run's temporary root is replaced by ``<ROOT>``
(commands record their paths), JSON fields that measure wall-clock time are dropped (see
``VOLATILE``), parquet files are compared by their tables (their metadata names library
versions) and checkpoints by their entries.

Regenerate the reference (only for an intended change of outputs, named in the commit) with
``TL_SUP_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_outputs.py``.

Intended changes since the reference was first written (each checked against the earlier
files, everything else equal):

- checkpoints moved to the shared format (:mod:`tl_superposition.core.checkpoint`): they are
  compared by their entries (identity and state merged), which stayed equal;
- ``GatedTrainConfig.log_every`` / ``checkpoint_every`` became ``log_every_steps`` /
  ``checkpoint_every_steps`` (the QK trainer's names): the gated checkpoints record the
  training config under the new names (``train-gated/checkpoint.pt``, the toy run's
  ``gated/checkpoint.pt``).
- the reference was rewritten as fingerprints (at commit accb800, the outputs of issue 27), then
  the toy run's ``summary.json`` gained ``gated_until_learnt``, ``gated_epochs_trained`` and
  ``relearnt`` (issue 28: training until the task is relearnt), and ``n_train``, ``n_check``
  and ``batch_size`` (recorded so that a rerun with other data sizes is not answered from the
  old run).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from shlex import split
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_outputs.json"

# keys (JSON) holding wall-clock measurements or dates
VOLATILE = re.compile(r"(seconds|elapsed|_per_s$|^time$|^wall|^date$|duration)")


def _drop_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


# a float literal as the text of a JSON, CSV, graphml or Markdown file writes it
FLOAT = re.compile(rb"-?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+|-?(?:nan|inf)\b")

# floats agree when each statistic differs by at most RTOL x their absolute sum (plus ATOL):
# the same computation on another CPU rounds differently in the last bits, and a few Adam
# steps turn that into differences of about 1e-6 relative; a changed computation does not
RTOL, ATOL = 1e-3, 1e-6


class Fingerprint:
    """What is compared of one output: the exact *skeleton* (the text with every float literal
    replaced by ``#``, integer tensors, keys, shapes and dtypes) and statistics of the floats
    in order (count, sum, absolute sum, and a sum weighted by position), compared with a
    tolerance."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.floats: list[float] = []

    def text(self, data: bytes) -> None:
        self.floats += [float(m) for m in FLOAT.findall(data)]
        self.h.update(FLOAT.sub(b"#", data))

    def tensor(self, t: Any) -> None:
        import torch

        t = t.detach().cpu()
        self.h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.is_floating_point():
            self.floats += t.double().reshape(-1).tolist()
        else:
            self.h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    def result(self) -> dict[str, Any]:
        import math

        xs = self.floats
        finite = [x for x in xs if math.isfinite(x)]
        return {
            "skeleton": self.h.hexdigest()[:16],
            "floats": [
                len(xs),
                sum(finite),
                sum(abs(x) for x in finite),
                sum(x * ((i % 7) - 3) for i, x in enumerate(xs) if math.isfinite(x)),
                len(xs) - len(finite),
            ],
        }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints agree: equal skeletons and float counts, statistics within
    ``RTOL`` of the absolute sum."""
    if a["skeleton"] != b["skeleton"] or a["floats"][0] != b["floats"][0]:
        return False
    if a["floats"][4] != b["floats"][4]:  # non-finite values
        return False
    scale = max(a["floats"][2], b["floats"][2])
    pairs = zip(a["floats"][1:4], b["floats"][1:4], strict=True)
    return all(abs(x - y) <= RTOL * scale + ATOL for x, y in pairs)


def _walk(obj: Any, fp: Fingerprint, roots: list[Path]) -> None:
    """Feed a canonical walk of a loaded checkpoint (or any nested value) into ``fp``."""
    import torch

    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            fp.text(f"<{k}>".encode())
            _walk(obj[k], fp, roots)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _walk(v, fp, roots)
    elif isinstance(obj, torch.Tensor):
        fp.tensor(obj)
    elif isinstance(obj, str):
        for root in roots:
            obj = obj.replace(str(root), "<ROOT>")
        fp.text(repr(obj).encode())
    else:
        fp.text(repr(obj).encode())


def _checkpoint_contents(raw: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's entries whatever its layout: the shared format's identity and state
    merged, or an earlier layout's entries, without the layout's own ``format`` tag."""
    if "identity" in raw and "state" in raw:
        return {**raw["identity"], **raw["state"]}
    return {k: v for k, v in raw.items() if k != "format"}


def fingerprint(path: Path, roots: list[Path]) -> dict[str, Any]:
    """The :class:`Fingerprint` of one output file, after the module's normalisations."""
    fp = Fingerprint()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        _walk(tensors, fp, roots)
        return fp.result()
    if path.suffix == ".pt":
        # torch.save names the zip archive after the (temporary) file: compare the contents
        import torch

        _walk(_checkpoint_contents(torch.load(path, weights_only=True)), fp, roots)
        return fp.result()
    if path.suffix == ".parquet":
        # the file's metadata names the pandas and pyarrow versions: compare the table
        import pandas as pd

        data = pd.read_parquet(path).to_csv(index=False).encode()
    else:
        data = path.read_bytes()
    for root in roots:
        data = data.replace(str(root).encode(), b"<ROOT>")
    if path.suffix == ".json":
        data = json.dumps(_drop_volatile(json.loads(data)), sort_keys=True).encode()
    fp.text(data)
    return fp.result()


def fingerprints(folder: Path, roots: list[Path]) -> dict[str, dict[str, Any]]:
    """:func:`fingerprint` of every file under ``folder``, keyed by relative path."""
    return {
        str(p.relative_to(folder)): fingerprint(p, roots)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def command_runs(models: dict[str, Path], text: Path, root: Path) -> dict[str, list[str]]:
    """Arguments of one small run per command (and per mode), in run order, keyed by folder."""
    gpt2, llama = str(models["gpt2"]), str(models["llama"])
    src = ["--source", str(text), "--split", "valid"]
    mix = split("--context-size 16 --bos-frac 0.5 --random-offset")
    qk = split(
        "--d-hidden 24 --batch-contexts 4 --checkpoint-every 4 --resample-every-tokens 256 "
        "--dead-window-tokens 128 --no-progress"
    )
    tiny = str(root / "train-qk-stream")
    runs = {
        "collect": ["collect", "--model", gpt2, *src, *mix, *split(
            "--seed 1 --layers 0,1 --max-tokens 512 --shard-tokens 128 --no-progress")],
        "train-qk-acts": ["train-qk", "--model", gpt2, "--acts", str(root / "collect"), *mix,
                          *qk, *split("--layers 0,1 --max-tokens 384 --seed 1")],
        "train-qk-stream": ["train-qk", "--model", llama, *src, *mix, *qk, *split(
            "--layer 1 --short-frac 0.25 --short-size 8 --max-tokens 1024 --seed 3")],
        "eval-qk": ["eval-qk", "--model", llama, "--transcoder", tiny, "--source", str(text),
                    "--split", "test", *split("--context-size 16 --max-contexts 8 "
                    "--batch-contexts 4 --ioi-prompts 4 --no-progress")],
        "train-gated": ["train-gated", "--model", llama, *src, "--eval-source", str(text),
                        *split("--layer 1 --eval-split test --context-size 32 --max-tokens 512 "
                        "--max-eval-tokens 128 --epochs 2 --batch-contexts 4 --n-ioi 4")],
        "trace-ioi": ["trace-ioi", "--model", gpt2, *split(
            "--n-prompts 6 --heldout-prompts 4 --pattern-thresh 0.2 --no-plots")],
        "toy": split("toy --settings 2H/3ST --seeds 0 --epochs 1 --n-train 2000 --n-check 2000 "
                     "--toy-max-epochs 2 --no-plots --no-progress"),
    }  # fmt: skip
    return {name: [*args, "--out", str(root / name)] for name, args in runs.items()}


def run_all(
    main: Callable[[list[str]], int], models: dict[str, Path], text: Path, root: Path
) -> dict[str, dict[str, Any]]:
    """Run every command once into ``root`` and return the fingerprints of each run's folder."""
    out: dict[str, dict[str, str]] = {}
    roots = [root, text, *{p.parent for p in models.values()}]
    for name, args in command_runs(models, text, root).items():
        status = main(args)
        assert status == 0, f"{name} exited with {status}"
        out[name] = fingerprints(root / name, roots)
    return out


def pair_mask_fingerprints(
    model_folder: Path, transcoder: Path, text: Path
) -> dict[str, dict[str, Any]]:
    """Fingerprints of a small pair-mask run (the Python API; no command trains the mask)."""
    from tl_superposition.models import load_model
    from tl_superposition.qk import ModelSource, QKTranscoder
    from tl_superposition.qk.pairs import PairMaskConfig, train_pair_mask

    model = load_model(str(model_folder))
    qkt = QKTranscoder.load(transcoder)
    src = ModelSource(model, str(text), qkt.shape, context_size=16, split="valid")
    cfg = PairMaskConfig(steps=6, batch_contexts=2, max_active=4, mu=1e-3, lr=0.1)
    res = train_pair_mask(qkt, model, src, [0, 3], cfg, progress=False)
    parts = {
        "mask": res.mask.state_dict(),
        "history": res.history.to_csv(index=False),
        "pairs": res.pairs.to_csv(index=False),
        "seen": res.seen,
    }
    out = {}
    for name, obj in parts.items():
        fp = Fingerprint()
        _walk(obj, fp, [])
        out[name] = fp.result()
    return out
