"""The bundled sample data set (data/samples/shapes, docs/design.md §2) is a valid COCO
panoptic set.

It is what users look at first and what the data README points the tools at, so: every PNG
segment is in its JSON and the reverse (the `pq` checks), and the set scores a perfect PQ
against itself with the categories it contains; the converter reads every image.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from max_deeplab.evaluation.coco_panoptic import pq_compute

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                       "samples", "shapes")


@pytest.mark.parametrize("split", ["train", "val"])
def test_bundled_split_scores_perfectly_against_itself(split):
    gt_json = os.path.join(SAMPLES, "annotations", f"panoptic_{split}.json")
    png_dir = os.path.join(SAMPLES, f"panoptic_{split}")
    with open(gt_json) as f:
        data = json.load(f)
    assert len(data["annotations"]) == 3
    present = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]
               if not s.get("iscrowd", 0)}
    result = pq_compute(gt_json, png_dir, gt_json, png_dir, num_workers=1)
    assert result["All"]["n"] == len(present) > 0
    for key in ("pq", "sq", "rq"):
        assert result["All"][key] == pytest.approx(1.0, abs=1e-12)
    for split_images in data["images"]:
        assert os.path.isfile(os.path.join(SAMPLES, split, split_images["file_name"]))


def test_bundled_split_converts(tmp_path):
    import tensorflow as tf

    from max_deeplab.data import decode_example
    from max_deeplab.data.converter import convert

    prefix = str(tmp_path / "val")
    convert(os.path.join(SAMPLES, "annotations", "panoptic_val.json"),
            os.path.join(SAMPLES, "val"), os.path.join(SAMPLES, "panoptic_val"), prefix,
            num_shards=1, num_workers=1, log=lambda line: None)

    records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(prefix + "-*.tfrecord")))
    assert len(records) == 3
    for record in records:
        example = decode_example(record)
        assert tuple(example["image"].shape) == (129, 161, 3)
        panoptic = example["panoptic"].numpy()
        assert panoptic.shape == (129, 161) and (panoptic >= 0).mean() > 0.5
        assert np.unique(panoptic[panoptic >= 0]).size >= 2
