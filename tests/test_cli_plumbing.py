"""What every verb shares: flag parsing (no stray positional arguments), gin parsing (bad
files / bindings are usage errors naming them) and where the gin configs are found, also
from an installed wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from max_deeplab.__main__ import VERBS, main
from max_deeplab.gin_config import CONFIGS_DIR, GinConfigError, parse_config

REPO = Path(__file__).resolve().parent.parent


def _exit_code(argv: list[str]) -> int:
    """A verb's exit code, whether it returns it or raises SystemExit (absl usage errors)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --- stray positional arguments -------------------------------------------------------------

@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_rejects_a_stray_positional_argument(verb, capsys):
    # `analyze` takes one word, the analysis, before its flags.
    analysis = ["slots"] if verb == "analyze" else []
    assert _exit_code(["max-deeplab", verb, *analysis, "stray.jpg"]) == 2
    err = capsys.readouterr().err
    assert "stray.jpg" in err
    if verb != "pq":  # pq's argparse words it its own way
        assert "unexpected positional argument(s): 'stray.jpg'" in err
        assert "quote globs" in err


def test_unquoted_image_glob_is_rejected_before_predicting(tmp_path, capsys):
    # What the shell makes of `--images val/*.jpg` with two images.
    images = [tmp_path / "val" / name for name in ("a.jpg", "b.jpg")]
    out = tmp_path / "predictions"
    code = _exit_code(["max-deeplab", "predict", "--saved_model", str(tmp_path / "export"),
                       "--images", str(images[0]), str(images[1]), "--output_dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"'{images[1]}'" in err and "--images 'dir/*.jpg'" in err
    assert not out.exists()


def test_second_gin_file_without_its_flag_is_rejected(capsys):
    assert _exit_code(["max-deeplab", "summary", "--gin_file", "tiny.gin",
                       "quickstart.gin"]) == 2
    err = capsys.readouterr().err
    assert "'quickstart.gin'" in err and "--gin_file a.gin --gin_file b.gin" in err


def test_stray_argument_from_the_console_exits_2_without_traceback(tmp_path):
    out = tmp_path / "synthetic"
    proc = subprocess.run([sys.executable, "-m", "max_deeplab", "synthetic", "extra",
                           "--output_dir", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "'extra'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# --- invalid gin ----------------------------------------------------------------------------

def test_gin_file_that_does_not_parse_is_a_usage_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("MaXDeepLab.num_classes = \n")
    assert _exit_code(["max-deeplab", "summary", "--gin_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"invalid gin file {bad}" in err
    assert "Unable to parse value" in err and "line 1" in err


def test_gin_file_including_a_missing_file_names_both(tmp_path, capsys):
    including = tmp_path / "including.gin"
    including.write_text('include "no_such_config.gin"\n')
    assert _exit_code(["max-deeplab", "summary", "--gin_file", str(including)]) == 2
    err = capsys.readouterr().err
    assert f"invalid gin file {including}" in err and "no_such_config.gin" in err


@pytest.mark.parametrize("binding, gin_message", [
    ("garbage garbage", "Couldn't parse statement, expected ':' or '='"),
    ("MaXDeepLab.num_classes = (", "EOF in multi-line statement"),
    ("NoSuchConfigurable.value = 1", "No configurable matching 'NoSuchConfigurable'"),
])
def test_gin_binding_that_does_not_parse_is_a_usage_error_naming_it(binding, gin_message,
                                                                    capsys):
    assert _exit_code(["max-deeplab", "summary", "--gin_file", "tiny.gin",
                       "--gin_bindings", binding]) == 2
    err = capsys.readouterr().err
    assert f"invalid --gin_bindings value {binding!r}" in err and gin_message in err


def test_wrongly_typed_binding_is_reported_before_the_model_is_built(capsys):
    assert _exit_code(["max-deeplab", "summary", "--gin_file", "tiny.gin",
                       "--gin_bindings", 'MaXDeepLab.num_classes = "abc"']) == 2
    err = capsys.readouterr().err
    assert "MaXDeepLab.num_classes = 'abc' (str): expected int" in err


def test_train_with_a_bad_binding_writes_nothing(tmp_path, capsys):
    model_dir = tmp_path / "run"
    code = _exit_code(["max-deeplab", "train", "--mode", "train", "--model_dir", str(model_dir),
                       "--train_data", str(tmp_path / "train-*"), "--gin_file", "tiny.gin",
                       "--gin_bindings", "garbage garbage"])
    assert code == 2
    assert "invalid --gin_bindings value 'garbage garbage'" in capsys.readouterr().err
    assert not model_dir.exists()


def test_resuming_from_a_broken_saved_config_names_it_and_leaves_the_run_alone(tmp_path,
                                                                             capsys):
    # `evaluate` and `export` read a run's saved config.gin the same way (--gin_file).
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    saved = model_dir / "config.gin"
    saved_text = "MaXDeepLab.num_classes = 3\nexperiment_options.total_steps = = 2\n"
    saved.write_text(saved_text)
    code = _exit_code(["max-deeplab", "train", "--mode", "train", "--model_dir", str(model_dir),
                       "--train_data", str(tmp_path / "train-*"), "--gin_file", str(saved)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"invalid gin file {saved}" in err and "line 2" in err
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.gin"]
    assert saved.read_text() == saved_text


@pytest.mark.parametrize("binding, expected", [
    ("experiment_options.jit_compile = 'False'",
     "experiment_options.jit_compile = 'False' (str): expected bool"),
    ("train/MaXDeepLab.num_classes = 2.5", "train/MaXDeepLab.num_classes = 2.5 (float): "
     "expected int"),
    ("experiment_options.mixed_precision = 16", "= 16 (int): expected str or None"),
])
def test_type_check_names_the_binding_and_the_expected_type(binding, expected):
    with pytest.raises(GinConfigError, match="gin binding") as e:
        parse_config(["tiny.gin"], [binding])
    assert expected in str(e.value)


def test_type_check_accepts_what_the_annotations_allow():
    parse_config(["tiny.gin"], [
        "experiment_options.mixed_precision = 'bfloat16'",  # quoted str
        "experiment_options.eval_interval = None",  # int | None
        "MaXDeepLabLoss.pq_alpha = 1",  # an int for a float
        "build_model.input_size = (65, 65)",  # a tuple annotation: not checked
    ])


# --- where the configs are found ------------------------------------------------------------

def test_configs_are_found_in_the_source_tree():
    assert Path(CONFIGS_DIR) == REPO / "configs"


@pytest.mark.slow
def test_wheel_carries_the_configs_and_finds_them_when_installed(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        "quickstart_output", "runs"))
    # No build isolation: builds with the installed setuptools, without the network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True, text=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("max_deeplab-*.whl")
    configs = sorted(str(p.relative_to(REPO / "configs"))
                     for p in (REPO / "configs").rglob("*.gin"))
    with zipfile.ZipFile(wheel) as archive:
        packaged = sorted(n[len("max_deeplab/configs/"):] for n in archive.namelist()
                          if n.startswith("max_deeplab/configs/") and n.endswith(".gin"))
        assert packaged == configs
        site = tmp_path / "site"
        archive.extractall(site)
    # The unpacked wheel first on the path, run from elsewhere, so the source tree (and the
    # editable install's finder, which comes after the path) are not what it finds.
    check = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import max_deeplab.configs
        from max_deeplab import gin_config
        assert gin_config.__file__.startswith(sys.argv[1]), gin_config.__file__
        assert max_deeplab.configs.__file__.startswith(sys.argv[1])
        print(gin_config.CONFIGS_DIR)
        print(gin_config.resolve_gin_file("tiny.gin"))
        max_deeplab.configs.load("ablations/no_p2m.gin")  # `include`s baseline.gin
        print("parsed")
    """)
    proc = subprocess.run([sys.executable, "-c", check, str(site)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    installed_configs = site / "max_deeplab" / "configs"
    assert lines[-3:] == [str(installed_configs), str(installed_configs / "tiny.gin"), "parsed"]
