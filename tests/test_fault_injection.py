"""Fault injection (issue 22): `convert` and `train` killed with SIGTERM or SIGKILL at several
points. Afterwards every completed shard and checkpoint is intact, nothing temporary is left
where a glob reaches it, and running the same command again finishes the job.

The verbs run as `python -m max_deeplab`-like processes through a small wrapper that slows
their inner loop (so the test can catch them mid-way): `convert` sleeps before each image,
`train` trains a tiny stand-in model (the real model's first step takes over a minute to
compile on 2 cores; `test_real_model_sigterm_saves_and_resumes` is the slow real-model run).
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import standin_training
import tensorflow as tf

from max_deeplab.__main__ import main as cli_main
from max_deeplab.data import metadata as metadata_lib
from max_deeplab.data.synthetic import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SHARDS = 4

# `convert`, with every image taking at least 0.15 s (one worker: converted in-process).
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from max_deeplab.data import converter
    convert_job = converter._convert_job

    def slowly(job):
        time.sleep(0.15)
        return convert_job(job)

    converter._convert_job = slowly
    from max_deeplab.__main__ import console_main
    sys.argv = ["max-deeplab", "convert", *sys.argv[1:]]
    console_main()
""")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (code {proc.returncode}) before {what}:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str, str]:
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _hidden_temporaries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".tmp-" in name)


def _snapshot(directory) -> dict[str, bytes]:
    """Every visible file's bytes."""
    result = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("."):
            with open(os.path.join(directory, name), "rb") as f:
                result[name] = f.read()
    return result


def _records(pattern: str) -> list[int]:
    """The image ids in the shards of `pattern`, read through `list_shards` (what train and
    evaluate read); fails on a damaged record."""
    ids = []
    for shard in metadata_lib.list_shards(pattern):
        for record in tf.data.TFRecordDataset(shard):
            example = tf.train.Example.FromString(record.numpy())
            ids.append(example.features.feature["image/id"].int64_list.value[0])
    return ids


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, str]:
    """16 images; `subset` names an annotation file with the first 8 of them."""
    root = tmp_path_factory.mktemp("coco")
    write_dataset(str(root), 16, seed=8, height=48, width=64, num_val_images=0)
    annotations = root / "annotations" / "panoptic_train.json"
    data = json.loads(annotations.read_text())
    data["images"], data["annotations"] = data["images"][:8], data["annotations"][:8]
    (root / "subset.json").write_text(json.dumps(data))
    return {"annotations": str(annotations), "subset": str(root / "subset.json"),
            "images": str(root / "train"), "panoptic": str(root / "panoptic_train")}


def _convert_args(coco: dict[str, str], annotations: str, prefix: str) -> list[str]:
    return [f"--annotations={annotations}", f"--images={coco['images']}",
            f"--panoptic={coco['panoptic']}", f"--output={prefix}",
            f"--num_shards={NUM_SHARDS}", "--num_workers=1"]


@pytest.mark.parametrize("signum, shards_started", [
    (signal.SIGTERM, 2),
    (signal.SIGKILL, 2),
    pytest.param(signal.SIGTERM, 1, marks=pytest.mark.slow),
    pytest.param(signal.SIGKILL, 1, marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, 4, marks=pytest.mark.slow),
    pytest.param(signal.SIGKILL, 4, marks=pytest.mark.slow),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else f"shard{v}")
def test_killed_convert_keeps_the_data_set_whole_and_reruns(coco, tmp_path, signum,
                                                            shards_started, capsys):
    out = tmp_path / "data"
    prefix = str(out / "train")
    # A complete earlier conversion (8 images) in the prefix the interrupted one writes to.
    assert cli_main(["max-deeplab", "convert", *_convert_args(coco, coco["subset"],
                                                                prefix)]) == 0
    before = _snapshot(out)
    assert sorted(_records(prefix + "-*")) == list(range(1, 9))

    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, *_convert_args(coco, coco["annotations"], prefix)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: len(_hidden_temporaries(out)) >= shards_started, proc,
              f"shard {shards_started} was started")
    code, _, err = _interrupt(proc, signum)

    # The earlier data set is untouched, and the shard globs see only it.
    assert _snapshot(out) == before
    assert sorted(glob.glob(prefix + "-*")) == sorted(str(out / n) for n in before)
    assert sorted(glob.glob(str(out / "*"))) == sorted(str(out / n) for n in before)
    assert sorted(_records(prefix + "-*")) == list(range(1, 9))
    if signum == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        assert "interrupted by SIGTERM" in err and "Traceback" not in err
        assert _hidden_temporaries(out) == []
    else:
        assert code == -signal.SIGKILL
        assert _hidden_temporaries(out)  # what the next run has to clear

    capsys.readouterr()
    assert cli_main(["max-deeplab", "convert", *_convert_args(coco, coco["annotations"],
                                                                prefix)]) == 0
    printed = capsys.readouterr().out
    assert ("removed" in printed) == (signum == signal.SIGKILL)
    assert _hidden_temporaries(out) == []
    assert sorted(_records(prefix + "-*")) == list(range(1, 17))
    metadata = metadata_lib.load_metadata(prefix + "-*")
    assert metadata["num_examples"] == 16
    assert metadata_lib.check_shards(prefix + "-*") == metadata_lib.list_shards(prefix + "-*")


# ------------------------------------------------------------------------------- train

STEPS, EVERY = 60, 10
# The stand-in model, with each step taking at least 0.05 s.
SLOW_TRAIN = [sys.executable, os.path.join(REPO, "tests", "standin_training.py"),
              "--sleep", "0.05"]


@pytest.fixture(scope="module")
def records(coco, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("records") / "train")
    assert cli_main(["max-deeplab", "convert", *_convert_args(coco, coco["subset"],
                                                                prefix)]) == 0
    return prefix + "-*"


