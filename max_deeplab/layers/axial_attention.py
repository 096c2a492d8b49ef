"""Position-sensitive axial attention (Axial-DeepLab), used as MaX-DeepLab's P2P attention.

Paper §3.3 / appendix A.6: the pixel-to-pixel path of MaX-DeepLab is axial attention, a 1-D
multi-head self-attention along one image axis whose similarity and output both depend on
learned relative positional encodings of the query, key and value
(y_o = sum_p softmax_p(q_o k_p + q_o r^q_{p-o} + k_p r^k_{p-o}) (v_p + r^v_{p-o})); 2-D
axial attention is a height pass followed by a width pass.

Each similarity term and each retrieved term is batch-normalised separately before they are
summed, as in the reference implementation (weight shapes match its checkpoints).
"""
from __future__ import annotations

import gin
import numpy as np
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.convolutions import BatchNormFactory

# The relative-position tables hold 2 * MAX_SPAN - 1 rows, so an axis of up to MAX_SPAN
# positions is attended globally and exactly. Same value as the reference implementation,
# so imported tables line up row for row.
MAX_SPAN = 255


class AxialSpanError(ValueError):
    """Raised when a feature-map axis is longer than the relative-position table allows."""


def relative_distance_indices(length: int) -> np.ndarray:
    """[length, length] row indices into a (2*MAX_SPAN-1)-row table: key - query + MAX_SPAN-1."""
    if length > MAX_SPAN:
        raise AxialSpanError(
            f"axial attention supports axes of at most {MAX_SPAN} positions (the relative "
            f"position table has {2 * MAX_SPAN - 1} rows), but got an axis of {length}. "
            f"Use a smaller input (at output stride 16 the limit is {16 * (MAX_SPAN - 1) + 1} "
            f"pixels per side) or a larger output stride.")
    pos = np.arange(length)
    return (pos[None, :] - pos[:, None] + MAX_SPAN - 1).astype(np.int32)


class RelativePositionalEncoding(tfk.layers.Layer):
    """A learned table of relative position embeddings, gathered into [L, L, depth]."""

    def __init__(self, depth: int, name: str, initialization_std: float = 1.0):
        super().__init__(name=name)
        self._depth = depth
        self._initialization_std = initialization_std

    def build(self, input_shape=None):
        self._embeddings = self.add_weight(
            name="embeddings", shape=(2 * MAX_SPAN - 1, self._depth),
            initializer=tfk.initializers.TruncatedNormal(stddev=self._initialization_std),
            trainable=True)
        super().build(input_shape)

    def table(self, length: int) -> tf.Tensor:
        """The [length, length, depth] encodings r_{p-o} for every query o and key p."""
        if not self.built:
            self.build(None)
        return tf.gather(self._embeddings, relative_distance_indices(length))


