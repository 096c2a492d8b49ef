"""The MaX-DeepLab network: shapes, gradients, attention, ablation switches, distribution,
span errors and exact parameter counts of every model variant."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from shared_strategies import mirrored_two_cpus

from max_deeplab.gin_config import parse_config
from max_deeplab.layers.axial_attention import MAX_SPAN, AxialAttention, AxialSpanError
from max_deeplab.layers.dual_path_transformer import DualPathTransformerBlock
from max_deeplab.model import OUTPUT_KEYS, build_model
from max_deeplab.model.summary import inference_params, parameter_counts

TINY_SIZE = (65, 97)  # non-square on purpose


def _tiny_model(*bindings: str):
    parse_config(["tiny.gin"], list(bindings))
    return build_model()


def _randomise_batch_norm(model: tfk.Model, seed: int = 0) -> None:
    """Zero-initialised residual gammas block all gradient into their branches at init;
    give every BN gamma/beta a non-trivial value, as a trained model has."""
    rng = np.random.default_rng(seed)
    for var in model.trainable_variables:
        if var.name.endswith("gamma:0"):
            var.assign(rng.uniform(0.5, 1.0, var.shape).astype(np.float32))
        elif var.name.endswith("beta:0"):
            var.assign(rng.normal(0, 0.1, var.shape).astype(np.float32))


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_model()


def test_tiny_output_shapes_and_dtypes(tiny_model):
    images = tf.random.uniform([2, *TINY_SIZE, 3], 0, 255, seed=1)
    out = tiny_model(images, training=False)
    assert set(out) == set(OUTPUT_KEYS)
    h, w = 17, 25  # (65 - 1) / 4 + 1, (97 - 1) / 4 + 1
    assert out["mask_logits"].shape == (2, h, w, 16)
    assert out["class_logits"].shape == (2, 16, 8 + 1)
    assert out["pixel_feature"].shape == (2, h, w, 32)
    assert out["semantic_logits"].shape == (2, h, w, 8)
    for value in out.values():
        assert value.dtype == tf.float32
        assert np.all(np.isfinite(value.numpy()))
    # g is L2-normalised per pixel.
    norms = np.linalg.norm(out["pixel_feature"].numpy(), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_void_prior_bias_at_initialisation(tiny_model):
    # The class head starts near zero, so p(void) ~ 0.9 for every slot.
    out = tiny_model(tf.zeros([1, *TINY_SIZE, 3]), training=False)
    void_prob = tf.nn.softmax(out["class_logits"])[..., -1].numpy()
    np.testing.assert_allclose(void_prob, 0.9, atol=0.02)


def test_every_trainable_variable_gets_a_gradient():
    # Drop path off: a branch dropped for every image of the batch has no gradient.
    model = _tiny_model("BlockGroup.drop_path_keep_prob = 1.0")
    _randomise_batch_norm(model)
    images = tf.random.uniform([2, *TINY_SIZE, 3], 0, 255, seed=2)
    rng = np.random.default_rng(3)
    with tf.GradientTape() as tape:
        out = model(images, training=True)
        loss = 0.0
        for key in OUTPUT_KEYS:
            weights = tf.constant(rng.normal(size=out[key].shape), tf.float32)
            loss += tf.reduce_sum(weights * out[key])
    grads = tape.gradient(loss, model.trainable_variables)
    no_grad = [v.name for v, g in zip(model.trainable_variables, grads)
               if g is None or not np.any(tf.convert_to_tensor(g).numpy() != 0)]
    assert not no_grad, f"variables without gradient: {no_grad}"


def _dual_path_block(**kwargs):
    block = DualPathTransformerBlock(filters=16, num_heads=4, feed_forward_network_channels=32,
                                     **kwargs)
    pixels = tf.random.normal([2, 6 * 5, 24], seed=4)
    memory = tf.random.normal([2, 7, 20], seed=5)
    outputs = block((pixels, memory), training=False, return_attention_weights=True)
    return block, outputs


def test_memory_attention_is_one_softmax_over_pixels_and_memory():
    _, (pixels, activated, memory, weights) = _dual_path_block()
    assert pixels.shape == (2, 30, 24) and memory.shape == (2, 7, 20)
    np.testing.assert_allclose(activated.numpy(), np.maximum(pixels.numpy(), 0))
    m2x = weights["memory"].numpy()
    assert m2x.shape == (2, 4, 7, 30 + 7)  # [batch, heads, N, H'W' + N]
    np.testing.assert_allclose(m2x.sum(-1), 1.0, rtol=1e-5)
    # Neither the pixel part nor the memory part alone is normalised: one joint softmax.
    assert np.all(m2x[..., :30].sum(-1) < 1.0) and np.all(m2x[..., 30:].sum(-1) < 1.0)
    p2m = weights["pixel"].numpy()
    assert p2m.shape == (2, 4, 30, 7)
    np.testing.assert_allclose(p2m.sum(-1), 1.0, rtol=1e-5)


def _variable_shapes(block) -> dict[str, tuple]:
    prefix = block.name + "/"
    return {v.name.split(prefix, 1)[1]: tuple(v.shape) for v in block.variables}


def test_p2m_and_m2m_switches_remove_exactly_their_weights():
    full, _ = _dual_path_block()
    no_p2m, (pixels, _, _, weights) = _dual_path_block(use_pixel2memory_feedback_attention=False)
    no_m2m, (_, _, _, m2m_weights) = _dual_path_block(use_memory_self_attention=False)
    neither, _ = _dual_path_block(use_memory_self_attention=False,
                                  use_pixel2memory_feedback_attention=False)
    full_vars = _variable_shapes(full)

    # P2M off: no pixel queries, no pixel attention BNs, no pixel output projection; the
    # pixel path passes through unchanged.
    removed = {k for k in full_vars if k.startswith(("pixel_attention/", "pixel_conv3_bn/",
                                                      "pixel_qkv_conv_bn/"))}
    expected = {k: s for k, s in full_vars.items() if k not in removed}
    expected["pixel_kv_conv_bn/conv/kernel:0"] = (1, 32, 16 + 32)  # keys + values only
    for stat in ("gamma", "beta", "moving_mean", "moving_variance"):
        expected[f"pixel_kv_conv_bn/batch_norm/{stat}:0"] = (48,)
    assert _variable_shapes(no_p2m) == expected
    assert "pixel" not in weights

    # M2M off: its only weights are the memory keys/values, which P2M still reads; the
    # memory queries now attend over the pixels alone.
    assert _variable_shapes(no_m2m) == full_vars
    np.testing.assert_allclose(m2m_weights["memory"].numpy().sum(-1), 1.0, rtol=1e-5)
    assert m2m_weights["memory"].shape == (2, 4, 7, 30)

    # Both off: the memory key/value projection goes too (queries only).
    both = _variable_shapes(neither)
    assert "memory_qkv_conv_bn/conv/kernel:0" not in both
    assert both["memory_query_conv_bn/conv/kernel:0"] == (1, 32, 16)


def test_whole_model_runs_with_ablation_switches():
    for binding in ("DualPathTransformerBlock.use_pixel2memory_feedback_attention = False",
                    "DualPathTransformerBlock.use_memory_self_attention = False"):
        model = _tiny_model(binding)
        out = model(tf.zeros([1, *TINY_SIZE, 3]), training=True)
        assert out["mask_logits"].shape == (1, 17, 25, 16)


def test_model_builds_and_steps_under_mirrored_strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "tests/conftest.py should configure two logical CPUs"
    strategy = mirrored_two_cpus()
    with strategy.scope():
        model = _tiny_model()
        optimizer = tfk.optimizers.SGD(0.01)
    _randomise_batch_norm(model)
    before = [v.numpy().copy() for v in model.trainable_variables]

    # Eager replica steps: tracing the whole model twice under tf.function costs far more
    # than one step on CPU, and the cross-replica code path is the same.
    def step(images):
        def replica_step(x):
            with tf.GradientTape() as tape:
                out = model(x, training=True)
                loss = tf.reduce_mean(out["mask_logits"]) + tf.reduce_mean(
                    tf.nn.log_softmax(out["class_logits"])[..., -1])
                loss /= strategy.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.reduce("SUM", strategy.run(replica_step, args=(images,)), axis=None)

    dataset = tf.data.Dataset.from_tensors(tf.random.uniform([4, *TINY_SIZE, 3], 0, 255))
    images = next(iter(strategy.experimental_distribute_dataset(dataset)))
    loss = step(images)
    assert np.isfinite(loss.numpy())
    changed = sum(not np.array_equal(b, v.numpy())
                  for b, v in zip(before, model.trainable_variables))
    assert changed > len(before) // 2


def test_axis_longer_than_axial_span_is_a_clear_error():
    layer = AxialAttention(16, 16, num_heads=2)
    layer(tf.zeros([1, MAX_SPAN, 8]))  # exactly at the limit works
    with pytest.raises(AxialSpanError, match=f"at most {MAX_SPAN} positions"):
        layer(tf.zeros([1, MAX_SPAN + 1, 8]))


def test_model_input_beyond_axial_span_names_the_limit(tiny_model):
    # Stride-16 rows: (4113 - 1) / 16 + 1 = 258 > 255.
    with pytest.raises(AxialSpanError, match="255"):
        tiny_model(tf.zeros([1, 4113, 17, 3]), training=False)


def _reference_listing(path: str) -> dict[str, list[int]]:
    shapes = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            name, shape, _ = line.rstrip("\n").split("\t")
            shapes[name] = [int(x) for x in shape.strip("[]").split(",") if x]
    return shapes


# Exact parameter counts (trainable, without the training-only semantic branch).
# MaX-DeepLab-S and -L equal the reference implementation's counts (61,900,200 and
# 450,763,880; paper: 61.9M and 451M).
@pytest.mark.parametrize("gin_file,total,semantic", [
    ("tiny.gin", 1_499_179 - 0, None),
    ("reference_tiny.gin", 3_923_096, 136_533),
    ("max_deeplab_s_coco_641.gin", 61_900_200, 15_856_485),
])
def test_exact_parameter_counts(gin_file, total, semantic):
    parse_config([gin_file], [])
    counts = parameter_counts(build_model())
    if semantic is not None:
        assert counts["semantic_branch"]["trainable"] == semantic
        assert inference_params(counts) == total
    else:
        assert inference_params(counts) + counts["semantic_branch"]["trainable"] == total


@pytest.mark.slow
def test_exact_parameter_count_l():
    parse_config(["max_deeplab_l_coco_1025.gin"], [])
    counts = parameter_counts(build_model())
    assert inference_params(counts) == 450_763_880
    assert counts["semantic_branch"]["trainable"] == 107_398 - 257  # 133 classes, not 134


def test_summary_verb_prints_the_counts(capsys):
    from max_deeplab.__main__ import main

    assert main(["max-deeplab", "summary", "--gin_file", "reference_tiny.gin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert int(values["total_params"]) == 3_923_096
    assert int(values["semantic_head_params"]) == 136_533
    assert int(values["flops"].split()[0]) > 0


def test_summary_verb_reports_a_missing_gin_file(capsys):
    from max_deeplab.__main__ import main

    assert main(["max-deeplab", "summary", "--gin_file", "no_such_config.gin"]) == 2
    assert "no_such_config.gin" in capsys.readouterr().err


def test_query_key_value_projections_start_different():
    # An initializer instance shared between layers would give them identical weights.
    block, _ = _dual_path_block()
    memory = block._memory_qkv_conv_bn._conv.kernel.numpy()
    pixel = block._pixel_qkv_conv_bn._conv.kernel.numpy()
    assert memory.shape == pixel.shape
    assert not np.allclose(memory, pixel)


@pytest.mark.parametrize("stacks, placement, expected", [
    ((0, 0), "paper", "backbone_output"), ((0, 0), "reference", "backbone_output"),
    ((1, 0), "paper", "decoder_output0"), ((1, 0), "reference", "backbone_output"),
    ((1, 1), "paper", "decoder_output0"), ((1, 1), "reference", "decoder_output1"),
    ((0, 2), "paper", "decoder_output0"), ((0, 2), "reference", "decoder_output0")])
def test_semantic_head_placement(stacks, placement, expected):
    """Paper §3.4: the semantic head reads the backbone when L = 0, else the first stride-4
    decoder output; the reference (deeplab2) reads the first stride-4 output of its extra
    decoder stacks, else the stride-16 backbone output (through a semantic decoder)."""
    model = _tiny_model(f"MaXDeepLabEncoder.backbone_decoder_num_stacks = {stacks[0]}",
                        f"MaXDeepLabEncoder.extra_decoder_num_stacks = {stacks[1]}",
                        f"MaXDeepLabEncoder.semantic_feature = '{placement}'")
    images = tf.random.uniform([1, *TINY_SIZE, 3], -1.0, 1.0, seed=1)
    endpoints = model.encoder(images, training=False)
    num_decoder_outputs = sum(key.startswith("decoder_output") for key in endpoints)
    assert num_decoder_outputs == sum(stacks) + 1  # one per hourglass pass, plus the last
    np.testing.assert_array_equal(endpoints["feature_semantic"], endpoints[expected])
    assert (model.semantic_decoder is None) == (expected != "backbone_output")
    assert model(images * 127.5 + 127.5, training=False)["semantic_logits"].shape[1:3] == (
        endpoints["feature_panoptic"].shape[1:3])


def test_unknown_semantic_placement_is_an_error():
    with pytest.raises(ValueError, match="semantic_feature must be one of"):
        _tiny_model("MaXDeepLabEncoder.semantic_feature = 'middle'")
