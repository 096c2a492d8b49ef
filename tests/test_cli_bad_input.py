"""Bad input to the `train`, `pretrain`, `convert`, `synthetic`, `predict` and
`import-checkpoint` verbs: a clear message naming the flag / file / binding and the expected
value, exit code 2 for flag and input errors, no traceback, and nothing left behind."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.cli import convert as convert_cli
from max_deeplab.cli import import_checkpoint as import_cli
from max_deeplab.cli import predict as predict_cli
from max_deeplab.cli import pretrain as pretrain_cli
from max_deeplab.cli import synthetic as synthetic_cli
from max_deeplab.cli import train as train_cli
from max_deeplab.data import synthetic as synthetic_lib
from max_deeplab.training import run_directory, task


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
    """A 2-image synthetic data set converted to TFRecords; returns the shard glob."""
    root = tmp_path_factory.mktemp("records")
    synthetic_lib.write_dataset(str(root / "coco"), 2, seed=0, height=32, width=40,
                                num_val_images=0)
    prefix = str(root / "tf" / "train")
    assert convert_cli.main(["max-deeplab convert", "--annotations",
                             str(root / "coco" / "annotations" / "panoptic_train.json"),
                             "--images", str(root / "coco" / "train"), "--panoptic",
                             str(root / "coco" / "panoptic_train"), "--output", prefix,
                             "--num_shards", "1", "--num_workers", "1"]) == 0
    return prefix + "-*"


def _flag_exit_code(main, argv: list[str]) -> int:
    """The exit code of a verb whose flag parsing exits (absl flag errors)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


# ----------------------------------------------------------------- train: config (defect 1)


def test_tiny_config_keeps_k_max_within_its_mask_slots():
    from max_deeplab.data.pipeline import build_dataset
    from max_deeplab.gin_config import configured_value, parse_config

    parse_config(["tiny.gin"], [])
    assert configured_value("build_dataset", build_dataset, "k_max") == 16
    run_directory.check_segments_fit_mask_slots()  # no error


