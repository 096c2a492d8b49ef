"""Tests of max_deeplab.losses (paper §3.2 PQ-style loss, §4 auxiliary losses).

Expected values come from `_reference_losses`, a plain-numpy implementation written with
explicit per-pixel / per-segment loops and brute-force matching over all injective
assignments (independent of the Hungarian solver and of the vectorised TF code).
"""

from __future__ import annotations

import itertools
import math

import gin
import numpy as np
import pytest
import tensorflow as tf
from shared_strategies import mirrored_two_cpus

from max_deeplab.losses import (
    LOSS_NAMES,
    MaXDeepLabLoss,
    align_corners_indices,
    instance_discrimination_loss,
    mask_id_cross_entropy,
    pq_similarity,
    pq_style_loss,
    resize_labels_nearest,
    semantic_cross_entropy,
    soft_dice,
)

ALL_TERMS = LOSS_NAMES + ("total",)


# ----------------------------------------------------------------------------- reference


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _grid(in_size: int, out_size: int) -> list[int]:
    if out_size == 1:
        return [0]
    return [int(math.floor(i * (in_size - 1) / (out_size - 1) + 0.5)) for i in range(out_size)]


def _reference_losses(
    outputs: dict,
    targets: dict,
    alpha: float = 0.75,
    tau: float = 0.3,
    weights: tuple = (3.0, 1.0, 0.3, 1.0),
    similarity: str = "pq",
    global_batch_size: int | None = None,
) -> tuple[dict, list]:
    """Loop implementation of docs/design.md §4; returns (weighted losses, matchings)."""
    mask_logits = np.asarray(outputs["mask_logits"], np.float64)
    class_logits = np.asarray(outputs["class_logits"], np.float64)
    feature = np.asarray(outputs["pixel_feature"], np.float64)
    sem_logits = np.asarray(outputs["semantic_logits"], np.float64)
    seg_full = np.asarray(targets["segment_ids"])
    sem_full = np.asarray(targets["semantic"])
    classes = np.asarray(targets["segment_classes"])
    valid = np.asarray(targets["segment_valid"])
    thing = np.asarray(targets["segment_is_thing"])
    batch, h, w, n = mask_logits.shape
    num_classes = class_logits.shape[-1] - 1
    k_max = classes.shape[1]
    rows, cols = _grid(seg_full.shape[1], h), _grid(seg_full.shape[2], w)
    totals = dict.fromkeys(LOSS_NAMES[1:], 0.0)
    matchings = []
    for b in range(batch):
        seg = np.full((h, w), -1)
        sem = np.full((h, w), -1)
        for y in range(h):
            for x in range(w):
                seg[y, x] = seg_full[b, rows[y], cols[x]]
                sem[y, x] = sem_full[b, rows[y], cols[x]]
                if seg[y, x] >= 0 and not valid[b, seg[y, x]]:
                    seg[y, x] = -1
        pixels = [(y, x) for y in range(h) for x in range(w)]
        segments = [k for k in range(k_max) if valid[b, k] and (seg == k).any()]
        probs = {p: _softmax(mask_logits[b][p]) for p in pixels}
        cls = [_softmax(class_logits[b, j]) for j in range(n)]
        labelled = [p for p in pixels if seg[p] >= 0]
        dice = {}
        for i in segments:
            area = sum(1 for p in pixels if seg[p] == i)
            for j in range(n):
                inter = sum(probs[p][j] for p in pixels if seg[p] == i)
                pred = sum(probs[p][j] for p in labelled)
                dice[i, j] = 2 * inter / (area + pred)

        sim = {}
        for (i, j), d in dice.items():
            p = cls[j][classes[b, i]]
            sim[i, j] = p * d if similarity == "pq" else p + d

        best, best_score = (), -np.inf
        for perm in itertools.permutations(range(n), len(segments)):
            score = sum(sim[i, j] for i, j in zip(segments, perm, strict=True))
            if score > best_score:
                best, best_score = perm, score
        sigma = dict(zip(segments, best, strict=True))
        matchings.append(sigma)
        pos = 0.0
        for i, j in sigma.items():
            p, d = cls[j][classes[b, i]], dice[i, j]
            pos += (p * -d + d * -np.log(p)) if similarity == "pq" else (-d - np.log(p))
        neg = sum(-np.log(cls[j][num_classes]) for j in range(n) if j not in best)
        totals["pq_positive"] += weights[0] * alpha * pos / n
        totals["pq_negative"] += weights[0] * (1 - alpha) * neg / n

        # Embeddings of every segment (things and stuff); the loss at thing pixels.
        things = [i for i in segments if thing[b, i]]
        emb = {}
        for i in segments:
            mean = np.mean([feature[b][p] for p in pixels if seg[p] == i], axis=0)
            emb[i] = mean / np.linalg.norm(mean)
        inst, count = 0.0, 0
        for p in pixels:
            if seg[p] in things:
                logits = {i: emb[i] @ feature[b][p] / tau for i in segments}
                denom = sum(np.exp(v) for v in logits.values())
                inst += -np.log(np.exp(logits[seg[p]]) / denom)
                count += 1
        totals["instance_discrimination"] += weights[1] * (inst / count if count else 0.0)

        mask_id = [-np.log(probs[p][sigma[seg[p]]]) for p in labelled]
        totals["mask_id"] += weights[2] * (np.mean(mask_id) if mask_id else 0.0)
        sem_terms = [-np.log(_softmax(sem_logits[b][p])[sem[p]]) for p in pixels if sem[p] >= 0]
        totals["semantic"] += weights[3] * (np.mean(sem_terms) if sem_terms else 0.0)

    denominator = global_batch_size or batch
    out = {k: v / denominator for k, v in totals.items()}
    out["pq"] = out["pq_positive"] + out["pq_negative"]
    out["total"] = out["pq"] + out["instance_discrimination"] + out["mask_id"] + out["semantic"]
    return out, matchings


