"""max-deeplab predict: run an exported SavedModel on images (docs/design.md §6).

    max-deeplab predict --saved_model DIR --images GLOB --output_dir DIR [--images_json F]

Writes, in --output_dir:
  overlays/<name>.png     segments blended over the image, boundaries, class names, and
                          a legend of the classes present below the image
  panoptic/<name>.png     COCO panoptic PNG (segment id = R + 256 G + 256² B)
  predictions.json        COCO panoptic results: {"annotations": [{"image_id",
                          "file_name", "segments_info": [...]}], "categories": [...]}
                          with the data set's category ids (from the SavedModel's metadata)

image_id: from --images_json (a COCO JSON whose "images" map file_name -> id), else the
file name's stem (as an int when it is all digits, like COCO's 000000000139.jpg -> 139).
Outputs are named by the input's stem, so two inputs with the same stem (a.jpg and a.png,
or one name in two directories) or the same image_id are refused before anything runs.
An image that cannot be read (corrupt, or above Pillow's decompression-bomb limit,
PIL.Image.MAX_IMAGE_PIXELS) is reported with the reason and skipped; the others are
processed. Exit codes: 0 every image predicted; 1 some image skipped (the others'
predictions are written) or none could be read (nothing written); 2 bad flags or inputs.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time
from typing import Any

from absl import flags

from max_deeplab.atomic_files import temporary_path, write_json_atomic
from max_deeplab.cli import shared_flags
from max_deeplab.file_system import nearest_existing_path

FLAGS = shared_flags.new_flag_values()
flags.DEFINE_string("saved_model", None, "SavedModel directory written by `export`.",
                    flag_values=FLAGS)
flags.DEFINE_string("images", None, "Glob of input images (any format Pillow reads); "
                    "comma-separated globs allowed.", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Directory for overlays, panoptic PNGs and "
                    "predictions.json.", flag_values=FLAGS)
flags.DEFINE_string("images_json", None, "Optional COCO JSON whose 'images' give the "
                    "image_id of each file_name.", flag_values=FLAGS)


OVERLAY_DIR = "overlays"
PANOPTIC_DIR = "panoptic"
PREDICTIONS_JSON = "predictions.json"
_IMAGES_JSON_SHAPE = '{"images": [{"file_name": ..., "id": ...}, ...]}'


class InputError(ValueError):
    """Bad flags or input files, found before the model runs (exit code 2)."""


def _image_ids(path: str | None) -> dict[str, Any]:
    """file name -> image_id from a COCO JSON's "images"; InputError naming `path` and the
    expected shape otherwise."""
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read --images_json {path}: {e}") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"--images_json {path} must be a COCO JSON object with an 'images' "
                         f"list, {_IMAGES_JSON_SHAPE}; got {type(data).__name__}"
                         + (" without an 'images' list" if isinstance(data, dict) else ""))
    ids = {}
    for index, image in enumerate(images):
        if not (isinstance(image, dict) and isinstance(image.get("file_name"), str)
                and "id" in image):
            raise InputError(f"--images_json {path}: images[{index}] must be an object with "
                             f"'file_name' and 'id', {_IMAGES_JSON_SHAPE}; got {image!r:.80}")
        ids[os.path.basename(image["file_name"])] = image["id"]
    return ids


def _default_image_id(file_name: str) -> int | str:
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return int(stem) if stem.isdigit() else stem


def _output_dir_error(output_dir: str) -> str | None:
    """Why predictions cannot be written under `output_dir`, or None; checked before the
    model is loaded, and without creating anything."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output_dir {output_dir} is a file; it must name a directory (new or existing)"
    for name, is_dir in ((OVERLAY_DIR, True), (PANOPTIC_DIR, True), (PREDICTIONS_JSON, False)):
        entry = os.path.join(path, name)
        if os.path.exists(entry) and os.path.isdir(entry) != is_dir:
            return (f"--output_dir {output_dir}: {entry} is a {'file' if is_dir else 'directory'}"
                    f", where predict writes a {'directory' if is_dir else 'file'}")
    path = nearest_existing_path(path)
    if not os.path.isdir(path):
        return f"--output_dir {output_dir} cannot be created: {path} is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--output_dir {output_dir}: no permission to write in {path}"
    return None


