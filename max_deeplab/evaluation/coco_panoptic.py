"""Panoptic quality of COCO-panoptic-format predictions against ground truth (the `pq` verb).

Inputs are the COCO panoptic format: a JSON with `annotations` (one per image: `image_id`,
`file_name`, `segments_info` = [{id, category_id, iscrowd, area}]) and `categories`
({id, name, isthing}), plus one RGB PNG per image whose pixel id is R + 256 G + 256^2 B
(0 = void). The numbers equal the COCO reference evaluator's (panopticapi `pq_compute`,
see `pq_core` for the rules), but the per-image work is vectorised:

- each PNG is decoded once with Pillow, straight into int32 colour ids (no per-pixel math);
- the maps are cut into runs of equal (GT id, prediction id) pairs in raster order, the run
  ids are mapped to segment indices by binary search over the JSON ids, and the
  GT x prediction overlap table is one run-length-weighted `np.bincount` of
  `gt_index * (Kp + 2) + pred_index`;
- images are spread over worker processes (fork), each returning per-category sums.

Bad input raises `PanopticEvalError` with a message naming the file, image and segment,
instead of producing a number: PNG segments missing from the JSON or the reverse, unknown
categories, images missing on either side, PNG size mismatches, missing files.
No TensorFlow is imported here (the verb is timed as a whole process).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Imported here, before any worker is forked, so the workers do not each pay for it.
from PIL import Image

from max_deeplab.evaluation.pq_core import PQStats

VOID = 0


class PanopticEvalError(Exception):
    """A user-caused input problem (bad JSON/PNG, mismatched sets); the message says where."""


@dataclass
class _ImageJob:
    """What a worker needs to evaluate one image (picklable, small)."""

    image_id: object
    gt_path: str
    pred_path: str
    gt_ids: np.ndarray  # int64 [Kg] segment ids from the GT JSON
    gt_cat: np.ndarray  # int64 [Kg] category index
    gt_crowd: np.ndarray  # bool [Kg]
    gt_area: np.ndarray  # float64 [Kg] JSON area (what the reference uses in the union)
    pred_ids: np.ndarray  # int64 [Kp]
    pred_cat: np.ndarray  # int64 [Kp]


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PanopticEvalError(f"{what} JSON not found: {path}") from None
    except (OSError, ValueError) as e:
        raise PanopticEvalError(f"cannot read {what} JSON {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PanopticEvalError(f"{what} JSON {path} has no 'annotations' list "
                                "(expected the COCO panoptic format)")
    return data


def _segments(ann: dict, json_path: str, cat_index: dict[int, int], what: str,
              need_crowd_area: bool):
    """Validates one annotation's segments_info; returns id/category/crowd/area arrays."""
    image_id = ann.get("image_id")
    segs = ann.get("segments_info")
    if not isinstance(segs, list):
        raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} has no "
                                "'segments_info' list")
    ids, cats, crowd, area = [], [], [], []
    seen: set[int] = set()
    for s in segs:
        try:
            sid = int(s["id"])
            cid = int(s["category_id"])
        except (KeyError, TypeError, ValueError):
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} has a "
                                    f"segment without integer 'id'/'category_id': {s!r}") from None
        if sid == VOID:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} lists "
                                    "segment id 0, which is reserved for void pixels")
        if not 0 < sid < 1 << 24:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} segment "
                                    f"id {sid} is outside the RGB id range [1, 2^24)")
        if sid in seen:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} lists "
                                    f"segment id {sid} twice")
        seen.add(sid)
        if cid not in cat_index:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} segment "
                                    f"id {sid} has unknown category_id {cid} (not in the "
                                    "ground-truth 'categories')")
        ids.append(sid)
        cats.append(cat_index[cid])
        if need_crowd_area:
            crowd.append(int(s.get("iscrowd", 0)) == 1)
            a = s.get("area")
            area.append(np.nan if a is None else float(a))
    return (np.asarray(ids, np.int64), np.asarray(cats, np.int64),
            np.asarray(crowd, bool), np.asarray(area, np.float64))


def _file_name(ann: dict, json_path: str, what: str) -> str:
    name = ann.get("file_name")
    if not isinstance(name, str):
        raise PanopticEvalError(f"{what} JSON {json_path}: image_id {ann.get('image_id')!r} has "
                                "no 'file_name'")
    return name


