"""`panoptic_png` and `png_overlap`: the C pixel-overlap path against independent decoders and
the numpy path, and its errors on bad PNGs."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image
from png_files import filtered_png_bytes, filtered_scanlines, ihdr, png_bytes, png_file
from random_pq_cases import (
    default_categories,
    random_ground_truth,
    random_prediction,
    write_coco_pair_set,
)

from max_deeplab.evaluation import panoptic_png, png_overlap
from max_deeplab.evaluation.coco_panoptic import PanopticEvalError, pq_compute
from max_deeplab.evaluation.numpy_png_overlap import overlap_counts as numpy_overlap_counts

_png_overlap = png_overlap._png_overlap


def test_c_extension_is_compiled():
    """setup.py marks it optional (an install without a compiler still works); in this
    development environment it must have been built, or the fast path goes untested."""
    assert png_overlap.fast_path_available(), "rebuild: pip install -e '.[dev]' (needs gcc)"


def _ids(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] | rgb[..., 1] << 8 | rgb[..., 2] << 16


def _counts(gt_rgb: np.ndarray, pred_rgb: np.ndarray) -> dict[int, int]:
    """{(gt_id << 24) | pred_id: pixels}, computed directly from decoded pixels."""
    keys, counts = np.unique((_ids(gt_rgb) << 24 | _ids(pred_rgb)).ravel(), return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


def _piecewise_constant(rng, h: int, w: int, channels: int) -> np.ndarray:
    """A panoptic-like map: a few rectangles of a few colours, so rows repeat and the
    filters meet both flat and changing neighbourhoods."""
    palette = rng.integers(0, 256, (5, channels))
    labels = np.zeros((h, w), np.int64)
    for k in range(1, 5):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        labels[y0:y0 + rng.integers(1, h + 1), x0:x0 + rng.integers(1, w + 1)] = k
    return palette[labels].astype(np.uint8)


@pytest.mark.parametrize("channels", [3, 4])
# noise: any byte values; levels: 4 values, so the Paeth predictor's ties (left before above
# before upper-left) decide many bytes; regions: flat areas, as in panoptic maps.
@pytest.mark.parametrize("content", ["noise", "levels", "regions"])
@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4, None])  # None: a random mix
def test_unfilter_matches_pillow(channels, content, filter_type):
    rng = np.random.default_rng(channels * 10 + (filter_type or 5))
    h, w = 17, 13
    if content == "regions":
        samples = _piecewise_constant(rng, h, w, channels)
    else:
        top, step = (256, 1) if content == "noise" else (4, 85)
        samples = (rng.integers(0, top, (h, w, channels)) * step).astype(np.uint8)
    filters = ([filter_type] * h if filter_type is not None
               else rng.integers(0, 5, h).tolist())
    import io

    decoded = np.asarray(Image.open(io.BytesIO(filtered_png_bytes(samples, filters))))
    np.testing.assert_array_equal(decoded, samples)  # the hand-written PNG is valid
    got = _png_overlap.unfilter(filtered_scanlines(samples, filters), w, h, channels)
    np.testing.assert_array_equal(np.frombuffer(got, np.uint8).reshape(h, w, channels),
                                  samples)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (24, 31)])
@pytest.mark.parametrize("channels", [(3, 3), (3, 4), (4, 3), (4, 4)])
def test_overlap_counts_match_a_direct_count(shape, channels):
    rng = np.random.default_rng(shape[0] * 7 + shape[1] + channels[1])
    h, w = shape
    maps = [_piecewise_constant(rng, h, w, c) for c in channels]
    for m in maps:
        if m.shape[-1] == 4:  # alpha is not part of the id: noise there must change nothing
            m[..., 3] = rng.integers(0, 256, (h, w))
    if h > 2:
        maps[1][h // 2] = maps[1][h // 2 - 1]  # a repeated row pair after a changed one
    scanlines = [filtered_scanlines(m, rng.integers(0, 5, h).tolist()) for m in maps]
    got = _png_overlap.overlap_counts(*scanlines, w, h, *channels)
    assert got == _counts(maps[0][..., :3], maps[1][..., :3])
    assert sum(got.values()) == h * w


def test_overlap_counts_are_permutation_consistent():
    """Swapping GT and prediction swaps the two halves of every key, counts unchanged."""
    rng = np.random.default_rng(1)
    maps = [_piecewise_constant(rng, 16, 16, 3) for _ in range(2)]
    scan = [filtered_scanlines(m, [4] * 16) for m in maps]
    forward = _png_overlap.overlap_counts(scan[0], scan[1], 16, 16, 3, 3)
    backward = _png_overlap.overlap_counts(scan[1], scan[0], 16, 16, 3, 3)
    mask = (1 << 24) - 1
    assert backward == {(k & mask) << 24 | k >> 24: n for k, n in forward.items()}


def test_many_distinct_ids_grow_the_count_table():
    """128 x 128 pixels, each its own GT id (multiples of 1024: keys that differ only in
    high bits), two prediction ids: 32k keys, far past the table's initial 1024 slots."""
    h = w = 128
    gt_ids = (np.arange(1, h * w + 1) * 1024).reshape(h, w)
    pred_ids = (np.arange(h * w) % 2 + 1).reshape(h, w)
    maps = [np.stack([m % 256, m // 256 % 256, m // 65536], -1).astype(np.uint8)
            for m in (gt_ids, pred_ids)]
    scanlines = [filtered_scanlines(m, [1] * h) for m in maps]
    got = _png_overlap.overlap_counts(*scanlines, w, h, 3, 3)
    assert len(got) == h * w and got == _counts(*maps)


def test_c_functions_reject_bad_arguments():
    good = filtered_scanlines(np.zeros((2, 3, 3), np.uint8), [0, 0])
    with pytest.raises(ValueError, match="bytes of scanlines, expected 20"):
        _png_overlap.overlap_counts(good[:-1], good, 3, 2, 3, 3)
    with pytest.raises(ValueError, match="channels must be 3 or 4"):
        _png_overlap.unfilter(good, 3, 2, 2)
    with pytest.raises(ValueError, match="width and height must be >= 1"):
        _png_overlap.unfilter(b"", 0, 2, 3)
    with pytest.raises(ValueError, match="too large"):  # 2^32 rows of 2^32 bytes
        _png_overlap.unfilter(b"", (1 << 32) // 3, 1 << 32, 3)
    bad_filter = b"\x05" + good[1:]
    with pytest.raises(ValueError, match="scanline 0 has unknown filter type 5"):
        _png_overlap.overlap_counts(good, bad_filter, 3, 2, 3, 3)


def _pair_set(root, channels_of_pred: int = 3) -> dict:
    rng = np.random.default_rng(5)
    cats = default_categories(4, 3)
    pairs = []
    for _ in range(6):
        gt = random_ground_truth(rng, 30, 40, cats, num_things=(2, 6))
        pairs.append((gt, random_prediction(rng, gt, cats)))
    paths = write_coco_pair_set(str(root), pairs, cats, seed=5)
    if channels_of_pred == 4:  # RGBA predictions: alpha is ignored, as by the reference
        import glob

        for path in glob.glob(f"{paths['pred_dir']}/*.png"):
            Image.open(path).convert("RGBA").save(path)
    return paths


@pytest.mark.parametrize("channels_of_pred", [3, 4])
def test_c_and_numpy_paths_give_the_same_counts_and_pq(tmp_path, monkeypatch,
                                                       channels_of_pred):
    import glob
    import os

    paths = _pair_set(tmp_path, channels_of_pred)
    for gt_path in sorted(glob.glob(f"{paths['gt_dir']}/*.png")):
        pred_path = os.path.join(paths["pred_dir"], os.path.basename(gt_path))
        fast = png_overlap.pair_overlap_counts(gt_path, pred_path, "x")
        assert fast == numpy_overlap_counts(panoptic_png.read_png(gt_path),
                                            panoptic_png.read_png(pred_path))
    fast_pq = pq_compute(**paths, num_workers=1)
    monkeypatch.setattr(png_overlap, "_png_overlap", None)  # as if not compiled
    assert not png_overlap.fast_path_available()
    assert pq_compute(**paths, num_workers=1) == fast_pq


def test_sixteen_bit_and_interlaced_pngs_take_the_numpy_path(tmp_path):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 3, (6, 5))
    rgb = np.stack([ids, ids * 0, ids * 0], -1)
    gt = tmp_path / "gt.png"
    gt.write_bytes(png_bytes(rgb.astype(np.uint8), 2))
    for name, data in (("deep.png", png_bytes((rgb * 257).astype(np.uint16), 2)),
                       ("interlaced.png", png_bytes(rgb.astype(np.uint8), 2, interlaced=True))):
        pred = tmp_path / name
        pred.write_bytes(data)
        counts = png_overlap.pair_overlap_counts(str(gt), str(pred), "x")
        assert counts == {(i << 24) | i: int((ids == i).sum()) for i in range(3)}


def _bad_png(tmp_path, name: str, header: bytes, compressed: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(png_file(header, compressed))
    return str(path)


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4)])
def test_fast_path_errors_name_the_file(tmp_path, color_type, channels):
    row = 1 + 5 * channels
    header = ihdr(5, 6, 8, color_type)
    good = _bad_png(tmp_path, "good.png", header, zlib.compress(bytes(6 * row)))
    cases = {
        "bad_filter.png": (header,
                           zlib.compress(bytes(3 * row) + b"\x07" + bytes(3 * row - 1)),
                           "row 3 has unknown filter type 7"),
        "short.png": (header, zlib.compress(bytes(2 * row)), "where its 5x6 header needs"),
        "long.png": (header, zlib.compress(bytes(7 * row)), "corrupt compressed image data"),
        "not_zlib.png": (header, b"not a zlib stream", "corrupt compressed image data"),
        "huge.png": (ihdr(100_000, 100_000, 8, color_type), zlib.compress(bytes(row)),
                     "more than its"),
        "method.png": (header[:10] + b"\x01" + header[11:], zlib.compress(bytes(6 * row)),
                       "unknown compression, filter or interlace method"),
        "no_rows.png": (ihdr(5, 0, 8, color_type), zlib.compress(b""), "header says 5x0"),
        "no_columns.png": (ihdr(0, 6, 8, color_type), zlib.compress(bytes(6)),
                           "header says 0x6"),
        "short_ihdr.png": (header[:12], zlib.compress(bytes(6 * row)), "not a PNG file"),
    }
    for name, (ihdr_body, compressed, message) in cases.items():
        bad = _bad_png(tmp_path, name, ihdr_body, compressed)
        with pytest.raises(PanopticEvalError, match=message) as e:
            png_overlap.pair_overlap_counts(good, bad, "x")
        assert name in str(e.value)
    assert png_overlap.pair_overlap_counts(good, good, "x") == {0: 30}


def test_size_mismatch_names_both_files(tmp_path):
    small = _bad_png(tmp_path, "small.png", ihdr(5, 6, 8, 2), zlib.compress(bytes(6 * 16)))
    big = _bad_png(tmp_path, "big.png", ihdr(6, 6, 8, 2), zlib.compress(bytes(6 * 19)))
    with pytest.raises(PanopticEvalError, match=r"image_id 7: prediction PNG .*big.png is 6x6 "
                       r"\(WxH\) but ground-truth PNG .*small.png is 5x6"):
        png_overlap.pair_overlap_counts(small, big, 7)
