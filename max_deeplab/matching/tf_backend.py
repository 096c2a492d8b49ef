"""Pure-TensorFlow exact linear assignment, compilable by XLA (so it runs inside a TPU step).

MaX-DeepLab (paper §3.2) matches the K ground-truth masks to the N predicted masks with the
Hungarian algorithm. On TPU the training step is compiled whole by XLA, which cannot call
back into scipy, so this module solves the rectangular assignment problem (R rows ≤ C columns)
with TensorFlow ops only:

* successive shortest augmenting paths with dual potentials (the Jonker–Volgenant form of the
  Hungarian method): rows are inserted one at a time; for each, a Dijkstra-like search over
  reduced costs ``cost[i, j] - u[i] - v[j]`` grows a tree of columns until it reaches a free
  column, the potentials are updated so reduced costs stay non-negative, and the assignment
  is flipped along the path. Each insertion keeps the partial assignment optimal, so the
  final one is exactly optimal (same total as ``scipy.optimize.linear_sum_assignment``).
* The Dijkstra step is vectorised over columns and the whole solver over the batch:
  every ``tf.while_loop`` runs until all batch elements are done, with finished elements
  masked out, so all shapes are static and XLA compiles it.

Work is O(R·C·R) per matrix in the worst case, but the number of *sequential* loop
iterations is what matters on an accelerator: at most R·(R+1)/2 Dijkstra steps plus the
path flips, each an O(B·C) vector operation.
"""

from __future__ import annotations

import tensorflow as tf