def build_jobs(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str
               ) -> tuple[list[_ImageJob], list[int], list[bool], list[tuple[int, str]]]:
    """Reads and cross-checks both JSON files; returns per-image jobs and the categories."""
    gt = _load_json(gt_json, "ground-truth")
    pred = _load_json(pred_json, "prediction")
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not os.path.isdir(d):
            raise PanopticEvalError(f"{what} PNG directory not found: {d}")
    cats = gt.get("categories")
    if not isinstance(cats, list) or not cats:
        raise PanopticEvalError(f"ground-truth JSON {gt_json} has no 'categories' list")
    category_ids, is_thing, names = [], [], []
    for c in cats:
        try:
            category_ids.append(int(c["id"]))
        except (KeyError, TypeError, ValueError):
            raise PanopticEvalError(f"ground-truth JSON {gt_json}: category without an integer "
                                    f"'id': {c!r}") from None
        is_thing.append(int(c.get("isthing", 0)) == 1)
        names.append((category_ids[-1], str(c.get("name", category_ids[-1]))))
    if len(set(category_ids)) != len(category_ids):
        raise PanopticEvalError(f"ground-truth JSON {gt_json} lists a category id twice")
    cat_index = {cid: i for i, cid in enumerate(category_ids)}

    pred_by_image: dict = {}
    for ann in pred["annotations"]:
        iid = ann.get("image_id")
        if iid in pred_by_image:
            raise PanopticEvalError(f"prediction JSON {pred_json} has two annotations for "
                                    f"image_id {iid!r}")
        pred_by_image[iid] = ann
    jobs, gt_seen = [], set()
    for ann in gt["annotations"]:
        iid = ann.get("image_id")
        if iid in gt_seen:
            raise PanopticEvalError(f"ground-truth JSON {gt_json} has two annotations for "
                                    f"image_id {iid!r}")
        gt_seen.add(iid)
        if iid not in pred_by_image:
            raise PanopticEvalError(f"no prediction for image_id {iid!r} "
                                    f"({_file_name(ann, gt_json, 'ground-truth')}) in {pred_json}")
        pann = pred_by_image[iid]
        gt_ids, gt_cat, gt_crowd, gt_area = _segments(ann, gt_json, cat_index, "ground-truth",
                                                      need_crowd_area=True)
        pred_ids, pred_cat, _, _ = _segments(pann, pred_json, cat_index, "prediction",
                                             need_crowd_area=False)
        jobs.append(_ImageJob(
            image_id=iid,
            gt_path=os.path.join(gt_dir, _file_name(ann, gt_json, "ground-truth")),
            pred_path=os.path.join(pred_dir, _file_name(pann, pred_json, "prediction")),
            gt_ids=gt_ids, gt_cat=gt_cat, gt_crowd=gt_crowd, gt_area=gt_area,
            pred_ids=pred_ids, pred_cat=pred_cat))
    extra = [i for i in pred_by_image if i not in gt_seen]
    if extra:
        raise PanopticEvalError(f"prediction JSON {pred_json} has {len(extra)} image(s) absent "
                                f"from the ground truth {gt_json}, e.g. image_id {extra[0]!r}")
    return jobs, category_ids, is_thing, names


def read_id_png(path: str) -> np.ndarray:
    """Decodes a COCO panoptic PNG to int [H, W] pixel values (one value per colour id).

    RGB PNGs (the format) come back as int32 ``id - 2^24`` where id = R + 256 G + 256^2 B:
    Pillow keeps RGB pixels as 4 bytes R, G, B, 255, which read as one little-endian int32
    is exactly that, so no per-pixel arithmetic is needed; equal ids give equal values and
    `& 0xFFFFFF` recovers the id (also a no-op on the true ids of other modes). PNGs with extra
    channels (RGBA) are read from their first three, as the reference evaluator does;
    single-channel PNGs are rejected (the reference cannot read them either).
    """
    try:
        with Image.open(path) as img:
            if img.mode == "RGB":
                w, h = img.size
                return np.frombuffer(img.tobytes("raw", "RGBX"), "<i4").reshape(h, w)
            arr = np.asarray(img)
    except FileNotFoundError:
        raise PanopticEvalError(f"PNG not found: {path}") from None
    except OSError as e:
        raise PanopticEvalError(f"cannot decode PNG {path}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise PanopticEvalError(f"PNG {path} has shape {arr.shape} (mode {img.mode}); expected "
                                "an RGB panoptic PNG [H, W, 3] with id = R + 256 G + 256^2 B")
    arr = arr[..., :3].astype(np.int64)
    return arr[..., 0] + (arr[..., 1] << 8) + (arr[..., 2] << 16)


def _segment_index(ids: np.ndarray, seg_ids: np.ndarray, scale: int = 1) -> np.ndarray:
    """Per id: (index * scale) with index 0 = id not in `seg_ids` (an error), 1 = void (id 0),
    2 + k = seg_ids[k]. Scaling lets GT and prediction indices add up to the combined label."""
    table = np.concatenate([[VOID], seg_ids])
    order = np.argsort(table, kind="stable")
    sorted_ids = table[order]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(table) - 1)
    found = sorted_ids[pos] == ids
    return np.where(found, (order[pos] + 1) * scale, 0)


def _rgb(sid: int) -> str:
    return f"RGB ({sid % 256}, {sid // 256 % 256}, {sid // 65536})"


