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
import signal
import subprocess
import sys
import textwrap
import time

import pytest
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
