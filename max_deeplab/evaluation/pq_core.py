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

Per image the input is the sparse overlap of GT and predicted segments (the non-zero
entries of the GT x prediction pixel table, a few dozen per image), so this is plain Python:
no numpy, which the `pq` verb's processes then never import (see `coco_panoptic`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# IoU threshold of a match; > 0.5 makes matches unique because segments do not overlap.
MATCH_IOU = 0.5
# An unmatched prediction lying more than this fraction on void/crowd is not a false positive.
IGNORE_FRACTION = 0.5


class PQStats:
    """Per-category TP / FP / FN counts and summed TP IoU over a set of images.

    Index i refers to `category_ids[i]`; `is_thing[i]` tells whether it is a thing category.
    Stats are additive, so per-worker or per-host partial stats combine with `merge`.
    (A plain class: importing `dataclasses` costs ~8 ms of the `pq` verb's timed start-up.)
    """

    def __init__(self, category_ids: Sequence[int], is_thing: Sequence[bool]) -> None:
        if len(category_ids) != len(is_thing):
            raise ValueError(f"{len(category_ids)} category ids but {len(is_thing)} "
                             "is_thing flags")
        self.category_ids = list(category_ids)
        self.is_thing = list(is_thing)
        self.tp: list[int] = []
        self.fp: list[int] = []
        self.fn: list[int] = []
        self.iou_sum: list[float] = []
        self.reset()

    def merge(self, other: PQStats) -> PQStats:
        """Adds another set of stats over the same categories (in place; returns self)."""
        if list(other.category_ids) != list(self.category_ids):
            raise ValueError("cannot merge PQ stats over different category lists")
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn),
                             (self.iou_sum, other.iou_sum)):
            for i, value in enumerate(theirs):
                mine[i] += value
        return self

    def reset(self) -> None:
        n = len(self.category_ids)
        self.tp, self.fp, self.fn, self.iou_sum = [0] * n, [0] * n, [0] * n, [0.0] * n

    def add_image(self, inter: Mapping[tuple[int, int], int], void_pred: Sequence[int],
                  gt_cat: Sequence[int], gt_crowd: Sequence[bool], gt_area: Sequence[float],
                  pred_cat: Sequence[int], pred_area: Sequence[int]) -> None:
        """Accumulates one image from its GT x prediction overlaps.

        Args:
          inter: {(k, j): pixels} for every GT segment k and predicted segment j that
            overlap (pixels > 0); pairs absent from it do not overlap.
          void_pred: [Kp] pixels of each predicted segment on GT void.
          gt_cat: [Kg] category index (into `category_ids`) of each GT segment.
          gt_crowd: [Kg] crowd flag of each GT segment.
          gt_area: [Kg] area of each GT segment used in the IoU union (the reference
            evaluator takes it from the annotation JSON, not from the PNG).
          pred_cat: [Kp] category index of each predicted segment.
          pred_area: [Kp] pixel area of each predicted segment.
        """
        gt_matched = [False] * len(gt_cat)
        pred_matched = [False] * len(pred_cat)
        for (k, j), pixels in inter.items():
            if gt_crowd[k] or gt_cat[k] != pred_cat[j]:
                continue
            # Same arithmetic as the reference (float64, integer-valued union, one true
            # division), so the > 0.5 decisions are bit-identical.
            union = float(pred_area[j]) + float(gt_area[k]) - pixels - void_pred[j]
            iou = pixels / union
            if iou > MATCH_IOU:
                c = gt_cat[k]
                self.tp[c] += 1
                self.iou_sum[c] += iou
                gt_matched[k] = pred_matched[j] = True
        # False negatives: unmatched, non-crowd GT segments.
        crowd_of_cat: dict[int, int] = {}
        for k, c in enumerate(gt_cat):
            if gt_crowd[k]:
                # One crowd segment per category: the last in annotation order (reference).
                crowd_of_cat[c] = k
            elif not gt_matched[k]:
                self.fn[c] += 1
        for j, c in enumerate(pred_cat):
            if pred_matched[j]:
                continue
            ignored = void_pred[j]
            k = crowd_of_cat.get(c)
            if k is not None:
                ignored += inter.get((k, j), 0)
            if ignored / pred_area[j] > IGNORE_FRACTION:
                continue
            self.fp[c] += 1

    def summarize(self) -> dict:
        """The COCO-style result: All / Things / Stuff (pq, sq, rq, n) and per_class.

        Averages run over the categories with TP + FP + FN > 0 (`n`); a group with no such
        category reports zeros (the reference evaluator divides by zero there).
        """
        per_class: dict[int, dict[str, float]] = {}
        present: list[tuple[bool, float, float, float]] = []  # (is_thing, pq, sq, rq)
        for i, cid in enumerate(self.category_ids):
            tp, fp, fn, iou_sum = self.tp[i], self.fp[i], self.fn[i], self.iou_sum[i]
            pq = sq = rq = 0.0
            if tp + fp + fn > 0:
                denom = tp + 0.5 * fp + 0.5 * fn
                pq, rq = iou_sum / denom, tp / denom
                sq = iou_sum / tp if tp else 0.0
                present.append((bool(self.is_thing[i]), pq, sq, rq))
            per_class[int(cid)] = {"pq": float(pq), "sq": float(sq), "rq": float(rq)}
        result: dict = {}
        for name, keep in (("All", lambda t: True), ("Things", lambda t: t),
                           ("Stuff", lambda t: not t)):
            rows = [r for r in present if keep(r[0])]
            n = len(rows)
            result[name] = {key: float(sum(r[col] for r in rows) / n) if n else 0.0
                            for col, key in ((1, "pq"), (2, "sq"), (3, "rq"))}
            result[name]["n"] = n
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
