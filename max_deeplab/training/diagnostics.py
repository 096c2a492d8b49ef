"""Training diagnostics of the paper's Figs. 5-6 (§4.3 "Analysis"), as TensorBoard scalars.

Computed in the training and evaluation steps from what the loss already computed (its
matching σ, the Dice and class similarities of every ground-truth/prediction pair, the
instance-discrimination logits; `MaXDeepLabLoss(..., return_matching=True)`): a few
reductions and two argmaxes, with static shapes and no host call, so the step still
compiles with XLA.

- ``matched_class_similarity``: mean over matched pairs of ``p̂_σ(i)(c_i)`` (Fig. 5a);
- ``matched_mask_similarity``: mean over matched pairs of ``Dice(m_i, m̂_σ(i))`` (Fig. 5b);
- ``instance_discrimination_accuracy``: share of thing pixels whose own mask embedding
  ``t_i`` (out of the image's K) has the largest ``t_i · g_hw`` (Fig. 6a);
- ``mask_id_accuracy``: share of labelled pixels of matched segments whose largest mask
  logit (out of N) is the matched slot σ(i) (Fig. 6b);
- ``matched_slots``: matched predictions per image (= ground-truth segments present at the
  output stride).

Each is kept as a (sum, count) pair, summed over replicas and steps and divided at the end,
so a loop's value pools all its matched pairs (pixels, images) however the batches split.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

# From the defining modules: the class itself, whatever `max_deeplab.losses` is made to
# export (tests swap the loss that `train` builds there for a stand-in).
from max_deeplab.losses.auxiliary import matched_slot_of_pixels
from max_deeplab.losses.max_deeplab_loss import LossMatching, MaXDeepLabLoss

DIAGNOSTIC_NAMES = ("matched_class_similarity", "matched_mask_similarity",
                    "instance_discrimination_accuracy", "mask_id_accuracy", "matched_slots")
# TensorBoard tags are f"{SUMMARY_PREFIX}{name}".
SUMMARY_PREFIX = "diagnostics/"

Diagnostics = dict[str, tuple[tf.Tensor, tf.Tensor]]


def matching_diagnostics(mask_logits: tf.Tensor, matched: LossMatching) -> Diagnostics:
    """(sum, count) float32 scalars of each diagnostic over one (replica's) batch.

    Args:
      mask_logits: float [B, h, w, N], the model output the loss was computed on.
      matched: the loss's `LossMatching` for that batch.

    Returns:
      name -> (sum, count) for the names of `DIAGNOSTIC_NAMES`
      (``instance_discrimination_accuracy`` only when the loss computed its logits).
    """
    targets = matched.targets
    num_slots = mask_logits.shape[-1]
    # one_hot(-1) is an all-zero row: segments that are not present count nowhere.
    assigned = tf.one_hot(tf.cast(matched.matching, tf.int32), num_slots,
                          dtype=tf.float32)  # [B, K, N]
    num_matched = tf.reduce_sum(assigned)
    num_images = tf.cast(tf.shape(mask_logits)[0], tf.float32)
    result = {
        "matched_class_similarity": (tf.reduce_sum(assigned * matched.class_prob),
                                     num_matched),
        "matched_mask_similarity": (tf.reduce_sum(assigned * matched.dice), num_matched),
        "matched_slots": (num_matched, num_images),
    }
    slot = matched_slot_of_pixels(targets.pixel_segment, matched.matching)  # [B, h, w]
    predicted_slot = tf.argmax(mask_logits, axis=-1, output_type=tf.int32)
    result["mask_id_accuracy"] = _pixel_accuracy(predicted_slot, slot, slot >= 0)
    if matched.instance_logits is not None:
        own = targets.pixel_segment
        thing = tf.gather(targets.is_thing, tf.maximum(own, 0), batch_dims=1) & (own >= 0)
        predicted_mask = tf.argmax(matched.instance_logits, axis=-1, output_type=tf.int32)
        result["instance_discrimination_accuracy"] = _pixel_accuracy(predicted_mask, own,
                                                                     thing)
    return result


def _pixel_accuracy(predicted: tf.Tensor, target: tf.Tensor, counted: tf.Tensor
                    ) -> tuple[tf.Tensor, tf.Tensor]:
    correct = tf.logical_and(counted, tf.equal(predicted, target))
    return (tf.reduce_sum(tf.cast(correct, tf.float32)),
            tf.reduce_sum(tf.cast(counted, tf.float32)))


def losses_and_diagnostics(loss_fn: Callable[..., Mapping[str, tf.Tensor]],
                           outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor],
                           global_batch_size: int) -> tuple[dict[str, tf.Tensor], Diagnostics]:
    """The losses of `loss_fn` and, when it is a `MaXDeepLabLoss`, the diagnostics of its
    matching (other loss functions, e.g. test stand-ins: no diagnostics)."""
    if isinstance(loss_fn, MaXDeepLabLoss):
        losses, matched = loss_fn(outputs, targets, global_batch_size=global_batch_size,
                                  return_matching=True)
        return dict(losses), matching_diagnostics(
            tf.cast(outputs["mask_logits"], tf.float32), matched)
    return dict(loss_fn(outputs, targets, global_batch_size=global_batch_size)), {}


def diagnostic_values(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """name -> sum / count, for the names with a positive count (an evaluation without any
    thing pixel has no instance-discrimination accuracy, rather than a made-up 0)."""
    return {name: float(total) / float(count) for name, (total, count) in sums.items()
            if float(count) > 0}


class DiagnosticsAccumulator:
    """Sums of the (sum, count) pairs over a training loop, in variables (so the step can
    add to them inside its `tf.function`).

    Args:
      strategy: the training strategy; the variables are created in its scope on the first
        `add` (the names come from the loss function).
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self._strategy = strategy
        self._sums: dict[str, tuple[tf.Variable, tf.Variable]] = {}

    def add(self, diagnostics: Mapping[str, tuple[tf.Tensor, tf.Tensor]]) -> None:
        """Adds one step's (replica-summed) pairs."""
        missing = [name for name in diagnostics if name not in self._sums]
        if missing:
            with tf.init_scope(), self._strategy.scope():
                for name in missing:
                    self._sums[name] = tuple(
                        tf.Variable(0.0, trainable=False, name=f"diagnostic_{name}_{part}")
                        for part in ("sum", "count"))
        for name, pair in diagnostics.items():
            for variable, value in zip(self._sums[name], pair, strict=True):
                variable.assign_add(value)

    def reset(self) -> None:
        for pair in self._sums.values():
            for variable in pair:
                variable.assign(0.0)

    def result(self) -> dict[str, float]:
        """name -> the loop's pooled value (see `diagnostic_values`)."""
        return diagnostic_values({name: (total.numpy(), count.numpy())
                                  for name, (total, count) in self._sums.items()})
