"""The batch the training-step benchmarks run MaX-DeepLab on (`bench_train_step.py`,
`saved_activations.py`): one random crop x crop image with 8 ground-truth segments (ids
drawn per pixel, some void) of random classes, half of the slots things, the semantic map
derived from the segments. Fixed by a numpy seed, so both benchmarks see the same labels."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def synthetic_step_batch(model, crop: int) -> dict[str, tf.Tensor]:
    """The batch of one `crop` x `crop` image for `model` (its classes and mask slots)."""
    num_classes = model.num_classes
    slots = model.encoder._num_mask_slots
    rng = np.random.default_rng(0)
    k = min(8, slots)
    segment_ids = rng.integers(-1, k, size=(1, crop, crop)).astype(np.int32)
    return {
        "image": tf.random.uniform([1, crop, crop, 3], 0, 255),
        "segment_ids": tf.constant(segment_ids),
        "segment_classes": tf.constant(rng.integers(0, num_classes, (1, slots)), tf.int32),
        "segment_valid": tf.constant(np.arange(slots)[None] < k),
        "segment_is_thing": tf.constant(np.arange(slots)[None] % 2 == 0),
        "semantic": tf.constant(np.where(segment_ids >= 0, segment_ids % num_classes, -1),
                                tf.int32),
    }