def _train_args(model_dir, records: str) -> list[str]:
    return ["train", f"--model_dir={model_dir}", "--gin_file=tiny.gin",
            f"--train_data={records}", f"--steps={STEPS}", f"--checkpoint_every={EVERY}",
            "--strategy=one_device",
            "--gin_bindings=build_learning_rate_schedule.warmup_steps = 1",
            "--gin_bindings=experiment_options.train_batch_size = 2"]


def _latest_step(model_dir) -> int:
    latest = tf.train.latest_checkpoint(str(model_dir))
    return -1 if latest is None else int(latest.rsplit("-", 1)[1])


def _saved_step(prefix: str) -> int:
    """The global step stored in checkpoint `prefix`, every value read (checksums)."""
    from max_deeplab.model.checkpoints import check_checkpoint

    check_checkpoint(prefix)
    reader = tf.train.load_checkpoint(prefix)
    for key in reader.get_variable_to_shape_map():
        reader.get_tensor(key)
    return int(reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE"))


def _no_temporaries(model_dir) -> None:
    """Nothing half-written where `DIR/*` (or `DIR/ckpt-*`) reaches."""
    leftovers = [p for p in glob.glob(str(model_dir / "*"))
                 if "tmp" in os.path.basename(p) or p.endswith("_temp")]
    assert leftovers == []


@pytest.mark.parametrize("signum, wait_for", [
    (signal.SIGTERM, "checkpoint"),
    (signal.SIGKILL, "checkpoint"),
    pytest.param(signal.SIGINT, "checkpoint", marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, "compiling", marks=pytest.mark.slow),
    pytest.param(signal.SIGKILL, "compiling", marks=pytest.mark.slow),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_killed_train_keeps_checkpoints_whole_and_resumes(records, tmp_path, signum,
                                                          wait_for, monkeypatch, capsys):
    model_dir = tmp_path / "run"
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([*SLOW_TRAIN, *_train_args(model_dir, records)], stdout=out,
                                stderr=subprocess.PIPE, text=True, env=_env())
        if wait_for == "checkpoint":  # between two periodic checkpoints
            _wait_for(lambda: _latest_step(model_dir) >= EVERY, proc, "the first checkpoint")
            time.sleep(0.3)
        else:  # while the first step compiles
            _wait_for(lambda: "compiling" in out_path.read_text(), proc, "compiling")
        code, _, err = _interrupt(proc, signum)
    stopped_after = _latest_step(model_dir)

    _no_temporaries(model_dir)
    if stopped_after >= 0:  # every checkpoint there is whole, at the step it is named by
        for prefix in tf.train.get_checkpoint_state(str(model_dir)).all_model_checkpoint_paths:
            assert _saved_step(prefix) == int(prefix.rsplit("-", 1)[1])
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        name = signal.Signals(signum).name
        assert code == 128 + signum, err
        assert "Traceback" not in err
        if wait_for == "checkpoint":
            # The steps since the last periodic checkpoint are saved, not lost.
            assert EVERY < stopped_after < STEPS and stopped_after % EVERY != 0, err
            checkpoint = str(model_dir / f"ckpt-{stopped_after}")
            assert f"interrupted by {name} at step {stopped_after}; saved checkpoint " \
                   f"{checkpoint}. Resume with the same command:" in err
            assert f"--model_dir={model_dir}" in err.splitlines()[-1]
        else:
            assert stopped_after == -1 and f"interrupted by {name}" in err

    # The same command again (in this process: it is the same code, and spares a start-up).
    standin_training.install(patch=monkeypatch.setattr)
    capsys.readouterr()
    assert cli_main(["max-deeplab", *_train_args(model_dir, records)]) == 0
    if stopped_after >= 0:
        assert f"restored model from {model_dir}/ckpt-{stopped_after}" in capsys.readouterr().out
    assert _latest_step(model_dir) == STEPS
    assert _saved_step(str(model_dir / f"ckpt-{STEPS}")) == STEPS
    _no_temporaries(model_dir)


@pytest.mark.slow
def test_real_model_sigterm_saves_and_resumes(records, tmp_path):
    """The same with the real tiny model (tiny.gin), as a user runs it: `python -m
    max_deeplab train`, SIGTERM after the first checkpoint, then the printed command."""
    model_dir = tmp_path / "run"
    args = [sys.executable, "-m", "max_deeplab", *_train_args(model_dir, records)]
    args = [a.replace(f"--steps={STEPS}", "--steps=400").replace(
        f"--checkpoint_every={EVERY}", "--checkpoint_every=2") for a in args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    _wait_for(lambda: _latest_step(model_dir) >= 2, proc, "the first checkpoint", timeout=900)
    time.sleep(1.0)
    code, out, err = _interrupt(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    stopped_after = _latest_step(model_dir)
    assert stopped_after > 2 and "Traceback" not in err
    assert f"saved checkpoint {model_dir}/ckpt-{stopped_after}" in err
    assert _saved_step(str(model_dir / f"ckpt-{stopped_after}")) == stopped_after
    assert "compiling the training step" in out and "np.float32" not in out
    _no_temporaries(model_dir)
    # The printed command, with fewer steps so that the rerun ends soon.
    resume = shlex.split(err.strip().splitlines()[-1])
    assert resume[:2] == ["max-deeplab", "train"]
    finish = [a if not a.startswith("--steps=") else f"--steps={stopped_after + 2}"
              for a in resume[2:]]
    rerun = subprocess.run([sys.executable, "-m", "max_deeplab", "train", *finish],
                           capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"restored model from {model_dir}/ckpt-{stopped_after}" in rerun.stdout
    assert _latest_step(model_dir) == stopped_after + 2
    _no_temporaries(model_dir)
