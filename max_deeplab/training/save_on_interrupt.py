"""Saving a checkpoint at the current step when a training run is interrupted (Ctrl-C,
SIGTERM), so that no step is lost; TPU and multi-worker runs get the same from TensorFlow's
`PreemptionCheckpointHandler` (see `experiment._preemption_handler`).

`run_experiment` runs inside `SaveOnInterrupt()` and arms it once the model directory's
checkpoint has been restored: an interrupt before that (while the model is built or
restored) saves nothing — the state is not the run's yet. The `KeyboardInterrupt` (SIGTERM
arrives as `interruption.Interrupted`, a subclass, within the CLI's
`signals_raise_interrupted`) becomes `TrainingInterrupted`, which says where the state is.

Interrupts land between TensorFlow calls: a training step (one `tf.function` call updating
the model, the optimiser and the step counter together) has either run or not, so the saved
state is always that of a whole step.
"""
from __future__ import annotations

import signal

import tensorflow as tf

from max_deeplab.interruption import signal_name, signals_held


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM.

    Attributes: `signum`; `step`, the global step when it stopped (None: not saving here —
    before the model directory's state was restored, or a TPU / multi-worker run);
    `checkpoint`, the checkpoint holding that step's state (None: none, no step trained
    yet); `saved`, whether it was written just now.
    """

    def __init__(self, signum: int, step: int | None, checkpoint: str | None, saved: bool):
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"interrupted by {signal_name(signum)}{where}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.saved = saved

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class SaveOnInterrupt:
    """Context manager turning a KeyboardInterrupt in its block into `TrainingInterrupted`,
    after saving the state at the current step once `arm` has been called."""

    def __init__(self) -> None:
        self._manager: tf.train.CheckpointManager | None = None
        self._step_counter: tf.Variable | None = None
        self._restored_step: int | None = None

    def arm(self, manager: tf.train.CheckpointManager, step_counter: tf.Variable) -> None:
        """From now on an interrupt saves through `manager`, named by `step_counter`."""
        self._manager = manager
        self._step_counter = step_counter
        self._restored_step = int(step_counter.numpy())

    def __enter__(self) -> SaveOnInterrupt:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None or not issubclass(exc_type, KeyboardInterrupt):
            return False
        signum = getattr(exc, "signum", signal.SIGINT)
        if self._manager is None:
            raise TrainingInterrupted(signum, None, None, saved=False) from exc
        # A second Ctrl-C must not cut the save in half; it is ignored until the save is done.
        with signals_held(deliver=False):
            step = int(self._step_counter.numpy())
            latest = self._manager.latest_checkpoint
            if step == self._restored_step or (
                    latest is not None and latest.endswith(f"-{step}")):
                # No step trained since the latest checkpoint: it already holds this state.
                raise TrainingInterrupted(signum, step, latest, saved=False) from exc
            path = self._manager.save(checkpoint_number=step, check_interval=False)
            if path is None and hasattr(self._manager, "_last_checkpoint_step"):
                # The interrupt cut short the periodic save of this very step, which the
                # manager already counts as done (it returns None for a second save of one
                # step): write it again, whole.
                self._manager._last_checkpoint_step = None
                path = self._manager.save(checkpoint_number=step, check_interval=False)
        if path is None:  # not expected; the latest checkpoint is what there is
            raise TrainingInterrupted(signum, step, latest, saved=False) from exc
        raise TrainingInterrupted(signum, step, path, saved=True) from exc
