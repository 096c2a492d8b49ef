"""The dual-path transformer block of MaX-DeepLab (paper §3.3, Fig. 3).

A 2-D pixel path (handled by a residual P2P block placed before this layer) and a 1-D
memory path of N slots talk through three attentions:
- M2P + M2M: each memory query attends over the concatenation [pixel keys; memory keys]
  with ONE softmax over H'W' + N positions (paper Eq. 14);
- P2M: each pixel query attends over the memory keys (pixel feedback; Eq. 13);
- a memory feed-forward network.
P2M and M2M can be switched off for the paper's ablations (Table 5); M2P always stays on.

Under a mixed-precision policy the projections run in the compute dtype (batch norms compute
their statistics in float32, as Keras does) and the attention softmax runs in float32.
"""
from __future__ import annotations

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.axial_attention import softmax_in_float32
from max_deeplab.layers.convolutions import BatchNormFactory, Conv1DBN, get_activation
from max_deeplab.layers.drop_path import drop_path_mask


def split_heads(x: tf.Tensor, num_heads: int) -> tf.Tensor:
    """[batch, length, heads*depth] -> [batch, heads, length, depth]."""
    _, length, channels = x.shape.as_list()
    return tf.transpose(tf.reshape(x, [-1, length, num_heads, channels // num_heads]),
                        [0, 2, 1, 3])


class MultiHeadAttention(tfk.layers.Layer):
    """Softmax attention with batch norm on the similarities (per head) and on the output.

    Inputs: query [b, heads, Lq, d], key [b, heads, Lk, d], value [b, Lk, heads, dv].
    Output: activation(BN(softmax(BN(q k^T)) v)) as [b, Lq, heads*dv].
    """

    def __init__(self, name: str, activation: str = "relu",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        self._batch_norm_similarity = bn_layer(axis=1, name="batch_norm_similarity")
        self._batch_norm_retrieved_value = bn_layer(axis=[1, 3],
                                                    name="batch_norm_retrieved_value")
        self._activation_fn = get_activation(activation)

    def attention_weights(self, query: tf.Tensor, key: tf.Tensor,
                          training: bool | None = None) -> tf.Tensor:
        """softmax over keys of the normalised similarities, [b, heads, Lq, Lk] (in the
        similarities' dtype; the softmax itself is computed in float32)."""
        logits = tf.einsum("bhld,bhmd->bhlm", query, key)
        logits = self._batch_norm_similarity(logits, training=training)
        return softmax_in_float32(logits, axis=-1)

    def call(self, inputs, training: bool | None = None, return_weights: bool = False):
        query, key, value = inputs
        weights = self.attention_weights(query, key, training=training)
        out = tf.einsum("bhlm,bmhd->bhld", weights, value)
        out = self._activation_fn(self._batch_norm_retrieved_value(out, training=training))
        _, heads, length, depth = out.shape.as_list()
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, length, heads * depth])
        return (out, weights) if return_weights else out


@gin.configurable
class DualPathTransformerBlock(tfk.layers.Layer):
    """Memory-path layer of a dual-path transformer block (M2P/M2M, P2M, FFN).

    Args:
      filters: base width; bottleneck = filters * bottleneck_expansion, keys
        filters * key_expansion, values filters * value_expansion (over all heads).
      num_heads: attention heads (paper: 8).
      feed_forward_network_channels: hidden width of the memory FFN (0 disables it).
      use_memory_self_attention: M2M on/off (ablation "w/o M2M").
      use_pixel2memory_feedback_attention: P2M on/off (ablation "w/o P2M").
      drop_path_keep_prob: keep probability of each residual branch during training.
      drop_path_site: the block's name in the network, which keys its drop-path masks
        (see `drop_path`); default: the layer name.

    Call: ((pixels [b, HW, Cp] pre-activation, memory [b, N, Cm])) ->
      (pixels, activated pixels, memory).
    """

    def __init__(self, name: str = "dual_path_transformer", filters: int = 128,
                 num_heads: int = 8, bottleneck_expansion: float = 2, key_expansion: float = 1,
                 value_expansion: float = 2, feed_forward_network_channels: int = 2048,
                 use_memory_self_attention: bool = True,
                 use_pixel2memory_feedback_attention: bool = True,
                 drop_path_keep_prob: float = 1.0, drop_path_site: str | None = None,
                 activation: str = "relu",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        bottleneck = int(round(filters * bottleneck_expansion))
        self._key_depth = int(round(filters * key_expansion))
        self._value_depth = int(round(filters * value_expansion))
        for what, depth in (("key depth", self._key_depth), ("value depth", self._value_depth)):
            if depth % num_heads:
                raise ValueError(f"dual-path transformer {what} {depth} is not divisible by "
                                 f"num_heads={num_heads}")
        self._num_heads = num_heads
        self._use_m2m = use_memory_self_attention
        self._use_p2m = use_pixel2memory_feedback_attention
        self._ffn_channels = feed_forward_network_channels
        self._drop_path_keep_prob = drop_path_keep_prob
        self._drop_path_site = drop_path_site or name
        self._activation = activation
        self._activation_fn = get_activation(activation)
        self._bn_layer = bn_layer
        # A fresh initializer per layer: a reused unseeded instance repeats its values.
        def qkv_init():
            return tfk.initializers.TruncatedNormal(stddev=bottleneck ** -0.5)

        self._memory_conv1_bn_act = Conv1DBN(bottleneck, "memory_conv1_bn_act",
                                             bn_layer=bn_layer, activation=activation)
        self._pixel_conv1_bn_act = Conv1DBN(bottleneck, "pixel_conv1_bn_act",
                                            bn_layer=bn_layer, activation=activation)
        # Memory keys/values exist only when something (M2M or P2M) reads them.
        if self._use_m2m or self._use_p2m:
            self._memory_qkv_conv_bn = Conv1DBN(2 * self._key_depth + self._value_depth,
                                                "memory_qkv_conv_bn", bn_layer=bn_layer,
                                                kernel_initializer=qkv_init())
        else:
            self._memory_query_conv_bn = Conv1DBN(self._key_depth, "memory_query_conv_bn",
                                                  bn_layer=bn_layer, kernel_initializer=qkv_init())
        # Pixel queries exist only for P2M; pixel keys/values always feed M2P.
        if self._use_p2m:
            self._pixel_qkv_conv_bn = Conv1DBN(2 * self._key_depth + self._value_depth,
                                               "pixel_qkv_conv_bn", bn_layer=bn_layer,
                                               kernel_initializer=qkv_init())
        else:
            self._pixel_kv_conv_bn = Conv1DBN(self._key_depth + self._value_depth,
                                              "pixel_kv_conv_bn", bn_layer=bn_layer,
                                              kernel_initializer=qkv_init())
        self._memory_attention = MultiHeadAttention("memory_attention", activation, bn_layer)
        if self._use_p2m:
            self._pixel_attention = MultiHeadAttention("pixel_attention", activation, bn_layer)

    def build(self, input_shapes):
        pixel_shape, memory_shape = input_shapes
        bn = self._bn_layer
        # Output projections with zero-initialised gamma, as in ResNet bottlenecks.
        self._memory_conv3_bn = Conv1DBN(int(memory_shape[-1]), "memory_conv3_bn",
                                         bn_layer=bn, bn_gamma_initializer="zeros")
        if self._ffn_channels > 0:
            self._memory_ffn_conv1_bn_act = Conv1DBN(self._ffn_channels,
                                                     "memory_ffn_conv1_bn_act", bn_layer=bn,
                                                     activation=self._activation)
            self._memory_ffn_conv2_bn = Conv1DBN(int(memory_shape[-1]), "memory_ffn_conv2_bn",
                                                 bn_layer=bn, bn_gamma_initializer="zeros")
        if self._use_p2m:
            self._pixel_conv3_bn = Conv1DBN(int(pixel_shape[-1]), "pixel_conv3_bn", bn_layer=bn,
                                            bn_gamma_initializer="zeros")
        super().build(input_shapes)

    def _maybe_drop(self, x: tf.Tensor, training: bool | None, branch: str) -> tf.Tensor:
        if training and self._drop_path_keep_prob < 1.0:
            return x * drop_path_mask(x, self._drop_path_keep_prob,
                                      f"{self._drop_path_site}/{branch}")
        return x

    def call(self, inputs, training: bool | None = None, return_attention_weights: bool = False):
        pixel_input, memory_input = inputs
        heads = self._num_heads
        num_pixels = pixel_input.shape[1]
        num_memory = memory_input.shape[1]
        memory = self._memory_conv1_bn_act(memory_input, training=training)
        # The pixel input arrives pre-activation (the decoder fuses non-activated features).
        pixel = self._pixel_conv1_bn_act(self._activation_fn(pixel_input), training=training)

        if self._use_m2m or self._use_p2m:
            memory_qkv = self._memory_qkv_conv_bn(memory, training=training)
            memory_query, memory_key, memory_value = tf.split(
                memory_qkv, [self._key_depth, self._key_depth, self._value_depth], axis=-1)
            memory_key = split_heads(memory_key, heads)
            memory_value = tf.reshape(memory_value,
                                      [-1, num_memory, heads, self._value_depth // heads])
        else:
            memory_query = self._memory_query_conv_bn(memory, training=training)
        memory_query = split_heads(memory_query, heads)

        if self._use_p2m:
            pixel_query, pixel_key, pixel_value = tf.split(
                self._pixel_qkv_conv_bn(pixel, training=training),
                [self._key_depth, self._key_depth, self._value_depth], axis=-1)
            pixel_query = split_heads(pixel_query, heads)
        else:
            pixel_key, pixel_value = tf.split(
                self._pixel_kv_conv_bn(pixel, training=training),
                [self._key_depth, self._value_depth], axis=-1)
        pixel_key = split_heads(pixel_key, heads)
        pixel_value = tf.reshape(pixel_value, [-1, num_pixels, heads, self._value_depth // heads])

        # M2P and M2M share one softmax over the concatenated pixel and memory keys.
        if self._use_m2m:
            key = tf.concat([pixel_key, memory_key], axis=2)
            value = tf.concat([pixel_value, memory_value], axis=1)
        else:
            key, value = pixel_key, pixel_value
        memory_update, memory_weights = self._memory_attention(
            (memory_query, key, value), training=training, return_weights=True)
        memory_update = self._maybe_drop(self._memory_conv3_bn(memory_update, training=training),
                                         training, "memory_attention")
        memory_output = self._activation_fn(memory_input + memory_update)
        if self._ffn_channels > 0:
            ffn = self._memory_ffn_conv1_bn_act(memory_output, training=training)
            ffn = self._maybe_drop(self._memory_ffn_conv2_bn(ffn, training=training), training,
                                   "memory_ffn")
            memory_output = self._activation_fn(memory_output + ffn)

        weights = {"memory": memory_weights}
        if self._use_p2m:
            pixel_update, pixel_weights = self._pixel_attention(
                (pixel_query, memory_key, memory_value), training=training, return_weights=True)
            weights["pixel"] = pixel_weights
            pixel_update = self._maybe_drop(self._pixel_conv3_bn(pixel_update, training=training),
                                            training, "pixel_attention")
            pixel_output = pixel_input + pixel_update
        else:
            pixel_output = pixel_input
        outputs = (pixel_output, self._activation_fn(pixel_output), memory_output)
        return outputs + (weights,) if return_attention_weights else outputs
