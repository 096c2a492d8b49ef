"""Import of the reference implementation's (deeplab2) checkpoints (issue 8, docs/design.md §3).

* The tiny random-weight deeplab2 checkpoint (`reference/deeplab2/tiny`) imported into our
  `reference_tiny.gin` model reproduces deeplab2's own outputs on its image (io.npz) to 1e-3
  of each output's standard deviation in deeplab2's order of operations (batch norms not
  folded), and its panoptic map through our post-processing; with the default folded batch
  norms, the same panoptic map and outputs within the model's own rounding sensitivity.
* The full S and L variable listings map one to one, shape for shape, onto our S and L
  models (built, no checkpoint needed).
* A checkpoint of another model, a stray variable, a missing or corrupt file: clear errors
  listing what is left on each side; the model is left unchanged.
* The CLI writes a checkpoint that `max_deeplab.model.restore` loads into a fresh model
  with identical outputs.
"""
from __future__ import annotations

import ast
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk
from reference_data import REFERENCE_DIR

from max_deeplab.cli import import_checkpoint as cli
from max_deeplab.gin_config import parse_config
from max_deeplab.inference import postprocess
from max_deeplab.model import build_model, restore
from max_deeplab.model.reference_import import (
    BOOKKEEPING_KEYS,
    TRANSFORMS,
    ReferenceImportError,
    import_reference_checkpoint,
    model_reference_keys,
    plan_import,
    resolve_reference_path,
    write_model_checkpoint,
)

TINY = os.path.join(REFERENCE_DIR, "tiny")
SEMANTIC_KERNEL = "semantic_last_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"

pytestmark = pytest.mark.skipif(not os.path.isdir(TINY),
                                reason=f"reference fixture not found: {TINY}")


def _listing(path: str) -> dict[str, tuple[int, ...]]:
    """A reference variable listing (name<TAB>[shape]<TAB>dtype) as name -> shape."""
    shapes = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, shape, _ = line.rstrip("\n").split("\t")
            shapes[name] = tuple(ast.literal_eval(shape))
    return shapes


# The reference's order of operations: convolution, then batch norm (not folded).
UNFOLDED = ["batch_norm_folding.enabled = False"]


def _model(gin_file: str, bindings: list[str] | None = None) -> tfk.Model:
    parse_config([gin_file], bindings or [])
    return build_model()


def _outputs(model: tfk.Model, image: np.ndarray) -> dict[str, np.ndarray]:
    out = model(tf.cast(image, tf.float32), training=False)
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def io():
    return np.load(os.path.join(TINY, "io.npz"))


@pytest.fixture(scope="module")
def tiny(io):
    model = _model("reference_tiny.gin", UNFOLDED)
    report = import_reference_checkpoint(model, TINY)
    return model, report, _outputs(model, io["image"])


@pytest.fixture(scope="module")
def s_model():
    return _model("max_deeplab_s_coco_641.gin")


# ------------------------------------------------------------------ exact reproduction


def test_tiny_import_reproduces_reference_outputs(tiny, io):
    _, report, out = tiny
    pairs = {"mask_logits": "pixel_space_mask_logits",
             "class_logits": "transformer_class_logits",
             "pixel_feature": "pixel_space_normalized_feature"}
    for ours, theirs in pairs.items():
        want = io[theirs]
        assert out[ours].shape == want.shape, ours
        err = np.abs(out[ours] - want).max()
        assert err <= 1e-3 * want.std(), f"{ours}: max error {err}, std {want.std()}"
    # The semantic head maps deeplab2 channel k + 1 to our class k (channel 0 is void).
    sem = io["semantic_logits"][..., 1:]
    assert np.abs(out["semantic_logits"] - sem).max() <= 1e-3 * sem.std()
    # Every reference weight was used; exactly the two counters and the graph record ignored.
    assert report.mapped == 520
    assert sorted(report.plan.ignored["bookkeeping"]) == sorted(BOOKKEEPING_KEYS)
    assert report.plan.ignored["optimizer"] == []
    assert set(report.plan.transforms) == set(TRANSFORMS)


def test_tiny_import_reproduces_reference_panoptic_map(tiny, io):
    _, _, out = tiny
    # deeplab2's settings for this fixture (reference/deeplab2/README.md): class 0.7,
    # pixel 0.4, thing 100 / stuff 1600 px at 65x65, argmax over the masks only
    # ("pixelwise"); transformer class channel k is COCO label k + 1, things are 0..79
    # (see max_deeplab/inference/postprocess.py).
    pan = postprocess(out, is_thing=np.arange(133) < 80, image_size=(65, 65),
                      class_threshold=0.7, pixel_threshold=0.4, thing_area_limit=100,
                      stuff_area_limit=1600, area_limit_reference_size=None,
                      weight_masks_by_class_confidence=False, label_offset=1,
                      label_divisor=256)["panoptic"].numpy()
    want = io["panoptic_pred"]
    assert len(np.unique(want)) >= 5  # 4 segments + void: not a trivial map
    assert np.mean(pan == want) >= 0.999


