"""Panoptic quality of COCO-panoptic-format predictions against ground truth (the `pq` verb).

Inputs are the COCO panoptic format: a JSON with `annotations` (one per image: `image_id`,
`file_name`, `segments_info` = [{id, category_id, iscrowd, area}]) and `categories`
({id, name, isthing}), plus one RGB PNG per image whose pixel id is R + 256 G + 256^2 B
(0 = void). The numbers equal the COCO reference evaluator's (panopticapi `pq_compute`,
see `pq_core` for the rules), but the per-image work is different:

- each PNG pair becomes the pixel count of every (GT id, prediction id) pair that occurs
  (`png_overlap.pair_overlap_counts`: libdeflate and a small C loop over the PNG rows,
  ~1 ms per COCO-sized pair, no image array);
- those few dozen counts are mapped to segment indices through the JSON ids and checked
  against the JSON (`evaluate_image`), then matched (`pq_core.PQStats.add_image`);
- images are shared out to forked processes through a queue, each returning per-category
  sums (see `compute_stats`).

Bad input raises `PanopticEvalError` with a message naming the file, image and segment,
instead of producing a number: PNG segments missing from the JSON or the reverse, unknown
categories, images missing on either side, PNG size mismatches, missing files, corrupt PNGs.
Neither TensorFlow nor numpy is imported here (the verb is timed as a whole process).
"""
from __future__ import annotations

import json
import marshal
import math
import os
from collections.abc import Sequence

from max_deeplab.cpu_cores import default_num_workers
from max_deeplab.data.metadata import categories_problem
from max_deeplab.evaluation.errors import PanopticEvalError
from max_deeplab.evaluation.panoptic_png import ID_BITS
from max_deeplab.evaluation.png_overlap import pair_overlap_counts
from max_deeplab.evaluation.pq_core import PQStats
from max_deeplab.panoptic_labels import id_to_rgb

__all__ = ["PanopticEvalError", "build_jobs", "compute_stats", "evaluate_image", "pq_compute"]

VOID = 0


class _ImageJob:
    """What a worker needs to evaluate one image (picklable, small).

    A plain class rather than a dataclass: importing `dataclasses` costs ~8 ms of the `pq`
    verb's timed start-up."""

    __slots__ = ("image_id", "gt_path", "pred_path", "gt_ids", "gt_cat", "gt_crowd", "gt_area",
                 "pred_ids", "pred_cat")

    def __init__(self, image_id: object, gt_path: str, pred_path: str, gt_ids: list[int],
                 gt_cat: list[int], gt_crowd: list[bool], gt_area: list[float],
                 pred_ids: list[int], pred_cat: list[int]) -> None:
        self.image_id = image_id
        self.gt_path = gt_path
        self.pred_path = pred_path
        self.gt_ids = gt_ids  # [Kg] segment ids from the GT JSON
        self.gt_cat = gt_cat  # [Kg] category index
        self.gt_crowd = gt_crowd  # [Kg]
        self.gt_area = gt_area  # [Kg] JSON area (used in the union, as by the reference; nan: none)
        self.pred_ids = pred_ids  # [Kp]
        self.pred_cat = pred_cat  # [Kp]


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


def _field_error(what: str, json_path: str, where: str, field: str, value: object,
                 expected: str) -> PanopticEvalError:
    return PanopticEvalError(f"{what} JSON {json_path}: {where}: {field!r} is {value!r:.80}; "
                             f"expected {expected}")


