"""The orbit trainer/evaluator and experiment runner, with a tiny stand-in model and loss
(the MaX-DeepLab model and loss have their own tests; `test_trainer_real.py`-style checks of
the full step are marked slow)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from shared_strategies import mirrored_two_cpus

from max_deeplab.model.max_deeplab import batch_norm_layer
from max_deeplab.training import build_optimizer
from max_deeplab.training.experiment import load_initial_checkpoint, run_experiment
from max_deeplab.training.trainer import Evaluator, NonFiniteLossError, Trainer

H = W = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StandIn(tfk.Model):
    """Conv + BN-free head: outputs one map, like a per-pixel regressor."""

    def __init__(self):
        super().__init__(name="standin")
        self.encoder = tfk.layers.Conv2D(4, 3, padding="same", name="encoder",
                                         kernel_initializer=tfk.initializers.GlorotUniform(1))
        self.head = tfk.layers.Dense(2, name="head",
                                     kernel_initializer=tfk.initializers.GlorotUniform(2))

    @property
    def backbone_variables(self):
        """What `build_optimizer` gives the backbone learning-rate multiplier."""
        return self.encoder.variables

    def call(self, images, training=None):
        return {"out": self.head(tf.nn.relu(self.encoder(images / 255.0)))}


def standin_loss(outputs, targets, global_batch_size=None):
    err = tf.reduce_sum(tf.square(outputs["out"] - targets["target"]), axis=[1, 2, 3])
    total = tf.reduce_sum(err) / global_batch_size
    return {"total": total, "mse": total}


def make_batch(batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": tf.constant(rng.uniform(0, 255, (batch, H, W, 3)), tf.float32),
            "target": tf.constant(rng.normal(size=(batch, H, W, 2)), tf.float32)}


def dataset_fn(batch_global: int, nan_from_step: int | None = None):
    """The same global batch every step, split per replica by the input context."""
    data = make_batch(batch_global)

    def fn(ctx: tf.distribute.InputContext | None = None, global_batch_size=None):
        # Each input pipeline yields its replicas' batches in turn, so every step's global
        # batch is the same `batch_global` examples whatever the replica count.
        per_replica = ctx.get_per_replica_batch_size(batch_global) if ctx else batch_global
        ds = tf.data.Dataset.from_tensor_slices(data)
        if ctx:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.batch(per_replica, drop_remainder=True).repeat()
        if nan_from_step is not None:
            ds = ds.enumerate(start=1).map(lambda i, b: {
                **b, "target": tf.where(i >= nan_from_step, np.nan, b["target"])})
        return ds
    return fn


def train_with(strategy, steps: int, batch: int = 4, jit: bool = False):
    with strategy.scope():
        model = StandIn()
        model(tf.zeros([1, H, W, 3]))
        optimizer = build_optimizer(total_steps=100, model=model, base_learning_rate=0.05,
                                    **{"lookahead_sync_period": 2})
        step = tf.Variable(0, dtype=tf.int64)
    dataset = strategy.distribute_datasets_from_function(dataset_fn(batch))
    lines = []
    trainer = Trainer(strategy, model, standin_loss, optimizer, dataset, step, batch, steps,
                      jit_compile=jit, print_fn=lines.append)
    logs = trainer.train(tf.constant(steps))
    return model, optimizer, logs, lines


@pytest.fixture(autouse=True)
def _short_warmup():
    import gin
    gin.clear_config()
    gin.bind_parameter("build_learning_rate_schedule.warmup_steps", 1)
    yield
    gin.clear_config()


def test_jit_step_matches_plain_step():
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    plain_model, _, plain_logs, _ = train_with(one, 3)
    jit_model, _, jit_logs, _ = train_with(one, 3, jit=True)
    assert float(jit_logs["losses/total"]) == pytest.approx(float(plain_logs["losses/total"]),
                                                            rel=1e-5)
    for a, b in zip(plain_model.variables, jit_model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_two_replicas_match_one_replica():
    two = mirrored_two_cpus()
    if two is None:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    one_model, one_opt, one_logs, lines = train_with(tf.distribute.OneDeviceStrategy("/cpu:0"),
                                                     3)
    two_model, two_opt, two_logs, _ = train_with(two, 3)
    assert float(two_logs["losses/total"]) == pytest.approx(float(one_logs["losses/total"]),
                                                            rel=1e-5)
    for a, b in zip(one_model.variables, two_model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(two_opt.iterations.numpy()) == int(one_opt.iterations.numpy()) == 3
    # The progress line reports step, losses, learning rate, step time and ETA.
    assert lines and lines[-1].startswith("step 3/3 |") and "s/step" in lines[-1]
    assert "ETA 0:00:00" in lines[-1] and "lr=" in lines[-1]


class StandInWithBatchNorm(StandIn):
    """StandIn with the model's batch-norm factory between its two layers."""

    def __init__(self, synchronized: bool):
        super().__init__()
        # No bias before the norm, as in the model: BN cancels it, so its true gradient is 0
        # and it would only accumulate float noise (which differs between replica counts).
        self.encoder = tfk.layers.Conv2D(4, 3, padding="same", name="encoder", use_bias=False,
                                         kernel_initializer=tfk.initializers.GlorotUniform(1))
        self.norm = batch_norm_layer(synchronized=synchronized)(name="norm")

    def call(self, images, training=None):
        hidden = self.norm(self.encoder(images / 255.0), training=training)
        return {"out": self.head(tf.nn.relu(hidden))}


