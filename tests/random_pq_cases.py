"""Random COCO-panoptic ground-truth / prediction pairs, for parity tests and benchmarks.

Ground truth: stuff regions tiling the image, things (ellipses, boxes) painted on top, some
of them crowd, and a void band. Prediction: a perturbed copy (shifted, segments dropped,
split, relabelled, false-positive blobs, void holes, same-class blobs on crowd regions), so
a case exercises TP, FP, FN, crowd and void rules with IoUs spread around 0.5.
Pure numpy + Pillow: test and benchmark data (tests/, benchmarks/bench_pq.py), not part of
the package.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Segments:
    """A segment-index map (0 = void, k >= 1 = segment k - 1) and per-segment info."""

    index_map: np.ndarray  # int32 [H, W]
    category: list[int]  # category id per segment
    iscrowd: list[bool]


def default_categories(num_things: int = 6, num_stuff: int = 4) -> list[dict]:
    """COCO-like categories with non-contiguous ids: things first, then stuff."""
    cats = [{"id": 1 + 2 * i, "name": f"thing{i}", "isthing": 1} for i in range(num_things)]
    cats += [{"id": 100 + 3 * i, "name": f"stuff{i}", "isthing": 0} for i in range(num_stuff)]
    return cats


def _paint_shape(rng: np.random.Generator, mask_shape: tuple[int, int],
                 min_size: int, max_size: int) -> tuple[slice, slice, np.ndarray]:
    """A random ellipse or box: its bounding-box slices and the boolean mask inside them."""
    h, w = mask_shape
    sh = int(rng.integers(min_size, max(min_size + 1, min(max_size, h))))
    sw = int(rng.integers(min_size, max(min_size + 1, min(max_size, w))))
    y0 = int(rng.integers(0, max(1, h - sh)))
    x0 = int(rng.integers(0, max(1, w - sw)))
    ys, xs = slice(y0, min(h, y0 + sh)), slice(x0, min(w, x0 + sw))
    bh, bw = ys.stop - ys.start, xs.stop - xs.start
    if rng.random() < 0.5:
        m = np.ones((bh, bw), bool)
    else:
        yy = (np.arange(bh)[:, None] + 0.5 - bh / 2) / (bh / 2)
        xx = (np.arange(bw)[None, :] + 0.5 - bw / 2) / (bw / 2)
        m = yy * yy + xx * xx <= 1.0
    return ys, xs, m


def random_ground_truth(rng: np.random.Generator, height: int, width: int,
                        categories: list[dict], num_things: tuple[int, int] = (4, 20),
                        crowd_prob: float = 0.1, void: bool = True) -> Segments:
    """A ground-truth panoptic map with stuff regions, things (some crowd) and void."""
    things = [c["id"] for c in categories if c["isthing"]]
    stuff = [c["id"] for c in categories if not c["isthing"]]
    index_map = np.zeros((height, width), np.int32)
    cat: list[int] = []
    crowd: list[bool] = []
    # Stuff: horizontal/vertical bands with random cut points (2-5 regions).
    if stuff:
        n_stuff = int(rng.integers(2, 6))
        cuts = np.sort(rng.integers(1, height, n_stuff - 1))
        bounds = np.concatenate([[0], cuts, [height]])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b > a:
                cat.append(int(rng.choice(stuff)))
                crowd.append(False)
                index_map[a:b] = len(cat)
        if rng.random() < 0.5:  # a vertical stuff band on top
            x0 = int(rng.integers(0, width - 1))
            x1 = int(rng.integers(x0 + 1, width + 1))
            cat.append(int(rng.choice(stuff)))
            crowd.append(False)
            index_map[:, x0:x1] = len(cat)
    n = int(rng.integers(num_things[0], num_things[1] + 1)) if things else 0
    lo = max(2, min(height, width) // 20)
    hi = max(lo + 2, min(height, width) // 2)
    for _ in range(n):
        ys, xs, m = _paint_shape(rng, (height, width), lo, hi)
        cat.append(int(rng.choice(things)))
        crowd.append(bool(rng.random() < crowd_prob))
        index_map[ys, xs][m] = len(cat)
    if void:
        # A void border band plus a void blob, as COCO has unlabelled boundaries/regions.
        b = int(rng.integers(0, max(1, height // 30)))
        if b:
            index_map[:b] = 0
        if rng.random() < 0.7:
            ys, xs, m = _paint_shape(rng, (height, width), lo, hi)
            index_map[ys, xs][m] = 0
    return _compact(index_map, cat, crowd)


def _compact(index_map: np.ndarray, cat: list[int], crowd: list[bool]) -> Segments:
    """Drops segments that were fully painted over; renumbers 1..K."""
    present = np.bincount(index_map.ravel(), minlength=len(cat) + 1)[1:] > 0
    new_index = np.zeros(len(cat) + 1, np.int32)
    new_index[1:][present] = np.arange(1, int(present.sum()) + 1)
    return Segments(new_index[index_map],
                    [c for c, p in zip(cat, present, strict=True) if p],
                    [c for c, p in zip(crowd, present, strict=True) if p])


def random_prediction(rng: np.random.Generator, gt: Segments, categories: list[dict],
                      max_shift: int = 3) -> Segments:
    """A perturbed prediction of `gt` (see module docstring)."""
    h, w = gt.index_map.shape
    all_ids = [c["id"] for c in categories]
    thing_ids = [c["id"] for c in categories if c["isthing"]]
    index_map = gt.index_map.copy()
    cat = list(gt.category)
    # Crowd segments are predicted as ordinary segments of their class (possibly split).
    crowd = [False] * len(cat)
    if max_shift:
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
        index_map = np.roll(index_map, (dy, dx), axis=(0, 1))
    # Void pixels of the GT get guessed as some segment (so void overlaps predictions).
    for k in range(len(cat)):
        r = rng.random()
        if r < 0.08:  # dropped -> FN (pixels become void in the prediction)
            index_map[index_map == k + 1] = 0
        elif r < 0.16:  # wrong category -> FP + FN
            cat[k] = int(rng.choice(all_ids))
        elif r < 0.30:  # split: a part becomes a new segment of the same class
            ys, xs = np.nonzero(index_map == k + 1)
            if ys.size > 4:
                cut = int(np.median(xs)) + int(rng.integers(-3, 4))
                sel = xs >= cut
                cat.append(cat[k])
                crowd.append(False)
                index_map[ys[sel], xs[sel]] = len(cat)
    lo = max(2, min(h, w) // 25)
    hi = max(lo + 2, min(h, w) // 4)
    for _ in range(int(rng.integers(0, 5))):  # false-positive blobs
        ys, xs, m = _paint_shape(rng, (h, w), lo, hi)
        cat.append(int(rng.choice(thing_ids or all_ids)))
        crowd.append(False)
        index_map[ys, xs][m] = len(cat)
    # A same-class blob inside each crowd region: exempt from FP if mostly on the crowd.
    for k, is_crowd in enumerate(gt.iscrowd):
        if is_crowd and rng.random() < 0.8:
            ys, xs = np.nonzero(gt.index_map == k + 1)
            if ys.size:
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                cat.append(gt.category[k])
                crowd.append(False)
                index_map[y0:y1, x0:x1][gt.index_map[y0:y1, x0:x1] == k + 1] = len(cat)
    if rng.random() < 0.5:  # a void hole in the prediction
        ys, xs, m = _paint_shape(rng, (h, w), lo, hi)
        index_map[ys, xs][m] = 0
    return _compact(index_map, cat, crowd)


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct non-zero 24-bit colour ids."""
    ids: set[int] = set()
    while len(ids) < n:
        ids.update(int(v) for v in rng.integers(1, 1 << 24, n - len(ids)))
    return np.asarray(sorted(ids), np.int64)[rng.permutation(n)]


