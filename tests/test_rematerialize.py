"""Activation rematerialisation (`BlockGroup.rematerialize`, `layers/rematerialize.py`): a
training step that recomputes the axial and dual-path transformer blocks in its backward
pass gives the plain step's gradients and batch-norm moving statistics, with drop path
active, in graph mode, eagerly, under XLA with mixed bfloat16, and across two replicas."""
from __future__ import annotations

import gin
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from shared_strategies import mirrored_two_cpus

import max_deeplab.layers.rematerialize as rematerialize
from max_deeplab.gin_config import parse_config
from max_deeplab.layers.block_group import BlockGroup
from max_deeplab.layers.drop_path import drop_path_mask
from max_deeplab.layers.dual_path_transformer import DualPathTransformerBlock
from max_deeplab.layers.residual_blocks import ResidualBlock
from max_deeplab.layers.step_random import combine_seed, hashed_uniform, step_seed_scope
from max_deeplab.model import build_model

# configs/tiny.gin
TINY_SIZE = (65, 97)
# The tolerance the task's comparisons use (gradients and statistics of the same float32
# computation; in practice they agree bit for bit, the recomputation runs the same ops).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def float32_policy_and_clear_gin():
    yield
    tfk.mixed_precision.set_global_policy("float32")
    gin.clear_config()


