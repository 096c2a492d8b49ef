"""In-graph panoptic quality for compiled (XLA / TPU) evaluation steps.

Wraps model garden's `official.vision.evaluation.panoptic_quality.PanopticQualityV2`, whose
update is fixed-shape and compiles with XLA, so PQ can be accumulated inside the evaluation
step on TPU (no numpy_function). It takes the same panoptic label maps as
`PanopticQualityAccumulator` (``label * label_divisor + instance``, void = ``panoptic < 0``
or ``label == ignore_label``) and gives the same numbers (up to float32 rounding).

PanopticQualityV2 wants a category mask plus an instance mask whose ids are unique per
image across categories and at most `max_num_instances`; our instance ids are unique per
label only. The conversion therefore ranks the (label, instance) keys of thing pixels per
image with one sort (fixed shape, XLA-friendly), and shifts every label up by one so that
V2's ignored category is 0: V2 only recognises a crowd region of a non-zero category, which
the shift guarantees for every real label.
"""
from __future__ import annotations

from collections.abc import Sequence

import gin
import numpy as np
import tensorflow as tf
import tf_keras as tfk
from official.vision.evaluation.panoptic_quality import PanopticQualityV2

from max_deeplab.evaluation.pq_core import PQStats

_NO_INSTANCE = np.iinfo(np.int32).max


def to_category_instance_masks(panoptic: tf.Tensor, is_thing: Sequence[bool],
                               label_divisor: int, ignore_label: int
                               ) -> tuple[tf.Tensor, tf.Tensor]:
    """Panoptic label maps [B, H, W] -> (category_mask, instance_mask) for PanopticQualityV2.

    category = label + 1 (0 = void: negative values, the ignore label, labels outside
    is_thing); instance = per-image rank of the thing (label, instance) key, 1-based, 0 for
    stuff, void and thing pixels with instance 0 (crowd in the ground truth).
    """
    panoptic = tf.cast(panoptic, tf.int32)
    num_labels = len(is_thing)
    label = tf.math.floordiv(panoptic, label_divisor)
    instance = panoptic - label * label_divisor
    void = (panoptic < 0) | (label == ignore_label) | (label >= num_labels)
    category = tf.where(void, 0, label + 1)
    thing_table = tf.constant(list(is_thing), tf.bool)
    thing = tf.gather(thing_table, tf.clip_by_value(label, 0, num_labels - 1)) & ~void
    key = tf.where(thing & (instance > 0), panoptic, _NO_INSTANCE)

    shape = tf.shape(panoptic)
    batch = shape[0]
    flat = tf.reshape(key, [batch, -1])
    order = tf.argsort(flat, axis=-1, stable=True)
    sorted_key = tf.gather(flat, order, batch_dims=1)
    is_new = tf.concat([tf.ones_like(sorted_key[:, :1], tf.bool),
                        sorted_key[:, 1:] != sorted_key[:, :-1]], axis=1)
    rank = tf.cumsum(tf.cast(is_new, tf.int32), axis=1)
    rank = tf.where(sorted_key == _NO_INSTANCE, 0, rank)
    # Scatter the ranks back to pixel order (order is a permutation per image).
    batch_index = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(order))
    indices = tf.stack([batch_index, order], axis=-1)
    ranked = tf.scatter_nd(indices, rank, tf.shape(flat))
    return category, tf.reshape(ranked, shape)


@gin.configurable
class InGraphPanopticQuality(tfk.metrics.Metric):
    """PQ accumulated inside a (compiled) step; `summarize()` gives the COCO-style dict.

    Args:
      num_labels: labels are 0..num_labels-1 (``panoptic // label_divisor``).
      is_thing: per label, whether it is a thing class.
      label_divisor: panoptic = label * label_divisor + instance.
      ignore_label: the void label (0 in our inference output).
      max_num_instances: most thing instances one image may hold (PanopticQualityV2's
        one-hot width; instances beyond it are silently dropped by V2, so keep it >= the
        number of mask slots N and the data set's largest instance count).
      category_ids: optional per-label key of `per_class` in `summarize()`.
    """

    def __init__(self, num_labels: int, is_thing: Sequence[bool], label_divisor: int = 256,
                 ignore_label: int = 0, max_num_instances: int = 255,
                 category_ids: Sequence[int] | None = None, name: str = "panoptic_quality",
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        if len(is_thing) != num_labels:
            raise ValueError(f"is_thing has {len(is_thing)} entries, expected num_labels="
                             f"{num_labels}")
        self.num_labels = int(num_labels)
        self.is_thing = [bool(t) for t in is_thing]
        self.label_divisor = int(label_divisor)
        self.ignore_label = int(ignore_label)
        self.category_ids = (list(range(num_labels)) if category_ids is None
                             else [int(c) for c in category_ids])
        self._pq = PanopticQualityV2(
            num_categories=num_labels + 1, is_thing=tuple([False] + self.is_thing),
            max_num_instances=max_num_instances, ignored_label=0, name=f"{name}_v2")

    def update_state(self, gt_panoptic: tf.Tensor, pred_panoptic: tf.Tensor,
                     sample_weight=None) -> None:
        """Adds a batch of ground-truth / predicted panoptic maps [B, H, W]."""
        del sample_weight
        gt_cat, gt_inst = to_category_instance_masks(gt_panoptic, self.is_thing,
                                                     self.label_divisor, self.ignore_label)
        pr_cat, pr_inst = to_category_instance_masks(pred_panoptic, self.is_thing,
                                                     self.label_divisor, self.ignore_label)
        self._pq.update_state({"category_mask": gt_cat, "instance_mask": gt_inst},
                              {"category_mask": pr_cat, "instance_mask": pr_inst})

    def reset_state(self) -> None:
        self._pq.reset_state()

    def result(self) -> tf.Tensor:
        """Mean PQ over present, non-void labels (a scalar, for Keras progress bars)."""
        counts = self._pq.tp_count + self._pq.fp_count + self._pq.fn_count
        present = tf.cast(counts[1:] > 0, tf.float32)
        res = self._pq.result()
        return tf.math.divide_no_nan(tf.reduce_sum(res["pq_per_class"][1:] * present),
                                     tf.reduce_sum(present))

    def stats(self) -> PQStats:
        """The accumulated counts as `PQStats` (eager), mergeable across hosts."""
        labels = [k for k in range(self.num_labels) if k != self.ignore_label]
        stats = PQStats([self.category_ids[k] for k in labels],
                        [self.is_thing[k] for k in labels])
        idx = np.asarray(labels, np.int64) + 1
        stats.tp = np.rint(self._pq.tp_count.numpy()[idx]).astype(np.int64).tolist()
        stats.fp = np.rint(self._pq.fp_count.numpy()[idx]).astype(np.int64).tolist()
        stats.fn = np.rint(self._pq.fn_count.numpy()[idx]).astype(np.int64).tolist()
        stats.iou_sum = self._pq.tp_iou_sum.numpy()[idx].astype(np.float64).tolist()
        return stats

    def summarize(self) -> dict:
        """{"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {id: {...}}}."""
        return self.stats().summarize()
