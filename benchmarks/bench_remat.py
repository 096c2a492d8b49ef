"""Peak memory and time of a training step with and without activation rematerialisation
(`BlockGroup.rematerialize`, docs/design.md §7).

One full step of MaX-DeepLab-S (forward, Hungarian matching, all losses, gradients,
RAdam + Lookahead update) at batch 1 on a 321² crop, with `tf.function`, timed in RAdam's
adaptive (steady-state) phase, as benchmarks/bench_train_step.py does. Each case runs in its
own process, so its memory is its own, and runs twice:
- with TensorFlow's default CPU allocator (as bench_train_step.py): the step time, the
  resident memory right before the first step (model, optimiser, data) and the process's
  peak RSS (ru_maxrss: everything, including tracing and graph optimisation);
- with the BFC allocator (TF_CPU_ALLOCATOR_USE_BFC=true), whose
  `tf.config.experimental.get_memory_info("CPU:0")` works on CPU: "peak" after
  `reset_memory_stats` is the most tensor memory in use at once during the steady-state
  steps, and "current" between steps is what stays (weights, optimiser slots, the data), so
  peak minus rest is what one step's activations and temporaries need.
Times are also given in units of a 4096^3 fp32 matmul timed in the same process
(benchmarks/machine_units.py).

Usage: .venv/bin/python benchmarks/bench_remat.py [--crop 321] [--steps 5]
           [--config max_deeplab_s_coco_641.gin]
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

config, crop, steps, remat = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                              sys.argv[4] == "1")
parse_config([config], [f"build_model.input_size = ({crop}, {crop})",
                        f"BlockGroup.rematerialize = {remat}"])
model = build_model()
num_classes = model.num_classes
slots = model.encoder._num_mask_slots
loss_fn = MaXDeepLabLoss(matching_backend="scipy")
optimizer = build_optimizer(total_steps=100000, model=model)  # > the default 5000 warmups
optimizer.build(model.trainable_variables)
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

def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1024 ** 3

def allocator_gb():
    try:
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 1024 ** 3
    except (ValueError, RuntimeError):
        return None

def reset_allocator():
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        pass

before_gb = rss_gb()
start = time.perf_counter()
step(targets).numpy()
first = time.perf_counter() - start
# Time the steady state of training: past RAdam's first 5 (momentum-only) steps, in its
# adaptive phase, as every later step of a run is. At most one of 5 consecutive steps is a
# Lookahead sync (every 6th), so the median is an ordinary step.
inner = getattr(optimizer, "inner_optimizer", optimizer)
for opt in {id(optimizer): optimizer, id(inner): inner}.values():
    opt.iterations.assign(1000)
step(targets).numpy()  # any slot the first update created now exists
try:  # between steps: weights, optimiser slots, the data
    resting_gb = tf.config.experimental.get_memory_info("CPU:0")["current"] / 1024 ** 3
except (ValueError, RuntimeError):
    resting_gb = None
reset_allocator()
times = []
for _ in range(steps):
    start = time.perf_counter()
    step(targets).numpy()
    times.append(time.perf_counter() - start)
steady_allocator_gb = allocator_gb()
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
sys.path.insert(0, sys.argv[5])
from machine_units import matmul_unit
unit_s, _ = matmul_unit()
print(json.dumps({"first": first, "step": float(np.median(times)), "peak_gb": peak_gb,
                  "before_gb": before_gb, "resting_gb": resting_gb,
                  "allocator_gb": steady_allocator_gb, "unit": unit_s}))
"""


def _gb(value: float | None) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'n/a':>8}"


def _run(args, remat: bool, bfc: bool) -> dict | None:
    env = dict(os.environ)
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if bfc:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, args.config, str(args.crop), str(args.steps),
         "1" if remat else "0", HERE],
        capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"rematerialize={remat}, BFC={bfc} failed:\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--config", default="max_deeplab_s_coco_641.gin")
    args = parser.parse_args()
    print(f"{args.config}, crop {args.crop}, batch 1, RAdam + Lookahead. Times in units "
          "of a 4096^3 fp32 matmul timed in each case's process; memory in GB. Default "
          "allocator: step time, RSS before the first step (RSS0) and peak RSS; BFC "
          "allocator: TF's peak in use during the steady steps and in use between steps "
          "(rest).")
    print(f"{'rematerialize':<14} {'first s':>8} {'step s':>7} {'unit s':>7} {'units':>6} "
          f"{'RSS0':>8} {'peakRSS':>8} {'TF peak':>8} {'TF rest':>8} {'BFC units':>9}")
    results = {}
    for remat in (False, True):
        plain_allocator, bfc = _run(args, remat, False), _run(args, remat, True)
        if plain_allocator is None or bfc is None:
            continue
        results[remat] = (plain_allocator, bfc)
        r = plain_allocator
        print(f"{str(remat):<14} {r['first']:>8.1f} {r['step']:>7.2f} {r['unit']:>7.3f} "
              f"{r['step'] / r['unit']:>6.2f} {_gb(r['before_gb'])} {_gb(r['peak_gb'])} "
              f"{_gb(bfc['allocator_gb'])} {_gb(bfc['resting_gb'])} "
              f"{bfc['step'] / bfc['unit']:>9.2f}")
    if len(results) != 2:
        return
    (plain, plain_bfc), (remat, remat_bfc) = results[False], results[True]
    units = [r["step"] / r["unit"] for r in (plain, remat)]
    print(f"rematerialisation: step time x{units[1] / units[0]:.2f} (in units); peak RSS "
          f"{remat['peak_gb'] - plain['peak_gb']:+.2f} GB")
    if plain_bfc["allocator_gb"] and remat_bfc["allocator_gb"]:
        transient = [r["allocator_gb"] - r["resting_gb"] for r in (plain_bfc, remat_bfc)]
        print(f"TF allocator peak {remat_bfc['allocator_gb'] - plain_bfc['allocator_gb']:+.2f} GB"
              f" (x{remat_bfc['allocator_gb'] / plain_bfc['allocator_gb']:.2f}); above what "
              f"stays between steps: {transient[0]:.2f} -> {transient[1]:.2f} GB "
              f"(x{transient[1] / transient[0]:.2f})")
    else:
        print("TF allocator statistics not available for CPU:0 here")


if __name__ == "__main__":
    main()
