"""Golden tests of `max_deeplab.inference.postprocess` (paper §3.1, docs/design.md §5).

Three kinds of expectations:
* hand-made cases (thresholds just above/below, area limits at/below, ties, stuff merging)
  whose maps are written out by hand;
* a slow per-pixel NumPy implementation (written independently from the TF code) on random
  inputs, including the align-corners bilinear upsampling;
* deeplab2's own post-processor outputs on its tiny reference network outputs.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from reference_data import REFERENCE_DIR

from max_deeplab.inference import postprocess
from max_deeplab.inference.cell_pruning import cell_codes
from max_deeplab.inference.postprocess import scaled_area_limit
from max_deeplab.inference.slot_maps import kept_logits, kept_slots, upsample_logits

REFERENCE = os.path.join(REFERENCE_DIR, "tiny", "io.npz")
NO_AREA = {"thing_area_limit": 0, "stuff_area_limit": 0, "area_limit_reference_size": None}


def _class_logits(probs: list[list[float]]) -> np.ndarray:
    """[1, N, C+1] logits whose softmax is the given per-slot distribution (last = void)."""
    return np.log(np.asarray(probs, np.float64))[None].astype(np.float32)


def _run(mask_logits, class_logits, is_thing, **kw):
    out = postprocess({"mask_logits": np.asarray(mask_logits, np.float32)[None]
                       if np.ndim(mask_logits) == 3 else mask_logits,
                       "class_logits": class_logits}, is_thing=is_thing, **kw)
    return {k: v.numpy() for k, v in out.items()}


# ---------------------------------------------------------------- hand-made golden cases


def test_class_threshold_just_above_and_below_and_exact():
    # 3 slots, classes: 0 = thing, 1 = stuff. Slot 0: thing with p = 0.7001 (kept);
    # slot 1: stuff p = 0.6999 (discarded); slot 2: stuff p = 0.95 (kept).
    cl = _class_logits([[0.7001, 0.1, 0.1999], [0.1, 0.6999, 0.2001], [0.02, 0.95, 0.03]])
    # 1x3 image; each pixel strongly dominated by one slot.
    ml = np.array([[[9, 0, 0], [0, 9, 0], [0, 0, 9]]], np.float32)
    out = _run(ml, cl, [True, False], **NO_AREA)
    # Pixel 0 -> slot 0 (thing, label 1, instance 1); pixel 1 dominated by a discarded slot
    # -> void; pixel 2 -> stuff class 1 (label 2, instance 0).
    np.testing.assert_array_equal(out["panoptic"][0], [[1 * 256 + 1, 0, 2 * 256]])
    np.testing.assert_array_equal(out["semantic"][0], [[1, 2, 2]])  # dense: no thresholds
    np.testing.assert_array_equal(out["instance"][0], [[1, 0, 0]])
    np.testing.assert_allclose(out["segment_scores"][0], [0.7001, 0.0, 0.95], rtol=1e-5)
    np.testing.assert_array_equal(out["segment_classes"][0], [1, 2, 2])

    # Exactly at the threshold a slot is kept (≥); one ulp above it is discarded.
    p = float(tf.reduce_max(tf.nn.softmax(cl[0, 0])[:2]))
    at = _run(ml, cl, [True, False], class_threshold=p, **NO_AREA)
    above = _run(ml, cl, [True, False], class_threshold=float(np.nextafter(
        np.float32(p), np.float32(1))), **NO_AREA)
    assert at["panoptic"][0, 0, 0] == 257
    assert above["panoptic"][0, 0, 0] == 0


def test_pixel_threshold_strict_and_kept_slot_renormalisation():
    cl = _class_logits([[0.9, 0.05, 0.05]] * 3 + [[0.05, 0.05, 0.9]])  # slot 3 discarded
    # Confidence is the softmax over *kept* slots only: pixel 0 has kept probabilities
    # (0.41, 0.35, 0.24) -> 0.41 > 0.4 kept; pixel 1 (0.39, 0.35, 0.26) -> void.
    # Pixel 2: kept (0.5, 0.3, 0.2) plus a discarded slot with a lower logit: the
    # discarded slot does not dilute the confidence (0.5 after renormalisation).
    # Pixel 3: discarded slot dominates -> void even though slot 0 has 0.9 among kept.
    ml = np.log(np.array([[[0.41, 0.35, 0.24, 1e-6],
                           [0.39, 0.35, 0.26, 1e-6],
                           [0.5, 0.3, 0.2, 0.4],
                           [0.9, 0.05, 0.05, 5.0]]], np.float64)).astype(np.float32)
    out = _run(ml, cl, [True, True], **NO_AREA)
    np.testing.assert_array_equal(out["panoptic"][0], [[257, 0, 257, 0]])
    np.testing.assert_array_equal(out["mask_id"][0], [[1, 1, 1, 0]])
    np.testing.assert_allclose(out["pixel_confidence"][0], [[0.41, 0.39, 0.5, 0.0]],
                               rtol=1e-5)
    np.testing.assert_allclose(out["class_confidence"][0], [[0.9, 0.9, 0.9, 0.0]], rtol=1e-5)
    # Exactly at the pixel threshold the pixel is void (strict >).
    conf = float(out["pixel_confidence"][0, 0, 0])
    at = _run(ml, cl, [True, True], pixel_threshold=conf, **NO_AREA)
    assert at["panoptic"][0, 0, 0] == 0


def test_paper_rule_weights_masks_by_class_confidence():
    # Slot 0: class 0 with p = 0.75; slot 1: class 1 with p = 0.99. Pixel mask logits
    # favour slot 0 slightly: m̂ = (0.55, 0.45). Paper: 0.75*0.55 = 0.4125 < 0.99*0.45 =
    # 0.4455 -> slot 1; deeplab2 rule -> slot 0.
    cl = _class_logits([[0.75, 0.2, 0.05], [0.005, 0.99, 0.005]])
    ml = np.log(np.array([[[0.55, 0.45]]])).astype(np.float32)
    paper = _run(ml, cl, [True, True], pixel_threshold=0.0, **NO_AREA)
    ref = _run(ml, cl, [True, True], pixel_threshold=0.0,
               weight_masks_by_class_confidence=False, **NO_AREA)
    assert paper["panoptic"][0, 0, 0] == 2 * 256 + 2
    assert ref["panoptic"][0, 0, 0] == 1 * 256 + 1
    np.testing.assert_allclose(paper["pixel_confidence"][0, 0, 0], 0.45, rtol=1e-5)
    np.testing.assert_allclose(ref["pixel_confidence"][0, 0, 0], 0.55, rtol=1e-5)
    # Pixel threshold applies to the chosen slot's confidence: 0.45 > 0.44 but not > 0.46.
    assert _run(ml, cl, [True, True], pixel_threshold=0.44, **NO_AREA)["panoptic"][0, 0, 0]
    assert not _run(ml, cl, [True, True], pixel_threshold=0.46,
                    **NO_AREA)["panoptic"][0, 0, 0]


def test_literal_paper_rule_differs_from_the_kept_slot_rule_where_it_should():
    """rule="paper" (§3.1, §4 literally: both argmaxes over all N slots, then void by class
    confidence < 0.7 and m̂ < 0.4) against the default "kept_slots" rule, pixel by pixel.
    Slot 0: class 0 with p 0.5 (void under both); slot 1: class 0 with p 0.9 (kept);
    slot 2: ∅ with p 0.95 (void); classes 0 (thing) and 1 (stuff)."""
    cl = _class_logits([[0.5, 0.1, 0.4], [0.9, 0.05, 0.05], [0.02, 0.03, 0.95]])
    ml = np.array([[
        # Pixel 0: discarded slot 0 has the largest logit. kept_slots: void (dominated by a
        # discarded slot). Paper: ln 0.5 + 1.0 < ln 0.9 + 0.8, so ẑ = slot 1 with
        # m̂ = 1 / (1 + e^0.2) = 0.450 >= 0.4: slot 1's thing.
        [1.0, 0.8, -30.0],
        # Pixel 1: slot 1 has the largest logit. kept_slots: ẑ = slot 1, confidence over
        # kept slots 1.0: slot 1. Paper: the ∅ slot wins the weighted argmax
        # (ln 0.95 + 0.99 > ln 0.9 + 1.0): void.
        [-30.0, 1.0, 0.99],
        # Pixel 2: slot 1 leads, but m̂ over all N is 1 / (1 + 2 e^-0.1) = 0.356 < 0.4:
        # paper void; kept_slots: confidence over kept slots is 1.0: slot 1.
        [0.9, 1.0, 0.9 + np.log(0.9 / 0.95)],
    ]], np.float32)
    kept_slots = _run(ml, cl, [True, False], **NO_AREA)
    paper = _run(ml, cl, [True, False], rule="paper", **NO_AREA)
    thing = 1 * 256 + 2  # class 0 (label 1), instance = slot 1 + 1
    np.testing.assert_array_equal(kept_slots["panoptic"][0], [[0, thing, thing]])
    np.testing.assert_array_equal(paper["panoptic"][0], [[thing, 0, 0]])
    np.testing.assert_array_equal(paper["mask_id"][0], [[2, 0, 2]])
    np.testing.assert_allclose(paper["pixel_confidence"][0, 0, 0], 1 / (1 + np.exp(0.2)),
                               rtol=1e-5)
    np.testing.assert_allclose(paper["pixel_confidence"][0, 0, 2],
                               1 / (1 + np.exp(-0.1) + 0.9 / 0.95 * np.exp(-0.1)),
                               rtol=1e-5)
    np.testing.assert_allclose(paper["segment_scores"][0], [0.0, 0.9, 0.0], rtol=1e-5)


def test_thresholds_themselves_are_kept_by_the_paper_rule():
    """"Below 0.7" and "below 0.4" are void: a slot at exactly the class threshold and a
    pixel at exactly the pixel threshold are kept under rule="paper" (the default rule
    voids a pixel at exactly its threshold)."""
    cl = _class_logits([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    ml = np.array([[[0.3, 0.0]]], np.float32)
    conf = float(_run(ml, cl, [True, False], rule="paper", pixel_threshold=0.0,
                      **NO_AREA)["pixel_confidence"][0, 0, 0])
    p = float(tf.reduce_max(tf.nn.softmax(cl[0, 0])))
    at = _run(ml, cl, [True, False], rule="paper", pixel_threshold=conf, class_threshold=p,
              **NO_AREA)
    assert at["panoptic"][0, 0, 0] == 257
    above = _run(ml, cl, [True, False], rule="paper", pixel_threshold=float(
        np.nextafter(np.float32(conf), np.float32(1))), **NO_AREA)
    assert above["panoptic"][0, 0, 0] == 0
    kept_slots_conf = float(_run(ml, cl, [True, False], pixel_threshold=0.0,
                                 **NO_AREA)["pixel_confidence"][0, 0, 0])
    assert _run(ml, cl, [True, False], pixel_threshold=kept_slots_conf,
                **NO_AREA)["panoptic"][0, 0, 0] == 0


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="rule must be one of"):
        _run(np.zeros((1, 1, 2), np.float32), _class_logits([[0.9, 0.1]] * 2), [True],
             rule="majority")


def test_ties_pick_the_lowest_slot_index():
    cl = _class_logits([[0.9, 0.05, 0.05]] * 3)
    ml = np.zeros((1, 2, 3), np.float32)
    ml[0, 0] = [1.0, 3.0, 3.0]  # tie between slots 1 and 2
    ml[0, 1] = [2.0, 2.0, 2.0]  # three-way tie, confidence 1/3 -> void at 0.4
    for rule in (True, False):
        out = _run(ml, cl, [True, True], weight_masks_by_class_confidence=rule, **NO_AREA)
        np.testing.assert_array_equal(out["mask_id"][0], [[2, 1]])
        np.testing.assert_array_equal(out["panoptic"][0], [[256 + 2, 0]])


def test_area_limits_at_and_below_and_stuff_merging():
    # 1 x 10 image, 4 slots. is_thing = [True, False].
    # slot 0: thing (class 0), 3 px; slot 1: thing (class 0), 2 px;
    # slots 2 and 3: stuff class 1, 3 px + 2 px = 5 px as one segment.
    cl = _class_logits([[0.9, 0.05, 0.05]] * 2 + [[0.05, 0.9, 0.05]] * 2)
    owner = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    ml = np.full((1, 10, 4), -5.0, np.float32)
    ml[0, np.arange(10), owner] = 5.0
    out = _run(ml, cl, [True, False], thing_area_limit=3, stuff_area_limit=5,
               area_limit_reference_size=None)
    np.testing.assert_array_equal(out["panoptic"][0], [[257] * 3 + [0] * 2 + [512] * 5])
    out = _run(ml, cl, [True, False], thing_area_limit=2, stuff_area_limit=6,
               area_limit_reference_size=None)
    np.testing.assert_array_equal(out["panoptic"][0], [[257] * 3 + [258] * 2 + [0] * 5])
    # The dense semantic map ignores area limits and thresholds.
    np.testing.assert_array_equal(out["semantic"][0], [[1] * 5 + [2] * 5])


def test_contiguous_label_encoding_with_void_minus_one():
    # label_offset=0, void_label=-1: the data pipeline's encoding (class * divisor + inst).
    cl = _class_logits([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]])
    ml = np.array([[[9, 0], [0, 9], [0, 0.1]]], np.float32)  # last pixel: conf ~0.52
    out = _run(ml, cl, [False, True], label_offset=0, void_label=-1, pixel_threshold=0.6,
               **NO_AREA)
    # slot 0: thing class 1, instance 1; slot 1: stuff class 0 -> 0, distinct from void.
    np.testing.assert_array_equal(out["panoptic"][0], [[1 * 256 + 1, 0, -1]])
    np.testing.assert_array_equal(out["semantic"][0], [[1, 0, 0]])


def test_area_limits_scale_with_input_area():
    # docs/design.md §5: 4096 / 256 at 1025² are exactly the reference's 1600 / 100 at 641².
    assert scaled_area_limit(4096, (641, 641), 1025) == 1600
    assert scaled_area_limit(256, (641, 641), 1025) == 100
    assert scaled_area_limit(4096, (1025, 1025), 1025) == 4096
    assert scaled_area_limit(100, (65, 65), None) == 100
    # In postprocess: a 2x5 thing segment (10 px) at a 4x5 output survives a limit of 20
    # defined at 10x10 (-> 20·3·4/9² = 3) but not one of 120 (-> 18).
    cl = _class_logits([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    ml = np.full((1, 4, 5, 2), -5.0, np.float32)
    ml[0, :2, :, 0] = 5.0
    ml[0, 2:, :, 1] = 5.0
    kw = {"is_thing": [True, True], "area_limit_reference_size": 10}
    small = postprocess({"mask_logits": ml, "class_logits": cl}, thing_area_limit=20, **kw)
    big = postprocess({"mask_logits": ml, "class_logits": cl}, thing_area_limit=120, **kw)
    assert (small["panoptic"].numpy() > 0).all()
    assert (big["panoptic"].numpy() == 0).all()


def test_no_kept_slot_gives_all_void():
    cl = _class_logits([[0.5, 0.1, 0.4]] * 3)
    ml = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype(np.float32)
    out = postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=[True, False],
                      image_size=(13, 13), **NO_AREA)
    assert (out["panoptic"].numpy() == 0).all()
    assert (out["mask_id"].numpy() == 0).all()
    assert np.isfinite(out["pixel_confidence"].numpy()).all()
    assert (out["semantic"].numpy() == 1).all()  # class 0 everywhere, + label_offset


def test_bad_inputs_raise_clear_errors():
    ml = np.zeros((1, 4, 4, 3), np.float32)
    cl = np.zeros((1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="is_thing"):
        postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=[True])
    with pytest.raises(ValueError, match="label_divisor"):
        postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=[True, True],
                    label_divisor=3)
    with pytest.raises(ValueError, match="void_label=0 is also"):
        postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=[True, True],
                    label_offset=0)
    with pytest.raises(ValueError, match="N=3 slots"):
        postprocess({"mask_logits": ml, "class_logits": np.zeros((1, 4, 3), np.float32)},
                    is_thing=[True, True])
    with pytest.raises(ValueError, match="resize method"):
        postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=[True, True],
                    image_size=(9, 9), resize_method="nearest")


# ---------------------------------------------------- independent slow NumPy implementation


def _np_upsample_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Per output pixel: bilinear sample at y·(h−1)/(H−1), x·(w−1)/(W−1) (float64)."""
    h, w = x.shape[:2]
    out = np.zeros((out_h, out_w) + x.shape[2:], np.float64)
    for oy in range(out_h):
        sy = oy * (h - 1) / (out_h - 1)
        y0 = int(math.floor(sy))
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for ox in range(out_w):
            sx = ox * (w - 1) / (out_w - 1)
            x0 = int(math.floor(sx))
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[oy, ox] = ((1 - fy) * ((1 - fx) * x[y0, x0] + fx * x[y0, x1])
                           + fy * ((1 - fx) * x[y1, x0] + fx * x[y1, x1]))
    return out


