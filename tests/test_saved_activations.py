"""The saved-activation accounting of benchmarks/saved_activations.py (docs/memory.md) on
programs counted by hand, and the two memory changes it led to and checks: strided
convolutions pad inside the convolution (no padded copy kept for the backward pass), and
`BlockGroup.rematerialize` keeps less of the blocks it recomputes."""
from __future__ import annotations

import gin
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from benchmark_modules import load_benchmark

from max_deeplab.layers.convolutions import ConvBN, symmetric_padding

accounting = load_benchmark("saved_activations")


def _graph_of(loss_fn, variables, *input_specs):
    @tf.function
    def step(*inputs):
        with tf.GradientTape() as tape:
            loss = loss_fn(*inputs)
        seed = tf.ones_like(loss, name=accounting.SEED_NAME)
        return tape.gradient(loss, variables, output_gradients=seed)

    return step.get_concrete_function(*input_specs).graph


def test_two_layer_program_counted_by_hand():
    """loss = sum((relu(x @ w1) @ w2)^2): the backward pass reads r = relu(.) (ReLU's gradient
    and dL/dw2) and y (the square's gradient), not h = x @ w1 (ReLU's gradient uses its
    output), not x (an input of the step), not w1, w2 (variables)."""
    w1 = tf.Variable(tf.ones([8, 16]))
    w2 = tf.Variable(tf.ones([16, 2]))

    def loss_fn(x):
        r = tf.nn.relu(tf.matmul(x, w1), name="r")
        y = tf.matmul(r, w2, name="y")
        return tf.reduce_sum(tf.square(y))

    saved = accounting.saved_activations(
        _graph_of(loss_fn, [w1, w2], tf.TensorSpec([4, 8])))
    assert {(s.name, s.nbytes) for s in saved} == {("r:0", 4 * 16 * 4), ("y:0", 4 * 2 * 4)}


def test_views_count_once_and_pruned_ops_not_at_all():
    """A reshape of r is the same buffer as r; the gradient the loss does not need (with
    respect to a constant factor, which TensorFlow's Mul gradient still builds) is pruned
    by the runtime and keeps nothing alive."""
    w = tf.Variable(tf.ones([8, 16]))
    factor = tf.constant(np.arange(64, dtype=np.float32))

    def loss_fn(x):
        r = tf.nn.relu(tf.matmul(x, w), name="r")
        flat = tf.reshape(r, [64], name="flat")
        return tf.reduce_sum(tf.sin(flat * factor))

    saved = accounting.saved_activations(_graph_of(loss_fn, [w], tf.TensorSpec([4, 8])))
    names = {s.name for s in saved}
    assert "flat:0" not in names  # a view: counted as r
    assert "r:0" in names
    # sin's gradient reads its input, flat * factor (a new buffer): 64 floats.
    products = [s for s in saved if s.op_type == "Mul"]
    assert [(s.nbytes, s.shape) for s in products] == [(256, (64,))]
    assert sum(s.nbytes for s in saved) == 4 * 16 * 4 + 256


def test_each_output_of_a_custom_gradient_is_its_own_buffer():
    """A `tf.custom_gradient` (as a rematerialised block) passes its outputs through one
    IdentityN: its k-th output is the buffer of its k-th input, not of its first."""
    w = tf.Variable(tf.ones([8, 16]))

    def loss_fn(x):
        @tf.custom_gradient
        def pair(h):
            a = h * 2.0  # [4, 16]: 256 bytes
            b = tf.concat([h] * 7, axis=1)[:, :100]  # [4, 100]: 1600 bytes

            def gradient(grad_a, grad_b):
                return grad_a * 2.0 + tf.reduce_sum(
                    tf.reshape(grad_b[:, :96], [4, 6, 16]), axis=1)

            return (a, b), gradient

        a, b = pair(tf.matmul(x, w))
        return tf.reduce_sum(tf.sin(a)) + tf.reduce_sum(tf.sin(b))

    saved = accounting.saved_activations(_graph_of(loss_fn, [w], tf.TensorSpec([4, 8])))
    assert sorted(s.nbytes for s in saved) == [256, 1600]


def test_a_zero_padding_is_a_view():
    w = tf.Variable(tf.ones([8, 16]))

    def loss_fn(x):
        r = tf.nn.relu(tf.matmul(x, w), name="r")
        return tf.reduce_sum(tf.sin(tf.pad(r, [[0, 0], [0, 0]])))

    saved = accounting.saved_activations(_graph_of(loss_fn, [w], tf.TensorSpec([4, 8])))
    # r (256 bytes) once; besides it only the pad gradient's slice offsets (a few ints).
    assert [s.name for s in saved if s.nbytes > 64] == ["r:0"]
    assert not [s for s in saved if s.op_type in ("Pad", "PadV2")]


def test_grouping_by_scope_and_op_type():
    saved = [accounting.SavedTensor(100, "a/b/c:0", "Relu", (25,), "a/b/c"),
             accounting.SavedTensor(50, "a/d:0", "Conv2D", (1,), "a/d"),
             accounting.SavedTensor(None, "e:0", "Relu", (), "e")]
    assert accounting.bytes_by_scope(saved, 1) == {"a": 150, "e": 0}
    assert accounting.bytes_by_scope(saved, 2) == {"a/b": 100, "a/d": 50, "e": 0}
    assert accounting.bytes_by_op_type(saved) == {"Relu": 100, "Conv2D": 50}


