"""The tf.data input pipeline: targets contract (docs/design.md §4), augmentation, K_max,
sharding."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from max_deeplab.data import build_dataset, convert, load_metadata, panoptic_to_targets
from max_deeplab.data.pipeline import flip_left_right, preprocess_eval, preprocess_train
from max_deeplab.data.synthetic import write_dataset

DIV = 256
IS_THING = [True, True, False, False]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(root, 7, seed=11, height=40, width=56, num_val_images=0)
    prefix = os.path.join(root, "records", "train")
    convert(os.path.join(root, "annotations", "panoptic_train.json"), os.path.join(root, "train"),
            os.path.join(root, "panoptic_train"), prefix, num_shards=3, num_workers=1,
            log=lambda _: None)
    return prefix + "-*.tfrecord"


def _slow_targets(panoptic, k_max):
    """Loop reference: segments by decreasing area (ties by value), largest k_max kept."""
    values, counts = np.unique(panoptic[panoptic >= 0], return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))[:k_max]
    kept = [int(values[i]) for i in order]
    ids = np.full(panoptic.shape, -1)
    for k, v in enumerate(kept):
        ids[panoptic == v] = k
    classes = [v // DIV for v in kept] + [0] * (k_max - len(kept))
    valid = [True] * len(kept) + [False] * (k_max - len(kept))
    thing = [IS_THING[c] and ok for c, ok in zip(classes, valid, strict=True)]
    semantic = np.where(panoptic >= 0, panoptic // DIV, -1)
    return ids, classes, valid, thing, semantic


def _random_panoptic(rng, shape, num_values):
    values = rng.choice([c * DIV + i for c in range(4) for i in range(4) if IS_THING[c] or i == 0]
                        + [-1], size=num_values, replace=False)
    return rng.choice(values, size=shape).astype(np.int32)


@pytest.mark.parametrize("k_max", [3, 8, 16])
def test_panoptic_to_targets_matches_loop_reference(k_max):
    rng = np.random.default_rng(k_max)
    for _ in range(3):
        panoptic = _random_panoptic(rng, (9, 13), 7)
        out = panoptic_to_targets(tf.constant(panoptic), k_max, IS_THING, DIV, tf.constant(5))
        ids, classes, valid, thing, semantic = _slow_targets(panoptic, k_max)
        np.testing.assert_array_equal(out["segment_ids"].numpy(), ids)
        assert out["segment_classes"].numpy().tolist() == classes
        assert out["segment_valid"].numpy().tolist() == valid
        assert out["segment_is_thing"].numpy().tolist() == thing
        np.testing.assert_array_equal(out["semantic"].numpy(), semantic)
        assert out["segment_ids"].dtype == tf.int32 and out["semantic"].dtype == tf.int32


def test_more_segments_than_k_max_keeps_largest_and_warns(capfd):
    # Areas: value 0 -> 10 px, 257 -> 8, 513 -> 6, 768 -> 4, 258 -> 2; void 6.
    row = [0] * 10 + [257] * 8 + [513] * 6 + [768] * 4 + [258] * 2 + [-1] * 6
    panoptic = tf.constant([row], tf.int32)
    out = panoptic_to_targets(panoptic, 3, IS_THING, DIV, tf.constant(1234, tf.int64))
    ids = out["segment_ids"].numpy()[0]
    assert ids.tolist() == [0] * 10 + [1] * 8 + [2] * 6 + [-1] * 12
    assert out["segment_classes"].numpy().tolist() == [0, 1, 2]
    assert out["semantic"].numpy()[0, 24:30].tolist() == [3, 3, 3, 3, 1, 1]
    assert int(out["num_segments"]) == 5
    err = capfd.readouterr().err
    assert "1234" in err and "k_max = 3" in err
    # Inside a tf.data map too (graph mode); exactly k_max never warns.
    ds = tf.data.Dataset.from_tensors(panoptic).map(
        lambda p: panoptic_to_targets(p, 2, IS_THING, DIV, tf.constant(99, tf.int64)))
    assert next(iter(ds))["segment_valid"].numpy().tolist() == [True, True]
    assert "image 99" in capfd.readouterr().err
    panoptic_to_targets(panoptic, 5, IS_THING, DIV, tf.constant(7, tf.int64))
    assert "WARNING" not in capfd.readouterr().err


def test_flip_moves_labels_with_image():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)
    label = rng.integers(-1, 4, (5, 7)).astype(np.int32)
    flipped_image, flipped_label = flip_left_right(tf.constant(image), tf.constant(label),
                                                   tf.constant(True))
    np.testing.assert_array_equal(flipped_image.numpy(), image[:, ::-1])
    np.testing.assert_array_equal(flipped_label.numpy(), label[:, ::-1])
    same_image, same_label = flip_left_right(tf.constant(image), tf.constant(label),
                                             tf.constant(False))
    np.testing.assert_array_equal(same_image.numpy(), image)
    np.testing.assert_array_equal(same_label.numpy(), label)


def _colour_coded_example(rng, height, width):
    """Blocky panoptic map and an image whose colour is a function of the label."""
    coarse = _random_panoptic(rng, (height // 8, width // 8), 6)
    panoptic = np.kron(coarse, np.ones((8, 8), np.int32))
    palette = {v: rng.uniform(0, 255, 3) for v in np.unique(panoptic)}
    image = np.stack([[palette[v] for v in row] for row in panoptic]).astype(np.float32)
    return panoptic, image, palette


def test_training_augmentation_keeps_image_and_labels_aligned():
    """After random scale, crop, pad and flip, every pixel whose 3x3 label neighbourhood is
    uniform has the colour of its own segment: one panoptic value per segment index, of the
    segment's class; void pixels show the void colour or the pad value 127.5."""
    rng = np.random.default_rng(1)
    panoptic, image, palette = _colour_coded_example(rng, 48, 64)
    example = {"image": tf.constant(image.round().astype(np.uint8)),
               "panoptic": tf.constant(panoptic), "image_id": tf.constant(3, tf.int64)}
    image = image.round()
    values = sorted(palette)
    colours = np.stack([palette[v].round() for v in values])
    tf.random.set_seed(5)
    for i in range(12):
        # Half the draws from TF's stateful ops, half from per-example seeds (`seed`).
        seed = tf.constant([5, i], tf.int64) if i % 2 else None
        out = preprocess_train(example, (33, 45), 0.8, 2.5, 16, IS_THING, DIV, 127.5, 0.5,
                               seed=seed)
        assert out["image"].shape == (33, 45, 3) and out["segment_ids"].shape == (33, 45)
        img, ids = out["image"].numpy(), out["segment_ids"].numpy()
        classes = out["segment_classes"].numpy()
        uniform = np.ones_like(ids, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                uniform &= np.roll(ids, (dy, dx), (0, 1)) == ids
        uniform[[0, -1]] = False
        uniform[:, [0, -1]] = False
        value_of_segment = {}
        for y, x in zip(*np.nonzero(uniform), strict=True):
            distance = np.abs(colours - img[y, x]).max(axis=1)
            if ids[y, x] < 0:
                padding = np.abs(img[y, x] - 127.5).max() < 1e-4
                void = -1 in palette and distance[values.index(-1)] < 1.0
                assert padding or void
                continue
            assert distance.min() < 1.0
            value = values[int(distance.argmin())]
            assert value // DIV == classes[ids[y, x]]
            assert value_of_segment.setdefault(ids[y, x], value) == value
        assert len(set(value_of_segment.values())) == len(value_of_segment)
    flips = set()
    # Flip: with crop = image size and scale 1 the output is the input or its mirror image.
    for seed in range(8):
        tf.random.set_seed(seed)
        out = preprocess_train(example, (48, 64), 1.0, 1.0, 16, IS_THING, DIV)
        img, sem = out["image"].numpy(), out["semantic"].numpy()
        expected_sem = np.where(panoptic >= 0, panoptic // DIV, -1)
        if np.array_equal(img, image):
            np.testing.assert_array_equal(sem, expected_sem)
            flips.add(False)
        else:
            np.testing.assert_array_equal(img, image[:, ::-1])
            np.testing.assert_array_equal(sem, expected_sem[:, ::-1])
            flips.add(True)
    assert flips == {False, True}


def test_eval_preprocess_is_deterministic_and_keeps_original():
    rng = np.random.default_rng(2)
    panoptic, image, _ = _colour_coded_example(rng, 40, 64)
    example = {"image": tf.constant(image.round().astype(np.uint8)),
               "panoptic": tf.constant(panoptic), "image_id": tf.constant(9, tf.int64)}
    out = preprocess_eval(example, (33, 33), 16, IS_THING, DIV)
    again = preprocess_eval(example, (33, 33), 16, IS_THING, DIV)
    np.testing.assert_array_equal(out["image"].numpy(), again["image"].numpy())
    assert out["original_size"].numpy().tolist() == [40, 64]
    assert out["resized_size"].numpy().tolist() == [21, 33]  # longer side fits: 33/64
    np.testing.assert_array_equal(out["original_panoptic"].numpy(), panoptic)
    assert (out["panoptic"].numpy()[21:] == -1).all() and (out["segment_ids"].numpy()[21:] == -1
                                                           ).all()
    assert (out["image"].numpy()[21:] == 127.5).all()
    # Nearest resize of a blocky label: the kept region maps back onto the original grid.
    rows = np.minimum(((np.arange(21) + 0.5) * 40 / 21).astype(int), 39)
    cols = np.minimum(((np.arange(33) + 0.5) * 64 / 33).astype(int), 63)
    np.testing.assert_array_equal(out["panoptic"].numpy()[:21], panoptic[rows][:, cols])


def _check_contract(batch, batch_size, crop, k_max, num_classes, thing_classes):
    expected = {"image": (tf.float32, [batch_size, *crop, 3]),
                "segment_ids": (tf.int32, [batch_size, *crop]),
                "segment_classes": (tf.int32, [batch_size, k_max]),
                "segment_valid": (tf.bool, [batch_size, k_max]),
                "segment_is_thing": (tf.bool, [batch_size, k_max]),
                "semantic": (tf.int32, [batch_size, *crop])}
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype and batch[key].shape.as_list() == shape, key
    image = batch["image"].numpy()
    assert image.min() >= 0.0 and image.max() <= 255.0
    ids, semantic = batch["segment_ids"].numpy(), batch["semantic"].numpy()
    classes, valid = batch["segment_classes"].numpy(), batch["segment_valid"].numpy()
    thing = batch["segment_is_thing"].numpy()
    assert ((semantic >= -1) & (semantic < num_classes)).all()
    assert (ids[semantic < 0] == -1).all()  # void, crowd and padding
    for b in range(batch_size):
        n = int(valid[b].sum())
        assert valid[b, :n].all() and not valid[b, n:].any()
        assert ids[b].max() < n
        for k in range(n):
            assert (semantic[b][ids[b] == k] == classes[b, k]).all()
            assert thing[b, k] == (classes[b, k] in thing_classes)
        assert not thing[b, n:].any()


def test_build_dataset_training_batches_meet_contract(records):
    metadata = load_metadata(records)
    dataset = build_dataset(records, True, 4, crop_size=(33, 41), k_max=12)
    for batch in dataset.take(3):
        _check_contract(batch, 4, (33, 41), 12, metadata["num_classes"],
                        set(metadata["thing_classes"]))
        assert (batch["segment_ids"].numpy() == -1).any()


def test_build_dataset_eval_and_input_context_sharding(records):
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        dataset = build_dataset(records, False, 4, crop_size=(33, 41), k_max=12,
                                input_context=context)
        ids = []
        for batch in dataset:
            assert batch["image"].shape[0] <= 2  # per-replica batch = 4 / 2
            _check_contract(batch, batch["image"].shape[0], (33, 41), 12, 8, {0, 1, 2, 3})
            ids += batch["image_id"].numpy().tolist()
            sizes = batch["original_size"].numpy()
            assert (sizes == [40, 56]).all()
            assert batch["original_panoptic"].shape[1:] == (40, 56)
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(1, 8))


def test_eval_ground_truth_map_has_the_segments_of_the_targets(records):
    """The evaluator scores predictions against the batch's ``panoptic`` map (in the
    prediction encoding): it holds exactly the segments the loss is given as targets, with
    their classes, thing segments with an instance id and stuff without."""
    from max_deeplab.panoptic_labels import data_to_prediction_encoding

    for batch in build_dataset(records, False, 4, crop_size=(33, 41), k_max=12):
        gt = data_to_prediction_encoding(batch["panoptic"], DIV).numpy()
        ids, classes = batch["segment_ids"].numpy(), batch["segment_classes"].numpy()
        thing = batch["segment_is_thing"].numpy()
        assert ((gt == 0) == (ids < 0)).all()  # void, crowd and padding in both
        for b in range(ids.shape[0]):
            pairs = {(int(i), int(v)) for i, v in zip(ids[b].ravel(), gt[b].ravel(),
                                                      strict=True) if i >= 0}
            segments = {i for i, _ in pairs}
            assert len(pairs) == len(segments) == len({v for _, v in pairs})  # one to one
            for k, value in pairs:
                assert value // DIV == classes[b, k] + 1
                assert (value % DIV > 0) == thing[b, k]


def _first_batches(dataset, count: int = 3) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]


