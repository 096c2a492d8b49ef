"""orbit trainer and evaluator of MaX-DeepLab (paper §4 "Training", docs/design.md §7).

One code path for every `tf.distribute` strategy: the per-replica step runs under
`strategy.run`; the loss (`MaXDeepLabLoss(..., global_batch_size=...)`) already divides each
replica's per-image sum by the *global* batch size, so the optimiser's all-reduce *sum* of
gradients gives the gradient of the global mean loss (no extra 1/num_replicas).

Static shapes and no host round-trip inside a step: with `jit_compile=True` the whole
per-replica step (forward, matching with the "tf" backend, losses, gradients, RAdam +
Lookahead update) is one XLA program, which is what TPUStrategy compiles.

Non-finite losses: every step records the first step whose total loss is not finite; the
train loop's end (before orbit saves a checkpoint) raises `NonFiniteLossError`, so the
checkpoint on disk stays the last good one.

Output: the trainer prints one progress line per loop (preceded, before the first step, by
a line saying the step is being compiled: tens of seconds of silence otherwise), the
evaluator one PQ table per evaluation. orbit's Controller prints each loop's output dict too
(numpy scalars as ``np.float32(...)``); within `orbit_output_dicts_logged_only()` those go to
the log only.

Diagnostics (paper Figs. 5-6, `training.diagnostics`): with a `MaXDeepLabLoss`, every
training loop's and evaluation's logs (TensorBoard scalars) add ``diagnostics/...``: the
matched masks' class and mask similarities, the instance-discrimination and mask-ID pixel
accuracies and the matched slots per image, from the loss's own matching; the evaluator also
prints them above its PQ table.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import orbit
import tensorflow as tf
import tf_keras as tfk
from absl import logging

from max_deeplab.layers.step_random import combine_seed, step_seed_scope
from max_deeplab.panoptic_labels import LABEL_DIVISOR, PREDICTION_VOID, data_to_prediction_encoding
from max_deeplab.training.diagnostics import (
    SUMMARY_PREFIX,
    DiagnosticsAccumulator,
    diagnostic_values,
    losses_and_diagnostics,
)

LossFn = Callable[..., Mapping[str, tf.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; training stopped without saving that state."""