def _np_postprocess(mask_logits, class_logits, is_thing, size, paper, thing_limit,
                    stuff_limit, class_thr=0.7, pixel_thr=0.4, divisor=256):
    """Slow per-pixel implementation of docs/design.md §5 + the reference's void rules."""
    logits = _np_upsample_align_corners(mask_logits.astype(np.float64), *size)
    z = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    probs = (z / z.sum(-1, keepdims=True))[:, :-1]
    cls, conf = probs.argmax(-1), probs.max(-1)
    kept = conf >= class_thr
    h, w, n = logits.shape
    slot = np.full((h, w), -1)
    for y in range(h):
        for x in range(w):
            lg = logits[y, x]
            if not kept[int(np.argmax(lg))]:
                continue  # dominated by a discarded slot
            m = np.exp(lg - lg.max())
            m_kept = np.where(kept, m, 0.0) / np.where(kept, m, 0.0).sum()
            score = np.where(kept, m_kept * (conf if paper else 1.0), -1.0)
            i = int(np.argmax(score))
            if m_kept[i] > pixel_thr:
                slot[y, x] = i
    pan = np.zeros((h, w), np.int64)
    for i in range(n):
        region = slot == i
        if region.any() and is_thing[cls[i]] and region.sum() >= thing_limit:
            pan[region] = (cls[i] + 1) * divisor + i + 1
    for c in np.flatnonzero(~np.asarray(is_thing)):
        region = np.isin(slot, np.flatnonzero(kept & (cls == c)))
        if region.any() and region.sum() >= stuff_limit:
            pan[region] = (c + 1) * divisor
    return pan, slot


