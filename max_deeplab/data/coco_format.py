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


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG [H, W, 3] uint8 -> segment id map [H, W] (id = R + 256 G + 256² B)."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_id`: [H, W] ids < 2**24 -> [H, W, 3] uint8."""
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def load_coco_panoptic(annotations_path: str, images_dir: str, panoptic_dir: str
                       ) -> CocoPanoptic:
    """Reads the annotation JSON and checks what can be checked without opening images.

    Raises:
      ConversionError: unreadable JSON, a missing field, a category without an integer id
        or without isthing (see `metadata.categories_problem`), an annotation for an image
        that is not listed, an unknown category id, or a duplicated segment id.
    """
    try:
        with open(annotations_path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConversionError(f"cannot read annotation file {annotations_path}: {e}") from e
    except json.JSONDecodeError as e:
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
    images = {}
    for image in data["images"]:
        images[image["id"]] = image
    jobs = []
    for ann in data["annotations"]:
        png_name = ann.get("file_name", "?")
        image = images.get(ann.get("image_id"))
        if image is None:
            raise ConversionError(f"annotation {png_name} in {annotations_path} refers to "
                                  f"image_id {ann.get('image_id')!r}, which is not in 'images'")
        seen = set()
        for seg in ann.get("segments_info", []):
            sid = int(seg["id"])
            if sid in seen:
                raise ConversionError(f"segment id {sid} appears twice in segments_info of "
                                      f"{png_name} ({annotations_path})")
            if sid <= 0 or sid >= 2 ** 24:
                raise ConversionError(f"segment id {sid} of {png_name} ({annotations_path}) is "
                                      "outside 1..2^24-1 (0 is void in the PNG encoding)")
            seen.add(sid)
            if int(seg["category_id"]) not in contiguous:
                raise ConversionError(
                    f"segment id {sid} of {png_name} ({annotations_path}) has unknown "
                    f"category_id {seg['category_id']} (not in 'categories')")
        jobs.append(ImageJob(
            image_id=int(image["id"]),
            image_path=os.path.join(images_dir, image["file_name"]),
            image_file_name=image["file_name"],
            panoptic_path=os.path.join(panoptic_dir, png_name),
            width=image.get("width"),
            height=image.get("height"),
            segments=tuple(ann.get("segments_info", [])),
        ))
    jobs.sort(key=lambda j: j.image_id)
    return CocoPanoptic(annotations_path, categories, contiguous, isthing, jobs)


def _read(path: str, what: str, job: ImageJob) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
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
                  label_divisor: int = schema.DEFAULT_LABEL_DIVISOR) -> dict[str, Any]:
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
            schema.IGNORE_PANOPTIC if crowd else cls * label_divisor + instance)
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
