"""Runs a MaX-DeepLab experiment: strategy, checkpoints, orbit Controller, modes
(docs/design.md §7).

Modes: `train`, `eval` (the latest checkpoint once), `train_and_eval` (evaluation every
`eval_interval` steps and at the end), `continuous_eval` (every new checkpoint in the model
directory, until the final step's checkpoint has been evaluated or a timeout).

Checkpoints: `tf.train.Checkpoint(model=..., optimizer=..., global_step=...)` in
`model_dir`, every `checkpoint_every` steps, `max_to_keep` kept. The latest one is restored
automatically (same step, same optimiser slots and step count); otherwise an optional
`initial_checkpoint` (e.g. an ImageNet-pretrained backbone) initialises the matching model
weights. On TPU / multi-worker runs a `PreemptionCheckpointHandler` saves on preemption.

Multi-worker runs (MultiWorkerMirroredStrategy): every worker takes part in each save (reading
synchronised variables can be a collective op), but only the chief's files are the run's.
Other workers write checkpoints, summaries and metrics to `model_dir/workertemp_<task id>`
(the tf_keras / tf.distribute convention), cleared when they start, and resume from the
chief's latest checkpoint in `model_dir`, so no two processes write the same path.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping

import gin
import orbit
import tensorflow as tf
import tf_keras as tfk
from absl import logging

from max_deeplab.atomic_files import write_json_atomic
from max_deeplab.panoptic_labels import LABEL_DIVISOR
from max_deeplab.training.modes import MODES, STRATEGIES
from max_deeplab.training.save_on_interrupt import SaveOnInterrupt
from max_deeplab.training.trainer import Evaluator, Trainer


def create_strategy(strategy: str, tpu: str | None = None,
                    num_gpus: int = 0) -> tf.distribute.Strategy:
    """The distribution strategy through the model garden's `distribute_utils`.

    `multi_worker` reads the cluster from `TF_CONFIG`; `tpu` needs `--tpu` (a TPU name or
    address, or "local").
    """
    from official.common import distribute_utils

    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "tpu" and not tpu:
        raise ValueError("--strategy=tpu needs --tpu NAME (a TPU name, grpc:// address or "
                         "'local')")
    if strategy == "one_device":
        device = "/gpu:0" if num_gpus > 0 else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    return distribute_utils.get_distribution_strategy(
        distribution_strategy={"mirrored": "mirrored", "multi_worker": "multi_worker_mirrored",
                               "tpu": "tpu"}[strategy],
        num_gpus=num_gpus, tpu_address=tpu or "")


def load_initial_checkpoint(model: tfk.Model, path: str) -> int:
    """Loads every model weight whose name and shape match `path` (a prefix or directory).

    Keys may be our own (`model/<attribute path>`, written by `train`) or the reference
    implementation's top-level names (`encoder/...`, `pixel_space_head/...`), as for an
    ImageNet-pretrained backbone. Raises ValueError if nothing matches, or a matched name
    has another shape. Returns the number of variables loaded.
    """
    from max_deeplab.model.checkpoints import (
        checkpoint_keys,
        match_keys,
        resolve_checkpoint_path,
        shape_mismatch_lines,
    )

    prefix = resolve_checkpoint_path(path)
    reader = tf.train.load_checkpoint(prefix)
    available = reader.get_variable_to_shape_map()
    roots: list[Mapping] = [{"model": model}]
    if hasattr(model, "checkpoint_items"):
        roots.append(model.checkpoint_items)
    # The key layout (ours or the reference's) under which most model variables are found.
    layouts = [checkpoint_keys(root) for root in roots]
    best = max((match_keys(keys, available) for keys in layouts),
               key=lambda m: len(m.found) + len(m.wrong_shape))
    if not best.found and not best.wrong_shape:
        ours = sorted(layouts[0])[:5]
        theirs = sorted(k for k in available if not k.startswith("_CHECKPOINTABLE"))[:5]
        raise ValueError(
            f"initial checkpoint {prefix} has no variable matching the model. Model keys "
            f"look like {ours}; the checkpoint's like {theirs}.")
    if best.wrong_shape:
        raise ValueError("\n".join([f"initial checkpoint {prefix}:",
                                     *shape_mismatch_lines(best.wrong_shape)]))
    best.assign_from(reader)
    total = len(model.variables)
    logging.info("initial checkpoint %s: loaded %d of %d model variables", prefix,
                 len(best.found), total)
    print(f"initial checkpoint {prefix}: loaded {len(best.found)} of {total} model variables")
    return len(best.found)


@gin.configurable
def experiment_options(total_steps: int = 100_000, train_batch_size: int = 64,
                       eval_batch_size: int = 1, checkpoint_every: int = 1000,
                       max_to_keep: int = 5, steps_per_loop: int = 100,
                       eval_interval: int | None = None, eval_steps: int = -1,
                       continuous_eval_timeout: float | None = None,
                       initial_checkpoint: str | None = None,
                       initial_checkpoint_scope: str = "backbone", jit_compile: bool = False,
                       mixed_precision: str | None = None, seed: int | None = None) -> dict:
    """Run options with the paper's values (§4: batch 64, 100k steps).

    `seed` makes a run reproducible: the model's initialisation, the data order and
    augmentation (when the data set is built with it, as `train` does) and the drop-path
    masks; a seeded run with `jit_compile` reproduces the plain run up to float rounding.
    None: unseeded.

    `initial_checkpoint_scope`: "backbone" loads only the pretrainable backbone (the paper's
    ImageNet initialisation; memory path, decoder and heads stay random), "all" every
    weight whose name and shape match (fine-tuning from a panoptic checkpoint). `mixed_precision`
    "bfloat16" sets tf_keras' mixed_bfloat16 policy (TPU) for the run (restored after it)."""
    return dict(locals())


