"""The bfloat16 mixed-precision switch (`max-deeplab train --mixed_precision bfloat16`, which
sets tf_keras' mixed_bfloat16 policy): float32 weights, bfloat16 compute in the encoder,
float32 outputs, losses and matching, and one full XLA-compiled train step."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.gin_config import parse_config
from max_deeplab.losses import MaXDeepLabLoss
from max_deeplab.model import OUTPUT_KEYS, build_model
from max_deeplab.training import build_optimizer

TINY_SIZE = (65, 97)  # configs/tiny.gin's build_model.input_size
NUM_CLASSES = 8  # configs/tiny.gin's MaXDeepLab.num_classes

# bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3, i.e. 2-3 decimal digits).
# Every layer of the tiny model rounds its activations once more. With moving statistics the
# errors stay near that level (measured: outputs within 4e-3 in relative L2 norm, loss terms
# within 1e-3); with batch statistics, which at this random initialisation amplify
# perturbations stage by stage, the loss terms moved by up to 1e-2 here (up to 2.6e-2 on other
# batches). So: losses to a relative 5e-2, outputs (moving statistics) to a relative 2e-2.
# Both fail for a wrong computation: bfloat16 weights from another initialisation move the
# outputs by 4e-2 (class logits) to 1.6 and the training-mode pq loss by 27%. The absolute
# floor covers near-zero loss terms.
LOSS_RTOL = 5e-2
OUTPUT_RTOL = 2e-2
LOSS_ATOL = 5e-3


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """Every test here leaves the global policy as float32, so other tests are unaffected."""
    yield
    tfk.mixed_precision.set_global_policy("float32")


def _build(policy: str, seed: int = 0) -> tfk.Model:
    tfk.mixed_precision.set_global_policy(policy)
    try:
        tfk.utils.set_random_seed(seed)
        return build_model()
    finally:
        tfk.mixed_precision.set_global_policy("float32")


def _randomise_batch_norm(model: tfk.Model, seed: int = 0) -> None:
    """Trained-looking batch norms: non-zero residual gammas (so every branch carries signal
    and gradient) and non-trivial moving statistics (so the inference-mode folding of the
    axial attention's batch norms is exercised)."""
    rng = np.random.default_rng(seed)
    for var in model.variables:
        name = var.name
        if name.endswith("gamma:0"):
            var.assign(rng.uniform(0.5, 1.0, var.shape).astype(np.float32))
        elif name.endswith("beta:0"):
            var.assign(rng.normal(0, 0.1, var.shape).astype(np.float32))
        elif name.endswith("moving_mean:0"):
            var.assign(rng.normal(0, 0.1, var.shape).astype(np.float32))
        elif name.endswith("moving_variance:0"):
            var.assign(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))


def _batch(seed: int = 0, batch_size: int = 2) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    height, width = TINY_SIZE
    ids = rng.integers(-1, 4, (batch_size, height, width)).astype(np.int32)
    return {
        "image": tf.constant(rng.uniform(0, 255, (batch_size, height, width, 3)), tf.float32),
        "segment_ids": tf.constant(ids),
        "segment_classes": tf.constant(rng.integers(0, NUM_CLASSES, (batch_size, 4)),
                                       tf.int32),
        "segment_valid": tf.ones((batch_size, 4), tf.bool),
        "segment_is_thing": tf.constant([[True, False, True, False]] * batch_size),
        "semantic": tf.constant(np.where(ids >= 0, ids % NUM_CLASSES, -1), tf.int32),
    }


@pytest.fixture(scope="module")
def models() -> tuple[tfk.Model, tfk.Model]:
    """(float32 model, mixed_bfloat16 model) of configs/tiny.gin with the same weights."""
    parse_config(["tiny.gin"], [])
    float32_model = _build("float32")
    _randomise_batch_norm(float32_model)
    bfloat16_model = _build("mixed_bfloat16", seed=1)
    bfloat16_model.set_weights(float32_model.get_weights())
    yield float32_model, bfloat16_model
    tfk.mixed_precision.set_global_policy("float32")


def _true_dtype(var: tf.Variable) -> tf.DType:
    # An AutoCastVariable reports its cast dtype inside a layer call; true_dtype is storage.
    return getattr(var, "true_dtype", var.dtype)


def test_builds_with_float32_weights_bfloat16_compute_and_float32_outputs(models):
    _, model = models
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert model.variables
    assert {_true_dtype(v).name for v in model.variables} == {"float32"}
    assert {v.dtype.name for v in model.variables} == {"float32"}  # read outside a call

    images = _batch()["image"]
    # The encoder computes in bfloat16 (so the policy really takes effect) ...
    endpoints = model.encoder(images / 127.5 - 1.0, training=False)
    for key in ("feature_panoptic", "feature_semantic", "transformer_mask_feature",
                "transformer_class_feature"):
        assert endpoints[key].dtype == tf.bfloat16, key
    # ... and the model's outputs, which the losses and the matching consume, are float32.
    for training in (False, True):
        out = model(images, training=training)
        assert sorted(out) == sorted(OUTPUT_KEYS)
        for key in OUTPUT_KEYS:
            assert out[key].dtype == tf.float32, (training, key)
            assert np.all(np.isfinite(out[key].numpy())), (training, key)