def evaluate_image(job: _ImageJob, stats: PQStats) -> None:
    """Decodes one GT/prediction PNG pair, checks it against the JSON, adds it to `stats`."""
    gt_ids_map = read_id_png(job.gt_path)
    pred_ids_map = read_id_png(job.pred_path)
    if gt_ids_map.shape != pred_ids_map.shape:
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: prediction PNG {job.pred_path} is "
            f"{pred_ids_map.shape[1]}x{pred_ids_map.shape[0]} (WxH) but ground-truth PNG "
            f"{job.gt_path} is {gt_ids_map.shape[1]}x{gt_ids_map.shape[0]}")
    # Panoptic maps are piecewise constant: count runs of equal (GT, prediction) pixel pairs
    # in raster order instead of pixels. Runs are ~50x fewer, so the id lookups and the
    # overlap histogram touch only the run starts, weighted by run length.
    gt_flat, pred_flat = gt_ids_map.reshape(-1), pred_ids_map.reshape(-1)
    n = gt_flat.size
    change = np.empty(n, bool)
    change[:1] = True
    np.not_equal(gt_flat[1:], gt_flat[:-1], out=change[1:])
    change[1:] |= pred_flat[1:] != pred_flat[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n)
    # `& 0xFFFFFF` turns read_id_png's int32 (id - 2^24) back into ids; no-op on true ids.
    gt_run, pred_run = gt_flat[starts] & 0xFFFFFF, pred_flat[starts] & 0xFFFFFF
    kg, kp = len(job.gt_ids) + 2, len(job.pred_ids) + 2
    g = _segment_index(gt_run, job.gt_ids, scale=kp)
    p = _segment_index(pred_run, job.pred_ids)
    # Combined label gt_index * kp + pred_index; float weights are exact (integers < 2^53).
    conf = np.bincount(g + p, weights=lengths, minlength=kg * kp).astype(np.int64)
    conf = conf.reshape(kg, kp)
    # Row/column 0 hold pixels whose id is not in the JSON: user error, name the segment.
    if conf[0].any():
        bad = np.unique(gt_run[g < kp])
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: ground-truth PNG {job.gt_path} contains segment id "
            f"{int(bad[0])} ({_rgb(int(bad[0]))}) that is not in the ground-truth JSON "
            f"segments_info ({len(bad)} such id(s))")
    if conf[:, 0].any():
        bad = np.unique(pred_run[p == 0])
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: prediction PNG {job.pred_path} contains segment id "
            f"{int(bad[0])} ({_rgb(int(bad[0]))}) that is not in the prediction JSON "
            f"segments_info ({len(bad)} such id(s))")
    conf = conf[1:, 1:]  # now row/col 0 = void, k >= 1 = segment k - 1
    pred_area = conf[:, 1:].sum(axis=0)
    missing = np.flatnonzero(pred_area == 0)
    if missing.size:
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: prediction JSON segment id {int(job.pred_ids[missing[0]])}"
            f" has no pixels in the prediction PNG {job.pred_path} ({missing.size} such "
            "segment(s))")
    gt_area = job.gt_area
    if np.isnan(gt_area).any():
        # No 'area' in the JSON: use the pixel count (the reference would fail here).
        gt_area = np.where(np.isnan(gt_area), conf[1:, :].sum(axis=1), gt_area)
    stats.add_image(conf, job.gt_cat, job.gt_crowd, gt_area, job.pred_cat, pred_area)


# Worker-process state (inherited by fork or sent once through the pool initializer).
_WORKER: dict = {}


def _init_worker(jobs: list[_ImageJob], category_ids: list[int], is_thing: list[bool]) -> None:
    _WORKER.update(jobs=jobs, category_ids=category_ids, is_thing=is_thing)


def _run_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, ...]:
    stats = PQStats(_WORKER["category_ids"], _WORKER["is_thing"])
    for job in _WORKER["jobs"][bounds[0]:bounds[1]]:
        evaluate_image(job, stats)
    return stats.tp, stats.fp, stats.fn, stats.iou_sum


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def compute_stats(jobs: Sequence[_ImageJob], category_ids: list[int], is_thing: list[bool],
                  num_workers: int | None = None) -> PQStats:
    """Evaluates all images, over `num_workers` processes (1 = in this process)."""
    jobs = list(jobs)
    workers = default_num_workers() if num_workers is None else num_workers
    # Below a handful of images per worker, forking costs more than it saves.
    workers = max(1, min(workers, len(jobs) // 4))
    stats = PQStats(category_ids, is_thing)
    if workers == 1:
        for job in jobs:
            evaluate_image(job, stats)
        return stats
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Several chunks per worker balance uneven images; each returns only 4 small arrays.
    n_chunks = min(len(jobs), workers * 4)
    edges = np.linspace(0, len(jobs), n_chunks + 1).round().astype(int)
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(jobs, category_ids, is_thing)) as pool:
        chunks = list(zip(edges[:-1], edges[1:], strict=True))
        for tp, fp, fn, iou in pool.imap_unordered(_run_chunk, chunks):
            stats.tp += tp
            stats.fp += fp
            stats.fn += fn
            stats.iou_sum += iou
    return stats


def pq_compute(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str,
               num_workers: int | None = None) -> dict:
    """Panoptic quality of a COCO panoptic prediction set (see module docstring).

    Returns {"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {id: {"pq","sq","rq"}}}.
    Raises PanopticEvalError on bad input.
    """
    jobs, category_ids, is_thing, _ = build_jobs(gt_json, gt_dir, pred_json, pred_dir)
    return compute_stats(jobs, category_ids, is_thing, num_workers).summarize()
