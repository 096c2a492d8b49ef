"""Issue 22 for `train`, `evaluate` and `export`: damaged checkpoints and shards are named
before a model is built; a run directory is resumed without repeating its flags and its data
paths resolve from anywhere; output a person reads (no `np.float32(...)` dicts, a line
before the first step's compilation, one PQ table per evaluation). Runs use the stand-in
model of `standin_training` (the real model takes minutes to compile on 2 cores)."""
from __future__ import annotations

import json
import os

import pytest
import standin_training
import tensorflow as tf

from max_deeplab.__main__ import main as cli_main
from max_deeplab.data import convert
from max_deeplab.data.synthetic import write_dataset
from max_deeplab.training.run_directory import RUN_CONFIG_JSON, save_run_config

# tiny.gin's 5000 warmup steps do not fit in runs of a few steps.
SHORT = ["--gin_bindings", "build_learning_rate_schedule.warmup_steps = 1",
         "--gin_bindings", "experiment_options.train_batch_size = 2",
         "--strategy", "one_device"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
    """4 synthetic images in 2 shards; returns the shard glob."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root / "coco"), 4, seed=2, height=48, width=64, num_val_images=0)
    prefix = str(root / "tf" / "train")
    convert(str(root / "coco" / "annotations" / "panoptic_train.json"),
            str(root / "coco" / "train"), str(root / "coco" / "panoptic_train"), prefix,
            num_shards=2, num_workers=1, log=lambda _: None)
    return prefix + "-*"


def _checkpoint(directory) -> str:
    """A checkpoint prefix (with a 'checkpoint' state file) holding a few variables."""
    values = {"v": tf.Variable(tf.range(3000, dtype=tf.float32)),
              "step": tf.Variable(7, dtype=tf.int64)}
    return tf.train.Checkpoint(**values).save(os.path.join(str(directory), "ckpt"))


def _damage(prefix: str, how: str) -> tuple[str, str]:
    """Damages checkpoint `prefix`; returns (the file at fault, what the message says)."""
    data, index = prefix + ".data-00000-of-00001", prefix + ".index"
    if how == "truncated_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) - 100)
        return data, "truncated"
    if how == "data_cut_to_a_few_bytes":
        with open(data, "r+b") as f:
            f.truncate(10)
        return data, "truncated"
    if how == "missing_data":
        os.remove(data)
        return data, "has no data file"
    if how == "truncated_index":
        with open(index, "r+b") as f:
            f.truncate(os.path.getsize(index) // 2)
        return index, "index file"
    raise AssertionError(how)


DAMAGE = ["truncated_data", "data_cut_to_a_few_bytes", "missing_data",
          "truncated_index"]


@pytest.mark.parametrize("how", DAMAGE)
def test_resuming_from_a_damaged_checkpoint_names_it(tmp_path, records, no_model_build,
                                                     capsys, how):
    model_dir = tmp_path / "run"
    culprit, what = _damage(_checkpoint(model_dir), how)
    code = cli_main(["max-deeplab", "train", "--model_dir", str(model_dir), "--gin_file",
                     "tiny.gin", "--train_data", records, "--steps", "10", *SHORT])
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err and what in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["truncated_data", "truncated_index"])
def test_damaged_initial_checkpoint_is_named(tmp_path, records, no_model_build, capsys, how):
    culprit, what = _damage(_checkpoint(tmp_path / "pretrained"), how)
    code = cli_main(["max-deeplab", "train", "--model_dir", str(tmp_path / "run"),
                     "--gin_file", "tiny.gin", "--train_data", records, "--steps", "10",
                     "--initial_checkpoint", str(tmp_path / "pretrained"), *SHORT])
    err = capsys.readouterr().err
    assert code == 2 and culprit in err and what in err, err


@pytest.mark.parametrize("how", ["truncated_data", "truncated_index"])
def test_evaluate_names_a_damaged_checkpoint(tmp_path, records, no_model_build, capsys, how):
    model_dir = tmp_path / "run"
    culprit, what = _damage(_checkpoint(model_dir), how)
    (model_dir / "config.gin").write_text("include 'tiny.gin'\n")
    (model_dir / RUN_CONFIG_JSON).write_text(json.dumps({"eval_data": records}))
    code = cli_main(["max-deeplab", "evaluate", "--model_dir", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and culprit in err and what in err, err


@pytest.mark.parametrize("how", ["truncated_data", "truncated_index"])
def test_export_names_a_damaged_checkpoint(tmp_path, no_model_build, capsys, how):
    from test_export_cli import _train_run

    run_dir = _train_run(tmp_path)
    culprit, what = _damage(tf.train.latest_checkpoint(run_dir), how)
    code = cli_main(["max-deeplab", "export", "--checkpoint", run_dir, "--export_dir",
                     str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert code == 2 and culprit in err and what in err, err
    assert not (tmp_path / "export").exists()


def test_restore_names_a_checkpoint_whose_values_are_corrupt(tmp_path):
    """Same length, damaged bytes: found by the checksums when the values are read."""
    import tf_keras as tfk

    from max_deeplab.model.checkpoints import CheckpointReadError, restore

    model = tfk.Sequential([tfk.layers.Dense(300)])
    model.build((None, 20))
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    data = prefix + ".data-00000-of-00001"
    raw = bytearray(open(data, "rb").read())
    raw[-500] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    with pytest.raises(CheckpointReadError, match=f"checkpoint {prefix} cannot be read: its "
                                                  "data is corrupt"):
        restore(model, prefix)


def test_truncated_shard_is_named_before_the_model_is_built(tmp_path, records,
                                                             no_model_build, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(records), data)
    shard = data / "train-00001-of-00002.tfrecord"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 7)
    code = cli_main(["max-deeplab", "train", "--model_dir", str(tmp_path / "run"),
                     "--gin_file", "tiny.gin", "--train_data", str(data / "train-*"),
                     "--steps", "10", *SHORT])
    err = capsys.readouterr().err
    assert code == 2 and str(shard) in err and "truncated" in err, err
    assert not (tmp_path / "run").exists()


def test_corrupt_shard_found_while_training_is_named(tmp_path, records, monkeypatch, capsys):
    """A record damaged in place (same size: the metadata's sizes cannot tell) fails the
    run when it is read; the message names the shard."""
    import shutil

    standin_training.install(patch=monkeypatch.setattr)
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(records), data)
    shard = data / "train-00000-of-00002.tfrecord"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code = cli_main(["max-deeplab", "train", "--model_dir", str(tmp_path / "run"),
                     "--gin_file", "tiny.gin", "--train_data", str(data / "train-*"),
                     "--steps", "4", "--checkpoint_every", "2", *SHORT])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"TFRecord shard {shard} of --train_data is damaged" in err
    assert "Traceback" not in err


def test_run_json_holds_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_run_config(str(tmp_path / "run"), train_data="data/train-*,other/x-*",
                    eval_data="gs://bucket/val-*")
    saved = json.loads((tmp_path / "run" / RUN_CONFIG_JSON).read_text())
    assert saved == {"train_data": f"{tmp_path}/data/train-*,{tmp_path}/other/x-*",
                     "eval_data": "gs://bucket/val-*"}
    save_run_config(str(tmp_path / "run"), train_data="tfds:coco/2017_panoptic:train",
                    eval_data=None)
    saved = json.loads((tmp_path / "run" / RUN_CONFIG_JSON).read_text())
    assert saved == {"train_data": "tfds:coco/2017_panoptic:train", "eval_data": None}


def test_resume_without_flags_uses_the_saved_config_and_data(tmp_path, records, monkeypatch,
                                                             capsys):
    import gin

    from max_deeplab.training import task

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.gin").write_text(
        "include 'tiny.gin'\nMaXDeepLab.num_classes = 8\nexperiment_options.total_steps = 37\n"
        "build_learning_rate_schedule.warmup_steps = 1\n")
    (model_dir / RUN_CONFIG_JSON).write_text(json.dumps({"train_data": records,
                                                         "eval_data": None}))
    seen = []

    def run(settings, options, print_fn=print):
        seen.append((options["total_steps"], settings.train_data,
                     gin.query_parameter("MaXDeepLabEncoder.num_mask_slots")))

    monkeypatch.setattr(task, "run_mode", run)
    assert cli_main(["max-deeplab", "train", "--model_dir", str(model_dir)]) == 0, \
        capsys.readouterr().err
    assert seen == [(37, records, 16)]  # tiny.gin's 16 slots, not the S model's 128
    out = capsys.readouterr().out
    assert str(model_dir / "config.gin") in out and records in out


def test_step_flags_are_saved_with_the_config(tmp_path, records, monkeypatch):
    """--steps and --checkpoint_every go into config.gin, so resuming with the saved config
    alone keeps them."""
    from max_deeplab.training import task

    seen = []
    monkeypatch.setattr(task, "run_mode",
                        lambda settings, options, print_fn=print: seen.append(options))
    assert cli_main(["max-deeplab", "train", "--model_dir", str(tmp_path / "run"),
                     "--gin_file", "tiny.gin", "--train_data", records, "--steps", "12",
                     "--checkpoint_every", "3", *SHORT]) == 0
    import gin

    assert "experiment_options.total_steps = 12" in gin.config_str()
    assert "experiment_options.checkpoint_every = 3" in gin.config_str()
    assert seen[0]["total_steps"] == 12 and seen[0]["checkpoint_every"] == 3


def test_unfinished_checkpoint_saves_are_removed_at_start(tmp_path, records, monkeypatch,
                                                          capsys):
    from max_deeplab.training import task

    model_dir = tmp_path / "run"
    (model_dir / "ckpt-9_temp").mkdir(parents=True)
    (model_dir / "ckpt-9_temp" / "part-00000-of-00001.index").write_bytes(b"half")
    (model_dir / "checkpoint.tmp0123456789abcdef").write_text("model_checkpoint_path: ")
    (model_dir / "notes_temp.txt").write_text("mine")
    monkeypatch.setattr(task, "run_mode", lambda settings, options, print_fn=print: None)
    assert cli_main(["max-deeplab", "train", "--model_dir", str(model_dir), "--gin_file",
                     "tiny.gin", "--train_data", records, "--steps", "10", *SHORT]) == 0
    assert sorted(os.listdir(model_dir)) == ["notes_temp.txt"]
    assert "ckpt-9_temp" in capsys.readouterr().out


def test_training_output_reads_plainly(tmp_path, records, monkeypatch, capsys):
    """A line before the first step says it compiles; losses and PQ are printed once per
    loop / evaluation, as plain numbers (orbit's output dicts are logged, not printed)."""
    standin_training.install(patch=monkeypatch.setattr)
    code = cli_main(["max-deeplab", "train", "--model_dir", str(tmp_path / "run"),
                     "--gin_file", "tiny.gin", "--train_data", records, "--eval_data",
                     records, "--mode", "train_and_eval", "--steps", "4",
                     "--checkpoint_every", "2", *SHORT])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    compiling = [i for i, line in enumerate(lines) if "compiling the training step" in line]
    progress = [i for i, line in enumerate(lines) if line.startswith("step 2/4 |")]
    assert len(compiling) == 1 and progress and compiling[0] < progress[0]
    assert "np.float32" not in out and "output:" not in out
    assert out.count("eval at step 2 |") == 1 and out.count("eval at step 4 |") == 1
    assert out.count("All       |") == 2  # one PQ table per evaluation
    assert "at step: PQ=" not in out  # the last evaluation is not printed again


# ------------------------------------------------------------ interrupted training


def _standin_experiment(model_dir, print_fn, steps: int = 8, model_fn=None):
    """`run_experiment` of test_trainer's stand-in: loops of 2 steps, checkpoint_every 4
    (the manager saves at steps 2, 6 and 8)."""
    import gin
    from test_trainer import H, StandIn, W, dataset_fn, standin_loss

    from max_deeplab.training import build_optimizer
    from max_deeplab.training.experiment import run_experiment

    def build():
        model = StandIn()
        model(tf.zeros([1, H, W, 3]))
        return model

    gin.clear_config()
    gin.bind_parameter("build_learning_rate_schedule.warmup_steps", 1)
    try:
        return run_experiment(
            mode="train", model_dir=str(model_dir),
            strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn=model_fn or build,
            loss_fn=standin_loss,
            optimizer_fn=lambda total, model: build_optimizer(100, model, base_learning_rate=0.05),
            train_dataset_fn=lambda ctx, batch: dataset_fn(batch)(ctx),
            options=dict(total_steps=steps, train_batch_size=2, checkpoint_every=4,
                         steps_per_loop=2),
            print_fn=print_fn)
    finally:
        gin.clear_config()


def test_interrupt_saves_the_current_step_and_the_run_resumes_identically(tmp_path):
    import signal

    import numpy as np

    from max_deeplab.interruption import Interrupted
    from max_deeplab.training.save_on_interrupt import TrainingInterrupted

    def sigterm_after_step_6(line: str) -> None:
        if line.startswith("step 6/"):  # printed at the end of the loop that reached step 6
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        _standin_experiment(tmp_path / "split", sigterm_after_step_6)
    interrupted = info.value
    assert (interrupted.step, interrupted.saved, interrupted.exit_code) == (6, True, 143)
    assert interrupted.checkpoint == str(tmp_path / "split" / "ckpt-6")
    # Saved at step 6: the steps since the periodic checkpoint at 2 are not lost.
    assert tf.train.latest_checkpoint(str(tmp_path / "split")) == interrupted.checkpoint
    _standin_experiment(tmp_path / "split", lambda line: None)  # resumes at step 6
    _standin_experiment(tmp_path / "full", lambda line: None)
    full = tf.train.load_checkpoint(str(tmp_path / "full"))
    split = tf.train.load_checkpoint(str(tmp_path / "split"))
    names = [n for n in full.get_variable_to_shape_map() if "save_counter" not in n]
    for name in names:
        np.testing.assert_array_equal(full.get_tensor(name), split.get_tensor(name), name)
    assert int(split.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 8


def test_interrupt_before_the_run_is_restored_saves_nothing(tmp_path):
    from max_deeplab.training.save_on_interrupt import TrainingInterrupted

    def interrupted_build():
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        _standin_experiment(tmp_path / "run", lambda line: None, model_fn=interrupted_build)
    assert info.value.step is None and info.value.checkpoint is None
    assert info.value.exit_code == 130
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) is None


def test_interrupt_during_a_periodic_save_writes_that_checkpoint_whole(tmp_path,
                                                                        monkeypatch):
    import signal

    from max_deeplab.interruption import Interrupted
    from max_deeplab.training.save_on_interrupt import TrainingInterrupted

    real_write = tf.train.Checkpoint._write
    cut = []

    def write_cut_short_once(self, prefix, *args, **kwargs):
        if prefix.endswith("ckpt-6") and not cut:  # the manager saves at steps 2, 6, 8
            cut.append(prefix)
            raise Interrupted(signal.SIGTERM)  # as if it arrived inside the save
        return real_write(self, prefix, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "_write", write_cut_short_once)
    with pytest.raises(TrainingInterrupted) as info:
        _standin_experiment(tmp_path / "run", lambda line: None)
    assert cut and (info.value.step, info.value.saved) == (6, True)
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run" / "ckpt-6")
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "ckpt-6"))
    assert int(reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 6


def test_input_checks_leave_tf_unconfigured(tmp_path, records):
    """check_inputs runs before the distribution strategy is made: reading a checkpoint's
    index and the shards' sizes must not start TF's eager context (a multi-worker strategy
    could no longer configure its collectives). Checked in a fresh process, as in
    test_cli_bad_input.test_start_up_checks_leave_tf_unconfigured."""
    import subprocess
    import sys

    model_dir = tmp_path / "run"
    _checkpoint(model_dir)
    code = f"""
from max_deeplab.training import run_directory
import tensorflow as tf
run_directory.check_inputs({str(model_dir)!r}, "train", {records!r}, None,
                           {{"initial_checkpoint": None}})
tf.config.threading.set_inter_op_parallelism_threads(1)  # RuntimeError once initialised
print("unconfigured")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0 and "unconfigured" in proc.stdout, proc.stderr[-2000:]


def test_evaluate_names_a_truncated_eval_shard(tmp_path, records, no_model_build, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(records), data)
    shard = data / "train-00000-of-00002.tfrecord"
    with open(shard, "r+b") as f:
        f.truncate(100)
    model_dir = tmp_path / "run"
    _checkpoint(model_dir)
    (model_dir / "config.gin").write_text("include 'tiny.gin'\n")
    code = cli_main(["max-deeplab", "evaluate", "--model_dir", str(model_dir), "--eval_data",
                     str(data / "train-*")])
    err = capsys.readouterr().err
    assert code == 2 and f"TFRecord shard {shard} is 100 bytes" in err, err
