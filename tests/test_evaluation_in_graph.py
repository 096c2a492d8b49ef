"""`InGraphPanopticQuality` (wrapping model garden's PanopticQualityV2): same PQ as the numpy
accumulator on the same label maps, eagerly and compiled with XLA."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_evaluation_accumulator import (
    IS_THING,
    assert_result_close,
    hand_case,
    hand_expected,
    random_label_maps,
)

from max_deeplab.evaluation import InGraphPanopticQuality, PanopticQualityAccumulator
from max_deeplab.evaluation.random_cases import default_categories
from max_deeplab.evaluation.tf_panoptic_quality import to_category_instance_masks


def test_hand_case_matches_hand_computed_values():
    gt, pred = hand_case()
    metric = InGraphPanopticQuality(5, IS_THING, label_divisor=100, ignore_label=0)
    metric.update_state(gt[None], pred[None])
    assert_result_close(metric.summarize(), hand_expected(), 1e-6)
    assert abs(float(metric.result()) - hand_expected()["All"]["pq"]) < 1e-6


def test_instance_relabelling_is_unique_per_image():
    # Same instance id under two thing labels must become two instances; stuff, void and
    # thing-without-instance pixels get instance 0.
    pan = np.array([[[101, 101, 201, 201, 300, 0, 100, 205]]])
    cat, inst = to_category_instance_masks(tf.constant(pan), IS_THING, 100, 0)
    assert cat.numpy().tolist() == [[[2, 2, 3, 3, 4, 0, 2, 3]]]
    inst = inst.numpy()[0, 0]
    assert inst[0] == inst[1] and inst[2] == inst[3] and len({inst[0], inst[2], inst[7]}) == 3
    assert set(inst[[0, 2, 7]]) == {1, 2, 3} and inst[[4, 5, 6]].tolist() == [0, 0, 0]


def _random_batches(seed: int):
    rng = np.random.default_rng(seed)
    cats = default_categories(5, 4)
    is_thing = [False] + [bool(c["isthing"]) for c in cats]
    maps = random_label_maps(rng, 8, 32, 40, cats, 256)
    batches = [(np.stack([m[0] for m in maps[i:i + 4]]), np.stack([m[1] for m in maps[i:i + 4]]))
               for i in range(0, len(maps), 4)]
    return is_thing, batches


@pytest.mark.parametrize("jit", [False, True])
def test_agrees_with_numpy_accumulator(jit):
    is_thing, batches = _random_batches(11)
    metric = InGraphPanopticQuality(len(is_thing), is_thing, label_divisor=256, ignore_label=0)
    acc = PanopticQualityAccumulator(len(is_thing), is_thing, label_divisor=256, ignore_label=0)
    # XLA is what TPUStrategy compiles with: the whole update must compile.
    def step(gt, pred):
        metric.update_state(gt, pred)

    step = tf.function(step, jit_compile=True) if jit else step
    for gt, pred in batches:
        step(tf.constant(gt, tf.int32), tf.constant(pred, tf.int32))
        acc.update(gt, pred)
    stats = metric.stats()
    assert stats.tp == acc.stats.tp
    assert stats.fp == acc.stats.fp
    assert stats.fn == acc.stats.fn
    expected = acc.result()
    assert 0 < expected["All"]["pq"] < 1 and expected["Things"]["n"] and expected["Stuff"]["n"]
    assert_result_close(metric.summarize(), expected, 1e-5)
    metric.reset_state()
    assert metric.summarize()["All"]["n"] == 0
