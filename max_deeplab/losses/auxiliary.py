"""MaX-DeepLab's auxiliary losses (paper §4 "Auxiliary losses", docs/design.md §4).

* instance discrimination — a per-pixel contrastive loss that clusters decoder features
  into instances (paper Eqs. 16-17);
* mask-ID cross-entropy — each labelled pixel classified into the N predicted masks, the
  target being the prediction matched to its ground-truth mask;
* semantic segmentation cross-entropy on the auxiliary semantic head.

Each function returns a per-image loss [B], averaged over that image's counted pixels
(0 for an image without any), so the caller can sum images and divide by a global batch
size. Void, crowd and padding pixels never count.
"""

from __future__ import annotations

import tensorflow as tf

# Logit given to absent embeddings: exp() of it underflows to exactly 0 in float32 next to
# any real logit, yet it is finite, so masked pixels produce no NaN (or NaN gradient).
_ABSENT_LOGIT = -1e9


def _masked_mean(per_pixel: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """Per-image mean of ``per_pixel [B, h, w]`` over pixels with ``weight`` 1; 0 if none."""
    total = tf.reduce_sum(tf.where(weight > 0.0, per_pixel * weight, 0.0), axis=[1, 2])
    count = tf.reduce_sum(weight, axis=[1, 2])
    return total / tf.maximum(count, 1.0)


def instance_discrimination_logits(
    pixel_feature: tf.Tensor,
    masks: tf.Tensor,
    present: tf.Tensor,
    temperature: float = 0.3,
) -> tf.Tensor:
    """``t_i · g_hw / τ`` for every pixel and ground-truth mask (paper Eq. 12's logits).

    ``t_i`` = L2-normalised mean of the decoder feature ``g`` over ground-truth mask ``m_i``.
    Masks that are not present get a logit whose exp() is exactly 0 next to any real one.

    Args:
      pixel_feature: float [B, h, w, D] decoder feature g, L2-normalised by the model.
      masks: float [B, h, w, K] binary ground-truth masks (zero for absent segments).
      present: bool [B, K] which of the K masks exist.
      temperature: τ (paper: 0.3).

    Returns:
      float [B, h, w, K].
    """
    area = tf.reduce_sum(masks, axis=[1, 2])  # [B, K]
    summed = tf.einsum("bhwk,bhwd->bkd", masks, pixel_feature)
    mean = summed / tf.maximum(area, 1.0)[:, :, None]
    embeddings = tf.math.l2_normalize(mean, axis=-1)  # absent masks stay 0, gradient finite
    logits = tf.einsum("bhwd,bkd->bhwk", pixel_feature, embeddings) / temperature
    return tf.where(present[:, None, None, :], logits, _ABSENT_LOGIT)


def instance_discrimination_loss_from_logits(
    logits: tf.Tensor, masks: tf.Tensor, counted: tf.Tensor
) -> tf.Tensor:
    """Per-image instance discrimination loss (Eq. 12) from `instance_discrimination_logits`:
    the mean over the pixels of the counted masks of the softmax cross-entropy over the K
    embeddings, the pixel's own mask being the target.

    Args:
      logits: float [B, h, w, K].
      masks: float [B, h, w, K] binary ground-truth masks.
      counted: bool [B, K] masks whose pixels carry the loss (the thing masks).

    Returns:
      float [B].
    """
    own_logit = tf.reduce_sum(masks * logits, axis=-1)
    per_pixel = tf.reduce_logsumexp(logits, axis=-1) - own_logit
    weight = tf.reduce_sum(masks * tf.cast(counted, masks.dtype)[:, None, None, :], axis=-1)
    return _masked_mean(per_pixel, weight)


def instance_discrimination_loss(
    pixel_feature: tf.Tensor,
    masks: tf.Tensor,
    present: tf.Tensor,
    counted: tf.Tensor,
    temperature: float = 0.3,
) -> tf.Tensor:
    """Pixel-wise instance discrimination (paper Eqs. 16-17), averaged over the counted pixels.

    ``t_i`` = L2-normalised mean of the decoder feature ``g`` over ground-truth mask ``m_i``,
    for every one of the image's K masks, things and stuff ("which mask embedding, out of
    K"); at each pixel of a counted mask (the thing masks: "applied to all instance
    pixels"), ``−log( Σ_i m_i,hw exp(t_i · g_hw / τ) / Σ_i exp(t_i · g_hw / τ) )`` with i
    over the K present masks, so stuff embeddings are negatives for thing pixels too. The
    masks do not overlap, so the numerator is the term of the pixel's own mask and the loss
    is a softmax cross-entropy over the K embeddings.

    Args:
      pixel_feature: float [B, h, w, D] decoder feature g, L2-normalised by the model.
      masks: float [B, h, w, K] binary ground-truth masks (zero for absent segments).
      present: bool [B, K] which of the K masks exist (the softmax runs over these).
      counted: bool [B, K] masks whose pixels carry the loss (the thing masks).
      temperature: τ (paper: 0.3).

    Returns:
      float [B].
    """
    logits = instance_discrimination_logits(pixel_feature, masks, present, temperature)
    return instance_discrimination_loss_from_logits(logits, masks, counted)


def matched_slot_of_pixels(pixel_segment: tf.Tensor, matching: tf.Tensor) -> tf.Tensor:
    """int32 [B, h, w]: the prediction matched to each pixel's ground-truth segment (the
    mask-ID target), -1 where the pixel is unlabelled or its segment is unmatched.

    Args:
      pixel_segment: int [B, h, w] the pixel's ground-truth segment, -1 when unlabelled.
      matching: int [B, K] σ(i), the prediction matched to segment i (-1 if none).
    """
    pixel_segment = tf.cast(pixel_segment, tf.int32)
    slot = tf.gather(tf.cast(matching, tf.int32), tf.maximum(pixel_segment, 0), batch_dims=1)
    return tf.where(pixel_segment >= 0, slot, -1)


def mask_id_cross_entropy(
    mask_logits: tf.Tensor, pixel_segment: tf.Tensor, matching: tf.Tensor
) -> tf.Tensor:
    """Per-pixel cross-entropy of the mask-ID map (paper §4), averaged over labelled pixels.

    Args:
      mask_logits: float [B, h, w, N]; the softmax over N gives the soft masks m̂.
      pixel_segment: int [B, h, w] the pixel's ground-truth segment, -1 when unlabelled.
      matching: int [B, K] σ(i), the prediction matched to segment i (-1 if none).

    Returns:
      float [B].
    """
    slot = matched_slot_of_pixels(pixel_segment, matching)  # [B, h, w]
    counted = slot >= 0
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(slot, 0), logits=mask_logits
    )
    return _masked_mean(per_pixel, tf.cast(counted, mask_logits.dtype))


def semantic_cross_entropy(semantic_logits: tf.Tensor, semantic: tf.Tensor) -> tf.Tensor:
    """Semantic segmentation cross-entropy (paper §4), averaged over labelled pixels.

    Args:
      semantic_logits: float [B, h, w, C].
      semantic: int [B, h, w] contiguous class index at the same resolution, -1 = ignore.

    Returns:
      float [B].
    """
    semantic = tf.cast(semantic, tf.int32)
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(semantic, 0), logits=semantic_logits
    )
    return _masked_mean(per_pixel, tf.cast(semantic >= 0, semantic_logits.dtype))
