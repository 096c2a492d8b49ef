"""scripts/sweep.sh end to end: runs each line of a sweep file as its own training run and
prints one PQ table; a failing run is reported and the sweep goes on (slow: trains twice)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _md(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "max_deeplab", *args], cwd=REPO, check=True,
                   capture_output=True, text=True)


@pytest.mark.slow
def test_sweep_runs_each_line_and_prints_one_table(tmp_path):
    data, records = tmp_path / "data", tmp_path / "records"
    _md("synthetic", "--output_dir", str(data), "--num_images", "10", "--num_val_images", "2",
        "--seed", "3")
    for split in ("train", "val"):
        _md("convert", "--annotations", str(data / "annotations" / f"panoptic_{split}.json"),
            "--images", str(data / split), "--panoptic", str(data / f"panoptic_{split}"),
            "--output", str(records / split), "--num_shards", "1")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# name | gin files | bindings\n"
        "\n"
        "base    | quickstart.gin | experiment_options.train_batch_size = 2\n"
        "no_p2m  | quickstart.gin | experiment_options.train_batch_size = 2; "
        "DualPathTransformerBlock.use_pixel2memory_feedback_attention = False\n"
        "broken  | quickstart.gin | NoSuchConfigurable.value = 1\n")
    out = tmp_path / "sweep_out"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        ["bash", "scripts/sweep.sh", str(sweep), str(out), "--train_data",
         str(records / "train-*"), "--eval_data", str(records / "val-*"), "--steps", "2",
         "--strategy", "one_device"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any("[broken]" in line for line in lines)
    assert any("FAILED" in line and "broken.log" in line for line in lines)
    table = lines[lines.index(next(x for x in lines if x.startswith("run "))):]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:] if line.strip()}
    assert set(rows) == {"base", "no_p2m", "broken"}
    for name in ("base", "no_p2m"):
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert float(rows[name][0]) == pytest.approx(100 * metrics["All"]["pq"], abs=0.051)
        config = (out / name / "config.gin").read_text()
        # Each run got its own bindings.
        assert ("use_pixel2memory_feedback_attention = False" in config) == (name == "no_p2m")
    assert rows["broken"][0].startswith("(no")
    assert "NoSuchConfigurable" in (out / "broken.log").read_text()
