"""`max-deeplab train`: train and/or evaluate MaX-DeepLab (paper §4, DESIGN.md §6-7).

Examples:
  max-deeplab train --model_dir /tmp/run --gin_file quickstart.gin --train_data 'd/train-*' \\
      --eval_data 'd/val-*' --mode train_and_eval --steps 200 --checkpoint_every 50
    (the tiny model on CPU; d/ from `max-deeplab synthetic` + `max-deeplab convert`, as in
    scripts/quickstart.sh)
  max-deeplab train --tpu my-tpu --strategy tpu --model_dir gs://b/run \\
      --gin_file max_deeplab_s_coco_641.gin --train_data 'gs://b/coco/train-*'

The latest checkpoint in --model_dir is resumed automatically; without --gin_file and the
data flags, a resumed run takes them from what the run saved there (config.gin, run.json),
so `max-deeplab train --model_dir DIR` continues a run. The data and step flags override the
gin config (`experiment_options.*`) and are saved in DIR/config.gin with it.

Ctrl-C or SIGTERM saves a checkpoint at the current step (one-worker runs; TPU and
multi-worker runs save on preemption), prints where it is and the command that resumes, and
exits with 130 / 143. Exit codes: 0 done; 1 the loss became non-finite or the data or a
checkpoint could not be read while running; 2 bad flags, config, data or checkpoint (found
before the model is built); 128 + N stopped by signal N.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from absl import flags

from max_deeplab.cli import gin_flags
from max_deeplab.cli.flag_parsing import parse_flags
from max_deeplab.run_config import (  # noqa: F401  (RUN_CONFIG_*: also for evaluate, export)
    RUN_CONFIG_GIN,
    RUN_CONFIG_JSON,
    RunConfigError,
    save_run_config,
)

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
    prog = argv[0]
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    # Flag and config errors are reported before anything is written to --model_dir (a
    # failed start must not leave a run config behind) and before the model is built.
    try:
        gin_files = _resumed_run_defaults(FLAGS.model_dir, FLAGS.mode)
    except (OSError, RunConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    flag_error = _model_dir_error(FLAGS.model_dir) or _data_flags_error(FLAGS.mode)
    if flag_error:
        print(f"{prog}: {flag_error}", file=sys.stderr)
        return 2
    strategy_name = FLAGS.strategy or _default_strategy(FLAGS.tpu)
    try:
        gin_flags.parse_gin_flags(gin_files)
        _bind_flag_overrides()
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: gin configuration error: {e}", file=sys.stderr)
        return 2

    import tensorflow as tf

    from max_deeplab.interruption import Interrupted, signals_raise_interrupted
    from max_deeplab.training.experiment import experiment_options
    from max_deeplab.training.save_on_interrupt import TrainingInterrupted
    from max_deeplab.training.trainer import NonFiniteLossError, orbit_output_dicts_logged_only

    options = experiment_options()
    try:
        with signals_raise_interrupted():
            check_learning_rate_schedule(int(options["total_steps"]))
            check_segments_fit_mask_slots()
            check_inputs(FLAGS.model_dir, FLAGS.mode, options)
            if FLAGS.mode in ("train", "train_and_eval") and strategy_name != "multi_worker":
                _remove_unfinished_saves(FLAGS.model_dir)
            with orbit_output_dicts_logged_only():
                _run(strategy_name, options)
    except TrainingInterrupted as e:
        print(f"{prog}: {_interruption_report(e, argv)}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"{prog}: interrupted by {e} before training started; the model directory's "
              "checkpoints are as they were", file=sys.stderr)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except tf.errors.DataLossError as e:
        print(f"{prog}: {_data_loss_report(e, FLAGS.mode)}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


def _resumed_run_defaults(model_dir: str, mode: str) -> list[str]:
    """The gin files to parse: --gin_file, else the config.gin a run saved in `model_dir`
    (as `evaluate` and `export` do). Also sets the data flags `mode` reads from the run's
    run.json when they are not given. Prints what it took from the run."""
    from max_deeplab.run_config import saved_data_flags, saved_gin_config

    FLAGS = flags.FLAGS
    gin_files = list(FLAGS.gin_file)
    if not gin_files:
        saved = saved_gin_config(model_dir)
        if saved is not None:
            gin_files = [saved]
            print(f"using the run's saved config {saved} (no --gin_file given)")
    wanted = [name for name, needed in (("train_data", mode in ("train", "train_and_eval")),
                                        ("eval_data", mode != "train"))
              if needed and not FLAGS[name].value]
    saved_data = saved_data_flags(model_dir) if wanted else {}
    for name in wanted:
        if saved_data.get(name):
            FLAGS[name].value = saved_data[name]
            print(f"using the run's --{name} {saved_data[name]} (from {RUN_CONFIG_JSON})")
    return gin_files


def _bind_flag_overrides() -> None:
    """Binds the step and compile flags into gin (`experiment_options.*`), over the gin
    files, so that the run's saved config.gin holds them and a resumed run keeps them."""
    import gin

    FLAGS = flags.FLAGS
    for key, value in (("total_steps", FLAGS.steps), ("checkpoint_every", FLAGS.checkpoint_every),
                       ("initial_checkpoint", FLAGS.initial_checkpoint),
                       ("jit_compile", FLAGS.jit_compile),
                       ("mixed_precision", FLAGS.mixed_precision), ("seed", FLAGS.seed)):
        if value is not None:
            gin.bind_parameter(f"experiment_options.{key}", value)


