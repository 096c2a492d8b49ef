"""The shell scripts' argument handling (scripts/train_tpu.sh, sweep.sh, quickstart.sh), run
against a copy of the scripts whose .venv holds a stand-in `max-deeplab` that records its
arguments, working directory and standard input instead of training."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Appends one record per call to $FAKE_MD_LOG: the working directory, each argument, and
# whatever arrived on standard input (a real run must get none of the caller's input).
FAKE_MAX_DEEPLAB = """#!/usr/bin/env bash
{
  printf 'cwd=%s\\n' "$PWD"
  printf 'arg=%s\\n' "$@"
  printf 'stdin=%s\\n' "$(cat)"
  printf 'end\\n'
} >> "$FAKE_MD_LOG"
"""


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A copy of scripts/ next to a .venv that ensure_venv.sh accepts as installed."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    (repo / "setup.py").write_text("")
    os.utime(repo / "setup.py", (0, 0))  # older than the install stamp: no reinstall
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "max-deeplab").write_text(FAKE_MAX_DEEPLAB)
    (bin_dir / "max-deeplab").chmod(0o755)
    (repo / ".venv" / ".max_deeplab_installed").touch()
    return repo


def _run(fake_repo: Path, script: str, args: list[str], cwd: Path,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("TPU_NAME", "MODEL_DIR", "TRAIN_DATA", "GIN_FILE", "EVAL_DATA")}
    base_env["FAKE_MD_LOG"] = str(fake_repo / "calls.log")
    return subprocess.run(["bash", str(fake_repo / "scripts" / script), *args], cwd=cwd,
                          env={**base_env, **(env or {})}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def _calls(fake_repo: Path) -> list[dict]:
    """The recorded calls: [{'cwd': ..., 'args': [...], 'stdin': ...}, ...]."""
    log = fake_repo / "calls.log"
    if not log.exists():
        return []
    calls, current = [], None
    for line in log.read_text().splitlines():
        if line.startswith("cwd="):
            current = {"cwd": line[4:], "args": [], "stdin": ""}
        elif line.startswith("arg="):
            current["args"].append(line[4:])
        elif line.startswith("stdin="):
            current["stdin"] = line[6:]
        elif line == "end":
            calls.append(current)
    return calls


# --- train_tpu.sh ---------------------------------------------------------------------------

def test_train_tpu_positional_usage_then_train_flags(fake_repo, tmp_path):
    proc = _run(fake_repo, "train_tpu.sh",
                ["my-tpu", "gs://b/m", "gs://b/train-*", "--steps", "10"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [call] = _calls(fake_repo)
    assert call["args"] == [
        "train", "--tpu", "my-tpu", "--strategy", "tpu", "--mode", "train",
        "--model_dir", "gs://b/m", "--train_data", "gs://b/train-*",
        "--gin_file", "max_deeplab_s_coco_641.gin", "--steps", "10"]


def test_train_tpu_environment_usage_passes_every_argument_to_train(fake_repo, tmp_path):
    proc = _run(fake_repo, "train_tpu.sh", ["--steps", "10", "--checkpoint_every", "5"],
                cwd=tmp_path, env={"TPU_NAME": "t", "MODEL_DIR": "gs://b/m",
                                   "TRAIN_DATA": "x", "EVAL_DATA": "gs://b/val-*"})
    assert proc.returncode == 0, proc.stderr
    [call] = _calls(fake_repo)
    assert call["args"] == [
        "train", "--tpu", "t", "--strategy", "tpu", "--mode", "train_and_eval",
        "--model_dir", "gs://b/m", "--train_data", "x", "--eval_data", "gs://b/val-*",
        "--gin_file", "max_deeplab_s_coco_641.gin", "--steps", "10", "--checkpoint_every", "5"]


def test_train_tpu_all_positionals_run_in_the_callers_directory(fake_repo, tmp_path):
    caller = tmp_path / "caller"
    caller.mkdir()
    proc = _run(fake_repo, "train_tpu.sh",
                ["t", "gs://b/m", "gs://b/train-*", "my.gin", "gs://b/val-*", "--steps", "3"],
                cwd=caller)
    assert proc.returncode == 0, proc.stderr
    [call] = _calls(fake_repo)
    # A relative GIN_FILE (or local data path) means what it means where the user stands.
    assert call["cwd"] == str(caller)
    assert call["args"][call["args"].index("--gin_file") + 1] == "my.gin"
    assert call["args"][call["args"].index("--eval_data") + 1] == "gs://b/val-*"
    assert call["args"][-2:] == ["--steps", "3"]


def test_train_tpu_missing_settings_is_a_usage_error(fake_repo, tmp_path):
    proc = _run(fake_repo, "train_tpu.sh", ["--steps", "10"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing TPU_NAME MODEL_DIR TRAIN_DATA" in proc.stderr
    assert _calls(fake_repo) == []


# --- sweep.sh -------------------------------------------------------------------------------

def test_sweep_keeps_quotes_and_relative_paths_and_runs_every_line(fake_repo, tmp_path):
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "my.sweep").write_text(
        "# name | gin files | bindings\n"
        "\n"
        "  bf16  | tiny.gin  local.gin | experiment_options.mixed_precision = 'bfloat16' ;"
        "  MaXDeepLab.num_classes = 3  \n"
        "it's  | tiny.gin |\n"
        "globby | *.gin |\n")
    (caller / "local.gin").write_text("")
    proc = _run(fake_repo, "sweep.sh", ["my.sweep", "out", "--train_data", "data/train-*"],
                cwd=caller)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(fake_repo)
    assert [c["args"][c["args"].index("--model_dir") + 1] for c in calls] == [
        "out/bf16", "out/it's", "out/globby"]
    bf16, apostrophe, globby = (c["args"] for c in calls)
    assert bf16 == ["train", "--mode", "train_and_eval", "--model_dir", "out/bf16",
                    "--gin_file", "tiny.gin", "--gin_file", "local.gin",
                    "--gin_bindings", "experiment_options.mixed_precision = 'bfloat16'",
                    "--gin_bindings", "MaXDeepLab.num_classes = 3",
                    "--train_data", "data/train-*"]
    assert "--gin_bindings" not in apostrophe
    # A gin file name is passed as written, not expanded against the directory.
    assert globby[globby.index("--gin_file") + 1] == "*.gin"
    for call in calls:
        assert call["cwd"] == str(caller)
        assert call["stdin"] == ""  # not the rest of the sweep file
    for name in ("bf16", "it's", "globby"):
        assert (caller / "out" / f"{name}.log").is_file()
    assert "(no metrics: see it's.log)" in proc.stdout


def test_sweep_missing_sweep_file_names_it(fake_repo, tmp_path):
    proc = _run(fake_repo, "sweep.sh", ["nope.sweep", "out"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "no sweep file nope.sweep" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert _calls(fake_repo) == []


def test_sweep_without_arguments_prints_its_usage(fake_repo, tmp_path):
    proc = _run(fake_repo, "sweep.sh", [], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Usage: scripts/sweep.sh SWEEP_FILE OUTPUT_DIR" in proc.stderr
    assert "set -uo" not in proc.stderr


# --- quickstart.sh --------------------------------------------------------------------------

def test_quickstart_output_dir_is_relative_to_the_caller(fake_repo, tmp_path):
    caller = tmp_path / "caller"
    metrics = caller / "qs" / "model" / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True)  # what the stand-in `evaluate` does not write
    metrics.write_text(json.dumps({"All": {"pq": 0.5, "sq": 0.8, "rq": 0.625}}))
    proc = _run(fake_repo, "quickstart.sh", ["qs"], cwd=caller)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(fake_repo)
    assert [c["args"][0] for c in calls] == [
        "synthetic", "convert", "convert", "train", "evaluate", "export", "predict"]
    assert all(c["cwd"] == str(caller) for c in calls)
    assert calls[0]["args"][calls[0]["args"].index("--output_dir") + 1] == "qs/data"
    assert "PQ on the synthetic validation split: 50.0" in proc.stdout
    assert not (fake_repo / "qs").exists()
