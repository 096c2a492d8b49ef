"""Data sets, run directories and exports on file-system URLs (gs://... on Cloud TPU).

TensorFlow's in-memory `ram://` file system stands in for a bucket: `os` and `glob` see
nothing there, so every read that bypasses `tf.io.gfile` fails these tests.
"""
from __future__ import annotations

import json
import uuid

import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.data.metadata import (
    MetadataError,
    build_metadata,
    find_metadata,
    load_metadata,
    shard_path,
)
from max_deeplab.file_system import file_exists, glob_files, read_text
from max_deeplab.inference.export import ExportDirectoryError, export_saved_model
from max_deeplab.training import run_directory

CATEGORIES = [{"id": 1, "name": "disc", "isthing": 1}, {"id": 7, "name": "grass", "isthing": 0}]


@pytest.fixture
def bucket() -> str:
    """A fresh directory on the in-memory file system (it is shared by the whole process)."""
    root = f"ram://bucket-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(root)
    yield root
    tf.io.gfile.rmtree(root)


def _write(path: str, text: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _remote_data_set(bucket: str, label_divisor: int = 256) -> str:
    """Two (empty) shards and their metadata under `bucket`/data; returns the prefix."""
    prefix = f"{bucket}/data/train"
    tf.io.gfile.makedirs(f"{bucket}/data")
    for index in range(2):
        _write(shard_path(prefix, index, 2), "")
    _write(prefix + "-metadata.json", json.dumps(build_metadata(CATEGORIES, label_divisor)))
    return prefix


def test_file_helpers_read_urls(bucket):
    _write(f"{bucket}/a.txt", "hello")
    assert file_exists(f"{bucket}/a.txt")
    assert not file_exists(bucket)  # a directory is not a file
    assert not file_exists(f"{bucket}/missing.txt")
    assert read_text(f"{bucket}/a.txt") == "hello"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text(f"{bucket}/missing.txt")
    assert glob_files(f"{bucket}/*.txt") == [f"{bucket}/a.txt"]
    assert glob_files(f"{bucket}/no-such-dir/*.txt") == []


def test_load_metadata_from_url_glob_prefix_shard_and_json(bucket):
    prefix = _remote_data_set(bucket, label_divisor=1000)
    expected = prefix + "-metadata.json"
    for query in (prefix + "-*", prefix + "-*.tfrecord", prefix, shard_path(prefix, 1, 2),
                  expected):
        assert find_metadata(query) == expected, query
    metadata = load_metadata(prefix + "-*")
    assert metadata["path"] == expected
    assert metadata["label_divisor"] == 1000 and metadata["thing_classes"] == [0]
    with pytest.raises(MetadataError, match="no data-set metadata found"):
        load_metadata(f"{bucket}/other/val-*")


def test_load_metadata_names_a_malformed_url_file(bucket):
    _write(f"{bucket}/x-metadata.json", "[]")
    with pytest.raises(MetadataError, match=f"{bucket}/x-metadata.json holds a JSON list"):
        load_metadata(f"{bucket}/x-metadata.json")


def test_run_config_of_a_url_model_dir(bucket):
    run_dir = f"{bucket}/run"
    assert run_directory.saved_gin_config(run_dir) is None
    assert run_directory.saved_data_flags(run_dir) == {}
    tf.io.gfile.makedirs(run_dir)
    _write(f"{run_dir}/config.gin", "build_model.input_size = (65, 97)\n")
    _write(f"{run_dir}/run.json", json.dumps({"train_data": "gs://b/train-*",
                                              "eval_data": None}))
    assert run_directory.saved_gin_config(run_dir) == f"{run_dir}/config.gin"
    assert run_directory.saved_data_flags(run_dir)["train_data"] == "gs://b/train-*"
    _write(f"{run_dir}/run.json", '{"eval')
    with pytest.raises(run_directory.RunConfigError, match=f"{run_dir}/run.json"):
        run_directory.saved_data_flags(run_dir)


def test_evaluate_reads_url_run_dir_and_stops_without_checkpoint(bucket, capsys):
    from max_deeplab.__main__ import main

    run_dir = f"{bucket}/run"
    tf.io.gfile.makedirs(run_dir)
    _write(f"{run_dir}/config.gin", "")
    _write(f"{run_dir}/run.json", json.dumps({"eval_data": "gs://b/val-*"}))
    assert main(["max-deeplab", "evaluate", "--model_dir", run_dir]) == 2
    assert f"no checkpoint to evaluate in {run_dir}" in capsys.readouterr().err
    assert sorted(tf.io.gfile.listdir(run_dir)) == ["config.gin", "run.json"]


class _TinyModel(tfk.Model):
    """Outputs shaped like MaX-DeepLab's (2 classes + void, 3 mask slots), from the image."""

    def __init__(self):
        super().__init__()
        self.mask = tfk.layers.Conv2D(3, 1, kernel_initializer=tfk.initializers.RandomNormal(
            0, 0.5, seed=2))

    def call(self, images, training=False):
        x = tf.nn.avg_pool2d(images / 127.5 - 1.0, 4, 4, "SAME")
        batch = tf.shape(images)[0]
        logits = tf.constant([[8.0, 0, 0], [0, 8.0, 0], [8.0, 0, 0]])
        return {"mask_logits": 5.0 * self.mask(x),
                "class_logits": tf.tile(logits[None], [batch, 1, 1]),
                "pixel_feature": x, "semantic_logits": x[..., :2]}


def test_export_to_a_url_loads_back(bucket):
    model = _TinyModel()
    export_dir = f"{bucket}/export"
    metadata = json.loads(read_text(_remote_data_set(bucket) + "-metadata.json"))
    export_saved_model(model, export_dir, metadata, input_size=(16, 24))
    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures["serving_default"](image=tf.zeros([10, 12, 3], tf.uint8))
    assert out["panoptic"].shape == (10, 12)
    assert loaded.signatures["metadata"]()["category_ids"].numpy().tolist() == [1, 7]
    assert not glob_files(f"{bucket}/.export-*")
    with pytest.raises(ExportDirectoryError, match=f"{export_dir} exists and is not empty"):
        export_saved_model(model, export_dir, metadata, input_size=(16, 24))


def test_failed_copy_to_a_url_leaves_nothing(bucket, monkeypatch):
    copied = []
    real_copy = tf.io.gfile.copy

    def copy_then_fail(src, dst, overwrite=False):
        if copied:
            raise tf.errors.UnavailableError(None, None, "connection reset")
        copied.append(dst)
        real_copy(src, dst, overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", copy_then_fail)
    export_dir = f"{bucket}/export"
    with pytest.raises(tf.errors.UnavailableError):
        export_saved_model(_TinyModel(), export_dir, {"categories": CATEGORIES},
                           input_size=(16, 24))
    assert copied and not copied[0].endswith("saved_model.pb")  # the graph goes last
    assert not tf.io.gfile.exists(export_dir)
    assert tf.io.gfile.listdir(bucket) == []
