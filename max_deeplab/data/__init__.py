"""Data: COCO panoptic -> TFRecord conversion, the synthetic data set, the input pipeline.

TensorFlow-free parts (`schema`, `metadata`, `coco_format`, `synthetic`) can be imported
alone; the names below that need TensorFlow (`decode_example`, `build_dataset`, ...) are
loaded on first access, so ``import max_deeplab.data.synthetic`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from max_deeplab.data.metadata import MetadataError, find_metadata, load_metadata
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC
from max_deeplab.panoptic_labels import LABEL_DIVISOR as DEFAULT_LABEL_DIVISOR

_LAZY = {
    "decode_example": "max_deeplab.data.tfrecord",
    "make_example": "max_deeplab.data.tfrecord",
    "build_dataset": "max_deeplab.data.pipeline",
    "panoptic_to_targets": "max_deeplab.data.pipeline",
    "preprocess_train": "max_deeplab.data.pipeline",
    "preprocess_eval": "max_deeplab.data.pipeline",
    "convert": "max_deeplab.data.converter",
    "ConversionError": "max_deeplab.data.coco_format",
    "load_tfds_panoptic": "max_deeplab.data.tfds_source",
    "write_synthetic_dataset": ("max_deeplab.data.synthetic", "write_dataset"),
}

__all__ = ["DEFAULT_LABEL_DIVISOR", "IGNORE_PANOPTIC", "MetadataError", "find_metadata",
           "load_metadata", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'max_deeplab.data' has no attribute {name!r}")
    module_name, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module_name), attr)
