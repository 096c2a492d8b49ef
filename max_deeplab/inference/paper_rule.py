"""Per-pixel codes of the "paper" post-processing rule: §3.1 and §4 of the paper read
literally (the rule itself: `max_deeplab.inference.postprocess`; the codes:
`max_deeplab.inference.slot_maps`).

All N channels are upsampled to full resolution and both argmaxes run over all N slots, so
the shapes are static (XLA-compatible) and no kept-slot selection is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from max_deeplab.inference.slot_maps import upsample_logits


def paper_codes(mask_logits: tf.Tensor, kept: tf.Tensor, slot_conf: tf.Tensor,
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
    # Eq. 4 over all N: argmax_i p̂_i(ĉ_i)·m̂_i = argmax_i (log p̂_i(ĉ_i) + logit_i).
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