def test_seeded_training_data_is_reproducible(records):
    """`seed` fixes the record order and every example's augmentation (the parallel map
    draws stateless, per-example randomness); another seed gives other batches."""
    def batches(seed):
        return _first_batches(build_dataset(records, True, 4, crop_size=(33, 41), k_max=12,
                                            min_scale=0.5, max_scale=2.0, seed=seed))

    first, again, other = batches(5), batches(5), batches(6)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(not np.array_equal(a["image"], b["image"])
               for a, b in zip(first, other, strict=True))


def test_augmentation_seed_decides_the_augmentation():
    """The same example with the same augmentation seed is augmented identically; over
    seeds the scale, crop and flip vary."""
    panoptic, image, _ = _colour_coded_example(np.random.default_rng(2), 48, 64)
    example = {"image": tf.constant(image.round().astype(np.uint8)),
               "panoptic": tf.constant(panoptic), "image_id": tf.constant(3, tf.int64)}

    def augment(position):
        return preprocess_train(example, (33, 45), 0.8, 2.5, 16, IS_THING, DIV,
                                seed=tf.constant([9, position], tf.int64))["image"].numpy()

    np.testing.assert_array_equal(augment(3), augment(3))
    assert len({augment(p).tobytes() for p in range(8)}) == 8


def test_build_dataset_errors_name_the_problem(records, tmp_path):
    with pytest.raises(ValueError, match="no TFRecord shards match"):
        build_dataset(str(tmp_path / "none-*.tfrecord"), True, 2)
    with pytest.raises(ValueError, match="min_scale"):
        build_dataset(records, True, 2, min_scale=2.0, max_scale=1.0)
    dataset = build_dataset(records, False, 2, crop_size=(33, 41), eval_label_size=(30, 30))
    with pytest.raises(tf.errors.InvalidArgumentError, match="eval_label_size"):
        next(iter(dataset))


