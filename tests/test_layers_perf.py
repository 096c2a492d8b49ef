"""The fast formulations of the axial attention (docs/design.md §8) against straightforward ones:
the relative-attention skew equals gathering a [L, L, d] table, the unskew is its
transpose, and the whole layer (training and inference, outputs and gradients) equals the
gather + einsum formulation with un-folded batch norms; the convolution wrappers' folded
inference batch norm equals Keras' convolution then Keras' batch norm."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.axial_attention import (
    MAX_SPAN,
    AxialAttention,
    relative_distance_indices,
    skew_relative_logits,
    unskew_relative_weights,
)
from max_deeplab.layers.convolutions import (
    Conv1DBN,
    ConvBN,
    DepthwiseConvBN,
    SeparableConvBN,
)


def _skew_by_loops(logits: np.ndarray) -> np.ndarray:
    """out[..., o, p] = logits[..., o, p - o + L - 1], one element at a time."""
    length = logits.shape[-2]
    out = np.zeros(logits.shape[:-1] + (length,), logits.dtype)
    for o in range(length):
        for p in range(length):
            out[..., o, p] = logits[..., o, p - o + length - 1]
    return out


@pytest.mark.parametrize("length", [1, 2, 3, 7, 12])
def test_skew_matches_elementwise_definition(length):
    logits = np.random.default_rng(length).normal(size=(2, 3, length, 2 * length - 1))
    got = skew_relative_logits(tf.constant(logits, tf.float32)).numpy()
    np.testing.assert_allclose(got, _skew_by_loops(logits.astype(np.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_unskew_is_the_transpose_of_skew(length):
    rng = np.random.default_rng(length)
    a = tf.constant(rng.normal(size=(2, 3, length, 2 * length - 1)), tf.float32)
    w = tf.constant(rng.normal(size=(2, 3, length, length)), tf.float32)
    lhs = tf.reduce_sum(skew_relative_logits(a) * w).numpy()
    rhs = tf.reduce_sum(a * unskew_relative_weights(w)).numpy()
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    # Entries for offsets that leave the axis are exactly zero.
    unskewed = unskew_relative_weights(w).numpy()
    for o in range(length):
        for j in range(2 * length - 1):
            p = o + j - (length - 1)
            expected = w.numpy()[..., o, p] if 0 <= p < length else 0.0
            np.testing.assert_array_equal(unskewed[..., o, j], expected)


def test_skew_rejects_wrong_offset_count():
    with pytest.raises(ValueError, match="expected 7 relative offsets"):
        skew_relative_logits(tf.zeros([1, 1, 4, 6]))


def test_offsets_rows_are_the_gathered_table():
    layer = AxialAttention(8, 16, num_heads=2)
    layer(tf.zeros([1, 6, 4]))
    for length in (1, 6, MAX_SPAN):
        offsets = layer._query_rpe.offsets(length).numpy()
        table = layer._query_rpe.table(length).numpy()
        o, p = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
        np.testing.assert_array_equal(table, offsets[p - o + length - 1])
        assert (relative_distance_indices(length)[o, p]
                == MAX_SPAN - length + p - o + length - 1).all()


def _straightforward(layer: AxialAttention, x: tf.Tensor, training: bool) -> tf.Tensor:
    """The Axial-DeepLab equation with gathered [L, L, d] tables, einsums and the layer's own
    (un-folded) batch norms: an independent formulation of what the layer computes."""
    length, heads = x.shape[1], layer._num_heads
    kd, vd = layer._total_key_depth, layer._total_value_depth
    qkv = layer._batch_norm_qkv(tf.einsum("nlc,cd->nld", x, layer.qkv_kernel),
                                training=training)
    q, k, v = tf.split(qkv, [kd, kd, vd], axis=-1)
    q = tf.reshape(q, [-1, length, heads, kd // heads])
    k = tf.reshape(k, [-1, length, heads, kd // heads])
    v = tf.reshape(v, [-1, length, heads, vd // heads])
    sims = [tf.einsum("bohd,bphd->bhop", q, k),
            tf.einsum("bohd,opd->bhop", q, layer._query_rpe.table(length)),
            tf.einsum("bphd,opd->bhop", k, layer._key_rpe.table(length))]
    logits = tf.reduce_sum(layer._batch_norm_similarity(tf.stack(sims), training=training), 0)
    weights = tf.nn.softmax(logits, axis=-1)
    outs = [tf.einsum("bhop,bphd->bhod", weights, v),
            tf.einsum("bhop,opd->bhod", weights, layer._value_rpe.table(length))]
    out = tf.reduce_sum(layer._batch_norm_retrieved_output(tf.stack(outs), training=training), 0)
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, length, vd])


def _layer_with_random_statistics(length: int, channels: int = 12) -> AxialAttention:
    layer = AxialAttention(16, 24, num_heads=4)
    layer(tf.zeros([1, length, channels]))
    rng = np.random.default_rng(0)
    for var in layer.variables:
        if var.name.endswith(("gamma:0", "moving_variance:0")):
            var.assign(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))
        elif var.name.endswith(("beta:0", "moving_mean:0")):
            var.assign(rng.normal(0, 0.3, var.shape).astype(np.float32))
    return layer


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("length", [1, 2, 9])
def test_axial_attention_equals_gather_formulation(training, length):
    layer = _layer_with_random_statistics(length)
    x = tf.random.stateless_normal([3, length, 12], [length, 1])
    # Moving statistics must not be touched by the comparison itself.
    stats = [v.numpy() for v in layer.non_trainable_variables]

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(layer, x, training)
            loss = tf.reduce_sum(tf.sin(3.0 * y))
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        return y.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]

    got, got_grads = run(lambda lyr, inp, t: lyr(inp, training=t))
    for before, var in zip(stats, layer.non_trainable_variables):
        if training:
            var.assign(before)  # undo the layer's own moving-average update
    want, want_grads = run(_straightforward)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Some true gradients are exactly 0: the similarity betas shift all logits of a row alike
    # (softmax ignores that), and at length 1 every similarity parameter does (a softmax over
    # one key). Those come out as float32 cancellation noise, whose size follows the
    # gradients flowing through the shared intermediates, i.e. the largest gradient (measured:
    # <= 1.2e-6 of it over random initialisations), so the absolute floor scales with that.
    noise_floor = 1e-5 * max(np.abs(w).max() for w in want_grads)
    for g, w, var in zip(got_grads, want_grads, [x] + layer.trainable_variables):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=noise_floor + 1e-4 * np.abs(w).max(),
                                   err_msg=getattr(var, "name", "input"))


def test_inference_reads_but_never_updates_statistics():
    layer = _layer_with_random_statistics(5)
    stats = [v.numpy() for v in layer.non_trainable_variables]
    layer(tf.random.normal([2, 5, 12]), training=False)
    for before, var in zip(stats, layer.non_trainable_variables):
        np.testing.assert_array_equal(before, var.numpy())
    layer(tf.random.normal([2, 5, 12]), training=True)
    assert any(not np.array_equal(b, v.numpy())
               for b, v in zip(stats, layer.non_trainable_variables))


def test_axial_attention_variables_keep_checkpoint_names_and_shapes():
    layer = AxialAttention(16, 32, name="height_axis", num_heads=8)
    layer(tf.zeros([1, 5, 12]), training=False)
    got = sorted((v.name, tuple(v.shape)) for v in layer.variables)
    assert got == sorted([
        ("height_axis/qkv_kernel:0", (12, 64)),
        *[(f"height_axis/batch_norm_qkv/{n}:0", (64,))
          for n in ("gamma", "beta", "moving_mean", "moving_variance")],
        *[(f"height_axis/batch_norm_similarity/{n}:0", (3, 1, 8, 1, 1))
          for n in ("gamma", "beta", "moving_mean", "moving_variance")],
        *[(f"height_axis/batch_norm_retrieved_output/{n}:0", (2, 1, 8, 1, 4))
          for n in ("gamma", "beta", "moving_mean", "moving_variance")],
        # query, key (per-head key depth 2) and value (per-head value depth 4) tables.
        ("height_axis/embeddings:0", (2 * MAX_SPAN - 1, 2)),
        ("height_axis/embeddings:0", (2 * MAX_SPAN - 1, 2)),
        ("height_axis/embeddings:0", (2 * MAX_SPAN - 1, 4)),
    ])


# --- inference batch norm folded into the convolution wrappers ----------------------------

def _randomize_statistics(layer: tfk.layers.Layer, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for variable in layer.variables:
        name = variable.name
        if "moving_variance" in name:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
        elif "moving_mean" in name:
            variable.assign(rng.normal(0.0, 0.5, variable.shape))
        elif "gamma" in name:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape))
        elif "beta" in name:
            variable.assign(rng.normal(0.0, 0.5, variable.shape))


def _unfolded(layer, x):
    """The wrapper's inference output from its sub-layers, called one by one (Keras' own
    convolution, then Keras' own batch norm with its moving statistics)."""
    if isinstance(layer, SeparableConvBN):
        return _unfolded(layer._pointwise, _unfolded(layer._depthwise, x))
    conv = layer._depthwise_conv if isinstance(layer, DepthwiseConvBN) else layer._conv
    return layer._activation_fn(layer._batch_norm(conv(x), training=False))


