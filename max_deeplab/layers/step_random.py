"""Randomness of a training step that is a pure function of (seed, call site, index).

Inside a training step the trainer opens `step_seed_scope(seed)` with a seed made of (run
seed, step, replica). The stochastic layers (drop path, the semantic decoder's dropout) then
draw their random numbers with `hashed_uniform`: integer hashing of the seed, a stable name
of the call site and each element's index. So:
- the numbers are the same with and without XLA (TF's random ops give other numbers under
  `jit_compile`, and ignore their seeds there), which makes `train --jit_compile`
  reproduce a plain run;
- a recomputation of the forward pass (activation rematerialisation) draws the same ones;
- a seeded run (`train --seed`) is reproducible.
Outside such a scope (a bare `model(x, training=True)`) the layers use TF's random ops.
"""
from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator

import tensorflow as tf

_state = threading.local()  # replica steps of a MirroredStrategy run in their own threads

# "lowbias32" integer hash constants (C. Wellons, hash-prospector); the golden-ratio
# increment separates consecutive inputs before mixing.
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A bijective avalanche mix of uint32 values (identical on every device and in XLA)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(_MULTIPLIER_1, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(_MULTIPLIER_2, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def combine_seed(*parts: int | tf.Tensor) -> tf.Tensor:
    """One uint32 seed from integers (Python ints or integer tensors of any width: their
    low 32 bits are used), order-sensitive."""
    seed = tf.constant(0, tf.uint32)
    for part in parts:
        if isinstance(part, int):
            value = tf.constant(part & 0xFFFFFFFF, tf.uint32)
        else:
            value = tf.cast(tf.bitwise.bitwise_and(tf.cast(part, tf.int64), 0xFFFFFFFF),
                            tf.uint32)
        seed = _mix(tf.bitwise.bitwise_xor(seed, _mix(value + tf.constant(_GOLDEN, tf.uint32))))
    return seed


def site_key(name: str) -> int:
    """A call site's 32-bit key, stable across processes (unlike Python's str hash)."""
    return zlib.crc32(name.encode("utf-8"))


def hashed_uniform(seed: tf.Tensor, site: str, shape: tf.Tensor | list) -> tf.Tensor:
    """float32 values in [0, 1) of `shape`, a pure function of (seed, site, element index)."""
    key = combine_seed(seed, site_key(site))
    index = tf.range(tf.reduce_prod(shape), dtype=tf.int32)
    bits = _mix(tf.bitwise.bitwise_xor(_mix(tf.cast(index, tf.uint32) + tf.constant(
        _GOLDEN, tf.uint32)), key))
    # The top 24 bits: exactly representable in float32, so the values stay below 1.
    uniform = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
    return tf.reshape(uniform, shape)


@contextlib.contextmanager
def step_seed_scope(seed: tf.Tensor) -> Iterator[None]:
    """Within: the stochastic layers draw from `seed` (uint32 scalar), see the module
    docstring."""
    previous = getattr(_state, "seed", None)
    _state.seed = seed
    try:
        yield
    finally:
        _state.seed = previous


def current_seed() -> tf.Tensor | None:
    """The seed of the enclosing `step_seed_scope`, or None outside one (rematerialisation
    captures it at the forward pass and reopens the scope for the recomputation)."""
    return getattr(_state, "seed", None)


def step_uniform(shape: tf.Tensor | list, site: str) -> tf.Tensor:
    """Uniform [0, 1) float32 values for call site `site`: `hashed_uniform` of the scope's
    seed inside `step_seed_scope`, else TF's stateful generator."""
    seed = getattr(_state, "seed", None)
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    return hashed_uniform(seed, site, shape)


def dropout(x: tf.Tensor, rate: float, site: str, training: bool | None) -> tf.Tensor:
    """Inverted dropout of `x` (as `tf_keras.layers.Dropout`) drawing from `step_uniform`."""
    if not training or rate <= 0.0:
        return x
    keep = tf.cast(step_uniform(tf.shape(x), site) >= rate, x.dtype)
    return x * keep / tf.cast(1.0 - rate, x.dtype)