def _np_postprocess_paper_rule(mask_logits, class_logits, is_thing, size, thing_limit,
                               stuff_limit, class_thr=0.7, pixel_thr=0.4, divisor=256):
    """Slow per-pixel implementation of the paper's literal rule (§3.1 Eqs. 2-3, §4)."""
    logits = _np_upsample_align_corners(mask_logits.astype(np.float64), *size)
    z = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    c_hat, score = probs.argmax(-1), probs.max(-1)  # over all C + 1 classes
    void_class = probs.shape[-1] - 1
    kept = (c_hat != void_class) & (score >= class_thr)
    h, w, n = logits.shape
    slot = np.full((h, w), -1)
    for y in range(h):
        for x in range(w):
            m = np.exp(logits[y, x] - logits[y, x].max())
            m /= m.sum()  # m̂ over all N slots
            i = int(np.argmax(score * m))
            if kept[i] and m[i] >= pixel_thr:
                slot[y, x] = i
    pan = np.zeros((h, w), np.int64)
    for i in range(n):
        region = slot == i
        if region.any() and is_thing[c_hat[i]] and region.sum() >= thing_limit:
            pan[region] = (c_hat[i] + 1) * divisor + i + 1
    for c in np.flatnonzero(~np.asarray(is_thing)):
        region = np.isin(slot, np.flatnonzero(kept & (c_hat == c)))
        if region.any() and region.sum() >= stuff_limit:
            pan[region] = (c + 1) * divisor
    return pan, slot