def _segments(ann: dict, json_path: str, cat_index: dict[int, int], what: str,
              need_crowd_area: bool):
    """Validates one annotation's segments_info; returns id/category/crowd/area lists.

    Raises on the first bad segment, naming it and the field. Types are checked exactly
    (`type(v) is int`, also fast): a string "7" or a float 7.5 is an error, not an id."""
    image_id = ann.get("image_id")
    segs = ann.get("segments_info")
    if not isinstance(segs, list):
        raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} has no "
                                "'segments_info' list")
    ids, cats, crowd, area = [], [], [], []
    seen: set[int] = set()
    for position, s in enumerate(segs):
        if type(s) is not dict:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} "
                                    f"segments_info[{position}] is {s!r:.80}; expected an "
                                    "object with 'id' and 'category_id'")
        sid = s.get("id")
        cid = s.get("category_id")
        if type(sid) is not int or type(cid) is not int:
            field, value = ("id", sid) if type(sid) is not int else ("category_id", cid)
            raise _field_error(what, json_path, f"image_id {image_id!r} segments_info"
                               f"[{position}]", field, value, "an integer")
        if sid == VOID:
            raise PanopticEvalError(f"{what} JSON {json_path}: image_id {image_id!r} lists "
                                    "segment id 0, which is reserved for void pixels")
        if not 0 < sid < 1 << ID_BITS:
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
            where = f"image_id {image_id!r} segment id {sid}"
            iscrowd = s.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise _field_error(what, json_path, where, "iscrowd", iscrowd, "0 or 1")
            crowd.append(iscrowd == 1)
            a = s.get("area")
            if a is None:
                area.append(math.nan)
            elif type(a) in (int, float) and 0 < a < math.inf:
                area.append(float(a))
            else:
                # The reference divides by the area in the IoU union.
                raise _field_error(what, json_path, where, "area", a,
                                   "a positive number of pixels")
    return ids, cats, crowd, area


def _annotations_by_image(data: dict, json_path: str, what: str) -> dict:
    """image_id -> annotation, each annotation checked to be an object with an integer or
    string `image_id` (COCO's ids are integers; `predict` names images without a numeric
    stem by their stem), at most one per image."""
    by_image: dict = {}
    for position, ann in enumerate(data["annotations"]):
        if type(ann) is not dict:
            raise PanopticEvalError(f"{what} JSON {json_path}: annotations[{position}] is "
                                    f"{ann!r:.80}; expected an object with 'image_id', "
                                    "'file_name' and 'segments_info'")
        if "image_id" not in ann:
            raise PanopticEvalError(f"{what} JSON {json_path}: annotations[{position}]: "
                                    "'image_id' is missing")
        iid = ann["image_id"]
        if type(iid) not in (int, str):
            raise _field_error(what, json_path, f"annotations[{position}]", "image_id", iid,
                               "an integer or a string")
        if iid in by_image:
            raise PanopticEvalError(f"{what} JSON {json_path} has two annotations for "
                                    f"image_id {iid!r}")
        by_image[iid] = ann
    return by_image


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
    # Unique integer ids and an isthing each, as the reference evaluator needs (it fails on a
    # missing isthing; taking it as stuff would report a wrong Things / Stuff split).
    problem = categories_problem(cats)
    if problem:
        raise PanopticEvalError(f"ground-truth JSON {gt_json}: {problem}")
    category_ids = [c["id"] for c in cats]
    is_thing = [c["isthing"] == 1 for c in cats]
    names = [(c["id"], str(c.get("name", c["id"]))) for c in cats]
    cat_index = {cid: i for i, cid in enumerate(category_ids)}

    pred_by_image = _annotations_by_image(pred, pred_json, "prediction")
    jobs = []
    gt_by_image = _annotations_by_image(gt, gt_json, "ground-truth")
    for iid, ann in gt_by_image.items():
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
    extra = [i for i in pred_by_image if i not in gt_by_image]
    if extra:
        raise PanopticEvalError(f"prediction JSON {pred_json} has {len(extra)} image(s) absent "
                                f"from the ground truth {gt_json}, e.g. image_id {extra[0]!r}")
    return jobs, category_ids, is_thing, names


def _rgb(sid: int) -> str:
    return f"RGB {id_to_rgb(sid)}"


