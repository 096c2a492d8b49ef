"""Position-sensitive axial attention (Axial-DeepLab), used as MaX-DeepLab's P2P attention.

Paper §3.3 / appendix A.6: the pixel-to-pixel path of MaX-DeepLab is axial attention, a 1-D
multi-head self-attention along one image axis whose similarity and output both depend on
learned relative positional encodings of the query, key and value
(y_o = sum_p softmax_p(q_o k_p + q_o r^q_{p-o} + k_p r^k_{p-o}) (v_p + r^v_{p-o})); 2-D
axial attention is a height pass followed by a width pass.

Each similarity term and each retrieved term is batch-normalised separately before they are
summed, as in the reference implementation (weight shapes match its checkpoints).

Speed (docs/design.md §8): the relative terms are never computed from a gathered [L, L, d] table.
q_o·r_{p-o} for all queries o and all 2L-1 offsets is one [L, d] x [d, 2L-1] matmul whose
[L, 2L-1] result is "skewed" (a slice and two reshapes) into [L, L] — the relative-attention
skew of Transformer-XL / Music Transformer; the key term is the same with the roles of query
and key swapped (and the offsets reversed), and the value term multiplies the "unskewed"
(zero-padded) weights [L, 2L-1] by the table. Out of training the batch norms of the terms
are folded into per-head scales and one shift (the same affine maps, applied before the sum).

Mixed precision (e.g. tf_keras' mixed_bfloat16 policy): the weights are float32 and read
without autocasting; `call` casts them to the layer's compute dtype explicitly (folded batch
norms are folded in float32 and rounded once). The softmax runs in float32: it normalises over
a whole axis, where a 16-bit sum loses the small weights.
"""
from __future__ import annotations

import gin
import numpy as np
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.batch_norm_folding import folded_batch_norm, folds_batch_norm
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


def skew_relative_logits(logits: tf.Tensor) -> tf.Tensor:
    """[batch, heads, L, 2L-1] logits per (query o, offset row j) -> [batch, heads, L, L] per
    (query o, key p), reading j = p - o + L - 1.

    Flattened row-major, entry (o, p - o + L - 1) sits at (L - 1) + o * (2L - 2) + p, so
    dropping the first L - 1 entries and reading rows of 2L - 2 puts (o, p) at column p: a
    slice and reshapes, no gather (its gradient is `unskew_relative_weights`).
    """
    _, heads, length, width = logits.shape.as_list()
    if width != 2 * length - 1:
        raise ValueError(f"expected {2 * length - 1} relative offsets, got {width}")
    if length == 1:
        return logits
    flat = tf.reshape(logits, [-1, heads, length * width])
    flat = flat[:, :, length - 1:length - 1 + length * (2 * length - 2)]
    return tf.reshape(flat, [-1, heads, length, 2 * length - 2])[..., :length]


def unskew_relative_weights(weights: tf.Tensor) -> tf.Tensor:
    """The transpose of `skew_relative_logits`: [batch, heads, L, L] per (o, p) ->
    [batch, heads, L, 2L-1] per (o, j = p - o + L - 1), zero where o + j - (L-1) is off-axis."""
    _, heads, length, _ = weights.shape.as_list()
    if length == 1:
        return weights
    padded = tf.pad(weights, [[0, 0], [0, 0], [0, 0], [0, length - 2]])
    flat = tf.reshape(padded, [-1, heads, length * (2 * length - 2)])
    # L * (2L - 1) = (L - 1) + L * (2L - 2) + 1.
    flat = tf.pad(flat, [[0, 0], [0, 0], [length - 1, 1]])
    return tf.reshape(flat, [-1, heads, length, 2 * length - 1])


