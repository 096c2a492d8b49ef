"""A run's model directory: what `train` records there, reading it back, and the checks made
before a run starts (docs/design.md §9).

``DIR/config.gin`` is the gin config the run was built from; ``DIR/run.json`` its data flags
(``{"train_data": GLOB, "eval_data": GLOB}``). A resumed `train`, `evaluate` and `export`
read them when --gin_file / --train_data / --eval_data are not given. The data globs are
stored absolute (URLs and ``tfds:`` sources as given), so that they resolve wherever the
next verb is run from.

The pre-flight checks compare the parsed gin config with itself and with the data (mask
slots vs segments per image, model classes vs data-set classes, the learning-rate schedule)
and look at the files a run reads (shard sizes, checkpoint indexes), so that a mistake is
named before the model is built or anything is written. They must not start TensorFlow's
eager context: a multi-worker strategy configures its collectives at start-up. No
TensorFlow is imported here for local paths until a check needs it.
"""
from __future__ import annotations

import json
import os
from typing import Any

from max_deeplab.atomic_files import write_text_atomic
from max_deeplab.file_system import (
    file_exists,
    glob_files,
    is_url,
    nearest_existing_path,
    read_text,
)
from max_deeplab.gin_config import configured_value
from max_deeplab.training.modes import is_evaluating, is_training

RUN_CONFIG_GIN = "config.gin"
RUN_CONFIG_JSON = "run.json"
DATA_FLAGS = ("train_data", "eval_data")


class RunConfigError(ValueError):
    """A run directory's `run.json` is unreadable or not what `train` writes (names it)."""


def absolute_data_pattern(pattern: str | None) -> str | None:
    """`pattern` (comma-separated globs) with each local glob made absolute; URLs and
    ``tfds:<name>:<split>`` sources unchanged."""
    if not pattern:
        return pattern
    parts = []
    for part in pattern.split(","):
        part = part.strip()
        parts.append(part if is_url(part) or part.startswith("tfds:")
                     else os.path.abspath(os.path.expanduser(part)))
    return ",".join(parts)


def save_run_config(model_dir: str, **data_flags: str | None) -> None:
    """Saves the gin config and the data flags (made absolute) in the model directory, so
    `evaluate`, `export` and resumed runs rebuild the same model without repeating them."""
    import gin

    data = {name: absolute_data_pattern(value) for name, value in data_flags.items()}
    for name, text in ((RUN_CONFIG_GIN, gin.config_str()),
                       (RUN_CONFIG_JSON, json.dumps(data, indent=1))):
        write_text_atomic(f"{model_dir.rstrip('/')}/{name}", text)


def saved_gin_config(model_dir: str) -> str | None:
    """DIR/config.gin, the model config `train` saved in `model_dir`, if it is there."""
    path = os.path.join(model_dir, RUN_CONFIG_GIN)
    return path if file_exists(path) else None


def saved_data_flags(model_dir: str) -> dict[str, str | None]:
    """The data flags (`train_data`, `eval_data`) `train` recorded in DIR/run.json; {} when
    there is no run.json (e.g. a directory from `import-checkpoint`).

    Raises:
      RunConfigError: run.json is unreadable, not JSON, or not an object of data globs.
    """
    path = os.path.join(model_dir, RUN_CONFIG_JSON)
    try:
        if not file_exists(path):
            return {}
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise RunConfigError(f"cannot read the run config {path} (written by `train`): "
                             f"{e}") from e
    if not isinstance(data, dict):
        raise RunConfigError(f"run config {path} holds a JSON {type(data).__name__}; expected "
                             'an object like {"train_data": GLOB, "eval_data": GLOB}')
    for key in DATA_FLAGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RunConfigError(f"run config {path}: {key!r} must be a file glob (a string) "
                                 f"or null, got {data[key]!r}")
    return data


def recorded_data(model_dir: str) -> str | None:
    """The data a run in `model_dir` was trained (else evaluated) on, from its run.json;
    None if it records none (e.g. a directory from `import-checkpoint`)."""
    data_flags = saved_data_flags(model_dir)
    return data_flags.get("train_data") or data_flags.get("eval_data")