def _outputs_by_input(paths: list[str], ids_by_name: dict[str, Any]
                      ) -> dict[str, tuple[str, Any]]:
    """input path -> (output PNG name, image_id); InputError if two inputs would share one
    (their PNGs would overwrite each other and their annotations collide in `pq`)."""
    outputs = {}
    for path in paths:
        name = os.path.basename(path)
        outputs[path] = (os.path.splitext(name)[0] + ".png",
                         ids_by_name.get(name, _default_image_id(name)))
    for what, index in (("the output file", 0), ("the image_id", 1)):
        inputs_by_value = collections.defaultdict(list)
        for path, output in outputs.items():
            inputs_by_value[output[index]].append(path)
        clashes = {value: group for value, group in inputs_by_value.items() if len(group) > 1}
        if clashes:
            value, group = next(iter(clashes.items()))
            raise InputError(
                f"--images: {len(clashes)} group(s) of inputs would share {what}, e.g. "
                f"{', '.join(group)} -> {value!r} (outputs are named by the file stem, "
                f"image_ids come from the stem or --images_json); run them into separate "
                f"--output_dir's or rename them")
    return outputs


def _load_image(path: str):
    """uint8 RGB [H, W, 3], or raises OSError/ValueError with the reason."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{e} (Pillow's decompression-bomb limit, set by "
                         "PIL.Image.MAX_IMAGE_PIXELS)") from e
    except (OSError, ValueError):
        raise
    except Exception as e:  # Pillow raises many types for corrupt data (SyntaxError, ...)
        raise ValueError(f"{type(e).__name__}: {e}") from e


def _load_saved_model(saved_model: str) -> tuple[Any, dict[str, Any]]:
    """(serving function, category table) of an `export`ed SavedModel; InputError if it
    cannot be loaded or is not one of ours."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(saved_model)
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
    except KeyError as e:
        raise InputError(f"--saved_model {saved_model} lacks {e} (signature or metadata "
                         f"entry); write one with `max-deeplab export`") from e
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise InputError(f"cannot load --saved_model {saved_model}: {e}; write one with "
                         f"`max-deeplab export`") from e
    asset = os.path.join(saved_model, "assets", "metadata.json")
    if os.path.isfile(asset):  # colours live only in the asset
        try:
            with open(asset) as f:
                table["colors"] = json.load(f).get("colors")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise InputError(f"cannot read {asset}: {e}") from e
    return serve, table


def _save_png(image: Any, path: str) -> None:
    """Saves a PIL image as PNG under a temporary name, then renames it: an interrupted run
    leaves no truncated PNG."""
    tmp = temporary_path(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    for name in ("saved_model", "images", "output_dir"):
        if not getattr(FLAGS, name):
            print(f"{argv[0]}: --{name} is required", file=sys.stderr)
            return 2
    output_error = _output_dir_error(FLAGS.output_dir)
    if output_error:
        print(f"{argv[0]}: {output_error}", file=sys.stderr)
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
        outputs = _outputs_by_input(paths, _image_ids(FLAGS.images_json))
        serve, table = _load_saved_model(FLAGS.saved_model)
    except InputError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2

    import tensorflow as tf
    from PIL import Image

    from max_deeplab.inference.coco_results import panoptic_to_coco
    from max_deeplab.inference.visualize import overlay
    from max_deeplab.panoptic_labels import id_to_rgb

    overlay_dir = os.path.join(FLAGS.output_dir, OVERLAY_DIR)
    png_dir = os.path.join(FLAGS.output_dir, PANOPTIC_DIR)
    annotations, failed = [], []
    start = time.time()
    for i, path in enumerate(paths, start=1):
        png_name, image_id = outputs[path]
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
        # Created with the first prediction: a run that reads no image writes nothing.
        os.makedirs(overlay_dir, exist_ok=True)
        os.makedirs(png_dir, exist_ok=True)
        _save_png(Image.fromarray(id_to_rgb(ids)), os.path.join(png_dir, png_name))
        _save_png(overlay(image, panoptic, table), os.path.join(overlay_dir, png_name))
        annotations.append({"image_id": image_id, "file_name": png_name,
                            "segments_info": segments})
        print(f"[{i}/{len(paths)}] {path}: {len(segments)} segments "
              f"({time.time() - start:.1f} s)")
    if not annotations:
        print(f"{argv[0]}: none of the {len(paths)} images could be read; nothing written",
              file=sys.stderr)
        return 1

    categories = [{"id": cid, "name": n, "isthing": int(t)} for cid, n, t in zip(
        table["category_ids"], table["category_names"], table["isthing"], strict=True)]
    write_json_atomic(os.path.join(FLAGS.output_dir, PREDICTIONS_JSON),
                      {"annotations": annotations, "categories": categories}, indent=None)
    print(f"wrote {len(annotations)} predictions to {FLAGS.output_dir} "
          f"({len(failed)} skipped)")
    if failed:
        print(f"{argv[0]}: {len(failed)} of {len(paths)} images skipped (reasons above): "
              + ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