@pytest.mark.parametrize("synchronized", [True, False])
def test_synchronized_batch_norm_makes_two_replicas_match_one(synchronized):
    """Paper configs train with synchronised BN: statistics over the global batch, so two
    replicas of half a batch each take one replica's steps; per-replica BN does not."""
    two = mirrored_two_cpus()
    if two is None:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    runs = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two):
        with strategy.scope():
            model = StandInWithBatchNorm(synchronized)
            model(tf.zeros([1, H, W, 3]))
            optimizer = build_optimizer(total_steps=100, model=model, base_learning_rate=0.05)
            step = tf.Variable(0, dtype=tf.int64)
        dataset = strategy.distribute_datasets_from_function(dataset_fn(4))
        Trainer(strategy, model, standin_loss, optimizer, dataset, step, 4, 3,
                print_fn=lambda _: None).train(tf.constant(3))
        runs.append({v.name: v.numpy() for v in model.variables})
    one, two_replicas = runs
    same = all(np.allclose(one[k], two_replicas[k], rtol=1e-4, atol=1e-5) for k in one)
    assert same == synchronized
    if synchronized:
        for k in one:
            np.testing.assert_allclose(two_replicas[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _run(model_dir, mode="train", steps=6, nan_from_step=None, **options):
    return run_experiment(
        mode=mode, model_dir=str(model_dir), strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
        model_fn=lambda: (lambda m: (m(tf.zeros([1, H, W, 3])), m)[1])(StandIn()),
        loss_fn=standin_loss,
        # A fixed schedule length, so that runs stopped at different steps share it.
        optimizer_fn=lambda total, model: build_optimizer(100, model, base_learning_rate=0.05),
        train_dataset_fn=lambda ctx, batch: dataset_fn(batch, nan_from_step)(ctx),
        options=dict(total_steps=steps, train_batch_size=2, checkpoint_every=2,
                     steps_per_loop=2, **options),
        print_fn=lambda line: None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 5.*last good"):
        _run(tmp_path, steps=8, nan_from_step=5)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    reader = tf.train.load_checkpoint(str(tmp_path))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


def test_resume_continues_from_checkpoint_identically(tmp_path):
    _run(tmp_path / "full", steps=6)
    _run(tmp_path / "split", steps=4)
    _run(tmp_path / "split", steps=6)  # resumes at step 4 with the optimiser state
    full = tf.train.load_checkpoint(str(tmp_path / "full"))
    split = tf.train.load_checkpoint(str(tmp_path / "split"))
    names = [n for n in full.get_variable_to_shape_map() if "save_counter" not in n]
    assert any("OPTIMIZER" in n or "optimizer" in n for n in names)
    for name in names:
        np.testing.assert_array_equal(full.get_tensor(name), split.get_tensor(name), name)
    assert int(split.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 6


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import gin, tensorflow as tf
    import test_trainer as t
    gin.bind_parameter("build_learning_rate_schedule.warmup_steps", 1)
    fast = t.dataset_fn

    def slow_dataset_fn(batch, nan_from_step=None):
        # ~0.3 s per step so that the parent can kill the run mid-way.
        pause = lambda: tf.py_function(lambda: time.sleep(0.3) or 0.0, [], tf.float32)
        return lambda ctx: fast(batch)(ctx).map(
            lambda b: dict(b, image=b["image"] + 0.0 * pause()))

    t.dataset_fn = slow_dataset_fn
    t._run({model_dir!r}, steps=40)
""")


@pytest.mark.slow
def test_sigkill_resume_same_step_and_optimizer_state(tmp_path):
    model_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"),
                                         model_dir=str(model_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            latest = tf.train.latest_checkpoint(str(model_dir))
            if latest and int(latest.rsplit("-", 1)[1]) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    latest = tf.train.latest_checkpoint(str(model_dir))
    saved_step = int(latest.rsplit("-", 1)[1])
    assert 4 <= saved_step < 40
    reader = tf.train.load_checkpoint(latest)
    saved = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
             if "optimizer" in n}

    # Resume in this process: the restored state is exactly the checkpoint's.
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = StandIn()
        model(tf.zeros([1, H, W, 3]))
        optimizer = build_optimizer(100, model, base_learning_rate=0.05)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=step)
    ckpt.restore(latest).assert_consumed()
    assert int(step.numpy()) == saved_step == int(optimizer.iterations.numpy())
    assert int(optimizer.inner_optimizer.iterations.numpy()) == saved_step
    assert len(saved) >= len(model.trainable_variables) * 3
    slots = [v for v in saved.values() if np.ndim(v) > 0]
    assert slots and any(np.abs(v).sum() > 0 for v in slots)


def test_initial_checkpoint_partial_and_no_match(tmp_path):
    source = StandIn()
    source(tf.zeros([1, H, W, 3]))
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "pre"))
    target = StandIn()
    target(tf.zeros([1, H, W, 3]))
    assert load_initial_checkpoint(target, path) == 4
    for a, b in zip(source.variables, target.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = tf.train.Checkpoint(unrelated=tf.Variable([1.0])).save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="no variable matching"):
        load_initial_checkpoint(target, other)


def _pretrained_standin(path) -> tuple[str, list[np.ndarray]]:
    """A checkpoint of a stand-in whose kernels are far from the initialisation every
    stand-in gets (its initialisers are seeded): negated; the zero biases become 0.5."""
    source = StandIn()
    source(tf.zeros([1, H, W, 3]))
    for variable in source.trainable_variables:
        variable.assign(-variable if "kernel" in variable.name else variable + 0.5)
    prefix = tf.train.Checkpoint(model=source).save(str(path))
    return prefix, [v.numpy() for v in source.trainable_variables]


def _run_capturing(model_dir, steps, **options):
    """`_run`, returning the run's model and optimiser."""
    built = {}

    def model_fn():
        built["model"] = StandIn()
        built["model"](tf.zeros([1, H, W, 3]))
        return built["model"]

    def optimizer_fn(total, model):
        built["optimizer"] = build_optimizer(100, model, base_learning_rate=1e-3)
        return built["optimizer"]

    run_experiment(
        mode="train", model_dir=str(model_dir),
        strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn=model_fn,
        loss_fn=standin_loss, optimizer_fn=optimizer_fn,
        train_dataset_fn=lambda ctx, batch: dataset_fn(batch)(ctx),
        options=dict(total_steps=steps, train_batch_size=2, checkpoint_every=2,
                     steps_per_loop=2, **options),
        print_fn=lambda line: None)
    return built["model"], built["optimizer"]


@pytest.mark.parametrize("scope", ["all", "backbone"])
def test_lookahead_starts_from_the_initial_checkpoint(tmp_path, scope):
    """The slow weights are the loaded weights, not the random initialisation the optimiser
    was built on: before the first synchronisation (k = 6) they equal the checkpoint, and
    after it the model stays near the checkpoint (it was pulled halfway back to random)."""
    prefix, loaded = _pretrained_standin(tmp_path / "pre" / "ckpt")
    model, optimizer = _run_capturing(tmp_path / "run4", 4, initial_checkpoint=prefix,
                                      initial_checkpoint_scope=scope)
    # "backbone" loads the stand-in's `encoder` only; its head keeps its random start.
    count = 2 if scope == "backbone" else 4
    for variable, value in list(zip(model.trainable_variables, loaded, strict=True))[:count]:
        np.testing.assert_array_equal(optimizer.slow_weight(variable).numpy(), value,
                                      err_msg=variable.name)
    model, _ = _run_capturing(tmp_path / "run8", 8, initial_checkpoint=prefix,
                              initial_checkpoint_scope=scope)
    for variable, value in list(zip(model.trainable_variables, loaded, strict=True))[:count]:
        # Eight steps of learning rate 1e-3 move the weights by ~0.1 of the distance between
        # the checkpoint and the random start; halfway back to the start would be 0.5.
        start = -value if "kernel" in variable.name else value - 0.5
        moved = np.linalg.norm(variable.numpy() - value)
        assert 0 < moved < 0.25 * np.linalg.norm(value - start), variable.name


def test_lookahead_starts_from_a_checkpoint_without_optimizer_state(tmp_path):
    """A model directory whose checkpoint holds only the model (e.g. `import-checkpoint`'s
    output) is resumed with slow weights equal to the restored weights."""
    _, loaded = _pretrained_standin(tmp_path / "run" / "ckpt")
    model, optimizer = _run_capturing(tmp_path / "run", 4)
    for variable, value in zip(model.trainable_variables, loaded, strict=True):
        np.testing.assert_array_equal(optimizer.slow_weight(variable).numpy(), value)


def test_resume_restores_the_checkpointed_slow_weights(tmp_path):
    prefix, _ = _pretrained_standin(tmp_path / "pre" / "ckpt")
    full, _ = _run_capturing(tmp_path / "full", 10, initial_checkpoint=prefix)
    _run_capturing(tmp_path / "split", 4, initial_checkpoint=prefix)
    split, _ = _run_capturing(tmp_path / "split", 10, initial_checkpoint=prefix)
    for a, b in zip(full.trainable_variables, split.trainable_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


class Echo(tfk.Model):
    """Stand-in whose 'prediction' is channel 0 of the image (the class label + 1)."""

    def __init__(self):
        super().__init__()
        self.scale = self.add_weight(name="scale", shape=[], initializer="ones")

    def call(self, images, training=None):
        return {"echo": images[..., 0] * self.scale}


@pytest.mark.parametrize("perfect", [True, False])
def test_evaluator_pq(perfect):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    # Two stuff segments per image: classes 0 and 2 (labels 1 and 3).
    ids = np.zeros((2, H, W), np.int32)
    ids[:, :, W // 2:] = 1
    classes = np.array([[0, 2], [0, 2]], np.int32)
    label = np.where(ids == 0, 1, 3).astype(np.float32)
    if not perfect:
        label[1] = 1.0  # second image predicts class 0 everywhere
    batch = {"image": tf.constant(np.repeat(label[..., None], 3, -1)),
             "segment_ids": tf.constant(ids), "segment_classes": tf.constant(classes),
             "segment_valid": tf.ones((2, 2), tf.bool),
             "segment_is_thing": tf.zeros((2, 2), tf.bool),
             "panoptic": tf.constant(np.where(ids == 0, 0, 2 * 256), tf.int32)}
    perfect_batch = dict(batch)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(perfect_batch))
    with strategy.scope():
        model = Echo()
        step = tf.Variable(0, dtype=tf.int64)
    evaluator = Evaluator(
        strategy, model, lambda o, t, global_batch_size: {"total": tf.reduce_mean(o["echo"])},
        dataset, 2, is_thing=[False, False, False],
        postprocess_fn=lambda o, image_size: {"panoptic": tf.cast(o["echo"], tf.int32) * 256},
        global_step=step)
    logs = evaluator.evaluate(tf.constant(-1))
    if perfect:
        assert logs["PQ"] == pytest.approx(1.0)
    else:
        # Image 2 predicts class 0 over both halves: IoU 0.5 with its class-0 segment (a
        # match needs > 0.5). Class 0: TP (IoU 1), FP, FN -> 1 / (1 + 0.5 + 0.5) = 1/2;
        # class 2: TP (IoU 1), FN -> 1 / 1.5 = 2/3. PQ = mean = 7/12.
        assert logs["PQ"] == pytest.approx(7 / 12)
    assert "losses/total" in logs


@pytest.mark.slow
def test_real_tiny_train_step_compiles_with_xla_and_matches():
    """The full MaX-DeepLab step (forward, "tf" matcher, all losses, gradients, RAdam +
    Lookahead) under jit_compile=True gives the plain step's loss and update."""
    import gin

    from max_deeplab.gin_config import parse_config
    from max_deeplab.losses import MaXDeepLabLoss
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], ["build_learning_rate_schedule.warmup_steps = 1"])
    height, width = gin.query_parameter("build_model.input_size")
    rng = np.random.default_rng(0)
    k = 6
    ids = rng.integers(-1, k, (2, height, width)).astype(np.int32)
    batch = {"image": tf.constant(rng.uniform(0, 255, (2, height, width, 3)), tf.float32),
             "segment_ids": tf.constant(ids),
             "segment_classes": tf.constant(rng.integers(0, 8, (2, k)), tf.int32),
             "segment_valid": tf.ones((2, k), tf.bool),
             "segment_is_thing": tf.constant([[True, False] * (k // 2)] * 2),
             "semantic": tf.constant(np.where(ids >= 0, ids % 8, -1), tf.int32)}
    results, diagnostics = [], []
    for jit in (False, True):
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        with strategy.scope():
            tfk.utils.set_random_seed(0)
            model = build_model()
            optimizer = build_optimizer(100, model)
            step = tf.Variable(0, dtype=tf.int64)
        initial = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(batch).repeat())
        trainer = Trainer(strategy, model, MaXDeepLabLoss(matching_backend="tf"), optimizer,
                          dataset, step, 2, 2, jit_compile=jit, print_fn=lambda s: None)
        logs = trainer.train(tf.constant(2))
        after = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        results.append((float(logs["losses/total"]), initial, after - initial))
        diagnostics.append({k: float(v) for k, v in logs.items()
                            if k.startswith("diagnostics/")})
    assert np.isfinite(results[0][0])
    # The diagnostics (paper Figs. 5-6) are computed inside the compiled step too.
    assert len(diagnostics[1]) == 5
    # (An argmax near a tie may flip after XLA's float reassociation: a pixel is ~1e-3.)
    for name, value in diagnostics[0].items():
        assert diagnostics[1][name] == pytest.approx(value, abs=5e-3), name
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4)
    np.testing.assert_array_equal(results[0][1], results[1][1])  # same initial weights
    # The updates agree up to XLA's float reassociation (a few near-zero gradients, e.g. of
    # zero-initialised BN betas, differ relatively more): compare the whole update vector.
    plain, compiled = results[0][2], results[1][2]
    assert np.abs(plain).max() > 0
    assert np.linalg.norm(plain - compiled) < 0.05 * np.linalg.norm(plain)


@pytest.mark.slow
def test_real_tiny_eval_step_compiles_with_xla_and_matches():
    """The evaluation step (forward, "tf" matcher, losses, post-processing to panoptic maps)
    of the real tiny model under jit_compile=True gives the plain step's losses, panoptic
    maps and PQ. Thresholds are lowered so the untrained model yields segments to compare."""
    import functools

    import gin

    from max_deeplab.gin_config import parse_config
    from max_deeplab.inference.postprocess import postprocess
    from max_deeplab.losses import MaXDeepLabLoss
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    height, width = gin.query_parameter("build_model.input_size")
    num_classes = 8
    is_thing = [c % 2 == 0 for c in range(num_classes)]
    rng = np.random.default_rng(1)
    k = 4
    ids = np.full((2, height, width), -1, np.int32)
    ids[:, : height // 2] = 0
    ids[:, height // 2:, : width // 2] = 1
    ids[:, height // 2:, width // 2:] = 2
    ids[1, :8, :8] = 3
    classes = rng.integers(0, num_classes, (2, k)).astype(np.int32)
    batch = {"image": tf.constant(rng.uniform(0, 255, (2, height, width, 3)), tf.float32),
             "segment_ids": tf.constant(ids), "segment_classes": tf.constant(classes),
             "segment_valid": tf.constant([[True, True, True, False], [True] * 4]),
             "segment_is_thing": tf.constant(np.array(is_thing)[classes]),
             "semantic": tf.constant(np.where(ids >= 0, np.take_along_axis(
                 classes, np.maximum(ids, 0).reshape(2, -1), 1).reshape(ids.shape), -1),
                 tf.int32)}
    # The ground-truth map of the same segments (thing instance = segment index + 1).
    pixel_class = batch["semantic"].numpy()
    instance = np.where(np.array(is_thing)[np.maximum(pixel_class, 0)], ids + 1, 0)
    batch["panoptic"] = tf.constant(np.where(ids >= 0, pixel_class * 256 + instance, -1),
                                    tf.int32)
    postprocess_fn = functools.partial(
        postprocess, is_thing=is_thing, class_threshold=0.0, pixel_threshold=0.0,
        thing_area_limit=0, stuff_area_limit=0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        tfk.utils.set_random_seed(0)
        model = build_model()
        step = tf.Variable(0, dtype=tf.int64)
    results = []
    for jit in (False, True):
        dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))
        evaluator = Evaluator(strategy, model, MaXDeepLabLoss(matching_backend="tf"), dataset,
                              2, is_thing=is_thing, postprocess_fn=postprocess_fn,
                              global_step=step, jit_compile=jit)
        panoptic = evaluator._replica_step_fn(batch)["prediction"].numpy()
        logs = evaluator.evaluate(tf.constant(-1))
        results.append((logs, panoptic))
    (plain_logs, plain_map), (jit_logs, jit_map) = results
    assert len(np.unique(plain_map)) > 2  # the untrained model does predict segments
    # Argmax ties may resolve differently after XLA's float reassociation: nearly all pixels.
    assert np.mean(plain_map == jit_map) > 0.999
    for name in ("losses/total", "PQ", "SQ", "RQ"):
        assert jit_logs[name] == pytest.approx(plain_logs[name], rel=1e-4, abs=1e-6), name
    # The diagnostics (paper Figs. 5-6) are computed inside the compiled step too (an
    # argmax near a tie may flip after XLA's float reassociation: a pixel is ~1e-3).
    diagnostics = [k for k in plain_logs if k.startswith("diagnostics/")]
    assert len(diagnostics) == 5
    for name in diagnostics:
        assert jit_logs[name] == pytest.approx(plain_logs[name], abs=5e-3), name


def test_mixed_precision_policy_applies_to_the_run_only(tmp_path):
    seen = []

    def model_fn():
        seen.append(tfk.mixed_precision.global_policy().name)
        raise RuntimeError("stop after the model build")

    before = tfk.mixed_precision.global_policy().name
    with pytest.raises(RuntimeError, match="stop after the model build"):
        run_experiment(
            mode="train", model_dir=str(tmp_path),
            strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn=model_fn,
            loss_fn=standin_loss,
            optimizer_fn=lambda total, model: build_optimizer(100, model, base_learning_rate=0.05),
            train_dataset_fn=lambda ctx, batch: dataset_fn(batch, None)(ctx),
            options=dict(total_steps=2, mixed_precision="bfloat16"), print_fn=lambda line: None)
    assert seen == ["mixed_bfloat16"]
    # Restored even though the run failed: later models in this process are float32 again.
    assert tfk.mixed_precision.global_policy().name == before == "float32"
    with pytest.raises(ValueError, match="mixed_precision must be 'bfloat16'"):
        run_experiment(mode="train", model_dir=str(tmp_path), strategy=None, model_fn=model_fn,
                       loss_fn=None, optimizer_fn=None,
                       options=dict(mixed_precision="float16"))


def test_images_of_another_size_than_the_model_are_an_error(tmp_path):
    """A model built for 8x8 (`build_model.input_size`) with 8x6 data (`crop_size`): a clear
    error naming both bindings, before any step; data of the model's size trains."""

    def model_fn():
        images = tfk.Input((H, W, 3))
        hidden = tfk.layers.Conv2D(4, 3, padding="same", name="encoder")(images / 255.0)
        return tfk.Model(images, {"out": tfk.layers.Dense(2, name="head")(hidden)})

    def data_fn(width):
        def fn(ctx, batch):
            data = make_batch(batch)
            return tf.data.Dataset.from_tensors(
                {"image": data["image"][:, :, :width], "target": data["target"][:, :, :width]}
            ).repeat()
        return fn

    def run(width, model_dir):
        return run_experiment(
            mode="train", model_dir=str(model_dir),
            strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn=model_fn,
            loss_fn=standin_loss,
            optimizer_fn=lambda total, model: build_optimizer(100, model, base_learning_rate=0.05),
            train_dataset_fn=data_fn(width),
            options=dict(total_steps=1, train_batch_size=2, checkpoint_every=1),
            print_fn=lambda line: None)

    with pytest.raises(ValueError, match=r"the training images are 8x6 but the model is built "
                                         r"for 8x8: bind build_dataset.crop_size = \(8, 8\)"):
        run(6, tmp_path / "bad")
    assert not tf.io.gfile.glob(str(tmp_path / "bad" / "ckpt-*"))
    run(W, tmp_path / "good")
    assert tf.io.gfile.glob(str(tmp_path / "good" / "ckpt-1*"))
