"""The panoptic label contract (`max_deeplab.panoptic_labels`): the COCO PNG id colours, and
the data and prediction encodings of label maps."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from max_deeplab import panoptic_labels
from max_deeplab.panoptic_labels import (
    IGNORE_PANOPTIC,
    LABEL_DIVISOR,
    data_to_prediction_encoding,
    id_to_rgb,
    rgb_to_id,
)


def test_png_ids_round_trip_through_their_colours():
    ids = np.array([[0, 1, 255, 256 + 2], [65536 * 3 + 5, 2**24 - 1, 4096, 77]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    np.testing.assert_array_equal(rgb[0, 3], [2, 1, 0])
    np.testing.assert_array_equal(rgb[1, 0], [5, 0, 3])
    np.testing.assert_array_equal(rgb_to_id(rgb), ids)
    # A TensorFlow tensor (e.g. a decoded PNG) gives the same ids, as int32.
    from_tensor = rgb_to_id(tf.constant(rgb))
    assert from_tensor.dtype == tf.int32
    np.testing.assert_array_equal(from_tensor.numpy(), ids)
    # A single id (a message naming a segment) gives its colour as a tuple.
    assert id_to_rgb(65536 * 3 + 256 * 2 + 1) == (1, 2, 3)


def test_data_encoding_maps_to_the_prediction_encoding():
    data = tf.constant([[3 * LABEL_DIVISOR, 5 * LABEL_DIVISOR + 2],
                        [IGNORE_PANOPTIC, 0 * LABEL_DIVISOR + 1]])
    got = data_to_prediction_encoding(data).numpy()
    offset, void = panoptic_labels.PREDICTION_LABEL_OFFSET, panoptic_labels.PREDICTION_VOID
    np.testing.assert_array_equal(got, [[(3 + offset) * LABEL_DIVISOR,
                                         (5 + offset) * LABEL_DIVISOR + 2],
                                        [void, (0 + offset) * LABEL_DIVISOR + 1]])
    # Another divisor (a data set's own) shifts labels by that divisor.
    np.testing.assert_array_equal(
        data_to_prediction_encoding(tf.constant([[2 * 1000 + 7, -1]]), 1000).numpy(),
        [[3 * 1000 + 7, 0]])
