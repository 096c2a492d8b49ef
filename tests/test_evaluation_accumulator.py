"""`PanopticQualityAccumulator` (numpy, label maps): hand-computed values, agreement with
the file-based COCO evaluation, batching / merging, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from random_pq_cases import (
    Segments,
    default_categories,
    random_ground_truth,
    random_prediction,
    write_coco_pair_set,
)

from max_deeplab.evaluation import PanopticQualityAccumulator, pq_compute

D = 100  # label divisor used in the hand-made maps
# labels: 0 void, 1 person (thing), 2 car (thing), 3 sky (stuff), 4 grass (stuff)
IS_THING = [False, True, True, False, False]


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    gt = np.array([
        [300, 300, 300, 300, 300, 300],
        [300, 300, 300, 300, 300, 300],
        [101, 101, 101, 0, 200, 200],  # person 1 (6 px), void (2 px), car crowd (4 px)
        [101, 101, 101, 0, 200, 200],
    ])
    pred = np.array([
        [300, 300, 300, 300, 300, 300],
        [300, 300, 300, 300, 300, 400],  # sky 11 px, grass 1 px
        [101, 101, 102, 102, 201, 201],  # person a: 4 px in person 1; person b: 2 + 2 void
        [101, 101, 102, 102, 201, 201],  # car: all on the crowd region
    ])
    return gt, pred


def hand_expected() -> dict:
    # sky: TP IoU 11/12. grass: FP. person: a matches (IoU 4/(4+6-4) = 2/3); b has IoU
    # 2/(4+6-2-2) = 1/3 and half its area on void (not > half): FP. car: the crowd region is
    # no FN, and the car prediction lies fully on it: not FP, so car is absent (n excludes it).
    per = {1: {"pq": (2 / 3) / 1.5, "sq": 2 / 3, "rq": 1 / 1.5},
           3: {"pq": 11 / 12, "sq": 11 / 12, "rq": 1.0},
           4: {"pq": 0.0, "sq": 0.0, "rq": 0.0}}
    zero = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    out = {"per_class": {1: per[1], 2: zero, 3: per[3], 4: per[4]}}
    for name, ids in (("All", [1, 3, 4]), ("Things", [1]), ("Stuff", [3, 4])):
        out[name] = {k: float(np.mean([per[c][k] for c in ids])) for k in ("pq", "sq", "rq")}
        out[name]["n"] = len(ids)
    return out


def assert_result_close(a: dict, b: dict, tol: float) -> None:
    for name in ("All", "Things", "Stuff"):
        assert a[name]["n"] == b[name]["n"], (name, a[name], b[name])
        for k in ("pq", "sq", "rq"):
            assert abs(a[name][k] - b[name][k]) <= tol, (name, k, a[name], b[name])
    assert {int(c) for c in a["per_class"]} == {int(c) for c in b["per_class"]}
    for c in a["per_class"]:
        other = b["per_class"].get(c, b["per_class"].get(str(c), b["per_class"].get(int(c))))
        for k in ("pq", "sq", "rq"):
            assert abs(a["per_class"][c][k] - other[k]) <= tol, (c, k)


def test_hand_computed_case():
    gt, pred = hand_case()
    acc = PanopticQualityAccumulator(5, IS_THING, label_divisor=D, ignore_label=0)
    acc.update(gt, pred)
    assert_result_close(acc.result(), hand_expected(), 1e-12)
    s = acc.stats
    assert s.category_ids == [1, 2, 3, 4]
    assert s.tp == [1, 0, 1, 0] and s.fp == [1, 0, 0, 1]
    assert s.fn == [0, 0, 0, 0]


def test_void_conventions_and_thing_without_instance():
    gt, pred = hand_case()
    # Negative values are void too; a predicted thing pixel with instance 0 is no segment.
    gt2 = np.where(gt == 0, -1, gt)
    pred2 = pred.copy()
    pred2[2:, 2:4] = 100  # person b becomes "person, no instance": void, so no FP
    acc = PanopticQualityAccumulator(5, IS_THING, label_divisor=D, ignore_label=0)
    acc.update(gt2, pred2)
    assert acc.stats.fp == [0, 0, 0, 1]
    assert acc.result()["per_class"][1] == {"pq": 2 / 3, "sq": 2 / 3, "rq": 1.0}


# ------------------------------------------------------------ label maps <-> COCO files


def random_label_maps(rng: np.random.Generator, n: int, h: int, w: int, cats: list[dict],
                      divisor: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """GT / prediction panoptic maps: label = category index + 1 (0 = void), instance ids
    unique per label (crowd = thing with instance 0), some -1 void, some predicted thing
    pixels without instance."""
    def to_map(seg: Segments, gt: bool) -> np.ndarray:
        out = np.zeros(seg.index_map.shape, np.int64)
        counter: dict[int, int] = {}
        for k, (cid, crowd) in enumerate(zip(seg.category, seg.iscrowd, strict=True)):
            label = 1 + next(i for i, c in enumerate(cats) if c["id"] == cid)
            inst = 0
            if cats[label - 1]["isthing"] and not (crowd or (not gt and rng.random() < 0.1)):
                counter[label] = counter.get(label, 0) + int(rng.integers(1, 4))
                inst = counter[label]
            out[seg.index_map == k + 1] = label * divisor + inst
        if gt and rng.random() < 0.5:
            out[out == 0] = -1
        return out

    maps = []
    for _ in range(n):
        gt = random_ground_truth(rng, h, w, cats, num_things=(2, 10), crowd_prob=0.2)
        pred = random_prediction(rng, gt, cats, max_shift=2)
        maps.append((to_map(gt, True), to_map(pred, False)))
    return maps


def label_map_to_segments(pan: np.ndarray, is_thing: list[bool], cat_ids: list[int],
                          divisor: int, gt: bool) -> Segments:
    """Straightforward per-value conversion to COCO segments (independent of the accumulator)."""
    index_map = np.zeros(pan.shape, np.int32)
    keys: dict[tuple, int] = {}
    category, crowd = [], []
    for v in np.unique(pan):
        label, inst = int(v) // divisor, int(v) % divisor
        if v < 0 or label == 0:
            continue
        if is_thing[label]:
            if inst == 0 and not gt:
                continue  # predicted thing without instance: no segment
            key = (label, inst)
        else:
            key = (label,)
        if key not in keys:
            keys[key] = len(keys) + 1
            category.append(cat_ids[label])
            crowd.append(bool(is_thing[label] and inst == 0))
        index_map[pan == v] = keys[key]
    return Segments(index_map, category, crowd)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_file_based_evaluation(tmp_path, seed):
    rng = np.random.default_rng(seed)
    cats = default_categories(5, 4)
    is_thing = [False] + [bool(c["isthing"]) for c in cats]
    cat_ids = [0] + [c["id"] for c in cats]
    maps = random_label_maps(rng, 6, 40, 56, cats, 256)
    acc = PanopticQualityAccumulator(len(is_thing), is_thing, label_divisor=256,
                                     ignore_label=0, category_ids=cat_ids)
    pairs = []
    for gt, pred in maps:
        acc.update(gt, pred)
        pairs.append((label_map_to_segments(gt, is_thing, cat_ids, 256, True),
                      label_map_to_segments(pred, is_thing, cat_ids, 256, False)))
    paths = write_coco_pair_set(str(tmp_path), pairs, cats, seed=seed)
    files = pq_compute(**paths, num_workers=1)
    result = acc.result()
    assert_result_close(result, files, 1e-12)
    assert 0 < result["All"]["pq"] < 1 and result["Things"]["n"] > 0


def test_batched_updates_and_merge_equal_one_pass():
    rng = np.random.default_rng(3)
    cats = default_categories(3, 3)
    is_thing = [False] + [bool(c["isthing"]) for c in cats]
    maps = random_label_maps(rng, 6, 24, 32, cats, 256)
    one = PanopticQualityAccumulator(len(is_thing), is_thing)
    for gt, pred in maps:
        one.update(gt, pred)
    batched = PanopticQualityAccumulator(len(is_thing), is_thing)
    batched.update(np.stack([m[0] for m in maps[:4]]), np.stack([m[1] for m in maps[:4]]))
    rest = PanopticQualityAccumulator(len(is_thing), is_thing)
    rest.update(np.stack([m[0] for m in maps[4:]]), np.stack([m[1] for m in maps[4:]]))
    batched.merge(rest)
    assert batched.result() == one.result()
    one.reset()
    assert one.result()["All"]["n"] == 0


def test_bad_input_errors():
    acc = PanopticQualityAccumulator(5, IS_THING, label_divisor=D)
    gt, pred = hand_case()
    with pytest.raises(ValueError, match="shape"):
        acc.update(gt, pred[:, :-1])
    with pytest.raises(ValueError, match="label 7 outside"):
        acc.update(gt, np.where(pred == 400, 701, pred))
    with pytest.raises(ValueError, match="is_thing has 2 entries"):
        PanopticQualityAccumulator(5, [True, False])