_WRAPPERS = {
    "conv3x3": (lambda: ConvBN(6, 3, "c", activation="relu"), (2, 9, 11, 4)),
    "conv3x3_stride2": (lambda: ConvBN(6, 3, "c", strides=2, activation="relu"), (2, 9, 11, 4)),
    "conv1x1_linear": (lambda: ConvBN(6, 1, "c"), (2, 9, 11, 4)),
    "conv_atrous": (lambda: ConvBN(6, 3, "c", atrous_rate=2, activation="relu"), (1, 9, 9, 4)),
    "conv1d": (lambda: Conv1DBN(6, "c", activation="relu"), (2, 13, 4)),
    "depthwise": (lambda: DepthwiseConvBN(5, "c"), (2, 9, 11, 4)),
    "separable": (lambda: SeparableConvBN(6, 5, "c"), (2, 9, 11, 4)),
}


@pytest.mark.parametrize("name", sorted(_WRAPPERS))
def test_folded_inference_equals_convolution_then_batch_norm(name):
    make, shape = _WRAPPERS[name]
    layer = make()
    x = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    first = layer(x, training=False)  # unbuilt: the plain path builds the sub-layers
    _randomize_statistics(layer)
    folded = layer(x, training=False)
    np.testing.assert_allclose(folded.numpy(), _unfolded(layer, x).numpy(), rtol=1e-5,
                               atol=1e-5)
    assert first.shape == folded.shape
    graph = tf.function(lambda x: layer(x, training=False)).get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    assert "BiasAdd" in types and "FusedBatchNormV3" not in types
    # Out of training nothing normalises the activations any more: the only Rsqrt is the
    # moving variance's, of the channels' size.
    for op in graph.get_operations():
        if op.type == "Rsqrt":
            assert op.outputs[0].shape.rank == 1