# ----------------------------------------------------------------------------- examples


def _example(seed: int = 0, full: int = 9, out: int = 3, n: int = 4, dim: int = 4):
    """Two images, C = 2 classes, K_max = 3, with void pixels, padding and a stuff segment.

    Image 0: thing 0 (class 1), stuff 1 (class 0), thing 2 (class 1) that lies only on
    full-resolution pixels the stride-4 grid skips (so it is absent at the output stride).
    Image 1: two things (classes 0 and 1), one padded segment slot.
    """
    rng = np.random.default_rng(seed)
    rows, cols = _grid(full, out), _grid(full, out)
    seg = np.full((2, full, full), -1, np.int32)
    sem = np.full((2, full, full), -1, np.int32)
    if out == 3:
        coarse0 = np.array([[0, 0, 1], [0, -1, 1], [1, 1, 1]])
        coarse1 = np.array([[-1, 0, 0], [-1, 0, 1], [1, 1, -1]])
    else:
        coarse0 = rng.integers(-1, 2, size=(out, out))
        coarse1 = rng.integers(-1, 2, size=(out, out))
        coarse0[0, :2] = [0, 1]
        coarse1[0, :2] = [0, 1]
    for y, r in enumerate(rows):
        for x, c in enumerate(cols):
            seg[0, r, c] = coarse0[y, x]
            seg[1, r, c] = coarse1[y, x]
    seg[0, 1, 1] = 2  # not on the grid: segment 2 vanishes at the output stride
    classes = np.array([[1, 0, 1], [0, 1, -1]], np.int32)
    valid = np.array([[True, True, True], [True, True, False]])
    is_thing = np.array([[True, False, True], [True, True, False]])
    for b in range(2):
        lab = seg[b] >= 0
        sem[b][lab] = classes[b][seg[b][lab]]
    seg[0, rows[1], cols[1]] = -1
    sem[0, rows[1], cols[1]] = 1  # a crowd-like pixel: no segment but a semantic label
    feature = rng.normal(size=(2, out, out, dim))
    feature /= np.linalg.norm(feature, axis=-1, keepdims=True)
    outputs = {
        "mask_logits": rng.normal(size=(2, out, out, n)).astype(np.float32) * 2,
        "class_logits": rng.normal(size=(2, n, 3)).astype(np.float32) * 2,
        "pixel_feature": feature.astype(np.float32),
        "semantic_logits": rng.normal(size=(2, out, out, 2)).astype(np.float32),
    }
    targets = {
        "segment_ids": seg,
        "segment_classes": classes,
        "segment_valid": valid,
        "segment_is_thing": is_thing,
        "semantic": sem,
    }
    return outputs, targets


