"""`max-deeplab train` with a stand-in model and loss, for tests of the verb itself (flags,
signals, checkpoints, output) that need a run in seconds: the real model's first step takes
over a minute to compile on 2 cores.

`install()` replaces `max_deeplab.model.build_model` and `max_deeplab.losses.MaXDeepLabLoss`
(what `train` builds); run the verb afterwards, in this process or as a script:

    python tests/standin_training.py [--sleep SECONDS] train --model_dir ... (verb flags)
"""
from __future__ import annotations

import os
import sys
import time

import tensorflow as tf

TESTS = os.path.dirname(os.path.abspath(__file__))


class StandInLoss:
    """Mean squares of every output (so every weight gets a gradient), the loss dict
    `Trainer` expects; optionally sleeps in each step, so a test can catch a run mid-way."""

    def __init__(self, sleep: float = 0.0, **_kwargs):
        self.sleep = sleep

    def __call__(self, outputs, targets, global_batch_size=None):
        total = tf.add_n([tf.reduce_mean(tf.square(v)) for _, v in sorted(outputs.items())])
        if self.sleep:
            pause = tf.py_function(lambda: time.sleep(self.sleep) or 0.0, [], tf.float32)
            total += 0.0 * pause
        return {"total": total, "squares": total}


def install(sleep: float = 0.0, patch=setattr) -> None:
    """Makes `train` build the stand-in model and loss. `patch(obj, name, value)` (e.g.
    pytest's `monkeypatch.setattr`) does the replacing."""
    import gin

    import max_deeplab.losses
    import max_deeplab.model

    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from test_export import StandIn

    def build_model():
        height, width = gin.query_parameter("build_model.input_size")
        num_classes = gin.query_parameter("MaXDeepLab.num_classes")
        model = StandIn(num_classes=num_classes, num_slots=16)
        model(tf.zeros([1, height, width, 3]))  # built: the optimiser needs its variables
        return model

    patch(max_deeplab.model, "build_model", build_model)
    patch(max_deeplab.losses, "MaXDeepLabLoss",
          lambda *args, **kwargs: StandInLoss(sleep, **kwargs))


if __name__ == "__main__":
    args = sys.argv[1:]
    pause = 0.0
    if args[:1] == ["--sleep"]:
        pause, args = float(args[1]), args[2:]
    install(pause)
    from max_deeplab.__main__ import console_main

    sys.argv = ["max-deeplab", *args]
    console_main()
