"""SavedModel export (docs/design.md §6): self-contained, any image size, signatures, metadata.

The default tests use a small tf_keras stand-in returning the docs/design.md §3 output dict (fast);
the slow test exports the real `configs/tiny.gin` model through the `export` CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.inference import export_saved_model, postprocess
from max_deeplab.inference.export import (
    ExportDirectoryError,
    PanopticServingModule,
    category_table,
)

NUM_CLASSES = 4
NUM_SLOTS = 6
CATEGORIES = [{"id": 11, "name": "disc", "isthing": 1, "color": [220, 20, 60]},
              {"id": 3, "name": "box", "isthing": 1},
              {"id": 40, "name": "grass", "isthing": 0},
              {"id": 50, "name": "sky", "isthing": 0}]


class StandIn(tfk.Model):
    """Stride-4 outputs shaped like MaX-DeepLab's, depending on the image (test only)."""

    def __init__(self, num_classes: int = NUM_CLASSES, num_slots: int = NUM_SLOTS):
        super().__init__()
        self.pool = tfk.layers.AveragePooling2D(4, strides=4, padding="same")
        self.mask = tfk.layers.Conv2D(num_slots, 3, padding="same",
                                      kernel_initializer=tfk.initializers.RandomNormal(
                                          0, 0.3, seed=1))
        self.feature = tfk.layers.Conv2D(8, 1, kernel_initializer="ones")
        self.semantic = tfk.layers.Conv2D(num_classes, 1, kernel_initializer="ones")
        rng = np.random.default_rng(3)
        logits = rng.normal(0, 1, (num_slots, num_classes + 1))
        logits[np.arange(num_slots), np.arange(num_slots) % num_classes] += 6.0
        self.class_table = tf.Variable(logits.astype(np.float32), name="class_table")

    def call(self, images, training=False):
        x = self.pool(images / 127.5 - 1.0)
        batch = tf.shape(images)[0]
        return {
            "mask_logits": 5.0 * self.mask(x),
            "class_logits": tf.tile(self.class_table[None], [batch, 1, 1]),
            "pixel_feature": self.feature(x),
            "semantic_logits": self.semantic(x),
        }


def _standin(**kwargs) -> StandIn:
    model = StandIn(**kwargs)
    model(tf.zeros([1, 33, 49, 3]))
    return model


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)),
                     ((yy + xx) % 64) * 4], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# The subprocess runs with -I (no PYTHONPATH, no cwd on sys.path) from a temp directory and
# additionally blocks every import of max_deeplab (the editable install's finder would
# otherwise still find it), then proves the block works before loading.
BLOCK_PACKAGE = textwrap.dedent("""
    import json, sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "max_deeplab" or name.startswith("max_deeplab."):
                raise ImportError("max_deeplab is blocked in this process")
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import max_deeplab  # noqa
        raise SystemExit("max_deeplab is importable")
    except ImportError:
        pass
""")
_LOADER = BLOCK_PACKAGE + textwrap.dedent("""
    import numpy as np, tensorflow as tf
    export_dir, image_paths, out_path = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    loaded = tf.saved_model.load(export_dir)
    result = {"signatures": sorted(loaded.signatures.keys())}
    for i, p in enumerate(image_paths):
        out = loaded.signatures["serving_default"](image=tf.constant(np.load(p)))
        np.savez(f"{out_path}.{i}.npz", **{k: v.numpy() for k, v in out.items()})
    batch = np.stack([np.load(image_paths[0])] * 2)
    out = loaded.signatures["serving_batched"](images=tf.constant(batch))
    np.savez(f"{out_path}.batched.npz", **{k: v.numpy() for k, v in out.items()})
    meta = loaded.signatures["metadata"]()
    result["metadata"] = {k: v.numpy().tolist() if v.dtype != tf.string else
                          [s.decode() for s in v.numpy()] for k, v in meta.items()}
    result["max_deeplab_loaded"] = any(m.startswith("max_deeplab") for m in sys.modules)
    json.dump(result, open(out_path, "w"))
""")


