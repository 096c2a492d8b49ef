"""SavedModel export: image in, panoptic prediction out (docs/design.md §6 `export`).

The SavedModel holds only standard TensorFlow ops and the model's variables, so plain
``tf.saved_model.load(dir)`` works in a process that cannot import this package. It has
three signatures:

* ``serving_default(image: uint8 [H, W, 3])`` — any H, W;
* ``serving_batched(images: uint8 [B, H, W, 3])`` — any B, H, W (one size per batch);
* ``image_bytes(inputs: string [B])`` — encoded images (JPEG, PNG, GIF or BMP bytes),
  the TF model garden's ``image_bytes`` input; the images may differ in size;
* ``tf_example(inputs: string [B])`` — serialized ``tf.train.Example`` protos holding the
  encoded image under ``image/encoded`` (the model garden's ``tf_example`` input; the
  records of `max-deeplab convert` qualify as they are); sizes may differ too;
* ``metadata()`` — the category table embedded at export time: ``category_ids`` (the
  data set's ids, e.g. COCO's), ``category_names``, ``isthing``, ``label_divisor``,
  ``label_offset``, ``void_label``. The same table is in ``assets/metadata.json``.

Outputs (batched signature with a leading B): ``panoptic`` int32 [H, W] (label *
label_divisor + instance, void 0, label = contiguous class + label_offset; map a label to the
data set's category with ``category_ids[label - label_offset]``), ``semantic`` int32 [H, W]
(dense, never void), ``instance`` int32 [H, W], ``segment_scores`` float32 [N] (class
confidence of each mask slot; a thing segment's instance id is its slot + 1) and
``segment_classes`` int32 [N] (label of each slot). ``image_bytes`` and ``tf_example``
return the batched outputs with every map padded to the batch's largest height and width
(image b fills the top-left ``image_size[b]`` corner, the rest is void, 0) and
``image_size`` int32 [B, 2] (each image's height and width); for a batch of one size they
equal ``serving_batched``'s.

Resolution policy (inside the signature): the image is resized, keeping its aspect ratio,
so that it fits the export size (the model's configured ``build_model.input_size``, e.g.
641x641; `max_deeplab.data.pipeline.fit_size`, as the evaluation data is), then padded at
the bottom/right to exactly that size. This keeps the network at
the size it was trained and configured for (axial attention has a span limit, so arbitrary
sizes are not safe) and gives one compiled shape. Post-processing runs at the export size
(the area limits of docs/design.md §5 are scaled to it); the valid (unpadded) part of the label
maps is then resized back to the original H x W by nearest neighbour.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np
import tensorflow as tf

from max_deeplab.data.metadata import categories_problem
from max_deeplab.data.pipeline import fit_size
from max_deeplab.data.schema import IMAGE_ENCODED
from max_deeplab.file_system import is_url, nearest_existing_path
from max_deeplab.inference.postprocess import postprocess
from max_deeplab.panoptic_labels import LABEL_DIVISOR, PREDICTION_LABEL_OFFSET, PREDICTION_VOID

SIGNATURE_SINGLE = "serving_default"
SIGNATURE_BATCHED = "serving_batched"
SIGNATURE_METADATA = "metadata"
SIGNATURE_IMAGE_BYTES = "image_bytes"
SIGNATURE_TF_EXAMPLE = "tf_example"
METADATA_ASSET = "metadata.json"
OUTPUT_KEYS = ("panoptic", "semantic", "instance", "segment_scores", "segment_classes")


def category_table(metadata: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The category table (contiguous order) from a data-set metadata dict.

    Accepts the metadata written by `max-deeplab convert` (``categories`` with
    ``contiguous_id``) or any COCO panoptic JSON with ``categories`` (contiguous order =
    sorted by id, as `convert` does). Raises ValueError naming the mismatch otherwise.
    """
    cats = metadata.get("categories")
    problem = categories_problem(cats)
    if problem:
        raise ValueError(f"export metadata: {problem}")
    if all("contiguous_id" in c for c in cats):
        cats = sorted(cats, key=lambda c: int(c["contiguous_id"]))
    else:
        cats = sorted(cats, key=lambda c: c["id"])
    if len(cats) != num_classes:
        raise ValueError(f"export metadata lists {len(cats)} categories but the model predicts "
                         f"{num_classes} classes")
    return {
        "category_ids": [c["id"] for c in cats],
        "category_names": [str(c.get("name", c["id"])) for c in cats],
        "isthing": [bool(c["isthing"]) for c in cats],
        "colors": [list(c["color"]) if c.get("color") is not None else None for c in cats],
    }


