"""The COCO reference panoptic evaluator (panopticapi), run in its own environment.

panopticapi-lite pins numpy<2 and this project runs on numpy 2, so the reference is installed
in `.venv-reference` (scripts/ensure_reference_venv.sh, which scripts/test.sh runs) and called
in a subprocess; its numbers come back as JSON, which round-trips floats exactly.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PYTHON_VARIABLE = "MAX_DEEPLAB_REFERENCE_PYTHON"

# The reference's own per-image code (pq_compute_single_core) and averaging (pq_average), as
# its pq_compute runs them, without the process pool.
_RUN_REFERENCE = """
import json, sys
from panopticapi.evaluation import PQStat, pq_compute_single_core
gt_json, gt_dir, pred_json, pred_dir = sys.argv[1:5]
with open(gt_json) as f:
    gt = json.load(f)
with open(pred_json) as f:
    pred = json.load(f)
categories = {c["id"]: c for c in gt["categories"]}
by_id = {a["image_id"]: a for a in pred["annotations"]}
pairs = [(a, by_id[a["image_id"]]) for a in gt["annotations"]]
stat = pq_compute_single_core(0, pairs, gt_dir, pred_dir, categories)
assert isinstance(stat, PQStat)
out = {}
for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    out[name], per_class = stat.pq_average(categories, isthing=isthing)
    if name == "All":
        out["per_class"] = per_class
sys.stdout.write("\\nRESULT " + json.dumps(out))
"""


def reference_python() -> str:
    """The reference environment's interpreter; fails the test with how to make it if absent."""
    path = os.environ.get(REFERENCE_PYTHON_VARIABLE) or os.path.join(
        REPO, ".venv-reference", "bin", "python")
    if not os.access(path, os.X_OK):
        pytest.fail(f"the COCO reference evaluator's environment is missing ({path}): run the "
                    "tests with scripts/test.sh, or create it with "
                    "`bash scripts/ensure_reference_venv.sh`")
    return path


def reference_pq(paths: dict) -> dict:
    """PQ / SQ / RQ (All, Things, Stuff, per class) of the reference evaluator on a COCO
    panoptic set: `paths` has gt_json, gt_dir, pred_json, pred_dir. Per-class keys are ints."""
    proc = subprocess.run(
        [reference_python(), "-c", _RUN_REFERENCE, paths["gt_json"], paths["gt_dir"],
         paths["pred_json"], paths["pred_dir"]],
        capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"the reference evaluator failed ({proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
    # The reference prints progress; the result is the last line.
    marker = proc.stdout.rfind("\nRESULT ")
    assert marker >= 0, f"no result from the reference evaluator:\n{proc.stdout[-3000:]}"
    out = json.loads(proc.stdout[marker + len("\nRESULT "):])
    out["per_class"] = {int(c): v for c, v in out["per_class"].items()}
    return out
