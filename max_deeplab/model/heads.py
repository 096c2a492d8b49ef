"""Output heads of MaX-DeepLab (paper §3.3 "Output heads", Fig. 2a) and the auxiliary
semantic decoder used when the semantic head sits on a stride-16 backbone feature.
"""
from __future__ import annotations

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.convolutions import BatchNormFactory, ConvBN, SeparableConvBlock
from max_deeplab.layers.resized_fuse import resize_align_corners
from max_deeplab.layers.step_random import dropout as step_dropout


class ConvHead(tfk.layers.Layer):
    """5x5 depthwise-separable conv-BN-ReLU (`conv_block`) then a 1x1 conv with bias
    (`final_conv`). Used for the pixel-space (mask feature) head and the semantic head."""

    def __init__(self, intermediate_channels: int, output_channels: int, name: str, *,
                 conv_type: str = "depthwise_separable_conv",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 final_initializer=None):
        super().__init__(name=name)
        self.conv_block = SeparableConvBlock(intermediate_channels, "conv_block",
                                             conv_type=conv_type, bn_layer=bn_layer)
        self.final_conv = tfk.layers.Conv2D(
            output_channels, 1, name="final_conv",
            kernel_initializer=final_initializer or tfk.initializers.TruncatedNormal(
                stddev=0.01))

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self.final_conv(self.conv_block(x, training=training))


class _ASPPBranch(tfk.layers.Layer):
    """One ASPP branch holding a single conv-BN-ReLU as `_conv_bn_act`."""

    def __init__(self, channels: int, kernel_size: int, atrous_rate: int, name: str,
                 bn_layer: BatchNormFactory):
        super().__init__(name=name)
        self._conv_bn_act = ConvBN(channels, kernel_size, "conv_bn_act", atrous_rate=atrous_rate,
                                   bn_layer=bn_layer, activation="relu")

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self._conv_bn_act(x, training=training)


class ASPP(tfk.layers.Layer):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and image pooling branches."""

    def __init__(self, channels: int, atrous_rates=(6, 12, 18), name: str = "aspp",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 dropout: float = 0.1):
        super().__init__(name=name)
        if len(atrous_rates) != 3:
            raise ValueError(f"ASPP needs exactly 3 atrous rates, got {list(atrous_rates)}")
        self._conv_bn_act = ConvBN(channels, 1, "conv_bn_act", bn_layer=bn_layer,
                                   activation="relu")
        for i, rate in enumerate(atrous_rates):
            setattr(self, f"_aspp_conv{i + 1}",
                    _ASPPBranch(channels, 3, rate, f"aspp_conv{i + 1}", bn_layer))
        self._aspp_pool = _ASPPBranch(channels, 1, 1, "aspp_pool", bn_layer)
        self._proj_conv_bn_act = ConvBN(channels, 1, "proj_conv_bn_act", bn_layer=bn_layer,
                                        activation="relu")
        self._dropout = dropout

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        branches = [self._conv_bn_act(x, training=training)]
        for i in range(3):
            branches.append(getattr(self, f"_aspp_conv{i + 1}")(x, training=training))
        # Global image pooling (equal to the reference's crop-sized pooling at the crop size),
        # averaged in float32 (a 16-bit sum over the whole image would lose precision).
        pooled = tf.cast(tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2], keepdims=True),
                         x.dtype)
        pooled = self._aspp_pool(pooled, training=training)
        branches.append(tf.broadcast_to(pooled, tf.concat(
            [tf.shape(x)[:3], tf.shape(pooled)[3:]], axis=0)))
        y = self._proj_conv_bn_act(tf.concat(branches, axis=3), training=training)
        # Drawn from the training step's seed (same numbers under XLA; see step_random).
        return step_dropout(y, self._dropout, f"{self.name}/projection_dropout", training)


@gin.configurable
class SemanticDecoder(tfk.layers.Layer):
    """DeepLab-style decoder (ASPP on the stride-16 feature, fused with res3 and res2) that
    brings the auxiliary semantic head to stride 4 when the decoder stack is empty (L = 0).
    """

    def __init__(self, aspp_channels: int = 256, decoder_channels: int = 256,
                 atrous_rates=(6, 12, 18), low_level_features=("res3", "res2"),
                 low_level_channels=(64, 32), conv_type: str = "depthwise_separable_conv",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 name: str = "semantic_decoder"):
        super().__init__(name=name)
        if len(low_level_features) != len(low_level_channels):
            raise ValueError("low_level_features and low_level_channels differ in length: "
                             f"{list(low_level_features)} vs {list(low_level_channels)}")
        self._aspp = ASPP(aspp_channels, atrous_rates, bn_layer=bn_layer)
        self._low_level_features = list(low_level_features)
        for i, channels in enumerate(low_level_channels):
            setattr(self, f"_low_level_conv{i + 1}", ConvBN(
                channels, 1, f"low_level_conv{i + 1}", bn_layer=bn_layer, activation="relu"))
            setattr(self, f"_fusion_conv{i + 1}", SeparableConvBlock(
                decoder_channels, f"fusion_conv{i + 1}", conv_type=conv_type,
                bn_layer=bn_layer))

    def call(self, high_level: tf.Tensor, endpoints: dict[str, tf.Tensor],
             training: bool | None = None) -> tf.Tensor:
        x = self._aspp(high_level, training=training)
        for i, key in enumerate(self._low_level_features):
            low = getattr(self, f"_low_level_conv{i + 1}")(endpoints[key], training=training)
            x = resize_align_corners(x, low.shape[1:3])
            x = tf.concat([x, low], axis=3)
            x = getattr(self, f"_fusion_conv{i + 1}")(x, training=training)
        return x