@pytest.mark.parametrize("training", [False, True])
def test_bfloat16_outputs_and_losses_match_float32(models, training):
    float32_model, bfloat16_model = models
    bfloat16_model.set_weights(float32_model.get_weights())
    batch = _batch(seed=1)
    loss_fn = MaXDeepLabLoss(matching_backend="tf")
    outputs, losses = {}, {}
    for name, model in (("float32", float32_model), ("bfloat16", bfloat16_model)):
        # The same seed gives both models the same drop-path draws (drawn in float32).
        tfk.utils.set_random_seed(7)
        outputs[name] = model(batch["image"], training=training)
        losses[name] = {k: float(v) for k, v in loss_fn(outputs[name], batch).items()}

    # Compute really ran in bfloat16: the outputs are not the float32 ones bit for bit ...
    assert not np.array_equal(outputs["float32"]["mask_logits"].numpy(),
                              outputs["bfloat16"]["mask_logits"].numpy())
    # ... yet every loss term agrees to bfloat16 accuracy.
    assert sorted(losses["bfloat16"]) == sorted(losses["float32"])
    for key, value in losses["float32"].items():
        assert np.isfinite(losses["bfloat16"][key]), key
        np.testing.assert_allclose(losses["bfloat16"][key], value, rtol=LOSS_RTOL,
                                   atol=LOSS_ATOL, err_msg=key)
    if not training:
        # With moving statistics the outputs agree entry for entry, and so do the slot masks
        # (softmax over slots, Eq. 9; measured max difference 3e-4). With batch statistics
        # they do not, and need not: at this random initialisation batch-statistics BN
        # amplifies any perturbation ~3x per stage (the float32 model fed
        # input * (1 + 2^-9 noise) drifts by 20% at the memory features too), so there only
        # the losses, averages over pixels and slots, compare.
        for key in OUTPUT_KEYS:
            reference = outputs["float32"][key].numpy()
            error = np.linalg.norm(outputs["bfloat16"][key].numpy() - reference)
            assert error <= OUTPUT_RTOL * np.linalg.norm(reference), key
        masks = {name: tf.nn.softmax(out["mask_logits"], axis=-1).numpy()
                 for name, out in outputs.items()}
        np.testing.assert_allclose(masks["bfloat16"], masks["float32"], atol=1e-2)


@pytest.mark.slow
def test_xla_train_step_under_mixed_bfloat16(models):
    _, model = models
    # No warmup: the first step's learning rate is the base rate, so weights must move.
    parse_config(["tiny.gin"], ["build_learning_rate_schedule.warmup_steps = 0"])
    loss_fn = MaXDeepLabLoss(matching_backend="tf")
    optimizer = build_optimizer(total_steps=10, model=model)
    backbone = {v.ref() for v in model.backbone_variables}
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]

    @tf.function(jit_compile=True)
    def train_step(batch):
        with tf.GradientTape() as tape:
            out = model(batch["image"], training=True)
            losses = loss_fn(out, batch)
        grads = tape.gradient(losses["total"], variables)
        optimizer.apply_gradients(zip(grads, variables))
        return losses, grads

    losses, grads = train_step(_batch(seed=2))
    assert losses["total"].dtype == tf.float32
    assert np.isfinite(losses["total"].numpy()) and losses["total"].numpy() > 0
    missing = [v.name for v, g in zip(variables, grads) if g is None]
    assert not missing, f"variables without gradient: {missing}"
    for var, grad in zip(variables, grads):
        assert grad.dtype == tf.float32, var.name
        assert np.all(np.isfinite(grad.numpy())), f"non-finite gradient for {var.name}"
    assert {_true_dtype(v).name for v in model.variables} == {"float32"}
    # Gradients reach (almost) every weight, and the step applies them: every weight with an
    # element whose first update (RAdam's first step is lr * g; lr = 1e-3, 1e-4 in the
    # backbone) is several float32 ulps of that element moved. (Counting all weights that
    # moved depends on the random initialisation: at init many updates are ~1 ulp and may
    # round away.)
    flowing = sum(bool(np.any(g.numpy() != 0)) for g in grads)
    assert flowing > 0.9 * len(variables), f"only {flowing}/{len(variables)} nonzero gradients"
    visible = [i for i, (b, v, g) in enumerate(zip(before, variables, grads))
               if np.any(1e-3 * (0.1 if v.ref() in backbone else 1.0)
                         * np.abs(g.numpy()) > 8 * np.spacing(np.abs(b)))]
    assert len(visible) > 0.5 * len(variables), f"{len(visible)}/{len(variables)}"
    frozen = [variables[i].name for i in visible if np.array_equal(before[i], variables[i].numpy())]
    assert not frozen, f"weights with a visible update did not move: {frozen}"
    assert all(np.all(np.isfinite(v.numpy())) for v in variables)
