"""TFLite export of the whole panoptic pipeline: image in, panoptic maps out.

One signature, ``serving_default(image: uint8 [H, W, 3])`` for any H, W, with the SavedModel's
``serving_default`` outputs (`max_deeplab.inference.export`): ``panoptic``, ``semantic``,
``instance`` int32 [H, W], ``segment_scores`` float32 [N], ``segment_classes`` int32 [N].
The same resolution policy runs inside: resize to fit the export size, pad, the network,
post-processing at the export size, the valid part resized back to H x W. The category table
(label divisor, category ids and names) is the SavedModel's ``assets/metadata.json``, written
beside the `.tflite` files by `export_saved_model(..., tflite=...)`.

Every op is a TFLite builtin (no Select TF ops, no custom ops), so the files run on the plain
TFLite / LiteRT runtime (XNNPACK on CPU). What differs from the SavedModel's graph, and why:

- post-processing takes its static-shape path (``dynamic_shapes=False``, all N channels, as
  under XLA): the faster dynamic paths gather data-dependent numbers of cells and slots;
- segment areas are counted with an unsorted segment sum (``count_method="segment_sum"``):
  TensorFlow's ``DenseBincount`` has neither a TFLite kernel nor a Select-TF-ops (Flex)
  kernel — the converter reports "'tf.DenseBincount' op is neither a custom op nor a flex op";
- the label maps are resized back to the input size as float32 (exact: labels stay below
  2²⁴): TFLite's ``RESIZE_NEAREST_NEIGHBOR`` has no int32 kernel, which the converter
  reports as a Select op ``ResizeNearestNeighbor``.

Quantisations (`QUANTIZATIONS`): ``float32`` (the graph as it is), ``float16`` (weights
stored as float16, ~half the size; computed in float32 on CPU), ``int8`` (the network's
weights and activations quantised to 8 bits, calibrated on representative images; its ops
without an int8 kernel stay float). For int8 only the network (the ops under the Keras
model's name scope) is quantised: the resize arithmetic, post-processing and label maps stay
float32 / int32 (listed as denylisted nodes of the converter's quantiser,
`tf.lite.experimental.QuantizationDebugOptions`). Quantised, the image-size arithmetic gave
sizes of 0 (the calibration range of a height does not resolve other heights: TFLite's DIV
then fails at run time), and 8 bits cannot hold panoptic labels (up to C·256 + N) or the
-1e9 that excludes a discarded slot from the pixel argmax.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from max_deeplab.inference.export import PanopticServingModule
from max_deeplab.inference.postprocess import postprocess

QUANTIZATIONS = ("float32", "float16", "int8")
TFLITE_DIR = "tflite"
# Calibration images used for int8 (the converter's own examples use ~100).
DEFAULT_CALIBRATION_IMAGES = 32


class TFLiteConversionError(RuntimeError):
    """The TFLite converter refused the model; the message names the ops it could not take."""


def tflite_file_name(quantization: str) -> str:
    """The file name of a quantisation's model inside `TFLITE_DIR`."""
    return f"panoptic_{quantization}.tflite"


def serving_function(serving: PanopticServingModule) -> tf.types.experimental.ConcreteFunction:
    """The convertible single-image pipeline of `serving` (see the module docstring)."""
    settings = serving.settings()
    model, target = settings["model"], serving.input_size
    pp_kwargs = dict(settings["postprocess_kwargs"], dynamic_shapes=False,
                     count_method="segment_sum")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        shape = tf.shape(image)
        padded, new_h, new_w = serving.fit_and_pad(image[None])
        result = postprocess(model(padded, training=False), is_thing=settings["is_thing"],
                             image_size=target, **pp_kwargs)
        maps = {}
        for key in ("panoptic", "semantic", "instance"):
            valid = tf.cast(result[key][:, :new_h, :new_w, None], tf.float32)
            back = tf.image.resize(valid, tf.stack([shape[0], shape[1]]), method="nearest")
            maps[key] = tf.cast(back[0, ..., 0], tf.int32)
        maps["segment_scores"] = result["segment_scores"][0]
        maps["segment_classes"] = result["segment_classes"][0]
        return maps

    return serve.get_concrete_function()


