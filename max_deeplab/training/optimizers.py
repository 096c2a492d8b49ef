"""RAdam and Lookahead, the optimiser of MaX-DeepLab (paper §4 "Training", docs/design.md §7).

The paper trains with "RAdam + Lookahead", a poly learning rate with linear warmup, a
backbone learning-rate multiplier of 0.1 and a weight decay of 1e-4. Neither optimiser exists
in TF 2.20 / tf_keras (tensorflow-addons no longer imports), so both are written here as
new-style `tf_keras.optimizers.Optimizer` subclasses: they run under every `tf.distribute`
strategy (updates go through `strategy.extended.update`), inside `jit_compile=True` train
steps (no Python control flow on tensors, no host ops), and their slots are tracked, so
`tf.train.Checkpoint` saves and restores them.

RAdam (Liu et al. 2019, "On the Variance of the Adaptive Learning Rate and Beyond", Alg. 2),
with g the gradient, t = 1, 2, ... the step:
    m_t = β1 m + (1 − β1) g,   v_t = β2 v + (1 − β2) g²,   m̂_t = m_t / (1 − β1^t)
    ρ_∞ = 2 / (1 − β2) − 1,    ρ_t = ρ_∞ − 2 t β2^t / (1 − β2^t)
    if ρ_t > threshold:  r_t = sqrt((ρ_t − 4)(ρ_t − 2) ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2) ρ_t))
                         θ ← θ − lr · r_t · m̂_t / (sqrt(v_t / (1 − β2^t)) + ε)
    else:                θ ← θ − lr · m̂_t          (SGD with (bias-corrected) momentum)
The threshold: the paper's derivation only needs ρ_t > 4 (the variance of the adaptive
learning rate is finite there), but the authors' released code and tensorflow-addons, which
the 2020-era Google implementations of Axial-/MaX-DeepLab used, switch at ρ_t > 5; with
β2 = 0.999 (ρ_t ≈ t for small t) this keeps the first 5 steps (not 4) in the momentum
phase, where r_t is still dominated by noise. The default is 5 and it is configurable.

Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back", Alg. 1):
the inner ("fast") optimiser updates the weights every step; every k steps the slow weights
φ move towards the fast ones, φ ← φ + α (θ − φ), and the fast weights restart from φ.
Defaults k = 6, α = 0.5 are tensorflow-addons' (the Lookahead paper used k = 5 or 10 and
α = 0.5 or 0.8 in its sweeps). The slow weights must start where the run starts: `build`
copies the weights' values at that moment, and a run that loads its weights afterwards (an
initial checkpoint, an imported reference checkpoint, a checkpoint without optimiser state)
calls `Lookahead.reset_slow_weights` after the load — otherwise the first synchronisation
(step k) pulls every weight halfway back to its random initialisation.

Weight decay (1e-4, paper §4): the reference implementation (deeplab2) applies it as an L2
term `wd/2 · ||w||²` added to the loss, on convolution / dense kernels only (no batch-norm
γ/β, biases, relative position embeddings or the learnable memory). RAdam decays the
variables it is given (`weight_decay_variables`; `build_optimizer` gives the model's kernels,
`max_deeplab.model.partition.kernel_variables`). `weight_decay_mode="l2"` (default)
reproduces the reference exactly by adding `wd · w` to the gradient before the moment
updates, which keeps the model free of regularisers. `"decoupled"` is AdamW-style
(Loshchilov & Hutter): `θ ← θ − lr · mult · wd · θ` beside the adaptive step.

Backbone learning-rate multiplier (0.1, paper §4 and appendix A.6): RAdam takes
`lr_multipliers`, a list of `(variables, multiplier)` pairs (the first pair holding a
variable gives its multiplier); `build_optimizer` multiplies the model's pretrained backbone
(`backbone_variables`: stem and stages, but not their dual-path transformer blocks, the
`*_extra` layers or the memory, which the paper trains from scratch; see
`max_deeplab.model.partition`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.model.partition import kernel_variables
from max_deeplab.training.schedules import build_learning_rate_schedule

WEIGHT_DECAY_MODES = ("l2", "decoupled")


def _dense(gradient: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    # Sparse gradients (embedding lookups) do not occur in MaX-DeepLab; densify for one path.
    return tf.convert_to_tensor(gradient)


def _update_each(distribution: tf.distribute.Strategy, variables: Sequence[tf.Variable],
                 update: Callable[..., tf.Operation | None], serialize: bool,
                 partners: Sequence[tf.Variable] | None = None) -> tf.Operation:
    """`update(variable)` (or `update(variable, partner)`, the partner variable handed over
    per device as the variable is) for every variable, through
    `distribution.extended.update`; in a graph with `serialize`, one after another (control
    dependencies), so that only one variable's temporaries are alive at a time. Returns the
    last update (a no-op eagerly)."""
    chain: list[tf.Operation | None] = [None]

    def update_after_previous(variable: tf.Variable, *partner: tf.Variable) -> None:
        previous = ([chain[0]] if serialize and chain[0] is not None
                    and not tf.executing_eagerly() else [])
        with tf.control_dependencies(previous):
            chain[0] = update(variable, *partner)

    for index, variable in enumerate(variables):
        args = () if partners is None else (partners[index],)
        distribution.extended.update(variable, update_after_previous, args=args, group=False)
    return tf.group([] if chain[0] is None or tf.executing_eagerly() else [chain[0]])


def _only_when(predicate: tf.Tensor, updates: Callable[[], tf.Operation],
               after: tf.Operation | None) -> tf.Operation | None:
    """`updates()` in a step where the scalar `predicate` holds: one `tf.cond` around all of
    them (after `after`) in a graph, a Python `if` eagerly. A cond per variable multiplies
    the step graph's functions: ~20 s more tracing of the first train step (Lookahead's)
    and ~0.8 GB more host memory (RAdam's phase, MaX-DeepLab-S;
    benchmarks/bench_train_step.py)."""
    if tf.executing_eagerly():
        return updates() if bool(predicate) else None
    with tf.control_dependencies([] if after is None else [after]):
        return tf.cond(predicate, updates, tf.no_op)


@gin.configurable
class RAdam(tfk.optimizers.Optimizer):
    """Rectified Adam with per-variable learning-rate multipliers and weight decay.

    Args:
      learning_rate: float or `LearningRateSchedule` (called with the optimiser's step).
      beta_1, beta_2, epsilon: Adam's moment decays and denominator offset.
      rectification_threshold: ρ_t above which the adaptive (rectified) step is taken,
        below or at which the momentum-SGD step is (see the module docstring: 5).
      weight_decay: decay coefficient (paper: 1e-4); 0 disables.
      weight_decay_mode: "l2" (gradient += wd · w, as the reference's L2 loss) or
        "decoupled" (w -= lr · wd · w).
      weight_decay_variables: the variables that get weight decay (e.g. a model's kernels,
        `max_deeplab.model.partition.kernel_variables`); None: every variable.
      lr_multipliers: `(variables, multiplier)` pairs; a variable's learning rate (and
        decoupled decay) is scaled by the multiplier of the first pair holding it, 1 if
        none.
      rectify: False turns the rectification off (r_t = 1, always adaptive): plain Adam
        with bias correction. RAdam's rectifier damps the first ~1/(1 - beta_2) steps, which
        suits the paper's 100k-step runs but stalls runs of a few thousand steps.
      serialize_updates: inside a graph, update one variable after another (control
        dependencies), so that only one variable's temporaries (~10 tensors of its size)
        are alive at a time instead of every variable's at once (MaX-DeepLab-S, 321² crop:
        peak RSS of the training step 5.7 -> 5.0 GB measured). The result is identical
        either way.
      name: optimiser name.
    """

    def __init__(self, learning_rate: float | tfk.optimizers.schedules.LearningRateSchedule
                 = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7,
                 rectification_threshold: float = 5.0, weight_decay: float = 0.0,
                 weight_decay_mode: str = "l2",
                 weight_decay_variables: Iterable[tf.Variable] | None = None,
                 lr_multipliers: Sequence[tuple[Iterable[tf.Variable], float]] = (),
                 rectify: bool = True,
                 serialize_updates: bool = True, name: str = "RAdam"):
        if not 0.0 <= beta_1 < 1.0 or not 0.0 < beta_2 < 1.0:
            raise ValueError(f"RAdam needs 0 <= beta_1 < 1 and 0 < beta_2 < 1, got "
                             f"beta_1={beta_1}, beta_2={beta_2}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, "
                             f"got {weight_decay_mode!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        # The base class's own `weight_decay` is AdamW-style and applied before the update
        # to every variable; it stays None and decay is handled in `update_step`.
        super().__init__(name=name, weight_decay=None, jit_compile=False)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.rectification_threshold = float(rectification_threshold)
        self.rectify = bool(rectify)
        self.serialize_updates = bool(serialize_updates)
        object.__setattr__(self, "_scalar_cache", {})  # see apply_gradients
        self._last_update: tf.Operation | None = None
        self.decay = float(weight_decay)
        self.weight_decay_mode = weight_decay_mode
        # Sets of `Variable.ref()`s (variables themselves do not hash); set past the
        # trackable attribute machinery, which would track (and checkpoint) them.
        object.__setattr__(self, "_decayed", None if weight_decay_variables is None else
                           frozenset(v.ref() for v in weight_decay_variables))
        object.__setattr__(self, "_multiplier_groups", [
            (frozenset(v.ref() for v in variables), float(multiplier))
            for variables, multiplier in lr_multipliers])

    def multiplier_of(self, variable: tf.Variable) -> float:
        """The learning-rate multiplier of `variable` (first pair holding it, else 1)."""
        for group, multiplier in self._multiplier_groups:
            if variable.ref() in group:
                return multiplier
        return 1.0

    def decays(self, variable: tf.Variable) -> bool:
        """Whether `variable` receives weight decay."""
        return self.decay > 0 and (self._decayed is None or variable.ref() in self._decayed)

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        """Creates the first/second moment slots `m`, `v` of every variable."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._m = [self.add_variable_from_reference(v, "m") for v in var_list]
        self._v = [self.add_variable_from_reference(v, "v") for v in var_list]
        # Per-variable constants, resolved once from names (Python floats / bools, so
        # nothing data-dependent enters the compiled step).
        self._multipliers = [self.multiplier_of(v) for v in var_list]
        self._decay_flags = [self.decays(v) for v in var_list]

    def apply_gradients(self, grads_and_vars, name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs):
        self._last_update = None  # a new chain of serialised updates per call (and graph)
        # Step scalars of this call (and graph), see _step_scalars; set past the trackable
        # attribute machinery, which would try to checkpoint a dict of tensors.
        object.__setattr__(self, "_scalar_cache", {})
        return super().apply_gradients(
            grads_and_vars, name=name, skip_gradients_aggregation=skip_gradients_aggregation,
            **kwargs)

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable) -> None:
        """One RAdam step on `variable` (Liu et al. 2019, Alg. 2); see the module docstring."""
        previous = ([self._last_update] if self.serialize_updates
                    and self._last_update is not None and not tf.executing_eagerly() else [])
        with tf.control_dependencies(previous):
            self._last_update = self._update_step_ops(gradient, variable)

    def _step_scalars(self, dtype: tf.DType) -> tuple[tf.Tensor, ...]:
        """(learning rate, 1 − β1^t, 1 − β2^t, r_t, adaptive?) of this step.

        Computed once per `apply_gradients` call (and dtype) and shared by all variables:
        `iterations` does not change within a call, and ~30 scalar ops per variable made
        ~8k of the tiny model's train-step graph, whose tracing and first run they slowed.
        """
        cached = self._scalar_cache.get(dtype)
        if cached is not None:
            return cached
        # In float32 (TPUs have no float64). 1 − β^t is formed with expm1: the naive form
        # loses ~4 digits for small t, which shifts ρ_t (≈ 2000 − 1995 at t = 5) and so r_t
        # by ~1e-4 relative.
        t = tf.cast(self.iterations + 1, tf.float32)
        if self.beta_1 > 0:
            one_minus_beta_1_power = -tf.math.expm1(t * math.log(self.beta_1))
        else:
            one_minus_beta_1_power = tf.ones([], tf.float32)
        one_minus_beta_2_power = -tf.math.expm1(t * math.log(self.beta_2))
        beta_2_power = 1.0 - one_minus_beta_2_power
        rho_inf = 2.0 / (1.0 - self.beta_2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta_2_power / one_minus_beta_2_power
        # Clamped so that r_t stays finite in the momentum phase, where it is not used.
        ratio = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                 / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        r_t = tf.cast(tf.sqrt(tf.maximum(ratio, 0.0)), dtype)
        use_adaptive = rho_t > self.rectification_threshold
        cached = (tf.cast(self.learning_rate, dtype), one_minus_beta_1_power,
                  one_minus_beta_2_power, r_t, use_adaptive)
        self._scalar_cache[dtype] = cached
        return cached

    def _update_step_ops(self, gradient: tf.Tensor, variable: tf.Variable) -> tf.Operation:
        """The moment updates of either phase and the adaptive step, in one fused kernel.

        θ ← θ − s · m̂ / (sqrt(v̂) + ε) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t) is
        θ ← θ − s sqrt(1 − β2^t) / (1 − β1^t) · m / (sqrt(v) + ε sqrt(1 − β2^t)):
        `ResourceApplyAdam` (the moment updates and the step in one pass over the weights,
        instead of ~15 elementwise passes) with the bias corrections folded into its learning
        rate and ε; its own beta powers are 0 (no further correction), so 1 − β^t keeps the
        expm1 precision of `_step_scalars`. In the momentum phase its step size s is 0 (it
        only updates m and v) and `_momentum_steps` takes the step, once for all variables.
        """
        dtype = variable.dtype
        index = self._index_dict[self._var_key(variable)]
        m, v = self._m[index], self._v[index]
        base_lr, one_minus_beta_1_power, one_minus_beta_2_power, r_t, use_adaptive = (
            self._step_scalars(dtype))
        lr = base_lr * self._multipliers[index]
        gradient = tf.cast(_dense(gradient), dtype)
        decays = self._decay_flags[index]
        if decays and self.weight_decay_mode == "l2":
            gradient = gradient + self.decay * variable
        if decays and self.weight_decay_mode == "decoupled":
            variable.assign_sub(lr * self.decay * variable)
        step_size = lr
        if self.rectify:
            step_size = tf.where(use_adaptive, lr * r_t, tf.zeros([], dtype))
        sqrt_c2 = tf.cast(tf.sqrt(one_minus_beta_2_power), dtype)
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle,
            beta1_power=tf.zeros([], dtype), beta2_power=tf.zeros([], dtype),
            lr=step_size * sqrt_c2 / tf.cast(one_minus_beta_1_power, dtype),
            beta1=tf.constant(self.beta_1, dtype), beta2=tf.constant(self.beta_2, dtype),
            epsilon=self.epsilon * sqrt_c2, grad=gradient)

    def _distributed_apply_gradients_fn(self, distribution: tf.distribute.Strategy,
                                        grads_and_vars, **kwargs) -> tf.Variable:
        """Every variable's fused update, then (momentum phase only) the momentum steps:
        the phase is one scalar of the step, so one `tf.cond` holds the momentum steps of all
        variables (`_only_when`)."""
        grads_and_vars = list(grads_and_vars)
        for gradient, variable in grads_and_vars:
            distribution.extended.update(variable, self._apply_to, args=(gradient,),
                                         group=False)
        if self.rectify and grads_and_vars:
            use_adaptive = self._step_scalars(grads_and_vars[0][1].dtype)[4]
            variables = [v for _, v in grads_and_vars]
            done = _only_when(tf.logical_not(use_adaptive),
                              lambda: _update_each(distribution, variables, self._momentum_step,
                                                   self.serialize_updates),
                              self._last_update)
            self._last_update = self._last_update if done is None else done
        with tf.control_dependencies([] if self._last_update is None
                                     or tf.executing_eagerly() else [self._last_update]):
            return self.iterations.assign_add(1)

    def _apply_to(self, variable: tf.Variable, gradient: tf.Tensor) -> None:
        self._update_step(gradient, variable)  # (`update` passes the variable first)

    def _momentum_step(self, variable: tf.Variable) -> tf.Operation | None:
        """θ ← θ − lr · m / (1 − β1^t) (m already updated this step)."""
        index = self._index_dict[self._var_key(variable)]
        base_lr, one_minus_beta_1_power = self._step_scalars(variable.dtype)[:2]
        lr = base_lr * self._multipliers[index]
        return variable.assign_sub(
            lr * (self._m[index] / tf.cast(one_minus_beta_1_power, variable.dtype)),
            read_value=False)

    def get_config(self) -> dict:
        """The hyper-parameters; not `weight_decay_variables` and `lr_multipliers`, which are
        variables of one model (a deserialised optimiser decays every variable and has no
        multipliers until they are given again)."""
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
            "rectification_threshold": self.rectification_threshold, "rectify": self.rectify,
            "weight_decay": self.decay, "weight_decay_mode": self.weight_decay_mode,
            "serialize_updates": self.serialize_updates,
        })
        for key in ("clipnorm", "global_clipnorm", "clipvalue", "use_ema", "ema_momentum",
                    "ema_overwrite_frequency", "jit_compile", "is_legacy_optimizer"):
            config.pop(key, None)
        return config