def test_paper_rule_matches_slow_numpy_implementation():
    rng = np.random.default_rng(8)
    b, h, w, n, c = 2, 5, 6, 7, 4
    is_thing = [True, False, True, False]
    ml = rng.normal(0, 2, (b, h, w, n)).astype(np.float32)
    cl = rng.normal(0, 3, (b, n, c + 1)).astype(np.float32)
    size = (17, 21)
    out = postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=is_thing,
                      image_size=size, thing_area_limit=12, stuff_area_limit=20,
                      area_limit_reference_size=None, rule="paper", class_threshold=0.5,
                      pixel_threshold=0.3)
    compiled = tf.function(lambda m, k: postprocess(
        {"mask_logits": m, "class_logits": k}, is_thing=is_thing, image_size=size,
        thing_area_limit=12, stuff_area_limit=20, area_limit_reference_size=None,
        rule="paper", class_threshold=0.5, pixel_threshold=0.3), jit_compile=True)(ml, cl)
    np.testing.assert_array_equal(compiled["panoptic"].numpy(), out["panoptic"].numpy())
    n_segments = 0
    for i in range(b):
        want, slot = _np_postprocess_paper_rule(ml[i], cl[i], is_thing, size, 12, 20,
                                                class_thr=0.5, pixel_thr=0.3)
        np.testing.assert_array_equal(out["panoptic"][i].numpy(), want)
        n_segments += len(np.unique(want)) - 1
        assert (slot >= 0).mean() > 0.1
    assert n_segments >= 3


