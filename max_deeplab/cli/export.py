"""max-deeplab export: a checkpoint -> a self-contained SavedModel (docs/design.md §6).

    max-deeplab export --checkpoint CKPT --export_dir DIR [--gin_file F --gin_bindings B]
                       [--metadata PATH] [--input_size H,W]
                       [--tflite float32,float16,int8 [--representative_data GLOB]]

CKPT is a `train` model directory (its latest checkpoint) or a checkpoint prefix. As
`evaluate` does, the model config defaults to the run's saved config.gin beside the
checkpoint and the data-set metadata to that of the data recorded in the run's run.json
(`train_data`, else `eval_data`); --gin_file / --metadata override them. DIR must not exist
or be empty.

The SavedModel loads with plain `tf.saved_model.load` (no custom ops, no need for this
package). Signatures: `serving_default` (uint8 image [H, W, 3], any size), `serving_batched`
(uint8 [B, H, W, 3]) and `metadata` (category ids, names, isthing). The panoptic label
divisor is the data set's (metadata `label_divisor`); other post-processing settings
(thresholds, area limits) are taken from gin (`postprocess.*` bindings).

--tflite also writes the whole pipeline (image in, panoptic maps out, any image size) as
TFLite models, DIR/tflite/panoptic_<quantization>.tflite, built from TFLite builtin ops only
(see `max_deeplab.inference.tflite`). int8 calibrates on the first --representative_images
images of --representative_data (TFRecords of `convert`; default: the run's training data
recorded in its run.json).
"""
from __future__ import annotations

import os
import sys

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.data.metadata import load_categories_file
from max_deeplab.training import run_directory

FLAGS = shared_flags.new_flag_values()
flags.DEFINE_string("checkpoint", None, "A `train` model directory (latest checkpoint) or a "
                    "checkpoint prefix.", flag_values=FLAGS)
flags.DEFINE_string("export_dir", None, "Directory to write the SavedModel to (must not "
                    "exist or be empty).", flag_values=FLAGS)
flags.DEFINE_string("metadata", None, "Data-set metadata JSON written by `convert` "
                    "(PREFIX-metadata.json), or a COCO panoptic JSON with 'categories'. "
                    "Default: the metadata of the data in the run's run.json, else a "
                    "*metadata.json beside the checkpoint.", flag_values=FLAGS)
flags.DEFINE_string("input_size", None, "H,W the image is resized-to-fit and padded to "
                    "(default: gin build_model.input_size).", flag_values=FLAGS)
flags.DEFINE_list("tflite", [], "TFLite models to write beside the SavedModel (DIR/tflite/): "
                  "any of float32, float16, int8.", flag_values=FLAGS)
flags.DEFINE_string("representative_data", None, "TFRecord glob (of `convert`) whose images "
                    "calibrate --tflite int8 (default: the run's train_data in run.json).",
                    flag_values=FLAGS)
flags.DEFINE_integer("representative_images", 32, "How many images of --representative_data "
                     "calibrate --tflite int8.", lower_bound=1, flag_values=FLAGS)
shared_flags.define_gin_flags(FLAGS)


class ExportSetupError(ValueError):
    """A problem found before the model is built (the message names the flag or file)."""


def _gin_files(run_dir: str) -> list[str]:
    """--gin_file, else the run's saved config.gin (none: gin's defaults)."""
    if FLAGS.gin_file:
        return list(FLAGS.gin_file)
    saved = run_directory.saved_gin_config(run_dir)
    if saved is None:
        print(f"note: no {os.path.join(run_dir, run_directory.RUN_CONFIG_GIN)} and no "
              "--gin_file: exporting the default model configuration", file=sys.stderr)
        return []
    return [saved]


def _input_size() -> tuple[int, int]:
    import gin

    if FLAGS.input_size:
        try:
            h, w = (int(v) for v in FLAGS.input_size.split(","))
        except ValueError as e:
            raise ValueError(f"--input_size must be 'H,W', got {FLAGS.input_size!r}") from e
        return h, w
    try:
        size = gin.query_parameter("build_model.input_size")
    except ValueError:
        size = (641, 641)
    return int(size[0]), int(size[1])


