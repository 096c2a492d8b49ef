"""Convolution + batch norm + activation wrappers used throughout MaX-DeepLab.

Out of training each wrapper folds its batch norm into the convolution
(`batch_norm_folding`): one convolution with a scaled kernel and a bias, the same affine map.

Sub-layer attribute names (`_conv`, `_batch_norm`, `_depthwise`, `_pointwise`) and weight
names follow the reference implementation's checkpoint layout (docs/reference_checkpoints.md),
so its published checkpoints map onto ours one to one.
"""
from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.batch_norm_folding import folded_batch_norm, folds_batch_norm

BatchNormFactory = Callable[..., tfk.layers.Layer]


def get_activation(name: str | None) -> Callable[[tf.Tensor], tf.Tensor]:
    """Maps an activation name ('relu', 'gelu', 'swish', 'none'/None) to a function."""
    if name is None or name.lower() in ("none", "linear"):
        return tf.identity
    table = {
        "relu": tf.nn.relu,
        "gelu": lambda x: tf.nn.gelu(x, approximate=False),
        "approximated_gelu": lambda x: tf.nn.gelu(x, approximate=True),
        "swish": tf.nn.silu,
        "silu": tf.nn.silu,
        "elu": tf.nn.elu,
        "sigmoid": tf.nn.sigmoid,
        "softmax": tf.nn.softmax,
    }
    if name.lower() not in table:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
    return table[name.lower()]


def symmetric_padding(kernel_size: int, atrous_rate: int) -> tuple[int, int]:
    """Padding that centres a (dilated) kernel, for strided convolutions.

    Keras 'same' padding puts the extra pixel at the bottom/right for even inputs; strided
    convolutions here pad symmetrically so feature maps of size 4k+1 stay aligned with
    their input (the 641 -> 321 -> 161 -> 81 -> 41 grid).
    """
    effective = kernel_size + (kernel_size - 1) * (atrous_rate - 1)
    total = effective - 1
    return total // 2, total - total // 2


def _folds(batch_norm: tfk.layers.Layer | None, training) -> bool:
    """Whether a wrapper takes its folded inference path: a built batch norm (the first
    call builds the layers the plain way) that would use its moving statistics."""
    return batch_norm is not None and batch_norm.built and folds_batch_norm(training)


