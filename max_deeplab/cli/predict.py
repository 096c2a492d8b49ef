"""max-deeplab predict: run an exported SavedModel on images (DESIGN.md §6).

    max-deeplab predict --saved_model DIR --images GLOB --output_dir DIR [--images_json F]

Writes, in --output_dir:
  overlays/<name>.png     segments blended over the image, boundaries, class names
  panoptic/<name>.png     COCO panoptic PNG (segment id = R + 256 G + 256² B)
  predictions.json        COCO panoptic results: {"annotations": [{"image_id",
                          "file_name", "segments_info": [...]}], "categories": [...]}
                          with the data set's category ids (from the SavedModel's metadata)

image_id: from --images_json (a COCO JSON whose "images" map file_name -> id), else the
file name's stem (as an int when it is all digits, like COCO's 000000000139.jpg -> 139).
An unreadable image is reported and skipped; the others are processed.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any

from absl import flags

from max_deeplab.cli.flag_parsing import parse_flags

flags.DEFINE_string("saved_model", None, "SavedModel directory written by `export`.",
                    allow_override=True)
flags.DEFINE_string("images", None, "Glob of input images (any format Pillow reads); "
                    "comma-separated globs allowed.", allow_override=True)
flags.DEFINE_string("output_dir", None, "Directory for overlays, panoptic PNGs and "
                    "predictions.json.", allow_override=True)
flags.DEFINE_string("images_json", None, "Optional COCO JSON whose 'images' give the "
                    "image_id of each file_name.", allow_override=True)

FLAGS = flags.FLAGS


def _image_ids(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    with open(path) as f:
        images = json.load(f).get("images", [])
    return {os.path.basename(im["file_name"]): im["id"] for im in images}


def _default_image_id(file_name: str) -> int | str:
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return int(stem) if stem.isdigit() else stem


def _load_image(path: str):
    """uint8 RGB [H, W, 3], or raises OSError/ValueError with the reason."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def main(argv: list[str]) -> int:
    if parse_flags(argv, __doc__) is None:
        return 0
    for name in ("saved_model", "images", "output_dir"):
        if not getattr(FLAGS, name):
            print(f"{argv[0]}: --{name} is required", file=sys.stderr)
            return 2
    paths = sorted({p for pattern in FLAGS.images.split(",") if pattern.strip()
                    for p in glob.glob(pattern.strip()) if os.path.isfile(p)})
    if not paths:
        print(f"{argv[0]}: no files match --images={FLAGS.images!r}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(FLAGS.saved_model, "saved_model.pb")):
        print(f"{argv[0]}: {FLAGS.saved_model} is not a SavedModel directory (no "
              "saved_model.pb); write one with `max-deeplab export`", file=sys.stderr)
        return 2
    try:
        ids_by_name = _image_ids(FLAGS.images_json)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"{argv[0]}: cannot read --images_json {FLAGS.images_json}: {e}",
              file=sys.stderr)
        return 2

    import tensorflow as tf
    from PIL import Image

    from max_deeplab.inference.coco_results import id_to_rgb, panoptic_to_coco
    from max_deeplab.inference.visualize import overlay

    loaded = tf.saved_model.load(FLAGS.saved_model)
    serve = loaded.signatures["serving_default"]
    meta = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    table = {
        "category_ids": [int(v) for v in meta["category_ids"]],
        "category_names": [v.decode() for v in meta["category_names"]],
        "isthing": [bool(v) for v in meta["isthing"]],
        "label_divisor": int(meta["label_divisor"]),
        "label_offset": int(meta["label_offset"]),
        "void_label": int(meta["void_label"]),
    }
    asset = os.path.join(FLAGS.saved_model, "assets", "metadata.json")
    if os.path.isfile(asset):  # colours live only in the asset
        with open(asset) as f:
            table["colors"] = json.load(f).get("colors")

    overlay_dir = os.path.join(FLAGS.output_dir, "overlays")
    png_dir = os.path.join(FLAGS.output_dir, "panoptic")
    os.makedirs(overlay_dir, exist_ok=True)
    os.makedirs(png_dir, exist_ok=True)
    annotations, failed = [], []
    start = time.time()
    for i, path in enumerate(paths, start=1):
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        try:
            image = _load_image(path)
        except (OSError, ValueError) as e:
            print(f"[{i}/{len(paths)}] skipped {path}: cannot read image ({e})",
                  file=sys.stderr)
            failed.append(path)
            continue
        out = serve(image=tf.constant(image))
        panoptic = out["panoptic"].numpy()
        ids, segments = panoptic_to_coco(panoptic, table, out["segment_scores"].numpy())
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(png_dir, stem + ".png"))
        overlay(image, panoptic, table).save(os.path.join(overlay_dir, stem + ".png"))
        annotations.append({"image_id": ids_by_name.get(name, _default_image_id(name)),
                            "file_name": stem + ".png", "segments_info": segments})
        print(f"[{i}/{len(paths)}] {path}: {len(segments)} segments "
              f"({time.time() - start:.1f} s)")

    categories = [{"id": cid, "name": n, "isthing": int(t)} for cid, n, t in zip(
        table["category_ids"], table["category_names"], table["isthing"], strict=True)]
    with open(os.path.join(FLAGS.output_dir, "predictions.json"), "w") as f:
        json.dump({"annotations": annotations, "categories": categories}, f)
    print(f"wrote {len(annotations)} predictions to {FLAGS.output_dir} "
          f"({len(failed)} skipped)")
    return 1 if failed and not annotations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
