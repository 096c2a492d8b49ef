"""Panoptic post-processing of MaX-DeepLab outputs (paper §3.1, §4, DESIGN.md §5).

The model predicts N (mask, class) pairs: class probabilities p̂_i over C + 1 classes (the
last, ∅, is void) and masks m̂_i,hw = softmax over the N slots of the mask logits. Two
argmaxes turn them into a non-overlapping panoptic map (Eqs. 2-3), filtered by the
confidences of §4 ("masks with class confidence below 0.7 [set] to void", "pixels with
mask-ID confidence below 0.4 [filtered]"). Two rules are implemented (``rule``):

``rule="kept_slots"`` (the default; the reference implementation's, which its published
checkpoints' PQ was measured with):
1. ĉ_i = argmax over the C non-void classes of p̂_i (the (C+1)-softmax, ∅ left out); slot i
   is *kept* iff its class confidence p̂_i(ĉ_i) ≥ ``class_threshold`` (0.7 itself is kept).
   Other slots are discarded before the pixel argmax.
2. ẑ_hw = argmax over the *kept* slots of p̂_i(ĉ_i)·m̂_i,hw (``weight_masks_by_class_confidence
   =True``, the paper's Eq. 3 weighting), or of m̂_i,hw alone (False, as deeplab2). As m̂ =
   softmax_N(mask logits), the argmax is taken on logit + log p̂ directly.
3. The pixel's mask-ID confidence is the softmax over the *kept* slots of the mask logits,
   read at ẑ (not m̂, whose softmax runs over all N). The pixel is kept iff that confidence
   is > ``pixel_threshold`` (0.4 itself is void) and the slot with the largest mask logit
   over *all* N slots is a kept one (a pixel dominated by a discarded slot is void, not
   handed to a weaker kept slot).

``rule="paper"`` (§3.1 and §4 read literally):
1. ĉ_i = argmax over all C + 1 classes (∅ included); slot i is void if ĉ_i = ∅ or
   p̂_i(ĉ_i) < ``class_threshold`` (0.7 itself is kept).
2. ẑ_hw = argmax over *all* N slots of p̂_i(ĉ_i)·m̂_i,hw (void slots compete too).
3. The pixel is void if slot ẑ is void or m̂_ẑ,hw (softmax over all N) < ``pixel_threshold``
   (0.4 itself is kept).

Then, under either rule, segments below an area limit become void: a thing segment is one
slot's pixels (instance id = slot + 1), a stuff segment is the union of the pixels of all
slots predicting that stuff class (instance id 0).

Label encoding (same as deeplab2's COCO label space, used by its released checkpoints):
the semantic label of contiguous class channel k is ``k + label_offset`` (default 1), label
0 is void, and ``panoptic = label * label_divisor + instance``. On deeplab2's tiny reference
(`reference/deeplab2/tiny/io.npz`) transformer class channel k (0..132, channel 133 = void)
appears as ``semantic_pred == k + 1``: deeplab2's COCO thing ids are 1..80 and its stuff
ids 81..133 with 0 = ignore, so its thing+stuff id list is exactly ``k + 1``.

Mask logits at stride 4 are bilinearly upsampled to ``image_size`` with *align_corners*
semantics (corner pixels of input and output coincide; the reference's convention, verified
numerically on the tiny fixture), which is exact for the stride-4 grid of a ``4k + 1`` input
(e.g. 641 -> 161 -> 641). Thresholds: a slot is kept iff p̂ ≥ class_threshold; a pixel is
kept iff its confidence > pixel_threshold (strict), a segment iff area ≥ its limit.

Every pixel is summarised by one int32 *code* = (b·N + a)·(2N + 1) + e, with a the dominant
slot (largest mask logit) and e = 0 (void: a discarded under "kept_slots", ẑ void under
"paper"), 1 + ẑ (confident) or 1 + N + ẑ (not confident). All output maps are then one table
lookup each, and the area filters one `bincount` of the codes. The "paper" rule computes
its codes on all N upsampled channels (`_slot_maps_paper`); three implementations compute
the "kept_slots" codes:

* *static* (used under ``tf.function(jit_compile=True)``, where shapes must be static):
  all N channels upsampled to [B, H, W, N];
* *dense* (dynamic shapes; any resize): the N-channel argmax, and only the K kept channels
  upsampled for ẑ and the confidence;
* *cells* (dynamic shapes, align-corners with power-of-two strides, e.g. 161 -> 641; the
  default outside XLA). The bilinear upsample is, inside one stride cell, a convex
  combination of the cell's 4 corner logit vectors, which gives exact low-resolution bounds:
  a slot whose corner max is below another slot's corner min (minus a rounding margin)
  never wins in that cell; and, the log-sum-exp being convex, the kept-slot sum
  Σ_k exp(v_k − v_ẑ) at any pixel is at most the bilinear interpolation of its values at
  the 4 corners (Jensen), and at least its partial sum over the candidate slots. Only cells
  where these bounds leave the argmax or the threshold open are interpolated, and only for
  their candidate slots — with `ResizeBilinear`'s own arithmetic and exact weights r/s, so
  the values are bit-identical to the full upsample's; confidences still open there are
  computed over all kept slots of the cell. Ties resolve to the lowest slot (`tf.argmax`).
  When too many slots stay candidates (e.g. spatially white-noise logits) the dense path
  runs instead.

The kept slots' logits are selected with a one-hot matmul (`_kept_logits`), exact in float32.
On GPUs that run float32 matmuls in TensorFloat-32 (TF's default on NVIDIA Ampere and newer)
it rounds the logits to 10 mantissa bits, as TF32 already does inside the network that
produced them; the dynamic paths may then differ from the static one at near-ties.
`tf.config.experimental.enable_tensor_float_32_execution(False)` restores exact agreement.

The float ``pixel_confidence`` output needs the kept-slot sum at every pixel; the cells path
computes it with the dense kept-slot upsample, which graph mode (`tf.function`, SavedModel)
skips when that output is not fetched (export returns only the label maps). It agrees with
the threshold decision up to float32 rounding of the sum (summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import gin
import numpy as np
import tensorflow as tf

from max_deeplab.xla_compilation import in_xla_compilation

RESIZE_METHODS = ("align_corners", "half_pixel")
RULES = ("kept_slots", "paper")
# How segment areas are counted: `DenseBincount` (fast on CPU, XLA) or an unsorted segment
# sum (the only one of the two TFLite has: see `max_deeplab.inference.tflite`).
COUNT_METHODS = ("bincount", "segment_sum")

# Log-score given to discarded slots in the paper's argmax: finite (unlike -inf) so that an
# image with every slot discarded gives no NaN, and far below any real logit + log p̂.
_NEG = -1e9


def scaled_area_limit(limit: float, image_size: Sequence[int],
                      reference_size: int | None) -> int:
    """Area limit (pixels) at ``image_size`` for a limit defined at ``reference_size``².

    DESIGN.md §5: the limits 4096 (stuff) / 256 (thing) are meant for 1025x1025 inputs and
    scale with the input area, measured as (H − 1)(W − 1) — MaX-DeepLab inputs are
    stride·k + 1 pixels, so this is the area in output-stride cells — which gives exactly
    the reference's 1600 / 100 at 641 (4096·640²/1024²); the pixel count H·W would give
    1602. ``reference_size=None`` means the limit is already an absolute pixel count.
    """
    if reference_size is None:
        return int(round(limit))
    if reference_size < 2:
        raise ValueError(f"area_limit_reference_size must be >= 2 or None, got {reference_size}")
    h, w = int(image_size[0]), int(image_size[1])
    return int(round(limit * (h - 1) * (w - 1) / float((reference_size - 1) ** 2)))


def upsample_logits(logits: tf.Tensor, size: Sequence[int], method: str = "align_corners"
                    ) -> tf.Tensor:
    """Bilinear resize of [B, h, w, K] logits to ``size`` (H, W).

    ``align_corners``: output pixel y samples input row y·(h−1)/(H−1) (deeplab2's
    `tf.compat.v1.image.resize_bilinear(..., align_corners=True)`); ``half_pixel``: TF2's
    `tf.image.resize` convention (y + 0.5)·h/H − 0.5.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
    size = [int(size[0]), int(size[1])]
    logits = tf.convert_to_tensor(logits)
    if logits.shape[1] == size[0] and logits.shape[2] == size[1]:
        return logits
    return tf.raw_ops.ResizeBilinear(images=logits, size=size,
                                     align_corners=method == "align_corners",
                                     half_pixel_centers=method == "half_pixel")


