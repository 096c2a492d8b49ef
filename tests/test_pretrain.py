"""ImageNet pretraining of the backbone and its transfer into the panoptic model (A.6).

ImageNet itself is never read: `tfds.testing.mock_data` (policy USE_CODE) generates random
JPEG examples from the `imagenet2012` builder's feature spec, offline.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as tfk
from shared_strategies import mirrored_two_cpus

from max_deeplab.data.imagenet import ImageNetNotFoundError, imagenet_dataset
from max_deeplab.gin_config import parse_config
from max_deeplab.model.checkpoints import checkpoint_keys
from max_deeplab.training.initial_checkpoint import (
    backbone_variables,
    load_backbone_checkpoint,
)
from max_deeplab.training.optimizers import build_optimizer
from max_deeplab.training.pretrain import (
    BackboneClassifier,
    ClassificationEvaluator,
    ClassificationLoss,
    build_classifier,
    build_pretrain_optimizer,
    build_pretrain_schedule,
    pretrain_options,
    top_k_correct,
)

MOCK_EXAMPLES = 5
IMAGE_SIZE = 32


@contextlib.contextmanager
def mock_imagenet():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _softmax_ce(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> np.ndarray:
    classes = logits.shape[-1]
    target = np.full(logits.shape, smoothing / classes)
    target[np.arange(len(labels)), labels] += 1.0 - smoothing
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -(target * log_softmax).sum(-1)


# ---------------------------------------------------------------- input pipeline


def test_eval_pipeline_center_crops_and_pads(tmp_path):
    with mock_imagenet():
        batches = list(imagenet_dataset("validation", 2, False, data_dir=str(tmp_path),
                                        image_size=IMAGE_SIZE))
        raw = list(tfds.load("imagenet2012", split="validation", data_dir=str(tmp_path),
                             download=False, decoders={"image": tfds.decode.SkipDecoding()}))
    # 5 examples in batches of 2: the last batch holds one example and one padding row.
    assert len(batches) == 3
    labels = np.concatenate([b["label"].numpy() for b in batches])
    np.testing.assert_array_equal(labels[:5], [int(r["label"]) for r in raw])
    assert labels[5] == -1
    for b in batches:
        assert b["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert b["image"].dtype == tf.float32
    # Centre crop of 0.875 of the shorter side, resized: recomputed from the full decode.
    for index in (0, 3):
        image = tf.io.decode_jpeg(raw[index]["image"]).numpy()
        side = 0.875 * min(image.shape[:2])
        top, left = int((image.shape[0] - side) / 2), int((image.shape[1] - side) / 2)
        side = int(side)
        expected = tf.image.resize(image[top:top + side, left:left + side],
                                   [IMAGE_SIZE, IMAGE_SIZE]).numpy()
        got = batches[index // 2]["image"][index % 2].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_train_pipeline_shapes_and_range(tmp_path):
    with mock_imagenet():
        batch = next(iter(imagenet_dataset("train", 3, True, data_dir=str(tmp_path),
                                           image_size=IMAGE_SIZE, seed=3)))
    assert batch["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["label"].dtype == tf.int32
    assert np.all((batch["label"].numpy() >= 0) & (batch["label"].numpy() < 1000))
    image = batch["image"].numpy()
    assert image.min() >= 0.0 and image.max() <= 255.0 and image.std() > 1.0


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ImageNetNotFoundError, match=r"tfds build imagenet2012"):
        imagenet_dataset("train", 2, True, data_dir=str(tmp_path / "nothing"))


# ---------------------------------------------------------------- loss, metrics, schedule


def test_classification_loss_matches_numpy():
    model = tfk.Sequential([tfk.layers.Dense(7)])
    model.build([None, 4])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=5).astype(np.int32)
    loss = ClassificationLoss(model, label_smoothing=0.1, weight_decay=1e-2)
    out = loss({"logits": tf.constant(logits)}, {"label": tf.constant(labels)},
               global_batch_size=8)
    ce = _softmax_ce(logits.astype(np.float64), labels, 0.1).sum() / 8
    kernel = model.layers[0].kernel.numpy()
    decay = 1e-2 * 0.5 * float((kernel.astype(np.float64) ** 2).sum())  # no bias
    np.testing.assert_allclose(out["cross_entropy"].numpy(), ce, rtol=1e-5)
    np.testing.assert_allclose(out["weight_decay"].numpy(), decay, rtol=1e-5)
    np.testing.assert_allclose(out["total"].numpy(), ce + decay, rtol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationLoss(model, label_smoothing=1.0, weight_decay=0.0)


def test_top_k_correct_by_hand():
    logits = tf.constant([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.0, 0.1, 0.2]])
    labels = tf.constant([1, 2, 0])
    np.testing.assert_array_equal(top_k_correct(logits, labels, 1).numpy(), [1, 0, 0])
    np.testing.assert_array_equal(top_k_correct(logits, labels, 2).numpy(), [1, 1, 0])
    # k beyond the number of classes is clamped: everything is in the "top 5" of 3.
    np.testing.assert_array_equal(top_k_correct(logits, labels, 5).numpy(), [1, 1, 1])


class _LogitsFromPixels(tfk.Model):
    """A fixed 'classifier' whose logits are the input's pixels (known answers)."""

    def call(self, images, training=None):
        return {"logits": tf.reshape(images, [tf.shape(images)[0], -1])}


