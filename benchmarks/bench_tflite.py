"""TFLite models vs their SavedModel: size, panoptic quality, agreement, CPU latency.

The SavedModel's ``serving_default`` is the baseline of every row, measured in the same
run: ΔPQ = PQ(TFLite) − PQ(SavedModel) with COCO's rules (`max-deeplab pq`, the images at
their own sizes), the share of pixels whose panoptic label equals the SavedModel's, and the
median per-image latency as a ratio to the SavedModel's. Each TFLite interpreter gets as many
threads as TensorFlow uses (all cores).

Needs an export with TFLite models (`max-deeplab export ... --tflite float32,float16,int8`)
and COCO-format ground truth; the default ground truth is the two bundled COCO photos
(`data/samples/coco_val2017`). The README's numbers:

    scripts/quickstart.sh qs                 # the tiny model on the synthetic data
    max-deeplab export --checkpoint qs/model --export_dir qs/export_tflite \\
        --tflite float32,float16,int8        # int8 calibrates on qs's training data
    python benchmarks/bench_tflite.py --export_dir qs/export_tflite \\
        --gt_json qs/data/annotations/panoptic_val.json --gt_dir qs/data/panoptic_val \\
        --images 'qs/data/val/*.jpg'
    scripts/overfit_coco_samples.sh coco     # the tiny 133-class model on the COCO photos
    max-deeplab export --checkpoint coco/model --export_dir coco/export_tflite \\
        --tflite float32,float16,int8
    python benchmarks/bench_tflite.py --export_dir coco/export_tflite

Latency rounds: every variant runs every image once per round, variants in an order
rotated from round to round; a variant's latency is the median over all its runs. The
host's steal share of each round is printed too (`host_steal`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_steal import cpu_times, describe, steal_share  # noqa: E402

from max_deeplab.evaluation.coco_panoptic import pq_compute  # noqa: E402
from max_deeplab.inference.coco_results import panoptic_to_coco  # noqa: E402
from max_deeplab.inference.tflite import (  # noqa: E402
    QUANTIZATIONS,
    TFLITE_DIR,
    TFLitePanopticModel,
    tflite_file_name,
)
from max_deeplab.panoptic_labels import id_to_rgb  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data", "samples", "coco_val2017")


def _directory_bytes(path: str, skip: str | None = None) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != skip]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _pq(predictions: dict[str, dict], table: dict, gt_json: str, gt_dir: str,
        image_ids: dict[str, object]) -> dict:
    """PQ (COCO rules) of {image name: serving outputs}, written as COCO panoptic files."""
    with tempfile.TemporaryDirectory() as tmp:
        annotations = []
        for name, out in predictions.items():
            ids, segments = panoptic_to_coco(out["panoptic"], table, out["segment_scores"])
            png = os.path.splitext(name)[0] + ".png"
            Image.fromarray(id_to_rgb(ids)).save(os.path.join(tmp, png))
            annotations.append({"image_id": image_ids[name], "file_name": png,
                                "segments_info": segments})
        categories = [{"id": i, "name": n, "isthing": int(t)} for i, n, t in zip(
            table["category_ids"], table["category_names"], table["isthing"], strict=True)]
        pred_json = os.path.join(tmp, "predictions.json")
        with open(pred_json, "w") as f:
            json.dump({"annotations": annotations, "categories": categories}, f)
        return pq_compute(gt_json, gt_dir, pred_json, tmp, num_workers=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", required=True,
                        help="an `export` directory with tflite/panoptic_<q>.tflite files")
    parser.add_argument("--gt_json", default=os.path.join(
        SAMPLES, "panoptic_val2017_two_images.json"))
    parser.add_argument("--gt_dir", default=os.path.join(SAMPLES, "panoptic"))
    parser.add_argument("--images", default=os.path.join(SAMPLES, "images", "*.jpg"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with open(args.gt_json) as f:
        gt = json.load(f)
    image_ids = {os.path.basename(im["file_name"]): im["id"] for im in gt["images"]}
    paths = sorted(p for p in glob.glob(args.images) if os.path.basename(p) in image_ids)
    if not paths:
        sys.exit(f"no image of {args.gt_json} matches --images {args.images!r}")
    images = {os.path.basename(p): np.asarray(Image.open(p).convert("RGB")) for p in paths}
    with open(os.path.join(args.export_dir, "assets", "metadata.json")) as f:
        table = json.load(f)

    threads = os.cpu_count() or 1  # TensorFlow's default: every core
    loaded = tf.saved_model.load(args.export_dir)
    serve = loaded.signatures["serving_default"]
    variants = {"SavedModel": lambda image: {k: v.numpy() for k, v in serve(
        image=tf.constant(image)).items()}}
    sizes = {"SavedModel": _directory_bytes(args.export_dir,
                                            os.path.join(args.export_dir, TFLITE_DIR))}
    for quantization in QUANTIZATIONS:
        path = os.path.join(args.export_dir, TFLITE_DIR, tflite_file_name(quantization))
        if os.path.isfile(path):
            variants[f"TFLite {quantization}"] = TFLitePanopticModel(path, num_threads=threads)
            sizes[f"TFLite {quantization}"] = os.path.getsize(path)
    if len(variants) == 1:
        sys.exit(f"no TFLite model in {os.path.join(args.export_dir, TFLITE_DIR)}: export "
                 "with --tflite float32,float16,int8")

    names = list(variants)
    outputs = {name: {image: variants[name](array) for image, array in images.items()}
               for name in names}  # also the warm-up
    seconds = {name: [] for name in names}
    steal = []
    for r in range(args.rounds):
        before = cpu_times()
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            for array in images.values():
                start = time.perf_counter()
                variants[name](array)
                seconds[name].append(time.perf_counter() - start)
        steal.append(steal_share(before, cpu_times()))

    base = "SavedModel"
    quality = {name: _pq(outputs[name], table, args.gt_json, args.gt_dir, image_ids)
               for name in names}
    base_time = statistics.median(seconds[base])
    print(f"{len(images)} images of {args.gt_json}; export {args.export_dir}; "
          f"{args.rounds} rounds, {threads} threads; {describe(steal)}")
    print(f"{'model':17s} {'size MB':>8s} {'PQ':>6s} {'ΔPQ':>6s} {'ΔPQ_th':>7s} "
          f"{'ΔPQ_st':>7s} {'same px':>8s} {'ms/image':>9s} {'× SavedModel':>13s}")
    for name in names:
        pq = {group: 100 * quality[name][group]["pq"] for group in ("All", "Things", "Stuff")}
        base_pq = {group: 100 * quality[base][group]["pq"] for group in pq}
        same = np.mean([np.mean(outputs[name][i]["panoptic"] == outputs[base][i]["panoptic"])
                        for i in images])
        latency = statistics.median(seconds[name])
        print(f"{name:17s} {sizes[name] / 1e6:8.2f} {pq['All']:6.1f} "
              f"{pq['All'] - base_pq['All']:+6.2f} {pq['Things'] - base_pq['Things']:+7.2f} "
              f"{pq['Stuff'] - base_pq['Stuff']:+7.2f} {100 * same:7.2f}% "
              f"{1000 * latency:9.1f} {latency / base_time:13.2f}")


if __name__ == "__main__":
    main()
