"""Training-step time and peak memory of the tiny and the MaX-DeepLab-S configs on this CPU.

One full step (forward, Hungarian matching, all losses, gradients, RAdam + Lookahead update)
at batch 1 on a small crop, with `tf.function`, timed in RAdam's adaptive (steady-state)
phase. Each config runs in its own process so its peak resident memory (ru_maxrss) is its
own. Times are also given in units of a 4096^3 fp32 matmul measured in the same run
(docs/design.md §8: the reference implementation's MaX-S step at 321², batch 1, is 4.7 units and
2.0 GB peak RSS; target <= 3.7 units, <= 1.6 GB).

Usage: .venv/bin/python benchmarks/bench_train_step.py [--crop 321] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, resource, sys, time
import numpy as np
import tensorflow as tf
from max_deeplab.gin_config import parse_config
from max_deeplab.losses import MaXDeepLabLoss
from max_deeplab.model import build_model
from max_deeplab.training.optimizers import build_optimizer

config, crop, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parse_config([config], [f"build_model.input_size = ({crop}, {crop})"])
model = build_model()
num_classes = model.num_classes
slots = model.encoder._num_mask_slots
loss_fn = MaXDeepLabLoss(matching_backend="scipy")
optimizer = build_optimizer(total_steps=100000, model=model)  # > the default 5000 warmups
rng = np.random.default_rng(0)
k = min(8, slots)
segment_ids = rng.integers(-1, k, size=(1, crop, crop)).astype(np.int32)
targets = {
    "image": tf.random.uniform([1, crop, crop, 3], 0, 255),
    "segment_ids": tf.constant(segment_ids),
    "segment_classes": tf.constant(rng.integers(0, num_classes, (1, slots)), tf.int32),
    "segment_valid": tf.constant(np.arange(slots)[None] < k),
    "segment_is_thing": tf.constant(np.arange(slots)[None] % 2 == 0),
    "semantic": tf.constant(np.where(segment_ids >= 0, segment_ids % num_classes, -1),
                            tf.int32),
}

@tf.function
def step(batch):
    with tf.GradientTape() as tape:
        losses = loss_fn(model(batch["image"], training=True), batch)
    grads = tape.gradient(losses["total"], model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return losses["total"]

start = time.perf_counter()
step(targets).numpy()
first = time.perf_counter() - start
# Time the steady state of training: past RAdam's first 5 (momentum-only) steps, in its
# adaptive phase, as every later step of a run is. At most one of 5 consecutive steps is a
# Lookahead sync (every 6th), so the median is an ordinary step.
inner = getattr(optimizer, "inner_optimizer", optimizer)
for opt in {id(optimizer): optimizer, id(inner): inner}.values():
    opt.iterations.assign(1000)
times = []
for _ in range(steps):
    start = time.perf_counter()
    step(targets).numpy()
    times.append(time.perf_counter() - start)
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
# The time unit, in this process right after the steps (others' load drifts over minutes).
sys.path.insert(0, sys.argv[4])
from machine_units import matmul_unit
unit_s, _ = matmul_unit()
print(json.dumps({"first": first, "step": float(np.median(times)), "peak_gb": peak_gb,
                  "unit": unit_s}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="+",
                        default=["tiny.gin", "max_deeplab_s_coco_641.gin"])
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from machine_units import matmul_unit

    unit_s, _ = matmul_unit()
    print(f"unit: 4096^3 fp32 matmul = {unit_s:.3f} s here; each step's units use the unit "
          f"timed in its own process")
    print(f"{'config':<30} {'crop':>5} {'first s':>8} {'step s':>8} {'unit s':>7} {'units':>6} "
          f"{'peak GB':>8}")
    for config in args.configs:
        proc = subprocess.run([sys.executable, "-c", CHILD, config, str(args.crop),
                               str(args.steps), HERE], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{config:<30} failed:\n{proc.stderr[-2000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{config:<30} {args.crop:>5} {result['first']:>8.1f} {result['step']:>8.2f} "
              f"{result['unit']:>7.3f} {result['step'] / result['unit']:>6.2f} "
              f"{result['peak_gb']:>8.2f}")
    print("reference implementation, MaX-S at 321², batch 1 (docs/design.md §8): 4.7 units, "
          "2.0 GB; target <= 3.7 units, <= 1.6 GB")


if __name__ == "__main__":
    main()
