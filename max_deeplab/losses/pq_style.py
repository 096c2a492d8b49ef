"""PQ-style similarity, mask matching and PQ-style loss (paper §3.2, docs/design.md §4).

For ground-truth masks ``m_i`` with classes ``c_i`` (i ≤ K) and predictions ``(m̂_j, p̂_j)``
(j ≤ N):

* similarity ``sim(y_i, ŷ_j) = p̂_j(c_i) · Dice(m_i, m̂_j)`` — the product of a recognition
  term and a segmentation term, mirroring PQ = RQ × SQ (paper Eqs. 5-6);
* σ = the one-to-one assignment maximising ``Σ_i sim(y_i, ŷ_σ(i))`` (Hungarian, Eq. 7);
* ``L_pos = Σ_i p̂_σ(i)(c_i) · (−Dice(m_i, m̂_σ(i))) + Dice(m_i, m̂_σ(i)) · (−log p̂_σ(i)(c_i))``
  with both weights treated as constants (Eq. 10: the product rule on Eq. 9, p̂ → log p̂);
* ``L_neg = Σ_{j unmatched} −log p̂_j(∅)`` (Eq. 11);
* ``L_PQ = α · L_pos + (1 − α) · L_neg`` (Eq. 12), normalised by N (paper §4).

The "RQ + SQ" ablation (paper Table 5) uses ``sim = p̂_j(c_i) + Dice(m_i, m̂_j)`` and the
positive loss ``−Dice − log p̂`` without the dynamic weights.
"""

from __future__ import annotations

import tensorflow as tf

from max_deeplab.matching import hungarian_match

SIMILARITIES = ("pq", "rq_sq")

# Guards the Dice denominator of rows that are not present segments in an image with no
# labelled pixel at all (0 / 0). A present segment has area ≥ 1, so the guard never changes
# a value that is used.
_DICE_DENOMINATOR_FLOOR = 1e-6


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def soft_dice(gt_masks: tf.Tensor, mask_probs: tf.Tensor, labelled: tf.Tensor) -> tf.Tensor:
    """Dice coefficient between every ground-truth mask and every soft predicted mask.

    ``Dice(m_i, m̂_j) = 2 Σ m_i m̂_j / (Σ m_i + Σ m̂_j)`` with sums over labelled pixels only,
    so predictions on void/crowd/padding pixels neither help nor hurt (paper §3.2).

    Args:
      gt_masks: float [B, h, w, K] binary ground-truth masks (zero on unlabelled pixels).
      mask_probs: float [B, h, w, N] soft masks m̂ (softmax over N).
      labelled: float [B, h, w] 1 on labelled pixels, 0 elsewhere.

    Returns:
      float [B, K, N].
    """
    intersection = tf.einsum("bhwk,bhwn->bkn", gt_masks, mask_probs)
    gt_area = tf.reduce_sum(gt_masks, axis=[1, 2])  # [B, K]
    pred_area = tf.einsum("bhw,bhwn->bn", labelled, mask_probs)  # [B, N]
    denominator = gt_area[:, :, None] + pred_area[:, None, :]
    return 2.0 * intersection / tf.maximum(denominator, _DICE_DENOMINATOR_FLOOR)


def class_log_prob_of_segments(class_log_probs: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
    """``log p̂_j(c_i)`` for every segment i and prediction j.

    Args:
      class_log_probs: float [B, N, C+1] log-softmax of the class logits.
      classes: int [B, K] ground-truth class of each segment (any valid index for padding).

    Returns:
      float [B, K, N].
    """
    gathered = tf.gather(class_log_probs, tf.cast(classes, tf.int32), axis=2, batch_dims=1)
    return tf.transpose(gathered, [0, 2, 1])


def pq_similarity(dice: tf.Tensor, class_prob: tf.Tensor, similarity: str = "pq") -> tf.Tensor:
    """Mask similarity used for matching (paper Eq. 6; "RQ + SQ" ablation of Table 5).

    Args:
      dice: float [B, K, N] ``Dice(m_i, m̂_j)``.
      class_prob: float [B, K, N] ``p̂_j(c_i)``.
      similarity: ``"pq"`` for ``p̂ · Dice`` (the paper's), ``"rq_sq"`` for ``p̂ + Dice``.

    Returns:
      float [B, K, N].
    """
    _check_similarity(similarity)
    if similarity == "pq":
        return class_prob * dice
    return class_prob + dice


def match_segments(similarity: tf.Tensor, present: tf.Tensor, backend: str = "auto") -> tf.Tensor:
    """σ: the prediction assigned to each present segment, maximising total similarity (Eq. 7).

    The matching is a discrete choice, so no gradient flows through it.

    Args:
      similarity: float [B, K, N] with K ≤ N.
      present: bool [B, K] segments to match; others get -1.
      backend: `max_deeplab.matching.hungarian_match` backend.

    Returns:
      int32 [B, K].
    """
    cost = -tf.stop_gradient(similarity)
    return hungarian_match(cost, backend=backend, row_valid=present)


def pq_style_loss(
    dice: tf.Tensor,
    class_log_prob: tf.Tensor,
    void_log_prob: tf.Tensor,
    matching: tf.Tensor,
    alpha: float = 0.75,
    similarity: str = "pq",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image PQ-style loss, split into its positive and negative parts (Eqs. 10-12).

    Args:
      dice: float [B, K, N] ``Dice(m_i, m̂_j)``.
      class_log_prob: float [B, K, N] ``log p̂_j(c_i)``.
      void_log_prob: float [B, N] ``log p̂_j(∅)``.
      matching: int [B, K] σ(i), -1 for segments that are not present.
      alpha: balance of positive vs negative masks (paper: 0.75).
      similarity: ``"pq"`` (dynamic stop-gradient weights) or ``"rq_sq"`` (unweighted sum).

    Returns:
      ``(positive, negative)``, each float [B]: ``α · L_pos / N`` and ``(1 − α) · L_neg / N``,
      so that their sum is the paper's ``L_PQ`` normalised by N.
    """
    _check_similarity(similarity)
    num_slots = dice.shape[-1]
    if num_slots is None:
        num_slots = tf.shape(dice)[-1]
    # one_hot(-1) is an all-zero row: unmatched/padded segments contribute nothing.
    assigned = tf.one_hot(tf.cast(matching, tf.int32), num_slots, dtype=dice.dtype)  # [B,K,N]
    if similarity == "pq":
        class_prob = tf.exp(class_log_prob)
        # Eq. 10: Dice weighted by the (constant) class correctness, cross-entropy weighted
        # by the (constant) mask correctness.
        per_pair = tf.stop_gradient(class_prob) * (-dice) + tf.stop_gradient(dice) * (
            -class_log_prob
        )
    else:
        per_pair = -dice - class_log_prob
    # tf.where rather than a product keeps unassigned pairs out even if a term were infinite.
    positive = tf.reduce_sum(tf.where(assigned > 0.0, per_pair, 0.0), axis=[1, 2])
    unmatched = 1.0 - tf.reduce_sum(assigned, axis=1)  # [B, N]
    negative = tf.reduce_sum(tf.where(unmatched > 0.0, -void_log_prob, 0.0), axis=1)
    num_slots_f = tf.cast(num_slots, dice.dtype)
    return alpha * positive / num_slots_f, (1.0 - alpha) * negative / num_slots_f