@pytest.mark.parametrize("paper", [True, False])
def test_matches_slow_numpy_implementation(paper):
    rng = np.random.default_rng(7)
    b, h, w, n, c = 2, 5, 6, 7, 4
    is_thing = [True, False, True, False]
    ml = rng.normal(0, 3, (b, h, w, n)).astype(np.float32)
    cl = rng.normal(0, 3, (b, n, c + 1)).astype(np.float32)
    size = (17, 21)
    out = postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=is_thing,
                      image_size=size, thing_area_limit=12, stuff_area_limit=20,
                      area_limit_reference_size=None, weight_masks_by_class_confidence=paper)
    pan = out["panoptic"].numpy()
    n_segments = 0
    for i in range(b):
        want, slot = _np_postprocess(ml[i], cl[i], is_thing, size, paper, 12, 20)
        np.testing.assert_array_equal(pan[i], want)
        n_segments += len(np.unique(want)) - 1
        assert (slot >= 0).mean() > 0.2  # the case is not trivially all-void
    assert n_segments >= 3  # and has several surviving segments


# ------------------------------------------------------------- deeplab2 reference fixture


def _reference():
    if not os.path.exists(REFERENCE):
        pytest.skip(f"reference fixture not found: {REFERENCE}")
    return np.load(REFERENCE)


def _reference_postprocess(ref, **kw):
    # deeplab2 COCO: transformer class channel k (k < 133) is dataset label k + 1; things
    # are channels 0..79 (labels 1..80). Its S config: 0.7 / 0.4, thing 100 / stuff 1600 px
    # at the 65x65 crop, argmax over m̂ only ("pixelwise"), align-corners upsampling.
    args = dict(is_thing=np.arange(133) < 80, image_size=(65, 65), thing_area_limit=100,
                stuff_area_limit=1600, area_limit_reference_size=None,
                weight_masks_by_class_confidence=False, label_offset=1, label_divisor=256)
    args.update(kw)
    return postprocess({"mask_logits": ref["pixel_space_mask_logits"],
                        "class_logits": ref["transformer_class_logits"]}, **args)


def test_reproduces_deeplab2_reference_post_processor():
    ref = _reference()
    out = {k: v.numpy() for k, v in _reference_postprocess(ref).items()}
    # Exact on every pixel (the brief's bar is 99.9%).
    np.testing.assert_array_equal(out["panoptic"], ref["panoptic_pred"])
    np.testing.assert_array_equal(out["semantic"], ref["semantic_pred"])
    assert len(np.unique(ref["panoptic_pred"])) == 5  # 4 segments + void: a real check
    # deeplab2's instance_pred / scores are defined on every pixel; ours where the pixel's
    # dominant slot is kept (elsewhere the pixel is void regardless).
    dom = out["mask_id"] > 0
    assert dom.mean() > 0.3
    np.testing.assert_array_equal(out["mask_id"][dom], ref["instance_pred"][dom])
    np.testing.assert_allclose(out["pixel_confidence"][dom], ref["instance_scores"][dom],
                               atol=1e-5)
    np.testing.assert_allclose(out["class_confidence"][dom], ref["semantic_scores"][dom],
                               atol=1e-6)


def test_reference_needs_align_corners_upsampling():
    # The upsampling convention matters: TF2's half-pixel resize disagrees on >10% pixels.
    ref = _reference()
    out = _reference_postprocess(ref, resize_method="half_pixel")
    assert np.mean(out["panoptic"].numpy() == ref["panoptic_pred"]) < 0.9


def test_xla_compiles_and_matches_eager():
    ref = _reference()
    is_thing = np.arange(133) < 80

    @tf.function(jit_compile=True)
    def run(ml, cl):
        return postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=is_thing,
                           image_size=(65, 65))

    ml = np.concatenate([ref["pixel_space_mask_logits"]] * 2)
    cl = np.concatenate([ref["transformer_class_logits"], ref["transformer_class_logits"][
        :, ::-1]])
    xla = run(ml, cl)
    eager = postprocess({"mask_logits": ml, "class_logits": cl}, is_thing=is_thing,
                        image_size=(65, 65))
    for key in ("panoptic", "semantic", "instance", "mask_id"):
        np.testing.assert_array_equal(xla[key].numpy(), eager[key].numpy())
    np.testing.assert_allclose(xla["pixel_confidence"].numpy(),
                               eager["pixel_confidence"].numpy(), atol=1e-5)


