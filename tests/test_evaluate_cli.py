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
    from max_deeplab.training import task

    def run(settings, options, print_fn=print):
        raise AssertionError("the run was started")

    monkeypatch.setattr(task, "run", run)
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
    with pytest.raises(SystemExit) as exit_info:
        main(["max-deeplab", "evaluate", "--model_dir", str(model_dir), *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"Unknown command line flag '{flag[0][2:]}'" in err


def test_evaluation_settings_reach_the_task(tmp_path, monkeypatch):
    import gin

    from max_deeplab.training import task

    seen = []
    monkeypatch.setattr(task, "run", lambda settings, options, print_fn=print:
                        seen.append((settings, options, gin.config_str())))
    model_dir = _model_dir(tmp_path, json.dumps({"eval_data": "d/val-*"}))
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir), "--jit_compile",
                 "--mixed_precision", "bfloat16", "--strategy", "one_device",
                 "--gin_bindings", "MaXDeepLab.num_classes = 3"]) == 0
    settings, options, config = seen[0]
    assert (settings.mode, settings.model_dir, settings.eval_data) == (
        "eval", str(model_dir), "d/val-*")
    assert settings.strategy_name == "one_device"
    assert settings.gin_files == [str(model_dir / "config.gin")]
    assert options["jit_compile"] is True and options["mixed_precision"] == "bfloat16"
    assert "MaXDeepLab.num_classes = 3" in config
    assert main(["max-deeplab", "evaluate", "--model_dir", str(model_dir),
                 "--nojit_compile"]) == 0
    settings, options, _ = seen[1]
    assert options["jit_compile"] is False and options["mixed_precision"] is None
