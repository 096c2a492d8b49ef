#!/usr/bin/env bash
# Runs the test suite. On a fresh machine (only Python) it creates .venv in the repo root,
# installs the project with its dev extra, and .venv-reference with the COCO reference
# evaluator (the parity tests call it there), then runs pytest. Extra arguments go to pytest
# (e.g. `scripts/test.sh -m slow` for the slow tests, `scripts/test.sh tests/test_matching.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh
source scripts/ensure_reference_venv.sh
exec .venv/bin/python -m pytest "$@"