class Counting:
    """Counts the recomputations (entries into replay mode) while installed."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = rematerialize._replay_scope

        def counted():
            self.count += 1
            return original()

        monkeypatch.setattr(rematerialize, "_replay_scope", counted)


# --- the mechanism on a small block -------------------------------------------------------

class SmallBlock(tfk.layers.Layer):
    """conv - BN - relu - conv - BN, drop path on the branch, residual: a miniature block."""

    def __init__(self, keep_prob: float = 0.5):
        super().__init__(name="small")
        self.conv1 = tfk.layers.Conv2D(6, 3, padding="same", use_bias=False)
        self.bn1 = tfk.layers.BatchNormalization(momentum=0.5)
        self.conv2 = tfk.layers.Conv2D(4, 1, use_bias=False)
        self.bn2 = tfk.layers.BatchNormalization(momentum=0.5, fused=False)
        self.keep_prob = keep_prob

    def call(self, x, training=None):
        y = self.bn2(self.conv2(tf.nn.relu(self.bn1(self.conv1(x), training=training))),
                     training=training)
        if training:
            y = y * drop_path_mask(y, self.keep_prob, "small")
        return x + y, tf.nn.relu(x + y)


def _training_call(block, x, remat: bool):
    """`block(x, training=True)`, rematerialised or not."""
    if remat:
        return rematerialize.rematerialized_call(block, [x], lambda t: block(t, training=True))
    return block(x, training=True)


def _small_step(block, x, seed, remat: bool, eager: bool):
    def step(x, seed):
        # As the trainer: the gradient is taken after the step-seed scope has closed.
        with tf.GradientTape() as tape, step_seed_scope(seed):
            tape.watch(x)
            out, activated = _training_call(block, x, remat)
            loss = tf.reduce_sum(out * out) + tf.reduce_sum(tf.sin(activated))
        return loss, tape.gradient(loss, [x, *block.trainable_variables])

    if not eager:
        step = tf.function(step)
    return step(x, seed)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_small_block_gradients_statistics_and_masks(eager, monkeypatch):
    """Gradients of the input and of every variable as without rematerialisation, the
    moving statistics updated once (a plain `tf.recompute_grad` updates them twice), and
    the recomputation uses the forward pass's drop-path mask although the step-seed scope
    has closed when the gradient is taken."""
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 5, 5, 4)), tf.float32)
    seed = combine_seed(4)
    # With this seed some of the 8 samples' branches are dropped and some kept.
    keep = np.floor(0.5 + hashed_uniform(seed, "small", [8, 1, 1, 1]).numpy()).ravel()
    assert 0 < keep.sum() < 8
    results = []
    counting = Counting(monkeypatch)
    for remat in (False, True):
        tfk.utils.set_random_seed(1)
        block = SmallBlock()
        block(x[:1], training=False)
        for bn in (block.bn1, block.bn2):  # non-trivial statistics and affine maps
            bn.moving_mean.assign(tf.fill(bn.moving_mean.shape, 0.3))
            bn.gamma.assign(tf.fill(bn.gamma.shape, 1.5))
        loss, gradients = _small_step(block, x, seed, remat, eager)
        stats = [v.numpy() for v in block.non_trainable_variables]
        results.append((float(loss), [g.numpy() for g in gradients], stats))
    (loss, gradients, stats), (remat_loss, remat_gradients, remat_stats) = results
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    assert len(remat_gradients) == len(gradients) == 1 + 2 + 4  # x, 2 kernels, 2 x (gamma, beta)
    for plain, recomputed in zip(gradients, remat_gradients, strict=True):
        assert np.abs(plain).max() > 0
        np.testing.assert_allclose(recomputed, plain, rtol=RTOL, atol=ATOL)
    for plain, recomputed in zip(stats, remat_stats, strict=True):
        np.testing.assert_allclose(recomputed, plain, rtol=RTOL, atol=ATOL)
    assert counting.count == 1  # the recomputation ran, once


def test_outside_a_step_scope_one_drawn_seed_serves_both_passes(monkeypatch):
    """Without a step-seed scope (a bare training call) the forward pass and the
    recomputation draw from one seed drawn for the call: the gradients are those of the
    plain block under that seed."""
    seeds = []
    real_scope = rematerialize.step_seed_scope

    def recording_scope(seed):
        seeds.append(int(seed.numpy()))
        return real_scope(seed)

    monkeypatch.setattr(rematerialize, "step_seed_scope", recording_scope)
    x = tf.constant(np.random.default_rng(2).normal(size=(8, 5, 5, 4)), tf.float32)
    tfk.utils.set_random_seed(1)
    block = SmallBlock()
    block(x[:1], training=False)
    block.bn2.gamma.assign(tf.fill(block.bn2.gamma.shape, 1.5))

    def loss_and_gradients(remat: bool):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out, _ = _training_call(block, x, remat)
            loss = tf.reduce_sum(out * out)
        return float(loss), [g.numpy() for g in
                             tape.gradient(loss, [x, *block.trainable_variables])]

    loss, gradients = loss_and_gradients(remat=True)
    assert len(seeds) == 2 and seeds[0] == seeds[1]
    with real_scope(tf.constant(seeds[0], tf.uint32)):
        plain_loss, plain_gradients = loss_and_gradients(remat=False)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for plain, recomputed in zip(plain_gradients, gradients, strict=True):
        np.testing.assert_allclose(recomputed, plain, rtol=RTOL, atol=ATOL)


# --- the tiny model -------------------------------------------------------------------------

def _tiny_model(rematerialize_blocks: bool, policy: str = "float32") -> tfk.Model:
    parse_config(["tiny.gin"], [f"BlockGroup.rematerialize = {rematerialize_blocks}"])
    tfk.mixed_precision.set_global_policy(policy)
    try:
        tfk.utils.set_random_seed(0)
        return build_model()
    finally:
        tfk.mixed_precision.set_global_policy("float32")
        gin.clear_config()


def _open_branches(model: tfk.Model) -> None:
    """Residual branches start with a zero batch-norm gamma (identity blocks, where a
    dropped path changes nothing and gradients barely flow): switch them on."""
    rng = np.random.default_rng(0)
    for variable in model.variables:
        if "gamma" in variable.name:
            variable.assign(rng.uniform(0.5, 1.0, variable.shape).astype(np.float32))


def _model_pair(policy: str = "float32") -> tuple[tfk.Model, tfk.Model]:
    plain, remat = _tiny_model(False, policy), _tiny_model(True, policy)
    _open_branches(plain)
    remat.set_weights(plain.get_weights())
    return plain, remat


def _images(batch: int = 2) -> tf.Tensor:
    return tf.constant(np.random.default_rng(1).uniform(0, 255, (batch, *TINY_SIZE, 3)),
                       tf.float32)


def _loss(outputs: dict) -> tf.Tensor:
    """A fixed random linear functional of every output (plus a square, so the gradient
    depends on the activations): reaches every output head, cheap to trace."""
    total = 0.0
    for index, key in enumerate(sorted(outputs)):
        value = tf.cast(outputs[key], tf.float32)
        weights = tf.constant(np.random.default_rng(index).normal(
            size=value.shape[1:]).astype(np.float32))
        total += tf.reduce_mean(value * weights) + tf.reduce_mean(tf.square(value))
    return total


def _step(model: tfk.Model, jit_compile: bool = False):
    variables = model.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(images, seed):
        with tf.GradientTape() as tape, step_seed_scope(seed):
            loss = _loss(model(images, training=True))
        return loss, tape.gradient(loss, variables)

    return step


SEED = combine_seed(3, tf.constant(7, tf.int64), 0)


def _dropped_sites(model: tfk.Model, seed: tf.Tensor, batch: int) -> list[str]:
    """The drop-path sites of rematerialised blocks that drop a sample's branch under
    `seed` (drop_path_mask: keep = floor(keep_prob + u))."""
    dropped = []
    for group in model.encoder.submodules:
        if not isinstance(group, BlockGroup):
            continue
        for layer in group.submodules:
            if isinstance(layer, ResidualBlock) and layer._attention_type == "axial":
                sites = [layer._drop_path_site]
            elif isinstance(layer, DualPathTransformerBlock):
                sites = [f"{layer._drop_path_site}/{branch}" for branch in
                         ("memory_attention", "memory_ffn", "pixel_attention")]
            else:
                continue
            keep_prob = layer._drop_path_keep_prob
            for name in sites:
                u = hashed_uniform(seed, name, [batch]).numpy()
                if np.any(np.floor(keep_prob + u) == 0):
                    dropped.append(name)
    return dropped


@pytest.fixture(scope="module")
def tiny_steps():
    """One training-mode step (float32, tf.function) of the tiny model with and without
    rematerialisation from the same weights: (loss, gradients, non-trainable variables,
    recomputations counted) per case, and the models."""
    plain, remat = _model_pair()
    results = {}
    for name, model in (("plain", plain), ("remat", remat)):
        with pytest.MonkeyPatch.context() as monkeypatch:
            counting = Counting(monkeypatch)
            loss, gradients = _step(model)(_images(), SEED)
        results[name] = (float(loss), gradients,
                         {v.name: v.numpy() for v in model.non_trainable_variables},
                         counting.count)
    return results, plain, remat


def test_the_switch_is_off_by_default_and_a_gin_binding(tiny_steps):
    assert BlockGroup(8, 1, "group", original_resnet_stride=1,
                      original_resnet_input_stride=16).rematerialize is False
    _, plain, remat = tiny_steps
    for model, expected in ((plain, False), (remat, True)):
        groups = [g for g in model.encoder.submodules if isinstance(g, BlockGroup)]
        assert groups and all(g.rematerialize is expected for g in groups)


def test_tiny_model_remat_gradients_equal_plain_with_drop_path(tiny_steps):
    """Every trainable variable's gradient (drop path active in the recomputed blocks) is
    the plain step's."""
    results, plain, _ = tiny_steps
    loss, gradients, _, recomputed = results["plain"]
    remat_loss, remat_gradients, _, remat_recomputed = results["remat"]
    assert _dropped_sites(plain, SEED, 2), "no branch dropped: the masks are not tested"
    assert remat_loss == pytest.approx(loss, rel=1e-6)
    names = [v.name for v in plain.trainable_variables]
    assert len(remat_gradients) == len(gradients) == len(names)
    missing = [n for n, g in zip(names, remat_gradients, strict=True) if g is None]
    assert not missing, f"no gradient with rematerialisation: {missing}"
    assert all(g is not None for g in gradients)
    for name, plain_gradient, remat_gradient in zip(names, gradients, remat_gradients,
                                                    strict=True):
        np.testing.assert_allclose(remat_gradient.numpy(), plain_gradient.numpy(), rtol=RTOL,
                                   atol=ATOL, err_msg=name)
    flowing = sum(bool(np.any(g.numpy() != 0)) for g in gradients)
    assert flowing > 0.9 * len(names)
    assert recomputed == 0
    # Each axial residual block and dual-path transformer block of the tiny model.
    axial = sum(len(g._axial_blocks) for g in plain.encoder.submodules
                if isinstance(g, BlockGroup))
    transformers = sum(len(g.transformer_blocks) for g in plain.encoder.submodules
                       if isinstance(g, BlockGroup))
    assert axial > 0 and transformers > 0
    assert remat_recomputed == axial + transformers


