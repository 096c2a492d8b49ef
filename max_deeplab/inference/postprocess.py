"""Panoptic post-processing of MaX-DeepLab outputs (paper §3.1, DESIGN.md §5).

The model predicts N (mask, class) pairs. Inference turns them into a non-overlapping
panoptic map with two argmaxes:

* per mask slot i: ĉ_i = argmax_c p̂_i(c) over the C non-void classes; the slot is *kept* iff
  its class confidence p̂_i(ĉ_i) ≥ ``class_threshold`` (0.7), otherwise it is void;
* per pixel: ẑ_hw = argmax over kept slots i of p̂_i(ĉ_i)·m̂_i,hw (paper), or of m̂_i,hw alone
  (``weight_masks_by_class_confidence=False``, what the reference implementation deeplab2
  does). As m̂ = softmax_N(mask logits), the argmax is taken on logits (+ log p̂) directly.

A pixel is void unless (a) its mask-ID confidence — the softmax over the *kept* slots of the
mask logits, read at ẑ — is > ``pixel_threshold`` (0.4), and (b) the slot with the largest
mask logit over *all* N slots is a kept one (a pixel dominated by a discarded slot is not
handed to a weaker kept slot). Then segments below an area limit become void: a thing
segment is one slot's pixels (instance id = slot + 1), a stuff segment is the union of the
pixels of all slots predicting that stuff class (instance id 0).

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

Two implementations compute the same maps. The *static* one (used under
``tf.function(jit_compile=True)``, where shapes must be static) works on all N upsampled
channels. The *dynamic* one (eager / plain ``tf.function``, the default there) avoids the
[B, H, W, N] tensor, the cost driver at 641² (benchmarks/bench_postprocess.py):

* kept-slot quantities (the kept-slot softmax normaliser, the paper's weighted argmax) only
  involve kept slots — typically few — so only those channels are gathered and upsampled;
* the dominant slot argmax over *all* N slots is exact from low-resolution bounds: inside
  one stride cell every upsampled value of channel i lies between the min and max of its 4
  corner logits, so a channel whose corner max is below another channel's corner min
  (minus a rounding margin) can never be the argmax there. Only the remaining candidates
  of each cell are interpolated, with the same `ResizeBilinear` arithmetic on a 2x2 patch
  (bit-identical for power-of-two strides, where the interpolation weights are exact).
  When many channels stay candidates (e.g. spatially white-noise logits) the full
  upsample + argmax is used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import gin
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

RESIZE_METHODS = ("align_corners", "half_pixel")

# Log-score given to discarded slots in the paper's argmax: finite (unlike -inf) so that an
# image with every slot discarded gives no NaN, and far below any real logit + log p̂.
_NEG = -1e9


def scaled_area_limit(limit: float, image_size: Sequence[int],
                      reference_size: int | None) -> int:
    """Area limit (pixels) at ``image_size`` for a limit defined at ``reference_size``².

    DESIGN.md §5: the limits 4096 (stuff) / 256 (thing) are meant for 1025x1025 inputs and
    scale with the input area (the reference's 1600 / 100 at 641 are these, rounded).
    ``reference_size=None`` means the limit is already an absolute pixel count.
    """
    if reference_size is None:
        return int(round(limit))
    h, w = int(image_size[0]), int(image_size[1])
    return int(round(limit * h * w / float(reference_size * reference_size)))


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


def _in_xla_context() -> bool:
    """True while tracing inside ``tf.function(jit_compile=True)`` (shapes must be static)."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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


# Rounding margin of the cell bounds, relative to the cell's largest |logit|: a 3-lerp
# bilinear value is within a few float32 ulps (~1e-7 relative) of its corners' hull.
_BOUND_MARGIN = 1e-5


def _argmax_candidates(mask_logits: tf.Tensor, size: Sequence[int],
                       fallback: Callable[[], tuple[tf.Tensor, tf.Tensor]],
                       offset: tf.Tensor | None = None, allowed: tf.Tensor | None = None,
                       max_pairs: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """argmax_i and max_i over ``allowed`` slots of up(logits)_i + offset_i, exactly.

    ``up`` is the align-corners upsample to ``size`` (power-of-two strides). Cell
    (y0, x0) holds the output pixels (s·y0 + r, s·x0 + q), 0 ≤ r, q < s, which interpolate
    the corners (y0|y0+1, x0|x0+1) (the last row/column: themselves). A slot whose corner
    max (+ offset) is below M − margin, M = max over slots of the corner min (+ offset),
    is below the slot attaining M everywhere in the cell. Only (cell, candidate slot)
    pairs are interpolated, with `ResizeBilinear`'s arithmetic (top = tl + (tr − tl)·fx,
    ...) and its exact weights r/s, so values equal the full upsample's bit for bit; ties
    resolve to the lowest slot as in `tf.argmax`.

    Args:
      mask_logits: [B, h, w, N] logits; size: (H, W).
      fallback: returns the same (argmax, max) densely; used above ``max_pairs`` pairs
        (None: a quarter of cells × N, past which the pair work nears the dense one's).
      offset: [B, N] per-slot term added after upsampling (the paper's log p̂), or None.
      allowed: [B, N] bools, slots taking part (None: all). Pixels of an image without
        allowed slots get an arbitrary valid slot index.

    Returns:
      int32 [B, H, W] argmax slot, float32 [B, H, W] its value.
    """
    batch, h, w, n = (tf.shape(mask_logits)[0], int(mask_logits.shape[1]),
                      int(mask_logits.shape[2]), int(mask_logits.shape[-1]))
    out_h, out_w = int(size[0]), int(size[1])
    sy, sx = _candidate_stride(h, out_h), _candidate_stride(w, out_w)
    # Replicate the last row/column: the degenerate last cell interpolates a pixel with itself.
    padded = tf.concat([mask_logits, mask_logits[:, -1:]], axis=1)
    padded = tf.concat([padded, padded[:, :, -1:]], axis=2)  # [B, h+1, w+1, N]
    row_max = tf.maximum(padded[:, :, :-1], padded[:, :, 1:])
    row_min = tf.minimum(padded[:, :, :-1], padded[:, :, 1:])
    upper = tf.maximum(row_max[:, :-1], row_max[:, 1:])  # [B, h, w, N] corner max
    lower = tf.minimum(row_min[:, :-1], row_min[:, 1:])  # corner min
    if offset is not None:
        upper += offset[:, None, None, :]
        lower += offset[:, None, None, :]
    low_for_max = lower
    low_for_min = lower
    if allowed is not None:
        mask = allowed[:, None, None, :]
        upper = tf.where(mask, upper, -np.inf)
        low_for_max = tf.where(mask, lower, -np.inf)
        low_for_min = tf.where(mask, lower, np.inf)
    bound = tf.reduce_max(low_for_max, axis=-1, keepdims=True)
    scale = tf.maximum(tf.reduce_max(upper, axis=-1, keepdims=True),
                       -tf.reduce_min(low_for_min, axis=-1, keepdims=True))
    # A cell without allowed slots compares with NaN (−inf − −inf): no pairs.
    pairs = tf.where(upper >= bound - _BOUND_MARGIN * (1.0 + scale))  # [P, 4]: b, y, x, slot
    num_cells = batch * h * w
    limit = num_cells * n // 4 if max_pairs is None else max_pairs

    def to_image(per_cell: tf.Tensor) -> tf.Tensor:  # [cells, sy·sx] -> [B, H, W]
        per_cell = tf.transpose(tf.reshape(per_cell, [batch, h, w, sy, sx]), [0, 1, 3, 2, 4])
        return tf.reshape(per_cell, [batch, h * sy, w * sx])[:, :out_h, :out_w]

    def from_candidates() -> tuple[tf.Tensor, tf.Tensor]:
        corner = [tf.gather_nd(c, pairs)[:, None, None] for c in (
            mask_logits, padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:])]
        top_left, top_right, bottom_left, bottom_right = corner  # each [P, 1, 1]
        fy = (tf.range(sy, dtype=tf.float32) / sy)[:, None]  # exact: sy is a power of two
        fx = tf.range(sx, dtype=tf.float32) / sx
        top = top_left + (top_right - top_left) * fx
        bottom = bottom_left + (bottom_right - bottom_left) * fx
        values = tf.reshape(top + (bottom - top) * fy, [-1, sy * sx])  # [P, sy·sx]
        pairs32 = tf.cast(pairs, tf.int32)
        if offset is not None:
            values += tf.gather_nd(offset, tf.gather(pairs32, [0, 3], axis=1))[:, None]
        cell = (pairs32[:, 0] * h + pairs32[:, 1]) * w + pairs32[:, 2]
        best_value = tf.math.unsorted_segment_max(values, cell, num_cells)
        slot = tf.where(values == tf.gather(best_value, cell), pairs32[:, 3:], n)
        best = tf.math.unsorted_segment_min(slot, cell, num_cells)  # lowest maximal slot
        best = tf.clip_by_value(best, 0, n - 1)  # cells without pairs
        return to_image(best), to_image(best_value)

    return tf.cond(tf.shape(pairs)[0] <= limit, from_candidates, fallback)


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


def _segment_area(ids: tf.Tensor, valid: tf.Tensor, num_ids: int) -> tf.Tensor:
    """Per pixel, the number of valid pixels of the same image carrying the same id.

    ids, valid: [B, H, W]; ids in [0, num_ids). A segment sum over (image, id) pairs keeps
    shapes static (XLA-friendly), unlike `tf.unique`/`bincount` with dynamic sizes.
    """
    batch = tf.shape(ids)[0]
    offsets = tf.range(batch, dtype=tf.int32)[:, None, None] * num_ids
    # Invalid pixels go to one extra trash segment so they count towards nothing.
    trash = batch * num_ids
    seg = tf.where(valid, ids + offsets, trash)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(seg), seg, trash + 1)
    return tf.gather(counts, seg)