def test_evaluator_matches_numpy_on_two_replicas():
    strategy = mirrored_two_cpus()
    rng = np.random.default_rng(1)
    n, classes = 7, 12
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=n).astype(np.int32)
    # Global batches of 4: the last one padded with label -1 (as `imagenet_dataset` does).
    padded_logits = np.concatenate([logits, np.zeros((1, classes), np.float32)])
    padded_labels = np.concatenate([labels, [-1]]).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": padded_logits.reshape(8, 1, classes, 1), "label": padded_labels}).batch(4)
    with strategy.scope():
        model = _LogitsFromPixels()
        step = tf.Variable(0, dtype=tf.int64)
    evaluator = ClassificationEvaluator(
        strategy, model, ClassificationLoss(model, 0.1, 0.0),
        strategy.experimental_distribute_dataset(dataset), step)
    result = evaluator.evaluate(tf.constant(-1))
    order = np.argsort(-logits, axis=-1)
    assert result["num_examples"] == n
    np.testing.assert_allclose(result["top_1_accuracy"], np.mean(order[:, 0] == labels))
    np.testing.assert_allclose(result["top_5_accuracy"],
                               np.mean([labels[i] in order[i, :5] for i in range(n)]))
    np.testing.assert_allclose(result["cross_entropy"],
                               _softmax_ce(logits.astype(np.float64), labels, 0.1).mean(),
                               rtol=1e-5)


def test_schedule_warmup_cosine_and_short_run_error():
    opts = dict(pretrain_options(), train_batch_size=512, num_train_examples=5120,
                warmup_epochs=1.0)  # 10 steps per epoch
    schedule = build_pretrain_schedule(opts, total_steps=100)
    base = 0.1 * 512 / 256
    np.testing.assert_allclose(float(schedule(0)), 0.0, atol=1e-8)
    np.testing.assert_allclose(float(schedule(5)), base * 0.5 * (1 + np.cos(np.pi * 10 / 100))
                               * 5 / 10, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(40)), base * 0.5 * (1 + np.cos(np.pi * 0.4)),
                               rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_epochs = 0"):
        build_pretrain_optimizer(opts, total_steps=10)
    with pytest.raises(ValueError, match="'sgd' or 'radam'"):
        build_pretrain_optimizer(dict(opts, optimizer="adam"), total_steps=100)


