"""The complete MaX-DeepLab training objective (paper §3.2 and §4, docs/design.md §4).

``total = w_PQ · L_PQ / N + w_ID · L_instance + w_mask · L_maskID + w_sem · L_semantic``
with the paper's weights 3.0, 1.0, 0.3, 1.0. Ground-truth masks are matched to predictions
once per step (Hungarian on −similarity); the matching drives both the PQ-style loss and
the mask-ID cross-entropy.

Distribution: the loss runs per replica. Every term is first computed per image; the sum
over the local images is divided by the *global* batch size, so summing the replicas'
losses (what `tf.distribute` does with gradients) gives the global per-image mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import gin
import tensorflow as tf

from max_deeplab.losses.auxiliary import (
    instance_discrimination_logits,
    instance_discrimination_loss_from_logits,
    mask_id_cross_entropy,
    semantic_cross_entropy,
)
from max_deeplab.losses.pq_style import (
    SIMILARITIES,
    class_log_prob_of_segments,
    match_segments,
    pq_similarity,
    pq_style_loss,
    soft_dice,
)
from max_deeplab.losses.targets import (
    SegmentTargets,
    build_segment_targets,
    resize_labels_nearest,
)
from max_deeplab.matching import BACKENDS
from max_deeplab.model.outputs import check_outputs

LOSS_NAMES = ("pq", "pq_positive", "pq_negative", "instance_discrimination", "mask_id", "semantic")

_TARGET_KEYS = ("segment_ids", "segment_classes", "segment_valid", "segment_is_thing", "semantic")


class LossMatching(NamedTuple):
    """What one loss call matched, for training diagnostics (paper §4.3, Figs. 5-6).

    Attributes:
      targets: the ground truth at the output stride (`SegmentTargets`).
      dice: float [B, K, N] ``Dice(m_i, m̂_j)``.
      class_prob: float [B, K, N] ``p̂_j(c_i)``.
      matching: int32 [B, K] σ(i), -1 for segments that are not present.
      instance_logits: float [B, h, w, K] the instance-discrimination logits
        ``t_i · g_hw / τ`` (absent masks far below any real logit), None when that loss
        is off.
    """

    targets: SegmentTargets
    dice: tf.Tensor
    class_prob: tf.Tensor
    matching: tf.Tensor
    instance_logits: tf.Tensor | None


@gin.configurable
class MaXDeepLabLoss:
    """MaX-DeepLab loss: PQ-style loss plus the three auxiliary losses (paper §3.2, §4).

    Call with the model outputs and the docs/design.md §4 targets; returns a dict of scalar
    float32 losses, each already multiplied by its weight: ``pq`` (= ``pq_positive`` +
    ``pq_negative``), ``instance_discrimination``, ``mask_id``, ``semantic``, and ``total``
    (their sum). A term switched off is reported as 0 and not computed.
    """

    def __init__(
        self,
        pq_weight: float = 3.0,
        pq_alpha: float = 0.75,
        similarity: str = "pq",
        instance_discrimination_weight: float = 1.0,
        instance_discrimination_temperature: float = 0.3,
        mask_id_weight: float = 0.3,
        semantic_weight: float = 1.0,
        use_instance_discrimination: bool = True,
        use_mask_id: bool = True,
        use_semantic: bool = True,
        matching_backend: str = "auto",
    ) -> None:
        """Paper defaults (§4 "Training"): PQ-style weight 3.0 with α = 0.75, instance
        discrimination τ = 0.3 and weight 1.0, mask-ID weight 0.3, semantic weight 1.0.

        Args:
          pq_weight: weight of the PQ-style loss (which is normalised by N).
          pq_alpha: α balancing positive (α) and negative (1 − α) masks.
          similarity: ``"pq"`` (p̂ · Dice with dynamic weights, the paper's) or ``"rq_sq"``
            (p̂ + Dice, unweighted; the Table 5 ablation).
          instance_discrimination_weight, instance_discrimination_temperature: weight, τ.
          mask_id_weight: weight of the mask-ID cross-entropy.
          semantic_weight: weight of the semantic cross-entropy.
          use_instance_discrimination, use_mask_id, use_semantic: switch the auxiliary
            losses off (paper's loss ablations).
          matching_backend: ``"auto"``, ``"scipy"`` or ``"tf"`` (XLA-compilable; TPU).
        """
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"MaXDeepLabLoss: similarity must be one of {SIMILARITIES}, got {similarity!r}"
            )
        if matching_backend not in BACKENDS:
            raise ValueError(
                f"MaXDeepLabLoss: matching_backend must be one of {BACKENDS}, "
                f"got {matching_backend!r}"
            )
        if not 0.0 <= pq_alpha <= 1.0:
            raise ValueError(f"MaXDeepLabLoss: pq_alpha must be in [0, 1], got {pq_alpha}")
        if instance_discrimination_temperature <= 0.0:
            raise ValueError(
                "MaXDeepLabLoss: instance_discrimination_temperature must be > 0, got "
                f"{instance_discrimination_temperature}"
            )
        self.pq_weight = float(pq_weight)
        self.pq_alpha = float(pq_alpha)
        self.similarity = similarity
        self.instance_discrimination_weight = float(instance_discrimination_weight)
        self.instance_discrimination_temperature = float(instance_discrimination_temperature)
        self.mask_id_weight = float(mask_id_weight)
        self.semantic_weight = float(semantic_weight)
        self.use_instance_discrimination = bool(use_instance_discrimination)
        self.use_mask_id = bool(use_mask_id)
        self.use_semantic = bool(use_semantic)
        self.matching_backend = matching_backend

    def __call__(
        self,
        outputs: Mapping[str, tf.Tensor],
        targets: Mapping[str, tf.Tensor],
        global_batch_size: int | None = None,
        return_matching: bool = False,
    ) -> dict[str, tf.Tensor] | tuple[dict[str, tf.Tensor], LossMatching]:
        """Losses of one (replica's) batch.

        Args:
          outputs: model outputs at stride 4: ``mask_logits [B, h, w, N]``,
            ``class_logits [B, N, C+1]`` (last = void ∅), ``pixel_feature [B, h, w, D]``,
            ``semantic_logits [B, h, w, C]``. Only the keys of enabled terms are required.
          targets: full-resolution targets: ``segment_ids [B, H, W]`` (-1 = void, crowd,
            padding), ``segment_classes``, ``segment_valid``, ``segment_is_thing`` ([B, K_max]),
            ``semantic [B, H, W]`` (-1 = ignore). K_max ≤ N is required.
          global_batch_size: the batch size summed over replicas; per-image losses are
            summed and divided by it. Defaults to the local batch size.
          return_matching: also return the `LossMatching` the losses were computed from
          (for `max_deeplab.training.diagnostics`; nothing is computed twice).

        Returns:
          dict of scalar float32 tensors: the weighted terms of `LOSS_NAMES` and ``total``;
          with ``return_matching``, the pair (that dict, `LossMatching`).
        """
        self._check_inputs(outputs, targets)
        mask_logits = tf.cast(outputs["mask_logits"], tf.float32)
        class_logits = tf.cast(outputs["class_logits"], tf.float32)
        # Static sizes when known (the usual case), so every derived shape stays static.
        height, width = mask_logits.shape[1], mask_logits.shape[2]
        if height is None or width is None:
            dynamic = tf.shape(mask_logits)
            height = dynamic[1] if height is None else height
            width = dynamic[2] if width is None else width

        gt = build_segment_targets(
            targets["segment_ids"],
            targets["segment_classes"],
            targets["segment_valid"],
            targets["segment_is_thing"],
            height,
            width,
        )

        # PQ-style loss (paper §3.2).
        mask_probs = tf.nn.softmax(mask_logits, axis=-1)
        class_log_probs = tf.nn.log_softmax(class_logits, axis=-1)
        dice = soft_dice(gt.masks, mask_probs, gt.labelled)
        class_log_prob = class_log_prob_of_segments(class_log_probs, gt.classes)
        class_prob = tf.exp(class_log_prob)
        similarity = pq_similarity(dice, class_prob, self.similarity)
        matching = match_segments(similarity, gt.present, self.matching_backend)
        positive, negative = pq_style_loss(
            dice,
            class_log_prob,
            class_log_probs[..., -1],
            matching,
            alpha=self.pq_alpha,
            similarity=self.similarity,
        )

        if global_batch_size is None:
            denominator = tf.cast(tf.shape(mask_logits)[0], tf.float32)
        else:
            if global_batch_size <= 0:
                raise ValueError(
                    f"MaXDeepLabLoss: global_batch_size must be positive, got {global_batch_size}"
                )
            denominator = tf.constant(float(global_batch_size), tf.float32)

        def reduce(per_image: tf.Tensor, weight: float) -> tf.Tensor:
            return weight * tf.reduce_sum(per_image) / denominator

        zero = tf.constant(0.0, tf.float32)
        losses = {
            "pq_positive": reduce(positive, self.pq_weight),
            "pq_negative": reduce(negative, self.pq_weight),
        }
        losses["pq"] = losses["pq_positive"] + losses["pq_negative"]

        instance_logits = None
        if self.use_instance_discrimination:
            instance_logits = instance_discrimination_logits(
                tf.cast(outputs["pixel_feature"], tf.float32),
                gt.masks,
                gt.present,
                temperature=self.instance_discrimination_temperature,
            )
            per_image = instance_discrimination_loss_from_logits(
                instance_logits, gt.masks, gt.is_thing
            )
            losses["instance_discrimination"] = reduce(
                per_image, self.instance_discrimination_weight
            )
        else:
            losses["instance_discrimination"] = zero

        if self.use_mask_id:
            per_image = mask_id_cross_entropy(mask_logits, gt.pixel_segment, matching)
            losses["mask_id"] = reduce(per_image, self.mask_id_weight)
        else:
            losses["mask_id"] = zero

        if self.use_semantic:
            semantic_logits = tf.cast(outputs["semantic_logits"], tf.float32)
            semantic = resize_labels_nearest(
                targets["semantic"],
                semantic_logits.shape[1] or tf.shape(semantic_logits)[1],
                semantic_logits.shape[2] or tf.shape(semantic_logits)[2],
            )
            per_image = semantic_cross_entropy(semantic_logits, semantic)
            losses["semantic"] = reduce(per_image, self.semantic_weight)
        else:
            losses["semantic"] = zero

        losses["total"] = tf.add_n(
            [losses[name] for name in ("pq", "instance_discrimination", "mask_id", "semantic")]
        )
        if return_matching:
            return losses, LossMatching(gt, dice, class_prob, matching, instance_logits)
        return losses

    def _required_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        output_keys = ["mask_logits", "class_logits"]
        target_keys = ["segment_ids", "segment_classes", "segment_valid", "segment_is_thing"]
        if self.use_instance_discrimination:
            output_keys.append("pixel_feature")
        if self.use_semantic:
            output_keys.append("semantic_logits")
            target_keys.append("semantic")
        return tuple(output_keys), tuple(target_keys)

    def _check_inputs(
        self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]
    ) -> None:
        """Clear errors for missing keys and inconsistent static shapes: the outputs against
        the model's output contract (`max_deeplab.model.outputs`), then the targets."""
        output_keys, target_keys = self._required_keys()
        num_slots = check_outputs(outputs, output_keys, "MaXDeepLabLoss").num_slots
        missing = [k for k in target_keys if k not in targets]
        if missing:
            raise KeyError(f"MaXDeepLabLoss: targets lack {missing}; expected keys {_TARGET_KEYS}")
        segments_shape = tf.TensorShape(targets["segment_classes"].shape)
        if segments_shape.rank != 2:
            raise ValueError(
                f"MaXDeepLabLoss: segment_classes must be [B, K_max], got {segments_shape}"
            )
        k_max = segments_shape[1]
        if k_max is not None and k_max > num_slots:
            raise ValueError(
                f"MaXDeepLabLoss: K_max = {k_max} ground-truth segments per image exceeds the "
                f"N = {num_slots} predicted masks; each segment needs its own prediction: "
                f"bind build_dataset.k_max = {num_slots} (or raise "
                "MaXDeepLabEncoder.num_mask_slots)"
            )