def checkpoint_run(checkpoint: str) -> tuple[str, str]:
    """(checkpoint prefix, run directory) of a `train` model directory or a checkpoint prefix
    in one (its latest checkpoint, checked whole): the run's files (config.gin, run.json)
    sit beside its checkpoints.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: a damaged checkpoint (`check_checkpoint`; the message names the file).
    """
    from max_deeplab.model.checkpoints import check_checkpoint, resolve_checkpoint_path

    prefix = resolve_checkpoint_path(checkpoint)  # a prefix resolves to itself
    check_checkpoint(prefix)
    return prefix, checkpoint if prefix != checkpoint else os.path.dirname(prefix)


def data_metadata_path(run_dir: str, checkpoint: str) -> str:
    """The data-set metadata of the run in `run_dir` (whose checkpoint `checkpoint` is
    exported): that of the data recorded in its run.json, else a *metadata.json in the
    directory or its parent.

    Raises:
      RunConfigError: no metadata found (the message says where it looked).
    """
    from max_deeplab.data.metadata import MetadataError, find_metadata

    data = recorded_data(run_dir)
    if data:
        try:
            return find_metadata(data)
        except MetadataError as e:
            # The recorded data may have moved, or be relative to another directory: a
            # metadata file beside the checkpoint still serves.
            found = _metadata_beside(run_dir)
            if found is not None:
                return found
            raise RunConfigError(
                f"the run's data {data!r} (recorded in "
                f"{os.path.join(run_dir, RUN_CONFIG_JSON)}) has no readable metadata: "
                f"{e} Pass --metadata PATH") from e
    found = _metadata_beside(run_dir)
    if found is None:
        raise RunConfigError(
            f"no data-set metadata found for {checkpoint} (no {RUN_CONFIG_JSON} naming the "
            f"data, no *metadata.json in {run_dir} or its parent); pass --metadata PATH "
            "(PREFIX-metadata.json from `convert`, or a COCO panoptic JSON with "
            "'categories')")
    return found


def _metadata_beside(run_dir: str) -> str | None:
    """A metadata JSON in the checkpoint's directory (or its parent), if any."""
    for directory in (run_dir, os.path.dirname(run_dir.rstrip("/"))):
        found = glob_files(os.path.join(directory, "*metadata.json"))
        if found:
            return found[0]
    return None


def model_dir_problem(model_dir: str) -> str | None:
    """Why `model_dir` cannot be used as a directory (a file is at or above it), or None.

    Remote paths (gs://...) are left to TensorFlow's file system."""
    if is_url(model_dir):
        return None
    path = nearest_existing_path(model_dir)
    if os.path.isdir(path):
        return None
    if path == os.path.abspath(model_dir):
        return f"--model_dir {model_dir} is a file; it must name a directory (new or existing)"
    return f"--model_dir {model_dir} cannot be created: {path} is a file, not a directory"


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


def check_inputs(model_dir: str, mode: str, train_data: str | None, eval_data: str | None,
                 options: dict[str, Any]) -> None:
    """The data shards and the checkpoint that the run reads are whole: each shard has the
    size `convert` recorded, the checkpoint's index reads and its data files are complete.
    Cheap (file sizes and indexes); raises ValueError (ShardError, MetadataError,
    CheckpointReadError) or FileNotFoundError naming the file, before the model is built."""
    import tensorflow as tf

    from max_deeplab.data.metadata import check_shards
    from max_deeplab.model.checkpoints import check_checkpoint, resolve_checkpoint_path

    for pattern in (train_data if is_training(mode) else None,
                    eval_data if is_evaluating(mode) else None):
        if pattern and not pattern.startswith("tfds:"):
            check_shards(pattern)
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is not None:
        check_checkpoint(latest)
    elif is_training(mode) and options["initial_checkpoint"]:
        check_checkpoint(resolve_checkpoint_path(options["initial_checkpoint"]))