def test_k_max_above_mask_slots_is_reported_before_the_model_is_built(tmp_path, records,
                                                                      capsys):
    model_dir = tmp_path / "run"
    started = time.perf_counter()
    code = train_cli.main(["max-deeplab train", "--model_dir", str(model_dir),
                           "--gin_file", "tiny.gin", "--train_data", records,
                           "--gin_bindings", "build_dataset.k_max = 128",
                           "--gin_bindings", "build_learning_rate_schedule.warmup_steps = 0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "build_dataset.k_max = 128" in err and "build_dataset.k_max = 16" in err
    assert "MaXDeepLabEncoder.num_mask_slots" in err
    assert "in user code" not in err and "Traceback" not in err
    assert not model_dir.exists()
    assert time.perf_counter() - started < 10  # no model build, no tracing


def test_loss_names_the_k_max_binding():
    from max_deeplab.losses import MaXDeepLabLoss

    b, h, w, n, k, c = 1, 4, 4, 2, 3, 2
    outputs = {"mask_logits": tf.zeros([b, h, w, n]), "class_logits": tf.zeros([b, n, c + 1]),
               "pixel_feature": tf.zeros([b, h, w, 4]),
               "semantic_logits": tf.zeros([b, h, w, c])}
    targets = {"segment_ids": tf.zeros([b, h, w], tf.int32),
               "segment_classes": tf.zeros([b, k], tf.int32),
               "segment_valid": tf.ones([b, k], tf.bool),
               "segment_is_thing": tf.ones([b, k], tf.bool),
               "semantic": tf.zeros([b, h, w], tf.int32)}
    with pytest.raises(ValueError, match=r"K_max = 3 .* N = 2 .*build_dataset\.k_max = 2"):
        MaXDeepLabLoss(matching_backend="scipy")(outputs, targets)


def test_train_help_example_passes_every_check(tmp_path, records, monkeypatch, capsys):
    """The first example of `train --help`, as printed (data paths swapped for real ones),
    gets through flag, config and data checks; the run itself is stubbed out."""
    doc = train_cli.__doc__
    start = doc.index("max-deeplab train", doc.index("Examples:"))
    example = doc[start:doc.index("\n    (", start)]
    argv = shlex.split(example.replace("\\\n", " "))
    assert argv[:2] == ["max-deeplab", "train"]
    argv = [arg.replace("d/train-*", records).replace("d/val-*", records)
            .replace("/tmp/run", str(tmp_path / "run")) for arg in argv]
    runs = []
    monkeypatch.setattr(task, "run_mode",
                        lambda settings, options, print_fn=print: runs.append(options))
    assert train_cli.main(["max-deeplab train", *argv[2:]]) == 0, capsys.readouterr().err
    assert runs and runs[0]["total_steps"] == 200 and runs[0]["checkpoint_every"] == 50


# ------------------------------------------------------------ train: flags (defect 4)


def test_model_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    for model_dir, expected in ((a_file, "is a file"),
                                (a_file / "run", f"{a_file} is a file")):
        code = train_cli.main(["max-deeplab train", "--model_dir", str(model_dir),
                               "--train_data", "unused-*"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"--model_dir {model_dir}" in err and expected in err
        assert "Traceback" not in err
    assert a_file.read_text() == ""


def test_failed_start_writes_nothing_into_a_new_model_dir(tmp_path, records, capsys):
    model_dir = tmp_path / "run"
    base = ["max-deeplab train", "--model_dir", str(model_dir), "--gin_file", "tiny.gin"]
    # --mode train without --train_data.
    assert train_cli.main([*base, "--mode", "train", "--eval_data", records]) == 2
    assert "--mode=train needs --train_data" in capsys.readouterr().err
    assert not model_dir.exists()
    # tiny.gin's 5000 warmup steps do not fit in 10 steps.
    assert train_cli.main([*base, "--train_data", records, "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "warmup_steps must be in [0, total_steps=10)" in err
    assert "build_learning_rate_schedule.warmup_steps" in err
    assert not model_dir.exists()


@pytest.mark.parametrize("flag", ["--steps=-1", "--steps=0", "--checkpoint_every=0"])
def test_step_flags_need_a_positive_value(flag, tmp_path, capsys):
    code = _flag_exit_code(train_cli.main, ["max-deeplab train", "--model_dir",
                                            str(tmp_path / "run"), flag])
    err = capsys.readouterr().err
    assert code == 2
    assert flag.split("=")[0] in err and "not a positive integer" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- pretrain (defect 5)


@pytest.mark.parametrize("flag, name", [("--mode=bogus", "--mode"),
                                        ("--strategy=gpu", "--strategy"),
                                        ("--steps=0", "--steps")])
def test_pretrain_rejects_bad_flag_values_at_once(flag, name, tmp_path):
    # A process of its own: in this one `train`'s definitions of the shared flags may be
    # the ones in force (absl keeps the last imported).
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "max_deeplab", "pretrain", "--model_dir",
                             str(tmp_path / "run"), flag], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"flag {flag}" in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 10  # before TensorFlow or a strategy is set up
    assert not (tmp_path / "run").exists()


def test_pretrain_rejects_train_only_mode(tmp_path, capsys):
    code = _flag_exit_code(pretrain_cli.main, ["max-deeplab pretrain", "--model_dir",
                                               str(tmp_path / "run"), "--mode",
                                               "continuous_eval"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--mode=continuous_eval" in err and "<train|eval|train_and_eval>" in err
    assert not (tmp_path / "run").exists()


def test_train_and_pretrain_each_take_their_own_flags(tmp_path, capsys):
    """Each verb has its own flag table: the values each accepts are what its runner
    supports, whichever verb was imported last, and one verb's flags are not another's."""
    from max_deeplab.training import experiment, modes

    assert tuple(train_cli.FLAGS["mode"].parser.enum_values) == experiment.MODES
    assert tuple(train_cli.FLAGS["strategy"].parser.enum_values) == experiment.STRATEGIES
    assert tuple(pretrain_cli.FLAGS["mode"].parser.enum_values) == modes.PRETRAIN_MODES
    assert "num_gpus" in pretrain_cli.FLAGS and "num_gpus" not in train_cli.FLAGS
    assert "train_data" in train_cli.FLAGS and "train_data" not in pretrain_cli.FLAGS
    code = _flag_exit_code(pretrain_cli.main, ["max-deeplab pretrain", "--model_dir",
                                               str(tmp_path / "run"), "--train_data", "x-*"])
    assert code == 2 and "train_data" in capsys.readouterr().err
    # train's continuous_eval passes flag parsing (it then needs --eval_data).
    code = train_cli.main(["max-deeplab train", "--model_dir", str(tmp_path / "run"),
                           "--mode", "continuous_eval"])
    assert code == 2 and "--mode=continuous_eval needs --eval_data" in capsys.readouterr().err


# ----------------------------------------------------------------------- convert (defect 2)


def _synthetic(root, num_images: int = 2) -> dict[str, str]:
    synthetic_lib.write_dataset(str(root), num_images, seed=0, height=32, width=40,
                                num_val_images=0)
    return {"annotations": str(root / "annotations" / "panoptic_train.json"),
            "images": str(root / "train"), "panoptic": str(root / "panoptic_train")}


def _convert(paths: dict[str, str], output: str) -> int:
    return convert_cli.main(["max-deeplab convert", *(f"--{k}={v}" for k, v in paths.items()),
                             f"--output={output}", "--num_workers=1"])


def test_convert_rejects_a_directory_as_prefix(tmp_path, capsys):
    paths = _synthetic(tmp_path / "coco")
    output = str(tmp_path / "o13") + os.sep
    assert _convert(paths, output) == 2
    err = capsys.readouterr().err
    assert f"--output {output!r}" in err and "prefix" in err
    assert os.path.join(output, "train-00000-of-00008.tfrecord") in err  # what would work
    assert not (tmp_path / "o13").exists()


def test_failed_convert_removes_the_directories_it_created(tmp_path, capsys):
    paths = _synthetic(tmp_path / "coco")
    os.remove(os.path.join(paths["images"], "000000000001.jpg"))
    assert _convert(paths, str(tmp_path / "new" / "sub" / "train")) == 1
    err = capsys.readouterr().err
    assert "000000000001.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    # A directory that existed before stays.
    (tmp_path / "existing").mkdir()
    assert _convert(paths, str(tmp_path / "existing" / "train")) == 1
    assert os.listdir(tmp_path / "existing") == []


# --------------------------------------------------------------------- synthetic (defect 6)


def _synthetic_cli(output_dir, num_images: int, *extra: str) -> int:
    return synthetic_cli.main(["max-deeplab synthetic", f"--output_dir={output_dir}",
                               f"--num_images={num_images}", "--height=32", "--width=40",
                               *extra])


def _listing(root) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(root, d)))
            for d in ("train", "val", "panoptic_train", "panoptic_val", "annotations")}


def test_synthetic_refuses_an_existing_data_set_without_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    assert _synthetic_cli(out, 6) == 0
    before = _listing(out)
    (out / "notes.txt").write_text("mine")
    assert _synthetic_cli(out, 3) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out / "train") in err
    assert _listing(out) == before


def test_synthetic_overwrite_leaves_no_stale_images(tmp_path):
    out = tmp_path / "data"
    assert _synthetic_cli(out, 6) == 0
    (out / "notes.txt").write_text("mine")
    assert _synthetic_cli(out, 3, "--overwrite") == 0
    listing = _listing(out)
    for split in ("train", "val"):
        with open(out / "annotations" / f"panoptic_{split}.json") as f:
            data = json.load(f)
        assert listing[split] == sorted(im["file_name"] for im in data["images"])
        assert listing[f"panoptic_{split}"] == sorted(a["file_name"]
                                                      for a in data["annotations"])
    assert len(listing["train"]) + len(listing["val"]) == 3
    assert sorted(os.listdir(out)) == ["annotations", "notes.txt", "panoptic_train",
                                       "panoptic_val", "train", "val"]  # no staging left


def test_failed_synthetic_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    real_generate = synthetic_lib.generate_image

    def fail_at_third(seed, index, *args):
        if index == 2:
            raise OSError("disk full (simulated)")
        return real_generate(seed, index, *args)

    monkeypatch.setattr(synthetic_lib, "generate_image", fail_at_third)
    with pytest.raises(OSError, match="simulated"):
        synthetic_lib.write_dataset(str(tmp_path / "new"), 4, height=32, width=40)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(synthetic_lib, "generate_image", real_generate)
    synthetic_lib.write_dataset(str(tmp_path / "old"), 2, height=32, width=40)
    before = _listing(tmp_path / "old")
    monkeypatch.setattr(synthetic_lib, "generate_image", fail_at_third)
    with pytest.raises(OSError, match="simulated"):
        synthetic_lib.write_dataset(str(tmp_path / "old"), 4, height=32, width=40,
                                    overwrite=True)
    assert _listing(tmp_path / "old") == before
    assert sorted(os.listdir(tmp_path / "old")) == ["annotations", "panoptic_train",
                                                    "panoptic_val", "train", "val"]


# ------------------------------------------------------- predict: before loading (defect 3)


def _predict(saved_model, images: str, output_dir, *extra: str) -> int:
    return predict_cli.main(["max-deeplab predict", f"--saved_model={saved_model}",
                             f"--images={images}", f"--output_dir={output_dir}", *extra])


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.jpg")
    return images


def test_predict_output_dir_that_is_a_file(tmp_path, image_dir, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    # The check comes before the SavedModel is even looked at.
    assert _predict(tmp_path / "no_model", str(image_dir / "*.jpg"), a_file) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {a_file} is a file" in err and "Traceback" not in err


def test_predict_images_json_of_the_wrong_shape(tmp_path, image_dir, capsys):
    fake_model = tmp_path / "model"
    fake_model.mkdir()
    (fake_model / "saved_model.pb").write_bytes(b"never loaded")
    for content, expected in (([], "got list"),
                              ({"images": [{"file_name": "a.jpg"}]}, "images[0]")):
        images_json = tmp_path / "ids.json"
        images_json.write_text(json.dumps(content))
        code = _predict(fake_model, str(image_dir / "*.jpg"), tmp_path / "out",
                        f"--images_json={images_json}")
        err = capsys.readouterr().err
        assert code == 2
        assert f"--images_json {images_json}" in err and expected in err
        assert '{"images": [{"file_name": ..., "id": ...}, ...]}' in err
    assert not (tmp_path / "out").exists()


def test_predict_corrupt_saved_model(tmp_path, image_dir, capsys):
    corrupt = tmp_path / "model"
    corrupt.mkdir()
    (corrupt / "saved_model.pb").write_bytes(b"junk!")
    assert _predict(corrupt, str(image_dir / "*.jpg"), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"cannot load --saved_model {corrupt}" in err and "max-deeplab export" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["same_dir_two_formats", "two_dirs_same_name",
                                    "same_image_id"])
def test_predict_refuses_inputs_that_share_an_output(layout, tmp_path, capsys):
    from PIL import Image

    names = {"same_dir_two_formats": ["d/a.jpg", "d/a.png"],
             "two_dirs_same_name": ["d/a.jpg", "e/a.jpg"],
             "same_image_id": ["d/0139.jpg", "d/139.jpg"]}[layout]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    fake_model = tmp_path / "model"
    fake_model.mkdir()
    (fake_model / "saved_model.pb").write_bytes(b"never loaded")
    globs = ",".join(str(tmp_path / d / "*") for d in sorted({n[0] for n in names}))
    assert _predict(fake_model, globs, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert all(str(tmp_path / name) in err for name in names)
    assert ("the image_id" if layout == "same_image_id" else "the output file") in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------- import-checkpoint (defect 7)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_checkpoint_directory_follows_the_umask(tmp_path, umask):
    from max_deeplab.model.reference_import import write_model_checkpoint

    model = tfk.Sequential([tfk.layers.Dense(2)])
    model.build((None, 3))
    previous = os.umask(umask)
    try:
        write_model_checkpoint(model, str(tmp_path / "ckpt"))
        assert os.umask(previous) == umask  # left as it was
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o777 & ~umask


@pytest.mark.slow
def test_imported_checkpoint_directory_follows_the_umask(tmp_path, capsys):
    from reference_data import REFERENCE_DIR

    tiny = os.path.join(REFERENCE_DIR, "tiny")
    if not os.path.isdir(tiny):
        pytest.skip(f"reference fixture not found: {tiny}")
    previous = os.umask(0o022)
    try:
        code = import_cli.main(["max-deeplab import-checkpoint",
                                f"--reference_checkpoint={tiny}",
                                "--gin_file=reference_tiny.gin",
                                f"--output={tmp_path / 'imported'}"])
    finally:
        os.umask(previous)
    assert code == 0, capsys.readouterr().err
    assert stat.S_IMODE(os.stat(tmp_path / "imported").st_mode) == 0o755


def test_start_up_checks_leave_gin_macros_to_the_build():
    """`%LR` / `%NC` resolve only when the optimiser / model is built: the early checks skip
    them instead of failing on the macro object (a TypeError / a false mismatch)."""
    from max_deeplab.gin_config import parse_config

    parse_config(["tiny.gin"], ["LR = 1e-3", "max_deeplab_optimizer.base_learning_rate = %LR",
                                   "NC = 8", "MaXDeepLab.num_classes = %NC"])
    try:
        run_directory.check_learning_rate_schedule(100)
        run_directory.check_num_classes(8, "data")
        run_directory.check_num_classes(5, "data")  # checked at build time instead
        parse_config(["tiny.gin"], ["MaXDeepLab.num_classes = 8"])
        with pytest.raises(ValueError, match="has 5 classes but the model is configured"):
            run_directory.check_num_classes(5, "data")
    finally:
        parse_config(["tiny.gin"], [])


def test_start_up_checks_leave_tf_unconfigured():
    """train's early checks run before the distribution strategy is made, so they must not
    start TF's eager context: a multi-worker strategy configures its collectives at start-up
    and fails afterwards ("Collective ops must be configured at program startup"). Checked
    in a fresh process through a setting TF refuses to change once the context exists."""
    code = """
from max_deeplab.training import run_directory
from max_deeplab.gin_config import parse_config
import tensorflow as tf
parse_config(["tiny.gin"], ["build_learning_rate_schedule.warmup_steps = 10"])
run_directory.check_learning_rate_schedule(100)
run_directory.check_segments_fit_mask_slots()
tf.config.threading.set_inter_op_parallelism_threads(1)  # RuntimeError once initialised
print("unconfigured")
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "unconfigured" in proc.stdout, proc.stderr[-2000:]