def worker_write_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where this process writes: `model_dir` on the chief (and in single-worker runs),
    `model_dir/workertemp_<task id>` on the other workers of a multi-worker run."""
    if strategy.extended.should_checkpoint:
        return model_dir
    return os.path.join(model_dir, f"workertemp_{strategy.cluster_resolver.task_id}")


def _steps_per_loop(steps_per_loop: int, checkpoint_every: int) -> int:
    # orbit saves only at loop ends: loops must divide the checkpoint interval.
    return max(1, math.gcd(steps_per_loop, checkpoint_every))


def _model_input_size(model: tfk.Model) -> tuple[int, int] | None:
    """(H, W) a functional model is built for (`build_model.input_size`), None if unknown."""
    try:
        shape = model.input_shape
    except (AttributeError, RuntimeError, ValueError):  # subclassed models have none
        return None
    if not isinstance(shape, tuple) or len(shape) != 4 or None in shape[1:3]:
        return None
    return int(shape[1]), int(shape[2])


def _images_fit_model(dataset_fn: Callable, model: tfk.Model, split: str) -> Callable:
    """`dataset_fn` checked to give images of the model's input size.

    The data's crop (`build_dataset.crop_size`) and the model's input size
    (`build_model.input_size`) are two bindings; a model built for one size would otherwise
    run on another without a word (e.g. a 1025 model trained on 641 crops).
    """
    size = _model_input_size(model)
    if size is None:
        return dataset_fn

    def checked(input_context, global_batch_size):
        dataset = dataset_fn(input_context, global_batch_size)
        spec = dataset.element_spec
        image = spec.get("image") if isinstance(spec, Mapping) else None
        got = tuple(image.shape[1:3]) if image is not None and image.shape.rank == 4 else ()
        if len(got) == 2 and None not in got and got != size:
            raise ValueError(
                f"the {split} images are {got[0]}x{got[1]} but the model is built for "
                f"{size[0]}x{size[1]}: bind build_dataset.crop_size = {size} (or "
                f"build_model.input_size = {got}) so that they agree")
        return dataset
    return checked


def run_experiment(*, mode: str, model_dir: str, strategy: tf.distribute.Strategy,
                   model_fn: Callable[[], tfk.Model],
                   loss_fn: Callable,
                   optimizer_fn: Callable[[int, tfk.Model], tfk.optimizers.Optimizer],
                   train_dataset_fn: Callable | None = None,
                   eval_dataset_fn: Callable | None = None,
                   is_thing: list[bool] | None = None,
                   postprocess_fn: Callable | None = None, label_divisor: int = LABEL_DIVISOR,
                   options: dict | None = None, print_fn: Callable[[str], None] = print
                   ) -> dict | None:
    """Builds everything under `strategy.scope()` and runs `mode`; returns eval metrics.

    A KeyboardInterrupt (Ctrl-C; SIGTERM within `interruption.signals_raise_interrupted`)
    ends the run with `TrainingInterrupted`, after saving the current step's state when
    training on one worker (`save_on_interrupt`).

    `train_dataset_fn(input_context, global_batch_size)` / `eval_dataset_fn(...)` return a
    `tf.data.Dataset` of per-replica batches; `loss_fn(outputs, targets, global_batch_size=)`
    is the loss (`MaXDeepLabLoss`, whose matcher picks its backend where it is traced);
    `optimizer_fn(total_steps, model)` the optimiser (`build_optimizer`), made after the
    model under the strategy's scope.
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    opts = dict(experiment_options())
    opts.update(options or {})
    if opts["mixed_precision"] and opts["mixed_precision"] != "bfloat16":
        raise ValueError(f"mixed_precision must be 'bfloat16' or empty, got "
                         f"{opts['mixed_precision']!r}")
    # The policy applies to what is built during this run only: a model built afterwards in
    # the same process (tests, notebooks, export after training) gets the previous one.
    with _global_dtype_policy("mixed_bfloat16" if opts["mixed_precision"] else None), \
            SaveOnInterrupt() as on_interrupt:
        total_steps = int(opts["total_steps"])
        training = mode in ("train", "train_and_eval")
        evaluating = mode != "train"
        if training and train_dataset_fn is None:
            raise ValueError(f"--mode={mode} needs training data (--train_data)")
        if evaluating and eval_dataset_fn is None:
            raise ValueError(f"--mode={mode} needs evaluation data (--eval_data)")

        if opts["seed"] is not None:
            tfk.utils.set_random_seed(int(opts["seed"]))
        with strategy.scope():
            model = model_fn()
            optimizer = optimizer_fn(total_steps, model)
            global_step = orbit.utils.create_global_step()
            checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                             global_step=global_step)

        write_dir = worker_write_dir(strategy, model_dir)
        trainer = evaluator = None
        if training:
            batch = int(opts["train_batch_size"])
            train_fn = _images_fit_model(train_dataset_fn, model, "training")
            dataset = orbit.utils.make_distributed_dataset(
                strategy, lambda input_context: train_fn(input_context, batch))
            trainer = Trainer(strategy, model, loss_fn, optimizer, dataset, global_step, batch,
                              total_steps, jit_compile=opts["jit_compile"], seed=opts["seed"],
                              print_fn=print_fn)
        else:
            with strategy.scope():
                optimizer.build(model.trainable_variables)
        if evaluating:
            batch = int(opts["eval_batch_size"])
            eval_fn = _images_fit_model(eval_dataset_fn, model, "evaluation")
            dataset = orbit.utils.make_distributed_dataset(
                strategy, lambda input_context: eval_fn(input_context, batch))
            evaluator = Evaluator(strategy, model, loss_fn, dataset, batch, is_thing or [],
                                  postprocess_fn, global_step, label_divisor=label_divisor,
                                  image_summary_dir=os.path.join(write_dir, "eval_images"),
                                  jit_compile=opts["jit_compile"], print_fn=print_fn)

        init_fn = None
        if opts["initial_checkpoint"] and training:
            scope = opts["initial_checkpoint_scope"]
            if scope == "backbone":
                from max_deeplab.training.initial_checkpoint import load_backbone_checkpoint

                init_fn = lambda: load_backbone_checkpoint(model, opts["initial_checkpoint"],
                                                           print_fn=print_fn)
            elif scope == "all":
                init_fn = lambda: load_initial_checkpoint(model, opts["initial_checkpoint"])
            else:
                raise ValueError(f"initial_checkpoint_scope must be 'backbone' or 'all', got "
                                 f"{scope!r}")
        checkpoint_every = int(opts["checkpoint_every"])
        if training and write_dir != model_dir:
            # A non-chief worker: what an earlier run left in its scratch is never resumed.
            if tf.io.gfile.exists(write_dir):
                tf.io.gfile.rmtree(write_dir)
            manager = _NonChiefCheckpointManager(
                checkpoint, model_dir, directory=write_dir, max_to_keep=1,
                step_counter=global_step, checkpoint_interval=checkpoint_every, init_fn=init_fn)
        else:
            manager = _RunCheckpointManager(
                checkpoint, directory=model_dir, max_to_keep=int(opts["max_to_keep"]),
                step_counter=global_step, checkpoint_interval=checkpoint_every, init_fn=init_fn)
        train_actions = []
        handler = _preemption_handler(strategy, manager) if training else None
        if handler is not None:
            # After each train loop: on a preemption notice, save now and exit the process.
            # check_interval=False: the manager would otherwise skip a save that falls between
            # two periodic checkpoints, and the steps since the last one would be lost. Named by
            # the step like the periodic ones (not by the save counter, which could collide).
            train_actions.append(lambda _outputs: handler.save_checkpoint_if_preempted(
                checkpoint_number=int(global_step.numpy()), check_interval=False))
        steps_per_loop = _steps_per_loop(int(opts["steps_per_loop"]), checkpoint_every)
        controller = orbit.Controller(
            strategy=strategy, trainer=trainer, evaluator=evaluator, global_step=global_step,
            steps_per_loop=steps_per_loop if training else None,
            checkpoint_manager=manager, train_actions=train_actions,
            summary_dir=os.path.join(write_dir, "train") if training else None,
            summary_interval=steps_per_loop if training else None,
            eval_summary_dir=os.path.join(write_dir, "eval") if evaluating else None)
        if training and handler is None and write_dir == model_dir:
            # Restored: Ctrl-C / SIGTERM from now on saves the current step (see the module).
            on_interrupt.arm(manager, global_step)

        result = None
        if mode == "train":
            controller.train(steps=total_steps)
        elif mode == "train_and_eval":
            result = controller.train_and_evaluate(
                train_steps=total_steps, eval_steps=int(opts["eval_steps"]),
                eval_interval=int(opts["eval_interval"] or checkpoint_every))
        elif mode == "eval":
            if manager.latest_checkpoint is None:
                raise FileNotFoundError(f"no checkpoint to evaluate in {model_dir}")
            result = controller.evaluate(steps=int(opts["eval_steps"]))
        else:
            timeout = opts["continuous_eval_timeout"]
            result = controller.evaluate_continuously(
                steps=int(opts["eval_steps"]), timeout=timeout,
                timeout_fn=lambda: int(global_step.numpy()) >= total_steps)
        if evaluator is not None and evaluator.last_result is not None:
            _write_metrics(write_dir, int(global_step.numpy()), evaluator.last_result)
        return result