def _folded_kernel(kernel: tf.Tensor, batch_norm: tfk.layers.Layer,
                   depthwise: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """`kernel` with its output channels scaled by the inference batch norm, and the norm's
    shift as a bias, both in the kernel's dtype (the layer's compute dtype: under a
    mixed-precision policy Keras reads the kernel autocast, already rounded to bfloat16; the
    product is taken in the batch norm's float32 and rounded again). A depthwise kernel
    [h, w, C, 1] (channel multiplier 1, as `DepthwiseConvBN` builds it) scales along C."""
    scale, shift = folded_batch_norm(batch_norm)
    if depthwise:
        scale = scale[:, tf.newaxis]
    folded = tf.cast(kernel, scale.dtype) * scale
    return tf.cast(folded, kernel.dtype), tf.cast(shift, kernel.dtype)


def _convolve_normalise_activate(conv: tfk.layers.Layer, batch_norm: tfk.layers.Layer | None,
                                 activation_fn: Callable[[tf.Tensor], tf.Tensor],
                                 x: tf.Tensor, training) -> tf.Tensor:
    """activation(batch_norm(conv(x))) for `ConvBN` and `Conv1DBN`: out of training (once
    built) one convolution with the batch norm folded into its kernel and a bias."""
    if _folds(batch_norm, training):
        kernel, bias = _folded_kernel(conv.kernel, batch_norm)
        return activation_fn(tf.nn.bias_add(conv.convolution_op(x, kernel), bias))
    x = conv(x)
    if batch_norm is not None:
        x = batch_norm(x, training=training)
    return activation_fn(x)


class PaddedConv2D(tfk.layers.Conv2D):
    """A Keras `Conv2D` (same weights, same checkpoint names) whose zero padding is given per
    side, `pad` = (before, after) on both spatial axes, and applied by the convolution op
    itself (`tf.nn.conv2d`'s explicit padding).

    The same result as `tf.pad` followed by a 'valid' convolution, without the padded copy of
    the input: that copy costs a pass over the feature map, and its gradient keeps it alive
    until the backward pass (docs/memory.md, "Saved activations": MaX-DeepLab-S at 321x321
    kept 803 MiB for its backward pass with the copies, 791 MiB without).
    """

    def __init__(self, filters: int, kernel_size: int, *, pad: tuple[int, int],
                 **kwargs):
        kwargs.pop("padding", None)  # get_config() carries the parent's "valid"
        super().__init__(filters, kernel_size, padding="valid", **kwargs)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"{self.name}: strides {self.strides} with dilation "
                             f"{self.dilation_rate}: a convolution takes one or the other")
        self._pad = tuple(pad)

    def convolution_op(self, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        lo, hi = self._pad
        return tf.nn.conv2d(inputs, kernel, strides=list(self.strides),
                            padding=[[0, 0], [lo, hi], [lo, hi], [0, 0]],
                            dilations=list(self.dilation_rate))

    def _spatial_output_shape(self, spatial_input_shape):
        padded = [None if length is None else length + sum(self._pad)
                  for length in spatial_input_shape]
        return super()._spatial_output_shape(padded)

    def get_config(self) -> dict:
        return {**super().get_config(), "pad": self._pad}


class ConvBN(tfk.layers.Layer):
    """2-D convolution, optional batch norm, optional activation.

    Stride 1 uses 'same' padding; stride > 1 pads symmetrically (`symmetric_padding`) inside
    the convolution (`PaddedConv2D`).
    """

    def __init__(self, filters: int, kernel_size: int, name: str, *, strides: int = 1,
                 atrous_rate: int = 1, use_bias: bool = False, use_bn: bool = True,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 bn_gamma_initializer: str = "ones", activation: str | None = None,
                 kernel_initializer="he_normal", weight_decay: float = 0.0):
        super().__init__(name=name)
        if use_bn and use_bias:
            raise ValueError(f"{name}: a convolution followed by batch norm takes no bias")
        conv_options = dict(
            strides=strides, use_bias=use_bias, dilation_rate=atrous_rate, name="conv",
            kernel_initializer=kernel_initializer,
            kernel_regularizer=tfk.regularizers.l2(weight_decay) if weight_decay else None)
        if strides > 1:
            self._conv = PaddedConv2D(filters, kernel_size,
                                      pad=symmetric_padding(kernel_size, atrous_rate),
                                      **conv_options)
        else:
            self._conv = tfk.layers.Conv2D(filters, kernel_size, padding="same",
                                           **conv_options)
        self._batch_norm = (bn_layer(axis=3, name="batch_norm",
                                     gamma_initializer=bn_gamma_initializer)
                            if use_bn else None)
        self._activation_fn = get_activation(activation)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return _convolve_normalise_activate(self._conv, self._batch_norm,
                                            self._activation_fn, x, training)


class Conv1DBN(tfk.layers.Layer):
    """1x1 convolution over a [batch, length, channels] sequence, batch norm, activation.

    Used for every projection on the memory path (paper §3.3) and for flattened pixels.
    """

    def __init__(self, filters: int, name: str, *, use_bias: bool = False, use_bn: bool = True,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 bn_gamma_initializer="ones", activation: str | None = None,
                 kernel_initializer="he_normal", weight_decay: float = 0.0):
        super().__init__(name=name)
        if use_bn and use_bias:
            raise ValueError(f"{name}: a convolution followed by batch norm takes no bias")
        self._conv = tfk.layers.Conv1D(
            filters, 1, use_bias=use_bias, name="conv", kernel_initializer=kernel_initializer,
            kernel_regularizer=tfk.regularizers.l2(weight_decay) if weight_decay else None)
        self._batch_norm = (bn_layer(axis=2, name="batch_norm",
                                     gamma_initializer=bn_gamma_initializer)
                            if use_bn else None)
        self._activation_fn = get_activation(activation)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return _convolve_normalise_activate(self._conv, self._batch_norm,
                                            self._activation_fn, x, training)


class DepthwiseConvBN(tfk.layers.Layer):
    """Depthwise 2-D convolution (stride 1, 'same'), batch norm, activation."""

    def __init__(self, kernel_size: int, name: str, *,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 activation: str | None = "relu"):
        super().__init__(name=name)
        self._depthwise_conv = tfk.layers.DepthwiseConv2D(
            kernel_size, padding="same", use_bias=False, name="depthwise_conv")
        self._batch_norm = bn_layer(axis=3, name="batch_norm")
        self._activation_fn = get_activation(activation)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if _folds(self._batch_norm, training):
            layer = self._depthwise_conv
            kernel, bias = _folded_kernel(layer.depthwise_kernel, self._batch_norm,
                                          depthwise=True)
            y = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME",
                                       dilations=layer.dilation_rate)
            return self._activation_fn(tf.nn.bias_add(y, bias))
        return self._activation_fn(self._batch_norm(self._depthwise_conv(x), training=training))


class SeparableConvBN(tfk.layers.Layer):
    """Depthwise kxk conv-BN-act followed by pointwise 1x1 conv-BN-act."""

    def __init__(self, filters: int, kernel_size: int, name: str, *,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 activation: str | None = "relu"):
        super().__init__(name=name)
        self._depthwise = DepthwiseConvBN(kernel_size, "depthwise", bn_layer=bn_layer,
                                          activation=activation)
        self._pointwise = ConvBN(filters, 1, "pointwise", bn_layer=bn_layer,
                                 activation=activation)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self._pointwise(self._depthwise(x, training=training), training=training)


class SeparableConvBlock(tfk.layers.Layer):
    """One depthwise-separable 5x5 conv-BN-ReLU, held as `_conv1_bn_act` (head/fusion block)."""

    def __init__(self, filters: int, name: str, *, kernel_size: int = 5,
                 conv_type: str = "depthwise_separable_conv",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        if conv_type == "depthwise_separable_conv":
            self._conv1_bn_act = SeparableConvBN(filters, kernel_size, "conv1_bn_act",
                                                 bn_layer=bn_layer)
        elif conv_type == "standard_conv":
            self._conv1_bn_act = ConvBN(filters, kernel_size, "conv1_bn_act", bn_layer=bn_layer,
                                        activation="relu")
        else:
            raise ValueError(f"conv_type must be 'depthwise_separable_conv' or 'standard_conv', "
                             f"got {conv_type!r}")

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self._conv1_bn_act(x, training=training)