def test_training_takes_the_unfolded_path_and_updates_statistics():
    layer = ConvBN(6, 3, "c", activation="relu")
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 9, 9, 4)), tf.float32)
    layer(x, training=False)
    before = layer._batch_norm.moving_mean.numpy().copy()
    out = layer(x, training=True)
    batch = layer._conv(x)
    mean, variance = tf.nn.moments(batch, axes=[0, 1, 2])
    bn = layer._batch_norm
    want = tf.nn.relu((batch - mean) * tf.math.rsqrt(variance + bn.epsilon) * bn.gamma + bn.beta)
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(layer._batch_norm.moving_mean.numpy(), before)


def test_folded_inference_under_mixed_bfloat16():
    tfk.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = ConvBN(8, 3, "c", activation="relu")
        x = tf.constant(np.random.default_rng(3).normal(size=(1, 9, 9, 4)), tf.float32)
        layer(x, training=False)
        _randomize_statistics(layer)
        folded = layer(x, training=False)
        unfolded = _unfolded(layer, tf.cast(x, tf.bfloat16))
    finally:
        tfk.mixed_precision.set_global_policy("float32")
    assert folded.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(folded, tf.float32).numpy(),
                               tf.cast(unfolded, tf.float32).numpy(), rtol=3e-2, atol=3e-2)
