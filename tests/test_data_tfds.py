"""COCO panoptic through TFDS (`coco/2017_panoptic`), mocked offline with
`tfds.testing.mock_data`: the TFDS path yields exactly what `decode_example` yields for the
same images converted by `max-deeplab convert`."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from max_deeplab.data import build_dataset, convert, decode_example, load_metadata
from max_deeplab.data.synthetic import write_dataset
from max_deeplab.data.tfds_source import load_tfds_panoptic, tfds_metadata


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(root, 4, seed=5, height=40, width=48, num_val_images=0)
    prefix = os.path.join(root, "records", "train")
    convert(os.path.join(root, "annotations", "panoptic_train.json"), os.path.join(root, "train"),
            os.path.join(root, "panoptic_train"), prefix, num_shards=1, num_workers=1,
            log=lambda _: None)
    return root, prefix


def _tfds_examples(root):
    """The synthetic split as the TFDS coco/2017_panoptic builder would store it."""
    with open(os.path.join(root, "annotations", "panoptic_train.json")) as f:
        data = json.load(f)
    label = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    images = {i["id"]: i for i in data["images"]}
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        with open(os.path.join(root, "train", image["file_name"]), "rb") as f:
            pixels = tf.io.decode_jpeg(f.read(), channels=3).numpy()
        segs = ann["segments_info"]
        yield {
            "image": pixels,
            "image/filename": image["file_name"],
            "image/id": image["id"],
            "panoptic_image": np.asarray(Image.open(os.path.join(root, "panoptic_train",
                                                                 ann["file_name"]))),
            "panoptic_image/filename": ann["file_name"],
            "panoptic_objects": {
                "id": np.array([s["id"] for s in segs], np.int64),
                "area": np.array([s["area"] for s in segs], np.int64),
                "bbox": np.zeros((len(segs), 4), np.float32),
                "label": np.array([label[s["category_id"]] for s in segs], np.int64),
                "is_crowd": np.array([bool(s["iscrowd"]) for s in segs]),
            },
        }


def _mock(root):
    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_generator(
            lambda: _tfds_examples(root),
            output_signature=self.info.features.get_tensor_spec())
    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_tfds_source_matches_decode_example(source, tmp_path):
    root, prefix = source
    metadata = load_metadata(prefix)
    expected = {}
    for raw in tf.data.TFRecordDataset(sorted(glob.glob(prefix + "-*.tfrecord"))):
        out = decode_example(raw)
        expected[int(out["image_id"])] = out
    with _mock(root):
        dataset, used = load_tfds_panoptic("coco/2017_panoptic", "train",
                                           data_dir=str(tmp_path), metadata=metadata)
        got = {int(ex["image_id"]): ex for ex in dataset}
    assert used is metadata
    assert sorted(got) == sorted(expected)
    for image_id, ex in got.items():
        ref = expected[image_id]
        for key in ("image", "panoptic", "segment_id", "segment_class", "segment_instance",
                    "segment_is_crowd", "segment_area", "segment_panoptic", "height", "width"):
            np.testing.assert_array_equal(ex[key].numpy(), ref[key].numpy(), err_msg=key)
            assert ex[key].dtype == ref[key].dtype, key


def test_tfds_default_metadata_marks_coco_things_first(source, tmp_path):
    names = [str(i) for i in range(133)]
    metadata = tfds_metadata(names)
    assert metadata["num_classes"] == 133 and metadata["thing_classes"] == list(range(80))
    root, _ = source
    with _mock(root):
        dataset = build_dataset("tfds:coco/2017_panoptic:train", True, 2, crop_size=(25, 33),
                                k_max=10, tfds_data_dir=str(tmp_path))
        batch = next(iter(dataset))
    assert batch["image"].shape == (2, 25, 33, 3) and batch["segment_ids"].shape == (2, 25, 33)
    assert batch["segment_classes"].shape == (2, 10)
    # TFDS carries no isthing: with the COCO default every synthetic class (0..7) is a thing.
    np.testing.assert_array_equal(batch["segment_is_thing"].numpy(),
                                  batch["segment_valid"].numpy())