def _candidate_stride(low: int, high: int) -> int | None:
    """Stride s with ``high − 1 = s·(low − 1)`` for a power-of-two s ≥ 2, else None.

    Only then are align-corners interpolation weights r/s exact in float32, so that a
    2x2-patch resize reproduces the full resize bit for bit.
    """
    if low < 2 or (high - 1) % (low - 1):
        return None
    stride = (high - 1) // (low - 1)
    return stride if stride >= 2 and stride & (stride - 1) == 0 else None


def _argmax_full(mask_logits: tf.Tensor, size: Sequence[int], method: str) -> tf.Tensor:
    """argmax over slots of the upsampled [B, h, w, N] logits: int32 [B, H, W]."""
    return tf.argmax(upsample_logits(mask_logits, size, method), axis=-1,
                     output_type=tf.int32)


# Rounding margin of the cell bounds, relative to the image's largest |logit| (+ |log p̂|):
# a 3-lerp bilinear value is within a few float32 ulps (~1e-7 relative) of its corners' hull.
_BOUND_MARGIN = 1e-5
# Relative slack of the confidence bounds for float32 rounding of exp and of the sums.
_SUM_SLACK = 1e-4
# Confidence bounds above this are not trusted to decide "confident" (exp underflow in the
# computed confidence would make it 0).
_HUGE = 1e30


def _count(values: tf.Tensor, size: tf.Tensor | int) -> tf.Tensor:
    """Occurrences of each of 0..size−1 in int32 ``values`` (all in range): int32 [size].

    `DenseBincount` with a fixed size (`tf.math.bincount` derives its size from the data,
    which XLA rejects); much faster than `unsorted_segment_sum` on CPU.
    """
    return tf.raw_ops.DenseBincount(input=values, size=size,
                                    weights=tf.zeros([0], tf.int32), binary_output=False)


def _segment(reduce: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], data: tf.Tensor,
             ids: tf.Tensor, num: tf.Tensor) -> tf.Tensor:
    """``reduce`` (a sorted `tf.math.segment_*`) of ``data`` rows by sorted ``ids`` into
    ``num`` rows; segments without rows give 0.

    Candidate pairs come from `tf.where` in row-major order, so their cell ids are sorted;
    the sorted segment reductions are ~2.5x faster than the unsorted ones on CPU.
    """
    out = reduce(data, ids)
    return tf.pad(out, [[0, num - tf.shape(out)[0]]] + [[0, 0]] * (data.shape.rank - 1))


