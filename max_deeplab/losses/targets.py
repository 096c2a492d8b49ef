"""Ground truth at the output stride for the MaX-DeepLab losses (paper §3.2, docs/design.md §4).

The data pipeline delivers full-resolution label maps (``segment_ids``, ``semantic``) with a
fixed-size segment list per image; the model predicts at stride 4. The losses therefore
bring the labels to the prediction grid themselves, by nearest-neighbour sampling on the
align-corners grid (a 641 crop gives 161 = (641 - 1) / 4 + 1 positions, i.e. every 4th
pixel), and turn the segment-index map into one-hot masks ``m_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


def align_corners_indices(in_size: int | tf.Tensor, out_size: int | tf.Tensor) -> tf.Tensor:
    """int32 [out_size]: the input index sampled by each output index on the align-corners grid.

    Output position ``i`` takes input position ``round(i * (in_size - 1) / (out_size - 1))``,
    rounding halves up, computed in integer arithmetic so it is exact for any size. When
    ``in_size = 4 * (out_size - 1) + 1`` this is exactly ``[::4]``.
    """
    in_size = tf.cast(in_size, tf.int32)
    out_size = tf.cast(out_size, tf.int32)
    numerator = tf.range(out_size, dtype=tf.int32) * (in_size - 1)
    # out_size == 1 has no spacing; its only position samples input 0.
    denominator = tf.maximum(out_size - 1, 1)
    # round(a / b) with halves up == floor((2a + b) / (2b)) for non-negative integers.
    return (2 * numerator + denominator) // (2 * denominator)


def resize_labels_nearest(labels: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Nearest-neighbour resampling of ``labels [B, H, W]`` to ``[B, height, width]``.

    Uses the align-corners grid of `align_corners_indices`, so integer labels (including the
    ``-1`` ignore value) are copied, never interpolated.
    """
    labels = tf.convert_to_tensor(labels)
    shape = tf.shape(labels)
    rows = align_corners_indices(shape[1], height)
    cols = align_corners_indices(shape[2], width)
    labels = tf.gather(labels, rows, axis=1)
    return tf.gather(labels, cols, axis=2)


class SegmentTargets(NamedTuple):
    """Per-image ground truth at the output stride.

    Attributes:
      masks: float32 [B, h, w, K] one-hot masks ``m_i`` of present segments (zero elsewhere).
      present: bool [B, K] segments that are valid and own at least one pixel at the output
        stride (a segment too small to survive the downsampling has no mask to learn, so it
        takes part in neither the matching nor any loss).
      is_thing: bool [B, K] present thing segments.
      classes: int32 [B, K] class of each segment, 0 where the segment is not present.
      pixel_segment: int32 [B, h, w] index of the pixel's present segment, -1 for void,
        crowd and padding pixels.
      labelled: float32 [B, h, w] 1 where ``pixel_segment >= 0``.
    """

    masks: tf.Tensor
    present: tf.Tensor
    is_thing: tf.Tensor
    classes: tf.Tensor
    pixel_segment: tf.Tensor
    labelled: tf.Tensor


def build_segment_targets(
    segment_ids: tf.Tensor,
    segment_classes: tf.Tensor,
    segment_valid: tf.Tensor,
    segment_is_thing: tf.Tensor,
    height: int,
    width: int,
) -> SegmentTargets:
    """One-hot ground-truth masks at the output stride from the docs/design.md §4 targets contract.

    Args:
      segment_ids: int [B, H, W], index into the segment list, -1 for void/crowd/padding.
      segment_classes: int [B, K] contiguous class per segment.
      segment_valid: bool [B, K].
      segment_is_thing: bool [B, K].
      height, width: the output-stride grid.

    Returns:
      `SegmentTargets`; all shapes static when the inputs' are, so the step compiles on TPU.
    """
    num_segments = segment_classes.shape[1]
    if num_segments is None:
        num_segments = tf.shape(segment_classes)[1]
    ids = tf.cast(resize_labels_nearest(segment_ids, height, width), tf.int32)
    valid = tf.cast(segment_valid, tf.bool)
    # one_hot maps -1 (and any out-of-range id) to an all-zero row: such pixels are unlabelled.
    masks = tf.one_hot(ids, num_segments, dtype=tf.float32)
    masks *= tf.cast(valid, tf.float32)[:, None, None, :]
    area = tf.reduce_sum(masks, axis=[1, 2])  # [B, K]
    present = valid & (area > 0.0)
    labelled = tf.reduce_sum(masks, axis=-1)  # 0/1: segments never overlap
    pixel_segment = tf.where(labelled > 0.0, ids, -1)
    classes = tf.where(present, tf.cast(segment_classes, tf.int32), 0)
    is_thing = present & tf.cast(segment_is_thing, tf.bool)
    return SegmentTargets(
        masks=masks,
        present=present,
        is_thing=is_thing,
        classes=classes,
        pixel_segment=pixel_segment,
        labelled=labelled,
    )