def _tf(d: dict) -> dict:
    return {k: tf.constant(v) for k, v in d.items()}


def _numpy(losses: dict) -> dict:
    return {k: float(v.numpy()) for k, v in losses.items()}


def _assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6):
    assert set(actual) == set(ALL_TERMS)
    for name in ALL_TERMS:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- label grid


def test_align_corners_grid():
    np.testing.assert_array_equal(align_corners_indices(9, 3), [0, 4, 8])
    np.testing.assert_array_equal(align_corners_indices(641, 161), np.arange(0, 641, 4))
    np.testing.assert_array_equal(align_corners_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(align_corners_indices(4, 3), [0, 2, 3])  # 1.5 rounds up
    np.testing.assert_array_equal(align_corners_indices(5, 1), [0])
    labels = np.arange(2 * 10 * 7, dtype=np.int32).reshape(2, 10, 7)
    got = resize_labels_nearest(tf.constant(labels), 4, 3).numpy()
    np.testing.assert_array_equal(got, labels[:, [0, 3, 6, 9]][:, :, [0, 3, 6]])


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_terms_match_loop_reference(seed):
    outputs, targets = _example(seed)
    expected, matchings = _reference_losses(outputs, targets)
    got = _numpy(MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets)))
    _assert_close(got, expected)
    # Segment 2 of image 0 is absent at the output stride: only 2 + 2 segments matched.
    assert [len(m) for m in matchings] == [2, 2]


def test_general_grid_and_rq_sq_variant():
    outputs, targets = _example(3, full=11, out=4, n=4)  # rows round(i * 10 / 3)
    outputs["class_logits"] = outputs["class_logits"][:, :4]
    loss = MaXDeepLabLoss(matching_backend="scipy", similarity="rq_sq")
    expected, _ = _reference_losses(outputs, targets, similarity="rq_sq")
    _assert_close(_numpy(loss(_tf(outputs), _tf(targets))), expected)


def test_custom_weights_alpha_tau_and_global_batch():
    outputs, targets = _example(4)
    loss = MaXDeepLabLoss(
        pq_weight=2.0,
        pq_alpha=0.6,
        instance_discrimination_weight=0.5,
        instance_discrimination_temperature=0.7,
        mask_id_weight=0.2,
        semantic_weight=0.4,
        matching_backend="scipy",
    )
    expected, _ = _reference_losses(
        outputs, targets, alpha=0.6, tau=0.7, weights=(2.0, 0.5, 0.2, 0.4), global_batch_size=5
    )
    _assert_close(_numpy(loss(_tf(outputs), _tf(targets), global_batch_size=5)), expected)


def test_replica_losses_sum_to_global_mean():
    outputs, targets = _example(5)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    full = _numpy(loss(_tf(outputs), _tf(targets)))
    halves = [
        _numpy(
            loss(
                _tf({k: v[b : b + 1] for k, v in outputs.items()}),
                _tf({k: v[b : b + 1] for k, v in targets.items()}),
                global_batch_size=2,
            )
        )
        for b in range(2)
    ]
    for name in ALL_TERMS:
        np.testing.assert_allclose(halves[0][name] + halves[1][name], full[name], rtol=1e-5)


