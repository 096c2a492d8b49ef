"""The panoptic task: the one entry point that assembles a MaX-DeepLab run and runs a mode
(docs/design.md §9), as the model garden's `Task` does — the model, the data, the loss, the
post-processing that turns predictions into the PQ metrics — for `train` and `evaluate`.

A run goes through three calls:

1. the settings (`RunSettings`): what the verb's flags say, completed from the run
   directory where they are silent (`resume_settings` for `train`, `evaluation_settings`
   for `evaluate`, which needs a checkpoint and the run's config);
2. `configure`: the settings are checked and the gin config is applied, with the step and
   compile settings bound over it (so the run's saved config.gin holds them); returns the
   run's `experiment_options`;
3. `run`: the pre-flight checks (`run_directory`), then the strategy, the data-set
   metadata, the saved run config and `experiment.run_experiment`.

`RunSetupError` (a ValueError) is what a verb reports as a usage error (exit code 2); it is
raised before anything is written into the model directory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from max_deeplab.training import run_directory
from max_deeplab.training.modes import default_strategy, is_evaluating, is_training

# `experiment_options` parameters a verb's flags may set over the gin config.
OPTION_OVERRIDES = ("total_steps", "checkpoint_every", "initial_checkpoint", "jit_compile",
                    "mixed_precision", "seed")


class RunSetupError(ValueError):
    """Settings, a run directory or a config that a run cannot start from (the message names
    the flag, file or binding)."""


@dataclasses.dataclass
class RunSettings:
    """What a run is asked to do.

    `train_data` / `eval_data`: shard globs (or ``tfds:`` sources) of the data the mode
    reads. `gin_files` / `gin_bindings`: the model and run config. `strategy`: one of
    `modes.STRATEGIES`, None for `modes.default_strategy`. `option_overrides`:
    `experiment_options` values (keys in `OPTION_OVERRIDES`) set over the gin config; None
    values are left to it.
    """

    model_dir: str
    mode: str = "train"
    train_data: str | None = None
    eval_data: str | None = None
    gin_files: list[str] = dataclasses.field(default_factory=list)
    gin_bindings: list[str] = dataclasses.field(default_factory=list)
    strategy: str | None = None
    tpu: str | None = None
    option_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def strategy_name(self) -> str:
        return self.strategy or default_strategy(self.tpu)


def resume_settings(settings: RunSettings, log: Callable[[str], None] = print) -> RunSettings:
    """`settings` completed from a run saved in its model directory, as `train` resumes: the
    gin files, when none are given, are the run's config.gin; the data flags the mode reads,
    when not given, are the run's run.json's. Logs what it took from the run.

    Raises:
      RunSetupError: run.json cannot be read or is malformed.
    """
    settings = dataclasses.replace(settings)
    try:
        if not settings.gin_files:
            saved = run_directory.saved_gin_config(settings.model_dir)
            if saved is not None:
                settings.gin_files = [saved]
                log(f"using the run's saved config {saved} (no --gin_file given)")
        wanted = [name for name, needed in (("train_data", is_training(settings.mode)),
                                            ("eval_data", is_evaluating(settings.mode)))
                  if needed and not getattr(settings, name)]
        saved_data = run_directory.saved_data_flags(settings.model_dir) if wanted else {}
    except (OSError, run_directory.RunConfigError) as e:
        raise RunSetupError(str(e)) from e
    for name in wanted:
        if saved_data.get(name):
            setattr(settings, name, saved_data[name])
            log(f"using the run's --{name} {saved_data[name]} (from "
                f"{run_directory.RUN_CONFIG_JSON})")
    return settings


def evaluation_settings(settings: RunSettings) -> RunSettings:
    """`settings` (mode "eval") completed from the run in its model directory, as `evaluate`
    needs them: the config is --gin_file or the run's config.gin, the evaluation data
    --eval_data or the run's, and the directory must hold a checkpoint. Checked before the
    model is built or anything is written into the directory.

    Raises:
      RunSetupError: the config, the evaluation data or the checkpoint is missing, or
        run.json cannot be read.
    """
    import os

    settings = dataclasses.replace(settings, mode="eval")
    model_dir = settings.model_dir
    try:
        if not settings.gin_files:
            saved_gin = run_directory.saved_gin_config(model_dir)
            if saved_gin is None:
                raise RunSetupError(f"{os.path.join(model_dir, run_directory.RUN_CONFIG_GIN)} "
                                    "not found; pass the model's --gin_file")
            settings.gin_files = [saved_gin]
        if not settings.eval_data:
            settings.eval_data = run_directory.saved_data_flags(model_dir).get("eval_data")
    except (OSError, run_directory.RunConfigError) as e:
        raise RunSetupError(str(e)) from e
    if not settings.eval_data:
        saved_run = os.path.join(model_dir, run_directory.RUN_CONFIG_JSON)
        raise RunSetupError(f"no evaluation data: pass --eval_data (none recorded in "
                            f"{saved_run})")
    import tensorflow as tf

    if tf.train.latest_checkpoint(model_dir) is None:
        raise RunSetupError(f"no checkpoint to evaluate in {model_dir} (no 'checkpoint' file "
                            "naming one; `train` writes them there)")
    return settings


def configure(settings: RunSettings) -> dict[str, Any]:
    """Checks `settings` and applies the gin config with the option overrides bound over it;
    returns the run's `experiment_options`.

    Raises:
      RunSetupError: the model directory cannot be one, the mode lacks its data, or the gin
        config does not parse (nothing is written).
    """
    problem = (run_directory.model_dir_problem(settings.model_dir)
               or _missing_data(settings))
    if problem:
        raise RunSetupError(problem)
    import gin

    from max_deeplab.gin_config import parse_config

    try:
        parse_config(settings.gin_files, settings.gin_bindings)
        for key, value in settings.option_overrides.items():
            if key not in OPTION_OVERRIDES:
                raise ValueError(f"{key!r} is not one of the run options a flag sets "
                                 f"({', '.join(OPTION_OVERRIDES)})")
            if value is not None:
                gin.bind_parameter(f"experiment_options.{key}", value)
    except (FileNotFoundError, ValueError) as e:
        raise RunSetupError(f"gin configuration error: {e}") from e

    from max_deeplab.training.experiment import experiment_options

    return experiment_options()


def _missing_data(settings: RunSettings) -> str | None:
    """The data flag the mode needs but was not given, or None."""
    if is_training(settings.mode) and not settings.train_data:
        return f"--mode={settings.mode} needs --train_data"
    if is_evaluating(settings.mode) and not settings.eval_data:
        return f"--mode={settings.mode} needs --eval_data"
    return None


def run(settings: RunSettings, options: dict[str, Any],
        print_fn: Callable[[str], None] = print) -> dict | None:
    """Runs `settings.mode` after `configure`: the pre-flight checks (schedule, segments vs
    mask slots, the data shards and checkpoint read), the removal of a killed save's
    leftovers, then `run_mode`. Returns the evaluation metrics of the eval modes.

    Raises what `run_mode` raises, and ValueError / FileNotFoundError from the checks.
    """
    from max_deeplab.training.trainer import orbit_output_dicts_logged_only

    run_directory.check_learning_rate_schedule(int(options["total_steps"]))
    run_directory.check_segments_fit_mask_slots()
    run_directory.check_inputs(settings.model_dir, settings.mode, settings.train_data,
                               settings.eval_data, options)
    if is_training(settings.mode) and settings.strategy_name != "multi_worker":
        _remove_unfinished_saves(settings.model_dir, print_fn)
    with orbit_output_dicts_logged_only():
        return run_mode(settings, options, print_fn)


def _remove_unfinished_saves(model_dir: str, print_fn: Callable[[str], None]) -> None:
    from max_deeplab.model.checkpoints import remove_unfinished_saves

    removed = remove_unfinished_saves(model_dir)
    if removed:
        print_fn(f"removed {len(removed)} leftover(s) of a checkpoint save that was killed: "
                 + ", ".join(removed))


def run_mode(settings: RunSettings, options: dict[str, Any],
             print_fn: Callable[[str], None] = print) -> dict | None:
    """Builds the strategy, reads the data-set metadata (classes checked against the model),
    saves the run config (training modes, chief only) and runs `run_experiment` with the
    data pipeline, model, loss, optimiser and post-processing of MaX-DeepLab."""
    import tensorflow as tf

    from max_deeplab import inference, losses, model
    from max_deeplab.data.metadata import is_thing_table, load_metadata
    from max_deeplab.training import build_optimizer
    from max_deeplab.training.experiment import (
        create_strategy,
        run_experiment,
        worker_write_dir,
    )

    strategy = create_strategy(settings.strategy_name, tpu=settings.tpu,
                               num_gpus=len(tf.config.list_physical_devices("GPU")))
    metadata_source = settings.train_data or settings.eval_data
    metadata = load_metadata(metadata_source)
    is_thing = is_thing_table(metadata)
    label_divisor = int(metadata["label_divisor"])
    run_directory.check_num_classes(int(metadata["num_classes"]), metadata_source)
    # Only the chief writes into the shared model directory (see `worker_write_dir`).
    model_dir = settings.model_dir
    if is_training(settings.mode) and worker_write_dir(strategy, model_dir) == model_dir:
        try:
            run_directory.save_run_config(model_dir, train_data=settings.train_data,
                                          eval_data=settings.eval_data)
        except OSError as e:  # e.g. no permission: a user error, not a crash
            raise ValueError(f"cannot write the run config into --model_dir "
                             f"{model_dir}: {e}") from e

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
        mode=settings.mode, model_dir=model_dir, strategy=strategy,
        model_fn=model.build_model,
        loss_fn=losses.MaXDeepLabLoss(),
        optimizer_fn=build_optimizer,
        train_dataset_fn=dataset_fn(settings.train_data, True),
        eval_dataset_fn=dataset_fn(settings.eval_data, False),
        is_thing=is_thing, postprocess_fn=postprocess_fn, label_divisor=label_divisor,
        options=options, print_fn=print_fn)


def data_loss_report(error: Any, settings: RunSettings) -> str:
    """Which file a DataLossError raised while running came from: a checkpoint names itself
    ("TensorBundle at PREFIX"); for the data, the shards are read one by one to find it."""
    from max_deeplab.data.metadata import list_shards
    from max_deeplab.data.tfrecord import first_unreadable_shard

    message = error.message.strip().splitlines()[0] if error.message else str(error)
    if "TensorBundle" in message:
        return f"a checkpoint is corrupt: {message}"
    for name, used in (("train_data", is_training(settings.mode)),
                       ("eval_data", is_evaluating(settings.mode))):
        pattern = getattr(settings, name)
        if not used or not pattern or pattern.startswith("tfds:"):
            continue
        found = first_unreadable_shard(list_shards(pattern))
        if found is not None:
            return (f"TFRecord shard {found[0]} of --{name} is damaged ({found[1]}): copy it "
                    "again or rerun `max-deeplab convert`")
    return f"reading the data failed: {message}"
