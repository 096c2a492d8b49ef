"""Host-side exact assignment through `scipy.optimize.linear_sum_assignment`.

Fast on CPU/GPU hosts (paper §3.2's Hungarian matching); wrapped in `tf.numpy_function` so it
runs inside `tf.function` and `strategy.run`, but XLA cannot compile it (no TPU steps).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from scipy.optimize import linear_sum_assignment


def _assign_numpy(cost: np.ndarray, row_valid: np.ndarray) -> np.ndarray:
    """int32 [B, R]: scipy's optimal column per valid row, -1 for invalid rows."""
    batch, num_rows, _ = cost.shape
    out = np.full((batch, num_rows), -1, dtype=np.int32)
    for b in range(batch):
        rows = np.flatnonzero(row_valid[b])
        if rows.size == 0:
            continue
        sub = np.asarray(cost[b, rows], dtype=np.float64)
        if not np.all(np.isfinite(sub)):
            raise ValueError(
                f"hungarian_match: cost of batch element {b} contains NaN or Inf on valid rows"
            )
        picked_rows, picked_cols = linear_sum_assignment(sub)
        out[b, rows[picked_rows]] = picked_cols
    return out


def linear_sum_assignment_scipy(cost: tf.Tensor, row_valid: tf.Tensor) -> tf.Tensor:
    """Batched `linear_sum_assignment` as a TF op: cost [B, R, C], row_valid bool [B, R]."""
    out = tf.numpy_function(
        _assign_numpy, [cost, row_valid], tf.int32, stateful=False, name="hungarian_scipy"
    )
    out.set_shape(row_valid.shape)
    return out
