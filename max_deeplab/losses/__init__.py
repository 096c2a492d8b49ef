"""MaX-DeepLab training losses (paper §3.2 PQ-style loss, §4 auxiliary losses)."""

from max_deeplab.losses.auxiliary import (
    instance_discrimination_logits,
    instance_discrimination_loss,
    mask_id_cross_entropy,
    matched_slot_of_pixels,
    semantic_cross_entropy,
)
from max_deeplab.losses.max_deeplab_loss import LOSS_NAMES, LossMatching, MaXDeepLabLoss
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
    align_corners_indices,
    build_segment_targets,
    resize_labels_nearest,
)

__all__ = [
    "LOSS_NAMES",
    "SIMILARITIES",
    "LossMatching",
    "MaXDeepLabLoss",
    "SegmentTargets",
    "align_corners_indices",
    "build_segment_targets",
    "class_log_prob_of_segments",
    "instance_discrimination_logits",
    "instance_discrimination_loss",
    "mask_id_cross_entropy",
    "matched_slot_of_pixels",
    "match_segments",
    "pq_similarity",
    "pq_style_loss",
    "resize_labels_nearest",
    "semantic_cross_entropy",
    "soft_dice",
]
