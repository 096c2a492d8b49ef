"""`tf.train.Example` encoding of converted images and `decode_example` (docs/design.md §6).

The schema is documented in `max_deeplab.data.schema`.
"""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from max_deeplab.data import schema
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC, rgb_to_id

_FEATURES = {
    **{key: tf.io.FixedLenFeature([], tf.int64) for key in schema.SCALAR_INT_KEYS},
    **{key: tf.io.FixedLenFeature([], tf.string) for key in schema.SCALAR_BYTES_KEYS},
    **{key: tf.io.VarLenFeature(tf.int64) for key in schema.SEGMENT_KEYS},
}


def make_example(fields: dict[str, Any]) -> tf.train.Example:
    """An Example from the fields produced by `coco_format.convert_image`."""
    feature = {}
    for key in schema.SCALAR_INT_KEYS:
        feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(fields[key])]))
    for key in schema.SCALAR_BYTES_KEYS:
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[fields[key]]))
    for key in schema.SEGMENT_KEYS:
        feature[key] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(v) for v in fields[key]]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def first_unreadable_shard(files: list[str]) -> tuple[str, str] | None:
    """(path, TensorFlow's message) of the first of `files` whose records do not read back
    (a truncated or corrupted TFRecord file: length or CRC mismatch), or None. Reads every
    record: for naming the culprit after a read failed, not as a routine check."""
    for path in files:
        try:
            tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64),
                                                 lambda count, _: count + 1)
        except tf.errors.DataLossError as e:
            return path, e.message.strip().splitlines()[0]
    return None


def panoptic_from_ids(segment_map: tf.Tensor, segment_ids: tf.Tensor,
                      segment_panoptic: tf.Tensor) -> tf.Tensor:
    """Maps a COCO segment-id map [H, W] to panoptic labels [H, W] int32.

    Pixels whose id is not among `segment_ids` (void, id 0) become `IGNORE_PANOPTIC`;
    crowd segments already carry `IGNORE_PANOPTIC` in `segment_panoptic`. A sorted search
    keeps this pure TensorFlow and O(HW log K).
    """
    order = tf.argsort(segment_ids)
    sorted_ids = tf.gather(segment_ids, order)
    sorted_values = tf.gather(segment_panoptic, order)
    flat = tf.reshape(segment_map, [-1])
    num = tf.size(sorted_ids)
    position = tf.searchsorted(sorted_ids, flat, side="left")
    position_clipped = tf.minimum(position, tf.maximum(num - 1, 0))
    padded_ids = tf.concat([sorted_ids, tf.constant([-1], sorted_ids.dtype)], 0)
    padded_values = tf.concat([sorted_values, tf.constant([IGNORE_PANOPTIC],
                                                          sorted_values.dtype)], 0)
    found = tf.equal(tf.gather(padded_ids, position_clipped), flat) & (position < num)
    values = tf.where(found, tf.gather(padded_values, position_clipped),
                      tf.constant(IGNORE_PANOPTIC, sorted_values.dtype))
    return tf.reshape(tf.cast(values, tf.int32), tf.shape(segment_map))


def decode_png_segment_map(encoded: tf.Tensor) -> tf.Tensor:
    """COCO panoptic PNG bytes -> int32 [H, W] segment ids (`panoptic_labels.rgb_to_id`)."""
    return rgb_to_id(tf.io.decode_png(encoded, channels=3))


def decode_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized Example of `max-deeplab convert` (docs/design.md §6).

    Returns:
      ``image`` uint8 [H, W, 3]; ``panoptic`` int32 [H, W] = contiguous class *
      label_divisor + instance (instance ids unique per class, 0 for stuff), with
      `panoptic_labels.IGNORE_PANOPTIC` (-1) on void and crowd pixels; ``image_id`` int64;
      ``filename`` string; ``height``, ``width`` int32; and per segment (in annotation
      order, including crowd segments) ``segment_id`` (COCO id), ``segment_class``,
      ``segment_instance``, ``segment_is_crowd`` (bool), ``segment_area``,
      ``segment_panoptic``, all [S].
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    segments = {key: tf.sparse.to_dense(parsed[key]) for key in schema.SEGMENT_KEYS}
    image = tf.io.decode_image(parsed[schema.IMAGE_ENCODED], channels=3,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    segment_map = decode_png_segment_map(parsed[schema.PANOPTIC_ENCODED])
    panoptic = panoptic_from_ids(segment_map, tf.cast(segments[schema.SEGMENTS_ID], tf.int32),
                                 tf.cast(segments[schema.SEGMENTS_PANOPTIC], tf.int32))
    return {
        "image": image,
        "panoptic": panoptic,
        "image_id": parsed[schema.IMAGE_ID],
        "filename": parsed[schema.IMAGE_FILENAME],
        "height": tf.cast(parsed[schema.IMAGE_HEIGHT], tf.int32),
        "width": tf.cast(parsed[schema.IMAGE_WIDTH], tf.int32),
        "segment_id": segments[schema.SEGMENTS_ID],
        "segment_class": tf.cast(segments[schema.SEGMENTS_CLASS], tf.int32),
        "segment_instance": tf.cast(segments[schema.SEGMENTS_INSTANCE], tf.int32),
        "segment_is_crowd": segments[schema.SEGMENTS_IS_CROWD] > 0,
        "segment_area": segments[schema.SEGMENTS_AREA],
        "segment_panoptic": tf.cast(segments[schema.SEGMENTS_PANOPTIC], tf.int32),
    }
