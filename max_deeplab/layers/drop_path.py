"""Drop path (stochastic depth): residual branches dropped per sample during training.

Paper §4 trains with "a drop path rate of 0.2", i.e. keep probability 0.8, which
`BlockGroup` applies to every residual branch at nominal stride >= 16 (`drop_path_schedule
= "constant"`, the default). The reference implementation (deeplab2) also offers a linear
schedule over depth, selectable here as `"linear"`: see `constant_or_linear_keep_prob`.

The masks come from `step_random.step_uniform`: inside a training step they are a function
of (step seed, block, sample), the same with and without XLA and in a recomputation.
"""
from __future__ import annotations

import tensorflow as tf

from max_deeplab.layers.step_random import step_uniform


def drop_path_mask(x: tf.Tensor, keep_prob: float, site: str) -> tf.Tensor:
    """A [batch, 1, ..., 1] mask of 0 or 1/keep_prob, so the expected branch is unchanged.

    `site` names the call site (its block and branch); inside a training step the mask
    depends only on (step seed, site, sample index). Drawn in float32 and cast to x's
    dtype: in bfloat16, keep_prob + u would round (0.8 is 0.80078125 there, and sums near 1
    land on a coarse grid), biasing the keep rate.
    """
    shape = [tf.shape(x)[0]] + [1] * (x.shape.rank - 1)
    keep = tf.floor(keep_prob + step_uniform(shape, site))
    return tf.cast(keep / keep_prob, x.dtype)


def constant_or_linear_keep_prob(keep_prob: float, schedule: str, stage: int,
                                 num_stages: int = 4) -> float:
    """Keep probability of the blocks of `stage` (1 = stride 4, 2 = stride 8, 3 = stride 16,
    4 = stride 32; `BlockGroup` passes log2(nominal stride) - 1).

    "constant" (the paper's "drop path rate of 0.2"): `keep_prob` for every stage.
    "linear" (the reference implementation's option): 1 - (1 - keep_prob) * stage / 4, i.e.
    with keep_prob 0.8: 0.95 at stride 4, 0.9 at 8, 0.85 at 16 and 0.8 at 32. Either way
    only blocks at stride >= `BlockGroup.drop_path_beyond_stride` (16 in the paper's
    configs, 4 in MaX-DeepLab-L's) drop paths at all.
    """
    if schedule == "constant":
        return keep_prob
    if schedule == "linear":
        return 1.0 - (1.0 - keep_prob) * stage / num_stages
    raise ValueError(f"drop path schedule must be 'constant' or 'linear', got {schedule!r}")
