#!/usr/bin/env bash
# Set up what the tests need (scripts/setup.sh), then run the whole suite: the fast unit tests
# on tiny random models and the tests marked `slow` on the real SmolLM2-135M-Instruct.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "slow or not slow" "$@"
