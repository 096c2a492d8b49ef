"""Post-processing time per image at 641x641 (DESIGN.md §8), in matmul units.

Random MaX-DeepLab-S-shaped outputs (N = 128 slots, C = 133 classes, stride-4 logits
161x161 upsampled to 641x641) go through `max_deeplab.inference.postprocess` under
`tf.function` and under `tf.function(jit_compile=True)`. Times are divided by one
4096x4096 fp32 matmul measured in the same run, so the ratio is comparable across machines.
Reference (deeplab2's post-processor, same machine kind): 0.17 units; target ≤ 0.08.

    python benchmarks/bench_postprocess.py [--repeats 5] [--batch 1] [--logits smooth|white]

Without XLA the post-processor upsamples only kept / candidate slots (dynamic shapes); the
static all-slot computation is also timed (``dynamic_shapes=False``, what XLA runs).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

from max_deeplab.inference import postprocess

REFERENCE_UNITS = 0.17
TARGET_UNITS = 0.08


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up (tracing / compilation)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_unit(repeats: int) -> float:
    """Seconds for one 4096x4096 @ 4096x4096 fp32 matmul (the benchmark's unit)."""
    a = tf.random.normal([4096, 4096], seed=0)
    b = tf.random.normal([4096, 4096], seed=1)
    return _best_time(lambda: tf.matmul(a, b).numpy(), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=641)
    parser.add_argument("--logits", choices=("smooth", "white"), default="smooth",
                        help="smooth: spatially smooth mask logits (blob-shaped segments, "
                        "like a trained network's); white: i.i.d. per low-res pixel (worst "
                        "case for the exact low-resolution argmax bounds)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    num_slots, num_classes, size = 128, 133, args.size
    low = (size - 1) // 4 + 1
    # Scaled so that a realistic share of slots pass the 0.7 class threshold and pixels are
    # split between confident and unconfident regions.
    if args.logits == "white":
        mask_logits = rng.normal(0, 6, (args.batch, low, low, num_slots))
    else:
        # Coarse random fields (a value every ~16 low-res pixels) smoothly interpolated:
        # each slot dominates a few blob-shaped regions, with boundaries between them.
        coarse = rng.normal(0, 6, (args.batch, 11, 11, num_slots)).astype(np.float32)
        mask_logits = tf.image.resize(coarse, (low, low), method="bicubic").numpy()
    outputs = {
        "mask_logits": tf.constant(mask_logits, tf.float32),
        "class_logits": tf.constant(rng.normal(0, 4, (args.batch, num_slots,
                                                      num_classes + 1)), tf.float32),
    }
    is_thing = np.arange(num_classes) < 80

    def run(outs, paper_rule=True, dynamic=None):
        return postprocess(outs, is_thing=is_thing, image_size=(size, size),
                           weight_masks_by_class_confidence=paper_rule,
                           dynamic_shapes=dynamic)

    unit = matmul_unit(args.repeats)
    print(f"unit: 4096x4096 fp32 matmul = {unit * 1e3:.1f} ms")
    kept = float(tf.reduce_mean(tf.cast(run(outputs)["segment_scores"] > 0, tf.float32)))
    print(f"inputs: B={args.batch} N={num_slots} C={num_classes} {low}x{low} -> {size}x{size}; "
          f"{args.logits} logits; kept slots {kept:.0%}")
    # Paper rule: argmax_i p̂_i·m̂_i (one more pass over the full-resolution logits);
    # deeplab2 rule: argmax_i m̂_i, the rule the reference's 0.17 units were measured with.
    for rule, paper_rule in (("paper rule", True), ("deeplab2 rule", False)):
        for name, jit, dynamic in (("tf.function", False, None),
                                   ("tf.function, static shapes", False, False),
                                   ("tf.function(jit_compile=True)", True, None)):
            fn = tf.function(lambda o, p=paper_rule, d=dynamic: run(o, p, d), jit_compile=jit)
            t = _best_time(lambda fn=fn: fn(outputs)["panoptic"].numpy(), args.repeats)
            per_image = t / args.batch
            print(f"{rule:14s} {name:30s} {per_image * 1e3:8.1f} ms/image = "
                  f"{per_image / unit:.3f} units (reference {REFERENCE_UNITS}, "
                  f"target ≤ {TARGET_UNITS})")


if __name__ == "__main__":
    main()