def _conversion_problem(message: str) -> str:
    """The lines of a converter error that name ops (the MLIR dump around them is long)."""
    lines = [line.strip() for line in message.splitlines()
             if re.search(r"TF Select ops|neither a custom op nor a flex op|not supported|"
                          r"failed to legalize", line)]
    ops = sorted(set(re.findall(r"'(tf\.\w+)' op", message)))
    summary = "; ".join(dict.fromkeys(re.sub(r"^.*error: ", "", line) for line in lines))
    return f"ops {', '.join(ops)}: {summary}" if ops else (summary or message[-2000:])


def _interpreter(model_content: bytes | None = None, model_path: str | None = None,
                 num_threads: int | None = None) -> tf.lite.Interpreter:
    with warnings.catch_warnings():
        # tf.lite.Interpreter announces its move to the LiteRT package (ai_edge_litert),
        # which runs the same files.
        warnings.simplefilter("ignore", UserWarning)
        return tf.lite.Interpreter(model_content=model_content, model_path=model_path,
                                   num_threads=num_threads)


def _outside_scope(model_content: bytes, scope: str) -> list[str]:
    """Output tensor names of the ops of a TFLite model that are not under `scope`/."""
    interpreter = _interpreter(model_content)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return sorted({names[i] for op in interpreter._get_ops_details() for i in op["outputs"]
                   if not names[i].startswith(scope + "/")})


def convert(serving: PanopticServingModule, quantization: str = "float32",
            representative_images: Iterable[np.ndarray] | None = None,
            float32_model: bytes | None = None) -> bytes:
    """The `.tflite` flatbuffer of `serving`'s pipeline.

    Args:
      serving: the SavedModel's serving module (model, category table, post-processing
        settings, export size).
      quantization: one of `QUANTIZATIONS`.
      representative_images: uint8 [H, W, 3] images for int8 calibration (required for
        ``int8``, ignored otherwise).
      float32_model: for ``int8``, the float32 conversion if already made (it names the
        nodes to keep in float); converted here otherwise.

    Raises:
      ValueError: unknown quantisation, or int8 without images.
      TFLiteConversionError: an op could not be converted (named in the message).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"TFLite quantization must be one of {QUANTIZATIONS}, got "
                         f"{quantization!r}")
    images = [np.asarray(image, np.uint8) for image in (representative_images or [])]
    if quantization == "int8" and not images:
        raise ValueError("int8 TFLite quantization needs representative images to "
                         "calibrate the activation ranges")
    model = serving.settings()["model"]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(serving)],
                                                                model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    try:
        if quantization != "int8":
            return converter.convert()
        if float32_model is None:
            float32_model = convert(serving, "float32")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        dataset = lambda: ({"image": image} for image in images)  # noqa: E731
        converter.representative_dataset = dataset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the Interpreter's notice (above)
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=dataset,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_nodes=_outside_scope(float32_model, model.name)))
            return debugger.get_nondebug_quantized_model()
    except TFLiteConversionError:
        raise
    except Exception as e:  # the converter raises ConverterError and others
        raise TFLiteConversionError(
            f"TFLite {quantization} conversion failed: {_conversion_problem(str(e))}") from e


def write_models(serving: PanopticServingModule, directory: str, quantizations: Iterable[str],
                 representative_images: Iterable[np.ndarray] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Converts `serving` once per quantisation into `directory`/`tflite_file_name(q)`;
    returns the paths."""
    os.makedirs(directory, exist_ok=True)
    images = list(representative_images or [])
    paths, converted = [], {}
    # float32 first: int8 starts from it.
    for quantization in sorted(quantizations, key=lambda q: q != "float32"):
        if progress:
            progress(f"converting to TFLite ({quantization}) ...")
        data = converted[quantization] = convert(serving, quantization, images,
                                                 converted.get("float32"))
        path = os.path.join(directory, tflite_file_name(quantization))
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


class TFLitePanopticModel:
    """Runs a `.tflite` file of this module: ``model(image uint8 [H, W, 3])`` -> dict of
    numpy arrays (`OUTPUT_KEYS`), as the SavedModel's ``serving_default``.

    Args:
      path: the `.tflite` file.
      num_threads: CPU threads of the interpreter (None: TFLite's default).
    """

    def __init__(self, path: str, num_threads: int | None = None):
        self._interpreter = _interpreter(model_path=path, num_threads=num_threads)
        self._runner = self._interpreter.get_signature_runner("serving_default")

    def __call__(self, image: np.ndarray) -> Mapping[str, Any]:
        return self._runner(image=np.asarray(image, np.uint8))