def test_tiny_model_remat_updates_batch_norm_statistics_once(tiny_steps):
    """After one training step every moving mean and variance equals the plain step's: the
    recomputation in the backward pass does not update them a second time."""
    results, plain, remat = tiny_steps
    _, _, statistics, _ = results["plain"]
    _, _, remat_statistics, _ = results["remat"]
    assert sorted(statistics) == sorted(remat_statistics)
    moving = [n for n in statistics if "moving_" in n]
    # The statistics of the recomputed blocks moved in this step (from 0 / 1).
    moved = [n for n in moving if "stage5" in n and not np.allclose(
        statistics[n], 0.0 if "mean" in n else 1.0)]
    assert moved
    for name in statistics:
        np.testing.assert_allclose(remat_statistics[name], statistics[name], rtol=RTOL,
                                   atol=ATOL, err_msg=name)


def test_inference_calls_are_not_rematerialised(tiny_steps, monkeypatch):
    """Out of training nothing is recomputed and the outputs are the plain model's."""
    _, plain, remat = tiny_steps
    counting = Counting(monkeypatch)
    images = _images(1)
    for key, value in plain(images, training=False).items():
        np.testing.assert_array_equal(remat(images, training=False)[key].numpy(),
                                      value.numpy(), err_msg=key)
    assert counting.count == 0