def test_tiny_import_with_folded_batch_norms(tiny, io):
    """The default inference path (batch norms folded into the convolutions) against the
    reference. This random-weight model amplifies float32 rounding: moving the image by one
    rounding (1e-7 relative) moves its outputs by ~5e-4 of their spread, so the fold, the
    same affine maps rounded in other places, cannot reproduce the reference's digits as
    the unfolded order does (above). It must stay within a few times that sensitivity of the
    unfolded outputs, and give the reference's panoptic map."""
    model, _, unfolded = tiny
    image = io["image"].astype(np.float32)
    rng = np.random.default_rng(0)
    sensitivity = {key: 0.0 for key in ("mask_logits", "class_logits", "pixel_feature")}
    parse_config(["reference_tiny.gin"], UNFOLDED)
    for _ in range(3):
        nudged = _outputs(model, image * (1 + 1e-7 * rng.standard_normal(image.shape)
                                          .astype(np.float32)))
        for key in sensitivity:
            sensitivity[key] = max(sensitivity[key],
                                   np.abs(nudged[key] - unfolded[key]).max())
    parse_config(["reference_tiny.gin"], [])
    folded = _outputs(model, image)
    for key, floor in sensitivity.items():
        change = np.abs(folded[key] - unfolded[key]).max()
        assert 0 < floor <= 2e-3 * unfolded[key].std(), (key, floor)
        assert 0 < change <= 5 * floor, (key, change, floor)  # folded, and close
    pan = postprocess(folded, is_thing=np.arange(133) < 80, image_size=(65, 65),
                      class_threshold=0.7, pixel_threshold=0.4, thing_area_limit=100,
                      stuff_area_limit=1600, area_limit_reference_size=None,
                      weight_masks_by_class_confidence=False, label_offset=1,
                      label_divisor=256)["panoptic"].numpy()
    assert np.mean(pan == io["panoptic_pred"]) >= 0.999


# --------------------------------------------------------------- S / L listings


def _assert_listing_maps(model: tfk.Model, listing: str) -> None:
    reference = _listing(os.path.join(REFERENCE_DIR, listing))
    ours = {k: v.shape for k, v in model_reference_keys(model).items()}
    plan = plan_import(ours, reference)
    weights = set(reference) - set(BOOKKEEPING_KEYS)
    assert set(plan.keys) == weights == set(ours)  # one to one
    assert sorted(plan.ignored["bookkeeping"]) == sorted(BOOKKEEPING_KEYS)
    assert set(plan.transforms) == set(TRANSFORMS)
    for key in plan.keys:
        if key in TRANSFORMS:
            assert reference[key] == tuple(ours[key][:-1]) + (ours[key][-1] + 1,)
        else:
            assert reference[key] == tuple(ours[key]), key


def test_s_variable_listing_maps_one_to_one(s_model):
    _assert_listing_maps(s_model, "max_deeplab_s_variables.tsv")


@pytest.mark.slow
def test_l_variable_listing_maps_one_to_one():
    _assert_listing_maps(_model("max_deeplab_l_coco_1025.gin"), "max_deeplab_l_variables.tsv")


# ------------------------------------------------------------------- mismatches


def test_wrong_model_fails_listing_both_sides_and_leaves_model_untouched(s_model):
    keys = model_reference_keys(s_model)
    before = keys[SEMANTIC_KERNEL].numpy().copy()
    with pytest.raises(ReferenceImportError) as info:
        import_reference_checkpoint(s_model, TINY)
    message = str(info.value)
    # Tiny has fewer, narrower blocks: S variables without a value, shared names with
    # other shapes (both shapes listed), and a hint at the config.
    assert "model variable(s) not found in the checkpoint" in message
    assert "with another shape" in message
    assert ("semantic_last_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE: model [1, 1, 256, 133], "
            "reference [1, 1, 32, 134]") in message
    assert "--gin_file" in message
    np.testing.assert_array_equal(keys[SEMANTIC_KERNEL].numpy(), before)