def evaluate_image(job: _ImageJob, stats: PQStats) -> None:
    """Reads one GT/prediction PNG pair, checks it against the JSON, adds it to `stats`."""
    counts = pair_overlap_counts(job.gt_path, job.pred_path, job.image_id)
    gt_index = {sid: k for k, sid in enumerate(job.gt_ids)}
    pred_index = {sid: j for j, sid in enumerate(job.pred_ids)}
    id_mask = (1 << ID_BITS) - 1
    inter: dict[tuple[int, int], int] = {}
    void_pred = [0] * len(job.pred_ids)
    pred_area = [0] * len(job.pred_ids)
    gt_pixels = [0] * len(job.gt_ids)
    unknown_gt: set[int] = set()
    unknown_pred: set[int] = set()
    # In key order, i.e. by (GT id, prediction id) as the reference evaluator walks them: the
    # IoU sums then add up in one order whichever path produced `counts`.
    for key, pixels in sorted(counts.items()):
        gid, pid = key >> ID_BITS, key & id_mask
        k = gt_index.get(gid, -1) if gid != VOID else None
        j = pred_index.get(pid, -1) if pid != VOID else None
        if k == -1:
            unknown_gt.add(gid)
        if j == -1:
            unknown_pred.add(pid)
        if k is not None and k >= 0:
            gt_pixels[k] += pixels
        if j is None or j < 0:
            continue
        pred_area[j] += pixels
        if k is None:
            void_pred[j] += pixels
        elif k >= 0:
            inter[k, j] = pixels
    # Ids in a PNG but not in its JSON: user error, name the (smallest) segment.
    if unknown_gt:
        bad = min(unknown_gt)
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: ground-truth PNG {job.gt_path} contains segment id "
            f"{bad} ({_rgb(bad)}) that is not in the ground-truth JSON segments_info "
            f"({len(unknown_gt)} such id(s))")
    if unknown_pred:
        bad = min(unknown_pred)
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: prediction PNG {job.pred_path} contains segment id "
            f"{bad} ({_rgb(bad)}) that is not in the prediction JSON segments_info "
            f"({len(unknown_pred)} such id(s))")
    missing = [j for j, area in enumerate(pred_area) if area == 0]
    if missing:
        raise PanopticEvalError(
            f"image_id {job.image_id!r}: prediction JSON segment id {job.pred_ids[missing[0]]}"
            f" has no pixels in the prediction PNG {job.pred_path} ({len(missing)} such "
            "segment(s))")
    # No 'area' in the JSON: use the pixel count (the reference would fail here).
    gt_area = [n if math.isnan(a) else a for a, n in zip(job.gt_area, gt_pixels)]
    stats.add_image(inter, void_pred, job.gt_cat, job.gt_crowd, gt_area, job.pred_cat,
                    pred_area)


def _drain(fd: int) -> None:
    """Reads `fd` to EOF: empties the task queue so the other processes find no more work."""
    while os.read(fd, 1 << 16):
        pass


def _evaluate_from_queue(jobs: Sequence[_ImageJob], task_fd: int, batch: int,
                         stats: PQStats) -> tuple[int, str] | None:
    """Evaluates the batches of `jobs` named by 4-byte tokens read from `task_fd` until EOF.

    Returns None, or (job index, message) of the first bad image met, after draining the
    queue so that the other processes stop after their current image.
    """
    while True:
        token = os.read(task_fd, 4)
        if not token:
            return None
        first = int.from_bytes(token, "little")
        for i in range(first, min(first + batch, len(jobs))):
            try:
                evaluate_image(jobs[i], stats)
            except PanopticEvalError as e:
                _drain(task_fd)
                return i, str(e)


def _child(jobs: Sequence[_ImageJob], task_fd: int, batch: int, stats: PQStats,
           result_fd: int) -> None:
    """Body of a forked worker: evaluates from the queue, sends its sums back, exits.

    The result is plain lists, strings and numbers, so `marshal` (built in) serialises it;
    importing `pickle` would cost ~3 ms of the `pq` verb's timed start-up."""
    code = 0
    try:
        try:
            error = _evaluate_from_queue(jobs, task_fd, batch, stats)
            payload = ("ok", [stats.tp, stats.fp, stats.fn, stats.iou_sum], error)
        except BaseException:  # a bug, not bad input: hand the traceback to the parent
            import traceback

            _drain(task_fd)
            payload = ("crash", traceback.format_exc(), None)
        with os.fdopen(result_fd, "wb") as f:
            marshal.dump(payload, f)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # no atexit handlers or stdio flushes inherited from the parent


