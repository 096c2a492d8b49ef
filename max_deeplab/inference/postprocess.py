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

Everything is batched and has static shapes (no data-dependent gather or `tf.cond`), so the
function runs under ``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gin
import numpy as np
import tensorflow as tf

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

    if image_size is not None:
        mask_logits = upsample_logits(mask_logits, image_size, resize_method)
    out_size = (mask_logits.shape[1], mask_logits.shape[2])
    if None in out_size and area_limit_reference_size is not None:
        raise ValueError("postprocess: the output size must be static to scale the area "
                         "limits; pass image_size or area_limit_reference_size=None")

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
