"""Drawing helpers of the analysis pictures (Pillow + NumPy: no plotting library).

A heat colour map, labelled panels and a grid layout, and the two slot-statistics plots
(paper appendix A.3): the slot × class firing table and the average masks by firing group.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from max_deeplab.analysis.slot_statistics import FREQUENCY_GROUPS, NEVER, SlotStatistics

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID = (200, 200, 200)
# Black -> purple -> red -> orange -> pale yellow ("inferno"-like: dark for none, light for
# many, monotone in lightness so it reads in grey too).
_HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9],
                          [252, 255, 164]], np.float64)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] colours of values in [0, 1] (clipped; NaN is white)."""
    values = np.asarray(values, np.float64)
    nan = np.isnan(values)
    position = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_HEAT_ANCHORS) - 2)
    weight = (position - low)[..., None]
    colors = _HEAT_ANCHORS[low] * (1 - weight) + _HEAT_ANCHORS[low + 1] * weight
    colors[nan] = BACKGROUND
    return np.round(colors).astype(np.uint8)


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (its small bitmap font on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_size(text: str, typeface: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), text, font=typeface)
    return right - left, bottom - top


def labelled(image: Image.Image, label: str, typeface: ImageFont.ImageFont | None = None
             ) -> Image.Image:
    """`image` with `label` written in a strip above it."""
    typeface = typeface or font()
    width, height = text_size(label, typeface)
    strip = height + 6
    out = Image.new("RGB", (max(image.width, width + 4), image.height + strip), BACKGROUND)
    ImageDraw.Draw(out).text((2, 2), label, fill=INK, font=typeface)
    out.paste(image, (0, strip))
    return out


def grid(panels: Sequence[Image.Image], columns: int, gap: int = 6) -> Image.Image:
    """Panels in rows of `columns`, each cell as large as the largest panel."""
    if not panels:
        return Image.new("RGB", (1, 1), BACKGROUND)
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    rows = -(-len(panels) // columns)
    columns = min(columns, len(panels))
    out = Image.new("RGB", (columns * cell_w + (columns + 1) * gap,
                            rows * cell_h + (rows + 1) * gap), BACKGROUND)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        out.paste(panel, (gap + column * (cell_w + gap), gap + row * (cell_h + gap)))
    return out


def stack_vertically(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = max(image.width for image in images)
    out = Image.new("RGB", (width, sum(i.height for i in images) + gap * (len(images) - 1)),
                    BACKGROUND)
    top = 0
    for image in images:
        out.paste(image, (0, top))
        top += image.height + gap
    return out


def draw_slot_class_firings(stats: SlotStatistics, class_names: Sequence[str],
                            is_thing: Sequence[bool], cell: int = 14) -> Image.Image:
    """The slot × class joint distribution of firings: one row per slot (most firings
    first), one column per class that any slot predicted (things, then stuff), colour =
    firings / the largest cell; each row ends with the slot's total firings."""
    typeface = font(max(10, cell - 2))
    firings = stats.firings
    slots = sorted(range(stats.num_slots), key=lambda i: (-firings[i], i))
    used = [c for c in range(stats.num_classes) if stats.joint[:, c].any()]
    columns = ([c for c in used if is_thing[c]] + [None]
               + [c for c in used if not is_thing[c]])  # None: the things | stuff gap
    names = {c: class_names[c] for c in used}
    label_w = max([text_size(f"slot {i}", typeface)[0] for i in slots] + [1]) + 8
    header_h = max([text_size(n, typeface)[0] for n in names.values()] + [1]) + 8
    total_w = text_size(str(max(firings.max(), 0)) + "x", typeface)[0] + 10
    title = (f"slot x class firings over {stats.num_images} images (colour: firings / "
             f"{int(stats.joint.max()) if stats.joint.size else 0}; things | stuff)")
    title_h = text_size(title, typeface)[1] + 10
    width = max(label_w + cell * len(columns) + total_w, text_size(title, typeface)[0] + 8)
    height = title_h + header_h + cell * len(slots) + 4
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill=INK, font=typeface)
    top = title_h + header_h
    scale = max(int(stats.joint.max()), 1)
    for x, c in enumerate(columns):
        left = label_w + x * cell
        if c is None:
            draw.line([(left + cell // 2, top), (left + cell // 2, height - 4)], fill=GRID)
            continue
        # The class name, rotated to read upwards above its column.
        w, h = text_size(names[c], typeface)
        label = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
        ImageDraw.Draw(label).text((2, 1), names[c], fill=INK, font=typeface)
        rotated = label.rotate(90, expand=True)
        out.paste(rotated, (left + (cell - rotated.width) // 2, top - rotated.height - 2))
    for y, slot in enumerate(slots):
        row_top = top + y * cell
        draw.text((4, row_top), f"slot {slot}", fill=INK, font=typeface)
        for x, c in enumerate(columns):
            if c is None:
                continue
            left = label_w + x * cell
            count = stats.joint[slot, c]
            color = tuple(int(v) for v in heat_colors(count / scale)) if count else BACKGROUND
            draw.rectangle([left, row_top, left + cell - 2, row_top + cell - 2], fill=color,
                           outline=GRID)
        draw.text((label_w + cell * len(columns) + 4, row_top), f"{firings[slot]}x",
                  fill=INK, font=typeface)
    return out


def draw_average_masks(stats: SlotStatistics, class_names: Sequence[str], tile: int = 64,
                       columns: int = 8) -> Image.Image:
    """Each slot's average unit-square mask (colour: the share of its firings covering the
    point, scaled to the tile's largest, which is printed), grouped by how often the slots
    fire; under each: slot, firings, its most frequent class."""
    typeface = font(11)
    masks = stats.average_masks()
    groups = stats.frequency_groups()
    firings = stats.firings
    sections = []
    for name in (*FREQUENCY_GROUPS, NEVER):
        slots = groups[name]
        if not slots:
            continue
        panels = []
        for slot in slots:
            peak = 0.0 if name == NEVER else float(masks[slot].max())
            if peak > 0:
                image = Image.fromarray(heat_colors(masks[slot] / peak)).resize(
                    (tile, tile), Image.NEAREST)
            else:
                image = Image.new("RGB", (tile, tile), (235, 235, 235))
            top_class = class_names[int(np.argmax(stats.joint[slot]))] if firings[slot] else "-"
            captions = [f"{slot}: {firings[slot]}x {top_class}"]
            if name != NEVER:
                captions.append(f"peak {peak:.2f}")
            for k, caption in enumerate(captions):
                while text_size(caption, typeface)[0] > tile + 30 and len(caption) > 4:
                    caption = caption[:-2] + "."
                captions[k] = caption
            line = text_size("Ag", typeface)[1] + 3
            panel = Image.new("RGB", (tile + 30, tile + 4 + 2 * line), BACKGROUND)
            panel.paste(image, (15, 0))
            for k, caption in enumerate(captions):
                ImageDraw.Draw(panel).text((1, tile + 2 + k * line), caption, fill=INK,
                                           font=typeface)
            panels.append(panel)
        header = {"frequent": "most firings", "medium": "medium firings",
                  "rare": "fewest firings", NEVER: "never fired"}[name]
        sections.append(labelled(grid(panels, columns),
                                 f"{header} ({len(slots)} slots)", font(13)))
    title = labelled(stack_vertically(sections) if sections else Image.new("RGB", (1, 1)),
                     f"average mask of each slot on the unit square, {stats.num_images} "
                     "images (colour: share of the slot's firings covering the point, "
                     "up to the tile's peak)", font(13))
    return title
