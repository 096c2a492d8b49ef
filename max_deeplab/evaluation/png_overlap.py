"""The pixel overlap of a ground-truth / prediction panoptic PNG pair, what the `pq` verb needs
per image: how many pixels each (GT id, prediction id) pair covers, as
{(gt_id << 24) | pred_id: pixels}. Two implementations give the same counts:

* the C extension `_png_overlap`, for COCO's PNGs (8-bit RGB or RGBA, not interlaced): it
  unfilters both images' inflated rows (`panoptic_png.inflated_scanlines`) row by row and
  counts the runs of equal (GT, prediction) pairs, ~1 ms per COCO-sized pair in all, with
  no image array and no numpy;
* `numpy_png_overlap` for the other PNG forms (16-bit, interlaced), or where the extension
  could not be compiled at install time.

This module chooses between them; neither imports it.
"""
from __future__ import annotations

from max_deeplab.evaluation.errors import PanopticEvalError
from max_deeplab.evaluation.panoptic_png import PanopticPng, inflated_scanlines, read_png

try:
    from max_deeplab.evaluation import _png_overlap
except ImportError:  # the optional C extension was not compiled at install time
    _png_overlap = None


def fast_path_available() -> bool:
    """Whether the C extension was compiled (else every pair takes the numpy path)."""
    return _png_overlap is not None


def _takes_fast_path(png: PanopticPng) -> bool:
    return _png_overlap is not None and png.bit_depth == 8 and not png.interlaced


def pair_overlap_counts(gt_path: str, pred_path: str, image_id: object) -> dict[int, int]:
    """{(gt_id << 24) | pred_id: pixels} over the pixels of a GT / prediction PNG pair."""
    gt, pred = read_png(gt_path), read_png(pred_path)
    if (gt.width, gt.height) != (pred.width, pred.height):
        raise PanopticEvalError(
            f"image_id {image_id!r}: prediction PNG {pred.path} is {pred.width}x{pred.height} "
            f"(WxH) but ground-truth PNG {gt.path} is {gt.width}x{gt.height}")
    if _takes_fast_path(gt) and _takes_fast_path(pred):
        return _png_overlap.overlap_counts(inflated_scanlines(gt), inflated_scanlines(pred),
                                           gt.width, gt.height, gt.channels, pred.channels)
    from max_deeplab.evaluation.numpy_png_overlap import overlap_counts

    return overlap_counts(gt, pred)
