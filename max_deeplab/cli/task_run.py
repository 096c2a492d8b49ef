"""How `train` and `evaluate` run the panoptic task (`max_deeplab.training.task`) and report
its end: the messages and exit codes the two verbs share."""
from __future__ import annotations

import sys
from typing import Any


def run_task(prog: str, argv: list[str], settings: Any, options: dict) -> int:
    """Runs the configured task (`task.run`) and turns how it ended into a message and an
    exit code: 0 done; 1 a non-finite loss or unreadable data or checkpoint while running;
    2 bad config, data or checkpoint found by the pre-flight checks; 128 + N stopped by
    signal N (Ctrl-C and SIGTERM raise within the run: see `interruption`)."""
    import tensorflow as tf

    from max_deeplab.interruption import Interrupted, signals_raise_interrupted
    from max_deeplab.training import task
    from max_deeplab.training.save_on_interrupt import TrainingInterrupted
    from max_deeplab.training.trainer import NonFiniteLossError

    try:
        with signals_raise_interrupted():
            task.run(settings, options)
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
        print(f"{prog}: {task.data_loss_report(e, settings)}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0


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
