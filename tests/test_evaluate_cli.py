"""`max-deeplab evaluate` argument handling: it needs the model's config, eval data and a
checkpoint, and takes only the flags that apply to evaluation."""
from __future__ import annotations

import json
import os

import pytest

from max_deeplab.__main__ import main


def test_evaluate_needs_a_model_dir(capsys):
    assert main(["max-deeplab", "evaluate"]) == 2
    assert "--model_dir is required" in capsys.readouterr().err


def test_evaluate_without_saved_config_names_the_missing_file(tmp_path, capsys):
    assert main(["max-deeplab", "evaluate", "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "config.gin") in err and "--gin_file" in err


def test_evaluate_without_eval_data_says_so(tmp_path, capsys):
    (tmp_path / "config.gin").write_text("")
    (tmp_path / "run.json").write_text(json.dumps({"train_data": "x", "eval_data": None}))
    assert main(["max-deeplab", "evaluate", "--model_dir", str(tmp_path)]) == 2
    assert "--eval_data" in capsys.readouterr().err


def _model_dir(tmp_path, run_json: str, with_checkpoint: bool = True):
    """A `train` model directory: config.gin, the given run.json, a checkpoint."""
    import tensorflow as tf

    (tmp_path / "config.gin").write_text("")
    (tmp_path / "run.json").write_text(run_json)
    if with_checkpoint:
        tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(tmp_path / "ckpt"))
    return tmp_path


@pytest.mark.parametrize("run_json, expected", [
    ('{"eval', "cannot read the run config"),
    ("[]", "holds a JSON list"),
    ('{"eval_data": 3}', "'eval_data' must be a file glob"),
])
def test_malformed_run_json_is_named(tmp_path, capsys, run_json, expected):
    model_dir = _model_dir(tmp_path, run_json, with_checkpoint=False)
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert str(model_dir / "run.json") in err and expected in err


def test_no_checkpoint_stops_before_anything_is_built_or_written(tmp_path, capsys,
                                                                 monkeypatch):
    from max_deeplab.cli import train

    def run_train(argv):
        raise AssertionError("train was started")

    monkeypatch.setattr(train, "main", run_train)
    model_dir = _model_dir(tmp_path, json.dumps({"eval_data": "d/val-*"}),
                           with_checkpoint=False)
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir)]) == 2
    assert f"no checkpoint to evaluate in {model_dir}" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir)) == ["config.gin", "run.json"]


@pytest.mark.parametrize("flag", [["--steps", "3"], ["--mode", "train"],
                                  ["--train_data", "d/train-*"], ["--checkpoint_every", "5"],
                                  ["--initial_checkpoint", "c/ckpt-1"]])
def test_training_flags_are_rejected(tmp_path, capsys, flag):
    model_dir = _model_dir(tmp_path, json.dumps({"eval_data": "d/val-*"}))
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir), *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} does not apply to evaluate" in err


def test_eval_step_flags_are_passed_to_train(tmp_path, monkeypatch):
    from max_deeplab.cli import train

    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 0)
    model_dir = _model_dir(tmp_path, json.dumps({"eval_data": "d/val-*"}))
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir), "--jit_compile",
                 "--mixed_precision", "bfloat16", "--strategy", "one_device",
                 "--gin_bindings", "a.b = 1"]) == 0
    argv = seen[0]
    assert argv[1:7] == ["--mode", "eval", "--model_dir", str(model_dir), "--eval_data",
                         "d/val-*"]
    for expected in ("--jit_compile", "--mixed_precision=bfloat16", "--strategy=one_device"):
        assert expected in argv
    assert ["--gin_file", str(model_dir / "config.gin")] == argv[-4:-2]
    assert ["--gin_bindings", "a.b = 1"] == argv[-2:]
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir),
                 "--nojit_compile"]) == 0
    assert "--nojit_compile" in seen[1] and "--mixed_precision=bfloat16" not in seen[1]
