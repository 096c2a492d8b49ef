"""Slot maps of the "kept_slots" post-processing rule on the static and dense paths, and what
every path shares: the per-pixel codes, the kept-slot selection and the upsampling
(paper §3.1; docs/design.md §5; the rules themselves: `max_deeplab.inference.postprocess`).

Every pixel is summarised by one int32 *code* = (b·N + a)·(2N + 1) + e, with a the dominant
slot (largest mask logit) and e = 0 (void: a discarded under "kept_slots", ẑ void under
"paper"), 1 + ẑ (confident) or 1 + N + ẑ (not confident) (`pixel_codes`). All output maps
are then one table lookup each, and the area filters one `count_codes` of the codes. Three
paths compute the "kept_slots" codes:

* *static* (`static_slot_maps`; used under ``tf.function(jit_compile=True)``, where shapes
  must be static): all N channels upsampled to [B, H, W, N];
* *dense* (`dense_codes`; dynamic shapes, any resize): the N-channel argmax, and only the K
  kept channels upsampled for ẑ and the confidence;
* *cells* (`max_deeplab.inference.cell_pruning`; dynamic shapes, align-corners with
  power-of-two strides, e.g. 161 -> 641; the default outside XLA).

The kept slots' logits are selected with a one-hot matmul (`kept_logits`), exact in float32.
On GPUs that run float32 matmuls in TensorFloat-32 (TF's default on NVIDIA Ampere and newer)
it rounds the logits to 10 mantissa bits, as TF32 already does inside the network that
produced them; the dynamic paths may then differ from the static one at near-ties.
`tf.config.experimental.enable_tensor_float_32_execution(False)` restores exact agreement.

Speed-ups of the choices below were measured on the development CPU at 641², N = 128; they
are listed in `benchmarks/bench_postprocess.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

RESIZE_METHODS = ("align_corners", "half_pixel")

# Log-score given to discarded slots in the paper's argmax: finite (unlike -inf) so that an
# image with every slot discarded gives no NaN, and far below any real logit + log p̂.
NEG = -1e9


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


def count_codes(values: tf.Tensor, size: tf.Tensor | int) -> tf.Tensor:
    """Occurrences of each of 0..size−1 in int32 ``values`` (all in range): int32 [size].

    `DenseBincount` with a fixed size (`tf.math.bincount` derives its size from the data,
    which XLA rejects); faster than `unsorted_segment_sum` on CPU.
    """
    return tf.raw_ops.DenseBincount(input=values, size=size,
                                    weights=tf.zeros([0], tf.int32), binary_output=False)


def kept_slots(kept: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Kept slots of each image in ascending slot order, padded to the batch's largest count.

    Returns index int32 [B, K] (K ≥ 1; padding entries are valid slot ids) and valid [B, K].
    Ascending order makes "lowest position" equal "lowest slot" for tie-breaking.
    """
    num_slots = int(kept.shape[-1])
    order = tf.range(num_slots, dtype=tf.int32)
    num_kept = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(kept, tf.int32), -1)), 1)
    index = tf.math.top_k(-tf.where(kept, order, order + num_slots), k=num_kept).indices
    return index, tf.gather(kept, index, batch_dims=1)


def kept_logits(mask_logits: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                offset: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[B, h, w, K] logits of the kept slots and their [B, K] offsets; padding gets NEG.

    NEG is exact under interpolation (a constant) and adds exp(NEG − max) = 0 to sums.
    """
    # A one-hot matmul instead of a gather along the channel axis (faster on CPU);
    # exact for finite logits in float32 matmul: each output is x·1 plus zeros.
    shape = tf.shape(mask_logits)
    select = tf.one_hot(index, int(mask_logits.shape[-1]), dtype=mask_logits.dtype)

    def one_image() -> tf.Tensor:  # a plain matmul: faster on CPU than the batched one
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
                  lambda: tf.where(valid[:, None, :], low, NEG))
    low = tf.reshape(low, tf.concat([shape[:3], tf.shape(index)[1:]], 0))
    return low, tf.where(valid, tf.gather(offset, index, batch_dims=1), NEG)


def kept_choice_dense(mask_logits: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                      offset: tf.Tensor, size: Sequence[int], method: str
                      ) -> tuple[tf.Tensor, tf.Tensor]:
    """ẑ = argmax over kept slots of up(logit) + offset, and its mask-ID confidence.

    Upsamples the K kept channels only. The confidence exp(v_ẑ − max_kept) / Σ_kept
    exp(v − max_kept) equals the static path's wherever the dominant slot is kept (there
    max_kept is the maximum over all slots); elsewhere it is not used.

    Returns int32 [B, H, W] slots, float32 [B, H, W] confidences.
    """
    low, off = kept_logits(mask_logits, index, valid, offset)
    logits = upsample_logits(low, size, method)  # [B, H, W, K]
    scored = logits + off[:, None, None, :]
    position = tf.argmax(scored, axis=-1, output_type=tf.int32)
    max_kept = tf.reduce_max(logits, axis=-1, keepdims=True)
    kept_sum = tf.squeeze(tf.matmul(tf.exp(logits - max_kept),
                                    tf.cast(valid, tf.float32)[:, None, :, None]), -1)
    chosen_rel = (tf.reduce_max(scored, axis=-1) - tf.gather(off, position, batch_dims=1)
                  - max_kept[..., 0])
    return tf.gather(index, position, batch_dims=1), tf.exp(chosen_rel) / kept_sum


def argmax_full(mask_logits: tf.Tensor, size: Sequence[int], method: str) -> tf.Tensor:
    """argmax over slots of the upsampled [B, h, w, N] logits: int32 [B, H, W]."""
    return tf.argmax(upsample_logits(mask_logits, size, method), axis=-1,
                     output_type=tf.int32)


def pixel_codes(dominant: tf.Tensor, chosen: tf.Tensor, confidence: tf.Tensor,
                kept: tf.Tensor, pixel_threshold: float) -> tf.Tensor:
    """Per-pixel codes (module docstring) from dense maps: dominant slot a, ẑ, confidence."""
    num_slots = int(kept.shape[-1])
    dominant_kept = tf.gather(kept, dominant, batch_dims=1)
    e = tf.where(dominant_kept, tf.where(confidence > pixel_threshold, 1 + chosen,
                                         1 + num_slots + chosen), 0)
    image = tf.range(tf.shape(dominant)[0], dtype=tf.int32)[:, None, None]
    return (image * num_slots + dominant) * (2 * num_slots + 1) + e


def dense_codes(mask_logits: tf.Tensor, kept: tf.Tensor, index: tf.Tensor, valid: tf.Tensor,
                offset: tf.Tensor, size: Sequence[int], method: str, pixel_threshold: float
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Codes and confidences of the *dense* path: ẑ and its confidence from the K kept
    channels (`kept_choice_dense`), the dominant slot from all N (`argmax_full`)."""
    chosen, confidence = kept_choice_dense(mask_logits, index, valid, offset, size, method)
    dominant = argmax_full(mask_logits, size, method)
    return pixel_codes(dominant, chosen, confidence, kept, pixel_threshold), confidence


def static_slot_maps(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
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
        log_conf = tf.where(kept, tf.math.log(tf.maximum(slot_conf, 1e-30)), NEG)
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
