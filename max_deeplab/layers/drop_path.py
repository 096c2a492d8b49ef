"""Drop path (stochastic depth): residual branches dropped per sample during training.

Paper §4 trains with drop path 0.2 (keep probability 0.8) beyond stride 16.
"""
from __future__ import annotations

import tensorflow as tf


def drop_path_mask(x: tf.Tensor, keep_prob: float) -> tf.Tensor:
    """A [batch, 1, ..., 1] mask of 0 or 1/keep_prob, so the expected branch is unchanged.

    Drawn in float32 and cast to x's dtype: in bfloat16, keep_prob + u would round (0.8 is
    0.80078125 there, and sums near 1 land on a coarse grid), biasing the keep rate.
    """
    shape = [tf.shape(x)[0]] + [1] * (x.shape.rank - 1)
    keep = tf.floor(keep_prob + tf.random.uniform(shape, dtype=tf.float32))
    return tf.cast(keep / keep_prob, x.dtype)


def constant_or_linear_keep_prob(keep_prob: float, schedule: str, stage: int,
                                 num_stages: int = 4) -> float:
    """Keep probability of a stage: 'constant', or 'linear' from 1 at stage 0 to keep_prob."""
    if schedule == "constant":
        return keep_prob
    if schedule == "linear":
        return 1.0 - (1.0 - keep_prob) * stage / num_stages
    raise ValueError(f"drop path schedule must be 'constant' or 'linear', got {schedule!r}")
