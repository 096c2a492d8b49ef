"""The *cells* path of the "kept_slots" rule: exact per-pixel codes (`slot_maps`) from
low-resolution bounds, for align-corners upsampling with power-of-two strides (e.g. 161 ->
641; the default outside XLA; paper §3.1, docs/design.md §5).

The bilinear upsample is, inside one stride cell, a convex combination of the cell's 4
corner logit vectors, which gives exact low-resolution bounds: a slot whose corner max is
below another slot's corner min (minus a rounding margin) never wins in that cell; and, the
log-sum-exp being convex, the kept-slot sum Σ_k exp(v_k − v_ẑ) at any pixel is at most the
bilinear interpolation of its values at the 4 corners (Jensen), and at least its partial sum
over the candidate slots. Only cells where these bounds leave the argmax or the threshold
open are interpolated, and only for their candidate slots — with `ResizeBilinear`'s own
arithmetic and exact weights r/s, so the values are bit-identical to the full upsample's;
confidences still open there are computed over all kept slots of the cell. Ties resolve to
the lowest slot (`tf.argmax`). When too many slots stay candidates (e.g. spatially
white-noise logits) the dense path runs instead.

`cell_codes` runs the stages in order:

1. `_dominant_candidates`: per cell, the slots that may have the largest mask logit;
2. `_chosen_candidates`: per cell, the kept slots that may be ẑ (largest logit + offset),
   and the kept-slot log-sum-exp at the cell corners;
3. `_settled_cells`: the cells decided at low resolution (one dominant slot, one ẑ, and a
   confidence bound on the right side of the threshold), with their code;
4. `_open_cell_codes`: the other cells per pixel — the dominant slot and ẑ from the
   interpolated candidates (`_pixel_dominant`, `_pixel_chosen`), the confidence from its
   bounds (`_confidence_bounds`) or, where they leave it open, exactly over all kept slots
   of the cell (`_exact_confidence`) — and every cell's codes laid out as the image.

Speed-ups of the choices below were measured on the development CPU at 641², N = 128; they
are listed in `benchmarks/bench_postprocess.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from max_deeplab.inference.slot_maps import count_codes, kept_logits

# Rounding margin of the cell bounds, relative to the image's largest |logit| (+ |log p̂|):
# a 3-lerp bilinear value is within a few float32 ulps (~1e-7 relative) of its corners' hull.
_BOUND_MARGIN = 1e-5
# Relative slack of the confidence bounds for float32 rounding of exp and of the sums.
_SUM_SLACK = 1e-4
# Confidence bounds above this are not trusted to decide "confident" (exp underflow in the
# computed confidence would make it 0).
_HUGE = 1e30


def candidate_stride(low: int, high: int) -> int | None:
    """Stride s with ``high − 1 = s·(low − 1)`` for a power-of-two s ≥ 2, else None.

    Only then are align-corners interpolation weights r/s exact in float32, so that a
    2x2-patch resize reproduces the full resize bit for bit.
    """
    if low < 2 or (high - 1) % (low - 1):
        return None
    stride = (high - 1) // (low - 1)
    return stride if stride >= 2 and stride & (stride - 1) == 0 else None


def _segment(reduce: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], data: tf.Tensor,
             ids: tf.Tensor, num: tf.Tensor) -> tf.Tensor:
    """``reduce`` (a sorted `tf.math.segment_*`) of ``data`` rows by sorted ``ids`` into
    ``num`` rows; segments without rows give 0.

    Candidate pairs come from `tf.where` in row-major order, so their cell ids are sorted;
    the sorted segment reductions are faster than the unsorted ones on CPU.
    """
    out = reduce(data, ids)
    return tf.pad(out, [[0, num - tf.shape(out)[0]]] + [[0, 0]] * (data.shape.rank - 1))


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
    per-pair corner values then broadcast along whole contiguous rows (faster on CPU than
    broadcasting them into [P, sy, sx]); same arithmetic, so the same bits.
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
    # `slot` where the maximum is attained, else `none`: an integer blend (faster on CPU than
    # a select broadcasting the per-pair slot over the row).
    candidate = none - at_max * (none - slot)[:, None]
    return best, _segment(tf.math.segment_min, candidate, rows, num_rows)


def _true_pairs(condition: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(flat cell, channel) of the true entries of a [B, h, w, C] condition, in row-major
    order (so the cells are sorted): int32 [P] each.

    From the flat index: `tf.where` on the flattened condition writes one int64 per entry
    instead of four coordinates (faster on CPU).
    """
    channels = tf.shape(condition)[-1]
    flat_index = tf.cast(tf.where(tf.reshape(condition, [-1]))[:, 0], tf.int32)
    cell = flat_index // channels
    return cell, flat_index - cell * channels