# ------------------------------------- dynamic (kept / candidate slots) vs static path



def _smooth_logits(rng, b, h, w, n, scale=6.0):
    coarse = rng.normal(0, scale, (b, 4, 4, n)).astype(np.float32)
    return tf.image.resize(coarse, (h, w), method="bicubic").numpy()


def _assert_same_outputs(dynamic, static):
    for key in ("panoptic", "semantic", "instance", "mask_id", "segment_classes"):
        np.testing.assert_array_equal(dynamic[key].numpy(), static[key].numpy(), err_msg=key)
    for key in ("pixel_confidence", "class_confidence", "segment_scores"):
        np.testing.assert_allclose(dynamic[key].numpy(), static[key].numpy(), rtol=1e-6,
                                   atol=1e-7, err_msg=key)


@pytest.mark.parametrize("paper", [True, False])
@pytest.mark.parametrize("kept", ["random", "none", "all", "uneven"])
@pytest.mark.parametrize("logits", ["smooth", "white"])
def test_dynamic_path_equals_static_path(paper, kept, logits):
    rng = np.random.default_rng([int(paper), len(kept), len(logits)])
    b, h, w, n, c = 2, 9, 11, 24, 5
    is_thing = [True, False, True, False, True]
    ml = (_smooth_logits(rng, b, h, w, n) if logits == "smooth"
          else rng.normal(0, 4, (b, h, w, n)).astype(np.float32))
    cl = rng.normal(0, 3, (b, n, c + 1)).astype(np.float32)
    if kept == "none":
        cl[..., -1] += 50.0  # void wins everywhere: no slot reaches 0.7
    elif kept == "all":
        cl[np.arange(b)[:, None], np.arange(n)[None], rng.integers(0, c, (b, n))] += 50.0
    elif kept == "uneven":  # image 0 keeps every slot, image 1 a single one
        cl[..., -1] += 50.0
        cl[0, np.arange(n), rng.integers(0, c, n)] += 100.0
        cl[1, 3, 2] += 100.0
    outs = {"mask_logits": ml, "class_logits": cl}
    # 9x11 -> 33x41 (stride 4: the cell-bound argmax) and 17x21 (stride 2), 20x23 (no
    # power-of-two stride: dense fallback), and no upsampling.
    for size in [(33, 41), (17, 21), (20, 23), None]:
        kw = dict(is_thing=is_thing, image_size=size, thing_area_limit=6,
                  stuff_area_limit=10, area_limit_reference_size=None,
                  weight_masks_by_class_confidence=paper)
        dynamic = postprocess(outs, dynamic_shapes=True, **kw)
        static = postprocess(outs, dynamic_shapes=False, **kw)
        _assert_same_outputs(dynamic, static)
        if kept == "none":
            assert (dynamic["panoptic"].numpy() == 0).all()
        if kept == "all":
            assert (dynamic["mask_id"].numpy() > 0).all()


def _full_resolution_codes(ml, kept, offset, size, threshold):
    """Straightforward per-pixel codes on all N upsampled channels (NumPy, float64 sums).

    Returns the codes (postprocess module docstring) and the float64 confidence.
    """
    up = upsample_logits(tf.constant(ml), size).numpy()  # float32 [B, H, W, N]
    b, n = ml.shape[0], ml.shape[-1]
    dominant = up.argmax(-1)  # first maximal slot, as tf.argmax
    scored = np.where(kept[:, None, None, :], up + offset[:, None, None, :], -np.inf)
    chosen = scored.argmax(-1)
    v = up.astype(np.float64)
    v_kept = np.where(kept[:, None, None, :], v, -np.inf)
    v_chosen = np.take_along_axis(v, chosen[..., None], -1)
    conf = 1.0 / np.exp(v_kept - v_chosen).sum(-1)
    dominant_kept = np.take_along_axis(kept[:, None, None, :].repeat(size[0], 1)
                                       .repeat(size[1], 2), dominant[..., None], -1)[..., 0]
    e = np.where(dominant_kept, np.where(conf > threshold, 1 + chosen, 1 + n + chosen), 0)
    image = np.arange(b)[:, None, None]
    return (image * n + dominant) * (2 * n + 1) + e, conf


