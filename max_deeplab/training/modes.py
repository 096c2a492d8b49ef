"""What a run can do (`--mode`) and the distribution strategies it runs under (`--strategy`).

TensorFlow-free, so that the verbs can define and check these flags before importing it.
"""
from __future__ import annotations

import json
import os

# `train` / `evaluate` (`max_deeplab.training.experiment.run_experiment`).
MODES = ("train", "eval", "train_and_eval", "continuous_eval")
# ImageNet pretraining (`max_deeplab.training.pretrain.run_pretraining`).
PRETRAIN_MODES = ("train", "eval", "train_and_eval")
STRATEGIES = ("mirrored", "multi_worker", "one_device", "tpu")
TRAINING_MODES = ("train", "train_and_eval")


def is_training(mode: str) -> bool:
    """Whether `mode` trains (and so reads training data and writes checkpoints)."""
    return mode in TRAINING_MODES


def is_evaluating(mode: str) -> bool:
    """Whether `mode` evaluates (and so reads evaluation data)."""
    return mode != "train"


def default_strategy(tpu: str | None, read_tf_config: bool = True) -> str:
    """The strategy when none is named: "tpu" with a TPU, "multi_worker" when TF_CONFIG
    describes a cluster (if `read_tf_config`), else "mirrored"."""
    if tpu:
        return "tpu"
    if read_tf_config and json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster"):
        return "multi_worker"
    return "mirrored"
