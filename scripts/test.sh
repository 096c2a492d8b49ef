#!/usr/bin/env bash
# Runs the test suite. On a fresh machine (only Python) it creates .venv in the repo root,
# installs the project with its dev extra, and .venv-reference with the COCO reference
# evaluator (the parity tests call it there), then runs pytest.
#   scripts/test.sh            the quick suite (slow tests excluded), for contributors
#   scripts/test.sh --full     every test, slow ones included: what CI (.ci/run) runs
#   scripts/test.sh -m slow    the slow tests only
# Other arguments go to pytest (e.g. `scripts/test.sh tests/test_matching.py -q`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh
source scripts/ensure_reference_venv.sh
args=()
for arg in "$@"; do
  if [ "$arg" = "--full" ]; then
    args+=(-m "slow or not slow")
  else
    args+=("$arg")
  fi
done
exec .venv/bin/python -m pytest ${args[@]+"${args[@]}"}