# Relative L2 distance of the compiled steps' gradients (all variables as one vector):
# float32: float reassociation only (measured 9e-7). mixed_bfloat16: XLA's CPU fusions keep
# some bfloat16 intermediates in float32, and the recomputation's fusions are not the forward
# pass's, so a few values round differently (measured 1.5e-2; for scale, the same step
# without XLA is 1.1 away, and a recomputation with other drop-path masks several units).
XLA_GRADIENT_TOLERANCE = {"float32": 1e-5, "mixed_bfloat16": 5e-2}


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(XLA_GRADIENT_TOLERANCE))
def test_xla_remat_step_matches_plain(policy):
    """With jit_compile=True (float32, and the mixed_bfloat16 policy) the rematerialised
    step compiles and gives the plain compiled step's loss, gradients and moving
    statistics."""
    plain, remat = _model_pair(policy)
    runs = []
    for model in (plain, remat):
        loss, gradients = _step(model, jit_compile=True)(_images(), SEED)
        runs.append((float(loss), [g.numpy() for g in gradients]))
    (loss, gradients), (remat_loss, remat_gradients) = runs
    for variable, remat_variable in zip(plain.non_trainable_variables,
                                        remat.non_trainable_variables, strict=True):
        # Batch statistics are float32 reductions under either policy.
        np.testing.assert_allclose(remat_variable.numpy(), variable.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=variable.name)
    assert np.isfinite(loss)
    assert remat_loss == pytest.approx(loss, rel=1e-6)  # the forward pass is the same
    assert all(g.dtype == np.float32 for g in remat_gradients)
    assert len(remat_gradients) == len(plain.trainable_variables)
    flat = np.concatenate([g.ravel() for g in gradients])
    remat_flat = np.concatenate([g.ravel() for g in remat_gradients])
    distance = np.linalg.norm(remat_flat - flat) / np.linalg.norm(flat)
    assert distance <= XLA_GRADIENT_TOLERANCE[policy]


@pytest.mark.slow
def test_two_replicas_with_synchronised_batch_norm_match_plain(monkeypatch):
    """Two replicas (MirroredStrategy over 2 logical CPUs) with synchronised batch norm,
    each replica's step as the `Trainer`'s (its own step seed, the gradient taken after the
    seed scope): each replica's gradients and the (replica-averaged) moving statistics after
    the step equal the plain run's. The replicas recompute in their own threads and hand
    control to each other inside the synchronised batch norms."""
    strategy = mirrored_two_cpus()
    if strategy is None:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    images = _images(2)
    runs = []
    for remat in (False, True):
        counting = Counting(monkeypatch)
        parse_config(["tiny.gin"], [f"BlockGroup.rematerialize = {remat}",
                                    "batch_norm_layer.synchronized = True"])
        with strategy.scope():
            tfk.utils.set_random_seed(0)
            model = build_model()
            _open_branches(model)
        gin.clear_config()
        variables = model.trainable_variables

        def replica_step(images, model=model, variables=variables):
            context = tf.distribute.get_replica_context()
            seed = combine_seed(5, tf.constant(3, tf.int64), context.replica_id_in_sync_group)
            with tf.GradientTape() as tape, step_seed_scope(seed):
                loss = _loss(model(images, training=True))
            return tape.gradient(loss, variables)

        @tf.function
        def step(images):
            return strategy.run(replica_step, args=(images,))

        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(images).unbatch().batch(2))
        per_replica = step(next(iter(dataset)))
        gradients = [[g.numpy() for g in strategy.experimental_local_results(gradient)]
                     for gradient in per_replica]
        statistics = {v.name: v.numpy() for v in model.non_trainable_variables}
        runs.append((gradients, statistics, counting.count))
    (gradients, statistics, count), (remat_gradients, remat_statistics, remat_count) = runs
    assert count == 0 and remat_count > 0
    for index, (plain, recomputed) in enumerate(zip(gradients, remat_gradients, strict=True)):
        assert len(plain) == len(recomputed) == 2
        for replica in range(2):
            np.testing.assert_allclose(recomputed[replica], plain[replica], rtol=RTOL,
                                       atol=ATOL, err_msg=f"variable {index}")
    for name in statistics:
        np.testing.assert_allclose(remat_statistics[name], statistics[name], rtol=RTOL,
                                   atol=ATOL, err_msg=name)
