"""`convert` and the shard readers under faults and bad input (issue 22): temporaries of an
interrupted conversion never reach a shard glob and are cleared (or refused) by the next run;
malformed annotation files are errors naming the file, image and field; truncated shards are
named before training starts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from max_deeplab import atomic_files
from max_deeplab.__main__ import main as cli_main
from max_deeplab.data import ConversionError, build_dataset, convert
from max_deeplab.data import metadata as metadata_lib
from max_deeplab.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, str]:
    """A 5-image synthetic COCO-panoptic data set: paths of its annotations, images, PNGs."""
    root = tmp_path_factory.mktemp("coco")
    write_dataset(str(root), 5, seed=4, height=32, width=40, num_val_images=0)
    return {"annotations": str(root / "annotations" / "panoptic_train.json"),
            "images": str(root / "train"), "panoptic": str(root / "panoptic_train")}


def _convert(source: dict[str, str], prefix: str, num_shards: int = 2, **kwargs):
    return convert(source["annotations"], source["images"], source["panoptic"], prefix,
                   num_shards=num_shards, num_workers=1, log=lambda _: None, **kwargs)


def _count(pattern: str) -> int:
    dataset = build_dataset(pattern, is_training=False, global_batch_size=1,
                            crop_size=(32, 40), k_max=16)
    return sum(1 for _ in dataset)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


# ------------------------------------------------------- temporaries never reach a glob


def test_temporary_files_are_hidden_beside_their_target(tmp_path):
    target = str(tmp_path / "d" / "train-00000-of-00002.tfrecord")
    temporary = atomic_files.temporary_path(target)
    assert os.path.dirname(temporary) == os.path.dirname(target)  # same file system
    assert os.path.basename(temporary).startswith(".")  # `d/*` and `d/train-*` skip it
    assert atomic_files.is_temporary(temporary) and not atomic_files.is_temporary(target)
    assert atomic_files.temporary_owner(temporary) == os.getpid()


def test_shard_globs_skip_temporaries_of_an_interrupted_convert(source, tmp_path):
    prefix = str(tmp_path / "train")
    _convert(source, prefix)
    shards = sorted(str(p) for p in tmp_path.glob("train-0*.tfrecord"))
    # What an older convert killed mid-run left (named PREFIX-...tfrecord.tmp-PID, so the
    # documented `PREFIX-*` glob matched it): half a shard.
    with open(shards[0], "rb") as f:
        half = f.read()[:100]
    (tmp_path / (os.path.basename(shards[0]) + ".tmp-4242")).write_bytes(half)
    (tmp_path / ("." + os.path.basename(shards[1]) + ".tmp-4243")).write_bytes(half)
    assert metadata_lib.list_shards(prefix + "-*") == shards
    assert metadata_lib.list_shards(f"{tmp_path}/*") == shards  # not the metadata either
    assert _count(prefix + "-*") == 5


def test_convert_writes_its_temporaries_hidden(source, tmp_path, monkeypatch):
    seen = []
    real_writer = tf.io.TFRecordWriter

    def recording_writer(path, *args):
        seen.append(path)
        return real_writer(path, *args)

    monkeypatch.setattr(tf.io, "TFRecordWriter", recording_writer)
    _convert(source, str(tmp_path / "train"))
    assert seen and all(os.path.basename(p).startswith(".train-") for p in seen)
    assert sorted(os.listdir(tmp_path)) == ["train-00000-of-00002.tfrecord",
                                            "train-00001-of-00002.tfrecord",
                                            "train-metadata.json"]


def test_rerun_removes_the_temporaries_of_a_dead_convert(source, tmp_path):
    prefix = str(tmp_path / "train")
    pid = _dead_pid()
    stale = [tmp_path / f".train-00000-of-00002.tfrecord.tmp-{pid}",
             tmp_path / f"train-00001-of-00002.tfrecord.tmp-{pid}"]  # older naming
    for path in stale:
        path.write_bytes(b"half a shard")
    lines = []
    convert(source["annotations"], source["images"], source["panoptic"], prefix,
            num_shards=2, num_workers=1, log=lines.append)
    assert not any(path.exists() for path in stale)
    assert any(f"removed 2 temporary file(s) of an interrupted convert (process {pid})"
               in line for line in lines), lines
    assert _count(prefix + "-*") == 5


def test_rerun_refuses_while_another_convert_writes_the_prefix(source, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".train-00000-of-00002.tfrecord.tmp-{sleeper.pid}"
        busy.write_bytes(b"being written")
        with pytest.raises(ConversionError) as info:
            _convert(source, str(tmp_path / "train"))
    finally:
        sleeper.kill()
        sleeper.wait()
    message = str(info.value)
    assert f"process {sleeper.pid}" in message and str(busy) in message
    assert busy.read_bytes() == b"being written"
    assert sorted(os.listdir(tmp_path)) == [busy.name]


# ------------------------------------------------------------------ annotation file checks


def _edited(source: dict[str, str], tmp_path, edit) -> dict[str, str]:
    with open(source["annotations"]) as f:
        data = json.load(f)
    edit(data)
    annotations = tmp_path / "edited.json"
    annotations.write_text(json.dumps(data))
    return {**source, "annotations": str(annotations)}


def _duplicate_image_id(data):
    data["images"][3]["id"] = data["images"][1]["id"]


def _two_annotations_for_one_image(data):
    data["annotations"][2]["image_id"] = data["annotations"][0]["image_id"]


@pytest.mark.parametrize("edit, expected", [
    (_duplicate_image_id, ["images[1]", "images[3]", "id 2"]),
    (_two_annotations_for_one_image, ["annotations[0]", "annotations[2]", "image_id 1"]),
])
def test_images_and_annotations_pair_one_to_one(source, tmp_path, edit, expected):
    """A later images[] entry with an id already seen used to win silently (labels paired
    with the wrong photo); two annotations for one image duplicated the example."""
    edited = _edited(source, tmp_path, edit)
    with pytest.raises(ConversionError) as info:
        _convert(edited, str(tmp_path / "out" / "train"))
    message = str(info.value)
    assert edited["annotations"] in message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "out").exists()


def _first_segment(data) -> dict:
    return data["annotations"][0]["segments_info"][0]


MALFORMED = [
    ("segment without category_id",
     lambda d: _first_segment(d).pop("category_id"),
     ["image_id 1", "segments_info[0]", "'category_id'", "missing"]),
    ("non-numeric segment id",
     lambda d: _first_segment(d).update(id="seven"),
     ["image_id 1", "segments_info[0]", "'id'", "'seven'", "integer"]),
    ("boolean segment id",
     lambda d: _first_segment(d).update(id=True),
     ["image_id 1", "'id'", "True", "integer"]),
    ("images as an object",
     lambda d: d.update(images={"id": 1}),
     ["'images'", "list", "dict"]),
    ("segments_info null",
     lambda d: d["annotations"][1].update(segments_info=None),
     ["image_id 2", "'segments_info'", "list", "None"]),
    ("non-numeric width",
     lambda d: d["images"][0].update(width="wide"),
     ["images[0]", "'width'", "'wide'", "integer"]),
    ("image entry not an object",
     lambda d: d["images"].__setitem__(2, 17),
     ["images[2]", "object", "17"]),
    ("annotation not an object",
     lambda d: d["annotations"].__setitem__(1, "x.png"),
     ["annotations[1]", "object", "'x.png'"]),
    ("image_id a list",
     lambda d: d["annotations"][0].update(image_id=[1]),
     ["annotations[0]", "'image_id'", "[1]", "integer"]),
    ("file_name not a string",
     lambda d: d["images"][0].update(file_name=5),
     ["images[0]", "'file_name'", "5", "string"]),
    ("iscrowd not 0 or 1",
     lambda d: _first_segment(d).update(iscrowd="yes"),
     ["image_id 1", "'iscrowd'", "'yes'", "0 or 1"]),
    ("segment not an object",
     lambda d: d["annotations"][0]["segments_info"].__setitem__(0, 3),
     ["image_id 1", "segments_info[0]", "object", "3"]),
    ("annotations not a list",
     lambda d: d.update(annotations=None),
     ["'annotations'", "list", "None"]),
]


@pytest.mark.parametrize("case, edit, expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_annotation_field_is_named(case, edit, expected, source, tmp_path, capsys):
    edited = _edited(source, tmp_path, edit)
    out = tmp_path / "out"
    code = cli_main(["max-deeplab", "convert", *(f"--{k}={v}" for k, v in edited.items()),
                     f"--output={out / 'train'}", "--num_workers=1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and edited["annotations"] in err
    for text in expected:
        assert text in err, (case, err)
    assert not out.exists()


# --------------------------------------------------------------------- output locations


def test_convert_output_under_a_regular_file_is_refused_before_work(source, tmp_path,
                                                                     capsys, monkeypatch):
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    from max_deeplab.data import coco_format

    def not_reached(*args):
        raise AssertionError("the annotation file was read")

    monkeypatch.setattr(coco_format, "load_coco_panoptic", not_reached)
    code = cli_main(["max-deeplab", "convert", *(f"--{k}={v}" for k, v in source.items()),
                     f"--output={a_file / 'sub' / 'train'}", "--num_workers=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{a_file} is a file" in err and "Traceback" not in err
    assert a_file.read_text() == "keep"


def test_annotation_named_fifo_is_not_opened(source, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(source["images"], images)
    first = sorted(os.listdir(images))[0]
    os.remove(images / first)
    os.mkfifo(images / first)  # opening it for reading would wait for a writer forever
    with pytest.raises(ConversionError, match=f"{images / first}.*not a regular file"):
        _convert({**source, "images": str(images)}, str(tmp_path / "out" / "train"))


# ------------------------------------------------------------------- damaged shards


def test_truncated_shard_is_named_before_reading(source, tmp_path):
    prefix = str(tmp_path / "train")
    _convert(source, prefix)
    shard = metadata_lib.shard_path(prefix, 1, 2)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(metadata_lib.ShardError) as info:
        metadata_lib.check_shards(prefix + "-*")
    message = str(info.value)
    assert shard in message and f"{size - 10} bytes" in message and f"{size}" in message
    assert "truncated" in message