def _gin_value(name: str, default: Any) -> Any:
    """The gin-bound value of a `postprocess` parameter, or its default."""
    try:
        return gin.query_parameter(f"max_deeplab.inference.postprocess.{name}")
    except ValueError:
        return default


class _Untracked:
    """Attribute bag that TensorFlow's object tracking does not look into."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


class PanopticServingModule(tf.Module):
    """tf.Module whose functions are the exported signatures (see module docstring).

    The keras model is called through a closure rather than stored as an attribute, so the
    SavedModel contains only its variables and the traced graph — no Keras layer metadata
    and no per-layer call traces (faster to save, nothing to revive on load).
    """

    def __init__(self, model: Any, table: Mapping[str, Any], input_size: Sequence[int],
                 postprocess_kwargs: Mapping[str, Any] | None = None,
                 pad_value: float = 127.5):
        super().__init__(name="max_deeplab_serving")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.model_variables = list(model.variables)  # tracked: saved with the graph
        # The label encoding is fixed here (gin value or default) so that the graph and the
        # embedded metadata agree even if gin changes later.
        pp_kwargs = dict(postprocess_kwargs or {})
        for key, default in (("label_divisor", LABEL_DIVISOR),
                             ("label_offset", PREDICTION_LABEL_OFFSET),
                             ("void_label", PREDICTION_VOID)):
            pp_kwargs.setdefault(key, _gin_value(key, default))
        # Plain-Python holder: tf.Module would otherwise track (and try to save) the keras
        # model, dicts and lists assigned as attributes.
        self._config = _Untracked(model=model, table=dict(table), pp_kwargs=pp_kwargs,
                                  is_thing=np.asarray(table["isthing"], bool),
                                  pad_value=float(pad_value))

        # The network and post-processing, traced once and called by every signature.
        self.predict_padded = tf.function(self._predict, input_signature=[tf.TensorSpec(
            [None, self.input_size[0], self.input_size[1], 3], tf.float32, name="padded")])
        self.serving_batched = tf.function(
            self._batched, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                          name="images")])
        self.serving_default = tf.function(
            self._single, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8,
                                                          name="image")])
        self.metadata = tf.function(self._metadata, input_signature=[])
        # The model garden's names: a batch of strings called "inputs".
        encoded = [tf.TensorSpec([None], tf.string, name="inputs")]
        self.serving_image_bytes = tf.function(self._image_bytes, input_signature=encoded)
        self.serving_tf_example = tf.function(self._tf_example, input_signature=encoded)

    def settings(self) -> dict[str, Any]:
        """What the signatures are built from: ``model``, ``table``, ``is_thing``,
        ``postprocess_kwargs`` (the label encoding and overrides; other post-processing
        settings come from gin where `postprocess` is traced) and ``pad_value``."""
        config = self._config
        return {"model": config.model, "table": dict(config.table),
                "is_thing": config.is_thing, "postprocess_kwargs": dict(config.pp_kwargs),
                "pad_value": config.pad_value}

    def _metadata(self) -> dict[str, tf.Tensor]:
        return {
            "category_ids": tf.constant(self._config.table["category_ids"], tf.int32),
            "category_names": tf.constant(self._config.table["category_names"], tf.string),
            "isthing": tf.constant(self._config.table["isthing"], tf.bool),
            "label_divisor": tf.constant(self._config.pp_kwargs["label_divisor"], tf.int32),
            "label_offset": tf.constant(self._config.pp_kwargs["label_offset"], tf.int32),
            "void_label": tf.constant(self._config.pp_kwargs["void_label"], tf.int32),
        }

    def fit_and_pad(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """uint8 [B, H, W, 3] -> (float32 [B, *input_size, 3], new_h, new_w): resized to fit
        the export size, keeping the aspect ratio, and padded at the bottom/right."""
        target = self.input_size
        shape = tf.shape(images)
        height, width = shape[1], shape[2]
        new_h, new_w = tf.unstack(fit_size(height, width, target))
        resized = tf.image.resize(tf.cast(images, tf.float32), tf.stack([new_h, new_w]),
                                  method="bilinear")
        padded = tf.pad(resized, [[0, 0], [0, target[0] - new_h], [0, target[1] - new_w],
                                  [0, 0]], constant_values=self._config.pad_value)
        # A reshape (not EnsureShape, which TFLite lacks) gives the padded batch its static
        # size; it is exactly that size by construction.
        return tf.reshape(padded, [-1, target[0], target[1], 3]), new_h, new_w

    def _predict(self, padded: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self._config.model(padded, training=False)
        result = postprocess(outputs, is_thing=self._config.is_thing,
                             image_size=self.input_size, **self._config.pp_kwargs)
        return {key: result[key] for key in OUTPUT_KEYS}

    @staticmethod
    def _map_back(label_map: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor,
                  height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
        """The valid (unpadded) part of label maps [B, H', W'], resized (nearest) to the
        original height x width."""
        valid = label_map[:, :new_h, :new_w, None]
        return tf.image.resize(valid, tf.stack([height, width]), method="nearest")[..., 0]

    def _batched(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        shape = tf.shape(images)
        padded, new_h, new_w = self.fit_and_pad(images)
        result = self.predict_padded(padded)
        maps = {key: self._map_back(result[key], new_h, new_w, shape[1], shape[2])
                for key in ("panoptic", "semantic", "instance")}
        maps["segment_scores"] = result["segment_scores"]
        maps["segment_classes"] = result["segment_classes"]
        return maps

    def _decoded(self, encoded: tf.Tensor) -> dict[str, tf.Tensor]:
        """Encoded images [B] (any sizes) -> the batched outputs, maps padded to the largest
        image, plus `image_size` [B, 2]."""
        def fit(one: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            image = tf.io.decode_image(one, channels=3, expand_animations=False)
            padded, new_h, new_w = self.fit_and_pad(image[None])
            return padded[0], tf.shape(image)[:2], tf.stack([new_h, new_w])

        target = self.input_size
        padded, sizes, fitted = tf.map_fn(fit, encoded, fn_output_signature=(
            tf.TensorSpec([target[0], target[1], 3], tf.float32),
            tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.int32)))
        result = self.predict_padded(padded)
        largest = tf.reduce_max(sizes, axis=0)
        void = self._config.pp_kwargs["void_label"]

        def back(args: tuple[tf.Tensor, ...]) -> tf.Tensor:
            label_map, size, fit_size, fill = args
            resized = self._map_back(label_map[None], fit_size[0], fit_size[1], size[0],
                                     size[1])[0]
            return tf.pad(resized, [[0, largest[0] - size[0]], [0, largest[1] - size[1]]],
                          constant_values=fill)

        maps = {}
        for key, fill in (("panoptic", void), ("semantic", 0), ("instance", 0)):
            maps[key] = tf.map_fn(back, (result[key], sizes, fitted,
                                         tf.fill(tf.shape(sizes)[:1], fill)),
                                  fn_output_signature=tf.TensorSpec([None, None], tf.int32))
        maps["segment_scores"] = result["segment_scores"]
        maps["segment_classes"] = result["segment_classes"]
        maps["image_size"] = sizes
        return maps

    def _image_bytes(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._decoded(inputs)

    def _tf_example(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(inputs, {IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string)})
        return self._decoded(parsed[IMAGE_ENCODED])

    def _single(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        # Calls the batched tf.function, so the network is traced (and stored) once.
        out = self.serving_batched(image[None])
        return {k: v[0] for k, v in out.items()}


class ExportDirectoryError(ValueError):
    """The export directory cannot take a SavedModel (the message names it and why)."""


def export_dir_problem(export_dir: str) -> str | None:
    """Why a SavedModel cannot be written to `export_dir`, or None if it can.

    The directory must be new or empty: an existing export is never overwritten. A local
    one must also be creatable (no file in the way) and its parent writable. Cheap: the
    `export` verb asks before it builds the model.
    """
    if is_url(export_dir):
        gfile = tf.io.gfile
        try:
            if not gfile.exists(export_dir):
                return None
            if not gfile.isdir(export_dir):
                return f"export directory {export_dir} is a file, not a directory"
            if gfile.listdir(export_dir):
                return f"export directory {export_dir} exists and is not empty"
        except tf.errors.OpError as e:
            return f"cannot access export directory {export_dir}: {e.message}"
        return None
    target = os.path.realpath(export_dir)  # a symlink: where it points (see the export)
    if os.path.isdir(target):
        try:
            if os.listdir(target):
                return f"export directory {export_dir} exists and is not empty"
        except OSError as e:
            return f"cannot read export directory {export_dir}: {e}"
    elif os.path.exists(target):
        return f"export directory {export_dir} is a file, not a directory"
    # The SavedModel is staged beside export_dir, then renamed: its parent, or the closest
    # existing ancestor when the parent is still to be created, must take new entries.
    anchor = nearest_existing_path(os.path.dirname(target))
    if not os.path.isdir(anchor):
        return f"export directory {export_dir} cannot be created: {anchor} is a file"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return f"export directory {export_dir} cannot be written: {anchor} is not writable"
    return None


def _copy_to_url(local_dir: str, export_dir: str) -> None:
    """Copies a finished local SavedModel to a file-system URL (gs://...), where directories
    cannot be renamed atomically. `saved_model.pb` goes last: loaders look for it first, so
    a reader never takes a half-copied directory for a SavedModel; on failure the copied
    files are removed again."""
    gfile = tf.io.gfile
    existed = gfile.exists(export_dir)
    relative_paths = sorted(
        os.path.relpath(os.path.join(root, name), local_dir)
        for root, _, names in os.walk(local_dir) for name in names)
    relative_paths.sort(key=lambda rel: rel == "saved_model.pb")
    try:
        for rel in relative_paths:
            target = f"{export_dir.rstrip('/')}/{rel}"
            gfile.makedirs(os.path.dirname(target))
            gfile.copy(os.path.join(local_dir, rel), target)
    except BaseException:
        if existed:  # it was empty: empty it again
            for child in gfile.listdir(export_dir):
                gfile.rmtree(f"{export_dir.rstrip('/')}/{child.rstrip('/')}")
        elif gfile.exists(export_dir):
            gfile.rmtree(export_dir)
        raise


def export_saved_model(model: Any, export_dir: str, metadata: Mapping[str, Any], *,
                       input_size: Sequence[int] = (641, 641),
                       postprocess_kwargs: Mapping[str, Any] | None = None,
                       pad_value: float = 127.5, tflite: Sequence[str] = (),
                       representative_images: Sequence[np.ndarray] | None = None,
                       progress: Any = None) -> str:
    """Writes a SavedModel of ``model`` + resize/pad + `postprocess` to ``export_dir``.

    Args:
      model: a built keras model mapping float images [B, H, W, 3] in [0, 255] to the
        docs/design.md §3 output dict (`max_deeplab.model.build_model()`).
      export_dir: output directory, new or empty; a local path or a file-system URL
        (gs://...). The SavedModel is written to a temporary directory first and renamed
        (copied, for a URL), so a failed export leaves no partial SavedModel.
      metadata: data-set metadata (see `category_table`): categories in contiguous order,
        and the ``label_divisor`` of the panoptic encoding if it has one (the metadata of
        `max-deeplab convert` does).
      input_size: (H, W) the image is resized-to-fit and padded to (the model's size).
      postprocess_kwargs: overrides for `postprocess` (thresholds, area limits, ...);
        unset ones take their gin-configured values at export time, except the label
        divisor, which comes from `metadata` when it has one (as in `train`).
      pad_value: value of padded pixels (127.5: zero after the model's normalisation).
      tflite: TFLite quantisations to write beside the SavedModel, in
        ``export_dir/tflite/panoptic_<quantization>.tflite`` (`max_deeplab.inference.tflite`:
        "float32", "float16", "int8"); converted before anything is written.
      representative_images: uint8 [H, W, 3] calibration images for "int8".
      progress: called with a line before each TFLite conversion (they take a while).

    Returns:
      export_dir.

    Raises:
      ExportDirectoryError: `export_dir` is not empty, is a file or cannot be created.
      ValueError: `metadata` does not fit the model (see `category_table`).
    """
    problem = export_dir_problem(export_dir)
    if problem:
        raise ExportDirectoryError(problem)
    probe = model(tf.zeros([1, int(input_size[0]), int(input_size[1]), 3]), training=False)
    num_classes = int(probe["class_logits"].shape[-1]) - 1
    table = category_table(metadata, num_classes)
    postprocess_kwargs = dict(postprocess_kwargs or {})
    if "label_divisor" in metadata:
        # The data set's panoptic encoding, as `train` evaluates with: the exported model's
        # outputs then compare directly with the data set's labels.
        postprocess_kwargs.setdefault("label_divisor", int(metadata["label_divisor"]))
    module = PanopticServingModule(model, table, input_size, postprocess_kwargs, pad_value)

    local = not is_url(export_dir)
    # A symlink (to an empty or a new directory) stays one: the SavedModel goes where it points.
    target = os.path.realpath(export_dir) if local else export_dir
    parent = os.path.dirname(target) if local else None
    # Staged beside export_dir (same file system, so the final rename is atomic); for a URL
    # in the local temporary directory, then copied.
    staging_root = nearest_existing_path(parent) if local else None
    with tempfile.TemporaryDirectory(dir=staging_root, prefix=".export-") as tmp:
        asset_src = os.path.join(tmp, METADATA_ASSET)
        with open(asset_src, "w") as f:
            json.dump({**table, **{k: module._config.pp_kwargs[k] for k in (
                "label_divisor", "label_offset", "void_label")},
                "input_size": list(module.input_size)}, f, indent=2)
        module.metadata_asset = tf.saved_model.Asset(asset_src)
        if tflite:
            from max_deeplab.inference.tflite import TFLITE_DIR, write_models

            write_models(module, os.path.join(tmp, "tflite_staging", TFLITE_DIR), tflite,
                         representative_images, progress)
        staging = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, staging, signatures={
            SIGNATURE_SINGLE: module.serving_default.get_concrete_function(),
            SIGNATURE_BATCHED: module.serving_batched.get_concrete_function(),
            SIGNATURE_METADATA: module.metadata.get_concrete_function(),
            SIGNATURE_IMAGE_BYTES: module.serving_image_bytes.get_concrete_function(),
            SIGNATURE_TF_EXAMPLE: module.serving_tf_example.get_concrete_function(),
        })
        if tflite:
            os.replace(os.path.join(tmp, "tflite_staging", TFLITE_DIR),
                       os.path.join(staging, TFLITE_DIR))
        if not local:
            _copy_to_url(staging, export_dir)
            return export_dir
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(target):
            os.rmdir(target)  # empty (checked above)
        os.replace(staging, target)
    return export_dir