def linear_sum_assignment_tf(
    cost: tf.Tensor,
    row_valid: tf.Tensor | None = None,
    compute_dtype: tf.DType = tf.float64,
) -> tf.Tensor:
    """Minimum-cost assignment of each row to a distinct column, batched, in pure TensorFlow.

    Args:
      cost: float [B, R, C] with R ≤ C; must be finite on valid rows (see below).
      row_valid: bool [B, R] or None (all valid). Invalid rows are never inserted, so they
        neither receive a column nor influence the valid rows' assignment.
      compute_dtype: dtype for costs and potentials. float64 makes the result exact to
        ~1e-12 relative even for costs spanning many orders of magnitude; TPUs lack float64,
        where float32 is used (exact for integer costs below 2**24, otherwise optimal up to
        float32 rounding of the potentials).

    Returns:
      int32 [B, R]: column of each row, -1 for invalid rows. If a batch element has a
      non-finite cost on a valid row, all its rows get -1 (a sentinel rather than a wrong
      match: XLA drops assertion ops, so the caller's eager/graph assertion cannot fire there).
    """
    cost = tf.convert_to_tensor(cost)
    cost = tf.cast(cost, compute_dtype)
    # Static sizes where known keep every loop variable's shape fixed across iterations.
    dynamic = tf.shape(cost)
    batch, num_rows, num_cols = (
        cost.shape[k] if cost.shape[k] is not None else dynamic[k] for k in range(3)
    )
    if isinstance(num_rows, int) and num_rows == 0:
        # Nothing to match; XLA also rejects slicing a column out of a zero-width tensor.
        return tf.zeros([batch, 0], tf.int32)
    if row_valid is None:
        row_valid = tf.ones([batch, num_rows], tf.bool)
    row_valid = tf.cast(row_valid, tf.bool)
    result_rows = num_rows
    if not isinstance(num_rows, int):
        # R is known only when the program runs, and may be 0 then: XLA compiles the loop
        # body (which slices row i) even when it never runs, and rejects a slice of a
        # zero-row tensor. One padding row that is never inserted keeps every slice valid;
        # its (-1) result is cut off at the end.
        cost = tf.pad(cost, [[0, 0], [0, 1], [0, 0]])
        row_valid = tf.pad(row_valid, [[0, 0], [0, 1]])
        num_rows = num_rows + 1

    # Non-finite costs on valid rows poison the whole batch element: mark it bad, zero its
    # costs (so the loops below stay finite and terminate) and return -1 for it at the end.
    finite = tf.math.is_finite(cost) | ~row_valid[:, :, None]
    element_ok = tf.reduce_all(finite, axis=[1, 2])  # [B]
    cost = tf.where(finite & element_ok[:, None, None], cost, tf.zeros_like(cost))
    # Invalid rows are skipped; their costs are zeroed so nothing else reads garbage.
    cost = tf.where(row_valid[:, :, None], cost, tf.zeros_like(cost))

    inf = tf.constant(float("inf"), compute_dtype)
    zero = tf.constant(0.0, compute_dtype)
    # Column index `num_cols` is a dummy root column (the e-maxx formulation's column 0):
    # before a search it "holds" the row being inserted, and the search starts from it.
    dummy = num_cols
    col_range = tf.range(num_cols + 1, dtype=tf.int32)[None, :]  # [1, C+1]
    real_col = col_range < num_cols  # [1, C+1]

    def gather_cols(x: tf.Tensor, j: tf.Tensor) -> tf.Tensor:
        """x[b, j[b]] for x [B, C+1]."""
        return tf.gather(x, j[:, None], batch_dims=1)[:, 0]

    def set_cols(x: tf.Tensor, j: tf.Tensor, value: tf.Tensor, where: tf.Tensor) -> tf.Tensor:
        """x[b, j[b]] = value[b] for batch elements with where[b]."""
        hit = tf.equal(col_range, j[:, None]) & where[:, None]
        return tf.where(hit, value[:, None], x)

    def insert_row(i: tf.Tensor, u: tf.Tensor, v: tf.Tensor, p: tf.Tensor):
        """Inserts row i into every batch element's optimal partial assignment."""
        active = row_valid[:, i] & element_ok  # [B] still searching for a free column
        p = set_cols(p, tf.fill([batch], dummy), tf.fill([batch], i), tf.ones([batch], tf.bool))
        j0 = tf.fill([batch], dummy)
        minv = tf.fill([batch, num_cols + 1], inf)  # shortest reduced distance to each column
        way = tf.fill([batch, num_cols + 1], dummy)  # predecessor column on that path
        used = tf.zeros([batch, num_cols + 1], tf.bool)  # columns already in the tree
        in_tree_rows = tf.zeros([batch, num_rows], tf.bool)

        def search_cond(step, active, *_):
            # Each step adds one column to the tree, so C+1 steps always suffice; the bound
            # only guards termination if an invariant were ever broken by rounding.
            return tf.reduce_any(active) & (step <= num_cols)

        def search_body(step, active, j0, u, v, minv, way, used, in_tree_rows):
            used = used | (tf.equal(col_range, j0[:, None]) & active[:, None])
            i0 = gather_cols(p, j0)  # row owning the newest tree column
            in_tree_rows = in_tree_rows | (
                tf.equal(tf.range(num_rows)[None, :], i0[:, None]) & active[:, None]
            )
            row_cost = tf.gather(cost, tf.maximum(i0, 0)[:, None], batch_dims=1)[:, 0]  # [B, C]
            u_i0 = tf.gather(u, tf.maximum(i0, 0)[:, None], batch_dims=1)  # [B, 1]
            reduced = tf.concat([row_cost, tf.fill([batch, 1], inf)], axis=1) - u_i0 - v
            free = ~used & real_col
            better = free & (reduced < minv) & active[:, None]
            minv = tf.where(better, reduced, minv)
            way = tf.where(better, j0[:, None], way)
            candidates = tf.where(free, minv, inf)
            j1 = tf.argmin(candidates, axis=1, output_type=tf.int32)
            delta = tf.where(active, tf.reduce_min(candidates, axis=1), zero)[:, None]
            # Dual update: tree rows up, tree columns down, pending distances shrink.
            u = u + tf.where(in_tree_rows, delta, zero)
            v = v - tf.where(used, delta, zero)
            minv = tf.where(used | ~active[:, None], minv, minv - delta)
            j0 = tf.where(active, j1, j0)
            active = active & (gather_cols(p, j0) >= 0)  # stop on reaching a free column
            return step + 1, active, j0, u, v, minv, way, used, in_tree_rows

        searching = active
        _, _, j0, u, v, _, way, _, _ = tf.while_loop(
            search_cond,
            search_body,
            (tf.constant(0), active, j0, u, v, minv, way, used, in_tree_rows),
        )

        # Flip the assignment along the path from the free column j0 back to the root.
        def flip_cond(step, flipping, *_):
            return tf.reduce_any(flipping) & (step <= num_cols)

        def flip_body(step, flipping, j0, p):
            j1 = gather_cols(way, j0)
            p = set_cols(p, j0, gather_cols(p, j1), flipping)
            j0 = tf.where(flipping, j1, j0)
            return step + 1, flipping & tf.not_equal(j0, dummy), j0, p

        _, _, _, p = tf.while_loop(
            flip_cond, flip_body, (tf.constant(0), searching & (j0 != dummy), j0, p)
        )
        return u, v, p

    def outer_cond(i, *_):
        return i < num_rows

    def outer_body(i, u, v, p):
        u, v, p = insert_row(i, u, v, p)
        return i + 1, u, v, p

    u0 = tf.zeros([batch, num_rows], compute_dtype)
    v0 = tf.zeros([batch, num_cols + 1], compute_dtype)
    p0 = tf.fill([batch, num_cols + 1], -1)  # row assigned to each column, -1 if free
    _, _, _, p = tf.while_loop(outer_cond, outer_body, (tf.constant(0), u0, v0, p0))

    # Invert column->row into row->column.
    owner = p[:, :num_cols]
    hits = tf.equal(owner[:, :, None], tf.range(num_rows, dtype=tf.int32)[None, None, :])
    # A row is owned by at most one column: the sum picks it (and, unlike an argmax, is
    # defined when C = 0, which XLA may only learn when the program runs).
    col = tf.reduce_sum(tf.cast(hits, tf.int32) * tf.range(num_cols)[None, :, None],
                        axis=1)  # [B, R]
    assigned = tf.reduce_any(hits, axis=1) & row_valid & element_ok[:, None]
    return tf.where(assigned, col, -tf.ones_like(col))[:, :result_rows]
