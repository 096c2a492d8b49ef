"""Memory-to-pixel attention maps of chosen output masks (paper appendix A.5).

The last dual-path transformer block's M2P attention (`MaXDeepLab(...,
return_m2p_attention=True)`) gives, per head, how much each mask slot's memory query attends
to each pixel. For a few chosen output masks (by default the largest thing and stuff segments
of the panoptic result), each head's maps are upsampled to the image and coloured, one colour
per mask, over a grey copy of the image — the paper's figure: masks attend to their own
object or stuff region.

Intensity is the attention relative to a uniform spread over the image's pixels, on a log
scale, up to the head's largest ratio among the chosen masks (at least `FULL_SCALE_RATIO`, so
a flat head stays faint): log(max(a·hw, 1)) / log(max(max a·hw, 10)). Some heads spread a
mask's attention over a region (a few times uniform), others put nearly all of it on one
position (hundreds of times uniform): a linear scale per map would show the former as a
flat wash and the latter as a dot; this one shows both, and keeps the masks of one head
comparable.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from max_deeplab.analysis.plots import font, grid, labelled, text_size
from max_deeplab.analysis.predictions import ImagePrediction

# Red, green, blue, yellow (the paper's four), then magenta and cyan.
MASK_COLORS = ((230, 25, 25), (30, 200, 40), (40, 110, 255), (255, 215, 0),
               (230, 0, 230), (0, 215, 215))
DEFAULT_NUM_MASKS = 4
# Attention this many times uniform, or the head's largest if larger, is full colour.
FULL_SCALE_RATIO = 10.0


def largest_segment_slots(prediction: ImagePrediction, is_thing: Sequence[bool],
                          count: int = DEFAULT_NUM_MASKS) -> list[int]:
    """The slots of the largest segments of the panoptic result, things and stuff in turn
    (the largest thing, the largest stuff, the second thing, ...; one kind fills in for the
    other when it runs out), `count` at most. A stuff segment may join several slots: the one
    owning most of its pixels stands for it."""
    values, areas = np.unique(prediction.panoptic[prediction.slot >= 0], return_counts=True)
    by_kind: dict[bool, list[int]] = {True: [], False: []}
    for value in values[np.argsort(-areas, kind="stable")]:
        slot = int(np.bincount(prediction.slot[prediction.panoptic == value]).argmax())
        by_kind[bool(is_thing[prediction.slot_classes[slot]])].append(slot)
    slots: list[int] = []
    while len(slots) < count and (by_kind[True] or by_kind[False]):
        for kind in (True, False):
            if by_kind[kind] and len(slots) < count:
                slot = by_kind[kind].pop(0)
                if slot not in slots:
                    slots.append(slot)
    return slots


def attention_intensity(maps: np.ndarray) -> np.ndarray:
    """[K, h, w] attention of one head -> [K, h, w] in [0, 1]: log of the ratio to uniform
    (1 / (h·w)), clipped below at 1, over the log of the largest ratio or of
    `FULL_SCALE_RATIO`, whichever is larger (module docstring)."""
    maps = np.asarray(maps, np.float64)
    ratio = np.maximum(maps * maps[0].size, 1.0)
    return np.log(ratio) / np.log(max(float(ratio.max()), FULL_SCALE_RATIO))


def _upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [h, w] -> [H, W] (bilinear)."""
    image = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), np.float64)


def colorize_attention(image: np.ndarray, maps: np.ndarray,
                       colors: Sequence[Sequence[int]] = MASK_COLORS) -> np.ndarray:
    """uint8 [H, W, 3]: one head's attention maps [K, h, w] (one per mask) as
    `attention_intensity`, upsampled to the image and blended in their colours over a
    darkened grey image (where maps overlap, their colours mix in proportion)."""
    height, width = image.shape[:2]
    grey = np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])
    base = np.repeat((0.35 * grey)[..., None], 3, axis=-1)
    weights = np.clip(np.stack([_upsample(m, (height, width))
                                for m in attention_intensity(maps)]), 0.0, 1.0)  # [K, H, W]
    total = weights.sum(axis=0)
    palette = np.asarray([colors[k % len(colors)] for k in range(len(maps))], np.float64)
    mixed = np.einsum("khw,kc->hwc", weights, palette) / np.maximum(total, 1e-12)[..., None]
    alpha = np.clip(total, 0.0, 1.0)[..., None]
    return np.round(base * (1 - alpha) + mixed * alpha).astype(np.uint8)


def _chosen_masks(prediction: ImagePrediction, slots: Sequence[int]) -> np.ndarray:
    """The image with each chosen slot's predicted pixels tinted in its colour."""
    out = np.asarray(prediction.image, np.float64).copy()
    for k, slot in enumerate(slots):
        mask = prediction.slot == slot
        out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(MASK_COLORS[k % len(MASK_COLORS)])
    return np.round(out).astype(np.uint8)


def _legend(slots: Sequence[int], names: Sequence[str], width: int) -> Image.Image:
    typeface = font(11)
    line = text_size("Ag", typeface)[1] + 6
    items, x, y = [], 2, 2
    for k, (slot, name) in enumerate(zip(slots, names, strict=True)):
        text = f"slot {slot}: {name}"
        item_w = line + text_size(text, typeface)[0] + 10
        if x > 2 and x + item_w > width:
            x, y = 2, y + line
        items.append((x, y, k, text))
        x += item_w
    strip = Image.new("RGB", (width, y + line + 2), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, k, text in items:
        draw.rectangle([x, y + 1, x + line - 6, y + line - 5],
                       fill=MASK_COLORS[k % len(MASK_COLORS)])
        draw.text((x + line - 2, y + 1), text, fill=(20, 20, 20), font=typeface)
    return strip


def draw_attention_figure(prediction: ImagePrediction, slots: Sequence[int],
                          table: Mapping[str, Any], columns: int = 3) -> Image.Image:
    """The chosen masks over the image (with a legend), then one panel per head."""
    if prediction.m2p_attention is None:
        raise ValueError("the prediction has no M2P attention (Predictor(with_attention=True))")
    attention = prediction.m2p_attention  # [heads, N, h, w]
    num_slots = attention.shape[1]
    bad = [s for s in slots if not 0 <= s < num_slots]
    if bad:
        raise ValueError(f"mask slots {bad} do not exist: the model has {num_slots} slots "
                         f"(0..{num_slots - 1})")
    names = [str(table["category_names"][prediction.slot_classes[s]])
             if 0 <= prediction.slot_classes[s] < len(table["category_names"]) else "?"
             for s in slots]
    chosen = Image.fromarray(_chosen_masks(prediction, slots))
    first = labelled(chosen, "chosen output masks")
    legend = _legend(slots, names, first.width)
    first_with_legend = Image.new("RGB", (first.width, first.height + legend.height + 2),
                                  (255, 255, 255))
    first_with_legend.paste(first, (0, 0))
    first_with_legend.paste(legend, (0, first.height + 2))
    panels = [first_with_legend]
    for head in range(attention.shape[0]):
        maps = attention[head, list(slots)]
        peak = float(maps.max()) * maps[0].size
        colored = colorize_attention(prediction.image, maps)
        panels.append(labelled(Image.fromarray(colored), f"M2P attention, head {head + 1} "
                               f"(brightest: {peak:.0f}x uniform)"))
    return grid(panels, columns=columns)
