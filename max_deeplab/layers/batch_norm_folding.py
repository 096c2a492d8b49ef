"""Inference-mode batch norm folded into the layer before it (docs/design.md §8).

Out of training a batch norm is a fixed per-channel affine map, x * scale + shift. A
convolution or projection followed by it is therefore the same convolution with its kernel's
output channels multiplied by `scale`, plus `shift` as a bias: one op (oneDNN fuses conv +
bias + ReLU) instead of the convolution and two elementwise passes over its output. The
convolution wrappers (`convolutions.py`) and the axial attention fold this way whenever Keras
would normalise with the moving statistics; training takes the unfolded path.

The fold is the same affine map with its rounding in another place. An untrained network
can amplify that: the reference implementation's tiny checkpoint moves its mask logits by
5e-4 of their spread when its input changes by one float32 rounding (1e-7 relative), and
folding moves them by 1e-3 (`tests/test_reference_import.py`). `batch_norm_folding.enabled
= False` (gin) keeps the reference's order of operations (convolution, then batch norm) for
a digit-by-digit comparison with it.
"""
from __future__ import annotations

import gin
import tensorflow as tf
import tf_keras as tfk


@gin.configurable
def batch_norm_folding(enabled: bool = True) -> bool:
    """Whether inference folds batch norms into the layers before them (default on)."""
    return bool(enabled)


def uses_moving_statistics(training) -> bool:
    """True when Keras batch norm would normalise with its moving statistics (a Python
    `training` flag that is false, or the learning phase when it is None). A symbolic flag
    gives False: the caller takes the general, unfolded path, which handles it."""
    if training is None:
        training = tfk.backend.learning_phase()
    if isinstance(training, (bool, int)):
        return not training
    return False


def folds_batch_norm(training) -> bool:
    """Whether a layer folds its batch norms for this call: folding is enabled
    (`batch_norm_folding`) and batch norm would use its moving statistics."""
    return batch_norm_folding() and uses_moving_statistics(training)


def folded_batch_norm(bn: tfk.layers.Layer) -> tuple[tf.Tensor, tf.Tensor]:
    """(scale, shift) such that inference-mode BN(x) = x * scale + shift (Keras' formula), in
    the batch norm's parameter dtype (float32 also under a mixed-precision policy)."""
    scale = tf.math.rsqrt(bn.moving_variance + bn.epsilon)
    if bn.gamma is not None:
        scale = scale * bn.gamma
    shift = -bn.moving_mean * scale
    if bn.beta is not None:
        shift = shift + bn.beta
    return scale, shift