@gin.configurable
class Lookahead(tfk.optimizers.Optimizer):
    """Lookahead around any new-style tf_keras optimiser (Zhang et al. 2019, Alg. 1).

    `apply_gradients` runs the inner optimiser (which also aggregates the replicas'
    gradients), then every `sync_period`-th call moves the slow weights towards the fast
    weights by `slow_step_size` and copies them back into the model variables.
    `learning_rate` is the inner optimiser's.
    """

    def __init__(self, optimizer: tfk.optimizers.Optimizer, sync_period: int = 6,
                 slow_step_size: float = 0.5, name: str = "Lookahead"):
        if sync_period < 1:
            raise ValueError(f"Lookahead sync_period must be >= 1, got {sync_period}")
        if not 0.0 <= slow_step_size <= 1.0:
            raise ValueError(f"Lookahead slow_step_size must be in [0, 1], got "
                             f"{slow_step_size}")
        if not isinstance(optimizer, tfk.optimizers.Optimizer):
            raise TypeError("Lookahead wraps a new-style tf_keras optimizer, got "
                            f"{type(optimizer).__name__}")
        super().__init__(name=name, weight_decay=None, jit_compile=False)
        self._optimizer = optimizer
        self.sync_period = int(sync_period)
        self.slow_step_size = float(slow_step_size)

    @property
    def inner_optimizer(self) -> tfk.optimizers.Optimizer:
        return self._optimizer

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._optimizer.learning_rate = value

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        """Builds the inner optimiser and the slow weights (initialised to `var_list`)."""
        self._optimizer.build(var_list)
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._slow = [self.add_variable_from_reference(v, "slow", initial_value=v)
                      for v in var_list]

    def slow_weight(self, variable: tf.Variable) -> tf.Variable:
        """The slow weight φ of `variable` (the optimiser must be built on it)."""
        return self._slow[self._index_dict[self._var_key(variable)]]

    def reset_slow_weights(self, var_list: Sequence[tf.Variable]) -> None:
        """φ ← θ for every variable of `var_list`: the slow weights start from the weights'
        current values. Call it (outside a replica context) after loading weights into a
        built optimiser's variables."""
        for variable in var_list:
            self.slow_weight(variable).assign(variable.read_value())

    def apply_gradients(self, grads_and_vars, name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs):
        """Inner update, then (every k-th call) the slow-weight synchronisation."""
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        if not grads_and_vars:
            return self.iterations
        variables = [v for _, v in grads_and_vars]
        with tf.init_scope():
            self.build(variables)
        self._optimizer.apply_gradients(
            grads_and_vars, name=name,
            skip_gradients_aggregation=skip_gradients_aggregation, **kwargs)
        return tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_sync, self._distribution_strategy, variables)

    def _distributed_sync(self, distribution: tf.distribute.Strategy,
                          variables: list[tf.Variable]) -> tf.Variable:
        sync = tf.equal((self.iterations + 1) % self.sync_period, 0)
        alpha = self.slow_step_size

        # Serialised like the inner optimiser's updates (one variable's temporaries at a
        # time), starting after its last update.
        first = getattr(self._optimizer, "_last_update", None)
        serialize = getattr(self._optimizer, "serialize_updates", False)

        def synchronise(fast: tf.Variable, slow: tf.Variable) -> tf.Operation | None:
            new_slow = slow + alpha * (fast - slow)
            return tf.group(slow.assign(new_slow, read_value=False),
                            fast.assign(new_slow, read_value=False))

        # Only every k-th step touches the weights: one tf.cond around all variables.
        slow_weights = [self.slow_weight(v) for v in variables]
        done = _only_when(sync, lambda: _update_each(distribution, variables, synchronise,
                                                     serialize, slow_weights), first)
        with tf.control_dependencies([] if done is None else [done]):
            return self.iterations.assign_add(1)

    def update_step(self, gradient, variable):  # pragma: no cover - apply_gradients is used
        raise NotImplementedError("Lookahead applies its inner optimizer's update_step")

    def get_config(self) -> dict:
        return {"name": self.name, "sync_period": self.sync_period,
                "slow_step_size": self.slow_step_size,
                "optimizer": tfk.optimizers.serialize(self._optimizer)}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        config["optimizer"] = tfk.optimizers.deserialize(
            config["optimizer"], custom_objects=custom_objects, use_legacy_optimizer=False)
        return cls(**config)


