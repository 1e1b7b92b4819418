#!/usr/bin/env bash
# The project's test command (what `.ci/run` runs): set up what the tests need
# (scripts/setup.sh), check lint, formatting and types, then run the whole suite: the fast
# tests on tiny random models and the tests marked `slow` (the real SmolLM2-135M-Instruct and
# the notebooks). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bin=.venv/bin
echo "== ruff check"
"$bin/ruff" check .
echo "== ruff format --check"
"$bin/ruff" format --check .
echo "== pyright"
"$bin/pyright"  # the package, benchmarks/ and scripts/ (pyproject.toml)
echo "== pytest"
exec "$bin/python" -m pytest -m "slow or not slow" "$@"