def test_term_functions_by_hand():
    # 1 image, 1x2 output, N = 2: pixel 0 belongs to segment 0, pixel 1 is void.
    mask_probs = np.array([[[[0.75, 0.25], [0.5, 0.5]]]], np.float32)
    gt = np.array([[[[1.0], [0.0]]]], np.float32)
    labelled = np.array([[[1.0, 0.0]]], np.float32)
    dice = soft_dice(tf.constant(gt), tf.constant(mask_probs), tf.constant(labelled)).numpy()
    np.testing.assert_allclose(dice, [[[2 * 0.75 / 1.75, 2 * 0.25 / 1.25]]], rtol=1e-6)
    prob = np.array([[[0.5, 0.2]]], np.float32)
    sim = pq_similarity(tf.constant(dice), tf.constant(prob)).numpy()
    np.testing.assert_allclose(sim, prob * dice, rtol=1e-6)
    np.testing.assert_allclose(
        pq_similarity(tf.constant(dice), tf.constant(prob), "rq_sq").numpy(), prob + dice
    )
    void_log_prob = np.log(np.array([[0.1, 0.4]], np.float32))
    pos, neg = pq_style_loss(
        tf.constant(dice),
        tf.constant(np.log(prob)),
        tf.constant(void_log_prob),
        tf.constant([[0]]),
        alpha=0.75,
    )
    d0 = dice[0, 0, 0]
    np.testing.assert_allclose(pos.numpy(), [0.75 * (0.5 * -d0 + d0 * -np.log(0.5)) / 2], 1e-6)
    np.testing.assert_allclose(neg.numpy(), [0.25 * -np.log(0.4) / 2], rtol=1e-6)

    # Mask-ID: pixel 0 -> segment 0 -> slot 1; pixel 1 unlabelled.
    logits = np.log(mask_probs)
    got = mask_id_cross_entropy(tf.constant(logits), tf.constant([[[0, -1]]]), tf.constant([[1]]))
    np.testing.assert_allclose(got.numpy(), [-np.log(0.25)], rtol=1e-6)
    got = semantic_cross_entropy(tf.constant(logits), tf.constant([[[-1, 1]]]))
    np.testing.assert_allclose(got.numpy(), [-np.log(0.5)], rtol=1e-6)

    # Instance discrimination: two things, features e0, e1, (e0 + e1)/√2 on 3 pixels.
    s = 1 / np.sqrt(2)
    g = np.array([[[[1, 0], [0, 1], [s, s]]]], np.float32)
    masks = np.array([[[[1, 0], [1, 0], [0, 1]]]], np.float32)  # [1, 1, 3, 2]
    t0 = np.array([s, s])  # normalised mean of e0 and e1
    t1 = np.array([s, s])
    tau = 0.5
    expected = []
    for pixel, own in ((0, 0), (1, 0), (2, 1)):
        logit = np.array([t0 @ g[0, 0, pixel], t1 @ g[0, 0, pixel]]) / tau
        expected.append(-np.log(np.exp(logit[own]) / np.exp(logit).sum()))
    both = tf.constant([[True, True]])
    got = instance_discrimination_loss(
        tf.constant(g), tf.constant(masks), both, both, temperature=tau
    )
    np.testing.assert_allclose(got.numpy(), [np.mean(expected)], rtol=1e-6)
    assert abs(np.mean(expected) - np.log(2)) < 1e-6  # identical embeddings: chance level


def test_instance_discrimination_counts_thing_pixels_against_every_mask():
    """Paper Eq. 12: K embeddings for all K masks (stuff too), loss at thing pixels only.

    One thing (pixels 0, 1) and one stuff mask (pixels 2, 3), pixel 4 unlabelled; the stuff
    embedding is a negative for the thing pixels, and the stuff pixels carry no loss.
    """
    rng = np.random.default_rng(3)
    g = rng.normal(size=(1, 1, 5, 4)).astype(np.float32)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    masks = np.zeros((1, 1, 5, 3), np.float32)
    masks[0, 0, [0, 1], 0] = 1.0  # thing
    masks[0, 0, [2, 3], 1] = 1.0  # stuff; mask 2 is absent (padding)
    tau = 0.3
    t = []
    for k in range(2):
        mean = g[0, 0][masks[0, 0, :, k] > 0].mean(0)
        t.append(mean / np.linalg.norm(mean))
    expected = []
    for pixel in (0, 1):
        logit = np.array([t[0] @ g[0, 0, pixel], t[1] @ g[0, 0, pixel]]) / tau
        expected.append(-(logit[0] - np.log(np.exp(logit).sum())))
    got = instance_discrimination_loss(
        tf.constant(g), tf.constant(masks), tf.constant([[True, True, False]]),
        tf.constant([[True, False, False]]), temperature=tau,
    )
    np.testing.assert_allclose(got.numpy(), [np.mean(expected)], rtol=1e-5)
    assert got.numpy()[0] > 1e-3  # a single thing still has a negative: the stuff mask


