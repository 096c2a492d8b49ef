"""Output a person reads (issue 22): TensorFlow's start-up log lines hidden unless --verbose,
--version, usage examples printed as they are typed."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from max_deeplab import __version__
from max_deeplab.__main__ import VERBS, main

# A line of TensorFlow's C++ logging: "2026-12-06 19:42:19.571306: I external/...cc:31] ...".
TF_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\]", re.M)


def test_version(capsys):
    assert main(["max-deeplab", "--version"]) == 0
    assert capsys.readouterr().out == f"max-deeplab {__version__}\n"
    assert main(["max-deeplab", "--help"]) == 0
    assert "max-deeplab --version" in capsys.readouterr().out


def _evaluate_without_a_checkpoint(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """A verb run that imports TensorFlow and stops with a user error."""
    (tmp_path / "config.gin").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "max_deeplab", "evaluate", "--model_dir",
                           str(tmp_path), "--eval_data", "x-*", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path):
    quiet = _evaluate_without_a_checkpoint(tmp_path)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        f"max-deeplab evaluate: no checkpoint to evaluate in {tmp_path} (no 'checkpoint' file "
        "naming one; `train` writes them there)"]
    verbose = _evaluate_without_a_checkpoint(tmp_path, "--verbose")
    assert verbose.returncode == 2
    assert TF_LOG_LINE.search(verbose.stderr), verbose.stderr


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_takes_verbose(verb, capsys):
    code = main(["max-deeplab", verb, "--verbose", "--help"])
    assert code == 0, capsys.readouterr().err
    assert re.search(r"--(\[no\])?verbose", capsys.readouterr().out)


def test_convert_help_shows_its_example_as_typed(capsys):
    assert main(["max-deeplab", "convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert ("--annotations annotations/panoptic_train2017.json \\\n"
            "        --images train2017/") in out
