"""`max-deeplab evaluate` argument handling: it needs the model's config and eval data."""
from __future__ import annotations

import json

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
