"""`max-deeplab export` (docs/design.md §6): inputs are checked before the model is built, and a
`train` run directory supplies its own model config and data-set metadata.

Also: a category without `isthing` is an error wherever categories are read (`convert`'s
COCO JSON, data-set metadata, `export --metadata`).
"""
from __future__ import annotations

import json
import os
import shutil

import gin
import pytest
import tensorflow as tf

from max_deeplab.__main__ import main
from max_deeplab.data.metadata import build_metadata, shard_path

CATEGORIES = [{"id": 3, "name": "disc", "isthing": 1}, {"id": 40, "name": "grass", "isthing": 0}]
# A model config for CATEGORIES (gin's defaults would be the 133-class COCO model).
RUN_CONFIG_GIN = "MaXDeepLab.num_classes = 2\nbuild_model.input_size = (33, 49)\n"
SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                       "samples", "shapes")


@pytest.fixture
def exported(monkeypatch):
    """Replaces model building, restoring and saving: records what `export` would save."""
    import max_deeplab.inference
    import max_deeplab.model

    calls = {}
    monkeypatch.setattr(max_deeplab.model, "build_model", lambda: "model")
    monkeypatch.setattr(max_deeplab.model, "restore",
                        lambda model, path: calls.setdefault("restored", path))

    def export_saved_model(model, export_dir, metadata, *, input_size, **tflite_options):
        calls.update(export_dir=export_dir, metadata=metadata, input_size=input_size,
                     **tflite_options)

    monkeypatch.setattr(max_deeplab.inference, "export_saved_model", export_saved_model)
    return calls


def _checkpoint(directory) -> str:
    """A checkpoint prefix in `directory` with a 'checkpoint' state file, as `train` saves."""
    return tf.train.Checkpoint(v=tf.Variable(1.0)).save(os.path.join(str(directory), "ckpt"))


def _data_set(directory, categories: list[dict] = CATEGORIES, label_divisor: int = 1000
              ) -> str:
    """Metadata (and one empty shard) of a converted data set; returns its shard glob."""
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(str(directory), "train")
    open(shard_path(prefix, 0, 1), "w").close()
    with open(prefix + "-metadata.json", "w") as f:
        json.dump(build_metadata(categories, label_divisor), f)
    return prefix + "-*"


def _train_run(tmp_path) -> str:
    """A model directory as `train` leaves it: checkpoint, config.gin, run.json."""
    run_dir = tmp_path / "run"
    _checkpoint(run_dir)
    (run_dir / "config.gin").write_text(RUN_CONFIG_GIN)
    (run_dir / "run.json").write_text(json.dumps(
        {"train_data": _data_set(tmp_path / "data"), "eval_data": None}))
    return str(run_dir)


def _export(*args: str) -> int:
    return main(["max-deeplab", "export", *args])


@pytest.mark.parametrize("content, expected", [
    ("[]", "holds a JSON list; expected an object with a 'categories' list"),
    ('{"images": []}', "'categories' must be a non-empty list"),
    ('{"categories": [{"id": 3, "name": "disc"}]}', "category id 3 has no 'isthing'"),
    ('{"categories": [{"id": 3, "isthing": 2}]}', "expected 1 (thing) or 0 (stuff)"),
    ('{"categories": [{"id": 3, "isthing": 1}], "label_divisor": "256"}',
     "'label_divisor' must be a positive integer"),
    ('{"categories": ', "cannot read metadata file"),
])
def test_bad_metadata_is_named_before_the_model_is_built(tmp_path, capsys, no_model_build,
                                                          content, expected):
    metadata = tmp_path / "meta.json"
    metadata.write_text(content)
    export_dir = tmp_path / "export"
    assert _export("--checkpoint", _checkpoint(tmp_path / "ckpt"), "--export_dir",
                   str(export_dir), "--metadata", str(metadata)) == 2
    err = capsys.readouterr().err
    assert str(metadata) in err and expected in err
    assert not export_dir.exists()


def test_export_dir_is_checked_before_the_model_is_built(tmp_path, capsys, no_model_build):
    checkpoint = _checkpoint(tmp_path / "ckpt")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "saved_model.pb").write_text("an earlier export")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for export_dir, expected in ((taken, "exists and is not empty"),
                                 (a_file, "is a file, not a directory"),
                                 (a_file / "sub" / "export", f"{a_file} is a file")):
        assert _export("--checkpoint", checkpoint, "--export_dir", str(export_dir)) == 2
        err = capsys.readouterr().err
        assert f"--export_dir: export directory {export_dir}" in err and expected in err
    assert (taken / "saved_model.pb").read_text() == "an earlier export"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ckpt", "taken"]


def test_missing_checkpoint_is_named_before_the_model_is_built(tmp_path, capsys,
                                                               no_model_build):
    assert _export("--checkpoint", str(tmp_path / "nope"), "--export_dir",
                   str(tmp_path / "export")) == 2
    assert f"--checkpoint: no checkpoint at '{tmp_path / 'nope'}'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_class_count_mismatch_is_named_before_the_model_is_built(tmp_path, capsys,
                                                                 no_model_build):
    run_dir = _train_run(tmp_path)
    # The default model config (133 classes) does not fit the 2-class data set.
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export"),
                   "--gin_bindings", "MaXDeepLab.num_classes = 133") == 2
    err = capsys.readouterr().err
    assert "has 2 classes" in err and "MaXDeepLab.num_classes = 133" in err


