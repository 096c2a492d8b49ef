"""The panoptic label contract: how a label map encodes class and instance, and how a COCO
panoptic PNG encodes a segment (docs/design.md §9). Every module that writes or reads panoptic
labels takes its constants and conversions from here.

Label maps are ``panoptic = label * label_divisor + instance``: instance 1, 2, ... for
thing segments (unique per class within an image), 0 for stuff segments. Two encodings:

* the *data* encoding (`max-deeplab convert`'s metadata and Example schema,
  `max_deeplab.data.decode_example`, the input pipeline's ``panoptic`` maps): label =
  contiguous class 0..C−1; void and crowd pixels are `IGNORE_PANOPTIC` (−1);
* the *prediction* encoding (`max_deeplab.inference.postprocess`, the SavedModel's
  outputs, the evaluator's maps): label = contiguous class + `PREDICTION_LABEL_OFFSET` (1,
  deeplab2's COCO label space); void pixels are `PREDICTION_VOID` (0).

`LABEL_DIVISOR` (256) is the default divisor of both; a data set records its own in its
metadata (``label_divisor``), which training, evaluation and export use.

COCO panoptic PNGs store a segment id per pixel as id = R + 256 G + 256² B (0 = void, ids
below 2**24): `rgb_to_id` / `id_to_rgb`.

TensorFlow-free and numpy-free at import (the `pq` verb imports neither); the conversions
import what their argument needs.
"""
from __future__ import annotations

from typing import Any

# panoptic = label * LABEL_DIVISOR + instance; COCO has at most ~100 instances of one class
# in an image, so 256 leaves room (deeplab2's COCO label divisor too).
LABEL_DIVISOR = 256
# Data encoding: the value of void pixels (unlabelled in COCO: PNG id 0) and crowd pixels;
# every loss term and the evaluation skip them.
IGNORE_PANOPTIC = -1
# Prediction encoding: label = contiguous class + PREDICTION_LABEL_OFFSET; void = 0.
PREDICTION_LABEL_OFFSET = 1
PREDICTION_VOID = 0
# A COCO PNG id has three 8-bit channels.
PNG_ID_BITS = 24


def rgb_to_id(rgb: Any) -> Any:
    """COCO panoptic PNG colours [..., 3] -> segment ids [...] (id = R + 256 G + 256² B).

    `rgb`: a numpy array (ids come back uint32) or a TensorFlow tensor (int32), of any
    integer type (uint8 is widened first).
    """
    import numpy as np

    if isinstance(rgb, np.ndarray):
        rgb = rgb.astype(np.uint32)
    else:
        import tensorflow as tf

        rgb = tf.cast(rgb, tf.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: Any) -> Any:
    """Inverse of `rgb_to_id`: segment ids (< 2**24) -> uint8 [..., 3] colours; an (R, G, B)
    tuple for a Python int (e.g. to name a segment in a message)."""
    if isinstance(ids, int):
        return ids % 256, ids // 256 % 256, ids // 65536 % 256
    import numpy as np

    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def data_to_prediction_encoding(panoptic: Any, label_divisor: int = LABEL_DIVISOR) -> Any:
    """A data-encoded label map (TensorFlow tensor) in the prediction encoding: the same
    segments, labels shifted by `PREDICTION_LABEL_OFFSET`, void `PREDICTION_VOID`."""
    import tensorflow as tf

    panoptic = tf.cast(panoptic, tf.int32)
    return tf.where(panoptic >= 0, panoptic + PREDICTION_LABEL_OFFSET * label_divisor,
                    PREDICTION_VOID)