def _compute_forked(jobs: Sequence[_ImageJob], stats: PQStats, workers: int) -> PQStats:
    """Evaluates `jobs` in this process plus `workers - 1` forked children.

    Work is shared dynamically through a pipe of job-batch tokens (each process reads the next
    token when it is free), so a slow image or a busy core does not leave the others idle.
    Forking directly (rather than a multiprocessing pool) costs ~1 ms per child and keeps this
    process working too; children return only their per-category sums (a small `PQStats`).
    """
    # At most 2048 tokens (8 KiB), so the whole queue fits in the pipe before anyone reads it.
    batch = -(-len(jobs) // 2048)
    task_r, task_w = os.pipe()
    try:
        os.write(task_w, b"".join(i.to_bytes(4, "little")
                                  for i in range(0, len(jobs), batch)))
    finally:
        os.close(task_w)  # readers see EOF once the queue is empty
    children: list[tuple[int, int]] = []
    errors: list[tuple[int, str]] = []
    crashes: list[str] = []
    try:
        for _ in range(workers - 1):
            result_r, result_w = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # e.g. a process limit: go on with the workers there are
                os.close(result_r)
                os.close(result_w)
                break
            if pid == 0:
                os.close(result_r)
                _child(jobs, task_r, batch, PQStats(stats.category_ids, stats.is_thing),
                       result_w)
            os.close(result_w)
            children.append((pid, result_r))
        error = _evaluate_from_queue(jobs, task_r, batch, stats)
        if error:
            errors.append(error)
    finally:
        # Also on an exception here (e.g. Ctrl-C): empty the queue and reap every child.
        _drain(task_r)
        os.close(task_r)
        for pid, result_r in children:
            with os.fdopen(result_r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            if not data:
                crashes.append(f"worker process {pid} exited without a result")
                continue
            try:
                status, value, error = marshal.loads(data)
            except (EOFError, ValueError, TypeError):  # cut off, e.g. the worker was killed
                crashes.append(f"worker process {pid} returned an incomplete result")
                continue
            if status == "crash":
                crashes.append(value)
                continue
            part = PQStats(stats.category_ids, stats.is_thing)
            part.tp, part.fp, part.fn, part.iou_sum = value
            stats.merge(part)
            if error:
                errors.append(error)
    if crashes:
        raise RuntimeError("a PQ worker process failed:\n" + "\n".join(crashes))
    if errors:
        # Report the first bad image in input order, as the single-process run would.
        raise PanopticEvalError(min(errors)[1])
    return stats


def compute_stats(jobs: Sequence[_ImageJob], category_ids: list[int], is_thing: list[bool],
                  num_workers: int | None = None) -> PQStats:
    """Evaluates all images, over `num_workers` processes (1 = in this process).

    Several processes need `os.fork` (Linux, macOS); elsewhere the images are evaluated in
    this process.
    """
    jobs = list(jobs)
    workers = default_num_workers() if num_workers is None else num_workers
    # Below a handful of images per process, forking costs more than it saves.
    workers = max(1, min(workers, len(jobs) // 4))
    stats = PQStats(category_ids, is_thing)
    if workers > 1 and hasattr(os, "fork"):
        return _compute_forked(jobs, stats, workers)
    for job in jobs:
        evaluate_image(job, stats)
    return stats


def pq_compute(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str,
               num_workers: int | None = None) -> dict:
    """Panoptic quality of a COCO panoptic prediction set (see module docstring).

    Returns {"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {id: {"pq","sq","rq"}}}.
    Raises PanopticEvalError on bad input.
    """
    jobs, category_ids, is_thing, _ = build_jobs(gt_json, gt_dir, pred_json, pred_dir)
    return compute_stats(jobs, category_ids, is_thing, num_workers).summarize()