# Registered under a distinct gin name: the model garden also registers a `build_optimizer`.
@gin.configurable("max_deeplab_optimizer", denylist=["model"])
def build_optimizer(total_steps: int, model: tf.Module, base_learning_rate: float = 1e-3,
                    backbone_learning_rate_multiplier: float = 0.1,
                    weight_decay: float = 1e-4, weight_decay_mode: str = "l2",
                    use_lookahead: bool = True, lookahead_sync_period: int = 6,
                    lookahead_slow_step_size: float = 0.5) -> tfk.optimizers.Optimizer:
    """The paper's optimiser (§4): RAdam + Lookahead on a warmup + poly schedule, for
    `model`.

    Defaults: learning rate 1e-3 (set 3e-4 for MaX-DeepLab-L), backbone multiplier 0.1,
    weight decay 1e-4. Weight decay applies to the model's convolution and dense kernels
    (`max_deeplab.model.partition.kernel_variables`), the multiplier to its
    `backbone_variables` (a model without them: none). The schedule
    (`build_learning_rate_schedule`) decays to 0 at `total_steps`. Create it inside
    `strategy.scope()`.
    """
    schedule = build_learning_rate_schedule(base_learning_rate, total_steps)
    backbone = list(getattr(model, "backbone_variables", ()))
    multipliers = ([(backbone, backbone_learning_rate_multiplier)]
                   if backbone_learning_rate_multiplier != 1.0 and backbone else [])
    optimizer = RAdam(learning_rate=schedule, weight_decay=weight_decay,
                      weight_decay_mode=weight_decay_mode,
                      weight_decay_variables=kernel_variables(model),
                      lr_multipliers=multipliers)
    if use_lookahead:
        optimizer = Lookahead(optimizer, sync_period=lookahead_sync_period,
                              slow_step_size=lookahead_slow_step_size)
    return optimizer