def write_png_ids(path: str, id_map: np.ndarray) -> None:
    """Writes an id map as a COCO panoptic PNG (`max_deeplab.panoptic_labels.id_to_rgb`)."""
    from PIL import Image

    from max_deeplab.panoptic_labels import id_to_rgb

    Image.fromarray(id_to_rgb(id_map)).save(path)


def segments_to_coco(rng: np.random.Generator, seg: Segments, image_id: int, file_name: str,
                     with_area: bool = True) -> tuple[dict, np.ndarray]:
    """COCO annotation dict and colour-id map of a `Segments` (random distinct colour ids)."""
    ids = _unique_ids(rng, len(seg.category))
    lut = np.concatenate([[0], ids])
    id_map = lut[seg.index_map]
    areas = np.bincount(seg.index_map.ravel(), minlength=len(ids) + 1)[1:]
    infos = []
    for k, (sid, c, cr) in enumerate(zip(ids, seg.category, seg.iscrowd, strict=True)):
        info = {"id": int(sid), "category_id": int(c), "iscrowd": int(cr)}
        if with_area:
            info["area"] = int(areas[k])
        infos.append(info)
    return {"image_id": image_id, "file_name": file_name, "segments_info": infos}, id_map


def write_coco_pair_set(root: str, pairs: list[tuple[Segments, Segments]],
                        categories: list[dict], seed: int = 0) -> dict[str, str]:
    """Writes GT and prediction JSON + PNG folders under `root`; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = {"gt_json": os.path.join(root, "gt.json"), "gt_dir": os.path.join(root, "gt"),
             "pred_json": os.path.join(root, "pred.json"), "pred_dir": os.path.join(root, "pred")}
    os.makedirs(paths["gt_dir"], exist_ok=True)
    os.makedirs(paths["pred_dir"], exist_ok=True)
    gt_anns, pred_anns, images = [], [], []
    for i, (gt, pred) in enumerate(pairs):
        name = f"{i:06d}.png"
        h, w = gt.index_map.shape
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
        ann, id_map = segments_to_coco(rng, gt, i, name)
        write_png_ids(os.path.join(paths["gt_dir"], name), id_map)
        gt_anns.append(ann)
        ann, id_map = segments_to_coco(rng, pred, i, name, with_area=False)
        write_png_ids(os.path.join(paths["pred_dir"], name), id_map)
        pred_anns.append(ann)
    with open(paths["gt_json"], "w") as f:
        json.dump({"images": images, "annotations": gt_anns, "categories": categories}, f)
    with open(paths["pred_json"], "w") as f:
        json.dump({"annotations": pred_anns}, f)
    return paths


def random_pair_set(root: str, num_images: int, height: int, width: int, seed: int = 0,
                    categories: list[dict] | None = None,
                    num_things: tuple[int, int] = (4, 20)) -> dict[str, str]:
    """`num_images` random GT/prediction pairs written in COCO panoptic format under root."""
    rng = np.random.default_rng(seed)
    categories = categories or default_categories()
    pairs = []
    for _ in range(num_images):
        gt = random_ground_truth(rng, height, width, categories, num_things=num_things)
        pairs.append((gt, random_prediction(rng, gt, categories)))
    return write_coco_pair_set(root, pairs, categories, seed=seed + 1)