def test_plan_lists_unused_missing_with_same_shape_candidates():
    model = {"encoder/a/kernel/.ATTRIBUTES/VARIABLE_VALUE": (3, 3),
             "encoder/b/bias/.ATTRIBUTES/VARIABLE_VALUE": (4,),
             SEMANTIC_KERNEL: (1, 1, 8, 5)}
    reference = {"encoder/a/kernel_renamed/.ATTRIBUTES/VARIABLE_VALUE": (3, 3),
                 "encoder/b/bias/.ATTRIBUTES/VARIABLE_VALUE": (4,),
                 "encoder/extra/.ATTRIBUTES/VARIABLE_VALUE": (7,),
                 # Same channel count as ours: the void channel is missing.
                 SEMANTIC_KERNEL: (1, 1, 8, 5),
                 "global_step/.ATTRIBUTES/VARIABLE_VALUE": ()}
    with pytest.raises(ReferenceImportError) as info:
        plan_import(model, reference)
    message = str(info.value)
    assert ("encoder/a/kernel/.ATTRIBUTES/VARIABLE_VALUE [3, 3]  (same shape in checkpoint: "
            "encoder/a/kernel_renamed/.ATTRIBUTES/VARIABLE_VALUE)") in message
    assert "2 checkpoint variable(s) not used by the model" in message
    assert "encoder/extra/.ATTRIBUTES/VARIABLE_VALUE [7]" in message
    assert "reference expected to be [1, 1, 8, 6]" in message
    assert "global_step" not in message  # bookkeeping is never "unused"
    # And the matching case passes, with the slice recorded.
    reference.pop("encoder/a/kernel_renamed/.ATTRIBUTES/VARIABLE_VALUE")
    reference.pop("encoder/extra/.ATTRIBUTES/VARIABLE_VALUE")
    reference["encoder/a/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = (3, 3)
    reference[SEMANTIC_KERNEL] = (1, 1, 8, 6)
    plan = plan_import(model, reference)
    assert set(plan.keys) == set(model) and list(plan.transforms) == [SEMANTIC_KERNEL]
    np.testing.assert_array_equal(plan.transforms[SEMANTIC_KERNEL](np.arange(6)),
                                  np.arange(1, 6))


def _rewrite_reference(out_dir: str, extra: dict[str, np.ndarray] | None = None,
                       optimizers: bool = False) -> str:
    """The tiny reference checkpoint rewritten under the same keys (an object tree built
    from the key paths), optionally with extra variables and deeplab2-trainer-style
    optimizer state: a legacy Adam with `.OPTIMIZER_SLOT` variables as `optimizer` and a
    new-style Adam as `backbone_optimizer`."""
    reader = tf.train.load_checkpoint(TINY)
    values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
              if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE") and not k.startswith("save_counter")}
    values.update(extra or {})
    roots: dict[str, tf.Module] = {}
    variables = {}
    for key, value in values.items():
        parts = key[: -len("/.ATTRIBUTES/VARIABLE_VALUE")].split("/")
        if len(parts) == 1:
            roots[parts[0]] = variables[key] = tf.Variable(value)
            continue
        node = roots.setdefault(parts[0], tf.Module())
        for part in parts[1:-1]:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        variables[key] = tf.Variable(value)
        setattr(node, parts[-1], variables[key])
    if optimizers:
        trained = [variables[k] for k in sorted(variables)
                   if k.startswith("transformer_class_head/")]
        for name, opt in (("optimizer", tfk.optimizers.legacy.Adam()),
                          ("backbone_optimizer", tfk.optimizers.Adam())):
            opt.apply_gradients([(tf.zeros_like(v), v) for v in trained])
            roots[name] = opt
    return tf.train.Checkpoint(**roots).write(os.path.join(out_dir, "ckpt-7"))


def test_optimizer_state_is_ignored_and_reported(tiny, io, tmp_path):
    model, _, want = tiny
    prefix = _rewrite_reference(str(tmp_path), optimizers=True)
    keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    assert any("/.OPTIMIZER_SLOT/optimizer/" in k for k in keys)
    assert any(k.startswith("backbone_optimizer/") for k in keys)
    report = import_reference_checkpoint(model, prefix)
    assert report.mapped == 520
    ignored = report.plan.ignored["optimizer"]
    assert {k for k in keys if k.startswith(("optimizer/", "backbone_optimizer/"))
            or "/.OPTIMIZER_SLOT/" in k} == set(ignored)
    assert any("ignored" in line and "optimizer" in line for line in report.lines())
    # Same values as the reference, so the same outputs (in the same order of operations).
    parse_config(["reference_tiny.gin"], UNFOLDED)
    np.testing.assert_array_equal(_outputs(model, io["image"])["mask_logits"],
                                  want["mask_logits"])


def test_stray_reference_variable_fails(tiny, tmp_path):
    model, _, _ = tiny
    stray = "encoder/_stage9/_block1/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    prefix = _rewrite_reference(str(tmp_path), extra={stray: np.ones([2, 2], np.float32)})
    with pytest.raises(ReferenceImportError, match="1 checkpoint variable.*not used") as info:
        import_reference_checkpoint(model, prefix)
    assert f"{stray} [2, 2]" in str(info.value)


# ------------------------------------------------------------------ paths and files


def test_missing_and_corrupt_reference_give_clear_errors(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.raises(ReferenceImportError, match="no reference checkpoint at"):
        import_reference_checkpoint(model, str(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReferenceImportError, match="no checkpoint in directory"):
        import_reference_checkpoint(model, str(empty))
    # A garbage index file.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt-1.index").write_bytes(b"not a checkpoint index" * 10)
    with pytest.raises(ReferenceImportError, match="cannot read reference checkpoint"):
        import_reference_checkpoint(model, str(bad / "ckpt-1"))
    # A truncated data file: the index reads, the tensors do not; the model is untouched.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(os.path.join(TINY, "ckpt-0.index"), cut / "ckpt-0.index")
    with open(os.path.join(TINY, "ckpt-0.data-00000-of-00001"), "rb") as f:
        (cut / "ckpt-0.data-00000-of-00001").write_bytes(f.read(1_000_000))
    kernel = model_reference_keys(model)[SEMANTIC_KERNEL]
    before = kernel.numpy().copy()
    with pytest.raises(ReferenceImportError, match="cannot read"):
        import_reference_checkpoint(model, str(cut / "ckpt-0"))
    np.testing.assert_array_equal(kernel.numpy(), before)


def test_resolves_unpacked_tarball_layouts(tmp_path):
    # A model-zoo tarball unpacks to a folder with a prefix and no 'checkpoint' file.
    inner = tmp_path / "max_deeplab_s_os16_res641_400k"
    inner.mkdir()
    for name in ("ckpt-0.index", "ckpt-0.data-00000-of-00001"):
        os.symlink(os.path.join(TINY, name), inner / name.replace("ckpt-0", "ckpt-400000"))
    prefix = str(inner / "ckpt-400000")
    assert resolve_reference_path(str(tmp_path)) == prefix
    assert resolve_reference_path(str(inner)) == prefix
    assert resolve_reference_path(prefix + ".index") == prefix
    assert resolve_reference_path(prefix + ".data-00000-of-00001") == prefix
    assert resolve_reference_path(TINY) == os.path.join(TINY, "ckpt-0")


def test_write_is_atomic(tmp_path):
    model = tfk.Sequential([tfk.layers.Dense(3)])
    model.build((None, 2))
    out = tmp_path / "out"
    # A failure after the checkpoint is written (a bad extra file) leaves nothing behind.
    with pytest.raises(OSError):
        write_model_checkpoint(model, str(out), extra_files={"no/such/dir.json": "{}"})
    assert os.listdir(tmp_path) == []
    prefix = write_model_checkpoint(model, str(out))
    assert tf.train.latest_checkpoint(str(out)) == prefix
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_model_checkpoint(model, str(out))
    model.layers[0].kernel.assign(tf.ones([2, 3]))
    write_model_checkpoint(model, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    restored = tf.train.load_checkpoint(str(out)).get_tensor(
        "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(restored, np.ones([2, 3]))


# ------------------------------------------------------------------------ CLI


def test_cli_import_then_restore_gives_identical_outputs(tiny, io, tmp_path, capsys):
    _, _, want = tiny
    out_dir = str(tmp_path / "imported")
    argv = ["max-deeplab import-checkpoint", f"--reference_checkpoint={TINY}",
            "--gin_file=reference_tiny.gin", f"--output={out_dir}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mapped 520 variables" in printed
    assert "global_step, save_counter" in printed
    assert "semantic_last_layer/kernel: [..., 1:]" in printed
    assert sorted(os.listdir(out_dir)) == ["checkpoint", "ckpt-0.data-00000-of-00001",
                                           "ckpt-0.index", "reference_import.json"]
    # A second run refuses to overwrite, before building anything.
    assert cli.main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err

    fresh = _model("reference_tiny.gin", UNFOLDED)
    assert restore(fresh, out_dir) == os.path.join(out_dir, "ckpt-0")
    got = _outputs(fresh, io["image"])
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_cli_user_errors(tmp_path, capsys):
    base = ["max-deeplab import-checkpoint", "--gin_file=reference_tiny.gin"]
    assert cli.main([*base, f"--output={tmp_path / 'o'}"]) == 2
    assert "--reference_checkpoint is required" in capsys.readouterr().err
    assert cli.main([*base, f"--reference_checkpoint={tmp_path / 'missing'}",
                     f"--output={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "no reference checkpoint at" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")
    assert cli.main(["max-deeplab import-checkpoint", f"--reference_checkpoint={TINY}",
                     f"--output={tmp_path / 'o'}"]) == 2
    assert "--gin_file is required" in capsys.readouterr().err