class _Grid(NamedTuple):
    """The stride cells of a batch: cell (y, x) of image b is flat cell (b·h + y)·w + x and
    holds the output pixels (s_y·y + r, s_x·x + q), 0 ≤ r < s_y, 0 ≤ q < s_x, which
    interpolate its corners (y|y+1, x|x+1) (the last row/column: themselves)."""

    batch: tf.Tensor
    h: int
    w: int
    n: int
    strides: tuple[int, int]
    size: tuple[int, int]
    per_image: int
    num_cells: tf.Tensor
    num_codes: int
    pixels: int
    cell_corner: tf.Tensor  # [B, h, w, 4] flat cells of each cell's 4 corners
    corner_cells: tf.Tensor  # [cells, 4] the same, by flat cell
    inside_table: tf.Tensor  # [h·w, s_y·s_x] pixels of each cell inside the image


def _grid(mask_logits: tf.Tensor, size: tuple[int, int], strides: tuple[int, int]) -> _Grid:
    batch = tf.shape(mask_logits)[0]
    h, w, n = (int(d) for d in mask_logits.shape[1:])
    sy, sx = strides
    out_h, out_w = size
    per_image = h * w
    num_cells = batch * per_image
    # Offsets (in cells) of a cell's 4 corners; the last row/column repeats itself.
    step_x = np.where(np.arange(w) < w - 1, 1, 0)[None, :].repeat(h, 0)
    step_y = np.where(np.arange(h) < h - 1, w, 0)[:, None].repeat(w, 1)
    corner_step = tf.constant(np.stack([0 * step_x, step_x, step_y, step_x + step_y], -1)
                              .reshape(per_image, 4), tf.int32)  # [h·w, 4]
    cell_id = tf.reshape(tf.range(num_cells, dtype=tf.int32), [batch, h, w])
    cell_corner = cell_id[..., None] + tf.reshape(corner_step, [h, w, 4])  # [B, h, w, 4]
    # Pixels of each cell inside the image (the last cell row/column has one row/column).
    rows = (np.arange(h) * sy)[:, None, None, None] + np.arange(sy)[:, None]
    cols = (np.arange(w) * sx)[None, :, None, None] + np.arange(sx)
    inside_table = tf.constant(((rows < out_h) & (cols < out_w)).reshape(per_image, sy * sx))
    return _Grid(batch=batch, h=h, w=w, n=n, strides=(sy, sx), size=(out_h, out_w),
                 per_image=per_image, num_cells=num_cells, num_codes=2 * n + 1,
                 pixels=sy * sx, cell_corner=cell_corner,
                 corner_cells=tf.reshape(cell_corner, [-1, 4]), inside_table=inside_table)


def _corners_of(grid: _Grid, values: tf.Tensor, channels: tf.Tensor | int, cells: tf.Tensor,
                slots: tf.Tensor) -> tf.Tensor:
    """[P, 4] corner values of (flat cell, slot) pairs of a flat [cells·channels]."""
    return tf.gather(values, tf.gather(grid.corner_cells, cells) * channels + slots[:, None])


