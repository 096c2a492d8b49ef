"""Reading and validating a COCO panoptic data set (JSON + panoptic PNGs + images).

The COCO panoptic format: an annotation JSON with ``images`` (id, file_name, width,
height), ``annotations`` (image_id, file_name of the PNG, segments_info: id, category_id,
area, bbox, iscrowd) and ``categories`` (id, name, isthing, color); one RGB PNG per image
whose pixel value ``R + 256 G + 256² B`` is the segment id (0 = void). This module checks
every image against its annotation and produces the fields of the TFRecord schema in
`max_deeplab.data.schema`. It uses numpy and Pillow only, so converter worker processes
never load TensorFlow.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from max_deeplab.data import schema
from max_deeplab.data.metadata import categories_problem
from max_deeplab.file_system import read_regular_file
from max_deeplab.panoptic_labels import IGNORE_PANOPTIC, LABEL_DIVISOR, rgb_to_id


class ConversionError(Exception):
    """Bad input: the message names the file (and the segment id where one is at fault)."""


@dataclass(frozen=True)
class ImageJob:
    """One image to convert: paths and its segments_info, as listed in the annotation JSON."""

    image_id: int
    image_path: str
    image_file_name: str
    panoptic_path: str
    width: int | None
    height: int | None
    segments: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class CocoPanoptic:
    """An indexed annotation file."""

    annotations_path: str
    categories: list[dict[str, Any]]
    contiguous: dict[int, int]  # COCO category id -> contiguous class index
    isthing: dict[int, bool]    # COCO category id -> thing?
    jobs: list[ImageJob]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Type checks of one annotation file's fields; errors name the file, the entry
    (``images[3]``, ``annotations[0] (image_id 139) segments_info[2]``) and the field."""

    def __init__(self, path: str):
        self.path = path

    def error(self, where: str, message: str) -> ConversionError:
        return ConversionError(f"annotation file {self.path}: {where + ': ' if where else ''}"
                               f"{message}")

    def get(self, entry: dict[str, Any], where: str, field: str, check, expected: str,
            required: bool = True) -> Any:
        """``entry[field]`` if `check` accepts it; ConversionError otherwise (or when it is
        missing and `required`); None when it is missing and not required."""
        if field not in entry:
            if required:
                raise self.error(where, f"{field!r} is missing; expected {expected}")
            return None
        value = entry[field]
        if not check(value):
            raise self.error(where, f"{field!r} is {value!r:.80}; expected {expected}")
        return value

    def entries(self, value: Any, owner: str, field: str, kind: str) -> list[dict[str, Any]]:
        """`value`, the list `field` of `owner` ("" for the top level), which must be a list
        of objects."""
        if not isinstance(value, list):
            raise self.error(owner, f"{field!r} must be a list of {kind} objects, got "
                                    f"{type(value).__name__} {value!r:.60}")
        for position, entry in enumerate(value):
            if not isinstance(entry, dict):
                where = f"{owner + ' ' if owner else ''}{field}[{position}]"
                raise self.error(where, f"expected an object ({kind}), got {entry!r:.60}")
        return value


