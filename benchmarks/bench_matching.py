"""Benchmark: batched Hungarian matching backends (paper §3.2, docs/design.md §4 and §8).

Compares, in one run on the same random cost matrices (B=8, C=128, R in {20, 64, 128}):
  * our pure-TF backend compiled with XLA (float64 internally, and the float32 TPU path),
  * our scipy backend (`tf.numpy_function` over `linear_sum_assignment`) in a `tf.function`,
  * the model garden's DETR matcher (XLA), square-only, so R rows are padded to C with zeros.
Times are medians over several calls after a warm-up (compilation) call. Each backend's
total cost is checked against scipy's optimum. Goal (docs/design.md §8): tf ≥ 10× faster than
DETR at R=128 and ≥ 3× at R=20 and 64.

Run: .venv/bin/python benchmarks/bench_matching.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.optimize
import tensorflow as tf
from official.projects.detr.ops import matchers as detr_matchers

from max_deeplab.matching import hungarian_match, linear_sum_assignment_tf

BATCH = 8
COLS = 128
ROWS = (20, 64, 128)


def _median_seconds(fn, arg, repeats: int) -> tuple[float, np.ndarray]:
    out = fn(arg).numpy()  # warm-up: tracing and XLA compilation excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(arg).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _detr_assignment(square_cost: tf.Tensor) -> tf.Tensor:
    _, assignment = detr_matchers.hungarian_matching(square_cost)
    # Boolean [B, C, C] permutation matrix -> column of each row.
    return tf.argmax(tf.cast(assignment, tf.int32), axis=2, output_type=tf.int32)


def _check_total(cost: np.ndarray, assignment: np.ndarray, name: str) -> None:
    rows = np.arange(cost.shape[1])
    for b in range(cost.shape[0]):
        r, c = scipy.optimize.linear_sum_assignment(cost[b].astype(np.float64))
        optimum = cost[b][r, c].astype(np.float64).sum()
        total = cost[b][rows, assignment[b]].astype(np.float64).sum()
        if abs(total - optimum) > 1e-5 * max(abs(optimum), 1.0):
            raise AssertionError(f"{name}: total {total} != optimum {optimum} (element {b})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--detr_repeats", type=int, default=3, help="DETR is slow at R=128")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # DETR's matcher logs deprecation notices

    tf_xla = tf.function(lambda c: hungarian_match(c, backend="tf"), jit_compile=True)
    tf_xla_f32 = tf.function(
        lambda c: linear_sum_assignment_tf(c, compute_dtype=tf.float32), jit_compile=True
    )
    scipy_fn = tf.function(lambda c: hungarian_match(c, backend="scipy"))
    detr_xla = tf.function(_detr_assignment, jit_compile=True)

    rng = np.random.default_rng(0)
    header = (
        f"{'R':>4} {'DETR ms':>9} {'tf ms':>8} {'tf32 ms':>8} {'scipy ms':>9} "
        f"{'DETR/tf':>8} {'DETR/tf32':>9} {'tf/scipy':>9}"
    )
    print(f"Hungarian matching, B={BATCH}, C={COLS}, uniform costs; median of runs")
    print(header)
    print("-" * len(header))
    for rows in ROWS:
        cost = rng.random((BATCH, rows, COLS)).astype(np.float32)
        square = np.zeros((BATCH, COLS, COLS), np.float32)
        square[:, :rows] = cost  # padded with zero-cost rows, as a user of DETR's matcher would
        t_tf, out_tf = _median_seconds(tf_xla, tf.constant(cost), args.repeats)
        t_tf32, out_tf32 = _median_seconds(tf_xla_f32, tf.constant(cost), args.repeats)
        t_scipy, out_scipy = _median_seconds(scipy_fn, tf.constant(cost), args.repeats)
        t_detr, out_detr = _median_seconds(detr_xla, tf.constant(square), args.detr_repeats)
        _check_total(cost, out_tf, "tf")
        _check_total(cost, out_tf32, "tf32")
        _check_total(cost, out_scipy, "scipy")
        _check_total(cost, out_detr[:, :rows], "DETR")
        print(
            f"{rows:>4} {t_detr * 1e3:>9.1f} {t_tf * 1e3:>8.2f} {t_tf32 * 1e3:>8.2f} "
            f"{t_scipy * 1e3:>9.2f} {t_detr / t_tf:>8.1f} {t_detr / t_tf32:>9.1f} "
            f"{t_tf / t_scipy:>9.1f}"
        )
    print("tf = our XLA backend (float64 inside); tf32 = its float32 (TPU) path.")


if __name__ == "__main__":
    main()