def _slot_maps_static(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
                      image_size: Sequence[int] | None, resize_method: str,
                      weight_masks_by_class_confidence: bool
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(ẑ, dominant slot, dominant slot kept, pixel confidence) on all N channels.

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
    return mask_id, argmax_all, dominant_kept, pixel_conf


def _slot_maps_dynamic(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
                       out_size: tuple[int, int], resize_method: str,
                       weight_masks_by_class_confidence: bool
                       ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same values as `_slot_maps_static`, upsampling kept slots only (dynamic shapes).

    Kept-slot maxima / sums / argmaxes equal the static path's (the upsampled values of a
    channel do not depend on which other channels are resized with it); the normaliser's
    summation order differs, so pixel confidences agree to float32 rounding.
    """
    num_slots = int(mask_logits.shape[-1])
    h, w = mask_logits.shape[1], mask_logits.shape[2]
    # Kept slots of each image in ascending slot order (ties -> lowest slot, as the static
    # argmax), padded to the batch's largest kept count (≥ 1) with invalid entries.
    order = tf.range(num_slots, dtype=tf.int32)
    num_kept = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(kept, tf.int32), -1)), 1)
    index = tf.math.top_k(-tf.where(kept, order, order + num_slots), k=num_kept).indices
    valid = tf.gather(kept, index, batch_dims=1)  # [B, K]
    # Padding entries get _NEG before upsampling (interpolating a constant is exact), so
    # that they add exp(_NEG − max) = 0 below without another full-resolution pass.
    low = tf.where(valid[:, None, None, :], tf.gather(mask_logits, index, axis=-1,
                                                      batch_dims=1), _NEG)
    logits = upsample_logits(low, out_size, resize_method)  # [B, H, W, K]
    log_conf = tf.math.log(tf.maximum(slot_conf, 1e-30))  # [B, N]
    log_conf_kept = tf.where(valid, tf.gather(log_conf, index, batch_dims=1), _NEG)

    def dense_dominant() -> tuple[tf.Tensor, tf.Tensor]:
        argmax = _argmax_full(mask_logits, out_size, resize_method)
        return argmax, tf.zeros(tf.shape(argmax), tf.float32)

    def dense_weighted() -> tuple[tf.Tensor, tf.Tensor]:
        scored = logits + log_conf_kept[:, None, None, :]
        best = tf.argmax(scored, axis=-1, output_type=tf.int32)
        return (tf.gather(index, best, batch_dims=1),
                tf.gather(scored, best[..., None], batch_dims=3)[..., 0])

    use_cells = (resize_method == "align_corners" and h is not None and w is not None
                 and (h, w) != out_size and _candidate_stride(h, out_size[0]) is not None
                 and _candidate_stride(w, out_size[1]) is not None)
    # The dominant slot over all N slots.
    if (h, w) == out_size:
        argmax_all = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)
    elif use_cells:
        argmax_all, _ = _argmax_candidates(mask_logits, out_size, dense_dominant)
    else:
        argmax_all, _ = dense_dominant()
    dominant_kept = tf.gather(kept, argmax_all, batch_dims=1)  # [B, H, W]

    # Where the dominant slot is kept (the only pixels that matter) it is the kept-slot
    # maximum: read its logit at its position among the kept slots instead of reducing.
    position = tf.cumsum(tf.cast(kept, tf.int32), axis=-1, exclusive=True)  # slot -> k
    position = tf.minimum(tf.gather(position, argmax_all, batch_dims=1), num_kept - 1)
    max_kept = tf.gather(logits, position[..., None], batch_dims=3)  # [B, H, W, 1]
    kept_sum = tf.squeeze(tf.matmul(tf.exp(logits - max_kept),
                                    tf.cast(valid, tf.float32)[:, None, :, None]), -1)
    kept_sum = tf.where(dominant_kept, kept_sum, 1.0)
    if weight_masks_by_class_confidence:
        # argmax over kept slots of logit + log p̂ (see `_slot_maps_static`), from the cell
        # bounds when possible (no [B, H, W, K] pass), else densely on the kept logits.
        if use_cells:
            mask_id, chosen = _argmax_candidates(mask_logits, out_size, dense_weighted,
                                                 offset=log_conf, allowed=kept)
        else:
            mask_id, chosen = dense_weighted()
        chosen_rel = chosen - tf.gather(log_conf, mask_id, batch_dims=1) - max_kept[..., 0]
        pixel_conf = tf.exp(chosen_rel) / kept_sum
    else:
        mask_id = argmax_all
        pixel_conf = 1.0 / kept_sum
    return mask_id, argmax_all, dominant_kept, pixel_conf


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
) -> dict[str, tf.Tensor]:
    """Panoptic, semantic and instance maps from the model's output dict (paper §3.1).

    Args:
      outputs: the model's output dict (DESIGN.md §3); uses ``mask_logits [B, h, w, N]``
        (stride 4, not upsampled) and ``class_logits [B, N, C+1]`` (last index = void ∅).
      is_thing: [C] bools, True for thing classes (contiguous class order).
      image_size: (H, W) to upsample the mask logits to (bilinear, ``resize_method``);
        None keeps the logits' resolution.
      class_threshold: slots with p̂_i(ĉ_i) < this are void (kept iff ≥).
      pixel_threshold: pixels with mask-ID confidence ≤ this are void (kept iff >).
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
      weight_masks_by_class_confidence: True: ẑ = argmax_i p̂_i(ĉ_i)·m̂_i (paper §3.1);
        False: ẑ = argmax_i m̂_i over kept slots (deeplab2's "pixelwise" post-processing).
      resize_method: "align_corners" (deeplab2) or "half_pixel" (TF2 `tf.image.resize`).
      dynamic_shapes: True: upsample only kept slots / candidate slots (data-dependent
        shapes, faster); False: the static all-slot computation (XLA-compatible). None:
        static inside ``tf.function(jit_compile=True)``, dynamic otherwise. Both give
        the same maps (confidences equal up to float32 rounding).

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
          0 where the pixel's dominant slot (largest mask logit) is discarded.
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

    # Per slot: class and its confidence among the non-void classes of the (C+1)-softmax.
    class_probs = tf.nn.softmax(class_logits, axis=-1)[..., :num_classes]
    slot_class = tf.argmax(class_probs, axis=-1, output_type=tf.int32)  # [B, N]
    slot_conf = tf.reduce_max(class_probs, axis=-1)  # [B, N]
    kept = slot_conf >= class_threshold  # [B, N]

    if image_size is not None and image_size[0] is not None:
        out_size = (int(image_size[0]), int(image_size[1]))
    else:
        out_size = (mask_logits.shape[1], mask_logits.shape[2])
    if None in out_size and area_limit_reference_size is not None:
        raise ValueError("postprocess: the output size must be static to scale the area "
                         "limits; pass image_size or area_limit_reference_size=None")
    if dynamic_shapes is None:
        dynamic_shapes = not _in_xla_context()
    if dynamic_shapes and None not in out_size:
        mask_id, argmax_all, dominant_kept, pixel_conf = _slot_maps_dynamic(
            mask_logits, kept, slot_conf, out_size, resize_method,
            weight_masks_by_class_confidence)
    else:
        mask_id, argmax_all, dominant_kept, pixel_conf = _slot_maps_static(
            mask_logits, kept, slot_conf, image_size, resize_method,
            weight_masks_by_class_confidence)
    pixel_conf = tf.where(dominant_kept, pixel_conf, 0.0)
    confident = dominant_kept & (pixel_conf > pixel_threshold)

    pixel_class = tf.gather(slot_class, mask_id, batch_dims=1)  # [B, H, W]
    pixel_is_thing = tf.gather(is_thing, pixel_class)
    thing = confident & pixel_is_thing
    stuff = confident & tf.logical_not(pixel_is_thing)

    h_w = (int(out_size[0]), int(out_size[1]))
    thing_limit = scaled_area_limit(thing_area_limit, h_w, area_limit_reference_size)
    stuff_limit = scaled_area_limit(stuff_area_limit, h_w, area_limit_reference_size)
    if thing_limit > 0:
        thing &= _segment_area(mask_id, thing, num_slots) >= thing_limit
    if stuff_limit > 0:
        stuff &= _segment_area(pixel_class, stuff, num_classes) >= stuff_limit

    label = pixel_class + label_offset
    instance = tf.where(thing, mask_id + 1, 0)
    panoptic = tf.where(thing | stuff, label * label_divisor + instance, void_label)

    # Dense semantic map: the same rule with both thresholds at 0 (every slot kept), i.e.
    # the class of the dominant slot.
    semantic = tf.gather(slot_class, argmax_all, batch_dims=1) + label_offset

    return {
        "panoptic": panoptic,
        "semantic": semantic,
        "instance": instance,
        "mask_id": tf.where(dominant_kept, mask_id + 1, 0),
        "pixel_confidence": pixel_conf,
        "class_confidence": tf.where(dominant_kept,
                                     tf.gather(slot_conf, mask_id, batch_dims=1), 0.0),
        "segment_scores": tf.where(kept, slot_conf, 0.0),
        "segment_classes": slot_class + label_offset,
    }
