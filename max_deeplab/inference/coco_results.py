"""Panoptic label maps -> COCO panoptic results (PNG + segments_info), NumPy only.

COCO panoptic format (the reference evaluator's input): one RGB PNG per image whose pixel
colour encodes a segment id (id = R + 256·G + 256²·B, 0 = void), and one JSON entry per
image ``{"image_id", "file_name", "segments_info": [{"id", "category_id", "iscrowd",
"bbox", "area", "score"}]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def panoptic_to_coco(panoptic: np.ndarray, table: Mapping[str, Any],
                     segment_scores: Sequence[float] | None = None,
                     ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """COCO segments of one panoptic map (output of `postprocess` / the SavedModel).

    Args:
      panoptic: int [H, W], label * label_divisor + instance, ``void_label`` for void.
      table: ``category_ids`` (contiguous order), ``label_divisor``, ``label_offset``,
        ``void_label`` (the SavedModel's `metadata` signature / metadata.json asset).
      segment_scores: [N] per-slot class confidence; a thing segment gets the score of its
        slot (instance − 1). Stuff segments merge several slots and carry no score.

    Returns:
      (segment-id map [H, W] int32 with ids 1..K and 0 = void, segments_info list).
    """
    divisor = int(table["label_divisor"])
    offset = int(table["label_offset"])
    void = int(table.get("void_label", 0))
    category_ids = list(table["category_ids"])
    panoptic = np.asarray(panoptic)
    ids = np.zeros(panoptic.shape, np.int32)
    infos = []
    values = [v for v in np.unique(panoptic) if v != void]
    for k, value in enumerate(values, start=1):
        label, instance = int(value) // divisor, int(value) % divisor
        contiguous = label - offset
        if not 0 <= contiguous < len(category_ids):
            raise ValueError(f"panoptic value {value} has label {label}, outside the "
                             f"{len(category_ids)} categories (label_offset={offset})")
        mask = panoptic == value
        ids[mask] = k
        ys, xs = np.nonzero(mask)
        info = {
            "id": k,
            "category_id": int(category_ids[contiguous]),
            "iscrowd": 0,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                     int(ys.max() - ys.min() + 1)],
            "area": int(mask.sum()),
        }
        if segment_scores is not None and instance > 0:
            info["score"] = float(segment_scores[instance - 1])
        infos.append(info)
    return ids, infos


def coco_to_panoptic(ids: np.ndarray, segments_info: Sequence[Mapping[str, Any]],
                     table: Mapping[str, Any]) -> np.ndarray:
    """A COCO segment-id map and its segments_info -> a panoptic map in `table`'s encoding
    (the inverse of `panoptic_to_coco`, e.g. to draw ground truth like predictions).

    Label = contiguous class + ``label_offset``; thing segments (crowd ones included) are
    numbered 1, 2, ... per class in segments_info order, stuff segments get instance 0;
    pixels of id 0 or of an unlisted id are ``void_label``.

    Raises:
      ValueError: a segment's category_id is not in ``table["category_ids"]``, or a class
        has more thing segments than the label divisor can number.
    """
    divisor = int(table["label_divisor"])
    offset = int(table["label_offset"])
    contiguous_of = {int(c): k for k, c in enumerate(table["category_ids"])}
    isthing = list(table["isthing"])
    ids = np.asarray(ids)
    panoptic = np.full(ids.shape, int(table.get("void_label", 0)), np.int64)
    count: dict[int, int] = {}
    for segment in segments_info:
        category = int(segment["category_id"])
        if category not in contiguous_of:
            raise ValueError(f"segment {segment.get('id')} has category_id {category}, which "
                             f"is not among the {len(contiguous_of)} categories")
        contiguous = contiguous_of[category]
        instance = 0
        if isthing[contiguous]:
            instance = count[contiguous] = count.get(contiguous, 0) + 1
            if instance >= divisor:
                raise ValueError(f"more than {divisor - 1} segments of category_id "
                                 f"{category}: raise the label divisor")
        panoptic[ids == int(segment["id"])] = (contiguous + offset) * divisor + instance
    return panoptic
