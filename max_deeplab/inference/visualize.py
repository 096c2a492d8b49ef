"""Colour overlays of panoptic predictions for people to look at (Pillow + NumPy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _segment_color(category_color: Any, label: int, instance: int) -> np.ndarray:
    """Category colour if known (else one derived from the label), jittered per instance
    so that touching instances of one class stay distinguishable."""
    if category_color is not None:
        base = np.asarray(category_color, np.int32)
    else:
        rng = np.random.default_rng(label * 7919)
        base = rng.integers(40, 256, 3)
    if instance > 0:
        jitter = np.random.default_rng(label * 1009 + instance).integers(-50, 51, 3)
        base = base + jitter
    return np.clip(base, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, panoptic: np.ndarray, table: Mapping[str, Any],
            alpha: float = 0.55) -> Image.Image:
    """Segments blended over the image, segment boundaries in white, class names drawn.

    Args:
      image: uint8 [H, W, 3].
      panoptic: int [H, W] (label * label_divisor + instance; ``void_label`` = void, left
        as the plain image).
      table: ``category_names``, ``label_divisor``, ``label_offset``, ``void_label`` and
        optionally ``colors`` (contiguous order).
    """
    divisor = int(table["label_divisor"])
    offset = int(table["label_offset"])
    void = int(table.get("void_label", 0))
    names = list(table["category_names"])
    colors = list(table.get("colors") or [None] * len(names))
    out = image.astype(np.float32).copy()
    panoptic = np.asarray(panoptic)
    labels_drawn = []
    for value in np.unique(panoptic):
        if value == void:
            continue
        label, instance = int(value) // divisor, int(value) % divisor
        contiguous = label - offset
        color = _segment_color(colors[contiguous] if 0 <= contiguous < len(colors) else None,
                               label, instance)
        mask = panoptic == value
        out[mask] = (1 - alpha) * out[mask] + alpha * color
        ys, xs = np.nonzero(mask)
        # Put the name on the segment pixel closest to the segment's centroid.
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        name = names[contiguous] if 0 <= contiguous < len(names) else str(label)
        labels_drawn.append((int(xs[k]), int(ys[k]), name))
    # Boundaries: pixels whose right or lower neighbour belongs to another segment.
    edge = np.zeros(panoptic.shape, bool)
    edge[:, :-1] |= panoptic[:, :-1] != panoptic[:, 1:]
    edge[:-1, :] |= panoptic[:-1, :] != panoptic[1:, :]
    out[edge] = 255
    result = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    for x, y, name in labels_drawn:
        left, top, right, bottom = draw.textbbox((x, y), name, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((x, y), name, fill=(255, 255, 255), font=font)
    return result