@contextlib.contextmanager
def _global_dtype_policy(name: str | None):
    """Sets tf_keras' global dtype policy to `name` (None: unchanged) and restores it."""
    if name is None:
        yield
        return
    previous = tfk.mixed_precision.global_policy()
    # None restores "the default" (a policy that follows floatx) rather than pinning it.
    restore = None if previous.name == tfk.backend.floatx() else previous
    tfk.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tfk.mixed_precision.set_global_policy(restore)


def _start_slow_weights_at_model(optimizer: tfk.optimizers.Optimizer, model: tfk.Model,
                                 restored: str | None) -> None:
    """Lookahead's slow weights start from the weights the run really starts from.

    The optimiser is built (slow weights copied from the model) before the checkpoint
    manager loads anything, so after an initial checkpoint (`restored` None: a fresh start)
    or a checkpoint that holds the model but no optimiser state (`import-checkpoint`'s
    output) they would still hold the random initialisation, and the first synchronisation
    would pull every weight halfway back to it. A checkpoint with optimiser state restores
    its own slow weights.
    """
    from max_deeplab.training.optimizers import Lookahead

    if not isinstance(optimizer, Lookahead):
        return
    if restored is not None:
        keys = tf.train.load_checkpoint(restored).get_variable_to_shape_map()
        if any(key.startswith("optimizer/") for key in keys):
            return
        logging.info("%s holds no optimiser state: Lookahead starts from its weights",
                     restored)
    optimizer.reset_slow_weights(model.trainable_variables)


