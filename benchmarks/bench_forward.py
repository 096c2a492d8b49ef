"""Forward-pass latency of MaX-DeepLab-S at 641x641, batch 1, on this CPU.

Prints the latency with plain `tf.function` and with `jit_compile=True` (XLA), in seconds and
in units of one 4096^3 fp32 matmul measured in the same run (docs/design.md §8: the reference
implementation's network forward, inference, tf.function, takes 3.74 units and 2.4 GB peak
RSS; target <= 0.6x: 2.2 units), and the achieved FLOP/s against that matmul's FLOP/s (the
machine's practical peak).

Usage: .venv/bin/python benchmarks/bench_forward.py [--config max_deeplab_s_coco_641.gin]
       [--repeats 3] [--no_xla]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402
from machine_units import matmul_unit, median_seconds  # noqa: E402

from max_deeplab.gin_config import parse_config  # noqa: E402
from max_deeplab.model import build_model  # noqa: E402
from max_deeplab.model.summary import model_flops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="max_deeplab_s_coco_641.gin")
    parser.add_argument("--size", type=int, default=641)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_xla", action="store_true")
    args = parser.parse_args()

    unit_s, peak = matmul_unit()
    print(f"unit: 4096^3 fp32 matmul = {unit_s:.3f} s ({peak / 1e9:.0f} GFLOP/s)")
    parse_config([args.config], [f"build_model.input_size = ({args.size}, {args.size})"])
    model = build_model()
    flops, semantic_flops = model_flops(model, (args.size, args.size))
    # Inference runs without the training-only semantic branch.
    model.semantic_head = None
    model.semantic_decoder = None
    images = tf.random.uniform([1, args.size, args.size, 3], 0, 255)
    print(f"model: {args.config} at {args.size}x{args.size}, {flops / 1e9:.1f} GFLOPs/forward")

    rows = []
    for label, jit in (("tf.function", False), ("tf.function + XLA", True)):
        if jit and args.no_xla:
            continue
        fn = tf.function(lambda x: model(x, training=False), jit_compile=jit)
        start = time.perf_counter()
        fn(images)["mask_logits"].numpy()
        first = time.perf_counter() - start
        seconds = median_seconds(lambda f=fn: f(images)["mask_logits"].numpy(),
                                 repeats=args.repeats, warmup=0)
        rows.append((label, first, seconds))
    print(f"{'mode':<20} {'first call s':>12} {'latency s':>10} {'units':>7} {'GFLOP/s':>8} "
          f"{'of peak':>8}")
    for label, first, seconds in rows:
        print(f"{label:<20} {first:>12.2f} {seconds:>10.3f} {seconds / unit_s:>7.2f} "
              f"{flops / seconds / 1e9:>8.1f} {flops / seconds / peak:>8.1%}")
    print("reference implementation (docs/design.md §8): 3.74 units (tf.function, inference); "
          "target <= 0.6x: 2.2 units")


if __name__ == "__main__":
    main()
