"""A training step's randomness (drop path, the semantic decoder's dropout) as a function of
(step seed, call site, index): identical with and without XLA, reproducible, and with the
right keep rates (`max_deeplab.layers.step_random`, `drop_path`)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from max_deeplab.layers.drop_path import constant_or_linear_keep_prob, drop_path_mask
from max_deeplab.layers.step_random import (
    combine_seed,
    dropout,
    hashed_uniform,
    step_seed_scope,
)


def test_hashed_uniform_is_the_same_under_xla_and_uniform():
    seed = combine_seed(3, tf.constant(41, tf.int64), 1)
    plain = hashed_uniform(seed, "stage4/block2", [200, 50]).numpy()
    compiled = tf.function(lambda s: hashed_uniform(s, "stage4/block2", [200, 50]),
                           jit_compile=True)(seed).numpy()
    np.testing.assert_array_equal(plain, compiled)
    assert plain.min() >= 0.0 and plain.max() < 1.0
    # Uniform: the deciles each hold ~10% of 10,000 values (binomial sd 0.3%).
    counts = np.histogram(plain, bins=10, range=(0, 1))[0] / plain.size
    assert np.abs(counts - 0.1).max() < 0.012
    # Neighbouring seeds and sites give unrelated numbers.
    for other in (hashed_uniform(combine_seed(3, tf.constant(42, tf.int64), 1),
                                 "stage4/block2", [200, 50]),
                  hashed_uniform(seed, "stage4/block3", [200, 50])):
        assert abs(np.corrcoef(plain.ravel(), other.numpy().ravel())[0, 1]) < 0.05


def test_combine_seed_depends_on_every_part_and_their_order():
    values = {int(combine_seed(*parts).numpy()) for parts in
              [(1, 2, 3), (1, 2, 4), (2, 1, 3), (1, 3, 2), (1, 2, 3 + 2 ** 32)]}
    assert len(values) == 4  # only the low 32 bits of a part count: 3 + 2**32 is 3
    assert int(combine_seed(1, 2, 3).numpy()) in values


def test_drop_path_mask_in_a_step_scope():
    x = tf.ones([20000, 3, 1])
    with step_seed_scope(combine_seed(7)):
        mask = drop_path_mask(x, 0.8, "site").numpy()
        again = drop_path_mask(x, 0.8, "site").numpy()
        other_site = drop_path_mask(x, 0.8, "other").numpy()
    np.testing.assert_array_equal(mask, again)
    assert mask.shape == (20000, 1, 1)
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.8)}
    assert abs((mask > 0).mean() - 0.8) < 0.01
    assert not np.array_equal(mask, other_site)
    # Outside a scope: TF's own random ops, same keep rate.
    free = drop_path_mask(x, 0.8, "site").numpy()
    assert abs((free > 0).mean() - 0.8) < 0.01


def test_dropout_in_a_step_scope_matches_keras_semantics():
    x = tf.fill([400, 50], 2.0)
    with step_seed_scope(combine_seed(9)):
        y = dropout(x, 0.1, "aspp", training=True).numpy()
        compiled = tf.function(lambda t: dropout(t, 0.1, "aspp", training=True),
                               jit_compile=True)(x).numpy()
    np.testing.assert_array_equal(y, compiled)
    assert set(np.unique(y)) == {0.0, np.float32(2.0 / 0.9)}
    assert abs((y > 0).mean() - 0.9) < 0.01
    np.testing.assert_array_equal(dropout(x, 0.1, "aspp", training=False), x)


def test_tiny_model_step_is_identical_under_xla_and_reproducible():
    """A training-mode forward pass of the tiny model (drop path at stride >= 16, ASPP
    dropout) gives the same outputs under XLA for the same step seed, and other outputs
    for another seed."""
    import gin
    import tf_keras as tfk

    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    tfk.utils.set_random_seed(0)
    model = build_model()
    gin.clear_config()
    # Residual branches start with a zero batch-norm gamma (an identity block), where a
    # dropped path changes nothing: switch them on.
    for variable in model.variables:
        if "gamma" in variable.name:
            variable.assign(tf.ones_like(variable))
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 65, 97, 3)),
                         tf.float32)

    def forward(seed):
        with step_seed_scope(seed):
            return model(images, training=True)

    seed = combine_seed(1, tf.constant(5, tf.int64), 0)
    plain = {k: v.numpy() for k, v in tf.function(forward)(seed).items()}
    again = {k: v.numpy() for k, v in tf.function(forward)(seed).items()}
    compiled = {k: v.numpy() for k, v in
                tf.function(forward, jit_compile=True)(seed).items()}
    other = {k: v.numpy() for k, v in
             tf.function(forward)(combine_seed(1, tf.constant(6, tf.int64), 0)).items()}
    for key in plain:
        np.testing.assert_array_equal(plain[key], again[key], err_msg=key)
        # XLA's float reassociation through the deep stack: ~1e-4 of the values' scale;
        # other masks change the outputs far more.
        xla_difference = np.abs(compiled[key] - plain[key]).max()
        assert xla_difference < 1e-2 * np.abs(plain[key]).max(), key
        assert np.abs(other[key] - plain[key]).max() > 20 * xla_difference, key


@pytest.mark.parametrize("schedule, expected", [
    ("constant", {16: 0.8, 32: 0.8}), ("linear", {16: 0.85, 32: 0.8})])
def test_drop_path_schedule_is_a_gin_choice(schedule, expected):
    """The paper's single rate by default, the reference's linear schedule when bound. A
    block's rate follows the nominal stride at its input: stage 4's first block (input
    stride 8) keeps everything, its others run at 16; stage 5's first block at 16, its
    others and the extra stage at 32."""
    import gin

    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    bindings = ["MaXDeepLabEncoder.backbone_layer_multiplier = 0.67"]
    if schedule == "linear":
        bindings.append("BlockGroup.drop_path_schedule = 'linear'")
    parse_config(["tiny.gin"], bindings)
    model = build_model()
    gin.clear_config()
    encoder = model.encoder
    stage4 = [b._drop_path_keep_prob for b in _residual_blocks(encoder._stage4)]
    stage5 = [b._drop_path_keep_prob for b in _residual_blocks(encoder._stage5)]
    extra = [b._drop_path_keep_prob for b in _residual_blocks(encoder._stage5_extra)]
    assert len(stage4) > 2 and len(stage5) > 1
    assert stage4 == pytest.approx([1.0] + [expected[16]] * (len(stage4) - 1))
    assert stage5 == pytest.approx([expected[16]] + [expected[32]] * (len(stage5) - 1))
    assert extra == pytest.approx([expected[32]] * len(extra))
    assert constant_or_linear_keep_prob(0.8, "linear", 1) == pytest.approx(0.95)


def _residual_blocks(group):
    from max_deeplab.layers.residual_blocks import ResidualBlock

    return [layer for layer in group._flatten_layers(include_self=False, recursive=False)
            if isinstance(layer, ResidualBlock)]
