"""One image through the network and post-processing, with what the analyses look at.

The image is resized to fit the model's input size and padded as the SavedModel does
(`PanopticServingModule.fit_and_pad`); every map is returned at the model's input
resolution, cropped to the image's (unpadded) part: the panoptic map, the slot that owns each
pixel, the per-slot classes, the decoder feature g (stride 4) and, when asked, the M2P
attention of the last dual-path block (stride 16 and beyond).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.inference.export import PanopticServingModule
from max_deeplab.inference.postprocess import postprocess
from max_deeplab.model.outputs import M2P_ATTENTION, PIXEL_FEATURE


@dataclass
class ImagePrediction:
    """What the analyses need of one image (maps cropped to the image's part of the input).

    Attributes:
      image: uint8 [h, w, 3], the image as resized to fit the model's input.
      panoptic: int32 [h, w], label * label_divisor + instance, void = `void_label`.
      slot: int32 [h, w], the mask slot owning each pixel of a segment of `panoptic`, -1 on
        void pixels.
      slot_classes: int32 [N], the contiguous class each slot predicts.
      pixel_feature: float32 [h', w', D], the normalised decoder feature g at stride 4.
      m2p_attention: float32 [heads, N, h'', w''] or None.
      input_fraction: (rows, columns) of the model input the image covers (the rest is
        padding), to crop the lower-resolution maps.
    """

    image: np.ndarray
    panoptic: np.ndarray
    slot: np.ndarray
    slot_classes: np.ndarray
    pixel_feature: np.ndarray
    m2p_attention: np.ndarray | None
    input_fraction: tuple[float, float]


def crop_to_image(feature: np.ndarray, fraction: Sequence[float]) -> np.ndarray:
    """The part [:rows, :cols] of a low-resolution map [h, w, ...] that covers the image:
    on the model's align-corners stride grid, (h - 1) * fraction + 1 rows."""
    rows = int(np.ceil((feature.shape[0] - 1) * fraction[0] - 1e-6)) + 1
    cols = int(np.ceil((feature.shape[1] - 1) * fraction[1] - 1e-6)) + 1
    return feature[:rows, :cols]


class Predictor:
    """Runs a built MaX-DeepLab model on images (one at a time).

    Args:
      model: the built keras model.
      table: the category table (`max_deeplab.inference.export.category_table`).
      input_size: the model's (H, W).
      with_attention: also return the M2P attention (`MaXDeepLab(..., return_m2p_attention)`).
      postprocess_kwargs: overrides of `postprocess` (gin-configured otherwise).
    """

    def __init__(self, model: tfk.Model, table: Mapping[str, Any],
                 input_size: Sequence[int], with_attention: bool = False,
                 postprocess_kwargs: Mapping[str, Any] | None = None):
        self._serving = PanopticServingModule(model, table, input_size, postprocess_kwargs)
        settings = self._serving.settings()
        self.label_settings = {k: settings["postprocess_kwargs"][k] for k in (
            "label_divisor", "label_offset", "void_label")}
        self.input_size = tuple(input_size)

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        def run(image: tf.Tensor) -> dict[str, tf.Tensor]:
            padded, new_h, new_w = self._serving.fit_and_pad(image[None])
            if with_attention:
                outputs = model(padded, training=False, return_m2p_attention=True)
            else:
                outputs = model(padded, training=False)
            result = postprocess(outputs, is_thing=settings["is_thing"],
                                 image_size=self.input_size, **settings["postprocess_kwargs"])
            maps = {"image": tf.cast(tf.round(padded[0, :new_h, :new_w]), tf.uint8),
                    "panoptic": result["panoptic"][0, :new_h, :new_w],
                    "mask_id": result["mask_id"][0, :new_h, :new_w],
                    "segment_classes": result["segment_classes"][0],
                    PIXEL_FEATURE: outputs[PIXEL_FEATURE][0]}
            if with_attention:
                maps[M2P_ATTENTION] = outputs[M2P_ATTENTION][0]
            return maps

        self._run = run

    def __call__(self, image: np.ndarray) -> ImagePrediction:
        """uint8 [H, W, 3] -> `ImagePrediction`."""
        out = {k: v.numpy() for k, v in self._run(tf.constant(image, tf.uint8)).items()}
        panoptic = out["panoptic"]
        void = panoptic == self.label_settings["void_label"]
        height, width = panoptic.shape
        fraction = ((height - 1) / max(self.input_size[0] - 1, 1),
                    (width - 1) / max(self.input_size[1] - 1, 1))
        return ImagePrediction(
            image=out["image"], panoptic=panoptic,
            slot=np.where(void, -1, out["mask_id"] - 1).astype(np.int32),
            slot_classes=out["segment_classes"] - self.label_settings["label_offset"],
            pixel_feature=crop_to_image(out[PIXEL_FEATURE], fraction),
            m2p_attention=(np.moveaxis(crop_to_image(np.moveaxis(
                out[M2P_ATTENTION], (2, 3), (0, 1)), fraction), (0, 1), (2, 3))
                if M2P_ATTENTION in out else None),
            input_fraction=fraction)