@gin.configurable
class AxialAttention(tfk.layers.Layer):
    """Global 1-D multi-head self-attention along axis 1 of a [batch, length, channels] input.

    Args:
      total_key_depth: query/key channels summed over heads.
      total_value_depth: value channels summed over heads (= output channels).
      num_heads: attention heads (paper: 8).
      use_query_rpe_similarity / use_key_rpe_similarity / use_content_similarity: which
        similarity terms to use (ablations of Axial-DeepLab's position sensitivity).
      retrieve_value_rpe / retrieve_value_content: which retrieved terms to add.
    """

    def __init__(self, total_key_depth: int, total_value_depth: int, name: str = "axial",
                 num_heads: int = 8, use_query_rpe_similarity: bool = True,
                 use_key_rpe_similarity: bool = True, use_content_similarity: bool = True,
                 retrieve_value_rpe: bool = True, retrieve_value_content: bool = True,
                 initialization_std_for_query_key_rpe: float = 1.0,
                 initialization_std_for_value_rpe: float = 1.0,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name=name)
        if not (use_query_rpe_similarity or use_key_rpe_similarity or use_content_similarity):
            raise ValueError("axial attention needs at least one similarity term")
        if not (retrieve_value_rpe or retrieve_value_content):
            raise ValueError("axial attention must retrieve value content or value rpe")
        for what, depth in (("total_key_depth", total_key_depth),
                            ("total_value_depth", total_value_depth)):
            if depth % num_heads:
                raise ValueError(f"{what}={depth} is not divisible by num_heads={num_heads}")
        self._total_key_depth = total_key_depth
        self._total_value_depth = total_value_depth
        self._num_heads = num_heads
        self._use_content = use_content_similarity
        self._use_query_rpe = use_query_rpe_similarity
        self._use_key_rpe = use_key_rpe_similarity
        self._retrieve_content = retrieve_value_content
        self._retrieve_rpe = retrieve_value_rpe
        self._batch_norm_qkv = bn_layer(axis=-1, name="batch_norm_qkv")
        # Similarities are stacked as [terms, batch, heads, L, L]: one gamma per term and head.
        self._batch_norm_similarity = bn_layer(axis=[0, 2], name="batch_norm_similarity")
        # Retrieved outputs are stacked as [terms, batch, heads, L, depth].
        self._batch_norm_retrieved_output = bn_layer(axis=[0, 2, 4],
                                                     name="batch_norm_retrieved_output")
        key_per_head = total_key_depth // num_heads
        value_per_head = total_value_depth // num_heads
        if use_query_rpe_similarity:
            self._query_rpe = RelativePositionalEncoding(
                key_per_head, "query_rpe", initialization_std_for_query_key_rpe)
        if use_key_rpe_similarity:
            self._key_rpe = RelativePositionalEncoding(
                key_per_head, "key_rpe", initialization_std_for_query_key_rpe)
        if retrieve_value_rpe:
            self._value_rpe = RelativePositionalEncoding(
                value_per_head, "value_rpe", initialization_std_for_value_rpe)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.qkv_kernel = self.add_weight(
            name="qkv_kernel",
            shape=[channels, 2 * self._total_key_depth + self._total_value_depth],
            initializer=tfk.initializers.TruncatedNormal(stddev=channels ** -0.5))
        for rpe in ("_query_rpe", "_key_rpe", "_value_rpe"):
            if hasattr(self, rpe):
                getattr(self, rpe).build(None)
        super().build(input_shape)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        length = x.shape[1]
        if length is None:
            raise ValueError("axial attention needs a static axis length")
        relative_distance_indices(length)  # validates the span with a clear error
        heads = self._num_heads
        qkv = tf.einsum("nlc,cd->nld", x, self.qkv_kernel)
        qkv = self._batch_norm_qkv(qkv, training=training)
        q, k, v = tf.split(qkv, [self._total_key_depth, self._total_key_depth,
                                 self._total_value_depth], axis=-1)
        q = tf.transpose(tf.reshape(q, [-1, length, heads, self._total_key_depth // heads]),
                         [0, 2, 1, 3])
        k = tf.transpose(tf.reshape(k, [-1, length, heads, self._total_key_depth // heads]),
                         [0, 2, 1, 3])
        v = tf.reshape(v, [-1, length, heads, self._total_value_depth // heads])

        similarities = []
        if self._use_content:
            similarities.append(tf.einsum("bhld,bhmd->bhlm", q, k))
        if self._use_query_rpe:
            similarities.append(tf.einsum("bhld,lmd->bhlm", q, self._query_rpe.table(length)))
        if self._use_key_rpe:
            similarities.append(tf.einsum("bhmd,lmd->bhlm", k, self._key_rpe.table(length)))
        logits = self._batch_norm_similarity(tf.stack(similarities), training=training)
        weights = tf.nn.softmax(tf.reduce_sum(logits, axis=0), axis=-1)

        retrieved = []
        if self._retrieve_content:
            retrieved.append(tf.einsum("bhlm,bmhd->bhld", weights, v))
        if self._retrieve_rpe:
            retrieved.append(tf.einsum("bhlm,lmd->bhld", weights, self._value_rpe.table(length)))
        out = self._batch_norm_retrieved_output(tf.stack(retrieved), training=training)
        out = tf.reduce_sum(out, axis=0)
        out = tf.transpose(out, [0, 2, 1, 3])
        return tf.reshape(out, [-1, length, self._total_value_depth])


@gin.configurable
class AxialAttention2D(tfk.layers.Layer):
    """Height-axis attention then width-axis attention (paper A.6, Axial-DeepLab §3).

    Args:
      filters: base channels; keys get `filters * key_expansion`, values (and the output)
        `filters * value_expansion` channels.
      strides: output stride of this layer (1 or 2), applied by subsampling after each pass.
    """

    def __init__(self, filters: int, strides: int = 1, name: str = "attention",
                 key_expansion: float = 1, value_expansion: float = 2, num_heads: int = 8,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization, **axial_kwargs):
        super().__init__(name=name)
        key_depth = int(round(filters * key_expansion))
        self._value_depth = int(round(filters * value_expansion))
        self._strides = strides
        self._height_axis = AxialAttention(key_depth, self._value_depth, name="height_axis",
                                           num_heads=num_heads, bn_layer=bn_layer,
                                           **axial_kwargs)
        self._width_axis = AxialAttention(key_depth, self._value_depth, name="width_axis",
                                          num_heads=num_heads, bn_layer=bn_layer,
                                          **axial_kwargs)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        _, height, width, channels = x.shape.as_list()
        # Height pass: fold the width axis into the batch.
        y = tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [-1, height, channels])
        y = self._height_axis(y, training=training)
        y = tf.transpose(tf.reshape(y, [-1, width, height, self._value_depth]), [0, 2, 1, 3])
        if self._strides > 1:
            y = y[:, ::self._strides]
        strided_height = y.shape[1]
        # Width pass: fold the height axis into the batch.
        y = tf.reshape(y, [-1, width, self._value_depth])
        y = self._width_axis(y, training=training)
        y = tf.reshape(y, [-1, strided_height, width, self._value_depth])
        if self._strides > 1:
            y = y[:, :, ::self._strides]
        return y
