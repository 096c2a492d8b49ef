"""Training: RAdam + Lookahead, the learning-rate schedule, and the orbit-based trainer
(paper §4, DESIGN.md §7)."""

from max_deeplab.training.optimizers import (
    BACKBONE_VARIABLE_REGEX,
    KERNEL_VARIABLE_REGEX,
    Lookahead,
    RAdam,
    build_optimizer,
)
from max_deeplab.training.schedules import build_learning_rate_schedule

__all__ = [
    "BACKBONE_VARIABLE_REGEX",
    "KERNEL_VARIABLE_REGEX",
    "Lookahead",
    "RAdam",
    "build_learning_rate_schedule",
    "build_optimizer",
]
