"""Data throughput on this machine: converter and input pipeline vs. the model's train step.

1. Writes a synthetic COCO-format set at a COCO-like size (480x640 by default).
2. `max-deeplab convert` throughput (images/s) with the requested worker processes, and
   with one process as the in-run baseline.
3. Training input pipeline throughput (images/s) at a 641x641 crop: decode, random scale,
   crop, flip, targets, batching (`build_dataset(is_training=True)`).
4. MaX-DeepLab-S train-step throughput at the same crop (forward + backward of a sum of
   all outputs, batch `--model_batch`), if `max_deeplab.model` imports.

Prints the ratios pipeline / train step (must be > 1: the pipeline is not the bottleneck)
and converter workers / one process.

    python benchmarks/bench_data.py [--images 48] [--batch 8] [--workers 2] [--skip_model]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

# TensorFlow is imported inside the functions: the converter's spawned workers re-import
# this script as their __main__ and must not pay for TensorFlow.


def bench_converter(root: str, out: str, workers: int) -> float:
    from max_deeplab.data import convert

    start = time.perf_counter()
    metadata = convert(os.path.join(root, "annotations", "panoptic_train.json"),
                       os.path.join(root, "train"), os.path.join(root, "panoptic_train"),
                       out, num_shards=4, num_workers=workers, log=lambda _: None)
    return metadata["num_examples"] / (time.perf_counter() - start)


def bench_pipeline(pattern: str, batch: int, crop: int, batches: int) -> float:
    from max_deeplab.data import build_dataset

    dataset = build_dataset(pattern, True, batch, crop_size=(crop, crop), k_max=128)
    iterator = iter(dataset)
    for _ in range(2):  # warm-up: tracing, buffers filling
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)["image"].numpy()
    return batches * batch / (time.perf_counter() - start)


def bench_train_step(crop: int, batch: int, steps: int) -> float | None:
    import tensorflow as tf

    try:
        from max_deeplab.gin_config import parse_config
        from max_deeplab.model import build_model
    except ImportError as e:
        print(f"model train step: unavailable ({e}); no comparison")
        return None
    parse_config(["max_deeplab_s_coco_641.gin"], [f"build_model.input_size = ({crop}, {crop})"])
    model = build_model()
    images = tf.random.uniform([batch, crop, crop, 3], 0, 255)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = tf.add_n([tf.reduce_sum(v) for v in tf.nest.flatten(outputs)])
        grads = tape.gradient(loss, model.trainable_variables)
        # One scalar depending on every gradient, so the whole backward pass runs.
        return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads if g is not None])

    step(images)  # trace
    start = time.perf_counter()
    for _ in range(steps):
        step(images).numpy()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--crop", type=int, default=641)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model_batch", type=int, default=1)
    parser.add_argument("--model_steps", type=int, default=2)
    parser.add_argument("--skip_model", action="store_true")
    args = parser.parse_args()
    from max_deeplab.data.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_dataset(tmp, args.images, seed=0, height=args.height, width=args.width,
                      num_val_images=0)
        print(f"synthetic: {args.images} images {args.height}x{args.width} "
              f"({args.images / (time.perf_counter() - start):.1f} images/s)")
        import tensorflow  # noqa: F401  (loaded before timing; the converter uses it)

        one = bench_converter(tmp, os.path.join(tmp, "one", "train"), 1)
        many = bench_converter(tmp, os.path.join(tmp, "rec", "train"), args.workers)
        print(f"converter: {many:.1f} images/s with {args.workers} workers, {one:.1f} images/s "
              f"in one process  (ratio {many / one:.2f}x)")
        pipe = bench_pipeline(os.path.join(tmp, "rec", "train-*.tfrecord"), args.batch,
                              args.crop, args.batches)
        print(f"input pipeline: {pipe:.1f} images/s at {args.crop}x{args.crop} crop, "
              f"batch {args.batch}")
    if args.skip_model:
        print("model train step: skipped (--skip_model); no comparison")
        return
    train = bench_train_step(args.crop, args.model_batch, args.model_steps)
    if train is None:
        return
    print(f"MaX-DeepLab-S train step: {train:.3f} images/s at {args.crop}x{args.crop}, "
          f"batch {args.model_batch} (forward + backward)")
    verdict = "OK, not the bottleneck" if pipe > train else "BOTTLENECK"
    print(f"pipeline / train step: {pipe / train:.1f}x  ({verdict})")


if __name__ == "__main__":
    main()
