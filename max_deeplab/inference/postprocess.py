"""Panoptic post-processing of MaX-DeepLab outputs (paper §3.1, §4, docs/design.md §5).

The model predicts N (mask, class) pairs: class probabilities p̂_i over C + 1 classes (the
last, ∅, is void) and masks m̂_i,hw = softmax over the N slots of the mask logits. Two
argmaxes turn them into a non-overlapping panoptic map (Eqs. 3-4), filtered by the
confidences of §4 ("masks with class confidence below 0.7 [set] to void", "pixels with
mask-ID confidence below 0.4 [filtered]"). Two rules are implemented (``rule``):

``rule="kept_slots"`` (the default; the reference implementation's, which its published
checkpoints' PQ was measured with):
1. ĉ_i = argmax over the C non-void classes of p̂_i (the (C+1)-softmax, ∅ left out); slot i
   is *kept* iff its class confidence p̂_i(ĉ_i) ≥ ``class_threshold`` (0.7 itself is kept).
   Other slots are discarded before the pixel argmax.
2. ẑ_hw = argmax over the *kept* slots of p̂_i(ĉ_i)·m̂_i,hw (``weight_masks_by_class_confidence
   =True``, the paper's Eq. 4 weighting), or of m̂_i,hw alone (False, as deeplab2). As m̂ =
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
0 is void, and ``panoptic = label * label_divisor + instance`` (the prediction encoding of
`max_deeplab.panoptic_labels`). On deeplab2's tiny reference fixture (`tiny/io.npz`, see
tests/test_reference_import.py) transformer class channel k (0..132, channel 133 = void)
appears as ``semantic_pred == k + 1``: deeplab2's COCO thing ids are 1..80 and its stuff
ids 81..133 with 0 = ignore, so its thing+stuff id list is exactly ``k + 1``.

Mask logits at stride 4 are bilinearly upsampled to ``image_size`` with *align_corners*
semantics (corner pixels of input and output coincide; the reference's convention, verified
numerically on the tiny fixture), which is exact for the stride-4 grid of a ``4k + 1`` input
(e.g. 641 -> 161 -> 641). Thresholds: a slot is kept iff p̂ ≥ class_threshold; a pixel is
kept iff its confidence > pixel_threshold (strict), a segment iff area ≥ its limit.

The rules are computed as one int32 *code* per pixel (dominant slot, ẑ, void / confident /
not), from which every output map is one table lookup (`_outputs_from_codes`). The codes
come from one of four algorithms, each in its own module:

* ``rule="paper"``: `paper_rule.paper_codes` (all N channels at full resolution);
* ``rule="kept_slots"`` inside XLA (static shapes): `slot_maps.static_slot_maps`;
* ``rule="kept_slots"`` outside XLA, any resize: `slot_maps.dense_codes` (only the kept
  channels upsampled);
* ``rule="kept_slots"`` outside XLA, align-corners with power-of-two strides (e.g. 161 ->
  641; the export and evaluation case): `cell_pruning.cell_codes`, exact low-resolution
  bounds that upsample only the cells and slots they leave open.

All give the same maps (`slot_maps` and `cell_pruning` say why, and where float32 rounding
may differ).

The float ``pixel_confidence`` output needs the kept-slot sum at every pixel; the cells path
computes it with the dense kept-slot upsample, which graph mode (`tf.function`, SavedModel)
skips when that output is not fetched (export returns only the label maps). It agrees with
the threshold decision up to float32 rounding of the sum (summation order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gin
import numpy as np
import tensorflow as tf

from max_deeplab.inference.cell_pruning import candidate_stride, cell_codes
from max_deeplab.inference.paper_rule import paper_codes
from max_deeplab.inference.slot_maps import (
    RESIZE_METHODS,
    count_codes,
    dense_codes,
    kept_choice_dense,
    kept_slots,
    pixel_codes,
    static_slot_maps,
    upsample_logits,
)
from max_deeplab.model.outputs import CLASS_LOGITS, MASK_LOGITS, check_outputs
from max_deeplab.panoptic_labels import LABEL_DIVISOR, PREDICTION_LABEL_OFFSET, PREDICTION_VOID
from max_deeplab.xla_compilation import in_xla_compilation

__all__ = ["COUNT_METHODS", "RESIZE_METHODS", "RULES", "postprocess", "scaled_area_limit",
           "upsample_logits"]

RULES = ("kept_slots", "paper")
# How segment areas are counted: `DenseBincount` (fast on CPU, XLA) or an unsorted segment
# sum (the only one of the two TFLite has: see `max_deeplab.inference.tflite`).
COUNT_METHODS = ("bincount", "segment_sum")


def scaled_area_limit(limit: float, image_size: Sequence[int],
                      reference_size: int | None) -> int:
    """Area limit (pixels) at ``image_size`` for a limit defined at ``reference_size``².

    docs/design.md §5: the limits 4096 (stuff) / 256 (thing) are meant for 1025x1025 inputs and
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
    label_divisor: int = LABEL_DIVISOR,
    label_offset: int = PREDICTION_LABEL_OFFSET,
    void_label: int = PREDICTION_VOID,
    weight_masks_by_class_confidence: bool = True,
    resize_method: str = "align_corners",
    dynamic_shapes: bool | None = None,
    rule: str = "kept_slots",
    count_method: str = "bincount",
) -> dict[str, tf.Tensor]:
    """Panoptic, semantic and instance maps from the model's output dict (paper §3.1).

    Args:
      outputs: the model's output dict (`max_deeplab.model.outputs`); uses
        ``mask_logits [B, h, w, N]`` (stride 4, not upsampled) and ``class_logits
        [B, N, C+1]`` (last index = void ∅).
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
    check_outputs(outputs, (MASK_LOGITS, CLASS_LOGITS), "postprocess")
    mask_logits = tf.convert_to_tensor(outputs[MASK_LOGITS])
    class_logits = tf.convert_to_tensor(outputs[CLASS_LOGITS])
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
        codes, confidence = paper_codes(mask_logits, kept, any_conf, image_size,
                                         resize_method, pixel_threshold)
    elif dynamic_shapes and None not in out_size:
        # ẑ ranks kept slots by logit + offset: argmax_i p̂_i·m̂_i = argmax_i (log p̂_i +
        # logit_i) (paper), as m̂'s normaliser is shared by all slots of a pixel.
        offset = (tf.math.log(tf.maximum(slot_conf, 1e-30))
                  if weight_masks_by_class_confidence else tf.zeros_like(slot_conf))
        index, valid = kept_slots(kept)
        h, w = mask_logits.shape[1], mask_logits.shape[2]
        strides = (None if resize_method != "align_corners" or None in (h, w)
                   or (h, w) == out_size else
                   (candidate_stride(h, out_size[0]), candidate_stride(w, out_size[1])))

        def dense() -> tuple[tf.Tensor, tf.Tensor]:
            return dense_codes(mask_logits, kept, index, valid, offset, out_size,
                               resize_method, pixel_threshold)

        if strides is None or None in strides:
            codes, confidence = dense()
        else:
            codes = cell_codes(mask_logits, kept, index, valid, offset, out_size, strides,
                                pixel_threshold, lambda: dense()[0],
                                zero_offsets=not weight_masks_by_class_confidence)
            # Only for the pixel_confidence output: graphs that do not fetch it skip this.
            confidence = kept_choice_dense(mask_logits, index, valid, offset, out_size,
                                            resize_method)[1]
    else:
        chosen, dominant, confidence = static_slot_maps(
            mask_logits, kept, slot_conf, image_size, resize_method,
            weight_masks_by_class_confidence)
        codes = pixel_codes(dominant, chosen, confidence, kept, pixel_threshold)

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
        counts = count_codes(flat_codes, total)
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
    # per index, so three columns cost about what one does (faster than three gathers).
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
    """The settings, and what the output contract (`check_outputs`) leaves open."""
    n, c1 = mask_logits.shape[-1], class_logits.shape[-1]
    if c1 is None:
        raise ValueError("postprocess: the slot count N and class count C+1 must be static")
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