def load_coco_panoptic(annotations_path: str, images_dir: str, panoptic_dir: str
                       ) -> CocoPanoptic:
    """Reads the annotation JSON and checks what can be checked without opening images.

    Raises:
      ConversionError: unreadable JSON; a missing field or one of the wrong type (naming the
        entry and field); a category without an integer id or without isthing (see
        `metadata.categories_problem`); two images with one id, or two annotations for one
        image; an annotation for an image that is not listed; an unknown category id; a
        duplicated segment id.
    """
    try:
        with open(annotations_path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConversionError(f"cannot read annotation file {annotations_path}: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"annotation file {annotations_path} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise ConversionError(f"annotation file {annotations_path} has no {key!r} list "
                                  "(expected the COCO panoptic format)")
    categories = data["categories"]
    problem = categories_problem(categories)
    if problem:
        raise ConversionError(f"annotation file {annotations_path}: {problem}")
    ordered = sorted(c["id"] for c in categories)
    contiguous = {cid: i for i, cid in enumerate(ordered)}
    isthing = {c["id"]: bool(c["isthing"]) for c in categories}
    fields = _Fields(annotations_path)
    images: dict[int, tuple[int, dict[str, Any]]] = {}
    for position, image in enumerate(fields.entries(data["images"], "", "images", "image")):
        where = f"images[{position}]"
        image_id = fields.get(image, where, "id", _is_int, "an integer")
        fields.get(image, where, "file_name", lambda v: isinstance(v, str) and v,
                   "a string (the image's file name)")
        for size in ("width", "height"):
            fields.get(image, where, size, lambda v: _is_int(v) and v > 0,
                       "a positive integer (pixels)", required=False)
        if image_id in images:
            raise fields.error(where, f"images[{images[image_id][0]}] and {where} both have id "
                                      f"{image_id}; each image needs an id of its own")
        images[image_id] = position, image
    jobs = []
    annotated: dict[int, int] = {}
    for position, ann in enumerate(fields.entries(data["annotations"], "", "annotations",
                                                  "annotation")):
        image_id = fields.get(ann, f"annotations[{position}]", "image_id", _is_int,
                              "an integer (an id in 'images')")
        where = f"annotations[{position}] (image_id {image_id})"
        png_name = fields.get(ann, where, "file_name", lambda v: isinstance(v, str) and v,
                              "a string (the panoptic PNG's file name)")
        if image_id not in images:
            raise fields.error(where, f"image_id {image_id} of {png_name} is not in 'images'")
        if image_id in annotated:
            raise fields.error(where, f"annotations[{annotated[image_id]}] and "
                                      f"annotations[{position}] are both for image_id "
                                      f"{image_id}; one annotation per image")
        annotated[image_id] = position
        segments = fields.entries(fields.get(ann, where, "segments_info", lambda v: True,
                                             "a list of segments"),
                                  where, "segments_info", "segment")
        seen = set()
        for index, seg in enumerate(segments):
            seg_where = f"{where} segments_info[{index}]"
            sid = fields.get(seg, seg_where, "id", _is_int, "an integer segment id")
            category_id = fields.get(seg, seg_where, "category_id", _is_int,
                                     "an integer id in 'categories'")
            fields.get(seg, seg_where, "iscrowd", lambda v: v in (0, 1), "0 or 1",
                       required=False)
            if sid in seen:
                raise ConversionError(f"segment id {sid} appears twice in segments_info of "
                                      f"{png_name} ({annotations_path})")
            if sid <= 0 or sid >= 2 ** 24:
                raise ConversionError(f"segment id {sid} of {png_name} ({annotations_path}) is "
                                      "outside 1..2^24-1 (0 is void in the PNG encoding)")
            seen.add(sid)
            if category_id not in contiguous:
                raise ConversionError(
                    f"segment id {sid} of {png_name} ({annotations_path}) has unknown "
                    f"category_id {category_id} (not in 'categories')")
        image = images[image_id][1]
        jobs.append(ImageJob(
            image_id=image_id,
            image_path=os.path.join(images_dir, image["file_name"]),
            image_file_name=image["file_name"],
            panoptic_path=os.path.join(panoptic_dir, png_name),
            width=image.get("width"),
            height=image.get("height"),
            segments=tuple(segments),
        ))
    jobs.sort(key=lambda j: j.image_id)
    return CocoPanoptic(annotations_path, categories, contiguous, isthing, jobs)


def _read(path: str, what: str, job: ImageJob) -> bytes:
    try:
        return read_regular_file(path)
    except FileNotFoundError as e:
        raise ConversionError(f"missing {what} file {path} (image_id {job.image_id})") from e
    except OSError as e:
        raise ConversionError(f"cannot read {what} file {path} (image_id {job.image_id}): "
                              f"{e}") from e


def _decode(data: bytes, path: str, what: str, job: ImageJob) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes fully: a truncated or corrupt file fails here, not in training
        return img
    except Exception as e:  # Pillow raises many types for corrupt data
        raise ConversionError(f"corrupt {what} file {path} (image_id {job.image_id}): "
                              f"{e}") from e


def convert_image(job: ImageJob, contiguous: dict[int, int], isthing: dict[int, bool],
                  label_divisor: int = LABEL_DIVISOR) -> dict[str, Any]:
    """Validates one image against its annotation; returns the fields of one Example.

    Checks: image and PNG exist and decode, both have the same size (and the JSON's, when
    given), every segment listed has pixels in the PNG and every non-zero PNG id is listed,
    and no class has more instances than the label divisor can encode.

    Returns:
      A dict keyed by the `schema` feature keys (bytes, int, or lists of ints).
    """
    image_bytes = _read(job.image_path, "image", job)
    image = _decode(image_bytes, job.image_path, "image", job)
    if image.format not in ("JPEG", "PNG") or image.mode not in ("RGB", "L"):
        # CMYK / palette / alpha / other formats: store plain RGB so decoding needs no care.
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        image_bytes, image_format = buffer.getvalue(), "png"
    else:
        image_format = "jpeg" if image.format == "JPEG" else "png"
    width, height = image.size
    if (job.width is not None and job.height is not None
            and (int(job.width), int(job.height)) != (width, height)):
        raise ConversionError(f"image file {job.image_path} is {width}x{height} but its entry "
                              f"in the annotation JSON says {job.width}x{job.height}")

    png_bytes = _read(job.panoptic_path, "panoptic PNG", job)
    png = _decode(png_bytes, job.panoptic_path, "panoptic PNG", job)
    if png.size != (width, height):
        raise ConversionError(f"panoptic PNG {job.panoptic_path} is {png.size[0]}x{png.size[1]} "
                              f"but image {job.image_path} is {width}x{height}")
    if png.format != "PNG" or png.mode != "RGB":
        buffer = io.BytesIO()
        png.convert("RGB").save(buffer, format="PNG")
        png_bytes = buffer.getvalue()
    ids = rgb_to_id(np.asarray(png.convert("RGB")))
    present, counts = np.unique(ids, return_counts=True)
    area_of = dict(zip(present.tolist(), counts.tolist(), strict=True))
    area_of.pop(0, None)  # void

    listed = [int(s["id"]) for s in job.segments]
    for seg in job.segments:
        if int(seg["id"]) not in area_of:
            raise ConversionError(
                f"segment id {seg['id']} (category_id {seg['category_id']}) is listed for "
                f"{job.panoptic_path} (image_id {job.image_id}) but has no pixels in the PNG")
    unlisted = sorted(set(area_of) - set(listed))
    if unlisted:
        raise ConversionError(
            f"panoptic PNG {job.panoptic_path} (image_id {job.image_id}) contains segment id "
            f"{unlisted[0]} ({area_of[unlisted[0]]} pixels) that is not in its segments_info"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))

    instances_per_class: dict[int, int] = {}
    out = {key: [] for key in schema.SEGMENT_KEYS}
    for seg in job.segments:
        sid, cat = int(seg["id"]), int(seg["category_id"])
        cls = contiguous[cat]
        crowd = bool(seg.get("iscrowd", 0))
        instance = 0
        if isthing[cat] and not crowd:
            instance = instances_per_class.get(cls, 0) + 1
            instances_per_class[cls] = instance
            if instance >= label_divisor:
                raise ConversionError(
                    f"{job.panoptic_path} (image_id {job.image_id}) has more than "
                    f"{label_divisor - 1} instances of category_id {cat} (segment id {sid}); "
                    "raise the label divisor")
        out[schema.SEGMENTS_ID].append(sid)
        out[schema.SEGMENTS_CLASS].append(cls)
        out[schema.SEGMENTS_INSTANCE].append(instance)
        out[schema.SEGMENTS_IS_CROWD].append(int(crowd))
        out[schema.SEGMENTS_AREA].append(int(area_of[sid]))
        out[schema.SEGMENTS_PANOPTIC].append(
            IGNORE_PANOPTIC if crowd else cls * label_divisor + instance)
    out.update({
        schema.IMAGE_ENCODED: image_bytes,
        schema.IMAGE_FORMAT: image_format.encode(),
        schema.IMAGE_HEIGHT: height,
        schema.IMAGE_WIDTH: width,
        schema.IMAGE_ID: job.image_id,
        schema.IMAGE_FILENAME: job.image_file_name.encode(),
        schema.PANOPTIC_ENCODED: png_bytes,
        schema.PANOPTIC_FORMAT: b"png",
    })
    return out