# ----------------------------------------------------------------------------- properties


def test_slot_permutation_invariance():
    outputs, targets = _example(6)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    base = _numpy(loss(_tf(outputs), _tf(targets)))
    perm = np.array([2, 0, 3, 1])
    permuted = dict(outputs)
    permuted["mask_logits"] = outputs["mask_logits"][..., perm]
    permuted["class_logits"] = outputs["class_logits"][:, perm]
    got = _numpy(loss(_tf(permuted), _tf(targets)))
    for name in ALL_TERMS:
        np.testing.assert_allclose(got[name], base[name], rtol=1e-5, err_msg=name)


def _perfect_outputs(outputs: dict, targets: dict, matchings: list) -> dict:
    """Confident correct masks/classes/features for the example's segments."""
    seg = targets["segment_ids"][:, ::4, ::4]
    sem = targets["semantic"][:, ::4, ::4]
    batch, h, w, n = outputs["mask_logits"].shape
    perfect = {k: np.zeros_like(v) for k, v in outputs.items()}
    perfect["class_logits"][..., -1] = 20.0  # unused slots predict void
    for b in range(batch):
        for i, j in matchings[b].items():
            perfect["class_logits"][b, j] = 0.0
            perfect["class_logits"][b, j, targets["segment_classes"][b, i]] = 20.0
        for y in range(h):
            for x in range(w):
                i = seg[b, y, x]
                if i in matchings[b]:
                    perfect["mask_logits"][b, y, x, matchings[b][i]] = 20.0
                    perfect["pixel_feature"][b, y, x, i] = 1.0
                if sem[b, y, x] >= 0:
                    perfect["semantic_logits"][b, y, x, sem[b, y, x]] = 20.0
    return perfect


def test_perfect_prediction_scores_lower_than_random():
    outputs, targets = _example(7)
    _, matchings = _reference_losses(outputs, targets)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    random = _numpy(loss(_tf(outputs), _tf(targets)))
    perfect = _numpy(loss(_tf(_perfect_outputs(outputs, targets, matchings)), _tf(targets)))
    for name in ALL_TERMS:
        assert perfect[name] < random[name], name
    # The PQ-style optimum: every matched Dice = 1 and p = 1 gives -α·w·K/N per image.
    expected_pq = -3.0 * 0.75 * (2 + 2) / 4 / 2
    np.testing.assert_allclose(perfect["pq"], expected_pq, atol=1e-4)
    assert perfect["mask_id"] < 1e-4 and perfect["semantic"] < 1e-4


