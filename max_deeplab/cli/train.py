"""`max-deeplab train`: train and/or evaluate MaX-DeepLab (paper §4, DESIGN.md §6-7).

Examples:
  max-deeplab train --model_dir /tmp/run --gin_file quickstart.gin --train_data 'd/train-*' \\
      --eval_data 'd/val-*' --mode train_and_eval --steps 200 --checkpoint_every 50
    (the tiny model on CPU; d/ from `max-deeplab synthetic` + `max-deeplab convert`, as in
    scripts/quickstart.sh)
  max-deeplab train --tpu my-tpu --strategy tpu --model_dir gs://b/run \\
      --gin_file max_deeplab_s_coco_641.gin --train_data 'gs://b/coco/train-*'

The latest checkpoint in --model_dir is resumed automatically. The data and step flags
override the gin config (`experiment_options.*`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from absl import flags

from max_deeplab.atomic_files import write_text_atomic
from max_deeplab.cli import gin_flags
from max_deeplab.cli.flag_parsing import parse_flags

# `pretrain` defines --model_dir, --tpu, --strategy, --mode, --steps and --checkpoint_every
# too. absl keeps one definition per name and process (the last one imported), so the two
# verbs' definitions accept the same values; each verb checks what it does not support.
flags.DEFINE_string("model_dir", None, "Directory for checkpoints, summaries and metrics.",
                    allow_override=True)
flags.DEFINE_string("tpu", None, "TPU name or address (implies --strategy=tpu).",
                    allow_override=True)
flags.DEFINE_enum("strategy", None, ["mirrored", "multi_worker", "one_device", "tpu"],
                  "Distribution strategy; default: tpu with --tpu, multi_worker when "
                  "TF_CONFIG is set, else mirrored.", allow_override=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval", "continuous_eval"],
                  "What to run.", allow_override=True)
flags.DEFINE_string("train_data", None, "Training TFRecord glob (from `max-deeplab convert`).",
                    allow_override=True)
flags.DEFINE_string("eval_data", None, "Evaluation TFRecord glob.", allow_override=True)
flags.DEFINE_integer("steps", None, "Total training steps (overrides the gin config).",
                     lower_bound=1, allow_override=True)
flags.DEFINE_integer("checkpoint_every", None, "Save a checkpoint every N steps.",
                     lower_bound=1, allow_override=True)
flags.DEFINE_string("initial_checkpoint", None, "Checkpoint to initialise matching weights "
                    "from when the model directory has none (e.g. a pretrained backbone).",
                    allow_override=True)
flags.DEFINE_boolean("jit_compile", None, "Compile each step with XLA (single replica / TPU).",
                     allow_override=True)
flags.DEFINE_enum("mixed_precision", None, ["bfloat16"], "Mixed precision (TPU).",
                  allow_override=True)
flags.DEFINE_integer("seed", None, "Make the run reproducible: model initialisation, data "
                     "order and augmentation, drop-path masks (experiment_options.seed).",
                     lower_bound=0, allow_override=True)

_ = gin_flags  # --gin_file / --gin_bindings


def _default_strategy(tpu: str | None) -> str:
    import json
    import os

    if tpu:
        return "tpu"
    if json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster"):
        return "multi_worker"
    return "mirrored"


def main(argv: list[str]) -> int:
    if parse_flags(argv, __doc__) is None:
        return 0
    FLAGS = flags.FLAGS
    if not FLAGS.model_dir:
        print(f"{argv[0]}: --model_dir is required", file=sys.stderr)
        return 2
    # Flag and config errors are reported before anything is written to --model_dir (a
    # failed start must not leave a run config behind) and before the model is built.
    flag_error = _model_dir_error(FLAGS.model_dir) or _data_flags_error(FLAGS.mode)
    if flag_error:
        print(f"{argv[0]}: {flag_error}", file=sys.stderr)
        return 2
    strategy_name = FLAGS.strategy or _default_strategy(FLAGS.tpu)
    try:
        gin_flags.parse_gin_flags()
    except (FileNotFoundError, ValueError) as e:
        print(f"{argv[0]}: gin configuration error: {e}", file=sys.stderr)
        return 2

    from max_deeplab.training.experiment import experiment_options
    from max_deeplab.training.trainer import NonFiniteLossError

    options = experiment_options()
    for key, value in (("total_steps", FLAGS.steps), ("checkpoint_every", FLAGS.checkpoint_every),
                       ("initial_checkpoint", FLAGS.initial_checkpoint),
                       ("jit_compile", FLAGS.jit_compile),
                       ("mixed_precision", FLAGS.mixed_precision), ("seed", FLAGS.seed)):
        if value is not None:
            options[key] = value
    try:
        check_learning_rate_schedule(int(options["total_steps"]))
        check_segments_fit_mask_slots()
        result = _run(strategy_name, options)
    except NonFiniteLossError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2
    if result:
        print(f"{FLAGS.mode} at step: " + ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(result.items()) if isinstance(v, float)))
    return 0


def _model_dir_error(model_dir: str) -> str | None:
    """Why `model_dir` cannot be used as a directory (a file is at or above it), or None.

    Remote paths (gs://...) are left to TensorFlow's file system."""
    import os

    from max_deeplab.file_system import is_url, nearest_existing_path

    if is_url(model_dir):
        return None
    path = nearest_existing_path(model_dir)
    if os.path.isdir(path):
        return None
    if path == os.path.abspath(model_dir):
        return f"--model_dir {model_dir} is a file; it must name a directory (new or existing)"
    return f"--model_dir {model_dir} cannot be created: {path} is a file, not a directory"


def _data_flags_error(mode: str) -> str | None:
    """The data flag `mode` needs but was not given, or None."""
    FLAGS = flags.FLAGS
    if mode in ("train", "train_and_eval") and not FLAGS.train_data:
        return f"--mode={mode} needs --train_data"
    if mode != "train" and not FLAGS.eval_data:
        return f"--mode={mode} needs --eval_data"
    return None


def configured_value(configurable_name: str, configurable: Callable, parameter: str) -> Any:
    """The value gin passes `configurable` (registered as `configurable_name`) for
    `parameter`: its binding in the parsed config, else the parameter's default."""
    import inspect

    import gin

    try:
        return gin.query_parameter(f"{configurable_name}.{parameter}")
    except ValueError:  # not bound
        return inspect.signature(configurable).parameters[parameter].default


def check_learning_rate_schedule(total_steps: int) -> None:
    """Builds the configured learning-rate schedule once, so that a bad warmup or learning
    rate is reported before anything is written or built (it is built again, inside the
    strategy, with the optimiser).

    It is built in a throwaway graph: the warmup schedule evaluates the decay at its last
    warmup step, and an eager op here would start TF's eager context, after which a
    multi-worker strategy can no longer configure its collectives ("Collective ops must be
    configured at program startup").
    """
    import tensorflow as tf

    from max_deeplab.training.optimizers import build_optimizer
    from max_deeplab.training.schedules import build_learning_rate_schedule

    learning_rate = configured_value("max_deeplab_optimizer", build_optimizer,
                                     "base_learning_rate")
    # Macros or references (%LR, @fn()) resolve only when the optimiser is built.
    if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        with tf.Graph().as_default():
            build_learning_rate_schedule(learning_rate, total_steps)


def check_segments_fit_mask_slots() -> None:
    """The data's segments per image (K_max) must not exceed the model's mask slots (N):
    the loss matches every segment to a slot of its own. It would otherwise fail only
    when the training step is traced, after the model is built."""
    from max_deeplab.data.pipeline import build_dataset
    from max_deeplab.model.encoder import MaXDeepLabEncoder

    k_max = configured_value("build_dataset", build_dataset, "k_max")
    num_slots = configured_value("MaXDeepLabEncoder", MaXDeepLabEncoder, "num_mask_slots")
    # Macros or references (not plain ints) are left to the loss's own check.
    if isinstance(k_max, int) and isinstance(num_slots, int) and k_max > num_slots:
        raise ValueError(
            f"build_dataset.k_max = {k_max} segments per image exceeds the model's "
            f"{num_slots} mask slots (MaXDeepLabEncoder.num_mask_slots); each segment needs "
            f"a slot of its own: add --gin_bindings 'build_dataset.k_max = {num_slots}' "
            f"(or raise MaXDeepLabEncoder.num_mask_slots)")


RUN_CONFIG_GIN = "config.gin"
RUN_CONFIG_JSON = "run.json"


def check_num_classes(num_classes: int, source: str) -> None:
    """The model's class count must equal the data set's (a clear error, not a crash)."""
    from max_deeplab.model import MaXDeepLab

    model_classes = configured_value("MaXDeepLab", MaXDeepLab, "num_classes")
    # A macro or reference (%NC) resolves only when the model is built: checked there.
    if isinstance(model_classes, int) and model_classes != num_classes:
        raise ValueError(
            f"the data set ({source}) has {num_classes} classes but the model is configured "
            f"with MaXDeepLab.num_classes = {model_classes}; add --gin_bindings "
            f"'MaXDeepLab.num_classes = {num_classes}' or use a matching config")


def save_run_config(model_dir: str, **data_flags: str | None) -> None:
    """Saves the gin config and data flags in the model directory, so `evaluate`, `export`
    and resumed runs rebuild the same model without repeating them."""
    import json

    import gin

    for name, text in ((RUN_CONFIG_GIN, gin.config_str()),
                       (RUN_CONFIG_JSON, json.dumps(data_flags, indent=1))):
        write_text_atomic(f"{model_dir.rstrip('/')}/{name}", text)


def _run(strategy_name: str, options: dict):
    """Wires the data pipeline, model, loss and post-processing into `run_experiment`."""
    import tensorflow as tf

    from max_deeplab import inference, losses, model
    from max_deeplab.data.metadata import is_thing_table, load_metadata
    from max_deeplab.training import build_optimizer
    from max_deeplab.training.experiment import (
        create_strategy,
        run_experiment,
        worker_write_dir,
    )

    FLAGS = flags.FLAGS
    strategy = create_strategy(strategy_name, tpu=FLAGS.tpu,
                               num_gpus=len(tf.config.list_physical_devices("GPU")))
    metadata_source = FLAGS.train_data or FLAGS.eval_data
    metadata = load_metadata(metadata_source)
    is_thing = is_thing_table(metadata)
    label_divisor = int(metadata["label_divisor"])
    check_num_classes(int(metadata["num_classes"]), metadata_source)
    # Only the chief writes into the shared model directory (see `worker_write_dir`).
    if (FLAGS.mode in ("train", "train_and_eval")
            and worker_write_dir(strategy, FLAGS.model_dir) == FLAGS.model_dir):
        try:
            save_run_config(FLAGS.model_dir, train_data=FLAGS.train_data,
                            eval_data=FLAGS.eval_data)
        except OSError as e:  # e.g. no permission: a user error, not a crash
            raise ValueError(f"cannot write the run config into --model_dir "
                             f"{FLAGS.model_dir}: {e}") from e

    def dataset_fn(pattern: str | None, is_training: bool):
        if pattern is None:
            return None
        from max_deeplab.data import build_dataset

        return lambda input_context, global_batch_size: build_dataset(
            pattern, is_training=is_training, global_batch_size=global_batch_size,
            input_context=input_context, seed=options["seed"])

    def postprocess_fn(outputs, image_size):
        return inference.postprocess(outputs, is_thing=is_thing, image_size=image_size,
                                     label_divisor=label_divisor)

    return run_experiment(
        mode=FLAGS.mode, model_dir=FLAGS.model_dir, strategy=strategy,
        model_fn=model.build_model,
        loss_fn=losses.MaXDeepLabLoss(),
        optimizer_fn=lambda total_steps: build_optimizer(total_steps),
        train_dataset_fn=dataset_fn(FLAGS.train_data, True),
        eval_dataset_fn=dataset_fn(FLAGS.eval_data, False),
        is_thing=is_thing, postprocess_fn=postprocess_fn, label_divisor=label_divisor,
        options=options)