@pytest.mark.parametrize("as_prefix", [False, True])
def test_train_run_supplies_config_and_metadata(tmp_path, capsys, exported, as_prefix):
    run_dir = _train_run(tmp_path)
    checkpoint = tf.train.latest_checkpoint(run_dir) if as_prefix else run_dir
    export_dir = str(tmp_path / "export")
    assert _export("--checkpoint", checkpoint, "--export_dir", export_dir) == 0
    assert exported["restored"] == tf.train.latest_checkpoint(run_dir)
    assert exported["export_dir"] == export_dir
    assert exported["input_size"] == (33, 49)  # from the run's config.gin
    assert gin.query_parameter("MaXDeepLab.num_classes") == 2
    # The metadata of the run's training data, with the data set's label divisor.
    assert exported["metadata"]["label_divisor"] == 1000
    assert [c["id"] for c in exported["metadata"]["categories"]] == [3, 40]
    assert str(tmp_path / "data" / "train-metadata.json") in capsys.readouterr().out


def test_explicit_flags_override_the_train_run(tmp_path, exported):
    run_dir = _train_run(tmp_path)
    other_gin = tmp_path / "other.gin"
    other_gin.write_text("MaXDeepLab.num_classes = 3\nbuild_model.input_size = (17, 25)\n")
    other_meta = tmp_path / "coco.json"
    other_meta.write_text(json.dumps({"categories": CATEGORIES + [
        {"id": 50, "name": "sky", "isthing": 0}]}))
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export"),
                   "--gin_file", str(other_gin), "--metadata", str(other_meta)) == 0
    assert exported["input_size"] == (17, 25)
    assert [c["id"] for c in exported["metadata"]["categories"]] == [3, 40, 50]


def test_run_data_without_metadata_says_so(tmp_path, capsys, no_model_build):
    run_dir = _train_run(tmp_path)
    shutil.rmtree(tmp_path / "data")
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export")) == 2
    err = capsys.readouterr().err
    assert os.path.join(run_dir, "run.json") in err and "--metadata" in err


def test_moved_run_data_falls_back_to_metadata_beside_the_checkpoint(tmp_path, exported):
    run_dir = _train_run(tmp_path)
    shutil.move(str(tmp_path / "data" / "train-metadata.json"),
                os.path.join(run_dir, "train-metadata.json"))
    shutil.rmtree(tmp_path / "data")
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export")) == 0
    assert [c["id"] for c in exported["metadata"]["categories"]] == [3, 40]


def test_malformed_run_json_is_named(tmp_path, capsys, no_model_build):
    run_dir = _train_run(tmp_path)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        f.write('{"train_data": ')
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export")) == 2
    assert f"cannot read the run config {os.path.join(run_dir, 'run.json')}" in \
        capsys.readouterr().err


def test_convert_rejects_a_category_without_isthing(tmp_path, capsys):
    from max_deeplab.data.coco_format import ConversionError, load_coco_panoptic

    with open(os.path.join(SAMPLES, "annotations", "panoptic_val.json")) as f:
        data = json.load(f)
    category_id = data["categories"][1]["id"]
    del data["categories"][1]["isthing"]
    annotations = tmp_path / "panoptic_val.json"
    annotations.write_text(json.dumps(data))
    images, pngs = os.path.join(SAMPLES, "val"), os.path.join(SAMPLES, "panoptic_val")
    with pytest.raises(ConversionError, match=f"category id {category_id} has no 'isthing'"):
        load_coco_panoptic(str(annotations), images, pngs)
    output = tmp_path / "out" / "val"
    assert main(["max-deeplab", "convert", "--annotations", str(annotations), "--images",
                 images, "--panoptic", pngs, "--output", str(output)]) != 0
    err = capsys.readouterr().err
    assert f"{annotations}: category id {category_id} has no 'isthing'" in err
    assert sorted(os.listdir(tmp_path)) == ["panoptic_val.json"]
    with pytest.raises(ValueError, match=f"category id {category_id} has no 'isthing'"):
        build_metadata(data["categories"])


@pytest.mark.slow  # builds, restores and saves the tiny-config model (~1 min)
def test_export_of_a_train_run_needs_no_flags(tmp_path):
    """`export --checkpoint RUN --export_dir DIR` of a tiny-config run: the SavedModel has
    the run's model size, its data set's categories and label divisor."""
    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    model = build_model()
    run_dir = tmp_path / "run"
    tf.train.Checkpoint(model=model).save(str(run_dir / "ckpt"))
    (run_dir / "config.gin").write_text(gin.config_str())
    num_classes = gin.query_parameter("MaXDeepLab.num_classes")
    categories = [{"id": 100 + i, "name": f"c{i}", "isthing": int(i < 4)}
                  for i in range(num_classes)]
    (run_dir / "run.json").write_text(json.dumps(
        {"train_data": _data_set(tmp_path / "data", categories, label_divisor=1000)}))
    input_size = list(gin.query_parameter("build_model.input_size"))
    gin.clear_config()  # `export` must read the run's config itself

    export_dir = tmp_path / "export"
    assert _export("--checkpoint", str(run_dir), "--export_dir", str(export_dir)) == 0
    loaded = tf.saved_model.load(str(export_dir))
    metadata = loaded.signatures["metadata"]()
    assert metadata["label_divisor"].numpy() == 1000
    assert metadata["category_ids"].numpy().tolist() == [c["id"] for c in categories]
    with open(export_dir / "assets" / "metadata.json") as f:
        assert json.load(f)["input_size"] == input_size