def run_without_package(script_text: str, args: list[str], tmp_path) -> None:
    """Runs `script_text` (starting with `BLOCK_PACKAGE`) with `args` in a fresh
    interpreter that cannot import max_deeplab; fails the test if it fails."""
    script = tmp_path / "load.py"
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _load_in_clean_process(export_dir, images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.npy"))
        np.save(paths[-1], image)
    out_path = str(tmp_path / "loaded.json")
    run_without_package(_LOADER, [str(export_dir), *paths, out_path], tmp_path)
    with open(out_path) as f:
        info = json.load(f)
    outs = [dict(np.load(f"{out_path}.{i}.npz")) for i in range(len(images))]
    return info, outs, dict(np.load(f"{out_path}.batched.npz"))


def test_category_table_orders_and_checks():
    table = category_table({"categories": CATEGORIES}, NUM_CLASSES)
    assert table["category_ids"] == [3, 11, 40, 50]  # contiguous order = sorted by id
    assert table["isthing"] == [True, True, False, False]
    cats = [dict(c, contiguous_id=i) for i, c in enumerate(CATEGORIES)]
    assert category_table({"categories": cats}, NUM_CLASSES)["category_ids"] == [11, 3, 40, 50]
    with pytest.raises(ValueError, match="lists 4 categories but the model predicts 5"):
        category_table({"categories": CATEGORIES}, 5)
    # A category without isthing is an error, not silently stuff.
    no_isthing = [{k: v for k, v in c.items() if k != "isthing" or c["id"] != 11}
                  for c in CATEGORIES]
    with pytest.raises(ValueError, match="category id 11 has no 'isthing'"):
        category_table({"categories": no_isthing}, NUM_CLASSES)


def test_serving_matches_direct_postprocess_at_export_size():
    model = _standin()
    module = PanopticServingModule(model, category_table({"categories": CATEGORIES},
                                                         NUM_CLASSES), (33, 49))
    image = _image(33, 49)
    out = module.serving_default(tf.constant(image))
    direct = postprocess(model(tf.constant(image[None], tf.float32)),
                         is_thing=[True, True, False, False], image_size=(33, 49))
    np.testing.assert_array_equal(out["panoptic"].numpy(), direct["panoptic"][0].numpy())
    np.testing.assert_array_equal(out["semantic"].numpy(), direct["semantic"][0].numpy())
    assert len(np.unique(out["panoptic"].numpy())) >= 3  # segments, not all void
    # Another size: resized to fit, padded, cropped and resized back to the input size.
    small = module.serving_default(tf.constant(_image(20, 14, 1)))
    assert small["panoptic"].shape == (20, 14)
    assert small["segment_scores"].shape == (NUM_SLOTS,)


def test_export_loads_without_package_and_matches(tmp_path):
    model = _standin()
    export_dir = tmp_path / "export"
    meta = {"categories": CATEGORIES}
    export_saved_model(model, str(export_dir), meta, input_size=(33, 49))
    module = PanopticServingModule(model, category_table(meta, NUM_CLASSES), (33, 49))
    images = [_image(33, 49), _image(50, 23, 2), _image(7, 90, 3)]
    info, outs, batched = _load_in_clean_process(export_dir, images, tmp_path)

    assert not info["max_deeplab_loaded"]
    assert {"serving_default", "serving_batched", "metadata"} <= set(info["signatures"])
    for image, loaded in zip(images, outs, strict=True):
        want = module.serving_default(tf.constant(image))
        assert loaded["panoptic"].shape == image.shape[:2]
        for key in ("panoptic", "semantic", "instance", "segment_classes"):
            np.testing.assert_array_equal(loaded[key], want[key].numpy(), err_msg=key)
        np.testing.assert_allclose(loaded["segment_scores"], want["segment_scores"].numpy(),
                                   rtol=1e-6)
    assert batched["panoptic"].shape == (2, 33, 49)
    np.testing.assert_array_equal(batched["panoptic"][1], outs[0]["panoptic"])
    assert info["metadata"]["category_ids"] == [3, 11, 40, 50]
    assert info["metadata"]["category_names"] == ["box", "disc", "grass", "sky"]
    assert info["metadata"]["isthing"] == [True, True, False, False]
    assert info["metadata"]["label_divisor"] == 256 and info["metadata"]["label_offset"] == 1
    with open(export_dir / "assets" / "metadata.json") as f:
        asset = json.load(f)
    assert asset["category_ids"] == [3, 11, 40, 50] and asset["input_size"] == [33, 49]

    # saved_model_cli (TensorFlow's own tool) lists the signatures.
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    show = subprocess.run([cli, "show", "--dir", str(export_dir), "--tag_set", "serve"],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr[-2000:]
    for name in ("serving_default", "serving_batched", "metadata"):
        assert name in show.stdout

    # A second export into the same (non-empty) directory is refused.
    with pytest.raises(ExportDirectoryError, match="not empty"):
        export_saved_model(model, str(export_dir), meta, input_size=(33, 49))


def test_export_takes_the_label_divisor_of_the_data_set(tmp_path):
    """The metadata's label divisor (what `train` evaluates with), not gin's default 256."""
    model = _standin()
    export_dir = tmp_path / "export"
    export_saved_model(model, str(export_dir), {"categories": CATEGORIES, "label_divisor": 1000},
                       input_size=(33, 49))
    loaded = tf.saved_model.load(str(export_dir))
    assert loaded.signatures["metadata"]()["label_divisor"].numpy() == 1000
    with open(export_dir / "assets" / "metadata.json") as f:
        assert json.load(f)["label_divisor"] == 1000
    panoptic = loaded.signatures["serving_default"](image=tf.constant(_image(33, 49)))["panoptic"]
    direct = postprocess(model(tf.constant(_image(33, 49)[None], tf.float32)),
                         is_thing=[True, True, False, False], image_size=(33, 49),
                         label_divisor=1000)
    np.testing.assert_array_equal(panoptic.numpy(), direct["panoptic"][0].numpy())
    assert panoptic.numpy().max() >= 1000


@pytest.mark.slow  # builds the tiny-config model (~15 s)
def test_export_cli_reports_checkpoint_mismatch(tmp_path, capsys):
    from max_deeplab.cli import export as export_cli

    ckpt = tf.train.Checkpoint(model=_standin()).write(str(tmp_path / "ckpt" / "ckpt-1"))
    meta = tmp_path / "meta.json"  # as many classes as tiny.gin's model: only weights differ
    meta.write_text(json.dumps({"categories": [{"id": i, "isthing": 1} for i in range(8)]}))
    code = export_cli.main(["max-deeplab export", "--checkpoint", ckpt, "--export_dir",
                            str(tmp_path / "out"), "--gin_file", "tiny.gin",
                            "--metadata", str(meta)])
    err = capsys.readouterr().err
    assert code == 1
    assert "not found in the checkpoint" in err and "model/" in err
    assert not (tmp_path / "out").exists()
    code = export_cli.main(["max-deeplab export", "--checkpoint", str(tmp_path / "nope"),
                            "--export_dir", str(tmp_path / "out")])
    assert code == 2 and "--checkpoint: no checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
def test_export_cli_real_tiny_model(tmp_path):
    """`export` of a tiny-config checkpoint; loaded elsewhere it equals the in-process model."""
    from max_deeplab.cli import export as export_cli
    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], [])
    model = build_model()
    tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "ckpt"))  # dir + state
    cats = [{"id": 100 + i, "name": f"c{i}", "isthing": int(i < 4)} for i in range(8)]
    (tmp_path / "ckpt" / "train-metadata.json").write_text(json.dumps({"categories": cats}))
    export_dir = tmp_path / "export"
    code = export_cli.main(["max-deeplab export", "--checkpoint", str(tmp_path / "ckpt"),
                            "--export_dir", str(export_dir), "--gin_file", "tiny.gin"])
    assert code == 0
    images = [_image(65, 97), _image(40, 30, 5)]
    info, outs, _ = _load_in_clean_process(export_dir, images, tmp_path)
    assert not info["max_deeplab_loaded"]
    assert info["metadata"]["category_ids"] == list(range(100, 108))
    # At the export size (65x97) nothing is resized: the SavedModel must equal
    # postprocess(model(image)) computed here with the in-process model.
    direct = postprocess(model(tf.constant(images[0][None], tf.float32), training=False),
                         is_thing=[c["isthing"] for c in cats], image_size=(65, 97))
    np.testing.assert_array_equal(outs[0]["panoptic"], direct["panoptic"][0].numpy())
    np.testing.assert_array_equal(outs[0]["semantic"], direct["semantic"][0].numpy())
    assert outs[1]["panoptic"].shape == (40, 30)