class _DominantCandidates(NamedTuple):
    """Stage 1: the slots that may have the largest mask logit somewhere in each cell."""

    flat: tf.Tensor  # the mask logits, flat
    top: tf.Tensor  # [B, h, w] slot with the largest logit at the top-left corner
    top_corners: tf.Tensor  # [B, h, w, 4] its corner logits
    scale: tf.Tensor  # [B] largest |logit| of each image
    pair_cell: tf.Tensor  # [P] candidate (cell, slot) pairs, cells sorted
    pair_slot: tf.Tensor
    pair_kept: tf.Tensor  # [P] whether the pair's slot is kept
    mixed: tf.Tensor  # [cells] more than one candidate
    may_keep: tf.Tensor  # [cells] some kept slot may dominate


def _dominant_candidates(mask_logits: tf.Tensor, kept: tf.Tensor, grid: _Grid
                         ) -> _DominantCandidates:
    """The slot t with the largest logit at a cell's top-left corner has its corner min as a
    lower bound M of the pixel maximum; slots whose corner max is < M − margin never win.
    A cell with one candidate is t throughout."""
    n = grid.n
    flat = tf.reshape(mask_logits, [-1])
    upper = tf.nn.max_pool2d(mask_logits, 2, 1, "SAME")  # corner max (SAME pads bottom/right)
    top = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)  # [B, h, w]
    top_corners = tf.gather(flat, grid.cell_corner * n + top[..., None])  # [B, h, w, 4]
    scale = tf.maximum(tf.reduce_max(top_corners[..., 0], axis=[1, 2]),
                       -tf.reduce_min(mask_logits, axis=[1, 2, 3]))  # [B] max |logit|
    margin = _BOUND_MARGIN * (1.0 + tf.abs(scale))
    bound = tf.reduce_min(top_corners, -1) - margin[:, None, None]
    pair_cell, pair_slot = _true_pairs(upper >= bound[..., None])
    pair_kept = tf.gather(tf.reshape(kept, [-1]), pair_cell // grid.per_image * n + pair_slot)
    mixed = count_codes(pair_cell, grid.num_cells) > 1
    may_keep = _segment(tf.math.segment_max, tf.cast(pair_kept, tf.int32), pair_cell,
                        grid.num_cells) > 0  # some kept slot may dominate
    return _DominantCandidates(flat=flat, top=top, top_corners=top_corners, scale=scale,
                               pair_cell=pair_cell, pair_slot=pair_slot, pair_kept=pair_kept,
                               mixed=mixed, may_keep=may_keep)


class _ChosenCandidates(NamedTuple):
    """Stage 2: the kept slots that may be ẑ in each cell, and the kept-slot log-sum-exp."""

    low_k: tf.Tensor  # [B, h, w, K] kept-slot logits
    flat_k: tf.Tensor
    off_flat: tf.Tensor  # [B·K] their offsets
    num_kept: tf.Tensor  # K
    margin_k: tf.Tensor  # [B] rounding margin of bounds on logit + offset
    position: tf.Tensor  # [B·N] slot -> its position among its image's kept slots
    first_slot: tf.Tensor  # [B, h, w] ẑ at the top-left corner
    first_corners: tf.Tensor  # [B, h, w, 4] its corner logits
    num_pairs_k: tf.Tensor  # candidate (cell, kept position) pairs
    pair_k_cell: tf.Tensor | None  # [P_k] those pairs (None with zero offsets: stage 1's)
    pair_k_pos: tf.Tensor | None
    mixed_k: tf.Tensor  # [cells] more than one ẑ candidate
    lse_flat: tf.Tensor  # [B·h·w] kept-slot log-sum-exp at each low-resolution pixel


def _chosen_candidates(mask_logits: tf.Tensor, kept: tf.Tensor, index: tf.Tensor,
                       valid: tf.Tensor, offset: tf.Tensor, grid: _Grid,
                       dominant: _DominantCandidates, zero_offsets: bool) -> _ChosenCandidates:
    """ẑ (argmax over kept slots of logit + offset): the same bound as stage 1 with the
    offsets. With ``zero_offsets`` (deeplab2's rule) ẑ is the argmax of the logits over kept
    slots, i.e. the dominant slot wherever that one is kept (elsewhere ẑ is unused): the
    candidates are then stage 1's kept ones instead of a search of the kept channels."""
    low_k, off_k = kept_logits(mask_logits, index, valid, offset)  # [B, h, w, K], [B, K]
    num_kept = tf.shape(index)[1]
    flat_k, off_flat = tf.reshape(low_k, [-1]), tf.reshape(off_k, [-1])
    off_scale = tf.reduce_max(tf.where(valid, tf.abs(off_k), 0.0), axis=-1)
    margin_k = _BOUND_MARGIN * (1.0 + tf.abs(dominant.scale) + off_scale)
    # Slot -> its position among the kept slots of its image (index order).
    position = tf.reshape(tf.cumsum(tf.cast(kept, tf.int32), axis=-1, exclusive=True), [-1])
    pair_k_cell = pair_k_pos = None
    if zero_offsets:
        # ẑ = `top` where `top` is kept (the only cells where `first` is used, see
        # `_settled_cells`); the ẑ candidates of a cell are its kept dominant-slot
        # candidates (a cell where `top` is kept and not alone is `mixed`, so mixed_k adds
        # nothing).
        first_slot = dominant.top
        first_corners = dominant.top_corners
        num_pairs_k = tf.reduce_sum(tf.cast(dominant.pair_kept, tf.int32))
        mixed_k = tf.zeros_like(dominant.may_keep)
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
        first_corners = tf.gather(flat_k, grid.cell_corner * num_kept + first[..., None])
        first_off = tf.gather(off_k, first, batch_dims=1)
        bound_k = tf.reduce_min(first_corners, -1) + first_off - margin_k[:, None, None]
        pair_k_cell, pair_k_pos = _true_pairs(valid[:, None, None, :]
                                              & (upper_k >= bound_k[..., None]))
        num_pairs_k = tf.shape(pair_k_cell)[0]
        mixed_k = count_codes(pair_k_cell, grid.num_cells) > 1
        # Kept-slot log-sum-exp at each low-resolution pixel, shifted by the first slot's
        # logit (kept logits exceed it by at most the offsets' spread, |log p̂| ≤ 69: no
        # overflow).
        lse = first_corners[..., 0] + tf.math.log(
            tf.reduce_sum(tf.exp(low_k - first_corners[..., :1]), -1))  # [B, h, w]
    return _ChosenCandidates(low_k=low_k, flat_k=flat_k, off_flat=off_flat, num_kept=num_kept,
                             margin_k=margin_k, position=position, first_slot=first_slot,
                             first_corners=first_corners, num_pairs_k=num_pairs_k,
                             pair_k_cell=pair_k_cell, pair_k_pos=pair_k_pos, mixed_k=mixed_k,
                             lse_flat=tf.reshape(lse, [-1]))


class _SettledCells(NamedTuple):
    """Stage 3: which cells are decided at low resolution, and every cell's code as if it
    were (open cells get theirs per pixel in stage 4)."""

    slack: tf.Tensor  # [B] rounding slack of a confidence bound
    may_keep: tf.Tensor  # [B, h, w]
    open_cell: tf.Tensor  # [B, h, w]
    cell_code: tf.Tensor  # [B, h, w]


def _settled_cells(grid: _Grid, dominant: _DominantCandidates, chosen: _ChosenCandidates,
                   pixel_threshold: float) -> _SettledCells:
    """A cell is settled when it has one dominant slot and one ẑ and its confidence bound
    1 / S, S = Σ_kept exp(v_k − v_ẑ) ≤ max over corners of exp(LSE_c − L_ẑ,c) (convexity
    of log-sum-exp), decides the threshold."""
    batch, h, w = grid.batch, grid.h, grid.w
    # Rounding slack of a confidence bound: values off by ≤ margin, sums by ≤ _SUM_SLACK.
    slack = tf.exp(2.0 * chosen.margin_k) * (1.0 + _SUM_SLACK)  # [B]
    # Cells with a unique ẑ (= first): S ≤ max over corners of exp(LSE_c − L_ẑ,c).
    cell_bound = tf.exp(tf.reduce_max(tf.gather(chosen.lse_flat, grid.cell_corner)
                                      - chosen.first_corners, -1))
    sure = ((cell_bound * slack[:, None, None] * pixel_threshold < 1.0)
            & (cell_bound < _HUGE))
    may_keep = tf.reshape(dominant.may_keep, [batch, h, w])
    open_cell = (tf.reshape(dominant.mixed, [batch, h, w])
                 | (may_keep & (tf.reshape(chosen.mixed_k, [batch, h, w]) | ~sure)))
    # Settled cells: dominant `top` throughout; confident with ẑ = first if a kept slot can
    # dominate (then `top` is that kept slot), else void.
    cell_code = ((tf.range(batch)[:, None, None] * grid.n + dominant.top) * grid.num_codes
                 + tf.where(may_keep, 1 + chosen.first_slot, 0))
    return _SettledCells(slack=slack, may_keep=may_keep, open_cell=open_cell,
                         cell_code=cell_code)


class _OpenCells(NamedTuple):
    """The open cells, one row each in stage 4's per-pixel tensors."""

    cells: tf.Tensor  # [Q] their flat cells
    num_open: tf.Tensor
    rank: tf.Tensor  # [cells] flat cell -> its row
    cell_image: tf.Tensor  # [Q] their image


class _PixelDominant(NamedTuple):
    """Per open cell and pixel: the dominant slot, from the interpolated candidates."""

    d_cell: tf.Tensor  # [Pd] the candidate pairs of open cells
    d_slot: tf.Tensor
    d_row: tf.Tensor
    d_corners: tf.Tensor  # [Pd, 4]
    d_kept: tf.Tensor
    value: tf.Tensor  # [Pd, s] interpolated logits
    dominant_value: tf.Tensor  # [Q, s]
    dominant: tf.Tensor  # [Q, s] slot
    dominant_kept: tf.Tensor  # [Q, s]


def _pixel_dominant(grid: _Grid, dominant: _DominantCandidates, open_cells: _OpenCells,
                    open_flat: tf.Tensor) -> _PixelDominant:
    sel = tf.gather(open_flat, dominant.pair_cell)
    d_cell = tf.boolean_mask(dominant.pair_cell, sel)
    d_slot = tf.boolean_mask(dominant.pair_slot, sel)
    d_row = tf.gather(open_cells.rank, d_cell)
    d_corners = _corners_of(grid, dominant.flat, grid.n, d_cell, d_slot)
    value = _bilinear_cells(d_corners, grid.strides)  # [Pd, s]
    d_kept = tf.boolean_mask(dominant.pair_kept, sel)
    # Slots ranked by the key 2·slot + discarded: the same order, and the winner's key
    # carries its kept flag (no per-pixel lookup of the dominant slot's flag).
    dominant_value, dominant_key = _lowest_slot_at_max(
        value, 2 * d_slot + 1 - tf.cast(d_kept, tf.int32), d_row, open_cells.num_open,
        2 * grid.n)
    return _PixelDominant(d_cell=d_cell, d_slot=d_slot, d_row=d_row, d_corners=d_corners,
                          d_kept=d_kept, value=value, dominant_value=dominant_value,
                          dominant=dominant_key // 2,
                          dominant_kept=tf.equal(dominant_key % 2, 0))


class _PixelChosen(NamedTuple):
    """Per open cell and pixel: ẑ, from the interpolated kept candidates."""

    z_cell: tf.Tensor  # [Pz] the ẑ candidate pairs of open cells
    z_row: tf.Tensor
    z_corners: tf.Tensor  # [Pz, 4]
    z_value: tf.Tensor  # [Pz, s] interpolated logits
    chosen_slot: tf.Tensor  # [Q, s]
    is_chosen: tf.Tensor  # [Pz, s] whether the pair's slot is ẑ at the pixel
    chosen_value: tf.Tensor  # [Q, s] ẑ's logit


def _pixel_chosen(grid: _Grid, index: tf.Tensor, chosen: _ChosenCandidates,
                  settled: _SettledCells, open_cells: _OpenCells, open_flat: tf.Tensor,
                  pixel_dominant: _PixelDominant, zero_offsets: bool) -> _PixelChosen:
    """ẑ per pixel from the kept candidates (open cells where a kept slot may dominate)."""
    if zero_offsets:
        # The kept dominant-slot candidates, already interpolated; ẑ is the dominant slot
        # where that one is kept (elsewhere unused).
        d = pixel_dominant
        z_sel = tf.where(d.d_kept & tf.gather(tf.reshape(settled.may_keep, [-1]),
                                              d.d_cell))[:, 0]
        z_cell, z_row = tf.gather(d.d_cell, z_sel), tf.gather(d.d_row, z_sel)
        z_slot = tf.gather(d.d_slot, z_sel)
        z_corners, z_value = tf.gather(d.d_corners, z_sel), tf.gather(d.value, z_sel)
        chosen_slot = d.dominant
        is_chosen = tf.equal(z_slot[:, None], tf.gather(d.dominant, z_row))
        chosen_value = d.dominant_value
    else:
        num_open = open_cells.num_open
        sel = tf.gather(open_flat & tf.reshape(settled.may_keep, [-1]), chosen.pair_k_cell)
        z_cell = tf.boolean_mask(chosen.pair_k_cell, sel)
        z_pos = tf.boolean_mask(chosen.pair_k_pos, sel)
        z_row = tf.gather(open_cells.rank, z_cell)
        z_corners = _corners_of(grid, chosen.flat_k, chosen.num_kept, z_cell, z_pos)
        z_value = _bilinear_cells(z_corners, grid.strides)
        z_flat_pos = z_cell // grid.per_image * chosen.num_kept + z_pos
        z_slot = tf.gather(tf.reshape(index, [-1]), z_flat_pos)
        z_scored = z_value + tf.gather(chosen.off_flat, z_flat_pos)[:, None]
        # Ranked by slot (the kept positions' order) so that the winner is its slot, not
        # a position to look up per pixel. (Open cells without kept candidates get 0s:
        # their pixels are void anyway.)
        chosen_slot = _lowest_slot_at_max(z_scored, z_slot, z_row, num_open, grid.n)[1]
        is_chosen = tf.equal(z_slot[:, None], tf.gather(chosen_slot, z_row))
        chosen_value = _segment(tf.math.segment_max,
                                tf.where(is_chosen, z_value, -np.inf), z_row, num_open)
    return _PixelChosen(z_cell=z_cell, z_row=z_row, z_corners=z_corners, z_value=z_value,
                        chosen_slot=chosen_slot, is_chosen=is_chosen,
                        chosen_value=chosen_value)


def _confidence_bounds(grid: _Grid, chosen: _ChosenCandidates, settled: _SettledCells,
                       open_cells: _OpenCells, pixel_chosen: _PixelChosen,
                       pixel_threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """(confident by the upper bound, confident by neither bound) per open pixel: the
    bounds of S = Σ_kept exp(v_k − v_ẑ), candidates' partial sum ≤ S ≤ Jensen bound."""
    p = pixel_chosen
    num_open = open_cells.num_open
    lower = _segment(tf.math.segment_sum,
                     tf.exp(p.z_value - tf.gather(p.chosen_value, p.z_row)), p.z_row,
                     num_open)
    # (Exponents capped at 80: bounds stay finite — an inf corner would interpolate to
    # NaN — and above _HUGE, so never taken as decisive.)
    z_lse = tf.gather(chosen.lse_flat, tf.gather(grid.corner_cells, p.z_cell))
    jensen = _bilinear_cells(tf.exp(tf.minimum(z_lse - p.z_corners, 80.0)), grid.strides)
    upper_s = _segment(tf.math.segment_max, tf.where(p.is_chosen, jensen, -np.inf), p.z_row,
                       num_open)
    cell_slack = tf.gather(settled.slack, open_cells.cell_image)[:, None]
    bounded = (upper_s * cell_slack * pixel_threshold < 1.0) & (upper_s < _HUGE)
    surely_not = lower * pixel_threshold > cell_slack
    return bounded, surely_not


def _exact_confidence(grid: _Grid, chosen: _ChosenCandidates, open_cells: _OpenCells,
                      chosen_slot: tf.Tensor, bounded: tf.Tensor, exact_rows: tf.Tensor,
                      undecided: tf.Tensor, pixel_threshold: float) -> tf.Tensor:
    """`bounded` with the undecided pixels decided over all kept slots of their cell: the
    confidence as `slot_maps.kept_choice_dense`, computed per undecided pixel only, not
    for the whole cell. A cell's kept logits are a contiguous row of `low_k`, so each
    corner is one row copy rather than K element gathers."""
    num_kept, n = chosen.num_kept, grid.n
    todo = tf.cast(tf.where(tf.gather(undecided, exact_rows)), tf.int32)  # [U, 2]
    row_pixel = tf.stack([tf.gather(exact_rows, todo[:, 0]), todo[:, 1]], 1)
    todo_cells = tf.gather(open_cells.cells, row_pixel[:, 0])
    corners = tf.gather(tf.reshape(chosen.low_k, [-1, num_kept]),
                        tf.transpose(tf.gather(grid.corner_cells, todo_cells)))  # [4, U, K]
    value = _bilinear_pixels(corners, todo[:, 1], grid.strides)  # [U, K]
    max_kept = tf.reduce_max(value, axis=1)  # [U]
    kept_sum = tf.reduce_sum(tf.exp(value - max_kept[:, None]), axis=1)
    image = todo_cells // grid.per_image
    pos = tf.gather(chosen.position, image * n + tf.gather_nd(chosen_slot, row_pixel))  # [U]
    v_chosen = tf.gather(value, pos, batch_dims=1)
    off = tf.gather(chosen.off_flat, image * num_kept + pos)
    conf = tf.exp((v_chosen + off) - off - max_kept) / kept_sum
    return tf.tensor_scatter_nd_update(bounded, row_pixel, conf > pixel_threshold)


def _open_cell_codes(grid: _Grid, index: tf.Tensor, dominant: _DominantCandidates,
                     chosen: _ChosenCandidates, settled: _SettledCells,
                     pixel_threshold: float, zero_offsets: bool) -> tf.Tensor:
    """Stage 4: the codes of the open cells' pixels, and every cell's laid out as the
    image: int32 [B, H, W]."""
    n, num_codes = grid.n, grid.num_codes
    open_flat = tf.reshape(settled.open_cell, [-1])
    cells = tf.cast(tf.where(open_flat)[:, 0], tf.int32)  # [Q]
    open_cells = _OpenCells(cells=cells, num_open=tf.size(cells),
                            rank=tf.cumsum(tf.cast(open_flat, tf.int32), exclusive=True),
                            cell_image=cells // grid.per_image)
    pixel_dominant = _pixel_dominant(grid, dominant, open_cells, open_flat)
    pixel_chosen = _pixel_chosen(grid, index, chosen, settled, open_cells, open_flat,
                                 pixel_dominant, zero_offsets)
    bounded, surely_not = _confidence_bounds(grid, chosen, settled, open_cells, pixel_chosen,
                                             pixel_threshold)
    inside = tf.gather(grid.inside_table, cells % grid.per_image)
    undecided = pixel_dominant.dominant_kept & inside & ~bounded & ~surely_not
    exact_rows = tf.cast(tf.where(tf.reduce_any(undecided, -1))[:, 0], tf.int32)
    chosen_slot = pixel_chosen.chosen_slot
    confident = tf.cond(
        tf.size(exact_rows) > 0,
        lambda: _exact_confidence(grid, chosen, open_cells, chosen_slot, bounded, exact_rows,
                                  undecided, pixel_threshold),
        lambda: bounded)
    e = tf.where(pixel_dominant.dominant_kept,
                 tf.where(confident, 1 + chosen_slot, 1 + n + chosen_slot), 0)
    codes = (open_cells.cell_image[:, None] * n + pixel_dominant.dominant) * num_codes + e
    # Settled cells repeat their code; open cells get theirs per pixel (row scatter).
    table = tf.tensor_scatter_nd_update(
        tf.broadcast_to(tf.reshape(settled.cell_code, [-1, 1]), [grid.num_cells, grid.pixels]),
        cells[:, None], codes)
    # [cells, s_y·s_x] = [B, h, w, s_y, s_x] -> output pixel (s_y·y + r, s_x·x + q): a
    # transpose (faster than a gather of every pixel); the last cell row/column holds one
    # row/column of the image, so the overhang is cut off.
    sy, sx = grid.strides
    table = tf.transpose(tf.reshape(table, [grid.batch, grid.h, grid.w, sy, sx]),
                         [0, 1, 3, 2, 4])
    out_h, out_w = grid.size
    return tf.reshape(table, [grid.batch, grid.h * sy, grid.w * sx])[:, :out_h, :out_w]


def cell_codes(mask_logits: tf.Tensor, kept: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
               offset: tf.Tensor, size: tuple[int, int], strides: tuple[int, int],
               pixel_threshold: float, dense_codes: Callable[[], tf.Tensor],
               max_pairs: int | None = None, zero_offsets: bool = False) -> tf.Tensor:
    """Per-pixel codes from exact low-resolution cell bounds (the module's stages 1-4).

    Above ``max_pairs`` candidate pairs (None: an eighth of cells × N) ``dense_codes`` is
    used instead: each pair costs ~20 float ops per output pixel of its cell, and past ~N/8
    pairs per cell the dense path (a few passes over [B, H, W, N]) is the cheaper one.

    Args:
      mask_logits: [B, h, w, N]; kept: [B, N] bools; index, valid:
        `slot_maps.kept_slots(kept)`; offset: [B, N] added to the logits for ẑ (log p̂ for
        the paper's weighting, 0 for deeplab2's); size: (H, W) with H − 1 = s_y·(h − 1),
        W − 1 = s_x·(w − 1); strides: (s_y, s_x), powers of two (`candidate_stride`);
        zero_offsets: True iff ``offset`` is all zeros (deeplab2's rule).

    Returns:
      int32 [B, H, W] codes.
    """
    grid = _grid(mask_logits, size, strides)
    dominant = _dominant_candidates(mask_logits, kept, grid)
    chosen = _chosen_candidates(mask_logits, kept, index, valid, offset, grid, dominant,
                                zero_offsets)
    settled = _settled_cells(grid, dominant, chosen, pixel_threshold)
    limit = grid.num_cells * grid.n // 8 if max_pairs is None else max_pairs
    num_pairs = tf.shape(dominant.pair_cell)[0] + chosen.num_pairs_k
    return tf.cond(num_pairs <= limit,
                   lambda: _open_cell_codes(grid, index, dominant, chosen, settled,
                                            pixel_threshold, zero_offsets),
                   dense_codes)
