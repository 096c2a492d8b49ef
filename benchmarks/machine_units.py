"""The benchmark time unit: one 4096x4096 float32 matmul timed in the same process.

docs/design.md §8 states performance targets in these units (0.67 s, ~205 GFLOP/s on the
reference machine) so that ratios stay comparable across machines.
"""
from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

MATMUL_N = 4096


def median_seconds(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_unit(repeats: int = 5) -> tuple[float, float]:
    """(seconds of one 4096^3 fp32 matmul, its FLOP/s): the machine's practical peak."""
    a = tf.random.normal([MATMUL_N, MATMUL_N])
    b = tf.random.normal([MATMUL_N, MATMUL_N])
    matmul = tf.function(lambda: tf.matmul(a, b))
    seconds = median_seconds(lambda: matmul().numpy(), repeats=repeats)
    return seconds, 2 * MATMUL_N ** 3 / seconds