def test_stop_gradient_weights_carry_no_gradient():
    outputs, targets = _example(8)
    _, matchings = _reference_losses(outputs, targets)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    mask_logits = tf.constant(outputs["mask_logits"])
    class_logits = tf.constant(outputs["class_logits"])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mask_logits, class_logits])
        got = loss(
            {**_tf(outputs), "mask_logits": mask_logits, "class_logits": class_logits}, _tf(targets)
        )["pq_positive"]
        # Same positive loss written out with numpy constants for the weights.
        probs = tf.nn.softmax(mask_logits)
        log_p = tf.nn.log_softmax(class_logits)
        seg = targets["segment_ids"][:, ::4, ::4]
        dice_term, class_term = 0.0, 0.0
        for b, sigma in enumerate(matchings):
            labelled = tf.constant((seg[b] >= 0).astype(np.float32))
            for i, j in sigma.items():
                m = tf.constant((seg[b] == i).astype(np.float32))
                dice = (
                    2
                    * tf.reduce_sum(m * probs[b, ..., j])
                    / (tf.reduce_sum(m) + tf.reduce_sum(labelled * probs[b, ..., j]))
                )
                c = targets["segment_classes"][b, i]
                p_const = float(np.exp(log_p[b, j, c].numpy()))
                dice_const = float(dice.numpy())
                dice_term += p_const * -dice
                class_term += dice_const * -log_p[b, j, c]
        scale = 3.0 * 0.75 / 4 / 2
        dice_term *= scale
        class_term *= scale
    np.testing.assert_allclose(got.numpy(), (dice_term + class_term).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(got, class_logits).numpy(),
        tape.gradient(class_term, class_logits).numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        tape.gradient(got, mask_logits).numpy(),
        tape.gradient(dice_term, mask_logits).numpy(),
        rtol=1e-5,
        atol=1e-7,
    )


def test_void_pixels_do_not_matter():
    outputs, targets = _example(9)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    base = _numpy(loss(_tf(outputs), _tf(targets)))
    seg = targets["segment_ids"][:, ::4, ::4]
    sem = targets["semantic"][:, ::4, ::4]
    void = (seg < 0) & (sem < 0)
    assert void.any()
    changed = dict(outputs)
    rng = np.random.default_rng(1)
    for key in ("mask_logits", "pixel_feature", "semantic_logits"):
        noise = rng.normal(size=outputs[key].shape).astype(np.float32) * 5
        changed[key] = np.where(void[..., None], outputs[key] + noise, outputs[key])
    # Pixel (1, 1) of image 0 has a semantic label but no segment: only the semantic
    # term may see it.
    crowd = (seg < 0) & (sem >= 0)
    noise = rng.normal(size=outputs["mask_logits"].shape).astype(np.float32) * 5
    changed["mask_logits"] = np.where(
        crowd[..., None], changed["mask_logits"] + noise, changed["mask_logits"]
    )
    got = _numpy(loss(_tf(changed), _tf(targets)))
    for name in ALL_TERMS:
        np.testing.assert_allclose(got[name], base[name], rtol=1e-6, err_msg=name)


def test_image_without_segments_is_finite():
    outputs, targets = _example(10)
    targets["segment_valid"][1] = False
    targets["segment_ids"][1] = -1
    targets["semantic"][1] = -1
    targets["segment_valid"][0, 0] = False  # its pixels now count as void
    variables = {k: tf.Variable(v) for k, v in outputs.items()}
    loss = MaXDeepLabLoss(matching_backend="scipy")
    with tf.GradientTape() as tape:
        got = loss(dict(variables), _tf(targets))
    for name, value in got.items():
        assert np.isfinite(value.numpy()), name
    grads = tape.gradient(got["total"], list(variables.values()))
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy()))
    expected, _ = _reference_losses(outputs, targets)
    _assert_close(_numpy(got), expected)


def test_all_images_empty_is_finite():
    outputs, targets = _example(11)
    targets["segment_valid"][:] = False
    targets["segment_ids"][:] = -1
    targets["semantic"][:] = -1
    variables = {k: tf.Variable(v) for k, v in outputs.items()}
    with tf.GradientTape() as tape:
        got = MaXDeepLabLoss(matching_backend="scipy")(dict(variables), _tf(targets))
    grads = tape.gradient(got["total"], list(variables.values()))
    assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)
    void_log_prob = tf.nn.log_softmax(outputs["class_logits"])[..., -1].numpy()
    np.testing.assert_allclose(
        got["pq_negative"].numpy(), 3.0 * 0.25 * -void_log_prob.sum() / 4 / 2, rtol=1e-5
    )
    for name in ("pq_positive", "instance_discrimination", "mask_id", "semantic"):
        assert got[name].numpy() == 0.0


