"""max-deeplab overlay: draw COCO panoptic files — ground truth, with predictions beside it.

    max-deeplab overlay --gt_json F --gt_dir D --images_dir D --output_dir OUT
                        [--pred_json F --pred_dir D] [--scale S] [--combined PNG]

Writes OUT/<image stem>.png for every image annotated in --gt_json: its ground truth drawn
as `predict` draws predictions (class colours made to stand out from the photo, one-pixel
boundaries, class names, a legend of the classes present), and, when --pred_json and
--pred_dir are given (e.g. `predict`'s predictions.json and panoptic/), the prediction of
the same image_id to its right. Crowd segments are drawn as segments of their class.
--scale resizes photo (bilinear) and label maps (nearest) before drawing; --combined also
writes all images' rows stacked into one PNG (palette-quantised, to keep it small).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.panoptic_labels import PREDICTION_LABEL_OFFSET, PREDICTION_VOID

FLAGS = shared_flags.new_flag_values()
flags.DEFINE_string("gt_json", None, "Ground-truth COCO panoptic JSON (images, annotations, "
                    "categories).", flag_values=FLAGS)
flags.DEFINE_string("gt_dir", None, "Directory of the ground-truth panoptic PNGs.",
                    flag_values=FLAGS)
flags.DEFINE_string("images_dir", None, "Directory of the photos named by the JSON's "
                    "images[].file_name.", flag_values=FLAGS)
flags.DEFINE_string("pred_json", None, "Optional prediction COCO panoptic JSON.",
                    flag_values=FLAGS)
flags.DEFINE_string("pred_dir", None, "Directory of the prediction PNGs (with --pred_json).",
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Directory for the drawings.", flag_values=FLAGS)
flags.DEFINE_float("scale", 1.0, "Resize factor applied before drawing.", lower_bound=0.05,
                   flag_values=FLAGS)
flags.DEFINE_string("combined", None, "Optional PNG path: every image's drawing stacked.",
                    flag_values=FLAGS)

# Thing segments of one class in an image are numbered below this (COCO has < 1000).
_LABEL_DIVISOR = 1 << 16
TITLE_HEIGHT = 18


class InputError(ValueError):
    """Unreadable or inconsistent input files (exit code 2); the message names the file."""


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{what} {path} is not a COCO panoptic JSON (no 'annotations' list)")
    return data


def overlay_table(categories: Any, source: str) -> dict[str, Any]:
    """The table `max_deeplab.inference.visualize.overlay` draws with, for COCO categories
    (in `convert`'s contiguous order: sorted by id); InputError naming `source` if the
    categories are not valid."""
    from max_deeplab.inference.export import category_table

    try:
        table = category_table({"categories": categories}, len(categories or []))
    except ValueError as e:
        raise InputError(f"{source}: {e}") from e
    return {**table, "label_divisor": _LABEL_DIVISOR, "label_offset": PREDICTION_LABEL_OFFSET,
            "void_label": PREDICTION_VOID}


def _panel(photo_path: str, png_path: str, segments: list[dict[str, Any]],
           table: dict[str, Any], scale: float, title: str):
    """One drawing: the photo with the PNG's segments over it, under a title bar."""
    import numpy as np
    from PIL import Image, ImageDraw

    from max_deeplab.inference.coco_results import coco_to_panoptic
    from max_deeplab.inference.visualize import overlay
    from max_deeplab.panoptic_labels import rgb_to_id

    try:
        with Image.open(photo_path) as im:
            photo = im.convert("RGB")
        with Image.open(png_path) as im:
            labels = im.convert("RGB")
    except OSError as e:
        raise InputError(f"cannot read {e.filename or photo_path}: {e}") from e
    if photo.size != labels.size:
        raise InputError(f"{png_path} is {labels.size[0]}x{labels.size[1]} but {photo_path} "
                         f"is {photo.size[0]}x{photo.size[1]}")
    if scale != 1.0:
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        photo = photo.resize(size, Image.BILINEAR)
        labels = labels.resize(size, Image.NEAREST)
    try:
        panoptic = coco_to_panoptic(rgb_to_id(np.asarray(labels)), segments, table)
    except ValueError as e:
        raise InputError(f"{png_path}: {e}") from e
    drawing = overlay(np.asarray(photo), panoptic, table)
    framed = Image.new("RGB", (drawing.width, drawing.height + TITLE_HEIGHT), (0, 0, 0))
    framed.paste(drawing, (0, TITLE_HEIGHT))
    ImageDraw.Draw(framed).text((4, 3), title, fill=(255, 255, 255))
    return framed


def _side_by_side(panels: list, gap: int = 4):
    from PIL import Image

    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    row = Image.new("RGB", (width, max(p.height for p in panels)), (0, 0, 0))
    x = 0
    for panel in panels:
        row.paste(panel, (x, 0))
        x += panel.width + gap
    return row


def _stacked(rows: list, gap: int = 4):
    from PIL import Image

    out = Image.new("RGB", (max(r.width for r in rows),
                            sum(r.height for r in rows) + gap * (len(rows) - 1)), (0, 0, 0))
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height + gap
    return out


def _draw_all() -> list[str]:
    """Draws every annotated image; returns the paths written."""
    gt = _read_json(FLAGS.gt_json, "--gt_json")
    table = overlay_table(gt.get("categories"), f"--gt_json {FLAGS.gt_json}")
    file_names = {image.get("id"): image.get("file_name") for image in gt.get("images", [])}
    predictions = {}
    if FLAGS.pred_json:
        pred = _read_json(FLAGS.pred_json, "--pred_json")
        predictions = {a.get("image_id"): a for a in pred["annotations"]}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    written, rows = [], []
    for annotation in gt["annotations"]:
        image_id = annotation.get("image_id")
        if file_names.get(image_id) is None:
            raise InputError(f"--gt_json {FLAGS.gt_json}: annotation {annotation.get('file_name')}"
                             f" has image_id {image_id!r}, which is not in 'images'")
        photo = os.path.join(FLAGS.images_dir, file_names[image_id])
        panels = [_panel(photo, os.path.join(FLAGS.gt_dir, annotation["file_name"]),
                         annotation.get("segments_info", []), table, FLAGS.scale,
                         "ground truth")]
        if FLAGS.pred_json:
            if image_id not in predictions:
                raise InputError(f"--pred_json {FLAGS.pred_json} has no annotation for "
                                 f"image_id {image_id!r}")
            predicted = predictions[image_id]
            panels.append(_panel(photo, os.path.join(FLAGS.pred_dir, predicted["file_name"]),
                                 predicted.get("segments_info", []), table, FLAGS.scale,
                                 "prediction"))
        row = _side_by_side(panels)
        path = os.path.join(FLAGS.output_dir,
                            os.path.splitext(os.path.basename(file_names[image_id]))[0] + ".png")
        row.save(path)
        written.append(path)
        rows.append(row)
    if FLAGS.combined and rows:
        directory = os.path.dirname(os.path.abspath(FLAGS.combined))
        os.makedirs(directory, exist_ok=True)
        _stacked(rows).quantize(colors=256).save(FLAGS.combined, optimize=True)
        written.append(FLAGS.combined)
    return written


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    for name in ("gt_json", "gt_dir", "images_dir", "output_dir"):
        if not getattr(FLAGS, name):
            print(f"{argv[0]}: --{name} is required", file=sys.stderr)
            return 2
    if bool(FLAGS.pred_json) != bool(FLAGS.pred_dir):
        print(f"{argv[0]}: --pred_json and --pred_dir go together", file=sys.stderr)
        return 2
    try:
        written = _draw_all()
    except InputError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
