"""Residual blocks of the pixel path (P2P): conv bottleneck, conv basic and axial blocks.

Paper appendix A.6: MaX-DeepLab-S replaces the 3x3 convolution of ResNet-50's bottleneck by
2-D axial attention in the last two stages; MaX-DeepLab-L uses Wide-ResNet basic blocks and
wide axial blocks. Every block returns both its pre-activation output (the stacked decoder
fuses non-activated features) and its activated output.
"""
from __future__ import annotations

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.axial_attention import AxialAttention2D
from max_deeplab.layers.convolutions import BatchNormFactory, ConvBN, get_activation
from max_deeplab.layers.drop_path import drop_path_mask


@gin.configurable
class ResidualBlock(tfk.layers.Layer):
    """A residual block: bottleneck (3 filters), basic (2 filters) or axial bottleneck.

    Args:
      filters_list: [1x1, 3x3-or-attention, 1x1] filters for a bottleneck, or [3x3, 3x3]
        for a basic block.
      strides: applied by the first spatial operation (3x3 conv or attention).
      atrous_rate: dilation of the 3x3 convolutions (used instead of striding beyond the
        output stride).
      attention_type: None for convolution, 'axial' for 2-D axial attention (P2P).
      drop_path_keep_prob: keep probability of the residual branch during training.
      drop_path_site: the block's name in the network, which keys its drop-path masks
        (see `drop_path`); default: the layer name.
      axial_layer_config: keyword arguments of `AxialAttention2D`.
      basic_block_second_conv_atrous_rate: dilation of a basic block's second 3x3 conv.
    """

    def __init__(self, filters_list: list[int], name: str, *, strides: int = 1,
                 atrous_rate: int = 1, attention_type: str | None = None,
                 drop_path_keep_prob: float = 1.0, drop_path_site: str | None = None,
                 activation: str = "relu", axial_layer_config: dict | None = None,
                 basic_block_second_conv_atrous_rate: int | None = None,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        self._filters_list = list(filters_list)
        self._strides = strides
        self._attention_type = attention_type
        self._drop_path_keep_prob = drop_path_keep_prob
        self._drop_path_site = drop_path_site or name
        self._bn_layer = bn_layer
        self._activation_fn = get_activation(activation)
        if basic_block_second_conv_atrous_rate is None:
            basic_block_second_conv_atrous_rate = atrous_rate
        if len(filters_list) == 3:
            self._conv1_bn_act = ConvBN(filters_list[0], 1, "conv1_bn_act", bn_layer=bn_layer,
                                        activation=activation)
            if attention_type is None:
                self._conv2_bn_act = ConvBN(filters_list[1], 3, "conv2_bn_act", strides=strides,
                                            atrous_rate=atrous_rate, bn_layer=bn_layer,
                                            activation=activation)
            elif attention_type == "axial":
                self._attention = AxialAttention2D(filters_list[1], strides=strides,
                                                   name="attention", bn_layer=bn_layer,
                                                   **(axial_layer_config or {}))
            else:
                raise ValueError(f"attention_type must be None or 'axial', got "
                                 f"{attention_type!r}")
            # Zero-initialised gamma: every residual block starts as an identity mapping.
            self._conv3_bn = ConvBN(filters_list[2], 1, "conv3_bn", bn_layer=bn_layer,
                                    bn_gamma_initializer="zeros")
        elif len(filters_list) == 2:
            if attention_type is not None:
                raise ValueError("a basic (two-conv) block cannot use attention")
            self._conv1_bn_act = ConvBN(filters_list[0], 3, "conv1_bn_act", strides=strides,
                                        atrous_rate=atrous_rate, bn_layer=bn_layer,
                                        activation=activation)
            self._conv2_bn = ConvBN(filters_list[1], 3, "conv2_bn",
                                    atrous_rate=basic_block_second_conv_atrous_rate,
                                    bn_layer=bn_layer, bn_gamma_initializer="zeros")
        else:
            raise ValueError(f"filters_list must have 2 or 3 entries, got {filters_list}")

    def build(self, input_shape):
        self._shortcut = None
        if int(input_shape[-1]) != self._filters_list[-1]:
            self._shortcut = ConvBN(self._filters_list[-1], 1, "shortcut",
                                    strides=self._strides, bn_layer=self._bn_layer)
        super().build(input_shape)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        shortcut = x
        if self._shortcut is not None:
            shortcut = self._shortcut(x, training=training)
        elif self._strides > 1:
            shortcut = x[:, ::self._strides, ::self._strides]
        if len(self._filters_list) == 3:
            y = self._conv1_bn_act(x, training=training)
            if self._attention_type is None:
                y = self._conv2_bn_act(y, training=training)
            else:
                y = self._activation_fn(self._attention(y, training=training))
            y = self._conv3_bn(y, training=training)
        else:
            y = self._conv2_bn(self._conv1_bn_act(x, training=training), training=training)
        if training and self._drop_path_keep_prob < 1.0:
            y = y * drop_path_mask(y, self._drop_path_keep_prob, self._drop_path_site)
        y = y + shortcut
        return y, self._activation_fn(y)
