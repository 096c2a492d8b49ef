"""The numpy path of `png_overlap.pair_overlap_counts`: decoded images, vectorised runs.

Taken for PNGs the C extension does not read (16-bit or interlaced) and where the extension
was not compiled; it gives the same counts (tests compare the two):

- each PNG is decoded into R, G, B bytes: 8-bit RGB / RGBA by the Rust `png` crate through
  kornia-rs (~5x faster than Pillow), other depths by libspng (pyspng);
- the two maps are cut into runs of equal (GT id, prediction id) pairs in raster order with
  byte-wise XORs (`pair_runs`), ids are assembled only at run starts, and the counts are
  one run-length-weighted `np.bincount` over the distinct pairs.
"""
from __future__ import annotations

import os
import sys

import kornia_rs
import pyspng

from max_deeplab.evaluation.errors import PanopticEvalError
from max_deeplab.evaluation.panoptic_png import ID_BITS, PanopticPng, read_png


def _import_numpy_without_blas_threads() -> None:
    """Imports numpy with its OpenBLAS limited to one thread, if numpy is not loaded yet.

    OpenBLAS starts a thread per core, with their buffers, when numpy is first imported;
    nothing here does linear algebra, and skipping that saves ~30 ms of start-up. The
    variable is read only when the library loads, so it is restored right after (nothing
    else in the process or its subprocesses sees it); an explicit user setting is left alone.
    """
    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


_import_numpy_without_blas_threads()
import numpy as np  # noqa: E402


def decode_rgb(png: PanopticPng) -> np.ndarray:
    """Decodes a read PNG to uint8 [H, W, 3] R, G, B (id = R + 256 G + 256^2 B).

    PNGs with an alpha channel are read from their first three channels, as the reference
    evaluator does; 16-bit PNGs by the high byte of each sample, as Pillow (the reference's
    reader) does.
    """
    try:
        if png.bit_depth == 8:
            size = (png.height, png.width)
            if png.channels == 3:
                return kornia_rs.io.decode_image_png_u8(png.data, size, "rgb")
            return kornia_rs.io.decode_image_png_u8(png.data, size, "rgba")[..., :3]
        return pyspng.load(png.data, "RGB")
    except Exception as e:  # pyspng raises RuntimeError, kornia-rs a plain Exception
        raise PanopticEvalError(f"cannot decode PNG {png.path}: {e}") from None


def read_png_rgb(path: str) -> np.ndarray:
    """`decode_rgb` of the PNG at `path` (checked by `panoptic_png.read_png`)."""
    return decode_rgb(read_png(path))


def _pixel_ids(rgb: np.ndarray, index: np.ndarray) -> np.ndarray:
    """uint32 ids R + 256 G + 256^2 B of the pixels at flat `index` of flat RGB bytes."""
    byte = 3 * index
    ids = rgb[byte + 2].astype(np.uint32)
    ids <<= 8
    ids |= rgb[byte + 1]
    ids <<= 8
    ids |= rgb[byte]
    return ids


# Pixels per block of `pair_runs`: the block's byte temporaries (~100 KB each) stay in the
# L2 cache instead of streaming ~1 MB arrays through memory (~20% faster at 480x640).
_RUN_BLOCK_PIXELS = 1 << 15


def pair_runs(gt_rgb: np.ndarray, pred_rgb: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cuts two equally sized RGB maps into runs of equal (GT id, prediction id) in raster order.

    Returns (start, length, GT id, prediction id) per run. Panoptic maps are piecewise
    constant, so runs are ~50x fewer than pixels and the later per-run work is small. The
    pixel work stays on bytes, block by block: each map XOR-ed with itself shifted by one
    pixel and the two OR-ed (a non-zero byte: that byte of the pixel differs from the
    previous pixel's in either map; uint8 XOR/OR beat not-equal into booleans), then "any of
    a pixel's 3 bytes set" as one compare of a strided uint32 view (the word whose top 3
    bytes are the pixel's is >= 256 iff one of them is non-zero). Ids are assembled only at
    run starts.
    """
    gt, pred = gt_rgb.reshape(-1), pred_rgb.reshape(-1)
    n = gt.size // 3
    change = np.empty(n, bool)
    change[:1] = True
    block = min(n, _RUN_BLOCK_PIXELS)
    # diff[0] is a zero pad so that word k (bytes 3k .. 3k + 3) has pixel k's bytes on top.
    diff = np.zeros(3 * block + 1, np.uint8)
    scratch = np.empty(3 * block, np.uint8)
    for first in range(1, n, block):
        last = min(n, first + block)
        lo, hi, size = 3 * first, 3 * last, 3 * (last - first)
        d = diff[1:1 + size]
        np.bitwise_xor(gt[lo:hi], gt[lo - 3:hi - 3], out=d)
        d |= np.bitwise_xor(pred[lo:hi], pred[lo - 3:hi - 3], out=scratch[:size])
        words = np.ndarray((last - first,), "<u4", diff, 0, (3,))
        np.greater_equal(words, 256, out=change[first:last])
    starts = np.flatnonzero(change)
    lengths = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
    lengths[-1:] = n - starts[-1:]
    return starts, lengths, _pixel_ids(gt, starts), _pixel_ids(pred, starts)


def overlap_counts(gt: PanopticPng, pred: PanopticPng) -> dict[int, int]:
    """{(gt_id << 24) | pred_id: pixels} of two read PNGs of the same size."""
    _, lengths, gt_run, pred_run = pair_runs(decode_rgb(gt), decode_rgb(pred))
    keys = (gt_run.astype(np.int64) << ID_BITS) | pred_run
    distinct, which = np.unique(keys, return_inverse=True)
    # Float weights are exact: pixel counts are integers < 2^53.
    counts = np.bincount(which.reshape(-1), weights=lengths, minlength=distinct.size)
    return dict(zip(distinct.tolist(), counts.astype(np.int64).tolist()))
