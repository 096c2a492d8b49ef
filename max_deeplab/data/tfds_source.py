"""COCO panoptic through TensorFlow Datasets (``coco/2017_panoptic``) as an alternative
source to `max-deeplab convert`'s TFRecords.

The TFDS builder stores the image, the COCO panoptic PNG and ``panoptic_objects`` (COCO
segment id, contiguous ``label`` in the JSON's category order = increasing id, is_crowd).
`tfds_example_to_decoded` turns one such example into exactly the dict of
`max_deeplab.data.decode_example`, so the pipeline is the same for both sources.

The data must already be prepared in ``data_dir`` (``tfds build coco/2017_panoptic
--data_dir DIR``); nothing is downloaded here. TFDS does not record which classes are
things: COCO lists its 80 thing classes first, so the default metadata marks contiguous
classes 0..79 as things (pass the panoptic JSON for names, ids, isthing and colours).
"""
from __future__ import annotations

import json
from typing import Any

import tensorflow as tf

from max_deeplab.data import metadata as metadata_lib
from max_deeplab.data.tfrecord import panoptic_from_ids
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC, LABEL_DIVISOR, rgb_to_id

# COCO panoptic: 80 thing categories (ids 1..90) listed before 53 stuff categories.
COCO_NUM_THING_CLASSES = 80


def tfds_metadata(class_names: list[str], annotations_json: str | None = None,
                  num_thing_classes: int = COCO_NUM_THING_CLASSES,
                  label_divisor: int = LABEL_DIVISOR) -> dict[str, Any]:
    """Metadata for a TFDS panoptic builder (see the module docstring)."""
    if annotations_json is not None:
        with open(annotations_json) as f:
            categories = json.load(f)["categories"]
        if len(categories) != len(class_names):
            raise ValueError(f"{annotations_json} lists {len(categories)} categories but the "
                             f"TFDS builder has {len(class_names)} classes")
        return metadata_lib.build_metadata(categories, label_divisor, source={"tfds": True})
    # Without the JSON the COCO ids are unknown; the contiguous index + 1 stands in.
    categories = [{"id": i + 1, "name": name, "isthing": int(i < num_thing_classes)}
                  for i, name in enumerate(class_names)]
    return metadata_lib.build_metadata(categories, label_divisor,
                                       source={"tfds": True, "category_ids_known": False})


def tfds_example_to_decoded(example: dict[str, Any], is_thing: tf.Tensor,
                            label_divisor: int = LABEL_DIVISOR) -> dict[str, tf.Tensor]:
    """One ``coco/*_panoptic`` TFDS example -> the `decode_example` dict.

    Instance ids count the non-crowd thing segments of each class in annotation order
    (1, 2, ...), as the converter does; stuff gets 0 and crowd `IGNORE_PANOPTIC`.
    """
    objects = example["panoptic_objects"]
    ids = tf.cast(objects["id"], tf.int64)
    labels = tf.cast(objects["label"], tf.int32)
    crowd = tf.cast(objects["is_crowd"], tf.bool)
    counted = tf.gather(is_thing, labels) & ~crowd
    num = tf.size(labels)
    same_class = tf.equal(labels[:, None], labels[None, :])
    earlier = tf.range(num)[None, :] < tf.range(num)[:, None]
    instance = tf.reduce_sum(
        tf.cast(same_class & earlier & counted[None, :], tf.int32), axis=1) + 1
    instance = tf.where(counted, instance, 0)
    segment_panoptic = tf.where(crowd, IGNORE_PANOPTIC, labels * label_divisor + instance)
    segment_map = rgb_to_id(example["panoptic_image"])
    panoptic = panoptic_from_ids(segment_map, tf.cast(ids, tf.int32), segment_panoptic)
    area = tf.reduce_sum(tf.cast(tf.equal(segment_map[None], tf.cast(ids, tf.int32)[:, None, None]),
                                 tf.int64), axis=[1, 2])
    image = tf.ensure_shape(example["image"], [None, None, 3])
    shape = tf.shape(image)
    return {
        "image": image,
        "panoptic": panoptic,
        "image_id": tf.cast(example["image/id"], tf.int64),
        "filename": example["image/filename"],
        "height": shape[0],
        "width": shape[1],
        "segment_id": ids,
        "segment_class": labels,
        "segment_instance": instance,
        "segment_is_crowd": crowd,
        "segment_area": area,
        "segment_panoptic": segment_panoptic,
    }


def load_tfds_panoptic(name: str = "coco/2017_panoptic", split: str = "train",
                       data_dir: str | None = None, shuffle_files: bool = False,
                       annotations_json: str | None = None,
                       label_divisor: int = LABEL_DIVISOR,
                       metadata: dict[str, Any] | None = None,
                       shuffle_seed: int | None = None
                       ) -> tuple[tf.data.Dataset, dict[str, Any]]:
    """(dataset of `decode_example` dicts, metadata) from a prepared TFDS panoptic builder.

    `shuffle_seed` seeds the file shuffle (`shuffle_files`), for reproducible runs.

    `metadata` (e.g. `load_metadata` of a converted copy of the same data) overrides the
    one derived from the builder and `annotations_json`.
    """
    import tensorflow_datasets as tfds

    if metadata is None:
        builder = tfds.builder(name, data_dir=data_dir)
        names = builder.info.features["panoptic_objects"]["label"].names
        metadata = tfds_metadata(list(names), annotations_json, label_divisor=label_divisor)
    label_divisor = int(metadata["label_divisor"])
    is_thing = tf.constant(metadata_lib.is_thing_table(metadata), tf.bool)
    dataset = tfds.load(name, split=split, data_dir=data_dir, download=False,
                        shuffle_files=shuffle_files,
                        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
    dataset = dataset.map(lambda ex: tfds_example_to_decoded(ex, is_thing, label_divisor),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset, metadata