# ---------------------------------------------------------------- end to end + transfer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining run of the tiny config through the CLI, on mock ImageNet."""
    from max_deeplab.__main__ import main

    model_dir = str(tmp_path_factory.mktemp("pretrain"))
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    stdout = io.StringIO()
    with mock_imagenet(), contextlib.redirect_stdout(stdout):
        code = main(["max-deeplab", "pretrain", "--model_dir", model_dir,
                     "--data_dir", data_dir, "--mode", "train_and_eval", "--steps", "2",
                     "--checkpoint_every", "2", "--gin_file", "tiny.gin",
                     "--gin_bindings", f"pretrain_options.image_size = {IMAGE_SIZE}",
                     "--gin_bindings", "pretrain_options.train_batch_size = 4",
                     "--gin_bindings", "pretrain_options.eval_batch_size = 3",
                     "--gin_bindings", "pretrain_options.warmup_epochs = 0",
                     "--gin_bindings", "pretrain_options.steps_per_loop = 2"])
    assert code == 0, stdout.getvalue()
    return {"model_dir": model_dir, "data_dir": data_dir, "stdout": stdout.getvalue()}


@pytest.fixture(scope="module")
def tiny_models():
    """The tiny panoptic model and a tiny pretraining classifier (both gin tiny.gin)."""
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    panoptic = build_model(input_size=(33, 33))
    classifier = build_classifier(num_classes=1000, image_size=IMAGE_SIZE)
    return panoptic, classifier


