"""A synthetic data set in the real COCO panoptic format: shapes ("things") on textured
regions ("stuff").

Each image has 2-4 Voronoi regions of textured stuff (stripes, checkerboard, rings,
speckle; the texture is the class, the colour only leans towards it), 2-6 shape things
(disc, square, triangle, cross; random size, rotation and colour tint) drawn in random order
so later shapes occlude earlier ones, sometimes a crowd group of small same-class shapes
(one ``iscrowd`` segment), sometimes a clutter blob left void (id 0), and sensor noise
before JPEG compression. Shapes that end up almost hidden are void too, as COCO leaves
tiny fragments unlabelled. Category ids are non-contiguous like COCO's, so the
contiguous-index mapping of `max-deeplab convert` is exercised.

Everything is numpy + Pillow (no TensorFlow); image ``i`` depends only on (seed, i), so
the data set is reproducible and independent of the split.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from max_deeplab.atomic_files import write_json_atomic
from max_deeplab.file_system import create_missing_dirs, remove_empty_dirs
from max_deeplab.panoptic_labels import id_to_rgb

# (COCO-style id, name, isthing, colour used for visualisation, base hue of its pixels)
CATEGORIES: tuple[tuple[int, str, int, tuple[int, int, int], float], ...] = (
    (2, "disc", 1, (220, 20, 60), 0.00),
    (5, "square", 1, (0, 82, 233), 0.60),
    (9, "triangle", 1, (0, 175, 80), 0.33),
    (17, "cross", 1, (250, 170, 30), 0.13),
    (101, "stripes", 0, (128, 64, 128), 0.75),
    (118, "checker", 0, (70, 70, 70), 0.50),
    (143, "rings", 0, (152, 251, 152), 0.25),
    (190, "speckle", 0, (190, 153, 153), 0.90),
)
THING_IDS = tuple(c[0] for c in CATEGORIES if c[2])
STUFF_IDS = tuple(c[0] for c in CATEGORIES if not c[2])
_HUE = {c[0]: c[4] for c in CATEGORIES}
_NAME = {c[0]: c[1] for c in CATEGORIES}
# Visible thing fragments smaller than this many pixels are left void.
MIN_THING_AREA = 12


def categories_json() -> list[dict[str, Any]]:
    return [{"id": cid, "name": name, "isthing": isthing, "color": list(color),
             "supercategory": "shape" if isthing else "texture"}
            for cid, name, isthing, color, _ in CATEGORIES]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _class_colour(rng: np.random.Generator, cid: int, jitter: float) -> np.ndarray:
    hue = (_HUE[cid] + rng.uniform(-jitter, jitter)) % 1.0
    return _hsv_to_rgb(hue, rng.uniform(0.45, 0.9), rng.uniform(0.45, 0.95))


def _texture(rng: np.random.Generator, cid: int, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float texture of stuff class `cid`: the pattern identifies the class."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    name = _NAME[cid]
    if name == "stripes":
        pattern = (np.sin(2 * math.pi * u / rng.uniform(5, 9)) > 0).astype(np.float32)
    elif name == "checker":
        period = rng.uniform(7, 12)
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif name == "rings":
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        pattern = 0.5 + 0.5 * np.sin(2 * math.pi * radius / rng.uniform(6, 10))
    else:  # speckle: blocky noise
        block = int(rng.integers(2, 4))
        small = rng.random((height // block + 1, width // block + 1)).astype(np.float32)
        pattern = np.kron(small, np.ones((block, block), np.float32))[:height, :width]
    a = _class_colour(rng, cid, 0.06)
    b = a * rng.uniform(0.35, 0.6)
    return b + pattern[..., None] * (a - b)


def _shape_polygon(rng: np.random.Generator, cid: int, cy: float, cx: float, r: float
                   ) -> list[tuple[float, float]] | None:
    """Vertices of a thing shape (None for a disc, drawn as an ellipse)."""
    name = _NAME[cid]
    theta = rng.uniform(0, 2 * math.pi)

    def rotate(points):
        c, s = math.cos(theta), math.sin(theta)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if name == "disc":
        return None
    if name == "square":
        return rotate([(-r, -r), (r, -r), (r, r), (-r, r)])
    if name == "triangle":
        return rotate([(r * math.cos(a), r * math.sin(a))
                       for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    w = r * 0.38  # cross
    return rotate([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                   (-w, w), (-r, w), (-r, -w), (-w, -w)])


def _shape_mask(rng: np.random.Generator, cid: int, height: int, width: int,
                cy: float, cx: float, r: float) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(rng, cid, cy, cx, r)
    if polygon is None:
        aspect = rng.uniform(0.75, 1.3)
        draw.ellipse([cx - r * aspect, cy - r / aspect, cx + r * aspect, cy + r / aspect], fill=1)
    else:
        draw.polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _paint_thing(rng: np.random.Generator, cid: int, image: np.ndarray, mask: np.ndarray
                 ) -> None:
    """Fills `mask` with a tinted colour and a linear shading gradient (in place)."""
    height, width = mask.shape
    colour = _class_colour(rng, cid, 0.12)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.25 * ((xx * math.cos(angle) + yy * math.sin(angle))
                          / max(height, width) - 0.5)
    image[mask] = (colour[None, None, :] * shade[..., None])[mask]


@dataclass(frozen=True)
class SyntheticImage:
    image: np.ndarray                 # [H, W, 3] uint8
    segment_map: np.ndarray           # [H, W] int64 COCO segment id, 0 = void
    segments: list[dict[str, Any]]    # COCO segments_info


def generate_image(seed: int, index: int, height: int = 128, width: int = 160
                   ) -> SyntheticImage:
    """Image `index` of the data set with `seed` (deterministic in (seed, index))."""
    rng = np.random.default_rng([seed, index])
    image = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.int64)  # index into `entries`, 0 = void
    entries: list[tuple[int, bool]] = [(0, False)]  # (category id, iscrowd); 0 is void

    # Stuff: Voronoi regions (weighted distances bend the borders); same class -> same segment.
    num_regions = int(rng.integers(2, 5))
    seeds_y = rng.uniform(0, height, num_regions)
    seeds_x = rng.uniform(0, width, num_regions)
    weights = rng.uniform(0.7, 1.4, num_regions)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    distance = np.stack([np.hypot(yy - sy, xx - sx) * w
                         for sy, sx, w in zip(seeds_y, seeds_x, weights, strict=True)])
    region = np.argmin(distance, axis=0)
    stuff_classes = rng.choice(STUFF_IDS, size=num_regions)
    stuff_entry = {}
    for k, cid in enumerate(stuff_classes.tolist()):
        mask = region == k
        if cid not in stuff_entry:
            stuff_entry[cid] = len(entries)
            entries.append((cid, False))
        image[mask] = _texture(rng, cid, height, width)[mask]
        label[mask] = stuff_entry[cid]

    scale = min(height, width)
    # Crowd: a cluster of small shapes of one class, one segment with iscrowd = 1.
    if rng.random() < 0.3:
        cid = int(rng.choice(THING_IDS))
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        union = np.zeros((height, width), bool)
        for _ in range(int(rng.integers(4, 8))):
            r = rng.uniform(0.03, 0.05) * scale
            oy, ox = rng.normal(0, 0.08 * scale, 2)
            m = _shape_mask(rng, cid, height, width, cy + oy, cx + ox, r)
            _paint_thing(rng, cid, image, m)
            union |= m
        if union.any():
            entries.append((cid, True))
            label[union] = len(entries) - 1

    # Things, in drawing order: later shapes occlude earlier ones.
    for _ in range(int(rng.integers(2, 7))):
        cid = int(rng.choice(THING_IDS))
        r = rng.uniform(0.08, 0.22) * scale
        cy, cx = rng.uniform(0.05, 0.95) * height, rng.uniform(0.05, 0.95) * width
        m = _shape_mask(rng, cid, height, width, cy, cx, r)
        if not m.any():
            continue
        _paint_thing(rng, cid, image, m)
        entries.append((cid, False))
        label[m] = len(entries) - 1

    # Void clutter: an irregular noisy blob nobody labelled.
    if rng.random() < 0.5:
        blob = np.zeros((height, width), bool)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        for _ in range(3):
            r = rng.uniform(0.03, 0.07) * scale
            oy, ox = rng.normal(0, 0.04 * scale, 2)
            blob |= (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 < r * r
        image[blob] = rng.uniform(0, 255, (int(blob.sum()), 3))
        label[blob] = 0

    image += rng.normal(0, 4.0, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # COCO-style random segment ids; fragments too small to see become void.
    counts = np.bincount(label.ravel(), minlength=len(entries))
    segment_ids = np.zeros(len(entries), np.int64)
    used = set()
    segments = []
    for k in range(1, len(entries)):
        cid, crowd = entries[k]
        thing = cid in THING_IDS
        if counts[k] == 0 or (thing and not crowd and counts[k] < MIN_THING_AREA):
            continue
        sid = int(rng.integers(1, 2 ** 24))
        while sid in used:
            sid = int(rng.integers(1, 2 ** 24))
        used.add(sid)
        segment_ids[k] = sid
        rows, cols = np.nonzero(label == k)
        segments.append({
            "id": sid, "category_id": cid, "area": int(counts[k]),
            "bbox": [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1),
                     int(rows.max() - rows.min() + 1)],
            "iscrowd": int(crowd),
        })
    return SyntheticImage(image, segment_ids[label], segments)


SPLITS = ("train", "val")


class DatasetExistsError(FileExistsError):
    """The output directory already holds (part of) a data set and overwrite was not asked."""


def dataset_paths(output_dir: str) -> list[str]:
    """Every file or directory of `output_dir` that `write_dataset` writes (and replaces)."""
    return [*(os.path.join(output_dir, "annotations", f"panoptic_{split}.json")
              for split in SPLITS),
            *(os.path.join(output_dir, split) for split in SPLITS),
            *(os.path.join(output_dir, f"panoptic_{split}") for split in SPLITS)]


def write_dataset(output_dir: str, num_images: int, seed: int = 0, height: int = 128,
                  width: int = 160, num_val_images: int | None = None,
                  progress: Any = None, overwrite: bool = False) -> dict[str, int]:
    """Writes the data set in the COCO panoptic layout (docs/design.md §6).

    ``output_dir/annotations/panoptic_{train,val}.json``, ``output_dir/panoptic_{train,val}/
    <id>.png`` and ``output_dir/{train,val}/<id>.jpg``. The last `num_val_images` images
    (default: a fifth, at least 1 when there are 2 or more) form the val split.

    Everything is written into a temporary directory inside `output_dir` and moved into
    place at the end, so a failed run leaves no partial data set. If `output_dir` already
    holds any of these files or directories, `DatasetExistsError` is raised, or with
    `overwrite` they are replaced as a whole (no image of the old set stays beside the new
    ones); other files in `output_dir` are left alone.

    Returns:
      {"train": number of train images, "val": number of val images}.
    """
    existing = [p for p in dataset_paths(output_dir) if os.path.lexists(p)]
    if existing and not overwrite:
        raise DatasetExistsError(
            f"{output_dir} already holds a data set ({', '.join(existing)}); pass --overwrite "
            f"to replace it, or choose another --output_dir")
    if num_val_images is None:
        num_val_images = num_images // 5 if num_images >= 5 else min(1, num_images - 1)
    num_val_images = max(0, min(num_val_images, num_images))
    splits = {"train": range(0, num_images - num_val_images),
              "val": range(num_images - num_val_images, num_images)}
    created = create_missing_dirs(os.path.abspath(output_dir))
    try:
        # Inside output_dir: the same file system, so the final moves are renames.
        staging = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=output_dir)
        try:
            for split, indices in splits.items():
                _write_split(staging, split, indices, seed, height, width, progress)
            _move_into_place(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return {split: len(indices) for split, indices in splits.items()}


def _write_split(root: str, split: str, indices: range, seed: int, height: int, width: int,
                 progress: Any) -> None:
    """Images, panoptic PNGs and the annotation JSON of one split, under `root`."""
    image_dir = os.path.join(root, split)
    panoptic_dir = os.path.join(root, f"panoptic_{split}")
    os.makedirs(image_dir)
    os.makedirs(panoptic_dir)
    images, annotations = [], []
    for index in indices:
        sample = generate_image(seed, index, height, width)
        image_id = index + 1
        stem = f"{image_id:012d}"
        Image.fromarray(sample.image).save(os.path.join(image_dir, stem + ".jpg"), quality=90)
        Image.fromarray(id_to_rgb(sample.segment_map)).save(
            os.path.join(panoptic_dir, stem + ".png"))
        images.append({"id": image_id, "file_name": stem + ".jpg", "width": width,
                       "height": height})
        annotations.append({"image_id": image_id, "file_name": stem + ".png",
                            "segments_info": sample.segments})
        if progress is not None:
            progress(split, len(images), len(indices))
    data = {
        "info": {"description": f"max-deeplab synthetic shapes-on-textures, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories_json(),
    }
    write_json_atomic(os.path.join(root, "annotations", f"panoptic_{split}.json"), data,
                      indent=None)


def _move_into_place(staging: str, output_dir: str) -> None:
    """Moves the data set written under `staging` to `output_dir`; entries of an earlier
    data set there are first moved into `staging` (deleted with it)."""
    for path in dataset_paths(output_dir):
        relative = os.path.relpath(path, output_dir)
        if os.path.lexists(path):
            os.replace(path, os.path.join(staging, "previous-" + relative.replace(os.sep, "-")))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(os.path.join(staging, relative), path)
