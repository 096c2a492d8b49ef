"""Training diagnostics (paper Figs. 5-6; `max_deeplab.training.diagnostics`).

Expected values come from `_reference`, plain numpy loops over pixels and segments with a
brute-force matching over every injective assignment (independent of the loss's vectorised
TensorFlow and of the Hungarian solvers).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from test_export import StandIn

from max_deeplab.losses import MaXDeepLabLoss
from max_deeplab.panoptic_labels import LABEL_DIVISOR
from max_deeplab.training.diagnostics import (
    DIAGNOSTIC_NAMES,
    SUMMARY_PREFIX,
    diagnostic_values,
    losses_and_diagnostics,
    matching_diagnostics,
)
from max_deeplab.training.trainer import Evaluator, Trainer

B, H, W, N, C, D, K = 2, 5, 6, 5, 3, 4, 3
TAU = 0.3


def _case(seed: int = 0) -> tuple[dict, dict]:
    """Outputs at the targets' resolution (nearest resampling is then the identity)."""
    rng = np.random.default_rng(seed)
    feature = rng.normal(size=(B, H, W, D))
    feature /= np.linalg.norm(feature, axis=-1, keepdims=True)
    outputs = {"mask_logits": rng.normal(0, 2, (B, H, W, N)),
               "class_logits": rng.normal(0, 2, (B, N, C + 1)),
               "pixel_feature": feature,
               "semantic_logits": rng.normal(size=(B, H, W, C))}
    ids = rng.integers(-1, K, (B, H, W))
    ids[1][ids[1] == 2] = 0  # image 1: segment 2 owns no pixel (valid, not present)
    classes = rng.integers(0, C, (B, K))
    targets = {"segment_ids": ids, "segment_classes": classes,
               "segment_valid": np.array([[True, True, False], [True, True, True]]),
               "segment_is_thing": np.array([[True, False, True], [True, True, False]]),
               "semantic": np.where(ids >= 0, 0, -1)}
    # Segment 2 of image 0 is invalid: its pixels are unlabelled.
    targets["segment_ids"] = np.where((np.arange(B)[:, None, None] == 0) & (ids == 2), -1, ids)
    return ({k: tf.constant(v, tf.float32) for k, v in outputs.items()},
            {k: tf.constant(v) for k, v in targets.items()})


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference(outputs: dict, targets: dict) -> dict[str, tuple[float, float]]:
    """(sum, count) of every diagnostic, by loops."""
    mask_logits = outputs["mask_logits"].numpy().astype(np.float64)
    class_logits = outputs["class_logits"].numpy().astype(np.float64)
    feature = outputs["pixel_feature"].numpy().astype(np.float64)
    ids = targets["segment_ids"].numpy()
    sums = {name: [0.0, 0.0] for name in DIAGNOSTIC_NAMES}
    for b in range(B):
        present = [k for k in range(K) if targets["segment_valid"].numpy()[b, k]
                   and (ids[b] == k).any()]
        labelled = ids[b] >= 0
        probs = np.stack([[_softmax(mask_logits[b, y, x]) for x in range(W)]
                          for y in range(H)])
        class_prob = np.stack([_softmax(class_logits[b, n]) for n in range(N)])
        dice, pclass = {}, {}
        for k in present:
            for n in range(N):
                inter = sum(probs[y, x, n] for y in range(H) for x in range(W) if ids[b, y, x] == k)
                area = (ids[b] == k).sum()
                pred = sum(probs[y, x, n] for y in range(H) for x in range(W) if labelled[y, x])
                dice[k, n] = 2 * inter / (area + pred)
                pclass[k, n] = class_prob[n, targets["segment_classes"].numpy()[b, k]]
        best, sigma = -1.0, None
        for slots in itertools.permutations(range(N), len(present)):
            total = sum(pclass[k, n] * dice[k, n] for k, n in zip(present, slots))
            if total > best:
                best, sigma = total, dict(zip(present, slots))
        for k, n in sigma.items():
            sums["matched_class_similarity"][0] += pclass[k, n]
            sums["matched_mask_similarity"][0] += dice[k, n]
            sums["matched_class_similarity"][1] += 1
            sums["matched_mask_similarity"][1] += 1
        sums["matched_slots"][0] += len(sigma)
        sums["matched_slots"][1] += 1
        embedding = {}
        for k in present:
            mean = feature[b][ids[b] == k].mean(axis=0)
            embedding[k] = mean / np.linalg.norm(mean)
        for y in range(H):
            for x in range(W):
                k = ids[b, y, x]
                if k not in sigma:
                    continue
                sums["mask_id_accuracy"][0] += float(np.argmax(mask_logits[b, y, x]) == sigma[k])
                sums["mask_id_accuracy"][1] += 1
                if targets["segment_is_thing"].numpy()[b, k]:
                    scores = {j: embedding[j] @ feature[b, y, x] / TAU for j in present}
                    sums["instance_discrimination_accuracy"][0] += float(
                        max(scores, key=scores.get) == k)
                    sums["instance_discrimination_accuracy"][1] += 1
    return {name: tuple(pair) for name, pair in sums.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnostics_equal_numpy_loops(seed):
    outputs, targets = _case(seed)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    losses, diagnostics = losses_and_diagnostics(loss, outputs, targets, global_batch_size=B)
    # The losses are the loss's own, unchanged by asking for its matching.
    plain = loss(outputs, targets, global_batch_size=B)
    for name, value in plain.items():
        assert float(losses[name]) == float(value), name
    want = _reference(outputs, targets)
    assert sorted(diagnostics) == sorted(DIAGNOSTIC_NAMES)
    for name in DIAGNOSTIC_NAMES:
        np.testing.assert_allclose([float(v) for v in diagnostics[name]], want[name],
                                   rtol=1e-5, err_msg=name)
    # Something is being measured: not every accuracy is trivially 0 or 1.
    values = diagnostic_values({k: (float(s), float(c)) for k, (s, c) in diagnostics.items()})
    assert all(0.0 <= values[name] <= 1.0 for name in DIAGNOSTIC_NAMES if name != "matched_slots")
    assert values["matched_slots"] == pytest.approx(2.0)  # image 0: 2 present, image 1: 2


@pytest.mark.slow  # ~14 s compiling the "tf" matcher; the real model's XLA steps check it too
def test_diagnostics_compile_with_xla_and_match_eager():
    outputs, targets = _case(3)
    loss = MaXDeepLabLoss(matching_backend="tf")

    def run(outputs, targets):
        return losses_and_diagnostics(loss, outputs, targets, global_batch_size=B)[1]

    eager = run(outputs, targets)
    compiled = tf.function(run, jit_compile=True)(outputs, targets)
    for name in DIAGNOSTIC_NAMES:
        np.testing.assert_allclose([float(v) for v in compiled[name]],
                                   [float(v) for v in eager[name]], rtol=1e-5, err_msg=name)


def test_without_instance_discrimination_that_accuracy_is_absent():
    outputs, targets = _case(0)
    loss = MaXDeepLabLoss(matching_backend="scipy", use_instance_discrimination=False)
    _, matched = loss(outputs, targets, return_matching=True)
    assert matched.instance_logits is None
    diagnostics = matching_diagnostics(outputs["mask_logits"], matched)
    assert "instance_discrimination_accuracy" not in diagnostics
    # Other loss functions (stand-ins) give no diagnostics.
    losses, none = losses_and_diagnostics(lambda o, t, global_batch_size: {"total": 0.0},
                                          outputs, targets, B)
    assert none == {} and "total" in losses
    assert diagnostic_values({"a": (1.0, 0.0), "b": (1.0, 4.0)}) == {"b": 0.25}


class FeatureStandIn(StandIn):
    """`StandIn` whose pixel features differ between channels (its own are all equal, so
    every instance embedding would tie)."""

    def __init__(self):
        super().__init__()
        self.feature = tfk.layers.Conv2D(8, 1, kernel_initializer=tfk.initializers.RandomNormal(
            0, 1, seed=2))


def _standin_batches(height: int, width: int) -> dict:
    rng = np.random.default_rng(5)
    ids = np.full((2, height, width), -1, np.int32)
    ids[:, : height // 2] = 0
    ids[:, height // 2:, : width // 2] = 1
    ids[1, height // 2:, width // 2:] = 2
    return {"image": tf.constant(rng.uniform(0, 255, (2, height, width, 3)), tf.float32),
            "segment_ids": tf.constant(ids),
            "segment_classes": tf.constant([[0, 1, 2], [3, 1, 0]], tf.int32),
            "segment_valid": tf.constant([[True, True, False], [True, True, True]]),
            "segment_is_thing": tf.constant([[False, True, True], [False, True, True]]),
            "semantic": tf.constant(np.where(ids >= 0, 0, -1), tf.int32),
            # The pipeline's ground-truth panoptic map (data encoding: class × divisor +
            # instance, void −1), which the evaluator scores against.
            "panoptic": tf.constant(_panoptic_map(ids, [[0, 1, 2], [3, 1, 0]],
                                                  [[False, True, True], [False, True, True]]))}


def _panoptic_map(ids: np.ndarray, classes: list, is_thing: list) -> np.ndarray:
    panoptic = np.full(ids.shape, -1, np.int32)
    for b in range(ids.shape[0]):
        for s, (c, thing) in enumerate(zip(classes[b], is_thing[b], strict=True)):
            panoptic[b][ids[b] == s] = c * LABEL_DIVISOR + (s + 1 if thing else 0)
    return panoptic


def test_trainer_and_evaluator_log_the_diagnostics():
    """Training loops and evaluations of a model with MaX-DeepLab's outputs return the
    diagnostics among their logs (TensorBoard scalars); the evaluator prints them."""
    height, width = 33, 49
    batch = _standin_batches(height, width)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = FeatureStandIn()
        model(tf.zeros([1, height, width, 3]))
        optimizer = tfk.optimizers.SGD(1e-3)
        step = tf.Variable(0, dtype=tf.int64)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch).repeat())
    loss = MaXDeepLabLoss(matching_backend="scipy")
    trainer = Trainer(strategy, model, loss, optimizer, dataset, step, 2, 2,
                      print_fn=lambda line: None)
    logs = trainer.train(tf.constant(2))
    for name in DIAGNOSTIC_NAMES:
        assert SUMMARY_PREFIX + name in logs, name
    # 2 present segments in image 0 (segment 2 is invalid), 3 in image 1.
    assert float(logs[SUMMARY_PREFIX + "matched_slots"]) == pytest.approx(2.5)
    for name in DIAGNOSTIC_NAMES[:-1]:
        assert 0.0 <= float(logs[SUMMARY_PREFIX + name]) <= 1.0, name

    lines = []
    evaluator = Evaluator(strategy, model, loss, strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch)), 2, is_thing=[False, True, True, True],
        postprocess_fn=lambda o, image_size: {"panoptic": tf.zeros(
            [2, *image_size], tf.int32)}, global_step=step, print_fn=lines.append)
    eval_logs = evaluator.evaluate(tf.constant(-1))
    # The evaluation's values are those of one loss call on the batch after training.
    _, want = losses_and_diagnostics(loss, model(batch["image"], training=False), batch, 2)
    for name, (total, count) in want.items():
        assert eval_logs[SUMMARY_PREFIX + name] == pytest.approx(float(total) / float(count),
                                                                 rel=1e-5), name
    assert "diagnostics | instance_discrimination_accuracy=" in lines[0]