# --- strided convolutions pad inside the convolution ------------------------------------

@pytest.mark.parametrize("kernel_size,size", [(3, 41), (3, 40), (7, 33), (1, 41)])
def test_strided_conv_bn_equals_pad_then_valid_convolution(kernel_size, size):
    """ConvBN at stride 2 against an independent `tf.pad` + 'VALID' convolution with the
    same kernel: the same output, the same gradients (to float rounding: the kernels sum in
    another order), and no padded copy in the graph."""
    layer = ConvBN(8, kernel_size, "down", strides=2, use_bn=False)
    x = tf.constant(np.random.default_rng(size).normal(size=(2, size, size, 5)), tf.float32)
    layer(x)
    assert [v.name for v in layer.weights] == ["down/conv/kernel:0"]
    lo, hi = symmetric_padding(kernel_size, 1)
    kernel = layer.weights[0]

    def independent(x):
        padded = tf.pad(x, [[0, 0], [lo, hi], [lo, hi], [0, 0]])
        return tf.nn.conv2d(padded, kernel, strides=2, padding="VALID")

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got, want = layer(x), independent(x)
    out = (size + lo + hi - kernel_size) // 2 + 1
    assert got.shape == want.shape == (2, out, out, 8)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(tape.gradient(got, [x, kernel]), tape.gradient(want, [x, kernel])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)

    graph = tf.function(lambda x: layer(x)).get_concrete_function(
        tf.TensorSpec([None, size, size, 5])).graph
    assert not [op for op in graph.get_operations() if op.type in ("Pad", "PadV2")]
    assert graph.outputs[0].shape.as_list() == [None, *want.shape[1:]]


def test_padded_conv_config_round_trip():
    layer = ConvBN(4, 3, "down", strides=2, use_bn=False)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 17, 17, 3)), tf.float32)
    want = layer(x)
    conv = layer._conv
    copy = type(conv).from_config(conv.get_config())
    copy(x)
    copy.set_weights(conv.get_weights())
    assert copy.get_config()["pad"] == conv.get_config()["pad"] == (1, 1)
    np.testing.assert_array_equal(copy(x).numpy(), want.numpy())


def test_strided_conv_under_xla_and_bfloat16():
    layer = ConvBN(4, 3, "down", strides=2, use_bn=False)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 17, 17, 3)), tf.float32)
    plain = layer(x)
    compiled = tf.function(lambda x: layer(x), jit_compile=True)(x)
    np.testing.assert_allclose(compiled.numpy(), plain.numpy(), rtol=1e-5, atol=1e-5)
    tfk.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        half = ConvBN(4, 3, "down_bf16", strides=2, use_bn=False)
        out = half(x)
    finally:
        tfk.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.bfloat16 and out.shape == plain.shape
    assert half.weights[0].dtype == tf.float32


def test_strided_conv_with_dilation_is_refused():
    with pytest.raises(ValueError, match="strides"):
        ConvBN(4, 3, "down", strides=2, atrous_rate=2)


# --- the tiny model ---------------------------------------------------------------------

def _tiny_saved(rematerialize: bool):
    try:
        return accounting.saved_activations(accounting.traced_training_step(
            "tiny.gin", 65, [f"BlockGroup.rematerialize = {rematerialize}"]))
    finally:
        gin.clear_config()


def test_tiny_model_keeps_no_padded_copies_and_remat_keeps_less_of_its_blocks():
    plain, remat = _tiny_saved(False), _tiny_saved(True)
    for saved in (plain, remat):
        assert saved and all(s.nbytes is not None for s in saved[:20])
        # The only pads kept are the axial attention's relative-logit skew (small: [L, L]
        # per head), none of a convolution.
        pads = [s.scope for s in saved if s.op_type in ("Pad", "PadV2")]
        assert all("/attention/" in scope for scope in pads), pads
    by_stage_plain = accounting.bytes_by_scope(plain, 3)
    by_stage_remat = accounting.bytes_by_scope(remat, 3)
    # The recomputed axial / dual-path stages keep much less; the stem (not recomputed)
    # keeps exactly the same.
    for stage in ("max_deeplab/encoder/stage4", "max_deeplab/encoder/stage5"):
        assert by_stage_remat.get(stage, 0) < 0.5 * by_stage_plain[stage], stage
    assert by_stage_remat["max_deeplab/encoder/stem"] == by_stage_plain["max_deeplab/encoder/stem"]
    assert sum(s.nbytes or 0 for s in remat) < sum(s.nbytes or 0 for s in plain)
    # Nothing of the recomputation (its ops are named in their own scopes, `block1/...`,
    # outside `max_deeplab/`) is kept from the forward pass: it waits for every output's
    # gradient, including the zeros TensorFlow passes for an output nothing reads (waiting
    # on the first gradient alone let 0.8 MB of it run early here, ~190 MiB for MaX-S at 321²).
    recomputed = sum(s.nbytes or 0 for s in remat if s.scope.startswith("block"))
    assert recomputed <= 0.01 * sum(s.nbytes or 0 for s in remat), recomputed