def _near_tie_logits(rng, b, h, w, n):
    """Smooth logits with exact ties, 1-ulp gaps and flat plateaus between slots."""
    ml = _smooth_logits(rng, b, h, w, n, scale=3.0)
    ml[..., 5] = ml[..., 2]  # exact ties everywhere: slot 2 must win over 5
    ml[..., 7] = np.nextafter(ml[..., 3], np.float32(np.inf))  # 7 beats 3 by one ulp
    top = ml.max(-1)
    ml[:, : h // 2, :, 9] = top[:, : h // 2] + 1.0  # plateau: 9 and 11 tie in the top half
    ml[:, : h // 2, :, 11] = top[:, : h // 2] + 1.0
    ml[:, h // 2:, : w // 2, 1] = 4.0  # a constant slot winning a corner block
    return ml


@pytest.mark.parametrize("paper", [True, False])
@pytest.mark.parametrize("logits", ["smooth", "white", "ties", "steep"])
def test_cell_codes_equal_full_resolution_computation(paper, logits):
    # The cells path (exact low-resolution bounds + candidate interpolation) against the
    # straightforward all-slot full-resolution computation, on strides 2, 4 and 8 (the
    # last cell row/column is degenerate), with a pixel threshold that leaves many pixels
    # to the exact per-pixel computation.
    rng = np.random.default_rng([int(paper), len(logits)])
    b, h, w, n = 2, 9, 11, 24
    if logits == "smooth":
        ml = _smooth_logits(rng, b, h, w, n)
    elif logits == "white":
        ml = rng.normal(0, 2, (b, h, w, n)).astype(np.float32)
    elif logits == "steep":  # logits in the hundreds: exp overflows in the bounds
        ml = _smooth_logits(rng, b, h, w, n, scale=150.0)
    else:
        ml = _near_tie_logits(rng, b, h, w, n)
    kept = rng.random((b, n)) < 0.5
    kept[:, [1, 2, 3, 5, 7, 9, 11]] = True
    kept[1, 9] = False  # a discarded slot dominating a region: void there
    conf = rng.uniform(0.7, 1.0, (b, n)).astype(np.float32)
    offset = np.log(conf) if paper else np.zeros_like(conf)
    index, valid = kept_slots(tf.constant(kept))

    def fail():
        raise AssertionError("dense fallback used")

    # deeplab2's rule (zero offsets) through both its shortcut and the general ẑ search.
    for zero_offsets, threshold, stride in itertools.product(
            (False,) if paper else (False, True), (0.4, 0.75), (2, 4, 8)):
        size = ((h - 1) * stride + 1, (w - 1) * stride + 1)
        got = cell_codes(
            tf.constant(ml), tf.constant(kept), index, valid, tf.constant(offset),
            size, (stride, stride), threshold, fail, max_pairs=10**9,
            zero_offsets=zero_offsets).numpy()
        want, conf_px = _full_resolution_codes(ml, kept, offset, size, threshold)
        # Confidences within float32 rounding of the threshold may go either way
        # (summation order); everything else must be identical.
        rounding = np.abs(conf_px - threshold) < 1e-6
        assert rounding.mean() < 1e-3
        np.testing.assert_array_equal(got[~rounding], want[~rounding])
        num_codes = 2 * n + 1
        np.testing.assert_array_equal(got // num_codes, want // num_codes)  # dominant
        e_got, e_want = got % num_codes, want % num_codes
        np.testing.assert_array_equal((e_got - 1) % n, (e_want - 1) % n)  # ẑ
        # The case is not degenerate: void, confident and (except with logits so steep
        # that every boundary is sharp) unconfident pixels all occur.
        assert (e_want == 0).any() and ((e_want > 0) & (e_want <= n)).any()
        assert logits == "steep" or (e_want > n).any()
    if logits == "ties":
        dominant = want // (2 * n + 1) % n
        assert (dominant == 2).any() and not (dominant == 5).any()
        # 7 exceeds 3 by one ulp at the grid points; interpolation may round them equal.
        assert (dominant[:, ::stride, ::stride] == 7).any()
        assert not (dominant[:, ::stride, ::stride] == 3).any()
        plateau = dominant[:, : (h // 2 - 1) * stride + 1]  # rows inside the plateau
        assert (plateau == 9).all()


@pytest.mark.parametrize("paper", [True, False])
def test_single_image_equals_its_row_of_a_batch(paper):
    # A batch of one takes its own (2-D matmul) route to the kept-slot logits, chosen when
    # tracing or, for a batch size unknown until run time, in the graph: same codes and
    # outputs as the same image inside a batch.
    rng = np.random.default_rng(int(paper))
    b, h, w, n, c = 2, 9, 11, 24, 5
    ml = _smooth_logits(rng, b, h, w, n)
    cl = rng.normal(0, 3, (b, n, c + 1)).astype(np.float32)
    kept = rng.random((b, n)) < 0.5
    offset = (np.log(rng.uniform(0.7, 1.0, (b, n))) if paper else np.zeros((b, n))
              ).astype(np.float32)
    index, valid = kept_slots(tf.constant(kept))
    one_index, one_valid = kept_slots(tf.constant(kept[:1]))
    low, off = kept_logits(tf.constant(ml), index, valid, tf.constant(offset))
    one_low, one_off = kept_logits(tf.constant(ml[:1]), one_index, one_valid,
                                   tf.constant(offset[:1]))
    k = int(kept[0].sum())
    np.testing.assert_array_equal(one_low.numpy()[..., :k], low.numpy()[:1, ..., :k])
    np.testing.assert_array_equal(one_low.numpy()[..., :k],
                                  ml[:1][..., np.flatnonzero(kept[0])])
    np.testing.assert_array_equal(one_off.numpy()[:, :k], off.numpy()[:1, :k])
    kw = dict(is_thing=[True, False, True, False, True], image_size=(33, 41),
              thing_area_limit=6, stuff_area_limit=10, area_limit_reference_size=None,
              weight_masks_by_class_confidence=paper)
    batch = postprocess({"mask_logits": ml, "class_logits": cl}, **kw)
    single = postprocess({"mask_logits": ml[:1], "class_logits": cl[:1]}, **kw)
    # A batch size unknown until run time (the SavedModel's signatures) decides in the graph.
    traced = tf.function(
        lambda m, c_: postprocess({"mask_logits": m, "class_logits": c_}, **kw),
        input_signature=[tf.TensorSpec([None, h, w, n]), tf.TensorSpec([None, n, c + 1])])
    for got in (single, traced(ml[:1], cl[:1])):
        for key in ("panoptic", "semantic", "instance", "mask_id"):
            np.testing.assert_array_equal(got[key].numpy(), batch[key].numpy()[:1],
                                          err_msg=key)
    np.testing.assert_array_equal(traced(ml, cl)["panoptic"].numpy(), batch["panoptic"].numpy())


@pytest.mark.parametrize("paper", [True, False])
def test_confidence_bound_where_a_discarded_slot_towers_over_the_kept_ones(paper):
    # One stride-4 cell. Slot 1 (discarded) is +200 at the top-right corner and -200
    # elsewhere; kept slot 0 is 0 and kept slots 2-6 are -0.5 everywhere, so where slot 0
    # dominates its confidence is 1 / (1 + 5 e^-0.5) = 0.25: void at threshold 0.4. At the
    # top-right corner every kept logit is 200 below the maximum: the kept-slot
    # log-sum-exp there must not underflow to -inf, which would make the interpolated
    # confidence bound small enough to call those pixels confident. (Slots 7-63, discarded
    # and far below, only keep the candidate pairs under the cells path's dense-fallback
    # limit of N/8 per cell.)
    n = 64
    ml = np.full((1, 2, 2, n), -1000.0, np.float32)
    ml[..., 0] = 0.0
    ml[..., 2:7] = -0.5
    ml[..., 1] = -200.0
    ml[0, 0, 1, 1] = 200.0
    cl = np.zeros((1, n, 3), np.float32)
    cl[0, :7, 0] = 10.0  # slots 0-6: class 0 with confidence ~1 ...
    cl[0, 1, 0] = -10.0  # ... except slot 1: void wins, discarded
    cl[0, 7:, 2] = 10.0
    kw = dict(is_thing=[True, False], image_size=(5, 5), thing_area_limit=0,
              stuff_area_limit=0, area_limit_reference_size=None,
              weight_masks_by_class_confidence=paper, pixel_threshold=0.4)
    dynamic = postprocess({"mask_logits": ml, "class_logits": cl}, dynamic_shapes=True, **kw)
    static = postprocess({"mask_logits": ml, "class_logits": cl}, dynamic_shapes=False, **kw)
    _assert_same_outputs(dynamic, static)
    mask_id = dynamic["mask_id"].numpy()[0]
    assert (mask_id == 1).sum() > 10 and (mask_id == 0).any()  # slot 0 and slot 1 regions
    assert (dynamic["panoptic"].numpy() == 0).all()  # 0.25 < 0.4 wherever slot 0 wins


def test_cell_codes_fall_back_to_dense_above_the_pair_limit():
    rng = np.random.default_rng(11)
    ml = rng.normal(0, 2, (1, 5, 5, 8)).astype(np.float32)
    kept = np.ones((1, 8), bool)
    index, valid = kept_slots(tf.constant(kept))
    sentinel = tf.fill([1, 17, 17], -7)
    got = cell_codes(tf.constant(ml), tf.constant(kept), index, valid, tf.zeros([1, 8]),
                     (17, 17), (4, 4), 0.4, lambda: sentinel, max_pairs=0)
    assert (got.numpy() == -7).all()


def test_postprocess_in_a_v1_graph_session():
    # Graph-mode tensors outside tf.function compare by identity with `==`; the
    # implementation must use tf.equal (the SavedModel and tf.function paths are TF2).
    rng = np.random.default_rng(2)
    ml = _smooth_logits(rng, 1, 9, 9, 16)
    cl = rng.normal(0, 3, (1, 16, 4)).astype(np.float32)
    kw = dict(is_thing=[True, False, True], image_size=(33, 33), **NO_AREA)
    want = postprocess({"mask_logits": ml, "class_logits": cl}, dynamic_shapes=False, **kw)
    graph = tf.Graph()
    with graph.as_default():
        out = postprocess({"mask_logits": tf.constant(ml), "class_logits": tf.constant(cl)},
                          dynamic_shapes=True, **kw)
        with tf.compat.v1.Session(graph=graph) as session:
            got = session.run(out)
    for key in ("panoptic", "semantic", "instance", "mask_id"):
        np.testing.assert_array_equal(got[key], want[key].numpy(), err_msg=key)


def test_dynamic_is_default_outside_xla_and_static_inside():
    rng = np.random.default_rng(5)
    outs = {"mask_logits": _smooth_logits(rng, 1, 9, 9, 16),
            "class_logits": rng.normal(0, 3, (1, 16, 4)).astype(np.float32)}
    kw = dict(is_thing=[True, False, True], image_size=(33, 33), **NO_AREA)
    xla = tf.function(lambda o: postprocess(o, **kw), jit_compile=True)(outs)
    graph = tf.function(lambda o: postprocess(o, **kw))(outs)
    _assert_same_outputs(graph, xla)
    _assert_same_outputs(postprocess(outs, **kw), xla)
