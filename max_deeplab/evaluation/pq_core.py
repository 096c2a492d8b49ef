"""Panoptic quality bookkeeping shared by the file-based and the streaming evaluators.

PQ (Kirillov et al., "Panoptic Segmentation"; the metric of the MaX-DeepLab paper, §4) per
category c is

    PQ_c = sum_{(g, p) in TP_c} IoU(g, p) / (|TP_c| + |FP_c| / 2 + |FN_c| / 2)
         = SQ_c * RQ_c,  SQ_c = mean IoU over TP_c,  RQ_c = |TP_c| / (|TP_c| + (|FP_c| + |FN_c|)/2)

and the reported PQ is the mean over the categories that occur (TP + FP + FN > 0). The
per-image rules follow the COCO reference evaluator (panopticapi `pq_compute`) exactly:

- a ground-truth (GT) and a predicted segment of the same category match iff IoU > 0.5,
  where the union leaves out the predicted pixels that are GT void;
- crowd GT segments never match and are not false negatives;
- an unmatched prediction is not a false positive if more than half of its area lies on GT
  void plus the crowd region of its own category (the *last* crowd segment of that category
  in the annotation order, as in the reference, which keeps one crowd segment per category).

Everything here is numpy on small per-image tables: the pixel work is one `np.bincount` over
a combined (gt index, pred index) label that the callers build, so no Python loop ever runs
over pixels or over segment pairs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# IoU threshold of a match; > 0.5 makes matches unique because segments do not overlap.
MATCH_IOU = 0.5
# An unmatched prediction lying more than this fraction on void/crowd is not a false positive.
IGNORE_FRACTION = 0.5


@dataclass
class PQStats:
    """Per-category TP / FP / FN counts and summed TP IoU over a set of images.

    Index i refers to `category_ids[i]`; `is_thing[i]` tells whether it is a thing category.
    Stats are additive, so per-worker or per-host partial stats combine with `merge`.
    """

    category_ids: list[int]
    is_thing: list[bool]
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    iou_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.is_thing):
            raise ValueError(f"{len(self.category_ids)} category ids but {len(self.is_thing)} "
                             "is_thing flags")
        n = len(self.category_ids)
        self.tp = np.zeros(n, np.int64)
        self.fp = np.zeros(n, np.int64)
        self.fn = np.zeros(n, np.int64)
        self.iou_sum = np.zeros(n, np.float64)

    def merge(self, other: PQStats) -> PQStats:
        """Adds another set of stats over the same categories (in place; returns self)."""
        if list(other.category_ids) != list(self.category_ids):
            raise ValueError("cannot merge PQ stats over different category lists")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def reset(self) -> None:
        for a in (self.tp, self.fp, self.fn, self.iou_sum):
            a[...] = 0

    def add_image(self, conf: np.ndarray, gt_cat: np.ndarray, gt_crowd: np.ndarray,
                  gt_area: np.ndarray, pred_cat: np.ndarray, pred_area: np.ndarray) -> None:
        """Accumulates one image from its GT x prediction overlap table.

        Args:
          conf: int [Kg + 1, Kp + 1] pixel counts; row 0 is GT void, column 0 is "no
            predicted segment" (prediction void); row k >= 1 is GT segment k - 1, column
            j >= 1 predicted segment j - 1.
          gt_cat: int [Kg] category index (into `category_ids`) of each GT segment.
          gt_crowd: bool [Kg] crowd flag of each GT segment.
          gt_area: [Kg] area of each GT segment used in the IoU union (the reference
            evaluator takes it from the annotation JSON, not from the PNG).
          pred_cat: int [Kp] category index of each predicted segment.
          pred_area: [Kp] pixel area of each predicted segment.
        """
        num_gt, num_pred = len(gt_cat), len(pred_cat)
        inter = conf[1:, 1:]
        void_pred = conf[0, 1:]
        gt_crowd = np.asarray(gt_crowd, bool)
        gt_matched = np.zeros(num_gt, bool)
        pred_matched = np.zeros(num_pred, bool)
        if num_gt and num_pred:
            # Candidate pairs: same category, non-crowd GT, non-empty overlap.
            cand = (inter > 0) & (gt_cat[:, None] == pred_cat[None, :]) & ~gt_crowd[:, None]
            gi, pj = np.nonzero(cand)
            if gi.size:
                i = inter[gi, pj].astype(np.float64)
                # Same arithmetic as the reference: integer-valued union, one true division,
                # so the > 0.5 decisions are bit-identical.
                union = (pred_area[pj].astype(np.float64) + gt_area[gi].astype(np.float64)
                         - i - void_pred[pj].astype(np.float64))
                iou = i / union
                hit = iou > MATCH_IOU
                gi, pj, iou = gi[hit], pj[hit], iou[hit]
                n_cat = len(self.category_ids)
                self.tp += np.bincount(gt_cat[gi], minlength=n_cat)
                self.iou_sum += np.bincount(gt_cat[gi], weights=iou, minlength=n_cat)
                gt_matched[gi] = True
                pred_matched[pj] = True
        # False negatives: unmatched, non-crowd GT segments.
        missed = gt_cat[~gt_matched & ~gt_crowd]
        if missed.size:
            self.fn += np.bincount(missed, minlength=len(self.category_ids))
        # One crowd segment per category: the last one in annotation order (reference rule).
        crowd_of_cat: dict[int, int] = {}
        for k in np.flatnonzero(gt_crowd):
            crowd_of_cat[int(gt_cat[k])] = int(k)
        for j in np.flatnonzero(~pred_matched):
            ignored = int(void_pred[j])
            k = crowd_of_cat.get(int(pred_cat[j]))
            if k is not None:
                ignored += int(inter[k, j])
            if ignored / pred_area[j] > IGNORE_FRACTION:
                continue
            self.fp[pred_cat[j]] += 1

    def summarize(self) -> dict:
        """The COCO-style result: All / Things / Stuff (pq, sq, rq, n) and per_class.

        Averages run over the categories with TP + FP + FN > 0 (`n`); a group with no such
        category reports zeros (the reference evaluator divides by zero there).
        """
        tp = self.tp.astype(np.float64)
        denom = tp + 0.5 * self.fp + 0.5 * self.fn
        present = (self.tp + self.fp + self.fn) > 0
        per_class: dict[int, dict[str, float]] = {}
        pq_c = np.zeros(len(tp))
        sq_c = np.zeros(len(tp))
        rq_c = np.zeros(len(tp))
        for i, cid in enumerate(self.category_ids):
            if present[i]:
                pq_c[i] = self.iou_sum[i] / denom[i]
                sq_c[i] = self.iou_sum[i] / tp[i] if tp[i] else 0.0
                rq_c[i] = tp[i] / denom[i]
            per_class[int(cid)] = {"pq": float(pq_c[i]), "sq": float(sq_c[i]),
                                   "rq": float(rq_c[i])}
        thing = np.asarray(self.is_thing, bool)
        result: dict = {}
        for name, sel in (("All", np.ones_like(thing)), ("Things", thing), ("Stuff", ~thing)):
            m = present & sel
            n = int(m.sum())
            result[name] = {
                "pq": float(pq_c[m].sum() / n) if n else 0.0,
                "sq": float(sq_c[m].sum() / n) if n else 0.0,
                "rq": float(rq_c[m].sum() / n) if n else 0.0,
                "n": n,
            }
        result["per_class"] = per_class
        return result


def format_table(result: dict, category_names: Sequence[tuple[int, str]] | None = None) -> str:
    """A readable table of a `summarize()` result, laid out like the reference evaluator's.

    With `category_names` ([(id, name), ...]) a per-class table follows the summary.
    """
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"),
             "-" * (10 + 7 * 4)]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    if category_names:
        width = max(10, *(len(n) + len(str(i)) + 3 for i, n in category_names))
        lines += ["", "{:{w}s}| {:>5s}  {:>5s}  {:>5s}".format("class", "PQ", "SQ", "RQ",
                                                                w=width),
                  "-" * (width + 7 * 3)]
        for cid, cname in category_names:
            r = result["per_class"][cid]
            lines.append("{:{w}s}| {:5.1f}  {:5.1f}  {:5.1f}".format(
                f"{cname} ({cid})", 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], w=width))
    return "\n".join(lines)
