"""Panoptic quality (PQ / SQ / RQ; paper §4 "Experiments" reports PQ as the main metric).

- `pq_compute` / `max-deeplab pq`: COCO panoptic files, COCO reference evaluator semantics,
  fast and without TensorFlow (`coco_panoptic`).
- `PanopticQualityAccumulator`: streaming numpy evaluator over panoptic label maps
  (class * label_divisor + instance) for evaluation during training (`accumulator`), on
  every strategy: the evaluation step returns its label maps to the host (on TPU too).
"""
from __future__ import annotations

from max_deeplab.evaluation.coco_panoptic import PanopticEvalError, pq_compute
from max_deeplab.evaluation.pq_core import PQStats, format_table

__all__ = ["PQStats", "PanopticEvalError", "PanopticQualityAccumulator", "format_table",
           "pq_compute"]


def __getattr__(name: str):
    # Lazy: keeps `import max_deeplab.evaluation` free of TensorFlow and numpy for the `pq`
    # verb (both cost start-up time in its timed process).
    if name == "PanopticQualityAccumulator":
        from max_deeplab.evaluation.accumulator import PanopticQualityAccumulator

        return PanopticQualityAccumulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
