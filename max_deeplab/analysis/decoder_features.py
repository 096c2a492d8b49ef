"""The decoder feature g of a D = 3 model as RGB (paper §4.3 "Visualization", appendix A.4).

g is L2-normalised per pixel, so with D = 3 each pixel is a point on the unit sphere: its
three components, mapped from [-1, 1] to [0, 255], are a colour. Pixels of one mask should
share a colour (the mask embedding f of their slot points their way), different masks differ:
instance discrimination made visible.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from max_deeplab.analysis.plots import grid, labelled
from max_deeplab.analysis.predictions import ImagePrediction
from max_deeplab.inference.visualize import overlay

FEATURE_CHANNELS = 3


class FeatureDimensionError(ValueError):
    """The model's decoder feature does not have D = 3 channels."""


def feature_rgb(pixel_feature: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] colours of a normalised decoder feature g [h, w, 3]: (g + 1) / 2."""
    pixel_feature = np.asarray(pixel_feature, np.float64)
    if pixel_feature.shape[-1] != FEATURE_CHANNELS:
        raise FeatureDimensionError(
            f"the decoder feature has D = {pixel_feature.shape[-1]} channels; colouring it "
            f"as RGB needs a model with D = 3 (MaXDeepLab.mask_dim = 3, as "
            "configs/ablations/mask_dim_3.gin binds)")
    return np.round(np.clip((pixel_feature + 1.0) / 2.0, 0.0, 1.0) * 255).astype(np.uint8)


def draw_feature_panel(prediction: ImagePrediction, table: Mapping[str, Any]) -> Image.Image:
    """The image, g as RGB (bilinearly upsampled to the image), and the panoptic result."""
    height, width = prediction.panoptic.shape
    colors = Image.fromarray(feature_rgb(prediction.pixel_feature)).resize(
        (width, height), Image.BILINEAR)
    panels = [labelled(Image.fromarray(prediction.image), "image"),
              labelled(colors, "decoder feature g (D = 3) as RGB"),
              labelled(overlay(prediction.image, prediction.panoptic, table, legend=False),
                       "panoptic prediction")]
    return grid(panels, columns=3)
