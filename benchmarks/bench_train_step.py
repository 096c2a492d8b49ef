"""Training-step time and memory of the MaX-DeepLab-S (and tiny) configs on this CPU, with
the paper's optimiser and without, against the reference implementation.

One full step (forward, Hungarian matching, all losses, gradients, optimiser update) at
batch 1 on a small crop, with `tf.function`, timed in the steady state (RAdam's adaptive
phase). Three optimisers, so that model cost and optimiser cost show separately, and the
paper's with activation rematerialisation:
  none          gradients only (each summed as soon as it exists, so none is kept)
  adam          tf_keras Adam (what the reference implementation trains with)
  paper         RAdam + Lookahead (`build_optimizer`'s default, paper §4)
  paper+remat   the same with `BlockGroup.rematerialize = True` (the axial-attention and
                dual-path blocks recomputed in the backward pass; docs/design.md §7)
Each (config, optimiser) runs in its own process twice: once with TensorFlow's default CPU
allocator for the time and the peak resident memory (ru_maxrss, what the reference was
measured by), once with the BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC`) whose statistics give
the tensors' own peak during a steady step and what stays resident between steps (weights
and optimiser state); the rest of the resident memory is TensorFlow's runtime, the traced
graphs and allocator pools. Times are in units of a 4096^3 fp32 matmul timed in the same
process (docs/design.md §8).

Reference implementation (deeplab2, TF 2.20, Adam), MaX-S at 321², batch 1, measured side by
side on this machine kind: 4.93 units, 3.93 GB peak RSS; target for the paper optimiser
<= 0.8x: 3.9 units, 3.1 GB.

Usage: .venv/bin/python benchmarks/bench_train_step.py [--crop 321] [--steps 5]
           [--configs max_deeplab_s_coco_641.gin] [--variants none adam paper paper+remat]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("none", "adam", "paper", "paper+remat")
REFERENCE = {"units": 4.93, "peak_gb": 3.93}  # deeplab2 MaX-S, 321², batch 1, Adam
TARGET_RATIO = 0.8

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import tensorflow as tf
import tf_keras as tfk
from max_deeplab.gin_config import parse_config
from max_deeplab.losses import MaXDeepLabLoss
from max_deeplab.model import build_model
from max_deeplab.training.optimizers import build_optimizer

sys.path.insert(0, sys.argv[5])
from machine_units import matmul_unit
from synthetic_step_batch import synthetic_step_batch

config, crop, steps, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
optimizer_name, _, remat = variant.partition("+")
parse_config([config], [f"build_model.input_size = ({crop}, {crop})",
                        f"BlockGroup.rematerialize = {remat == 'remat'}"])
model = build_model()
loss_fn = MaXDeepLabLoss(matching_backend="scipy")
optimizer = {"none": lambda: None, "adam": lambda: tfk.optimizers.Adam(1e-4),
             "paper": lambda: build_optimizer(total_steps=100000, model=model)}[optimizer_name]()
if optimizer is not None:
    # As `Trainer` does: the optimiser's state exists before the step is traced. (Created
    # inside the trace instead, the paper step's peak RSS was 0.43 GB higher here.)
    optimizer.build(model.trainable_variables)
targets = synthetic_step_batch(model, crop)

@tf.function
def step(batch):
    with tf.GradientTape() as tape:
        losses = loss_fn(model(batch["image"], training=True), batch)
    grads = tape.gradient(losses["total"], model.trainable_variables)
    if optimizer is None:
        return losses["total"] + 0.0 * tf.add_n([tf.reduce_sum(g) for g in grads])
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return losses["total"]

bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true"
# The time unit before and after the steps: on a shared machine it drifts (it has read 0.31
# and 0.47 s within minutes here), and a step's units are only as good as its unit.
unit_before = None if bfc else matmul_unit()[0]
start = time.perf_counter()
step(targets).numpy()
first = time.perf_counter() - start
if optimizer is not None:
    # The steady state of training: past RAdam's first 5 (momentum-only) steps, in its
    # adaptive phase. At most one of 5 consecutive steps is a Lookahead sync (every 6th),
    # so the median is an ordinary step; the peaks include the sync.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for opt in {id(optimizer): optimizer, id(inner): inner}.values():
        opt.iterations.assign(1000)
times, tensor_peaks = [], []
for _ in range(steps):
    if bfc:
        tf.config.experimental.reset_memory_stats("CPU:0")
    start = time.perf_counter()
    step(targets).numpy()
    times.append(time.perf_counter() - start)
    if bfc:
        tensor_peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"])
result = {"first": first, "step": float(np.median(times)),
          "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}
if bfc:
    result["tensor_peak_gb"] = max(tensor_peaks) / 1024 ** 3
    result["resident_gb"] = tf.config.experimental.get_memory_info("CPU:0")["current"] / 1024 ** 3
else:
    result["unit_before"], result["unit"] = unit_before, matmul_unit()[0]
print(json.dumps(result))
"""


def run_child(config: str, crop: int, steps: int, variant: str, bfc: bool) -> dict | str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if bfc:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    else:
        env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, config, str(crop), str(steps),
                           variant, HERE], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=["max_deeplab_s_coco_641.gin"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    args = parser.parse_args()
    print("units: the step over the 4096^3 matmul timed in the same process after the steps "
          "(and, in brackets, before them)")
    print(f"{'config':<28} {'variant':<11} {'first s':>7} {'step s':>7} {'units':>14} "
          f"{'peak RSS GB':>11} {'tensor peak GB':>14} {'resident GB':>11}")
    for config in args.configs:
        for variant in args.variants:
            timed = run_child(config, args.crop, args.steps, variant, bfc=False)
            counted = run_child(config, args.crop, args.steps, variant, bfc=True)
            if isinstance(timed, str) or isinstance(counted, str):
                print(f"{config:<28} {variant:<11} failed:\n"
                      f"{timed if isinstance(timed, str) else counted}")
                continue
            units = timed["step"] / timed["unit"]
            units_text = f"{units:.2f} ({timed['step'] / timed['unit_before']:.2f})"
            print(f"{config:<28} {variant:<11} {timed['first']:>7.1f} {timed['step']:>7.2f} "
                  f"{units_text:>14} {timed['peak_gb']:>11.2f} {counted['tensor_peak_gb']:>14.2f} "
                  f"{counted['resident_gb']:>11.2f}", flush=True)
            if variant != "none" and "max_deeplab_s" in config and args.crop == 321:
                print(f"{'':<40} vs reference (Adam): time {units / REFERENCE['units']:.2f}x, "
                      f"peak RSS {timed['peak_gb'] / REFERENCE['peak_gb']:.2f}x "
                      f"(target <= {TARGET_RATIO}x)", flush=True)
    print(f"reference implementation, MaX-S at 321², batch 1, Adam: {REFERENCE['units']} units, "
          f"{REFERENCE['peak_gb']} GB peak RSS; target for the paper optimiser: "
          f"<= {TARGET_RATIO * REFERENCE['units']:.1f} units, "
          f"<= {TARGET_RATIO * REFERENCE['peak_gb']:.1f} GB")


if __name__ == "__main__":
    main()
