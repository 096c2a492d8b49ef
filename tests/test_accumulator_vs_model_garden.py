"""The evaluator's numpy `PanopticQualityAccumulator` counts what the model garden's in-graph
`PanopticQualityV2` counts on the same label maps: the same true / false positives, false
negatives and IoU sums per class (the accumulator reads segments the way V2 does)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from official.vision.evaluation.panoptic_quality import PanopticQualityV2
from random_pq_cases import default_categories
from test_evaluation_accumulator import (
    IS_THING,
    hand_case,
    hand_expected,
    random_label_maps,
)

from max_deeplab.evaluation import PanopticQualityAccumulator


def category_instance_masks(panoptic: np.ndarray, is_thing: list[bool], label_divisor: int,
                            ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """Label maps [B, H, W] as V2 takes them: category = label + 1 (0 = void); instance =
    per-image rank of the thing (label, instance) value, 1-based, 0 for stuff and void and
    for thing pixels with instance 0 (crowd in the ground truth)."""
    label, instance = panoptic // label_divisor, panoptic % label_divisor
    void = (panoptic < 0) | (label == ignore_label) | (label >= len(is_thing))
    category = np.where(void, 0, label + 1)
    thing = np.asarray(is_thing)[np.clip(label, 0, len(is_thing) - 1)] & ~void
    counted = thing & (instance > 0)
    ranks = np.zeros_like(panoptic)
    for b in range(panoptic.shape[0]):
        values = np.unique(panoptic[b][counted[b]])
        ranks[b][counted[b]] = np.searchsorted(values, panoptic[b][counted[b]]) + 1
    return category.astype(np.int32), ranks.astype(np.int32)


def _compare(batches, is_thing: list[bool], label_divisor: int) -> dict:
    reference = PanopticQualityV2(num_categories=len(is_thing) + 1,
                                  is_thing=tuple([False] + is_thing), max_num_instances=255,
                                  ignored_label=0)
    accumulator = PanopticQualityAccumulator(len(is_thing), is_thing,
                                             label_divisor=label_divisor, ignore_label=0)
    for gt, pred in batches:
        masks = [category_instance_masks(m, is_thing, label_divisor, 0) for m in (gt, pred)]
        reference.update_state(
            {"category_mask": tf.constant(masks[0][0]), "instance_mask": tf.constant(masks[0][1])},
            {"category_mask": tf.constant(masks[1][0]), "instance_mask": tf.constant(masks[1][1])})
        accumulator.update(gt, pred)
    labels = list(range(1, len(is_thing)))  # label 0 is void
    stats = accumulator.stats
    for name, counts in (("tp", reference.tp_count), ("fp", reference.fp_count),
                         ("fn", reference.fn_count)):
        want = np.rint(counts.numpy()[np.asarray(labels) + 1]).astype(np.int64).tolist()
        assert getattr(stats, name) == want, name
    np.testing.assert_allclose(stats.iou_sum,
                               reference.tp_iou_sum.numpy()[np.asarray(labels) + 1], rtol=1e-5)
    return accumulator.result()


def test_hand_case():
    gt, pred = hand_case()
    result = _compare([(gt[None], pred[None])], IS_THING, 100)
    assert abs(result["All"]["pq"] - hand_expected()["All"]["pq"]) < 1e-6


def test_random_label_maps():
    rng = np.random.default_rng(11)
    cats = default_categories(5, 4)
    is_thing = [False] + [bool(c["isthing"]) for c in cats]
    maps = random_label_maps(rng, 8, 32, 40, cats, 256)
    batches = [(np.stack([m[0] for m in maps[i:i + 4]]), np.stack([m[1] for m in maps[i:i + 4]]))
               for i in range(0, len(maps), 4)]
    result = _compare(batches, is_thing, 256)
    assert 0 < result["All"]["pq"] < 1 and result["Things"]["n"] and result["Stuff"]["n"]
