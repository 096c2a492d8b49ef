"""The paper's training recipe on the CLI path users run (paper §4, appendix A.6): `train
--initial_checkpoint` with the backbone scope, RAdam + Lookahead (k = 6) and the backbone
learning-rate multiplier, past the first Lookahead synchronisation; and the same run compiled
with `--jit_compile` (where "auto" matching is the pure-TF matcher).

The tiny config keeps every part of MaX-DeepLab-S; the pretrained backbone is stood in by a
differently initialised tiny model's checkpoint, so its weights are far from any random
start of the run.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.cli import convert as convert_cli
from max_deeplab.cli import train as train_cli
from max_deeplab.data import synthetic as synthetic_lib
from max_deeplab.training.initial_checkpoint import backbone_variables

STEPS = 7  # Lookahead synchronises at step 6
BINDINGS = ["build_learning_rate_schedule.warmup_steps = 2",
            "experiment_options.train_batch_size = 2",
            "experiment_options.steps_per_loop = 1"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("recipe_data")
    synthetic_lib.write_dataset(str(root / "coco"), 4, seed=3, height=64, width=96,
                                num_val_images=0)
    prefix = str(root / "tf" / "train")
    assert convert_cli.main(["max-deeplab convert", "--annotations",
                             str(root / "coco" / "annotations" / "panoptic_train.json"),
                             "--images", str(root / "coco" / "train"), "--panoptic",
                             str(root / "coco" / "panoptic_train"), "--output", prefix,
                             "--num_shards", "1", "--num_workers", "1"]) == 0
    return prefix + "-*"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A panoptic tiny model's checkpoint (as `train` writes it) and its backbone kernels."""
    import gin

    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    tfk.utils.set_random_seed(12345)
    model = build_model()
    gin.clear_config()
    prefix = tf.train.Checkpoint(model=model).save(
        str(tmp_path_factory.mktemp("pretrained") / "ckpt"))
    kernels = {key: v.numpy() for key, v in backbone_variables(model).items()
               if "kernel" in key}
    return prefix, kernels


def _train(model_dir, records: str, *extra: str) -> list[dict[str, float]]:
    """Runs `max-deeplab train` in this process; returns the losses printed per step."""
    import contextlib
    import io

    out = io.StringIO()
    argv = ["max-deeplab train", "--model_dir", str(model_dir), "--gin_file", "tiny.gin",
            "--train_data", records, "--steps", str(STEPS), "--checkpoint_every", str(STEPS),
            "--seed", "7", *[f"--gin_bindings={b}" for b in BINDINGS], *extra]
    with contextlib.redirect_stdout(out):
        assert train_cli.main(argv) == 0
    losses = []
    for line in out.getvalue().splitlines():
        if line.startswith("step "):
            losses.append({k: float(v) for k, v in re.findall(r"(\w+)=([-\d.e+]+)", line)
                           if k != "lr"})
    assert len(losses) == STEPS, out.getvalue()
    return losses


def _saved_backbone_kernels(model_dir, names) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(model_dir))
    return {key: reader.get_tensor(f"model/encoder/{key}") for key in names}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, records, pretrained) -> tuple[str, list[dict[str, float]]]:
    """The recipe run without XLA: (model directory, losses per step)."""
    model_dir = tmp_path_factory.mktemp("plain_run")
    return str(model_dir), _train(model_dir, records, "--initial_checkpoint", pretrained[0])


def test_pretrained_backbone_survives_lookahead(plain_run, pretrained):
    """Past the first synchronisation the backbone is the loaded weights plus training's
    small change (10x smaller learning rate), not halfway back to the random start: the
    slow weights were copied from the checkpoint, not from the initialisation."""
    _, loaded = pretrained
    trained = _saved_backbone_kernels(plain_run[0], loaded)
    assert len(trained) > 20
    moved = np.sqrt(sum(np.sum((trained[k] - loaded[k]) ** 2) for k in loaded))
    size = np.sqrt(sum(np.sum(loaded[k] ** 2) for k in loaded))
    # Halfway back to an independent random start would be ~0.7 of `size`.
    assert 0 < moved < 0.02 * size, (moved, size)


