"""Two local worker processes train in lock-step under MultiWorkerMirroredStrategy
(docs/design.md §7: "tested ... with 2 local worker processes").

Each worker runs the project's trainer (`run_experiment`, or the whole `max-deeplab train
--strategy multi_worker`) on its own shard of the data, with the cluster given by TF_CONFIG
on 127.0.0.1. Gradients are
all-reduced across the workers, so both must log the same global losses every step and end
with bit-identical variables, although each saw different images. Only the chief (worker
0) writes the run's checkpoint; the other worker writes to `workertemp_1`.

One test drives `run_experiment` with test_trainer.py's small stand-in model, with a shared
model directory and a resume (~2 minutes on a loaded 2-core machine: four process starts,
each importing TensorFlow); the other runs the CLI with the tiny MaX-DeepLab model, whose
first step (tracing and graph optimisation of the whole model, loss and optimiser in two
processes at once) takes several minutes there. Both are slow tests.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Per two-worker run: the stand-in's, and the tiny model's (mostly its first step's tracing).
STANDIN_TIMEOUT_S = 240
CLI_TIMEOUT_S = 1200
# step N/T | <losses> | lr=<lr> | <timing>: everything but the timing must agree.
PROGRESS = re.compile(r"^step (\d+)/(\d+) \| (.*?) \| lr=(\S+) \|", re.MULTILINE)


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all ports are known, so that the ports are distinct.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _write_tfrecords(root) -> str:
    """A synthetic data set in two shards (one per worker's input pipeline)."""
    from max_deeplab.data import convert
    from max_deeplab.data.synthetic import write_dataset

    write_dataset(str(root / "coco"), num_images=4, seed=3, height=64, width=96,
                  num_val_images=0)
    convert(str(root / "coco" / "annotations" / "panoptic_train.json"),
            str(root / "coco" / "train"), str(root / "coco" / "panoptic_train"),
            str(root / "tfrecords" / "train"), num_shards=2, num_workers=1,
            log=lambda line: None)
    return str(root / "tfrecords" / "train-*")


def _tail(path, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _run_workers(tmp_path, name: str, command, timeout_s: float) -> list[dict]:
    """Runs `command(index)` as workers 0 and 1 of a local cluster; both must exit 0.

    Returns per worker its stdout path and its progress lines (step, total steps, losses,
    learning rate).
    """
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = dict(os.environ)
        env.update(TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}),
                   CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
        stdout = tmp_path / f"{name}{index}.out"
        stderr = tmp_path / f"{name}{index}.err"
        # A fresh process: one CPU device (no logical split as in conftest.py), one replica.
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = subprocess.Popen(command(index), cwd=REPO, env=env, stdout=out,
                                    stderr=err)
        workers.append({"proc": proc, "stdout": stdout, "stderr": stderr})

    # A worker that fails leaves the other blocked in a collective: stop both then.
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            codes = [w["proc"].poll() for w in workers]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
    finally:
        for w in workers:
            if w["proc"].poll() is None:
                w["proc"].kill()
            w["proc"].wait()
    report = "\n".join(
        f"--- worker {i}: exit {w['proc'].returncode}\nstdout:\n{_tail(w['stdout'])}"
        f"stderr:\n{_tail(w['stderr'])}" for i, w in enumerate(workers))
    assert time.time() < deadline, f"workers did not finish within {timeout_s} s\n{report}"
    assert all(w["proc"].returncode == 0 for w in workers), report
    for w in workers:
        w["report"] = report
        w["progress"] = PROGRESS.findall(w["stdout"].read_text())
    return workers


def _assert_same_checkpoints(chief_ckpt: str, other_ckpt: str, step: int) -> None:
    """Same variables (model, optimiser slots, step), bit for bit, after a real update."""
    a, b = tf.train.load_checkpoint(chief_ckpt), tf.train.load_checkpoint(other_ckpt)
    names = sorted(a.get_variable_to_shape_map())
    assert names == sorted(b.get_variable_to_shape_map())
    assert int(a.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == step
    model_names = [n for n in names if n.startswith("model/")]
    slot_names = [n for n in names if n.startswith("optimizer/") and np.ndim(a.get_tensor(n))]
    assert model_names and slot_names
    # Non-zero optimiser moments: gradients were applied.
    assert any(np.abs(a.get_tensor(n)).sum() > 0 for n in slot_names)
    different = [n for n in names if not np.array_equal(a.get_tensor(n), b.get_tensor(n))]
    assert not different, f"{len(different)} variables differ, e.g. {different[:5]}"


STANDIN_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import gin
    import tensorflow as tf
    import test_trainer as t
    from max_deeplab.training import build_optimizer
    from max_deeplab.training.experiment import create_strategy, run_experiment

    model_dir, steps = sys.argv[1], int(sys.argv[2])
    gin.bind_parameter("build_learning_rate_schedule.warmup_steps", 1)

    def model_fn():
        model = t.StandIn()
        model(tf.zeros([1, t.H, t.W, 3]))
        return model

    # The stand-in data: the same 4 examples every step, 2 to each worker's replica.
    run_experiment(
        mode="train", model_dir=model_dir, strategy=create_strategy("multi_worker"),
        model_fn=model_fn, loss_fn=t.standin_loss,
        optimizer_fn=lambda total, model: build_optimizer(100, model, base_learning_rate=0.05),
        train_dataset_fn=lambda ctx, batch: t.dataset_fn(batch)(ctx),
        options=dict(total_steps=steps, train_batch_size=4, checkpoint_every=2,
                     steps_per_loop=1))
""")


@pytest.mark.slow
def test_two_workers_lock_step_and_resume_standin(tmp_path):
    """Shared model directory: the chief's checkpoints there, the other worker's in
    `workertemp_1`; a second run resumes both workers from the chief's checkpoint."""
    script = tmp_path / "worker.py"
    script.write_text(STANDIN_WORKER.format(tests=os.path.join(REPO, "tests")))
    model_dir = tmp_path / "run"
    scratch = model_dir / "workertemp_1"
    for name, steps in (("first", 4), ("resumed", 6)):
        if name == "resumed":
            # Leave an older state (the chief's step 1) in the other worker's scratch: a worker
            # that resumed from it instead of the chief's step 4 would fall out of lock-step.
            for path in glob.glob(str(model_dir / "ckpt-1.*")):
                shutil.copy(path, scratch)
            tf.compat.v1.train.update_checkpoint_state(str(scratch), str(scratch / "ckpt-1"))
            assert tf.train.latest_checkpoint(str(scratch)) == str(scratch / "ckpt-1")
        command = [sys.executable, str(script), str(model_dir), str(steps)]
        chief, other = _run_workers(tmp_path, name, lambda index, c=command: c,
                                    STANDIN_TIMEOUT_S)
        # The resumed run starts after the chief's step 4 on both workers.
        first_step = 1 if name == "first" else 5
        assert [int(p[0]) for p in chief["progress"]] == list(range(first_step, steps + 1)), \
            chief["report"]
        assert other["progress"] == chief["progress"], chief["report"]
        chief_ckpt = tf.train.latest_checkpoint(str(model_dir))
        other_ckpt = tf.train.latest_checkpoint(str(scratch))
        assert chief_ckpt == str(model_dir / f"ckpt-{steps}")
        assert other_ckpt == str(scratch / f"ckpt-{steps}")
        _assert_same_checkpoints(chief_ckpt, other_ckpt, steps)
        # The chief keeps its history; the other worker only its latest save.
        history = tf.train.get_checkpoint_state(str(model_dir)).all_model_checkpoint_paths
        assert str(model_dir / "ckpt-1") in history and len(history) > 2
        assert tf.train.get_checkpoint_state(str(scratch)).all_model_checkpoint_paths == \
            [other_ckpt]
        assert not (model_dir / "workertemp_0").exists()
        # Summaries: the chief's in model_dir/train, the other worker's in its scratch.
        assert os.listdir(model_dir / "train") and os.listdir(scratch / "train")


@pytest.mark.slow
def test_two_workers_train_in_lock_step_cli(tmp_path):
    train_data = _write_tfrecords(tmp_path)

    # One model directory per worker: `train` also saves its run config there, which on a
    # shared directory both workers would write.
    def command(index: int) -> list[str]:
        return [sys.executable, "-m", "max_deeplab", "train", "--strategy", "multi_worker",
                "--model_dir", str(tmp_path / f"worker{index}"), "--train_data", train_data,
                "--steps", str(STEPS), "--checkpoint_every", str(STEPS),
                "--gin_file", "tiny.gin",
                "--gin_bindings", "build_dataset.crop_size = (65, 97)",
                "--gin_bindings", "build_dataset.k_max = 16",
                "--gin_bindings", "build_dataset.shuffle_buffer_size = 1",
                "--gin_bindings", "experiment_options.train_batch_size = 2",
                "--gin_bindings", "build_learning_rate_schedule.warmup_steps = 1"]

    started = time.time()
    chief, other = _run_workers(tmp_path, "cli", command, CLI_TIMEOUT_S)
    print(f"two-worker CLI run: {time.time() - started:.1f} s")
    chief["model_dir"], other["model_dir"] = tmp_path / "worker0", tmp_path / "worker1"

    # One progress line per step (steps_per_loop divides checkpoint_every), the same global
    # losses and learning rate on both workers.
    assert [int(p[0]) for p in chief["progress"]] == list(range(1, STEPS + 1)), chief["report"]
    assert other["progress"] == chief["progress"], chief["report"]
    for _, _, losses, _ in chief["progress"]:
        values = dict(item.split("=") for item in losses.split())
        assert "total" in values and np.isfinite(float(values["total"]))

    # The chief wrote the run's checkpoint; the other worker only its scratch one.
    chief_ckpt = tf.train.latest_checkpoint(str(chief["model_dir"]))
    assert chief_ckpt is not None and chief_ckpt.endswith(f"ckpt-{STEPS}")
    assert tf.train.latest_checkpoint(str(other["model_dir"])) is None
    other_ckpt = tf.train.latest_checkpoint(str(other["model_dir"] / "workertemp_1"))
    assert other_ckpt is not None and other_ckpt.endswith(f"ckpt-{STEPS}")
    assert not (chief["model_dir"] / "workertemp_0").exists()

    _assert_same_checkpoints(chief_ckpt, other_ckpt, STEPS)


@pytest.mark.slow
def test_preemption_notice_saves_and_resume_continues(tmp_path):
    """SIGTERM to one worker (a preemption notice): both workers save a checkpoint at the
    step they agree on through `PreemptionCheckpointHandler` and exit; a new run resumes
    from that step. No periodic checkpoint falls in the interrupted run."""
    script = tmp_path / "worker.py"
    script.write_text(STANDIN_WORKER.format(tests=os.path.join(REPO, "tests")).replace(
        "checkpoint_every=2", "checkpoint_every=10000"))
    model_dir = tmp_path / "run"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, outs = [], []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        out = tmp_path / f"preempted{index}.out"
        outs.append(out)
        with open(out, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(model_dir), "5000"], cwd=REPO, env=env,
                stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + STANDIN_TIMEOUT_S
        while time.time() < deadline and len(PROGRESS.findall(outs[1].read_text())) < 5:
            assert all(p.poll() is None for p in procs), _tail(outs[0]) + _tail(outs[1])
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=STANDIN_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(_tail(o) for o in outs)
    # Preempted workers exit (TensorFlow's default preemption exit code is 42), not finish.
    assert all(c != 0 for c in codes), report
    saved = tf.train.latest_checkpoint(str(model_dir))
    assert saved is not None, report
    step = int(tf.train.load_checkpoint(saved).get_tensor(
        "global_step/.ATTRIBUTES/VARIABLE_VALUE"))
    last_logged = max(int(p[0]) for p in PROGRESS.findall(outs[0].read_text()))
    assert 5 <= step < 5000 and step >= last_logged, report
    assert saved == str(model_dir / f"ckpt-{step}")
    # The next run starts right after the saved step.
    command = [sys.executable, str(script), str(model_dir), str(step + 2)]
    chief, _ = _run_workers(tmp_path, "after_preemption", lambda index: command,
                            STANDIN_TIMEOUT_S)
    assert [int(p[0]) for p in chief["progress"]] == [step + 1, step + 2], chief["report"]
