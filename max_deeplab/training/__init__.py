"""Training: RAdam + Lookahead, the learning-rate schedule, the orbit-based trainer and the
task that assembles a run (paper §4, docs/design.md §7).

The names below are loaded on first access, so that TensorFlow-free modules of this package
(`modes`, `run_directory`) can be imported alone, as the verbs do before TensorFlow.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Lookahead": "max_deeplab.training.optimizers",
    "RAdam": "max_deeplab.training.optimizers",
    "build_optimizer": "max_deeplab.training.optimizers",
    "build_learning_rate_schedule": "max_deeplab.training.schedules",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'max_deeplab.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