def test_pretraining_runs_and_reports_accuracy(pretrained, tiny_models):
    model_dir = pretrained["model_dir"]
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")
    assert "step 2/2" in pretrained["stdout"] and "top-1" in pretrained["stdout"]
    with open(os.path.join(model_dir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["step"] == 2 and metrics["num_examples"] == MOCK_EXAMPLES
    assert tf.io.gfile.glob(os.path.join(model_dir, "train", "events.*"))
    assert tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.*"))

    # Recompute the reported numbers independently: restore, predict, rank in numpy.
    _, classifier = tiny_models
    tf.train.Checkpoint(model=classifier).restore(
        tf.train.latest_checkpoint(model_dir)).expect_partial().assert_existing_objects_matched()
    with mock_imagenet():
        batches = list(imagenet_dataset("validation", 3, False,
                                        data_dir=pretrained["data_dir"],
                                        image_size=IMAGE_SIZE))
    logits = np.concatenate([classifier(b["image"], training=False)["logits"].numpy()
                             for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    logits, labels = logits[labels >= 0], labels[labels >= 0]
    order = np.argsort(-logits, axis=-1)
    np.testing.assert_allclose(metrics["top_1_accuracy"], np.mean(order[:, 0] == labels))
    np.testing.assert_allclose(metrics["top_5_accuracy"],
                               np.mean([labels[i] in order[i, :5] for i in range(len(labels))]))
    np.testing.assert_allclose(metrics["cross_entropy"],
                               _softmax_ce(logits.astype(np.float64), labels, 0.1).mean(),
                               rtol=1e-4)


def test_eval_mode_restores_the_latest_checkpoint(pretrained):
    from max_deeplab.__main__ import main

    model_dir = pretrained["model_dir"]
    with open(os.path.join(model_dir, "eval", "metrics.json")) as f:
        after_training = json.load(f)
    with mock_imagenet(), contextlib.redirect_stdout(io.StringIO()):
        code = main(["max-deeplab", "pretrain", "--model_dir", model_dir,
                     "--data_dir", pretrained["data_dir"], "--mode", "eval",
                     "--gin_file", "tiny.gin",
                     "--gin_bindings", f"pretrain_options.image_size = {IMAGE_SIZE}",
                     "--gin_bindings", "pretrain_options.eval_batch_size = 2"])
    assert code == 0
    with open(os.path.join(model_dir, "eval", "metrics.json")) as f:
        restored = json.load(f)
    assert restored["step"] == 2 and restored["num_examples"] == MOCK_EXAMPLES
    for key in ("top_1_accuracy", "top_5_accuracy", "cross_entropy"):
        np.testing.assert_allclose(restored[key], after_training[key], rtol=1e-5)


def test_backbone_keys_are_the_classifier_encoder(tiny_models):
    panoptic, classifier = tiny_models
    backbone = backbone_variables(panoptic)
    assert set(backbone) == set(checkpoint_keys(classifier.encoder))
    for key, var in checkpoint_keys(classifier.encoder).items():
        assert tuple(backbone[key].shape) == tuple(var.shape), key
    # The memory path and extras are excluded.
    encoder_keys = checkpoint_keys(panoptic.encoder)
    assert any("_block1_transformer" in k for k in encoder_keys)
    assert not any("transformer" in k or "extra" in k or "memory" in k for k in backbone)
    # The optimiser's backbone learning-rate multiplier covers exactly what is pretrained.
    assert _multiplied(panoptic) == {id(v) for v in backbone.values() if v.trainable}


def _multiplied(model) -> set[int]:
    """ids of the variables `build_optimizer` gives the backbone learning-rate multiplier."""
    inner = build_optimizer(100_000, model).inner_optimizer
    return {id(v) for v in model.trainable_variables if inner.multiplier_of(v) != 1.0}


def test_pretrained_backbone_lands_in_panoptic_model(pretrained, tiny_models):
    panoptic, _ = tiny_models
    backbone = backbone_variables(panoptic)
    before = {id(v): v.numpy() for v in panoptic.variables}
    prefix = tf.train.latest_checkpoint(pretrained["model_dir"])
    reader = tf.train.load_checkpoint(prefix)
    differs = [k for k, v in backbone.items()
               if not np.array_equal(v.numpy(), reader.get_tensor("model/encoder/" + k))]
    assert differs, "the pretrained weights should differ from the random init"

    messages = []
    report = load_backbone_checkpoint(panoptic, pretrained["model_dir"],
                                      print_fn=messages.append)
    assert report.loaded == len(backbone) and report.checkpoint == prefix
    assert report.model_variables == len(panoptic.variables)
    assert report.ignored_checkpoint_variables == 0
    assert messages and f"loaded {len(backbone)} backbone" in messages[0]
    for key, variable in backbone.items():
        np.testing.assert_array_equal(variable.numpy(),
                                      reader.get_tensor("model/encoder/" + key), err_msg=key)
    backbone_ids = {id(v) for v in backbone.values()}
    for variable in panoptic.variables:
        if id(variable) not in backbone_ids:  # memory path, attentions, decoder, heads
            np.testing.assert_array_equal(variable.numpy(), before[id(variable)],
                                          err_msg=variable.name)


def test_panoptic_checkpoint_source_copies_only_backbone(tiny_models, tmp_path):
    panoptic, _ = tiny_models
    saved = {id(v): v.numpy() for v in panoptic.variables}
    prefix = tf.train.Checkpoint(model=panoptic).write(str(tmp_path / "panoptic"))
    for variable in panoptic.variables:
        variable.assign(variable + 1.0)
    report = load_backbone_checkpoint(panoptic, prefix, print_fn=None)
    backbone_ids = {id(v) for v in backbone_variables(panoptic).values()}
    encoder_total = len(checkpoint_keys(panoptic.encoder))
    assert report.loaded == len(backbone_ids)
    assert report.ignored_checkpoint_variables == encoder_total - len(backbone_ids)
    for variable in panoptic.variables:
        expected = saved[id(variable)] + (0.0 if id(variable) in backbone_ids else 1.0)
        np.testing.assert_allclose(variable.numpy(), expected, err_msg=variable.name)
    for variable in panoptic.variables:  # restore the fixture's state
        variable.assign(saved[id(variable)])


def test_wrong_architecture_is_a_clear_error(tiny_models, tmp_path):
    panoptic, _ = tiny_models
    unrelated = tfk.Sequential([tfk.layers.Dense(3)])
    unrelated.build([None, 2])
    prefix = tf.train.Checkpoint(model=unrelated).write(str(tmp_path / "unrelated"))
    with pytest.raises(ValueError, match=r"matches no backbone variable") as info:
        load_backbone_checkpoint(panoptic, prefix, print_fn=None)
    assert "_stage2/_block1" in str(info.value)

    # A classifier of another width: the same names, other shapes.
    parse_config(["tiny.gin"], ["MaXDeepLabEncoder.width_multiplier = 0.25"])
    wider = build_classifier(num_classes=10, image_size=IMAGE_SIZE)
    parse_config(["tiny.gin"], [])
    prefix = tf.train.Checkpoint(model=wider).write(str(tmp_path / "wider"))
    before = [v.numpy() for v in panoptic.variables]
    with pytest.raises(ValueError, match=r"different shape") as info:
        load_backbone_checkpoint(panoptic, prefix, print_fn=None)
    assert "model [" in str(info.value) and "checkpoint [" in str(info.value)
    for variable, value in zip(panoptic.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)  # nothing half-loaded

    with pytest.raises(FileNotFoundError):
        load_backbone_checkpoint(panoptic, str(tmp_path / "no_such_checkpoint"))


def test_cli_errors_are_clear(tmp_path, capsys):
    from max_deeplab.__main__ import main

    assert main(["max-deeplab", "pretrain", "--help"]) == 0
    code = main(["max-deeplab", "pretrain", "--model_dir", str(tmp_path / "m"),
                 "--data_dir", str(tmp_path / "empty"), "--gin_file", "tiny.gin",
                 "--steps", "2", "--gin_bindings", "pretrain_options.warmup_epochs = 0"])
    assert code == 1
    assert "tfds build imagenet2012" in capsys.readouterr().err


@pytest.mark.slow
def test_backbone_keys_of_l_shaped_model():
    """MaX-DeepLab-L layout (wide ResNet, backbone stacked decoder): same key identity."""
    from max_deeplab.model import build_model

    bindings = ["MaXDeepLabEncoder.backbone_type = 'wider_resnet'",
                "MaXDeepLabEncoder.backbone_use_transformer_beyond_stride = 16",
                "MaXDeepLabEncoder.extra_decoder_use_transformer_beyond_stride = 16",
                "MaXDeepLabEncoder.backbone_decoder_num_stacks = 1",
                "MaXDeepLabEncoder.extra_decoder_num_stacks = 1"]
    parse_config(["tiny.gin"], bindings)
    panoptic = build_model(input_size=(33, 33))
    classifier = BackboneClassifier(num_classes=10)
    classifier(tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]))
    parse_config(["tiny.gin"], [])
    classifier_keys = checkpoint_keys(classifier.encoder)
    assert any(k.startswith("_decoder_stage") for k in classifier_keys)
    assert set(backbone_variables(panoptic)) == set(classifier_keys)
    # The optimiser's backbone learning-rate multiplier covers exactly what is pretrained.
    pretrained = {id(v) for v in backbone_variables(panoptic).values() if v.trainable}
    multiplied = _multiplied(panoptic)
    assert any("decoder_stage" in v.name for v in panoptic.trainable_variables
               if id(v) in multiplied)
    assert multiplied == pretrained


@pytest.mark.slow
def test_pretraining_step_compiles_with_xla(tmp_path):
    """TPU readiness (docs/design.md §7): the whole train step as one XLA program on CPU."""
    from max_deeplab.training.pretrain import run_pretraining

    parse_config(["tiny.gin"], [])
    with mock_imagenet():
        result = run_pretraining(
            mode="train_and_eval", model_dir=str(tmp_path / "m"),
            strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), data_dir=str(tmp_path),
            options=dict(train_steps=1, checkpoint_every=1, train_batch_size=2,
                         eval_batch_size=2, image_size=IMAGE_SIZE, warmup_epochs=0,
                         jit_compile=True),
            print_fn=lambda _: None)
    assert result["num_examples"] == MOCK_EXAMPLES