class _RunCheckpointManager(tf.train.CheckpointManager):
    """A `CheckpointManager` that, once it has restored the latest checkpoint or initialised
    the run (`init_fn`), starts Lookahead's slow weights at the model's weights where the
    restore did not bring them (see `_start_slow_weights_at_model`)."""

    def __init__(self, checkpoint: tf.train.Checkpoint, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self._run_checkpoint = checkpoint

    def _restore_or_initialize(self) -> str | None:
        return super().restore_or_initialize()

    def restore_or_initialize(self) -> str | None:
        restored = self._restore_or_initialize()
        _start_slow_weights_at_model(self._run_checkpoint.optimizer,
                                     self._run_checkpoint.model, restored)
        return restored


class _NonChiefCheckpointManager(_RunCheckpointManager):
    """Saves into a non-chief worker's scratch directory, resumes from the chief's.

    All workers must save at the same steps (a save can be a collective op), so a resumed
    worker also takes the chief's save schedule: the next save `checkpoint_interval` steps
    after the restored step, as `CheckpointManager.restore_or_initialize` does for its own
    directory.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, chief_dir: str, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self._chief_dir = chief_dir

    def _restore_or_initialize(self) -> str | None:
        latest = tf.train.latest_checkpoint(self._chief_dir)
        if latest is None:
            return super()._restore_or_initialize()
        self.checkpoint.restore(latest)
        if self.checkpoint_interval is not None:
            self._last_checkpoint_step = int(self._step_counter.numpy())
        return latest


def _write_metrics(model_dir: str, step: int, result: dict) -> None:
    """`DIR/eval/metrics.json`: the PQ result (docs/design.md §6 `evaluate`) with its step."""
    write_json_atomic(os.path.join(model_dir, "eval", "metrics.json"), {**result, "step": step},
                      indent=1, default=float)


def _preemption_handler(strategy: tf.distribute.Strategy,
                        manager: tf.train.CheckpointManager):
    """A `PreemptionCheckpointHandler` on TPU and multi-worker runs, else None."""
    if not isinstance(strategy, tf.distribute.TPUStrategy
                      | tf.distribute.MultiWorkerMirroredStrategy):
        return None
    try:
        return tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, manager)
    except (ValueError, NotImplementedError, AttributeError) as e:
        logging.warning("preemption checkpointing unavailable: %s", e)
        return None
