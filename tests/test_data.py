"""Synthetic data set -> convert -> decode_example, conversion errors, metadata."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from max_deeplab.__main__ import main as cli_main
from max_deeplab.data import (
    IGNORE_PANOPTIC,
    ConversionError,
    MetadataError,
    convert,
    decode_example,
    load_metadata,
)
from max_deeplab.data.synthetic import generate_image, write_dataset
from max_deeplab.panoptic_labels import id_to_rgb, rgb_to_id

HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    assert cli_main(["max-deeplab", "synthetic", "--output_dir", root, "--num_images", "8",
                     "--seed", "3", "--height", str(HEIGHT), "--width", str(WIDTH)]) == 0
    return root


@pytest.fixture(scope="module")
def converted(synthetic_dir, tmp_path_factory):
    prefix = os.path.join(str(tmp_path_factory.mktemp("records")), "train")
    metadata = convert(os.path.join(synthetic_dir, "annotations", "panoptic_train.json"),
                       os.path.join(synthetic_dir, "train"),
                       os.path.join(synthetic_dir, "panoptic_train"), prefix,
                       num_shards=3, num_workers=2, log=lambda _: None)
    return prefix, metadata


def _annotations(root, split="train"):
    with open(os.path.join(root, "annotations", f"panoptic_{split}.json")) as f:
        return json.load(f)


def test_synthetic_layout_and_split(synthetic_dir):
    train, val = _annotations(synthetic_dir, "train"), _annotations(synthetic_dir, "val")
    assert len(train["images"]) == 7 and len(val["images"]) == 1  # a fifth, at least 1
    for split, data in (("train", train), ("val", val)):
        for image, ann in zip(data["images"], data["annotations"], strict=True):
            assert image["id"] == ann["image_id"]
            assert os.path.isfile(os.path.join(synthetic_dir, split, image["file_name"]))
            png = os.path.join(synthetic_dir, f"panoptic_{split}", ann["file_name"])
            assert Image.open(png).size == (WIDTH, HEIGHT)
    ids = sorted(c["id"] for c in train["categories"])
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # non-contiguous, like COCO
    assert {c["isthing"] for c in train["categories"]} == {0, 1}


def test_synthetic_segments_info_matches_png():
    """area, bbox and the id set of segments_info agree with the PNG; crowd, void and
    several occluding instances per class appear across images."""
    crowd = void = multi_instance = 0
    for index in range(30):
        sample = generate_image(7, index, HEIGHT, WIDTH)
        ids = rgb_to_id(id_to_rgb(sample.segment_map))
        listed = {s["id"] for s in sample.segments}
        assert set(np.unique(ids).tolist()) - {0} == listed
        for seg in sample.segments:
            rows, cols = np.nonzero(ids == seg["id"])
            assert seg["area"] == rows.size
            assert seg["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                   rows.max() - rows.min() + 1]
        crowd += any(s["iscrowd"] for s in sample.segments)
        void += bool((ids == 0).any())
        things = [s["category_id"] for s in sample.segments
                  if s["category_id"] < 100 and not s["iscrowd"]]
        multi_instance += len(things) > len(set(things))
    assert crowd >= 3 and void >= 5 and multi_instance >= 5


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    write_dataset(a, 3, seed=1, height=32, width=40)
    write_dataset(b, 3, seed=1, height=32, width=40)
    write_dataset(c, 3, seed=2, height=32, width=40)
    files = sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**", "*.*"),
                                                               recursive=True))
    assert len(files) == 2 + 3 * 2

    def read(root, rel):
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    assert all(read(a, f) == read(b, f) for f in files)
    assert any(read(a, f) != read(c, f) for f in files)


def test_convert_writes_shards_and_metadata(converted, synthetic_dir):
    prefix, metadata = converted
    directory = os.path.dirname(prefix)
    assert sorted(os.listdir(directory)) == [
        "train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord", "train-metadata.json"]
    loaded = load_metadata(prefix + "-*.tfrecord")
    categories = _annotations(synthetic_dir)["categories"]
    assert loaded["num_classes"] == len(categories) == 8
    assert loaded["category_ids"] == sorted(c["id"] for c in categories)
    assert loaded["thing_classes"] == [i for i, cid in enumerate(loaded["category_ids"])
                                       if next(c for c in categories if c["id"] == cid)
                                       ["isthing"]]
    assert loaded["label_divisor"] == 256 and loaded["ignore_label"] == IGNORE_PANOPTIC
    assert loaded["num_examples"] == 7
    assert metadata["categories"] == loaded["categories"]


def test_load_metadata_finds_file_from_shard_prefix_or_json(converted, tmp_path):
    prefix, _ = converted
    expected = prefix + "-metadata.json"
    for query in (prefix + "-*.tfrecord", prefix + "-00001-of-00003.tfrecord", prefix,
                  expected, prefix + "-?????-of-00003.tfrecord," + prefix + "-0000[01]*"):
        assert load_metadata(query)["path"] == expected
    with pytest.raises(MetadataError, match="no data-set metadata"):
        load_metadata(str(tmp_path / "nothing-*.tfrecord"))


def test_decode_example_reproduces_every_segment(converted, synthetic_dir):
    """Every non-crowd segment's pixel set and contiguous class survive exactly; instance
    ids are unique per class (0 for stuff); void and crowd pixels are IGNORE_PANOPTIC."""
    prefix, metadata = converted
    data = _annotations(synthetic_dir)
    contiguous = {cid: i for i, cid in enumerate(metadata["category_ids"])}
    isthing = {c["id"]: c["isthing"] for c in data["categories"]}
    by_id = {a["image_id"]: a for a in data["annotations"]}
    files = sorted(glob.glob(prefix + "-*.tfrecord"))
    seen = set()
    for raw in tf.data.TFRecordDataset(files):
        out = decode_example(raw)
        assert out["image"].dtype == tf.uint8 and out["panoptic"].dtype == tf.int32
        image_id = int(out["image_id"])
        seen.add(image_id)
        ann = by_id[image_id]
        jpg = os.path.join(synthetic_dir, "train", f"{image_id:012d}.jpg")
        with open(jpg, "rb") as f:
            assert tf.io.decode_jpeg(f.read()).numpy().tolist() == out["image"].numpy().tolist()
        ids = rgb_to_id(np.asarray(Image.open(os.path.join(synthetic_dir, "panoptic_train",
                                                           ann["file_name"]))))
        panoptic = out["panoptic"].numpy()
        assert panoptic.shape == (HEIGHT, WIDTH) == (int(out["height"]), int(out["width"]))
        labelled = np.zeros_like(ids, bool)
        values = set()
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            if seg["iscrowd"]:
                assert (panoptic[mask] == IGNORE_PANOPTIC).all()
                continue
            value = int(panoptic[mask][0])
            np.testing.assert_array_equal(panoptic == value, mask)  # exact pixel set
            assert value // 256 == contiguous[seg["category_id"]]
            assert (value % 256 > 0) == bool(isthing[seg["category_id"]])
            assert value not in values
            values.add(value)
            labelled |= mask
        assert (panoptic[~labelled] == IGNORE_PANOPTIC).all()
    assert seen == set(by_id)


# ---------------------------------------------------------------------------- bad input


def _small_copy(synthetic_dir, tmp_path):
    """A 3-image copy of the train split whose files a test may damage."""
    root = tmp_path / "src"
    data = _annotations(synthetic_dir)
    data["images"], data["annotations"] = data["images"][:3], data["annotations"][:3]
    for sub in ("train", "panoptic_train", "annotations"):
        (root / sub).mkdir(parents=True)
    for image, ann in zip(data["images"], data["annotations"], strict=True):
        shutil.copy(os.path.join(synthetic_dir, "train", image["file_name"]), root / "train")
        shutil.copy(os.path.join(synthetic_dir, "panoptic_train", ann["file_name"]),
                    root / "panoptic_train")
    return root, data


def _run_convert(root, data, out_dir, num_workers=1):
    annotations = root / "annotations" / "panoptic_train.json"
    annotations.write_text(json.dumps(data))
    return convert(str(annotations), str(root / "train"), str(root / "panoptic_train"),
                   str(out_dir / "train"), num_shards=3, num_workers=num_workers,
                   log=lambda _: None)


def _damage(case, root, data):
    """Breaks the LAST image (so earlier shards are complete when the error comes)."""
    image, ann = data["images"][-1], data["annotations"][-1]
    png_path = root / "panoptic_train" / ann["file_name"]
    jpg_path = root / "train" / image["file_name"]
    seg = ann["segments_info"][0]
    if case == "missing_image":
        os.remove(jpg_path)
        return [image["file_name"], "missing"]
    if case == "png_size":
        ids = rgb_to_id(np.asarray(Image.open(png_path)))
        Image.fromarray(id_to_rgb(ids[:-2])).save(png_path)
        return [ann["file_name"], f"{WIDTH}x{HEIGHT - 2}", image["file_name"]]
    if case == "json_segment_not_in_png":
        ann["segments_info"].append({"id": 4242, "category_id": seg["category_id"],
                                     "area": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0})
        return [ann["file_name"], "4242", "no pixels"]
    if case == "png_segment_not_in_json":
        ann["segments_info"].remove(seg)
        return [ann["file_name"], str(seg["id"]), "not in its segments_info"]
    if case == "unknown_category":
        seg["category_id"] = 77
        return [ann["file_name"], str(seg["id"]), "77"]
    if case == "corrupt_image":
        with open(jpg_path, "rb") as f:
            head = f.read(200)
        jpg_path.write_bytes(head)
        return [image["file_name"], "corrupt"]
    if case == "corrupt_png":
        png_path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return [ann["file_name"], "corrupt"]
    raise AssertionError(case)


BAD_CASES = ["missing_image", "png_size", "json_segment_not_in_png", "png_segment_not_in_json",
             "unknown_category", "corrupt_image", "corrupt_png"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_names_file_and_leaves_no_shard(case, synthetic_dir, tmp_path):
    root, data = _small_copy(synthetic_dir, tmp_path)
    expected = _damage(case, root, data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError) as info:
        _run_convert(root, data, out_dir)
    for text in expected:
        assert text in str(info.value), (case, str(info.value))
    assert os.listdir(out_dir) == []


def test_bad_input_from_worker_process_and_cli_exit_code(synthetic_dir, tmp_path, capsys):
    root, data = _small_copy(synthetic_dir, tmp_path)
    expected = _damage("png_segment_not_in_json", root, data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError, match=expected[1]):
        _run_convert(root, data, out_dir, num_workers=2)
    assert os.listdir(out_dir) == []
    code = cli_main(["max-deeplab", "convert", "--annotations",
                     str(root / "annotations" / "panoptic_train.json"), "--images",
                     str(root / "train"), "--panoptic", str(root / "panoptic_train"),
                     "--output", str(out_dir / "train"), "--num_workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert expected[0] in err and expected[1] in err and "Traceback" not in err
    assert os.listdir(out_dir) == []


def test_convert_reencodes_non_rgb_images(synthetic_dir, tmp_path):
    """A CMYK JPEG (COCO has a few) is stored as RGB so any decoder reads it."""
    root, data = _small_copy(synthetic_dir, tmp_path)
    jpg = root / "train" / data["images"][0]["file_name"]
    rgb = Image.open(jpg).convert("RGB")
    rgb.convert("CMYK").save(jpg, format="JPEG", quality=95)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _run_convert(root, data, out_dir)
    raw = next(iter(tf.data.TFRecordDataset(sorted(glob.glob(str(out_dir / "*.tfrecord"))))))
    image = decode_example(raw)["image"].numpy()
    reference = np.asarray(Image.open(io.BytesIO(jpg.read_bytes())).convert("RGB"))
    np.testing.assert_array_equal(image, reference)


def test_synthetic_verb_and_metadata_do_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import max_deeplab.cli.synthetic, max_deeplab.data.synthetic, "
            "max_deeplab.data.metadata, max_deeplab.data.coco_format, max_deeplab.data; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