def test_jit_compile_reproduces_the_plain_run(tmp_path, records, pretrained, plain_run):
    """The same seeded run with --jit_compile (pure-TF matcher chosen by "auto"; drop-path
    and dropout masks from the step seed) prints the plain run's losses, up to float
    rounding: XLA orders its float sums differently, and steps of an adaptive optimiser
    amplify that a little (switching oneDNN off in a plain run changes step 20 of the
    quickstart by 5e-4, as much as XLA does)."""
    plain = plain_run[1]
    compiled = _train(tmp_path / "jit", records, "--initial_checkpoint", pretrained[0],
                      "--jit_compile")
    assert plain[0].keys() == compiled[0].keys()
    for key in plain[0]:  # printed with 4 decimals
        np.testing.assert_allclose(compiled[0][key], plain[0][key], rtol=1e-4, atol=1.5e-4,
                                   err_msg=f"step 1 {key}")
    for step, (a, b) in enumerate(zip(plain, compiled, strict=True), start=1):
        np.testing.assert_allclose(b["total"], a["total"], rtol=2e-3,
                                   err_msg=f"step {step} total")


@pytest.mark.parametrize("bindings, expected", [
    ([], "auto"), (["MaXDeepLabLoss.matching_backend = 'tf'"], "tf"),
    (["MaXDeepLabLoss.matching_backend = 'scipy'"], "scipy")])
def test_the_gin_binding_of_the_matcher_reaches_the_loss(tmp_path, records, monkeypatch,
                                                         bindings, expected):
    """`train` builds the loss from gin: an explicit backend is what runs (the trainer used
    to override it with scipy on every non-TPU strategy), "auto" decides where it is
    traced (see `max_deeplab.matching.resolve_backend`)."""
    from max_deeplab.training import experiment

    seen = []
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda **kwargs: seen.append(kwargs["loss_fn"]) or {})
    argv = ["max-deeplab train", "--model_dir", str(tmp_path / "run"), "--gin_file",
            "tiny.gin", "--train_data", records, "--steps", "10",
            "--gin_bindings=build_learning_rate_schedule.warmup_steps = 2",
            *[f"--gin_bindings={b}" for b in bindings]]
    assert train_cli.main(argv) == 0
    assert [loss.matching_backend for loss in seen] == [expected]


def _evaluate(model_dir: str, records: str, *extra: str) -> tuple[dict[str, float], dict]:
    """Runs `max-deeplab evaluate` in this process: (losses printed, metrics.json)."""
    import contextlib
    import io
    import json
    import os

    from max_deeplab.cli import evaluate as evaluate_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate_cli.main(["max-deeplab evaluate", "--model_dir", model_dir,
                                  "--eval_data", records, *extra]) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("eval at step"))
    losses = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.e+]+)", line)}
    with open(os.path.join(model_dir, "eval", "metrics.json")) as f:
        return losses, json.load(f)


@pytest.mark.slow  # ~60 s beyond the recipe run it evaluates
def test_evaluate_jit_compile_matches_the_plain_evaluation(plain_run, records):
    """`evaluate --jit_compile` (the pure-TF matcher inside XLA, where the scipy matcher
    cannot run) gives the plain evaluation's losses and PQ for the recipe run's model."""
    plain_losses, plain_metrics = _evaluate(plain_run[0], records)
    jit_losses, jit_metrics = _evaluate(plain_run[0], records, "--jit_compile")
    assert plain_losses.keys() == jit_losses.keys() and "total" in plain_losses
    for key, value in plain_losses.items():
        np.testing.assert_allclose(jit_losses[key], value, rtol=1e-3, atol=2e-4, err_msg=key)
    # (PQ is 0 after 7 steps; the losses above carry the comparison.)
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert jit_metrics[group][key] == pytest.approx(plain_metrics[group][key],
                                                           abs=1e-6), (group, key)