# --- --tflite ------------------------------------------------------------------------------

def _converted_samples(tmp_path) -> str:
    """The bundled shapes val split (3 images) as `convert` TFRecords; returns the glob."""
    from max_deeplab.data.converter import convert

    prefix = str(tmp_path / "shapes" / "val")
    convert(os.path.join(SAMPLES, "annotations", "panoptic_val.json"),
            os.path.join(SAMPLES, "val"), os.path.join(SAMPLES, "panoptic_val"), prefix,
            num_shards=1, num_workers=1, log=lambda line: None)
    return prefix + "-*"


def test_tflite_flags_reach_the_export(tmp_path, exported):
    run_dir = _train_run(tmp_path)
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "a"),
                   "--tflite", "float32,float16") == 0
    assert exported["tflite"] == ["float32", "float16"]
    assert exported["representative_images"] is None
    # int8 calibrates on the first --representative_images images of --representative_data.
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "b"), "--tflite",
                   "int8", "--representative_data", _converted_samples(tmp_path),
                   "--representative_images", "2") == 0
    images = exported["representative_images"]
    assert len(images) == 2 and images[0].shape == (129, 161, 3) and images[0].dtype == "uint8"


def test_tflite_flags_are_checked_before_the_model_is_built(tmp_path, capsys, no_model_build):
    run_dir = _train_run(tmp_path)  # its train data: one empty shard
    cases = [(["--tflite", "float32,int4"], "--tflite: unknown quantization int4; expected "
              "any of float32, float16, int8"),
             (["--tflite", "int8"], "--representative_data: no records in"),
             (["--tflite", "int8", "--representative_data", str(tmp_path / "none-*")],
              "--representative_data: no TFRecord shards match")]
    for flags, expected in cases:
        assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export"),
                       *flags) == 2
        assert expected in capsys.readouterr().err
    # Without a run.json naming training data, int8 asks for --representative_data.
    os.remove(os.path.join(run_dir, "run.json"))
    shutil.copy(tmp_path / "data" / "train-metadata.json", run_dir)
    assert _export("--checkpoint", run_dir, "--export_dir", str(tmp_path / "export"),
                   "--tflite", "int8") == 2
    assert "--tflite int8 needs calibration images: pass --representative_data" in (
        capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


@pytest.mark.slow  # builds the tiny model and converts it to TFLite (~1 min)
def test_export_tflite_of_the_tiny_model_equals_the_saved_model(tmp_path):
    import numpy as np

    from max_deeplab.gin_config import parse_config
    from max_deeplab.inference.tflite import TFLitePanopticModel
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    tf.keras.utils.set_random_seed(0)  # the untrained model's segments must be varied
    model = build_model()
    # Untrained, every slot predicts the same class; random class weights make them differ.
    rng = np.random.default_rng(0)
    for variable in model.transformer_class_head.trainable_variables:
        variable.assign(rng.normal(0, 1, variable.shape).astype(np.float32))
    # ... and random mask embeddings spread the pixels over more slots.
    for variable in model.transformer_mask_head.trainable_variables:
        variable.assign(rng.normal(0, 1, variable.shape).astype(np.float32))
    run_dir = tmp_path / "run"
    tf.train.Checkpoint(model=model).save(str(run_dir / "ckpt"))
    (run_dir / "config.gin").write_text(gin.config_str())
    categories = [{"id": 100 + i, "name": f"c{i}", "isthing": int(i < 4)} for i in range(8)]
    (run_dir / "run.json").write_text(json.dumps(
        {"train_data": _data_set(tmp_path / "data", categories)}))
    gin.clear_config()
    export_dir = tmp_path / "export"
    # Thresholds off: the untrained model's segments are there to compare.
    assert _export("--checkpoint", str(run_dir), "--export_dir", str(export_dir), "--tflite",
                   "float32", "--gin_bindings", "postprocess.class_threshold = 0.0",
                   "--gin_bindings", "postprocess.pixel_threshold = 0.0") == 0
    tflite = TFLitePanopticModel(str(export_dir / "tflite" / "panoptic_float32.tflite"))
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    rng = np.random.default_rng(0)
    for size in ((65, 97), (80, 50)):
        image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        got, want = tflite(image), serve(image=tf.constant(image))
        assert len(np.unique(want["panoptic"])) > 2
        # The same network in TFLite's kernels: labels equal except at float near-ties.
        assert np.mean(got["panoptic"] == want["panoptic"].numpy()) > 0.99