@contextlib.contextmanager
def orbit_output_dicts_logged_only() -> Iterator[None]:
    """Within the block, orbit's Controller logs its "train | ... | output: {...}" and
    " eval | ... | output: {...}" lines without printing them (the Trainer's progress line
    and the Evaluator's table say the same); its other lines (checkpoint saved, restored)
    are printed as before.

    orbit has no option for this: its module-level `_log` is swapped for the block.
    """
    from orbit import controller

    original = getattr(controller, "_log", None)
    if original is None:  # another orbit version: it prints, as before
        yield
        return

    def log(message: str) -> None:
        if "| output:" in message:
            logging.info(message)
        else:
            original(message)

    controller._log = log
    try:
        yield
    finally:
        controller._log = original


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Trainer(orbit.StandardTrainer):
    """Trains `model` with `loss_fn` and `optimizer` on a distributed dataset.

    Args:
      strategy: the distribution strategy every object below was created under.
      model: maps `image [B, H, W, 3]` float 0..255 to the output dict (docs/design.md §3).
      loss_fn: `loss_fn(outputs, targets, global_batch_size=...)` -> dict of scalar losses
        including `total` (`MaXDeepLabLoss`).
      optimizer: a tf_keras optimizer (`build_optimizer()`); built here on the model's
        trainable variables so that checkpoints can restore its slots before step 1.
      train_dataset: a `tf.distribute.DistributedDataset` of docs/design.md §4 batches.
      global_step: int64 variable, incremented once per step.
      global_batch_size: the batch size summed over replicas.
      total_steps: the run's last step (for the ETA in progress lines).
      jit_compile: compile the per-replica step with XLA (TPU readiness check on CPU).
        Not combinable with multi-replica Mirrored/MultiWorker strategies, whose gradient
        all-reduce happens outside the compiled program.
      seed: the run's seed; each step's drop-path masks are drawn from (seed, step,
        replica), so they are the same with and without XLA and in a resumed run. None:
        a random seed for this process.
      print_fn: where progress lines go.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: tfk.Model, loss_fn: LossFn,
                 optimizer: tfk.optimizers.Optimizer, train_dataset, global_step: tf.Variable,
                 global_batch_size: int, total_steps: int, jit_compile: bool = False,
                 seed: int | None = None, print_fn: Callable[[str], None] = print):
        if jit_compile and strategy.num_replicas_in_sync > 1 and not isinstance(
                strategy, tf.distribute.TPUStrategy):
            raise ValueError("jit_compile=True needs one replica (or TPUStrategy, which "
                             "compiles anyway); got "
                             f"{strategy.num_replicas_in_sync} replicas")
        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.global_step = global_step
        self.global_batch_size = int(global_batch_size)
        self.total_steps = int(total_steps)
        self.seed = int(seed) if seed is not None else random.SystemRandom().getrandbits(32)
        self._print = print_fn
        with strategy.scope():
            optimizer.build(model.trainable_variables)
            self._first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                               name="first_non_finite_step")
            self._loss_sums: dict[str, tf.Variable] = {}
            self._step_count = tf.Variable(0.0, trainable=False, name="loop_steps")
        self._diagnostics = DiagnosticsAccumulator(strategy)
        replica_step = self._replica_step
        if jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy):
            replica_step = tf.function(replica_step, jit_compile=True)
        self._replica_step_fn = replica_step
        self._loop_start_time = 0.0
        self._loop_start_step = 0
        self._compiled = False
        super().__init__(train_dataset, options=orbit.StandardTrainerOptions(
            use_tf_while_loop=False))

    def _replica_step(self, inputs: Mapping[str, tf.Tensor]):
        """Forward, losses, gradients and the optimiser update on one replica's batch.
        Returns (losses, diagnostics) (see `training.diagnostics`)."""
        variables = self.model.trainable_variables
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        step_seed = combine_seed(self.seed, self.global_step.read_value(), replica)
        with tf.GradientTape() as tape, step_seed_scope(step_seed):
            outputs = self.model(inputs["image"], training=True)
            losses, diagnostics = losses_and_diagnostics(self.loss_fn, outputs, inputs,
                                                         self.global_batch_size)
        gradients = tape.gradient(losses["total"], variables)
        self.optimizer.apply_gradients(list(zip(gradients, variables, strict=True)))
        return losses, diagnostics

    def _ensure_loss_sums(self, names: Sequence[str]) -> None:
        # Created on first trace (names come from the loss), outside the traced function.
        missing = [n for n in names if n not in self._loss_sums]
        if missing:
            with tf.init_scope(), self.strategy.scope():
                for name in missing:
                    self._loss_sums[name] = tf.Variable(0.0, trainable=False,
                                                        name=f"loop_sum_{name}")

    def train_step(self, iterator) -> None:
        per_replica, per_replica_diagnostics = self.strategy.run(self._replica_step_fn,
                                                                 args=(next(iterator),))
        # Each replica's loss is its share of the global mean: the SUM is the global loss.
        losses = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                  for k, v in per_replica.items()}
        self._diagnostics.add(tf.nest.map_structure(
            lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None),
            per_replica_diagnostics))
        self._ensure_loss_sums(sorted(losses))
        for name, value in losses.items():
            self._loss_sums[name].assign_add(value)
        self._step_count.assign_add(1.0)
        step = self.global_step.assign_add(1)
        bad = tf.logical_and(tf.logical_not(tf.math.is_finite(losses["total"])),
                             self._first_bad_step < 0)
        self._first_bad_step.assign(tf.where(bad, step, self._first_bad_step))

    def train_loop_begin(self) -> None:
        for variable in self._loss_sums.values():
            variable.assign(0.0)
        self._step_count.assign(0.0)
        self._diagnostics.reset()
        self._loop_start_time = time.time()
        self._loop_start_step = int(self.global_step.numpy())
        if not self._compiled:
            self._compiled = True
            # Not a "step N/M |" line: those are the progress lines (scripts parse them).
            self._print(f"compiling the training step (the first step takes a while; "
                        f"training from step {self._loop_start_step} to {self.total_steps}) ...")

    def current_learning_rate(self) -> float:
        """The (base, unmultiplied) learning rate of the last update."""
        return float(tf.convert_to_tensor(self.optimizer.learning_rate))

    def train_loop_end(self) -> dict[str, tf.Tensor]:
        count = max(float(self._step_count.numpy()), 1.0)
        means = {name: float(v.numpy()) / count for name, v in self._loss_sums.items()}
        step = int(self.global_step.numpy())
        first_bad = int(self._first_bad_step.numpy())
        if first_bad >= 0 or not all(np.isfinite(list(means.values()))):
            bad = ", ".join(f"{k}={v}" for k, v in sorted(means.items()) if not np.isfinite(v))
            raise NonFiniteLossError(
                f"non-finite training loss at step {first_bad if first_bad >= 0 else step} "
                f"(loop means: {bad or 'total'}); training stopped and this state was not "
                "saved: the latest checkpoint in the model directory is the last good one. "
                "Lower the learning rate or check the data.")
        elapsed = time.time() - self._loop_start_time
        steps_done = max(step - self._loop_start_step, 1)
        step_time = elapsed / steps_done
        learning_rate = self.current_learning_rate()
        eta = _format_duration(step_time * max(self.total_steps - step, 0))
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in sorted(means.items()))
        self._print(f"step {step}/{self.total_steps} | {loss_text} | lr={learning_rate:.3e} "
                    f"| {step_time:.3f} s/step | ETA {eta}")
        logs = {f"losses/{k}": tf.constant(v) for k, v in means.items()}
        logs["learning_rate"] = tf.constant(learning_rate)
        logs["step_time_seconds"] = tf.constant(step_time)
        logs.update({SUMMARY_PREFIX + k: tf.constant(v)
                     for k, v in self._diagnostics.result().items()})
        return logs


class Evaluator(orbit.StandardEvaluator):
    """Losses and PQ/SQ/RQ of the model on an evaluation dataset (paper §4 "Experiments").

    Predictions come from `postprocess` (paper §3.1) inside the step; PQ is accumulated
    on the host by `PanopticQualityAccumulator` (numpy), from this worker's replicas.

    Args:
      strategy, model, loss_fn, global_batch_size: as for `Trainer`.
      eval_dataset: distributed dataset of evaluation batches (finite): the targets of
        docs/design.md §4 and the ground-truth ``panoptic`` map at the model's resolution
        (the data encoding of `max_deeplab.panoptic_labels`), as `build_dataset` makes them.
      is_thing: per contiguous class, whether it is a thing class.
      postprocess_fn: `postprocess_fn(outputs, image_size=(H, W))` -> dict with `panoptic`
        in the prediction encoding of `max_deeplab.panoptic_labels`.
      label_divisor: of the panoptic encodings (the data set's).
      image_summary_dir: where sample predictions are written as TensorBoard images.
      num_summary_images: how many images of the first batch are written.
      jit_compile: as for `Trainer`.
      print_fn: where the PQ table of each evaluation goes.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: tfk.Model, loss_fn: LossFn,
                 eval_dataset, global_batch_size: int, is_thing: Sequence[bool],
                 postprocess_fn: Callable[..., Mapping[str, tf.Tensor]],
                 global_step: tf.Variable, label_divisor: int = LABEL_DIVISOR,
                 image_summary_dir: str | None = None, num_summary_images: int = 3,
                 jit_compile: bool = False, print_fn: Callable[[str], None] = print):
        from max_deeplab.evaluation import PanopticQualityAccumulator

        self.strategy = strategy
        self.model = model
        self.loss_fn = loss_fn
        self.global_batch_size = int(global_batch_size)
        self.global_step = global_step
        self.is_thing = [bool(t) for t in is_thing]
        self.label_divisor = int(label_divisor)
        self.postprocess_fn = postprocess_fn
        self._accumulator_factory = lambda: PanopticQualityAccumulator(
            len(self.is_thing) + 1, [False] + self.is_thing, label_divisor=self.label_divisor,
            ignore_label=PREDICTION_VOID)
        self.accumulator = self._accumulator_factory()
        self._image_writer = (tf.summary.create_file_writer(image_summary_dir)
                              if image_summary_dir else None)
        self._num_summary_images = num_summary_images
        self._print = print_fn
        step = self._replica_step
        if jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy):
            step = tf.function(step, jit_compile=True)
        self._replica_step_fn = step
        self.last_result: dict | None = None
        super().__init__(eval_dataset, options=orbit.StandardEvaluatorOptions(
            use_tf_while_loop=False))

    def _replica_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        outputs = self.model(inputs["image"], training=False)
        losses, diagnostics = losses_and_diagnostics(self.loss_fn, outputs, inputs,
                                                     self.global_batch_size)
        # Predictions at the ground truth's resolution (the labels may be kept unresized).
        image_size = inputs["panoptic"].shape[1:3]
        prediction = self.postprocess_fn(outputs, image_size=image_size)
        gt = data_to_prediction_encoding(inputs["panoptic"], self.label_divisor)
        return {"losses": losses, "diagnostics": diagnostics,
                "prediction": prediction["panoptic"], "groundtruth": gt,
                "image": tf.cast(inputs["image"], tf.uint8)}

    def eval_step(self, iterator):
        return self.strategy.run(self._replica_step_fn, args=(next(iterator),))

    def eval_begin(self) -> dict:
        self.accumulator = self._accumulator_factory()
        return {"loss_sums": {}, "diagnostic_sums": {}, "batches": 0, "images": None}

    def eval_reduce(self, state: dict, step_outputs) -> dict:
        local = self.strategy.experimental_local_results
        for name, value in step_outputs["losses"].items():
            total = sum(float(x.numpy()) for x in local(value))
            state["loss_sums"][name] = state["loss_sums"].get(name, 0.0) + total
        for name, pair in step_outputs["diagnostics"].items():
            previous = state["diagnostic_sums"].get(name, (0.0, 0.0))
            state["diagnostic_sums"][name] = tuple(
                before + sum(float(x.numpy()) for x in local(value))
                for before, value in zip(previous, pair, strict=True))
        state["batches"] += 1
        for gt, pred in zip(local(step_outputs["groundtruth"]),
                            local(step_outputs["prediction"]), strict=True):
            self.accumulator.update(gt.numpy(), pred.numpy())
        if state["images"] is None:
            k = self._num_summary_images
            state["images"] = (local(step_outputs["image"])[0][:k],
                               local(step_outputs["prediction"])[0][:k],
                               local(step_outputs["groundtruth"])[0][:k])
        return state

    def eval_end(self, state: dict) -> dict[str, float]:
        result = self.accumulator.result()
        self.last_result = result
        batches = max(state["batches"], 1)
        logs = {}
        for group in ("All", "Things", "Stuff"):
            suffix = "" if group == "All" else f"_{group.lower()}"
            for metric in ("pq", "sq", "rq"):
                logs[f"{metric.upper()}{suffix}"] = float(result[group][metric])
        for name, value in state["loss_sums"].items():
            logs[f"losses/{name}"] = value / batches
        for name, value in diagnostic_values(state["diagnostic_sums"]).items():
            logs[SUMMARY_PREFIX + name] = value
        if self._image_writer is not None and state["images"] is not None:
            from max_deeplab.inference.visualize import colorize

            image, prediction, groundtruth = state["images"]
            with self._image_writer.as_default(step=int(self.global_step.numpy())):
                tf.summary.image("image", image, max_outputs=self._num_summary_images)
                tf.summary.image("prediction", colorize(prediction.numpy()),
                                 max_outputs=self._num_summary_images)
                tf.summary.image("groundtruth", colorize(groundtruth.numpy()),
                                 max_outputs=self._num_summary_images)
            self._image_writer.flush()
        from max_deeplab.evaluation.pq_core import format_table

        losses = " ".join(f"{k[len('losses/'):]}={v:.4f}" for k, v in sorted(logs.items())
                          if k.startswith("losses/"))
        diagnostics = " ".join(f"{k[len(SUMMARY_PREFIX):]}={v:.4f}" for k, v in
                               sorted(logs.items()) if k.startswith(SUMMARY_PREFIX))
        self._print(f"eval at step {int(self.global_step.numpy())} | {losses}\n"
                    + (f"diagnostics | {diagnostics}\n" if diagnostics else "")
                    + format_table(result))
        logging.info("eval at step %d: %s", int(self.global_step.numpy()), logs)
        return logs