def _times_table(x: tf.Tensor, table: tf.Tensor, transpose_table: bool) -> tf.Tensor:
    """[batch, heads, L, k] times a shared table ([n, k] transposed, or [k, n]) ->
    [batch, heads, L, n], as one large 2-D matmul (a layout oneDNN runs near peak)."""
    _, heads, length, depth = x.shape.as_list()
    out = tf.matmul(tf.reshape(x, [-1, depth]), table, transpose_b=transpose_table)
    return tf.reshape(out, [-1, heads, length, table.shape[0 if transpose_table else 1]])


def softmax_in_float32(logits: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Softmax computed in float32 and returned in the logits' dtype (an identity round trip
    for float32 logits), as mixed-precision attention does it."""
    return tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32), axis=axis), logits.dtype)


class RelativePositionalEncoding(tfk.layers.Layer):
    """A learned table of relative position embeddings, gathered into [L, L, depth].

    The table is read in its own (float32) dtype; the attention casts it to its compute dtype.
    """

    def __init__(self, depth: int, name: str, initialization_std: float = 1.0):
        super().__init__(name=name)
        self._depth = depth
        self._initialization_std = initialization_std

    def build(self, input_shape=None):
        self._embeddings = self.add_weight(
            name="embeddings", shape=(2 * MAX_SPAN - 1, self._depth),
            initializer=tfk.initializers.TruncatedNormal(stddev=self._initialization_std),
            trainable=True, experimental_autocast=False)
        super().build(input_shape)

    def table(self, length: int) -> tf.Tensor:
        """The [length, length, depth] encodings r_{p-o} for every query o and key p (the
        straightforward formulation; the attention itself uses `offsets`)."""
        if not self.built:
            self.build(None)
        return tf.gather(self._embeddings, relative_distance_indices(length))

    def offsets(self, length: int) -> tf.Tensor:
        """The [2L-1, depth] encodings of offsets -(L-1) .. L-1: row j is r_{j-(L-1)}, i.e.
        `table(length)[o, p] == offsets(length)[p - o + L - 1]`."""
        if not self.built:
            self.build(None)
        relative_distance_indices(length)  # validates the span with a clear error
        return self._embeddings[MAX_SPAN - length:MAX_SPAN + length - 1]


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

    @property
    def linear_kernels(self) -> list[tf.Variable]:
        """The kernel of the query/key/value projection (a 1x1 convolution's, as weight decay
        sees it: `max_deeplab.model.partition.kernel_variables`)."""
        return [self.qkv_kernel]

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.qkv_kernel = self.add_weight(
            name="qkv_kernel",
            shape=[channels, 2 * self._total_key_depth + self._total_value_depth],
            initializer=tfk.initializers.TruncatedNormal(stddev=channels ** -0.5),
            experimental_autocast=False)
        for rpe in ("_query_rpe", "_key_rpe", "_value_rpe"):
            if hasattr(self, rpe):
                getattr(self, rpe).build(None)
        # Create the batch norms' weights now, exactly as their first call would (same
        # names and shapes): out of training they are only read, never called.
        heads = self._num_heads
        num_similarities = self._use_content + self._use_query_rpe + self._use_key_rpe
        num_retrieved = self._retrieve_content + self._retrieve_rpe
        self._batch_norm_qkv(tf.zeros([1, 1, int(self.qkv_kernel.shape[-1])]), training=False)
        self._batch_norm_similarity(tf.zeros([num_similarities, 1, heads, 1, 1]),
                                    training=False)
        self._batch_norm_retrieved_output(
            tf.zeros([num_retrieved, 1, heads, 1, self._total_value_depth // heads]),
            training=False)
        super().build(input_shape)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        length, channels = x.shape[1], x.shape[2]
        if length is None:
            raise ValueError("axial attention needs a static axis length")
        relative_distance_indices(length)  # validates the span with a clear error
        heads = self._num_heads
        key_depth = self._total_key_depth // heads
        value_depth = self._total_value_depth // heads
        fold = folds_batch_norm(training)
        dtype = self.compute_dtype
        splits = [self._total_key_depth, self._total_key_depth, self._total_value_depth]
        # The projection as 2-D matmuls (oneDNN runs them faster than the einsum).
        x = tf.reshape(x, [-1, channels])
        if fold:
            # Inference BN folded into the kernel: q, k, v = x (W * scale) + shift.
            # Folded in float32, then rounded once to the compute dtype.
            scale, shift = folded_batch_norm(self._batch_norm_qkv)
            kernels = tf.split(tf.cast(self.qkv_kernel * scale, dtype), splits, axis=-1)
            q, k, v = (tf.matmul(x, kernel) + bias for kernel, bias in
                       zip(kernels, tf.split(tf.cast(shift, dtype), splits)))
        else:
            qkv = tf.reshape(tf.matmul(x, tf.cast(self.qkv_kernel, dtype)),
                             [-1, length, sum(splits)])
            q, k, v = tf.split(self._batch_norm_qkv(qkv, training=training), splits, axis=-1)
        q = tf.transpose(tf.reshape(q, [-1, length, heads, key_depth]), [0, 2, 1, 3])
        k = tf.transpose(tf.reshape(k, [-1, length, heads, key_depth]), [0, 2, 1, 3])
        v = tf.transpose(tf.reshape(v, [-1, length, heads, value_depth]), [0, 2, 1, 3])

        # Similarity terms, each [b, heads, L, L] (query o, key p).
        if fold:
            scale, shift = folded_batch_norm(self._batch_norm_similarity)
            # [terms, 1, heads, 1, 1] -> per term [heads, 1, 1], applied to q or k (linear).
            term_scales = tf.unstack(tf.cast(scale[:, 0], dtype), axis=0)
        terms = []
        if self._use_content:
            query = q * term_scales[len(terms)] if fold else q
            terms.append(tf.matmul(query, k, transpose_b=True))
        if self._use_query_rpe:
            query = q * term_scales[len(terms)] if fold else q
            terms.append(skew_relative_logits(
                _times_table(query, tf.cast(self._query_rpe.offsets(length), dtype),
                             transpose_table=True)))
        if self._use_key_rpe:
            key = k * term_scales[len(terms)] if fold else k
            # k_p·r_{p-o}: index the key's row by o - p + L - 1 (reversed offsets), skew to
            # [p, o], then swap the last two axes.
            reversed_offsets = tf.reverse(tf.cast(self._key_rpe.offsets(length), dtype), axis=[0])
            terms.append(tf.transpose(skew_relative_logits(
                _times_table(key, reversed_offsets, transpose_table=True)), [0, 1, 3, 2]))
        if fold:
            logits = tf.add_n(terms) + tf.cast(tf.reduce_sum(shift, axis=0), dtype)
        else:
            logits = tf.reduce_sum(
                self._batch_norm_similarity(tf.stack(terms), training=training), axis=0)
        weights = softmax_in_float32(logits, axis=-1)

        # Retrieved terms, each [b, heads, L, value_depth].
        if fold:
            scale, shift = folded_batch_norm(self._batch_norm_retrieved_output)
            # Per term [heads, 1, value_depth].
            term_scales = tf.unstack(tf.cast(scale[:, 0], dtype), axis=0)
        retrieved = []
        if self._retrieve_content:
            value = v * term_scales[len(retrieved)] if fold else v
            retrieved.append(tf.matmul(weights, value))
        if self._retrieve_rpe:
            out = _times_table(unskew_relative_weights(weights),
                               tf.cast(self._value_rpe.offsets(length), dtype),
                               transpose_table=False)
            retrieved.append(out * term_scales[len(retrieved)] if fold else out)
        if fold:
            out = tf.add_n(retrieved) + tf.cast(tf.reduce_sum(shift, axis=0), dtype)
        else:
            out = tf.reduce_sum(self._batch_norm_retrieved_output(tf.stack(retrieved),
                                                                  training=training), axis=0)
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