def test_switches_turn_terms_off():
    outputs, targets = _example(12)
    base = _numpy(MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets)))
    loss = MaXDeepLabLoss(
        matching_backend="scipy",
        use_instance_discrimination=False,
        use_mask_id=False,
        use_semantic=False,
    )
    reduced = {k: v for k, v in outputs.items() if k in ("mask_logits", "class_logits")}
    got = _numpy(loss(_tf(reduced), _tf(targets)))
    for name in ("instance_discrimination", "mask_id", "semantic"):
        assert got[name] == 0.0
    np.testing.assert_allclose(got["pq"], base["pq"], rtol=1e-6)
    np.testing.assert_allclose(got["total"], base["pq"], rtol=1e-6)


def test_gin_configures_the_loss():
    try:
        gin.parse_config(
            "MaXDeepLabLoss.pq_alpha = 0.5\nMaXDeepLabLoss.similarity = 'rq_sq'\n"
            "MaXDeepLabLoss.use_mask_id = False"
        )
        loss = MaXDeepLabLoss()
    finally:
        gin.clear_config()
    assert (loss.pq_alpha, loss.similarity, loss.use_mask_id) == (0.5, "rq_sq", False)
    default = MaXDeepLabLoss()
    assert (default.pq_weight, default.pq_alpha, default.instance_discrimination_temperature) == (
        3.0,
        0.75,
        0.3,
    )
    assert (default.mask_id_weight, default.semantic_weight) == (0.3, 1.0)


# ----------------------------------------------------------------------------- errors


def test_more_segments_than_slots_is_a_clear_error():
    outputs, targets = _example(13, n=2)
    with pytest.raises(ValueError, match=r"K_max = 3 .* N = 2"):
        MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets))


def test_bad_arguments():
    with pytest.raises(ValueError, match="similarity"):
        MaXDeepLabLoss(similarity="iou")
    with pytest.raises(ValueError, match="matching_backend"):
        MaXDeepLabLoss(matching_backend="cuda")
    outputs, targets = _example(14)
    del outputs["pixel_feature"]
    with pytest.raises(KeyError, match="pixel_feature"):
        MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets))


# ----------------------------------------------------------------------------- compiled


def test_tf_function_with_scipy_backend_matches_eager():
    outputs, targets = _example(15)
    loss = MaXDeepLabLoss(matching_backend="scipy")
    eager = _numpy(loss(_tf(outputs), _tf(targets)))
    graph = _numpy(tf.function(loss)(_tf(outputs), _tf(targets)))
    _assert_close(graph, eager)


def test_jit_compile_with_tf_backend_matches_eager():
    outputs, targets = _example(16)
    eager = _numpy(MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets)))
    loss = MaXDeepLabLoss(matching_backend="tf")
    variables = {k: tf.Variable(v) for k, v in outputs.items()}

    @tf.function(jit_compile=True)
    def step(targets):
        with tf.GradientTape() as tape:
            losses = loss(dict(variables), targets)
        grads = tape.gradient(losses["total"], list(variables.values()))
        return losses, grads

    compiled, grads = step(_tf(targets))
    _assert_close(_numpy(compiled), eager, rtol=1e-4, atol=1e-5)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_mirrored_strategy_replica_sum_is_global_mean():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the 2 logical CPUs configured by conftest")
    strategy = mirrored_two_cpus()
    outputs, targets = _example(18)
    expected = _numpy(MaXDeepLabLoss(matching_backend="scipy")(_tf(outputs), _tf(targets)))
    with strategy.scope():
        loss = MaXDeepLabLoss()  # "auto" resolves to scipy off TPU

    @tf.function
    def distributed():
        def fn():
            ctx = tf.distribute.get_replica_context()
            b = ctx.replica_id_in_sync_group
            take = lambda d: {k: tf.gather(tf.constant(v), [b]) for k, v in d.items()}
            return loss(take(outputs), take(targets), global_batch_size=2)

        per = strategy.run(fn)
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per.items()
        }

    got = _numpy(distributed())
    _assert_close(got, expected, rtol=1e-5, atol=1e-6)
