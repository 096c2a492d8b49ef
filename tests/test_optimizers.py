"""RAdam, Lookahead and the learning-rate schedule against their update rules, written out
independently in numpy here (Liu et al. 2019 Alg. 2; Zhang et al. 2019 Alg. 1)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from shared_strategies import mirrored_two_cpus

from max_deeplab.training import Lookahead, RAdam, build_learning_rate_schedule, build_optimizer

B1, B2, EPS = 0.9, 0.999, 1e-7


class NumpyRAdam:
    """Plain-numpy RAdam state machine (Liu et al. 2019, Alg. 2)."""

    def __init__(self, shape, threshold=5.0, wd=0.0, mode="l2", mult=1.0):
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.t = 0
        self.threshold, self.wd, self.mode, self.mult = threshold, wd, mode, mult

    def step(self, theta, g, lr):
        self.t += 1
        t, lr = self.t, lr * self.mult
        g = np.array(g, np.float64)
        if self.wd and self.mode == "l2":
            g = g + self.wd * theta
        if self.wd and self.mode == "decoupled":
            theta = theta - lr * self.wd * theta
        self.m = B1 * self.m + (1 - B1) * g
        self.v = B2 * self.v + (1 - B2) * g * g
        m_hat = self.m / (1 - B1 ** t)
        rho_inf = 2.0 / (1.0 - B2) - 1.0
        rho_t = rho_inf - 2 * t * B2 ** t / (1 - B2 ** t)
        if rho_t > self.threshold:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                            / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return theta - lr * r_t * m_hat / (np.sqrt(self.v / (1 - B2 ** t)) + EPS)
        return theta - lr * m_hat


def radam_reference(theta, grads, lrs, **kwargs):
    """Parameters after every RAdam step."""
    theta = np.array(theta, np.float64)
    opt = NumpyRAdam(theta.shape, **kwargs)
    out = []
    for g, lr in zip(grads, lrs, strict=True):
        theta = opt.step(theta, g, lr)
        out.append(theta)
    return out


def lookahead_reference(theta, grads, lrs, k, alpha, **kwargs):
    """Lookahead around numpy RAdam (Zhang et al. 2019, Alg. 1): every k steps
    slow += alpha (fast - slow) and the fast weights restart from slow; the inner moments
    carry on."""
    theta = np.array(theta, np.float64)
    slow = theta.copy()
    opt = NumpyRAdam(theta.shape, **kwargs)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        theta = opt.step(theta, g, lr)
        if t % k == 0:
            slow = slow + alpha * (theta - slow)
            theta = slow.copy()
        out.append(theta)
    return out


GRADS = [np.array([0.3, -1.2, 2.0]) * (1 + 0.5 * math.sin(i)) + 0.1 * i for i in range(14)]
THETA0 = np.array([1.0, -0.5, 0.25])


def _run(optimizer, variable, grads, jit=False):
    step = tf.function(lambda g: optimizer.apply_gradients([(g, variable)]), jit_compile=jit)
    values = []
    for g in grads:
        step(tf.constant(g, tf.float32))
        values.append(variable.numpy().copy())
    return values


def test_rho_threshold_window():
    # With beta_2 = 0.999, rho_5 lies in (4, 5]: thresholds 4 and 5 differ exactly at step 5.
    rho_inf = 2 / (1 - B2) - 1
    rho = [rho_inf - 2 * t * B2 ** t / (1 - B2 ** t) for t in range(1, 7)]
    assert 4 < rho[4] <= 5 and rho[5] > 5 and rho[3] <= 4


def test_radam_first_step_is_plain_sgd():
    # t = 1: m_hat = g and rho_1 = 1 <= 5, so theta_1 = theta_0 - lr * g exactly.
    v = tf.Variable(THETA0, dtype=tf.float32, name="w")
    _run(RAdam(0.1), v, GRADS[:1])
    np.testing.assert_allclose(v.numpy(), THETA0 - 0.1 * GRADS[0], rtol=1e-6)


@pytest.mark.parametrize("threshold", [4.0, 5.0])
@pytest.mark.parametrize("jit", [False, True])
def test_radam_matches_update_rule(threshold, jit):
    v = tf.Variable(THETA0, dtype=tf.float32, name="w")
    got = _run(RAdam(0.05, rectification_threshold=threshold), v, GRADS[:10], jit=jit)
    want = radam_reference(THETA0, GRADS[:10], [0.05] * 10, threshold=threshold)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=1e-6)


def test_radam_threshold_switch_changes_step_five():
    results = {}
    for threshold in (4.0, 5.0):
        v = tf.Variable(THETA0, dtype=tf.float32, name="w")
        results[threshold] = _run(RAdam(0.05, rectification_threshold=threshold), v, GRADS[:5])
    np.testing.assert_allclose(results[4.0][3], results[5.0][3], rtol=1e-6)
    assert np.abs(results[4.0][4] - results[5.0][4]).max() > 1e-4


def test_radam_with_schedule_uses_step_count():
    schedule = build_learning_rate_schedule(1e-2, total_steps=20, warmup_steps=4)
    v = tf.Variable(THETA0, dtype=tf.float32, name="w")
    got = _run(RAdam(schedule), v, GRADS[:8])
    lrs = [float(schedule(i)) for i in range(8)]  # update i+1 uses lr(i)
    assert lrs[0] == 0.0
    want = radam_reference(THETA0, GRADS[:8], lrs)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_weight_decay_first_step_and_exclusion(mode):
    lr, wd = 0.1, 0.01
    kernel = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
    gamma = tf.Variable(THETA0, dtype=tf.float32, name="batch_norm/gamma")
    opt = RAdam(lr, weight_decay=wd, weight_decay_mode=mode, weight_decay_variables=[kernel])
    zero = tf.zeros(3)
    opt.apply_gradients([(zero, kernel), (zero, gamma)])
    # Both modes shrink a kernel by (1 - lr * wd) on the first step with a zero gradient
    # (l2: g = wd * theta and the t = 1 step is lr * g); gamma is not decayed.
    np.testing.assert_allclose(kernel.numpy(), THETA0 * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_allclose(gamma.numpy(), THETA0, rtol=0)


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_weight_decay_matches_update_rule(mode):
    v = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
    got = _run(RAdam(0.05, weight_decay=0.1, weight_decay_mode=mode), v, GRADS[:9])
    want = radam_reference(THETA0, GRADS[:9], [0.05] * 9, wd=0.1, mode=mode)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=1e-6)


def test_lr_multiplier_and_weight_decay_go_to_the_variables_given():
    backbone = tf.Variable(THETA0, dtype=tf.float32, name="encoder/stage3/block1/x")
    head = tf.Variable(THETA0, dtype=tf.float32, name="encoder/stage5_extra/block1/x")
    opt = RAdam(0.1, lr_multipliers=[([backbone], 0.1)])
    g = tf.constant(GRADS[0], tf.float32)
    opt.apply_gradients([(g, backbone), (g, head)])
    np.testing.assert_allclose(THETA0 - backbone.numpy(), 0.1 * (THETA0 - head.numpy()),
                               rtol=1e-5)
    # THETA0 - head is a difference of float32 values near 1: exact to ~1 ULP (1.2e-7).
    np.testing.assert_allclose(THETA0 - head.numpy(), 0.1 * GRADS[0], rtol=1e-6, atol=1.2e-7)
    # Names do not matter: a variable named like a kernel but not given is not decayed;
    # without a list every variable is.
    named_kernel = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
    assert not RAdam(weight_decay=0.1, weight_decay_variables=[head]).decays(named_kernel)
    assert RAdam(weight_decay=0.1).decays(named_kernel)
    assert RAdam(lr_multipliers=[([head], 0.5), ([head, backbone], 0.1)]).multiplier_of(
        head) == 0.5


@pytest.mark.parametrize("jit", [False, True])
def test_lookahead_matches_update_rule(jit):
    v = tf.Variable(THETA0, dtype=tf.float32, name="w")
    opt = Lookahead(RAdam(0.05), sync_period=6, slow_step_size=0.5)
    got = _run(opt, v, GRADS[:14], jit=jit)
    want = lookahead_reference(THETA0, GRADS[:14], [0.05] * 14, k=6, alpha=0.5)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=1e-6)
    assert int(opt.iterations) == 14 and int(opt.inner_optimizer.iterations) == 14


def test_lookahead_sync_moves_halfway():
    # k = 2, alpha = 0.5: after step 2 the weights are the midpoint of theta_0 and the
    # inner optimiser's theta_2.
    v = tf.Variable(THETA0, dtype=tf.float32, name="w")
    _run(Lookahead(RAdam(0.05), sync_period=2, slow_step_size=0.5), v, GRADS[:2])
    fast = radam_reference(THETA0, GRADS[:2], [0.05] * 2)[-1]
    np.testing.assert_allclose(v.numpy(), 0.5 * (THETA0 + fast), rtol=1e-6)


def test_checkpoint_restores_identical_subsequent_updates(tmp_path):
    def make():
        variable = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
        schedule = build_learning_rate_schedule(0.05, total_steps=30, warmup_steps=3)
        opt = Lookahead(RAdam(schedule, weight_decay=1e-2), sync_period=6)
        opt.build([variable])
        return variable, opt, tf.train.Checkpoint(variable=variable, optimizer=opt)

    variable, opt, ckpt = make()
    _run(opt, variable, GRADS[:4])
    path = ckpt.save(str(tmp_path / "ckpt"))
    continued = _run(opt, variable, GRADS[4:11])

    variable2, opt2, ckpt2 = make()
    ckpt2.restore(path).assert_consumed()
    assert int(opt2.iterations) == 4 and int(opt2.inner_optimizer.iterations) == 4
    resumed = _run(opt2, variable2, GRADS[4:11])
    np.testing.assert_array_equal(np.array(resumed), np.array(continued))
    # The restored run must differ from a fresh optimiser at the same weights.
    variable3, opt3, _ = make()
    variable3.assign(np.asarray(_run_restore_value(path)))
    fresh = _run(opt3, variable3, GRADS[4:11])
    assert np.abs(np.array(fresh) - np.array(continued)).max() > 1e-5


def _run_restore_value(path):
    variable = tf.Variable(np.zeros(3), dtype=tf.float32)
    tf.train.Checkpoint(variable=variable).restore(path).expect_partial()
    return variable.numpy()


def test_mirrored_two_replicas_match_single_device():
    strategy = mirrored_two_cpus()
    if strategy is None:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py configures them)")
    with strategy.scope():
        variable = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
        opt = Lookahead(RAdam(0.05, weight_decay=1e-2), sync_period=3)

    # Replica r sees gradient (r + 1) * g / 3: their sum is g, the one-device gradient.
    @tf.function
    def step(g):
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            scale = tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32) / 3.0
            opt.apply_gradients([(g * scale, variable)])
        strategy.run(replica_fn)

    for g in GRADS[:7]:
        step(tf.constant(g, tf.float32))
    per_replica = [t.numpy() for t in strategy.experimental_local_results(variable)]
    np.testing.assert_array_equal(per_replica[0], per_replica[1])

    single = tf.Variable(THETA0, dtype=tf.float32, name="conv/kernel")
    want = _run(Lookahead(RAdam(0.05, weight_decay=1e-2), sync_period=3), single, GRADS[:7])
    np.testing.assert_allclose(per_replica[0], want[-1], rtol=1e-5, atol=1e-7)


def test_schedule_values():
    schedule = build_learning_rate_schedule(1e-3, total_steps=100_000, warmup_steps=5000)
    poly = lambda t: 1e-3 * (1 - t / 100_000) ** 0.9
    expected = {0: 0.0, 2500: 0.5 * poly(5000), 5000: poly(5000), 52_500: poly(52_500),
                99_000: poly(99_000), 100_000: 0.0, 120_000: 0.0}
    for step, want in expected.items():
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step


def test_schedule_without_warmup_and_errors():
    schedule = build_learning_rate_schedule(1e-3, total_steps=10, warmup_steps=0)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(5)) == pytest.approx(1e-3 * 0.5 ** 0.9)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_learning_rate_schedule(1e-3, total_steps=100, warmup_steps=5000)
    with pytest.raises(ValueError, match="total_steps"):
        build_learning_rate_schedule(1e-3, total_steps=0)


class _WithBackbone(tfk.Model):
    """A conv (the "backbone"), a batch norm and a dense head."""

    def __init__(self):
        super().__init__()
        self.conv = tfk.layers.Conv2D(2, 3)
        self.norm = tfk.layers.BatchNormalization()
        self.head = tfk.layers.Dense(2)

    @property
    def backbone_variables(self):
        return self.conv.variables

    def call(self, x):
        return self.head(self.norm(self.conv(x)))


def test_build_optimizer_defaults():
    model = _WithBackbone()
    model(tf.zeros([1, 5, 5, 1]))
    opt = build_optimizer(total_steps=100_000, model=model)
    assert isinstance(opt, Lookahead) and isinstance(opt.inner_optimizer, RAdam)
    inner = opt.inner_optimizer
    assert inner.decay == 1e-4 and inner.weight_decay_mode == "l2"
    multiplied = {v.name for v in model.trainable_variables if inner.multiplier_of(v) == 0.1}
    assert multiplied == {v.name for v in model.conv.trainable_variables}
    decayed = {v.name for v in model.trainable_variables if inner.decays(v)}
    assert decayed == {model.conv.kernel.name, model.head.kernel.name}
    assert opt.sync_period == 6 and opt.slow_step_size == 0.5
    assert isinstance(inner._learning_rate, tfk.optimizers.schedules.LearningRateSchedule)


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight_decay_mode"):
        RAdam(weight_decay_mode="l1")
    with pytest.raises(ValueError, match="sync_period"):
        Lookahead(RAdam(), sync_period=0)
    with pytest.raises(TypeError, match="new-style"):
        Lookahead(tfk.optimizers.legacy.Adam())


def test_radam_without_rectification_is_adam():
    # Hand-written Adam (Kingma & Ba, bias-corrected moments) as the reference.
    theta, m, v = THETA0.copy(), np.zeros(3), np.zeros(3)
    expected = []
    for t, g in enumerate(GRADS, start=1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        theta = theta - 0.01 * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
        expected.append(theta.copy())
    variable = tf.Variable(THETA0.astype(np.float32))
    got = _run(RAdam(learning_rate=0.01, rectify=False), variable, GRADS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The rectified optimiser differs in the first steps (SGD-like, then damped).
    rectified = _run(RAdam(learning_rate=0.01), tf.Variable(THETA0.astype(np.float32)), GRADS)
    assert not np.allclose(rectified[0], expected[0])


@pytest.mark.parametrize("serialize", [True, False])
def test_many_variables_both_phases_match_the_rule(serialize):
    """Several variables (multipliers, decay on some) through the momentum and the adaptive
    phase, in one traced step: each follows its own numpy RAdam."""
    shapes = [(3,), (2, 4), (5,)]
    rng = np.random.default_rng(3)
    starts = [rng.normal(size=s) for s in shapes]
    variables = [tf.Variable(x.astype(np.float32), name=f"w{i}") for i, x in enumerate(starts)]
    opt = RAdam(0.05, weight_decay=0.01, weight_decay_variables=variables[:2],
                lr_multipliers=[([variables[1]], 0.1)], serialize_updates=serialize)
    references = [NumpyRAdam(s, wd=0.01 if i < 2 else 0.0, mult=0.1 if i == 1 else 1.0)
                  for i, s in enumerate(shapes)]
    thetas = [x.copy() for x in starts]
    step = tf.function(lambda *gs: opt.apply_gradients(zip(gs, variables)))
    for t in range(9):  # steps 1-5 momentum, 6-9 adaptive
        grads = [rng.normal(size=s) for s in shapes]
        step(*[tf.constant(g, tf.float32) for g in grads])
        for i, reference in enumerate(references):
            thetas[i] = reference.step(thetas[i], grads[i], 0.05)
            np.testing.assert_allclose(variables[i].numpy(), thetas[i], rtol=2e-5, atol=1e-6,
                                       err_msg=f"variable {i}, step {t + 1}")


def test_one_phase_branch_for_the_whole_model():
    """The rectification phase is chosen once per step for all variables (a branch per
    variable multiplied the step graph's functions and its host memory)."""
    variables = [tf.Variable(tf.ones([4]), name=f"w{i}") for i in range(12)]
    for optimizer, expected in ((RAdam(0.1), 1), (Lookahead(RAdam(0.1)), 2)):
        step = tf.function(lambda *gs, o=optimizer: o.apply_gradients(zip(gs, variables)))
        graph = step.get_concrete_function(*[tf.ones([4])] * 12).graph
        branches = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
        assert len(branches) == expected, [op.name for op in branches]
