"""Mask-slot statistics over a set of images (paper appendix A.3).

A slot *fires* in an image when it owns pixels of a segment of the final panoptic result
(after the class, pixel and area filters); its class there is the class it predicts. Over
the images this gives the slot × class joint distribution of firings (the paper's Fig. "mask
slot firings and the classes they predict") and each slot's average mask: its masks resized
to a unit square (area averaging, so each image counts equally whatever its size) and
averaged over its firings. The slots are split by how often they fire into three groups of
(nearly) equal size — frequent, medium, rare — as the paper does; slots that never fire form
a fourth.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FREQUENCY_GROUPS = ("frequent", "medium", "rare")
NEVER = "never"
# Side of the unit square the masks are averaged on.
DEFAULT_UNIT_SIZE = 32


def area_resize_matrix(size: int, unit_size: int) -> np.ndarray:
    """[unit_size, size] weights of an area-averaging resize along one axis: row i is the
    overlap of each input pixel [y, y + 1) with output cell i's interval (scaled to the
    input), divided by the cell's length."""
    scale = size / unit_size
    starts = np.arange(unit_size)[:, None] * scale
    ends = starts + scale
    pixel = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(ends, pixel + 1) - np.maximum(starts, pixel), 0.0, None)
    return overlap / scale


def unit_square(mask: np.ndarray, unit_size: int = DEFAULT_UNIT_SIZE) -> np.ndarray:
    """A [h, w] mask resized to [unit_size, unit_size] by area averaging (values in [0, 1])."""
    mask = np.asarray(mask, np.float64)
    rows = area_resize_matrix(mask.shape[0], unit_size)
    cols = area_resize_matrix(mask.shape[1], unit_size)
    return rows @ mask @ cols.T


class SlotStatistics:
    """Accumulates slot firings, their classes and unit-square masks over images.

    Args:
      num_slots: N.
      num_classes: C (contiguous classes).
      unit_size: side of the unit square.
    """

    def __init__(self, num_slots: int, num_classes: int,
                 unit_size: int = DEFAULT_UNIT_SIZE):
        self.num_slots = int(num_slots)
        self.num_classes = int(num_classes)
        self.unit_size = int(unit_size)
        self.num_images = 0
        self.joint = np.zeros([self.num_slots, self.num_classes], np.int64)
        self._mask_sums = np.zeros([self.num_slots, self.unit_size, self.unit_size])

    def add(self, slot: np.ndarray, slot_classes: Sequence[int]) -> None:
        """One image: `slot` int [h, w], the slot owning each segment pixel (-1 on void);
        `slot_classes` [N], the contiguous class each slot predicts."""
        slot = np.asarray(slot)
        self.num_images += 1
        for index in np.unique(slot[slot >= 0]):
            self.joint[index, int(slot_classes[index])] += 1
            self._mask_sums[index] += unit_square(slot == index, self.unit_size)

    @property
    def firings(self) -> np.ndarray:
        """int [N]: in how many images each slot fired."""
        return self.joint.sum(axis=1)

    def average_masks(self) -> np.ndarray:
        """float [N, S, S]: each slot's mean unit-square mask over its firings (NaN for a
        slot that never fired)."""
        firings = self.firings.astype(np.float64)[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(firings > 0, self._mask_sums / firings, np.nan)

    def frequency_groups(self) -> dict[str, list[int]]:
        """Slots by firings: those that fired, most first, split into `FREQUENCY_GROUPS` of
        (nearly) equal size (ties keep slot order); `NEVER` for the others."""
        firings = self.firings
        fired = sorted((i for i in range(self.num_slots) if firings[i] > 0),
                       key=lambda i: (-firings[i], i))
        parts = np.array_split(np.asarray(fired, np.int64), len(FREQUENCY_GROUPS))
        groups = {name: [int(i) for i in part] for name, part in zip(FREQUENCY_GROUPS, parts)}
        groups[NEVER] = [i for i in range(self.num_slots) if firings[i] == 0]
        return groups

    def to_json(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The numbers behind the plots (average masks rounded to 4 decimals)."""
        masks = self.average_masks()
        return {
            "num_images": self.num_images,
            "num_slots": self.num_slots,
            "unit_size": self.unit_size,
            "class_names": list(class_names),
            "firings": [int(v) for v in self.firings],
            "slot_class_firings": self.joint.tolist(),
            "frequency_groups": self.frequency_groups(),
            "average_masks": [None if np.isnan(m).all() else np.round(m, 4).tolist()
                              for m in masks],
        }
