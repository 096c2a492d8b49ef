"""The learning-rate schedule of MaX-DeepLab (paper §4 "Training", docs/design.md §7).

'poly' decay, lr(t) = base · (1 − t / T)^0.9, reaching 0 at the last step T, preceded by a
linear warmup over the first 5000 steps (the reference implementation's MaX-DeepLab configs:
`warmup_steps: 5000`, poly power 0.9, end learning rate 0). Built from the model garden's
pieces: tf_keras `PolynomialDecay` inside `official.modeling.optimization`'s `LinearWarmup`.
During warmup the rate rises linearly from 0 (step 0) to the poly value at the end of the
warmup, so the schedule is continuous (the reference ramps to `base` and then drops to the
poly value, a ≤ 5 % step at 5k of 100k steps).

The step passed in is the number of updates already applied (the optimiser's `iterations`),
so the first update uses lr(0) = 0 under warmup, as in the reference.
"""
from __future__ import annotations

import gin
import tf_keras as tfk
from official.modeling.optimization import lr_schedule


@gin.configurable
def build_learning_rate_schedule(base_learning_rate: float, total_steps: int,
                                 warmup_steps: int = 5000, power: float = 0.9,
                                 end_learning_rate: float = 0.0
                                 ) -> tfk.optimizers.schedules.LearningRateSchedule:
    """Poly decay from `base_learning_rate` to `end_learning_rate` over `total_steps`, with a
    linear warmup over the first `warmup_steps` (0 = none; must be < total_steps)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if base_learning_rate <= 0:
        raise ValueError(f"base_learning_rate must be positive, got {base_learning_rate}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got "
                         f"{warmup_steps}; lower it for short runs, e.g. --gin_bindings "
                         f"'build_learning_rate_schedule.warmup_steps = {total_steps // 10}'")
    decay = tfk.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=base_learning_rate, decay_steps=total_steps,
        end_learning_rate=end_learning_rate, power=power, cycle=False)
    if warmup_steps == 0:
        return decay
    return lr_schedule.LinearWarmup(after_warmup_lr_sched=decay, warmup_steps=warmup_steps,
                                    warmup_learning_rate=0.0, name="linear_warmup")
