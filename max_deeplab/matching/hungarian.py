"""Hungarian matching of ground-truth masks to predicted masks (paper §3.2, docs/design.md §4).

MaX-DeepLab's PQ-style loss needs the one-to-one assignment σ maximising the total similarity
between the K ground-truth masks and the N predictions; with cost = −similarity this is a
rectangular linear assignment problem (K ≤ N). Two exact backends share one interface:

* ``"scipy"``: `scipy.optimize.linear_sum_assignment` on the host through `tf.numpy_function`
  (fast on CPU/GPU; not XLA-compilable).
* ``"tf"``: a pure-TensorFlow shortest-augmenting-path solver compiled by XLA (TPU steps).
* ``"auto"``: ``"tf"`` wherever the calling code is being compiled by XLA (a `TPUStrategy`
  step, or any `tf.function(jit_compile=True)`, e.g. `max-deeplab train --jit_compile`),
  else ``"scipy"``. The choice is made here, when the matcher is traced, and nowhere else:
  the loss passes its configured backend (gin `MaXDeepLabLoss.matching_backend`, default
  ``"auto"``) through unchanged, so an explicit binding always wins.
"""

from __future__ import annotations

import tensorflow as tf

from max_deeplab.matching.scipy_backend import linear_sum_assignment_scipy
from max_deeplab.matching.tf_backend import linear_sum_assignment_tf
from max_deeplab.xla_compilation import in_xla_compilation

BACKENDS = ("auto", "scipy", "tf")


def _under_tpu_strategy() -> bool:
    strategy = tf.distribute.get_strategy()
    tpu_types = tuple(
        t
        for t in (
            getattr(tf.distribute, "TPUStrategy", None),
            getattr(tf.distribute.experimental, "TPUStrategy", None),
        )
        if t is not None
    )
    return bool(tpu_types) and isinstance(strategy, tpu_types)


def resolve_backend(backend: str) -> str:
    """Maps ``"auto"`` to the concrete backend where the matcher is being traced: ``"tf"``
    inside an XLA compilation (TPU, `jit_compile=True`), else ``"scipy"``.

    Raises:
      ValueError: unknown backend, or ``"scipy"`` inside an XLA compilation (its host call
        cannot be compiled).
    """
    if backend not in BACKENDS:
        raise ValueError(f"hungarian_match: backend must be one of {BACKENDS}, got {backend!r}")
    xla = _under_tpu_strategy() or in_xla_compilation()
    if backend == "auto":
        return "tf" if xla else "scipy"
    if backend == "scipy" and xla:
        raise ValueError(
            "hungarian_match: backend 'scipy' (a host call) cannot run inside an XLA-compiled "
            "step (TPU or --jit_compile); bind MaXDeepLabLoss.matching_backend = 'auto' or "
            "'tf'")
    return backend


def hungarian_match(
    cost: tf.Tensor,
    backend: str = "auto",
    row_valid: tf.Tensor | None = None,
) -> tf.Tensor:
    """Column assigned to each row so that the total cost is minimal (paper §3.2).

    Args:
      cost: float [B, R, C] with R ≤ C (rows: ground-truth masks, columns: predictions).
        Must be finite on valid rows; NaN/Inf raise `tf.errors.InvalidArgumentError` in
        eager and graph mode. Under XLA (`jit_compile=True`), where assertions are dropped,
        the ``"tf"`` backend instead returns -1 for every row of an affected batch element.
      backend: ``"scipy"``, ``"tf"`` or ``"auto"`` (``"tf"`` inside an XLA compilation,
        else scipy; see `resolve_backend`).
      row_valid: bool [B, R] marking real rows (None: all valid). Invalid (padded) rows get -1
        and do not influence the assignment of the valid rows.

    Returns:
      int32 [B, R]: the matched column per row, distinct within each batch element, -1 for
      invalid rows.

    Raises:
      ValueError: unknown backend, ``"scipy"`` under XLA, wrong rank, or more rows than
        columns.
    """
    backend = resolve_backend(backend)
    # The assignment is piecewise constant in the costs: no gradient, and stopping it keeps
    # a surrounding GradientTape from storing the solver's loop intermediates.
    cost = tf.stop_gradient(tf.convert_to_tensor(cost))
    if not cost.dtype.is_floating:
        cost = tf.cast(cost, tf.float32)
    if cost.shape.rank is not None and cost.shape.rank != 3:
        raise ValueError(f"hungarian_match: cost must be [B, R, C], got shape {cost.shape}")
    num_rows, num_cols = cost.shape[1], cost.shape[2]
    if num_rows is not None and num_cols is not None and num_rows > num_cols:
        raise ValueError(
            f"hungarian_match: needs rows <= columns, got R={num_rows} rows and "
            f"C={num_cols} columns"
        )
    dynamic_checks = []
    if num_rows is None or num_cols is None:
        dynamic_checks.append(
            tf.debugging.assert_less_equal(
                tf.shape(cost)[1],
                tf.shape(cost)[2],
                message="hungarian_match: needs rows R <= columns C",
            )
        )
    if row_valid is None:
        row_valid = tf.ones(tf.shape(cost)[:2], tf.bool)
    row_valid = tf.cast(row_valid, tf.bool)
    if row_valid.shape.rank is not None and row_valid.shape.rank != 2:
        raise ValueError(f"hungarian_match: row_valid must be [B, R], got {row_valid.shape}")
    row_valid = tf.ensure_shape(row_valid, cost.shape[:2])

    # Padded rows may hold anything; only valid rows must be finite.
    checked = tf.where(row_valid[:, :, None], cost, tf.zeros_like(cost))
    with tf.control_dependencies(dynamic_checks):
        checked = tf.debugging.assert_all_finite(
            checked, "hungarian_match: cost contains NaN or Inf on valid rows"
        )
    # Tie the check to the solver input so graph mode cannot prune it.
    cost = tf.where(row_valid[:, :, None], checked, cost)

    if backend == "scipy":
        return linear_sum_assignment_scipy(cost, row_valid)
    compute_dtype = tf.float32 if _under_tpu_strategy() else tf.float64
    return linear_sum_assignment_tf(cost, row_valid, compute_dtype=compute_dtype)
