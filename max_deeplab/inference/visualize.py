"""Colour drawings of panoptic maps for people to look at (Pillow + NumPy): `overlay` over
the photo, with names and a legend, and `colorize`, the map alone.

`overlay` is made to be legible on photographs:
- each class is drawn in its data-set colour, made vivid and then lightened, darkened or
  turned to the opposite hue until it differs from the photo pixels it covers by at least
  `MIN_CONTRAST` (COCO's dark greys and navy blues vanish on dark photo regions otherwise);
  instances of one class get nearby hues, so touching ones stay apart;
- one-pixel boundaries, white on dark pixels and black on light ones;
- class names on the segments (larger segments first; a name that would cover an earlier
  one is left out), and a legend strip below the photo with a swatch, the name and, for
  things, the instance count of every class present.

The photo part of the result is pixel-aligned with the input image (the legend is added
below it).
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Euclidean RGB distance (0-255 scale) wanted between a class's colour and the mean photo
# colour under it; with alpha 0.55 the overlay then moves those pixels by >= 66 levels.
MIN_CONTRAST = 120.0
_LEGEND_BACKGROUND = (32, 32, 32)
_TEXT = (255, 255, 255)
_TEXT_BACKGROUND = (0, 0, 0)
_DARK_BOUNDARY = (20, 20, 20)


@dataclass(frozen=True)
class LegendEntry:
    """One class present in a panoptic map, as the legend shows it."""

    label: int
    name: str
    color: tuple[int, int, int]
    is_thing: bool
    num_segments: int
    area: int


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _fallback_color(label: int) -> np.ndarray:
    """A colour for a class without one: a hue derived from the label (golden-ratio steps
    spread consecutive labels around the colour wheel)."""
    return _hsv_to_rgb(label * 0.618034, 0.7, 0.9)


def contrasting_color(base: Any, photo_mean: np.ndarray,
                      min_contrast: float = MIN_CONTRAST) -> np.ndarray:
    """The first of `base` made vivid, a dark shade of it, and its opposite hue that is at
    least `min_contrast` (RGB distance) from `photo_mean`; the farthest if none is.

    Vivid: value >= 0.85 and, for chromatic colours, saturation >= 0.5 (achromatic ones,
    e.g. COCO's greys, stay grey: light grey, then dark grey).
    """
    r, g, b = (float(v) / 255.0 for v in base)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    chromatic = s >= 0.1
    vivid_s = max(s, 0.5) if chromatic else s
    candidates = [_hsv_to_rgb(h, vivid_s, max(v, 0.85)),
                  _hsv_to_rgb(h, vivid_s, 0.3),
                  _hsv_to_rgb(h + 0.5, 0.8 if chromatic else 0.0, 1.0)]
    distances = [float(np.linalg.norm(c - photo_mean)) for c in candidates]
    for color, distance in zip(candidates, distances):
        if distance >= min_contrast:
            return color
    return candidates[int(np.argmax(distances))]


def _instance_color(class_color: np.ndarray, instance: int, photo_mean: np.ndarray
                    ) -> np.ndarray:
    """A hue near the class colour's for thing instance `instance` (> 0), kept only if it
    still contrasts with the photo under the segment."""
    h, s, v = colorsys.rgb_to_hsv(*(class_color / 255.0))
    step = ((instance * 5) % 7 - 3) / 3.0  # -1 .. 1, neighbours in id far apart
    shade = _hsv_to_rgb(h + 0.06 * step, s, v * (1.0 - 0.12 * (instance % 2)))
    if np.linalg.norm(shade - photo_mean) >= MIN_CONTRAST:
        return shade
    return class_color


def segment_edges(panoptic: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels whose right or lower neighbour belongs to another segment (a
    one-pixel boundary between every two touching segments, void included)."""
    panoptic = np.asarray(panoptic)
    edge = np.zeros(panoptic.shape, bool)
    edge[:, :-1] |= panoptic[:, :-1] != panoptic[:, 1:]
    edge[:-1, :] |= panoptic[:-1, :] != panoptic[1:, :]
    return edge


def _decode(value: int, table: Mapping[str, Any]) -> tuple[int, int, int]:
    """(label, instance, contiguous class) of a panoptic value."""
    divisor = int(table["label_divisor"])
    label, instance = int(value) // divisor, int(value) % divisor
    return label, instance, label - int(table["label_offset"])


def legend_entries(image: np.ndarray, panoptic: np.ndarray, table: Mapping[str, Any]
                   ) -> list[LegendEntry]:
    """The classes present in `panoptic` (void excluded), largest area first, each with the
    colour `overlay` draws it in (chosen against the photo `image` under the class)."""
    panoptic = np.asarray(panoptic)
    void = int(table.get("void_label", 0))
    names = list(table["category_names"])
    colors = list(table.get("colors") or [None] * len(names))
    isthing = list(table.get("isthing") or [False] * len(names))
    values, areas = np.unique(panoptic, return_counts=True)
    by_label: dict[int, list[tuple[int, int]]] = {}
    for value, area in zip(values.tolist(), areas.tolist()):
        if value != void:
            by_label.setdefault(_decode(value, table)[0], []).append((value, area))
    pixels = image.reshape(-1, 3).astype(np.float64)
    flat = panoptic.reshape(-1)
    entries = []
    for label, segments in by_label.items():
        contiguous = label - int(table["label_offset"])
        known = 0 <= contiguous < len(names)
        base = colors[contiguous] if known and colors[contiguous] is not None else None
        photo_mean = pixels[np.isin(flat, [v for v, _ in segments])].mean(axis=0)
        color = contrasting_color(base if base is not None else _fallback_color(label),
                                  photo_mean)
        entries.append(LegendEntry(
            label=label, name=names[contiguous] if known else str(label),
            color=tuple(int(round(c)) for c in color),
            is_thing=bool(isthing[contiguous]) if known else False,
            num_segments=len(segments), area=sum(a for _, a in segments)))
    entries.sort(key=lambda e: (-e.area, e.label))
    return entries


def _font(image_height: int, image_width: int) -> ImageFont.ImageFont:
    """Pillow's bundled font, sized with the image (12 px at COCO's ~640x480)."""
    size = max(10, round(min(image_height, image_width) / 36))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
               for b in boxes)