@pytest.mark.parametrize("size,offset", [((70, 90), (5, 20)), ((20, 30), (-4, -9)),
                                         ((33, 61), (0, 7)), ((50, 40), (-3, 12))])
def test_resize_window_equals_resize_pad_crop(size, offset):
    """The window equals `tf.image.resize` of the whole image, padded, then cropped."""
    from max_deeplab.data.pipeline import resize_window

    rng = np.random.default_rng(sum(size))
    image = rng.uniform(0, 255, (37, 45, 3)).astype(np.float32)
    label = rng.integers(-1, 900, (37, 45)).astype(np.int32)
    out_image, out_label = resize_window(tf.constant(image), tf.constant(label),
                                         tf.constant(size), (33, 41), tf.constant(offset), 127.5)
    full = tf.image.resize(image, size, method="bilinear").numpy()
    full_label = tf.image.resize(label[..., None], size, method="nearest").numpy()[..., 0]
    pad = 100
    canvas = np.full((size[0] + 2 * pad, size[1] + 2 * pad, 3), 127.5, np.float32)
    canvas[pad:pad + size[0], pad:pad + size[1]] = full
    canvas_label = np.full(canvas.shape[:2], -1, np.int32)
    canvas_label[pad:pad + size[0], pad:pad + size[1]] = full_label
    y, x = pad + offset[0], pad + offset[1]
    np.testing.assert_allclose(out_image.numpy(), canvas[y:y + 33, x:x + 41], atol=1e-3)
    np.testing.assert_array_equal(out_label.numpy(), canvas_label[y:y + 33, x:x + 41])


def test_shard_glob_skips_the_metadata_file_beside_the_shards(tmp_path):
    from max_deeplab.data.metadata import list_shards

    for name in ("train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
                 "train-metadata.json"):
        (tmp_path / name).write_bytes(b"")
    files = list_shards(str(tmp_path / "train-*"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["train-00000-of-00002.tfrecord",
                                                    "train-00001-of-00002.tfrecord"]
    with pytest.raises(ValueError, match="no TFRecord shards match"):
        list_shards(str(tmp_path / "val-*"))