def check_inputs(model_dir: str, mode: str, options: dict[str, Any]) -> None:
    """The data shards and the checkpoint that the run reads are whole: each shard has the
    size `convert` recorded, the checkpoint's index reads and its data files are complete.
    Cheap (file sizes and indexes); raises ValueError (ShardError, MetadataError,
    CheckpointReadError) or FileNotFoundError naming the file, before the model is built."""
    import tensorflow as tf

    from max_deeplab.data.metadata import check_shards
    from max_deeplab.model.checkpoints import check_checkpoint, resolve_checkpoint_path

    FLAGS = flags.FLAGS
    training = mode in ("train", "train_and_eval")
    for pattern in (FLAGS.train_data if training else None,
                    FLAGS.eval_data if mode != "train" else None):
        if pattern and not pattern.startswith("tfds:"):
            check_shards(pattern)
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is not None:
        check_checkpoint(latest)
    elif training and options["initial_checkpoint"]:
        check_checkpoint(resolve_checkpoint_path(options["initial_checkpoint"]))


def _remove_unfinished_saves(model_dir: str) -> None:
    from max_deeplab.model.checkpoints import remove_unfinished_saves

    removed = remove_unfinished_saves(model_dir)
    if removed:
        print(f"removed {len(removed)} leftover(s) of a checkpoint save that was killed: "
              + ", ".join(removed))


def _interruption_report(interrupted: Any, argv: list[str]) -> str:
    """What an interrupted run saved, where, and the command that resumes it."""
    import shlex

    text = str(interrupted)
    if interrupted.step is None:
        return f"{text}; nothing saved: the model directory's checkpoints are as they were"
    if interrupted.checkpoint is None:
        return f"{text}; no step trained yet: nothing to save"
    saved = (f"saved checkpoint {interrupted.checkpoint}" if interrupted.saved else
             f"the latest checkpoint {interrupted.checkpoint} holds this step")
    command = " ".join([argv[0], *map(shlex.quote, argv[1:])])
    return f"{text}; {saved}. Resume with the same command:\n  {command}"


def _data_loss_report(error: Any, mode: str) -> str:
    """Which file a DataLossError raised while running came from: a checkpoint names itself
    ("TensorBundle at PREFIX"); for the data, the shards are read one by one to find it."""
    from max_deeplab.data.metadata import list_shards
    from max_deeplab.data.tfrecord import first_unreadable_shard

    message = error.message.strip().splitlines()[0] if error.message else str(error)
    if "TensorBundle" in message:
        return f"a checkpoint is corrupt: {message}"
    FLAGS = flags.FLAGS
    for name, used in (("train_data", mode in ("train", "train_and_eval")),
                       ("eval_data", mode != "train")):
        pattern = FLAGS[name].value
        if not used or not pattern or pattern.startswith("tfds:"):
            continue
        found = first_unreadable_shard(list_shards(pattern))
        if found is not None:
            return (f"TFRecord shard {found[0]} of --{name} is damaged ({found[1]}): copy it "
                    "again or rerun `max-deeplab convert`")
    return f"reading the data failed: {message}"


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
