"""TFLite export (`max_deeplab.inference.tflite`): the whole pipeline as TFLite builtins,
compared with the SavedModel's `serving_default` on images of several sizes."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_export import CATEGORIES, NUM_CLASSES, NUM_SLOTS, StandIn, _image, _standin

from max_deeplab.inference import export_saved_model, postprocess
from max_deeplab.inference.export import PanopticServingModule, category_table
from max_deeplab.inference.tflite import (
    TFLiteConversionError,
    TFLitePanopticModel,
    convert,
    tflite_file_name,
)

EXPORT_SIZE = (33, 49)
SIZES = [(33, 49), (50, 23), (7, 90), (66, 98)]
MAP_KEYS = ("panoptic", "semantic", "instance")


def _serving(model=None) -> PanopticServingModule:
    return PanopticServingModule(model or _standin(), category_table(
        {"categories": CATEGORIES}, NUM_CLASSES), EXPORT_SIZE)


@pytest.fixture(scope="module")
def serving():
    return _serving()


def _run(data: bytes, tmp_path, name: str) -> TFLitePanopticModel:
    path = tmp_path / name
    path.write_bytes(data)
    return TFLitePanopticModel(str(path), num_threads=1)


def test_float32_equals_the_saved_model_pipeline(serving, tmp_path):
    model = _run(convert(serving, "float32"), tmp_path, "f32.tflite")
    for seed, (h, w) in enumerate(SIZES):
        image = _image(h, w, seed)
        got = model(image)
        want = serving.serving_default(tf.constant(image))
        for key in (*MAP_KEYS, "segment_classes"):
            assert got[key].shape == tuple(want[key].shape), key
            np.testing.assert_array_equal(got[key], want[key].numpy(), err_msg=f"{key} {h}x{w}")
        np.testing.assert_allclose(got["segment_scores"], want["segment_scores"].numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert len(np.unique(model(_image(33, 49))["panoptic"])) >= 3  # segments, not all void


def test_float16_and_int8_run_and_stay_close(serving, tmp_path):
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    f16 = _run(convert(serving, "float16"), tmp_path, "f16.tflite")
    int8 = _run(convert(serving, "int8", representative_images=images), tmp_path, "i8.tflite")
    agreement = {"float16": [], "int8": []}
    for image in images:
        want = serving.serving_default(tf.constant(image))["semantic"].numpy()
        for name, model in (("float16", f16), ("int8", int8)):
            got = model(image)
            assert got["panoptic"].shape == image.shape[:2]
            assert got["segment_scores"].shape == (NUM_SLOTS,)
            agreement[name].append(np.mean(got["semantic"] == want))
    # float16 weights change the stand-in's logits by ~1e-3: nearly every pixel agrees;
    # int8 quantises activations too, so only most of them.
    assert np.mean(agreement["float16"]) > 0.98, agreement
    assert np.mean(agreement["int8"]) > 0.6, agreement


def test_int8_needs_images_and_quantizations_are_checked(serving):
    with pytest.raises(ValueError, match="int8 TFLite quantization needs representative"):
        convert(serving, "int8")
    with pytest.raises(ValueError, match="must be one of"):
        convert(serving, "int4")


class _UnconvertibleStandIn(StandIn):
    """Uses `DenseBincount`, which has no TFLite kernel (neither builtin nor Select TF op)."""

    def call(self, images, training=False):
        outputs = super().call(images, training=training)
        logits = outputs["mask_logits"]
        counts = tf.raw_ops.DenseBincount(input=tf.reshape(tf.cast(logits > 0, tf.int32), [-1]),
                                          size=2, weights=tf.zeros([0], tf.int32))
        outputs["mask_logits"] = logits + tf.cast(counts[0] % 2, tf.float32)
        return outputs


def test_an_unconvertible_op_is_named():
    model = _UnconvertibleStandIn()
    model(tf.zeros([1, *EXPORT_SIZE, 3]))
    with pytest.raises(TFLiteConversionError, match=r"float32 conversion failed: ops "
                                                    r"tf\.DenseBincount: .*neither a custom "
                                                    r"op nor a flex op"):
        convert(_serving(model), "float32")


@pytest.mark.slow  # a SavedModel export and a conversion (~15 s); the CLI's slow test too
def test_export_writes_tflite_beside_the_saved_model(tmp_path):
    export_dir = tmp_path / "export"
    lines = []
    export_saved_model(_standin(), str(export_dir), {"categories": CATEGORIES},
                       input_size=EXPORT_SIZE, tflite=("float32",), progress=lines.append)
    path = export_dir / "tflite" / tflite_file_name("float32")
    assert path.is_file() and lines == ["converting to TFLite (float32) ..."]
    image = _image(40, 30, 3)
    loaded = tf.saved_model.load(str(export_dir))
    want = loaded.signatures["serving_default"](image=tf.constant(image))
    np.testing.assert_array_equal(TFLitePanopticModel(str(path))(image)["panoptic"],
                                  want["panoptic"].numpy())


@pytest.mark.parametrize("static", [False, True])
def test_segment_sum_counting_equals_bincount(static):
    rng = np.random.default_rng(0)
    outputs = {"mask_logits": tf.constant(rng.normal(0, 3, (2, 9, 13, 6)), tf.float32),
               "class_logits": tf.constant(rng.normal(0, 3, (2, 6, 5)), tf.float32)}
    kwargs = dict(is_thing=[True, True, False, False], image_size=(33, 49),
                  thing_area_limit=150, stuff_area_limit=400, area_limit_reference_size=None,
                  class_threshold=0.3, dynamic_shapes=not static)
    want = postprocess(outputs, **kwargs)
    got = postprocess(outputs, count_method="segment_sum", **kwargs)
    # The counts matter: the area limits void some segments and keep others.
    unlimited = postprocess(outputs, **dict(kwargs, thing_area_limit=0, stuff_area_limit=0))
    kept = set(np.unique(want["panoptic"])) - {0}
    assert kept and kept < set(np.unique(unlimited["panoptic"])) - {0}
    for key in MAP_KEYS:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    with pytest.raises(ValueError, match="count_method must be one of"):
        postprocess(outputs, count_method="histogram", **kwargs)
