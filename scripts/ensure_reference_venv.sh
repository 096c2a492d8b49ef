# Sourced by scripts/test.sh, or run from anywhere (`bash scripts/ensure_reference_venv.sh`):
# the COCO reference panoptic evaluator (panopticapi, from PyPI as panopticapi-lite) in its
# own virtual environment, .venv-reference, for the parity tests and benchmarks/bench_pq.py.
# It has its own environment because panopticapi-lite pins numpy<2 while this project is
# installed, tested and used with numpy 2; it is a test-time tool, never imported by the
# package. Exports MAX_DEEPLAB_REFERENCE_PYTHON, the interpreter the tests call it with.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced: work in the repository root
  set -euo pipefail
  cd "$(dirname "$0")/.."
fi
PYTHON=${PYTHON:-python3}
REFERENCE_PACKAGE=panopticapi-lite==0.2.0
ref_stamp=.venv-reference/.installed
if [ ! -f "$ref_stamp" ] || [ "$(cat "$ref_stamp")" != "$REFERENCE_PACKAGE" ]; then
  echo "[setup] installing the COCO reference evaluator ($REFERENCE_PACKAGE) into .venv-reference" >&2
  [ -x .venv-reference/bin/python ] || "$PYTHON" -m venv .venv-reference
  .venv-reference/bin/python -m pip install --quiet --disable-pip-version-check \
    "$REFERENCE_PACKAGE" >&2
  echo "$REFERENCE_PACKAGE" > "$ref_stamp"
fi
MAX_DEEPLAB_REFERENCE_PYTHON="$(pwd)/.venv-reference/bin/python"
export MAX_DEEPLAB_REFERENCE_PYTHON
