"""Streaming panoptic quality over panoptic label maps, for evaluation during training.

Label maps follow docs/design.md §5 / `max_deeplab.inference.postprocess`:
``panoptic = label * label_divisor + instance``. A pixel is void when ``panoptic < 0`` or its
label equals ``ignore_label``. Segments are read the way `PanopticQualityV2` (model garden)
reads them, so both evaluators agree:

- stuff label: all its pixels form one segment, whatever their instance id;
- thing label, instance > 0: one segment per (label, instance);
- thing label, instance 0: in the ground truth a *crowd* region of that label; in the
  prediction not a segment (treated like void).

Per image the COCO reference rules apply (`pq_core`: IoU > 0.5, void left out of the union,
crowd/void-covered predictions not false positives). Stats are additive: partial results from
several hosts combine with `merge`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from max_deeplab.evaluation.pq_core import PQStats
from max_deeplab.panoptic_labels import LABEL_DIVISOR, PREDICTION_VOID


class PanopticQualityAccumulator:
    """Numpy PQ accumulator: `update(gt, pred)` per batch, `result()` at the end.

    Args:
      num_labels: labels are 0..num_labels-1 (``panoptic // label_divisor``), the
        ignore label included if it lies in that range.
      is_thing: per label, whether it is a thing class (length num_labels).
      label_divisor: panoptic = label * label_divisor + instance.
      ignore_label: the void label (excluded from the metric), 0 in our inference output.
      category_ids: optional per-label id used as the key of `per_class` in `result()`
        (e.g. the COCO category id of each label); default the label itself.
    """

    def __init__(self, num_labels: int, is_thing: Sequence[bool],
                 label_divisor: int = LABEL_DIVISOR, ignore_label: int = PREDICTION_VOID,
                 category_ids: Sequence[int] | None = None) -> None:
        if len(is_thing) != num_labels:
            raise ValueError(f"is_thing has {len(is_thing)} entries, expected num_labels="
                             f"{num_labels}")
        if category_ids is not None and len(category_ids) != num_labels:
            raise ValueError(f"category_ids has {len(category_ids)} entries, expected "
                             f"num_labels={num_labels}")
        if label_divisor < 1:
            raise ValueError(f"label_divisor must be >= 1, got {label_divisor}")
        self.num_labels = int(num_labels)
        self.label_divisor = int(label_divisor)
        self.ignore_label = int(ignore_label)
        self._is_thing_label = np.asarray(is_thing, bool)
        # Metric categories: every label except the ignore label.
        self._labels = [k for k in range(num_labels) if k != self.ignore_label]
        ids = list(range(num_labels)) if category_ids is None else [int(c) for c in category_ids]
        # label -> category index in the stats (-1 for the ignore label).
        self._label_to_cat = np.full(num_labels, -1, np.int64)
        self._label_to_cat[self._labels] = np.arange(len(self._labels))
        self.stats = PQStats([ids[k] for k in self._labels],
                             [bool(self._is_thing_label[k]) for k in self._labels])

    def reset(self) -> None:
        self.stats.reset()

    def merge(self, other: PanopticQualityAccumulator) -> PanopticQualityAccumulator:
        """Adds another accumulator's stats (e.g. from another host); returns self."""
        self.stats.merge(other.stats)
        return self

    def _segments(self, panoptic: np.ndarray, is_gt: bool, name: str):
        """Segment index per pixel (0 = void) and the label/crowd flag of each segment."""
        d = self.label_divisor
        label = np.floor_divide(panoptic, d)
        instance = panoptic - label * d
        void = (panoptic < 0) | (label == self.ignore_label)
        bad = ~void & (label >= self.num_labels)
        if bad.any():
            v = int(panoptic[bad].flat[0])
            raise ValueError(f"{name} panoptic value {v} has label {v // d} outside "
                             f"[0, {self.num_labels}) (label_divisor={d})")
        thing = np.zeros(panoptic.shape, bool)
        thing[~void] = self._is_thing_label[label[~void]]
        if not is_gt:
            void |= thing & (instance == 0)  # predicted thing without instance: no segment
        # Stuff keeps only its label; things keep label and instance.
        key = np.where(thing, panoptic, label * d)
        key = np.where(void, -1, key)
        uniq, inverse = np.unique(key, return_inverse=True)
        inverse = inverse.reshape(-1)
        if uniq.size and uniq[0] == -1:
            uniq = uniq[1:]  # void is index 0
        else:
            inverse = inverse + 1
        seg_label = uniq // d
        seg_crowd = self._is_thing_label[seg_label] & (uniq % d == 0)
        return inverse, seg_label, seg_crowd

    def update(self, gt_panoptic: np.ndarray, pred_panoptic: np.ndarray) -> None:
        """Adds one image [H, W] or a batch [B, H, W] of ground-truth / predicted label maps."""
        gt = np.asarray(gt_panoptic).astype(np.int64, copy=False)
        pred = np.asarray(pred_panoptic).astype(np.int64, copy=False)
        if gt.shape != pred.shape:
            raise ValueError(f"ground-truth shape {gt.shape} != prediction shape {pred.shape}")
        if gt.ndim == 2:
            gt, pred = gt[None], pred[None]
        if gt.ndim != 3:
            raise ValueError(f"expected [H, W] or [B, H, W] label maps, got shape {gt.shape}")
        for g_map, p_map in zip(gt, pred, strict=True):
            g, g_label, g_crowd = self._segments(g_map, True, "ground-truth")
            p, p_label, _ = self._segments(p_map, False, "prediction")
            kg, kp = len(g_label) + 1, len(p_label) + 1
            conf = np.bincount(g * kp + p, minlength=kg * kp).reshape(kg, kp)
            # Row/column 0 are void; `add_image` takes the non-zero segment overlaps.
            k, j = np.nonzero(conf[1:, 1:])
            inter = dict(zip(zip(k.tolist(), j.tolist()), conf[k + 1, j + 1].tolist()))
            self.stats.add_image(inter, conf[0, 1:].tolist(),
                                 self._label_to_cat[g_label].tolist(), g_crowd.tolist(),
                                 conf[1:].sum(axis=1).tolist(),
                                 self._label_to_cat[p_label].tolist(),
                                 conf[:, 1:].sum(axis=0).tolist())

    def result(self) -> dict:
        """{"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {id: {"pq","sq","rq"}}}."""
        return self.stats.summarize()