def _draw_names(draw: ImageDraw.ImageDraw, panoptic: np.ndarray, names: dict[int, str],
                font: ImageFont.ImageFont, size: tuple[int, int]) -> None:
    """Each segment's class name in a black box at the segment pixel closest to its
    centroid, kept inside the image; larger segments first, overlapping names skipped."""
    height, width = size
    segments = []
    for value, name in names.items():
        ys, xs = np.nonzero(panoptic == value)
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        segments.append((-ys.size, value, int(xs[k]), int(ys[k]), name))
    drawn: list[tuple[int, int, int, int]] = []
    for _, _, x, y, name in sorted(segments):
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        w, h = right - left + 2, bottom - top + 2
        x0 = min(max(x - w // 2, 0), max(width - w, 0))
        y0 = min(max(y - h // 2, 0), max(height - h, 0))
        box = (x0, y0, x0 + w, y0 + h)
        if _overlaps(box, drawn):
            continue
        drawn.append(box)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=_TEXT_BACKGROUND)
        draw.text((x0 + 1 - left, y0 + 1 - top), name, fill=_TEXT, font=font)


def _legend(entries: list[LegendEntry], width: int, font: ImageFont.ImageFont
            ) -> Image.Image:
    """A strip `width` wide: a swatch and "name" (things: "name (count)") per entry, in rows."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line = bottom - top + 6
    swatch = line - 6
    items, x, y = [], 4, 4
    for entry in entries:
        text = f"{entry.name} ({entry.num_segments})" if entry.is_thing else entry.name
        left, _, right, _ = probe.textbbox((0, 0), text, font=font)
        item_width = swatch + 4 + (right - left) + 12
        if x > 4 and x + item_width > width:
            x, y = 4, y + line
        items.append((x, y, entry, text))
        x += item_width
    strip = Image.new("RGB", (width, y + line + 2 if entries else 0), _LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for x, y, entry, text in items:
        draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=entry.color,
                       outline=_TEXT)
        draw.text((x + swatch + 4, y + 2 - top), text, fill=_TEXT, font=font)
    return strip


def colorize(panoptic: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] colours of panoptic maps in the prediction encoding, without a photo
    or a category table (the evaluator's TensorBoard images): a fixed colour per panoptic
    value (class and instance), hashed so that neighbouring values differ, black for void."""
    value = np.asarray(panoptic, np.int64)
    rgb = np.stack([np.mod(value * multiplier + offset, 255) for multiplier, offset in
                    ((2654435761, 37), (40503, 91), (97, 173))], -1).astype(np.uint8)
    return np.where((value > 0)[..., None], rgb, np.uint8(0))


def overlay(image: np.ndarray, panoptic: np.ndarray, table: Mapping[str, Any],
            alpha: float = 0.55, names: bool = True, legend: bool = True) -> Image.Image:
    """Segments blended over the image, boundaries, class names and (below) a legend.

    Args:
      image: uint8 [H, W, 3].
      panoptic: int [H, W] (label * label_divisor + instance; ``void_label`` = void, left
        as the plain image).
      table: ``category_names``, ``label_divisor``, ``label_offset``, ``void_label`` and
        optionally ``colors`` and ``isthing`` (contiguous order), as the SavedModel's
        metadata (`max_deeplab.inference.export`).
      alpha: weight of the segment colour in the blend.
      names: draw the class names on the segments.
      legend: add the legend strip below the image.

    Returns:
      An RGB image, H (+ the legend's height) x W; its top H rows align with `image`.
    """
    image = np.asarray(image, np.uint8)
    panoptic = np.asarray(panoptic)
    if image.shape[:2] != panoptic.shape:
        raise ValueError(f"image {image.shape[:2]} and panoptic map {panoptic.shape} differ "
                         "in size")
    entries = legend_entries(image, panoptic, table)
    class_color = {e.label: np.asarray(e.color, np.float64) for e in entries}
    out = image.astype(np.float64)
    segment_names = {}
    void = int(table.get("void_label", 0))
    for value in np.unique(panoptic):
        if value == void:
            continue
        label, instance, _ = _decode(value, table)
        mask = panoptic == value
        color = class_color[label]
        if instance > 0:
            color = _instance_color(color, instance, out[mask].mean(axis=0))
        out[mask] = (1 - alpha) * out[mask] + alpha * color
        segment_names[int(value)] = next(e.name for e in entries if e.label == label)
    edge = segment_edges(panoptic)
    luminance = out @ np.asarray([0.299, 0.587, 0.114])
    out[edge & (luminance < 128)] = 255.0
    out[edge & (luminance >= 128)] = _DARK_BOUNDARY
    result = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    font = _font(*panoptic.shape)
    if names:
        _draw_names(ImageDraw.Draw(result), panoptic, segment_names, font, panoptic.shape)
    if not legend or not entries:
        return result
    strip = _legend(entries, result.width, font)
    combined = Image.new("RGB", (result.width, result.height + strip.height))
    combined.paste(result, (0, 0))
    combined.paste(strip, (0, result.height))
    return combined