def _representative_files(run_dir: str) -> list[str]:
    """The TFRecord files calibrating --tflite int8 ([] when int8 is not asked for)."""
    from max_deeplab.inference.tflite import QUANTIZATIONS
    unknown = [q for q in FLAGS.tflite if q not in QUANTIZATIONS]
    if unknown:
        raise ExportSetupError(f"--tflite: unknown quantization {', '.join(unknown)}; "
                               f"expected any of {', '.join(QUANTIZATIONS)}")
    if "int8" not in FLAGS.tflite:
        return []
    from max_deeplab.data.metadata import ShardError, list_shards

    pattern = FLAGS.representative_data or run_directory.saved_data_flags(run_dir).get("train_data")
    if not pattern:
        raise ExportSetupError("--tflite int8 needs calibration images: pass "
                               "--representative_data GLOB (TFRecords of `convert`)")
    try:
        return list_shards(pattern)  # the shards (not the metadata JSON beside them)
    except ShardError as e:
        raise ExportSetupError(f"--representative_data: {e}") from e


def _representative_images(files: list[str], count: int) -> list:
    """The first `count` images of the TFRecord `files` (uint8 [H, W, 3]); ValueError
    naming the files if they do not read as `convert`'s records."""
    import tensorflow as tf

    from max_deeplab.data import decode_example

    try:
        records = tf.data.TFRecordDataset(files).take(count)
        images = [decode_example(record)["image"].numpy() for record in records]
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e)).strip().splitlines()[0]
        raise ValueError(f"--representative_data: cannot read images from "
                         f"{', '.join(files)}: {message}") from e
    if not images:
        raise ValueError(f"--representative_data: no records in {', '.join(files)}")
    return images


def _prepare() -> tuple[str, str, dict, tuple[int, int], list | None]:
    """Checks every flag and input that can be checked without building the model (the
    model build and restore take tens of seconds). Returns (checkpoint prefix, metadata
    path, metadata, input size, the images calibrating --tflite int8 or None); parses the
    gin config.

    Raises:
      OSError, ValueError (ExportSetupError, MetadataError, RunConfigError,
        CheckpointReadError, gin errors): naming the flag or file at fault.
    """
    from max_deeplab.gin_config import parse_config
    from max_deeplab.inference.export import export_dir_problem

    problem = export_dir_problem(FLAGS.export_dir)
    if problem:
        raise ExportSetupError(f"--export_dir: {problem}")
    try:
        prefix, run_dir = run_directory.checkpoint_run(FLAGS.checkpoint)
    except FileNotFoundError as e:
        raise ExportSetupError(f"--checkpoint: {e}") from e
    metadata_path = FLAGS.metadata or run_directory.data_metadata_path(run_dir,
                                                                       FLAGS.checkpoint)
    calibration_files = _representative_files(run_dir)
    calibration_images = (_representative_images(calibration_files,
                                                 FLAGS.representative_images)
                          if calibration_files else None)
    gin_files = _gin_files(run_dir)
    metadata = load_categories_file(metadata_path)
    parse_config(gin_files, FLAGS.gin_bindings)
    run_directory.check_num_classes(len(metadata["categories"]), metadata_path)
    return prefix, metadata_path, metadata, _input_size(), calibration_images


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    for name in ("checkpoint", "export_dir"):
        if not getattr(FLAGS, name):
            print(f"{argv[0]}: --{name} is required", file=sys.stderr)
            return 2
    try:
        prefix, metadata_path, metadata, input_size, calibration_images = _prepare()
    except (OSError, ValueError) as e:  # bad flags or input files (`_prepare` names them)
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2

    from max_deeplab.inference import export_saved_model
    from max_deeplab.model import build_model, restore

    model = build_model()
    try:
        restore(model, prefix)
    except (FileNotFoundError, ValueError) as e:
        # restore's message lists the unmatched variables on both sides.
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"restored {prefix}")
    from max_deeplab.inference.tflite import TFLiteConversionError

    try:
        export_saved_model(model, FLAGS.export_dir, metadata, input_size=input_size,
                           tflite=FLAGS.tflite, representative_images=calibration_images,
                           progress=print)
    except (OSError, ValueError, TFLiteConversionError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"exported SavedModel to {FLAGS.export_dir} (input size {input_size[0]}x"
          f"{input_size[1]}, metadata {metadata_path})")
    if FLAGS.tflite:
        print(f"TFLite models ({', '.join(FLAGS.tflite)}) in "
              f"{os.path.join(FLAGS.export_dir, 'tflite')}")
    return 0