def _kept_slots(kept: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Kept slots of each image in ascending slot order, padded to the batch's largest count.

    Returns index int32 [B, K] (K ≥ 1; padding entries are valid slot ids) and valid [B, K].
    Ascending order makes "lowest position" equal "lowest slot" for tie-breaking.
    """
    num_slots = int(kept.shape[-1])
    order = tf.range(num_slots, dtype=tf.int32)
    num_kept = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(kept, tf.int32), -1)), 1)
    index = tf.math.top_k(-tf.where(kept, order, order + num_slots), k=num_kept).indices
    return index, tf.gather(kept, index, batch_dims=1)


def _kept_logits(mask_logits: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                 offset: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[B, h, w, K] logits of the kept slots and their [B, K] offsets; padding gets _NEG.

    _NEG is exact under interpolation (a constant) and adds exp(_NEG − max) = 0 to sums.
    """
    # A one-hot matmul instead of a gather along the channel axis (2x faster on CPU);
    # exact for finite logits in float32 matmul: each output is x·1 plus zeros.
    shape = tf.shape(mask_logits)
    select = tf.one_hot(index, int(mask_logits.shape[-1]), dtype=mask_logits.dtype)

    def one_image() -> tf.Tensor:  # a plain matmul: ~30% faster on CPU than the batched one
        return tf.matmul(tf.reshape(mask_logits, [-1, shape[3]]), select[0],
                         transpose_b=True)[None]

    def batched() -> tf.Tensor:
        return tf.matmul(tf.reshape(mask_logits, [shape[0], -1, shape[3]]), select,
                         transpose_b=True)  # [B, h·w, K]

    batch = mask_logits.shape[0]
    if batch is None:  # e.g. the SavedModel's signatures (`serving_default` runs B = 1)
        low = tf.cond(tf.equal(shape[0], 1), one_image, batched)
    else:
        low = one_image() if batch == 1 else batched()
    # Padding exists only with B > 1 (or no kept slot): skip the masking pass otherwise.
    low = tf.cond(tf.reduce_all(valid), lambda: low,
                  lambda: tf.where(valid[:, None, :], low, _NEG))
    low = tf.reshape(low, tf.concat([shape[:3], tf.shape(index)[1:]], 0))
    return low, tf.where(valid, tf.gather(offset, index, batch_dims=1), _NEG)


def _kept_choice_dense(mask_logits: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                       offset: tf.Tensor, size: Sequence[int], method: str
                       ) -> tuple[tf.Tensor, tf.Tensor]:
    """ẑ = argmax over kept slots of up(logit) + offset, and its mask-ID confidence.

    Upsamples the K kept channels only. The confidence exp(v_ẑ − max_kept) / Σ_kept
    exp(v − max_kept) equals the static path's wherever the dominant slot is kept (there
    max_kept is the maximum over all slots); elsewhere it is not used.

    Returns int32 [B, H, W] slots, float32 [B, H, W] confidences.
    """
    low, off = _kept_logits(mask_logits, index, valid, offset)
    logits = upsample_logits(low, size, method)  # [B, H, W, K]
    scored = logits + off[:, None, None, :]
    position = tf.argmax(scored, axis=-1, output_type=tf.int32)
    max_kept = tf.reduce_max(logits, axis=-1, keepdims=True)
    kept_sum = tf.squeeze(tf.matmul(tf.exp(logits - max_kept),
                                    tf.cast(valid, tf.float32)[:, None, :, None]), -1)
    chosen_rel = (tf.reduce_max(scored, axis=-1) - tf.gather(off, position, batch_dims=1)
                  - max_kept[..., 0])
    return tf.gather(index, position, batch_dims=1), tf.exp(chosen_rel) / kept_sum


def _pixel_codes(dominant: tf.Tensor, chosen: tf.Tensor, confidence: tf.Tensor,
                 kept: tf.Tensor, pixel_threshold: float) -> tf.Tensor:
    """Per-pixel codes (module docstring) from dense maps: dominant slot a, ẑ, confidence."""
    num_slots = int(kept.shape[-1])
    dominant_kept = tf.gather(kept, dominant, batch_dims=1)
    e = tf.where(dominant_kept, tf.where(confidence > pixel_threshold, 1 + chosen,
                                         1 + num_slots + chosen), 0)
    image = tf.range(tf.shape(dominant)[0], dtype=tf.int32)[:, None, None]
    return (image * num_slots + dominant) * (2 * num_slots + 1) + e


def _lerp_corners(tl: tf.Tensor, tr: tf.Tensor, bl: tf.Tensor, br: tf.Tensor,
                  fx: tf.Tensor, fy: tf.Tensor) -> tf.Tensor:
    """`ResizeBilinear`'s arithmetic (top = tl + (tr − tl)·fx, ..., top + (bottom − top)·fy):
    with its exact weights r/s (power-of-two strides) the values are bit-identical to the
    full upsample's. The one place both per-cell and per-pixel samples are computed."""
    top = tl + (tr - tl) * fx
    bottom = bl + (br - bl) * fx
    return top + (bottom - top) * fy


def _bilinear_cells(corners: tf.Tensor, strides: tuple[int, int]) -> tf.Tensor:
    """[P, 4] corner values (tl, tr, bl, br) -> [P, sy·sx] align-corners samples of the cell.

    Computed with the pairs on the minor axis ([sy, sx, P]) and transposed at the end: the
    per-pair corner values then broadcast along whole contiguous rows (~1.7x faster on CPU
    than broadcasting them into [P, sy, sx]); same arithmetic, so the same bits.
    """
    sy, sx = strides
    fy = (tf.range(sy, dtype=tf.float32) / sy)[:, None, None]
    fx = (tf.range(sx, dtype=tf.float32) / sx)[:, None]
    values = _lerp_corners(*tf.unstack(tf.transpose(corners)), fx, fy)  # [sy, sx, P]
    return tf.transpose(tf.reshape(values, [sy * sx, -1]))


def _bilinear_pixels(corners: tf.Tensor, pixel: tf.Tensor, strides: tuple[int, int]
                     ) -> tf.Tensor:
    """[4, P, K] corner values + [P] pixel index in the cell (r·s_x + q) -> [P, K] samples.

    Corner-major, so that each corner is a contiguous slice (no copy to unstack it)."""
    sy, sx = strides
    fy = (tf.cast(pixel // sx, tf.float32) / sy)[:, None]
    fx = (tf.cast(pixel % sx, tf.float32) / sx)[:, None]
    return _lerp_corners(*(corners[i] for i in range(4)), fx, fy)


def _lowest_slot_at_max(value: tf.Tensor, slot: tf.Tensor, rows: tf.Tensor,
                        num_rows: tf.Tensor, none: tf.Tensor | int
                        ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row and pixel, the largest value over the row's pairs and the lowest slot with it
    (`tf.argmax`'s tie rule; pairs come in ascending slot order within a row).

    Args:
      value: [P, s] per-pair samples; slot: [P] int32 slot, or a key in the slots' order;
        rows: [P] sorted row of each pair; num_rows: rows of the output; none: a sentinel
        above every slot (key).

    Returns:
      [num_rows, s] maxima and [num_rows, s] int32 slots.
    """
    best = _segment(tf.math.segment_max, value, rows, num_rows)
    at_max = tf.cast(tf.equal(value, tf.gather(best, rows)), tf.int32)
    # `slot` where the maximum is attained, else `none`: an integer blend (~2x faster on CPU
    # than a select broadcasting the per-pair slot over the row).
    candidate = none - at_max * (none - slot)[:, None]
    return best, _segment(tf.math.segment_min, candidate, rows, num_rows)


def _true_pairs(condition: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(flat cell, channel) of the true entries of a [B, h, w, C] condition, in row-major
    order (so the cells are sorted): int32 [P] each.

    From the flat index: `tf.where` on the flattened condition writes one int64 per entry
    instead of four coordinates (~15% faster on CPU).
    """
    channels = tf.shape(condition)[-1]
    flat_index = tf.cast(tf.where(tf.reshape(condition, [-1]))[:, 0], tf.int32)
    cell = flat_index // channels
    return cell, flat_index - cell * channels


def _cell_codes(mask_logits: tf.Tensor, kept: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                offset: tf.Tensor, size: tuple[int, int], strides: tuple[int, int],
                pixel_threshold: float,
                dense_codes: Callable[[], tf.Tensor], max_pairs: int | None = None,
                zero_offsets: bool = False) -> tf.Tensor:
    """Per-pixel codes from exact low-resolution cell bounds (module docstring, *cells*).

    Cell (y, x) holds the output pixels (s_y·y + r, s_x·x + q), 0 ≤ r < s_y, 0 ≤ q < s_x,
    which interpolate the corners (y|y+1, x|x+1) of the logits (the last row/column:
    themselves). Per cell:

    1. dominant slot: the slot t with the largest logit at the top-left corner has its
       corner min as a lower bound M of the pixel maximum; slots whose corner max is
       < M − margin never win. A cell with one candidate is t throughout.
    2. ẑ (argmax over kept slots of logit + offset): the same with the offsets.
       With ``zero_offsets`` (deeplab2's rule) ẑ is the argmax of the logits over kept
       slots, i.e. the dominant slot wherever that one is kept (elsewhere ẑ is unused):
       step 2 then reuses step 1's candidates instead of searching the kept channels.
    3. confidence 1 / S, S = Σ_kept exp(v_k − v_ẑ): by convexity of log-sum-exp, at a pixel
       with bilinear weights w_c, S ≤ Σ_c w_c exp(LSE_c − L_ẑ,c) (LSE_c: the kept-slot
       log-sum-exp at corner c); and S ≥ the sum over the ẑ candidates alone.

    Cells whose dominant slot or ẑ is not unique, or whose confidence is not decided by the
    per-cell bound, are resolved per pixel from their candidate slots; pixels still open
    are computed over all kept slots of their cell. Above ``max_pairs`` candidate pairs
    (None: an eighth of cells × N) ``dense_codes`` is used instead.

    Args:
      mask_logits: [B, h, w, N]; kept: [B, N] bools; index, valid: `_kept_slots(kept)`;
        offset: [B, N] added to the logits
        for ẑ (log p̂ for the paper rule, 0 for deeplab2's); size: (H, W) with
        H − 1 = s_y·(h − 1), W − 1 = s_x·(w − 1); strides: (s_y, s_x), powers of two;
        zero_offsets: True iff ``offset`` is all zeros (deeplab2's rule).

    Returns:
      int32 [B, H, W] codes.
    """
    batch = tf.shape(mask_logits)[0]
    h, w, n = (int(d) for d in mask_logits.shape[1:])
    sy, sx = strides
    out_h, out_w = size
    per_image = h * w
    num_cells = batch * per_image
    num_codes = 2 * n + 1
    pixels = sy * sx
    num_kept = tf.shape(index)[1]

    # Offsets (in cells) of a cell's 4 corners; the last row/column repeats itself.
    step_x = np.where(np.arange(w) < w - 1, 1, 0)[None, :].repeat(h, 0)
    step_y = np.where(np.arange(h) < h - 1, w, 0)[:, None].repeat(w, 1)
    corner_step = tf.constant(np.stack([0 * step_x, step_x, step_y, step_x + step_y], -1)
                              .reshape(per_image, 4), tf.int32)  # [h·w, 4]
    cell_id = tf.reshape(tf.range(num_cells, dtype=tf.int32), [batch, h, w])
    cell_corner = cell_id[..., None] + tf.reshape(corner_step, [h, w, 4])  # [B, h, w, 4]

    corner_cells = tf.reshape(cell_corner, [-1, 4])  # flat cell -> its 4 corner cells

    def corners_of(values: tf.Tensor, channels: tf.Tensor | int, cells: tf.Tensor,
                   slots: tf.Tensor) -> tf.Tensor:
        """[P, 4] corner values of (flat cell, slot) pairs of a flat [cells·channels]."""
        return tf.gather(values, tf.gather(corner_cells, cells) * channels + slots[:, None])

    # 1. Dominant slot over all N slots.
    flat = tf.reshape(mask_logits, [-1])
    upper = tf.nn.max_pool2d(mask_logits, 2, 1, "SAME")  # corner max (SAME pads bottom/right)
    top = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)  # [B, h, w]
    top_corners = tf.gather(flat, cell_corner * n + top[..., None])  # [B, h, w, 4]
    scale = tf.maximum(tf.reduce_max(top_corners[..., 0], axis=[1, 2]),
                       -tf.reduce_min(mask_logits, axis=[1, 2, 3]))  # [B] max |logit|
    margin = _BOUND_MARGIN * (1.0 + tf.abs(scale))
    bound = tf.reduce_min(top_corners, -1) - margin[:, None, None]
    pair_cell, pair_slot = _true_pairs(upper >= bound[..., None])
    pair_kept = tf.gather(tf.reshape(kept, [-1]), pair_cell // per_image * n + pair_slot)
    mixed = _count(pair_cell, num_cells) > 1
    may_keep = _segment(tf.math.segment_max, tf.cast(pair_kept, tf.int32), pair_cell,
                        num_cells) > 0  # some kept slot may dominate

    # 2. ẑ over kept slots, ranked by logit + offset.
    low_k, off_k = _kept_logits(mask_logits, index, valid, offset)  # [B, h, w, K], [B, K]
    flat_k, off_flat = tf.reshape(low_k, [-1]), tf.reshape(off_k, [-1])
    off_scale = tf.reduce_max(tf.where(valid, tf.abs(off_k), 0.0), axis=-1)
    margin_k = _BOUND_MARGIN * (1.0 + tf.abs(scale) + off_scale)
    # Slot -> its position among the kept slots of its image (index order).
    position = tf.reshape(tf.cumsum(tf.cast(kept, tf.int32), axis=-1, exclusive=True), [-1])
    if zero_offsets:
        # ẑ = `top` where `top` is kept (the only cells where `first` is used, see
        # `cell_code`); the ẑ candidates of a cell are its kept dominant-slot candidates
        # (a cell where `top` is kept and not alone is `mixed`, so mixed_k adds nothing).
        first_slot = top
        first_corners = top_corners
        num_pairs_k = tf.reduce_sum(tf.cast(pair_kept, tf.int32))
        mixed_k = tf.zeros_like(may_keep)
        # Kept-slot log-sum-exp at each low-resolution pixel, shifted by the kept maximum
        # (`top` may be discarded here, and its logit far above every kept one).
        max_k = tf.reduce_max(low_k, -1, keepdims=True)
        lse = max_k[..., 0] + tf.math.log(tf.reduce_sum(tf.exp(low_k - max_k), -1))
    else:
        scored_k = low_k + off_k[:, None, None, :]
        # Pooling after the offset gives the same bits as before it (rounding is monotone).
        upper_k = tf.nn.max_pool2d(scored_k, 2, 1, "SAME")
        first = tf.argmax(scored_k, axis=-1, output_type=tf.int32)
        first_slot = tf.gather(index, first, batch_dims=1)
        first_corners = tf.gather(flat_k, cell_corner * num_kept + first[..., None])
        first_off = tf.gather(off_k, first, batch_dims=1)
        bound_k = tf.reduce_min(first_corners, -1) + first_off - margin_k[:, None, None]
        pair_k_cell, pair_k_pos = _true_pairs(valid[:, None, None, :]
                                              & (upper_k >= bound_k[..., None]))
        num_pairs_k = tf.shape(pair_k_cell)[0]
        mixed_k = _count(pair_k_cell, num_cells) > 1
        # Kept-slot log-sum-exp at each low-resolution pixel, shifted by the first slot's
        # logit (kept logits exceed it by at most the offsets' spread, |log p̂| ≤ 69: no
        # overflow).
        lse = first_corners[..., 0] + tf.math.log(
            tf.reduce_sum(tf.exp(low_k - first_corners[..., :1]), -1))  # [B, h, w]
    lse_flat = tf.reshape(lse, [-1])
    # Rounding slack of a confidence bound: values off by ≤ margin, sums by ≤ _SUM_SLACK.
    slack = tf.exp(2.0 * margin_k) * (1.0 + _SUM_SLACK)  # [B]
    # Cells with a unique ẑ (= first): S ≤ max over corners of exp(LSE_c − L_ẑ,c).
    cell_bound = tf.exp(tf.reduce_max(tf.gather(lse_flat, cell_corner) - first_corners, -1))
    sure = ((cell_bound * slack[:, None, None] * pixel_threshold < 1.0)
            & (cell_bound < _HUGE))
    may_keep = tf.reshape(may_keep, [batch, h, w])
    open_cell = (tf.reshape(mixed, [batch, h, w])
                 | (may_keep & (tf.reshape(mixed_k, [batch, h, w]) | ~sure)))
    # Settled cells: dominant `top` throughout; confident with ẑ = first if a kept slot can
    # dominate (then `top` is that kept slot), else void.
    cell_code = ((tf.range(batch)[:, None, None] * n + top) * num_codes
                 + tf.where(may_keep, 1 + first_slot, 0))
    # Pixels of each cell inside the image (the last cell row/column has one row/column).
    rows = (np.arange(h) * sy)[:, None, None, None] + np.arange(sy)[:, None]
    cols = (np.arange(w) * sx)[None, :, None, None] + np.arange(sx)
    inside_table = tf.constant(((rows < out_h) & (cols < out_w)).reshape(per_image, pixels))

    # Each pair costs ~20 float ops per output pixel of its cell; past ~N/8 pairs per cell the
    # dense path (a few passes over [B, H, W, N]) is cheaper (measured at 641², N = 128).
    limit = num_cells * n // 8 if max_pairs is None else max_pairs

    def open_cells() -> tf.Tensor:
        open_flat = tf.reshape(open_cell, [-1])
        cells = tf.where(open_flat)[:, 0]
        cells = tf.cast(cells, tf.int32)  # [Q]
        num_open = tf.size(cells)
        rank = tf.cumsum(tf.cast(open_flat, tf.int32), exclusive=True)  # cell -> row
        cell_image = cells // per_image
        # Dominant slot per pixel from the candidate pairs of open cells.
        sel = tf.gather(open_flat, pair_cell)
        d_cell, d_slot = tf.boolean_mask(pair_cell, sel), tf.boolean_mask(pair_slot, sel)
        d_row = tf.gather(rank, d_cell)
        d_corners = corners_of(flat, n, d_cell, d_slot)
        value = _bilinear_cells(d_corners, strides)  # [Pd, s]
        d_kept = tf.boolean_mask(pair_kept, sel)
        # Slots ranked by the key 2·slot + discarded: the same order, and the winner's key
        # carries its kept flag (no per-pixel lookup of the dominant slot's flag).
        dominant_value, dominant_key = _lowest_slot_at_max(
            value, 2 * d_slot + 1 - tf.cast(d_kept, tf.int32), d_row, num_open, 2 * n)
        dominant = dominant_key // 2
        dominant_kept = tf.equal(dominant_key % 2, 0)
        # ẑ per pixel from the kept candidates (open cells where a kept slot may dominate).
        if zero_offsets:
            # The kept dominant-slot candidates, already interpolated; ẑ is the dominant slot
            # where that one is kept (elsewhere unused).
            z_sel = tf.where(d_kept & tf.gather(tf.reshape(may_keep, [-1]), d_cell))[:, 0]
            z_cell, z_row = tf.gather(d_cell, z_sel), tf.gather(d_row, z_sel)
            z_slot = tf.gather(d_slot, z_sel)
            z_corners, z_value = tf.gather(d_corners, z_sel), tf.gather(value, z_sel)
            chosen_slot = dominant
            is_chosen = tf.equal(z_slot[:, None], tf.gather(dominant, z_row))
            chosen_value = dominant_value
        else:
            sel = tf.gather(open_flat & tf.reshape(may_keep, [-1]), pair_k_cell)
            z_cell = tf.boolean_mask(pair_k_cell, sel)
            z_pos = tf.boolean_mask(pair_k_pos, sel)
            z_row = tf.gather(rank, z_cell)
            z_corners = corners_of(flat_k, num_kept, z_cell, z_pos)
            z_value = _bilinear_cells(z_corners, strides)
            z_flat_pos = z_cell // per_image * num_kept + z_pos
            z_slot = tf.gather(tf.reshape(index, [-1]), z_flat_pos)
            z_scored = z_value + tf.gather(off_flat, z_flat_pos)[:, None]
            # Ranked by slot (the kept positions' order) so that the winner is its slot, not
            # a position to look up per pixel. (Open cells without kept candidates get 0s:
            # their pixels are void anyway.)
            chosen_slot = _lowest_slot_at_max(z_scored, z_slot, z_row, num_open, n)[1]
            is_chosen = tf.equal(z_slot[:, None], tf.gather(chosen_slot, z_row))
            chosen_value = _segment(tf.math.segment_max,
                                    tf.where(is_chosen, z_value, -np.inf), z_row, num_open)
        # Bounds of S = Σ_kept exp(v_k − v_ẑ): candidates' partial sum ≤ S ≤ Jensen bound.
        lower = _segment(tf.math.segment_sum, tf.exp(z_value - tf.gather(chosen_value, z_row)),
                         z_row, num_open)
        # (Exponents capped at 80: bounds stay finite — an inf corner would interpolate to
        # NaN — and above _HUGE, so never taken as decisive.)
        z_lse = tf.gather(lse_flat, tf.gather(corner_cells, z_cell))
        jensen = _bilinear_cells(tf.exp(tf.minimum(z_lse - z_corners, 80.0)), strides)
        upper_s = _segment(tf.math.segment_max, tf.where(is_chosen, jensen, -np.inf), z_row,
                           num_open)
        cell_slack = tf.gather(slack, cell_image)[:, None]
        bounded = (upper_s * cell_slack * pixel_threshold < 1.0) & (upper_s < _HUGE)
        surely_not = lower * pixel_threshold > cell_slack
        inside = tf.gather(inside_table, cells % per_image)
        undecided = dominant_kept & inside & ~bounded & ~surely_not
        exact_rows = tf.cast(tf.where(tf.reduce_any(undecided, -1))[:, 0], tf.int32)

        def exact_confidence() -> tf.Tensor:
            # The undecided pixels over all kept slots of their cell: the confidence as
            # `_kept_choice_dense`, computed per undecided pixel only (~5 per cell at 641²,
            # N = 128), not for the whole cell. A cell's kept logits are a contiguous row of
            # `low_k`, so each corner is one row copy rather than K element gathers.
            todo = tf.cast(tf.where(tf.gather(undecided, exact_rows)), tf.int32)  # [U, 2]
            row_pixel = tf.stack([tf.gather(exact_rows, todo[:, 0]), todo[:, 1]], 1)
            todo_cells = tf.gather(cells, row_pixel[:, 0])
            corners = tf.gather(tf.reshape(low_k, [-1, num_kept]),
                                tf.transpose(tf.gather(corner_cells, todo_cells)))  # [4, U, K]
            value = _bilinear_pixels(corners, todo[:, 1], strides)  # [U, K]
            max_kept = tf.reduce_max(value, axis=1)  # [U]
            kept_sum = tf.reduce_sum(tf.exp(value - max_kept[:, None]), axis=1)
            image = todo_cells // per_image
            pos = tf.gather(position, image * n + tf.gather_nd(chosen_slot, row_pixel))  # [U]
            v_chosen = tf.gather(value, pos, batch_dims=1)
            off = tf.gather(off_flat, image * num_kept + pos)
            conf = tf.exp((v_chosen + off) - off - max_kept) / kept_sum
            return tf.tensor_scatter_nd_update(bounded, row_pixel, conf > pixel_threshold)

        confident = tf.cond(tf.size(exact_rows) > 0, exact_confidence, lambda: bounded)
        e = tf.where(dominant_kept, tf.where(confident, 1 + chosen_slot,
                                             1 + n + chosen_slot), 0)
        codes = (cell_image[:, None] * n + dominant) * num_codes + e
        # Settled cells repeat their code; open cells get theirs per pixel (row scatter).
        table = tf.tensor_scatter_nd_update(
            tf.broadcast_to(tf.reshape(cell_code, [-1, 1]), [num_cells, pixels]),
            cells[:, None], codes)
        # [cells, s_y·s_x] = [B, h, w, s_y, s_x] -> output pixel (s_y·y + r, s_x·x + q): a
        # transpose (~2.5x faster than a gather of every pixel); the last cell row/column
        # holds one row/column of the image, so the overhang is cut off.
        table = tf.transpose(tf.reshape(table, [batch, h, w, sy, sx]), [0, 1, 3, 2, 4])
        return tf.reshape(table, [batch, h * sy, w * sx])[:, :out_h, :out_w]

    num_pairs = tf.shape(pair_cell)[0] + num_pairs_k
    return tf.cond(num_pairs <= limit, open_cells, dense_codes)


def _outputs_from_codes(codes: tf.Tensor, slot_class: tf.Tensor, slot_conf: tf.Tensor,
                        is_thing: tf.Tensor, thing_limit: int, stuff_limit: int,
                        label_divisor: int, label_offset: int, void_label: int,
                        count_method: str = "bincount") -> dict[str, tf.Tensor]:
    """Label maps from per-pixel codes: per-image tables over the codes, one gather each.

    Areas: a thing segment is the confident pixels of one ẑ (code e = 1 + ẑ), a stuff
    segment those of all ẑ of one stuff class; a segment below its limit becomes void.
    """
    batch = tf.shape(codes)[0]
    num_slots = int(slot_class.shape[-1])
    num_classes = int(is_thing.shape[0])
    num_codes = 2 * num_slots + 1
    total = batch * num_slots * num_codes
    flat_codes = tf.reshape(codes, [-1])
    if count_method == "bincount":
        counts = _count(flat_codes, total)
    else:
        counts = tf.math.unsorted_segment_sum(tf.ones_like(flat_codes), flat_codes, total)
    area = tf.reduce_sum(tf.reshape(counts, [batch, num_slots, num_codes]), 1)[
        :, 1:1 + num_slots]  # [B, N] confident pixels per ẑ
    slot_thing = tf.gather(is_thing, slot_class)  # [B, N]
    class_id = tf.range(batch)[:, None] * num_classes + slot_class
    stuff_area = tf.gather(tf.math.unsorted_segment_sum(
        tf.where(slot_thing, 0, area), class_id, batch * num_classes), class_id)
    survives = tf.where(slot_thing, area >= thing_limit, stuff_area >= stuff_limit)
    slot_id = tf.range(1, num_slots + 1)[None, :] + tf.zeros_like(slot_class)
    instance = tf.where(slot_thing & survives, slot_id, 0)
    label = slot_class + label_offset
    void = tf.fill(tf.shape(slot_class), void_label)
    zero = tf.zeros_like(slot_class)

    def per_code(void_value, confident, unconfident) -> tf.Tensor:  # [B, N] x3 -> [B, N, E]
        table = tf.concat([void_value[:, :1], confident, unconfident], axis=1)
        return tf.broadcast_to(table[:, None, :], [batch, num_slots, num_codes])

    def lookup(table: tf.Tensor) -> tf.Tensor:
        return tf.gather(tf.reshape(table, [-1]), codes)

    # The three label maps in one gather of [codes, 3] rows: TF's CPU gather copies one row
    # per index, so three columns cost about what one does (~2x faster than three gathers).
    labels = tf.stack([
        per_code(void, tf.where(survives, label * label_divisor + instance, void_label), void),
        tf.broadcast_to((slot_class + label_offset)[:, :, None], [batch, num_slots, num_codes]),
        per_code(zero, instance, zero)], axis=-1)
    panoptic, semantic, instance_map = tf.unstack(
        tf.gather(tf.reshape(labels, [-1, 3]), codes), axis=-1)
    return {
        "panoptic": panoptic,
        "semantic": semantic,
        "instance": instance_map,
        "mask_id": lookup(per_code(zero, slot_id, slot_id)),
        "class_confidence": lookup(per_code(tf.zeros_like(slot_conf), slot_conf, slot_conf)),
    }


def _validate(mask_logits: tf.Tensor, class_logits: tf.Tensor, is_thing: tf.Tensor,
              label_divisor: int, label_offset: int, void_label: int,
              class_threshold: float, pixel_threshold: float) -> None:
    if mask_logits.shape.rank != 4:
        raise ValueError(f"postprocess: outputs['mask_logits'] must be [B, h, w, N], got "
                         f"shape {mask_logits.shape}")
    if class_logits.shape.rank != 3:
        raise ValueError(f"postprocess: outputs['class_logits'] must be [B, N, C+1], got "
                         f"shape {class_logits.shape}")
    n, n2, c1 = mask_logits.shape[-1], class_logits.shape[1], class_logits.shape[-1]
    if n is None or c1 is None:
        raise ValueError("postprocess: the slot count N and class count C+1 must be static")
    if n2 is not None and n2 != n:
        raise ValueError(f"postprocess: mask_logits has N={n} slots but class_logits has {n2}")
    if is_thing.shape.as_list() != [c1 - 1]:
        raise ValueError(f"postprocess: is_thing must have one entry per non-void class "
                         f"(C={c1 - 1}), got shape {is_thing.shape}")
    if n + 1 > label_divisor:
        raise ValueError(f"postprocess: label_divisor={label_divisor} must exceed the largest "
                         f"instance id N={n}")
    if label_offset < 0:
        raise ValueError(f"postprocess: label_offset must be ≥ 0, got {label_offset}")
    if void_label >= 0 and void_label % label_divisor == 0 and (
            label_offset <= void_label // label_divisor < label_offset + c1 - 1):
        raise ValueError(f"postprocess: void_label={void_label} is also the panoptic value of "
                         f"stuff class {void_label // label_divisor - label_offset} with "
                         f"label_offset={label_offset}; use label_offset=1 (void 0) or "
                         f"void_label=-1")
    for name, value in (("class_threshold", class_threshold),
                        ("pixel_threshold", pixel_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"postprocess: {name} must be in [0, 1], got {value}")


def _paper_codes(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
                 image_size: Sequence[int] | None, resize_method: str,
                 pixel_threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-pixel codes and mask-ID confidences of ``rule="paper"`` (module docstring).

    `kept`: slots whose ĉ (over C + 1) is not ∅ and whose confidence reaches the class
    threshold; `slot_conf`: p̂_i(ĉ_i) over C + 1. All N channels at full resolution; static
    shapes (XLA-compatible).
    """
    if image_size is not None:
        mask_logits = upsample_logits(mask_logits, image_size, resize_method)
    num_slots = int(mask_logits.shape[-1])
    # Eq. 3 over all N: argmax_i p̂_i(ĉ_i)·m̂_i = argmax_i (log p̂_i(ĉ_i) + logit_i).
    scored = mask_logits + tf.math.log(tf.maximum(slot_conf, 1e-30))[:, None, None, :]
    chosen = tf.argmax(scored, axis=-1, output_type=tf.int32)
    dominant = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)
    # m̂_ẑ: the model's mask softmax over all N slots, read at ẑ.
    max_all = tf.reduce_max(mask_logits, axis=-1)
    chosen_logit = tf.gather(mask_logits, chosen[..., None], batch_dims=3)[..., 0]
    confidence = tf.exp(chosen_logit - max_all) / tf.reduce_sum(
        tf.exp(mask_logits - max_all[..., None]), axis=-1)
    e = tf.where(tf.gather(kept, chosen, batch_dims=1),
                 tf.where(confidence >= pixel_threshold, 1 + chosen, 1 + num_slots + chosen),
                 0)
    image = tf.range(tf.shape(chosen)[0], dtype=tf.int32)[:, None, None]
    return (image * num_slots + dominant) * (2 * num_slots + 1) + e, confidence


def _slot_maps_static(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
                      image_size: Sequence[int] | None, resize_method: str,
                      weight_masks_by_class_confidence: bool
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(ẑ, dominant slot, pixel confidence) on all N channels.

    Static shapes throughout (XLA). ẑ and the confidence are only meaningful where the
    dominant slot is kept.
    """
    if image_size is not None:
        mask_logits = upsample_logits(mask_logits, image_size, resize_method)

    # One pass over the full-resolution logits for the dominant slot a = argmax over all N
    # and its logit; everything else is read relative to it. A pixel whose dominant slot is
    # discarded is void (the reference requires max over all slots == max over kept slots),
    # so only pixels with a kept dominant slot need kept-slot quantities, and there the
    # kept-slot maximum *is* max_all. This avoids materialising masked copies of the
    # [B, H, W, N] tensor (the cost driver at 641², see benchmarks/bench_postprocess.py).
    max_all = tf.reduce_max(mask_logits, axis=-1, keepdims=True)  # [B, H, W, 1]
    argmax_all = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)  # [B, H, W]
    dominant_kept = tf.gather(kept, argmax_all, batch_dims=1)  # [B, H, W]
    # Σ_kept exp(logit − max_all): the kept-slot softmax normaliser; a matvec with the 0/1
    # kept vector instead of an elementwise mask.
    exp_rel = tf.exp(mask_logits - max_all)
    kept_sum = tf.squeeze(tf.matmul(exp_rel, tf.cast(kept, tf.float32)[:, None, :, None]),
                          -1)
    kept_sum = tf.where(dominant_kept, kept_sum, 1.0)  # ≥ 1 where used; avoids 0-division
    if weight_masks_by_class_confidence:
        # argmax_i p̂_i·m̂_i = argmax_i (log p̂_i + logit_i) over kept slots: m̂'s normaliser
        # is shared by all slots of a pixel.
        log_conf = tf.where(kept, tf.math.log(tf.maximum(slot_conf, 1e-30)), _NEG)
        scored = mask_logits + log_conf[:, None, None, :]
        mask_id = tf.argmax(scored, axis=-1, output_type=tf.int32)
        chosen_rel = (tf.reduce_max(scored, axis=-1) - tf.gather(log_conf, mask_id, batch_dims=1)
                      - max_all[..., 0])
        pixel_conf = tf.exp(chosen_rel) / kept_sum
    else:
        # deeplab2: ẑ = argmax of the mask logits over kept slots, which is the dominant slot
        # wherever that one is kept; its confidence is exp(0) / Σ_kept.
        mask_id = argmax_all
        pixel_conf = 1.0 / kept_sum
    return mask_id, argmax_all, pixel_conf


@gin.configurable(module="max_deeplab.inference", denylist=["outputs", "is_thing",
                                                             "image_size"])
def postprocess(
    outputs: Mapping[str, tf.Tensor],
    *,
    is_thing: Sequence[bool] | np.ndarray | tf.Tensor,
    image_size: Sequence[int] | None = None,
    class_threshold: float = 0.7,
    pixel_threshold: float = 0.4,
    thing_area_limit: float = 256,
    stuff_area_limit: float = 4096,
    area_limit_reference_size: int | None = 1025,
    label_divisor: int = 256,
    label_offset: int = 1,
    void_label: int = 0,
    weight_masks_by_class_confidence: bool = True,
    resize_method: str = "align_corners",
    dynamic_shapes: bool | None = None,
    rule: str = "kept_slots",
    count_method: str = "bincount",
) -> dict[str, tf.Tensor]:
    """Panoptic, semantic and instance maps from the model's output dict (paper §3.1).

    Args:
      outputs: the model's output dict (DESIGN.md §3); uses ``mask_logits [B, h, w, N]``
        (stride 4, not upsampled) and ``class_logits [B, N, C+1]`` (last index = void ∅).
      is_thing: [C] bools, True for thing classes (contiguous class order).
      image_size: (H, W) to upsample the mask logits to (bilinear, ``resize_method``);
        None keeps the logits' resolution.
      class_threshold: slots with p̂_i(ĉ_i) < this are void (kept iff ≥).
      pixel_threshold: "kept_slots": pixels with mask-ID confidence ≤ this are void (kept
        iff >); "paper": pixels with m̂_ẑ < this are void (kept iff ≥).
      thing_area_limit, stuff_area_limit: segments with fewer pixels become void; given
        at ``area_limit_reference_size``² input area and scaled to H·W (see
        `scaled_area_limit`), or absolute pixel counts if that is None. 0 disables.
      area_limit_reference_size: input side the limits are defined for (paper: 1025).
      label_divisor: panoptic = label * label_divisor + instance.
      label_offset: semantic label = contiguous class + label_offset (default 1, deeplab2's
        COCO label space); 0 with ``void_label=-1`` gives the data pipeline's encoding
        (contiguous class * label_divisor + instance, void/ignore −1).
      void_label: the ``panoptic`` value of void pixels (default 0); must not be a valid
        stuff label (so not 0 when label_offset is 0).
      weight_masks_by_class_confidence: ("kept_slots") True: ẑ = argmax_i p̂_i(ĉ_i)·m̂_i
        (paper §3.1); False: ẑ = argmax_i m̂_i over kept slots (deeplab2's "pixelwise"
        post-processing). The "paper" rule always weights.
      resize_method: "align_corners" (deeplab2) or "half_pixel" (TF2 `tf.image.resize`).
      dynamic_shapes: True: the cells or dense paths (module docstring; data-dependent
        shapes, faster); False: the static all-slot computation (XLA-compatible). None:
        static inside ``tf.function(jit_compile=True)``, dynamic otherwise. All give
        the same maps; confidences agree up to float32 rounding of the kept-slot sum, so
        a pixel whose confidence is within that rounding of ``pixel_threshold`` may be
        kept by one and voided by another. Ties in either argmax go to the lowest slot.
        ("kept_slots" only: the "paper" rule always computes on all N channels.)
      rule: "kept_slots" (default, the reference's) or "paper" (§3.1 literally): which
        slots compete in the pixel argmax and which confidence is thresholded; see the
        module docstring.
      count_method: "bincount" (default) or "segment_sum": how segment areas are counted
        (same result; TFLite lacks `DenseBincount`, the faster one on CPU).

    Returns:
      dict of
        ``panoptic`` int32 [B, H, W]: label * label_divisor + instance, ``void_label`` (0)
          for void; instance is slot + 1 for things, 0 for stuff.
        ``semantic`` int32 [B, H, W]: dense semantic prediction without any thresholding
          (class of the slot with the largest mask logit, + label_offset; never void), as
          the reference computes it for mIoU. The panoptic map's own semantic part is
          ``panoptic // label_divisor``.
        ``instance`` int32 [B, H, W]: ``panoptic % label_divisor``.
        ``mask_id`` int32 [B, H, W]: ẑ + 1 before the pixel-confidence and area filters;
          0 where the pixel's dominant slot (largest mask logit) is discarded ("paper":
          where slot ẑ is void).
        ``pixel_confidence`` float32 [B, H, W]: mask-ID confidence at ẑ (0 where mask_id 0).
        ``class_confidence`` float32 [B, H, W]: p̂_ẑ(ĉ_ẑ) (0 where mask_id is 0).
        ``segment_scores`` float32 [B, N]: p̂_i(ĉ_i) for kept slots, 0 for discarded ones.
        ``segment_classes`` int32 [B, N]: ĉ_i + label_offset per slot.
    """
    mask_logits = tf.convert_to_tensor(outputs["mask_logits"])
    class_logits = tf.convert_to_tensor(outputs["class_logits"])
    # A tensor is accepted too (e.g. when `tf.function` turned a bound array into an input).
    is_thing = tf.cast(tf.convert_to_tensor(is_thing), tf.bool)
    _validate(mask_logits, class_logits, is_thing, label_divisor, label_offset, void_label,
              class_threshold, pixel_threshold)
    num_slots = int(mask_logits.shape[-1])
    num_classes = int(class_logits.shape[-1]) - 1
    mask_logits = tf.cast(mask_logits, tf.float32)
    class_logits = tf.cast(class_logits, tf.float32)

    if rule not in RULES:
        raise ValueError(f"postprocess: rule must be one of {RULES}, got {rule!r}")
    if count_method not in COUNT_METHODS:
        raise ValueError(f"postprocess: count_method must be one of {COUNT_METHODS}, got "
                         f"{count_method!r}")
    # Per slot: class and its confidence among the non-void classes of the (C+1)-softmax.
    all_probs = tf.nn.softmax(class_logits, axis=-1)
    class_probs = all_probs[..., :num_classes]
    slot_class = tf.argmax(class_probs, axis=-1, output_type=tf.int32)  # [B, N]
    slot_conf = tf.reduce_max(class_probs, axis=-1)  # [B, N]
    kept = slot_conf >= class_threshold  # [B, N]
    if rule == "paper":
        # ĉ over all C + 1 classes: a slot whose argmax is ∅ is void; its confidence
        # p̂(∅) still weighs its masks in the pixel argmax.
        any_conf = tf.reduce_max(all_probs, axis=-1)
        kept = kept & (slot_conf >= any_conf)

    if image_size is not None and image_size[0] is not None:
        out_size = (int(image_size[0]), int(image_size[1]))
    else:
        out_size = (mask_logits.shape[1], mask_logits.shape[2])
    if None in out_size and area_limit_reference_size is not None:
        raise ValueError("postprocess: the output size must be static to scale the area "
                         "limits; pass image_size or area_limit_reference_size=None")
    if dynamic_shapes is None:
        dynamic_shapes = not in_xla_compilation()
    if rule == "paper":
        codes, confidence = _paper_codes(mask_logits, kept, any_conf, image_size,
                                         resize_method, pixel_threshold)
    elif dynamic_shapes and None not in out_size:
        # ẑ ranks kept slots by logit + offset: argmax_i p̂_i·m̂_i = argmax_i (log p̂_i +
        # logit_i) (paper), as m̂'s normaliser is shared by all slots of a pixel.
        offset = (tf.math.log(tf.maximum(slot_conf, 1e-30))
                  if weight_masks_by_class_confidence else tf.zeros_like(slot_conf))
        index, valid = _kept_slots(kept)
        h, w = mask_logits.shape[1], mask_logits.shape[2]
        strides = (None if resize_method != "align_corners" or None in (h, w)
                   or (h, w) == out_size else
                   (_candidate_stride(h, out_size[0]), _candidate_stride(w, out_size[1])))

        def dense() -> tuple[tf.Tensor, tf.Tensor]:
            chosen, confidence = _kept_choice_dense(mask_logits, index, valid, offset,
                                                    out_size, resize_method)
            dominant = _argmax_full(mask_logits, out_size, resize_method)
            return _pixel_codes(dominant, chosen, confidence, kept, pixel_threshold), confidence

        if strides is None or None in strides:
            codes, confidence = dense()
        else:
            codes = _cell_codes(mask_logits, kept, index, valid, offset, out_size, strides,
                                pixel_threshold, lambda: dense()[0],
                                zero_offsets=not weight_masks_by_class_confidence)
            # Only for the pixel_confidence output: graphs that do not fetch it skip this.
            confidence = _kept_choice_dense(mask_logits, index, valid, offset, out_size,
                                            resize_method)[1]
    else:
        chosen, dominant, confidence = _slot_maps_static(
            mask_logits, kept, slot_conf, image_size, resize_method,
            weight_masks_by_class_confidence)
        codes = _pixel_codes(dominant, chosen, confidence, kept, pixel_threshold)

    h_w = (int(out_size[0]), int(out_size[1]))
    result = _outputs_from_codes(
        codes, slot_class, slot_conf, is_thing,
        scaled_area_limit(thing_area_limit, h_w, area_limit_reference_size),
        scaled_area_limit(stuff_area_limit, h_w, area_limit_reference_size),
        label_divisor, label_offset, void_label, count_method)
    dominant_kept = codes % (2 * num_slots + 1) > 0
    result["pixel_confidence"] = tf.where(dominant_kept, confidence, 0.0)
    result["segment_scores"] = tf.where(kept, slot_conf, 0.0)
    result["segment_classes"] = slot_class + label_offset
    return result
