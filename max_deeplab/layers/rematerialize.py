"""Activation rematerialisation: a layer call whose internals are recomputed in the backward
pass instead of being kept from the forward pass (docs/design.md §7, `BlockGroup.rematerialize`).

`rematerialized_call(layer, inputs, call)` runs `call(*inputs)` (which calls `layer`) under a
`tf.custom_gradient`: the forward pass keeps only the inputs and the outputs; the gradient
function runs the call again under a `tf.GradientTape` and differentiates that. The same idea
as `tf.recompute_grad`, plus what a training-mode Keras block needs to be recomputed exactly:

- State updates happen once. The recomputation runs in "replay" mode, in which the
  `add_update` of the layer and of every layer inside it does nothing: a batch norm's
  moving mean and variance are updated by the forward pass only (a plain `tf.recompute_grad`
  updates them a second time, in the backward pass). The batch statistics themselves are
  recomputed from the same inputs, so they are the same; a synchronised batch norm all-reduces
  them again (every replica recomputes alike).
- Random numbers are the same. Drop path and dropout draw from `step_random`, a function of
  the step seed: the forward pass's seed (the trainer's `step_seed_scope`) is captured and
  the recomputation runs in a scope of that same seed, even though the trainer asks for the
  gradients after its scope has closed. Outside any step scope, one random seed is drawn per
  call and used for both passes.
- Every variable gets its gradient: `tf.custom_gradient` lists the trainable variables the
  forward pass read (under a mixed-precision policy, the float32 variables behind the
  autocasting wrappers; under a `MirroredStrategy`, the replica's components), and the
  recomputation's tape watches exactly those.
- The recomputation waits for the gradients of the outputs: its inputs get a data
  dependency on all of them (an added zero), so neither grappler nor XLA can run it early,
  or merge it with the forward pass, which would keep the internals alive after all.

Replay mode is per thread (a `MirroredStrategy` runs each replica's step in its own thread,
and hands control between them inside synchronised batch norms).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.step_random import combine_seed, current_seed, step_seed_scope

_replay = threading.local()

# The instance attribute that marks a layer's `add_update` as guarded.
_GUARD = "_max_deeplab_update_guard"


def replaying() -> bool:
    """Whether this thread is recomputing a forward pass for its gradient."""
    return getattr(_replay, "depth", 0) > 0


@contextlib.contextmanager
def _replay_scope() -> Iterator[None]:
    _replay.depth = getattr(_replay, "depth", 0) + 1
    try:
        yield
    finally:
        _replay.depth -= 1


def _guard_state_updates(layer: tfk.layers.Layer) -> None:
    """Makes the `add_update` of `layer` and of every layer inside it a no-op while this
    thread replays (idempotent). Keras' batch norm registers its moving-average updates
    through `add_update` (fused or not, synchronised or not)."""
    for sublayer in [layer, *layer.submodules]:
        if not isinstance(sublayer, tfk.layers.Layer) or _GUARD in vars(sublayer):
            continue
        original = sublayer.add_update

        def add_update(updates, _original=original):
            if not replaying():
                _original(updates)

        # object.__setattr__: past Keras' attribute tracking (a function is no state).
        object.__setattr__(sublayer, "add_update", add_update)
        object.__setattr__(sublayer, _GUARD, True)


def _after(gradient: tf.Tensor) -> tf.Tensor:
    """A float32 zero that depends on `gradient` (NaN or Inf if its first element is):
    something XLA and grappler cannot fold to a constant."""
    first = tf.cast(tf.reshape(gradient, [-1])[:1], tf.float32)
    first = tf.reduce_max(first)
    return tf.where(tf.math.is_finite(first), tf.zeros_like(first), first)


def rematerialized_call(layer: tfk.layers.Layer, inputs: Sequence[tf.Tensor],
                        call: Callable[..., Sequence[tf.Tensor]]) -> tuple[tf.Tensor, ...]:
    """`tuple(call(*inputs))`, differentiated by recomputing `call` in the backward pass.

    `call` must call `layer` (already built: variables cannot be created inside a custom
    gradient) on exactly `inputs` and return float tensors; see the module docstring for
    what the recomputation preserves.
    """
    _guard_state_updates(layer)
    seed = current_seed()
    if seed is None:
        seed = combine_seed(tf.random.uniform([], maxval=1 << 32, dtype=tf.int64))
    inputs = tuple(inputs)

    @tf.custom_gradient
    def forward(*args):
        with step_seed_scope(seed):
            outputs = tuple(call(*args))

        def backward(*output_gradients, variables=None):
            read_variables = variables is not None
            variables = list(variables or [])
            output_gradients = [tf.zeros_like(output) if gradient is None else gradient
                                for output, gradient in zip(outputs, output_gradients,
                                                            strict=True)]
            # After every output's gradient, not just the first: an output nothing
            # downstream reads gets a zeros tensor from TensorFlow that depends on nothing,
            # and waiting on that alone would let the recomputation run in the forward
            # pass and keep its internals until the backward pass.
            dependency = tf.add_n([_after(gradient) for gradient in output_gradients])
            replay_inputs = [arg + tf.cast(dependency, arg.dtype) for arg in args]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(replay_inputs)
                tape.watch(variables)
                with step_seed_scope(seed), _replay_scope():
                    recomputed = tuple(call(*replay_inputs))
            gradients = tape.gradient(
                recomputed, replay_inputs + variables, output_gradients=output_gradients,
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if not read_variables:  # custom_gradient then wants the inputs' gradients only
                return gradients
            return gradients[:len(args)], gradients[len(args):]

        return outputs, backward

    return tuple(forward(*inputs))
