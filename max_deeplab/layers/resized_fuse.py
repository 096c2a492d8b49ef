"""Feature fusion of the stacked hourglass decoder (paper §3.3, Fig. 2b).

Every input is brought to the target resolution and width: same width -> bilinear resize
only; half resolution of the input -> ReLU, stride-2 1x1 conv, BN; otherwise ReLU, 1x1 conv,
BN, bilinear resize (align corners). The results are summed and activated.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.convolutions import BatchNormFactory, ConvBN, get_activation


def resize_align_corners(x: tf.Tensor, size) -> tf.Tensor:
    """Bilinear resize with aligned corners (the 4k+1 feature grids stay registered).

    Returns x's dtype: the resize op itself always yields float32, so a 16-bit input
    (mixed precision) is resized in float32 and cast back.
    """
    if x.shape[1] == size[0] and x.shape[2] == size[1]:
        return x
    # The op behind tf.compat.v1.image.resize_bilinear (deeplab2's resize), without that
    # wrapper's deprecation warning; TF2's tf.image.resize has no align-corners mode.
    resized = tf.raw_ops.ResizeBilinear(images=tf.cast(x, tf.float32), size=size,
                                        align_corners=True, half_pixel_centers=False)
    return tf.cast(resized, x.dtype)


class ResizedFuse(tfk.layers.Layer):
    """Fuses features of any strides/widths into one map of `num_channels` channels.

    Args:
      num_channels: output width.
      input_strides: stride of each input, and `target_stride`: the output stride; a
        projection is a stride-2 conv exactly when the target is half the input resolution.
    """

    def __init__(self, name: str, num_channels: int, input_strides: list[int],
                 target_stride: int, activation: str = "relu",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        self._num_channels = num_channels
        self._input_strides = list(input_strides)
        self._target_stride = target_stride
        self._activation_fn = get_activation(activation)
        self._bn_layer = bn_layer

    def build(self, input_shapes):
        for index, (shape, stride) in enumerate(zip(input_shapes, self._input_strides)):
            if int(shape[-1]) == self._num_channels:
                continue
            if self._target_stride == 2 * stride:
                setattr(self, f"_strided_conv_bn{index + 1}", ConvBN(
                    self._num_channels, 1, f"strided_conv_bn{index + 1}", strides=2,
                    bn_layer=self._bn_layer))
            else:
                setattr(self, f"_resized_conv_bn{index + 1}", ConvBN(
                    self._num_channels, 1, f"resized_conv_bn{index + 1}",
                    bn_layer=self._bn_layer))
        super().build(input_shapes)

    def call(self, inputs, target_size, training: bool | None = None) -> tf.Tensor:
        outputs = []
        for index, (feature, stride) in enumerate(zip(inputs, self._input_strides)):
            if feature.shape[-1] == self._num_channels:
                outputs.append(resize_align_corners(feature, target_size))
            elif self._target_stride == 2 * stride:
                conv = getattr(self, f"_strided_conv_bn{index + 1}")
                outputs.append(conv(self._activation_fn(feature), training=training))
            else:
                conv = getattr(self, f"_resized_conv_bn{index + 1}")
                outputs.append(resize_align_corners(
                    conv(self._activation_fn(feature), training=training), target_size))
        return self._activation_fn(tf.add_n(outputs))
