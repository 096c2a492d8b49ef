"""One MirroredStrategy over the 2 logical CPUs (tests/conftest.py) per test process.

Several MirroredStrategy objects over the same devices in one process reuse collective
group/instance keys, and a later strategy's all-reduce then fails with "Shape mismatch in
the collective instance"; tests share this one instead.
"""
from __future__ import annotations

import functools

import tensorflow as tf


@functools.lru_cache(maxsize=1)
def mirrored_two_cpus() -> tf.distribute.MirroredStrategy | None:
    """The shared strategy, or None if fewer than 2 logical CPUs are configured."""
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        return None
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
