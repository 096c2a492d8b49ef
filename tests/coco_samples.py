"""The bundled real COCO val2017 images (data/samples/coco_val2017), read with numpy + Pillow
for the tests that check the tools against them."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_SAMPLES = os.path.join(REPO, "data", "samples", "coco_val2017")
GT_JSON = os.path.join(COCO_SAMPLES, "panoptic_val2017_two_images.json")
IMAGES_DIR = os.path.join(COCO_SAMPLES, "images")
PANOPTIC_DIR = os.path.join(COCO_SAMPLES, "panoptic")


def annotations() -> dict:
    with open(GT_JSON) as f:
        return json.load(f)


def photo(file_name: str) -> np.ndarray:
    """uint8 [H, W, 3] of images/<file_name>."""
    return np.asarray(Image.open(os.path.join(IMAGES_DIR, file_name)).convert("RGB"))


def segment_id_map(png_name: str) -> np.ndarray:
    """int64 [H, W] COCO segment ids of panoptic/<png_name> (id = R + 256 G + 256² B)."""
    rgb = np.asarray(Image.open(os.path.join(PANOPTIC_DIR, png_name)).convert("RGB"))
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
