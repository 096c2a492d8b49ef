"""The SavedModel's model-garden input signatures: `image_bytes` (encoded images) and
`tf_example` (serialized tf.train.Example), loaded in a process that cannot import this
package and compared with `serving_default` on the decoded images."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_export import (
    BLOCK_PACKAGE,
    CATEGORIES,
    NUM_CLASSES,
    NUM_SLOTS,
    _image,
    _standin,
    run_without_package,
)

from max_deeplab.data.tfrecord import make_example
from max_deeplab.inference import export_saved_model
from max_deeplab.inference.export import PanopticServingModule, category_table

EXPORT_SIZE = (33, 49)
SIZES = [(33, 49), (50, 23), (7, 90)]

_CALLER = BLOCK_PACKAGE + textwrap.dedent("""
    import numpy as np, tensorflow as tf
    export_dir, out_prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loaded = tf.saved_model.load(export_dir)
    for name in ("image_bytes", "tf_example"):
        blobs = [open(f"{out_prefix}.{name}.{i}", "rb").read() for i in range(count)]
        out = loaded.signatures[name](inputs=tf.constant(blobs))
        np.savez(f"{out_prefix}.{name}.npz", **{k: v.numpy() for k, v in out.items()})
    assert not any(m.startswith("max_deeplab") for m in sys.modules)
""")


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(encoded: bytes, index: int) -> bytes:
    """A record as `max-deeplab convert` writes it (with its panoptic fields)."""
    fields = {"image/encoded": encoded, "image/format": b"png", "image/height": 1,
              "image/width": 1, "image/id": index, "image/filename": b"x.png",
              "panoptic/encoded": b"", "panoptic/format": b"png",
              "segments/id": [1], "segments/class": [0], "segments/instance": [0],
              "segments/is_crowd": [0], "segments/area": [1], "segments/panoptic": [0]}
    return make_example(fields).SerializeToString()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _standin()
    export_dir = tmp_path_factory.mktemp("signatures") / "export"
    meta = {"categories": CATEGORIES}
    export_saved_model(model, str(export_dir), meta, input_size=EXPORT_SIZE)
    module = PanopticServingModule(model, category_table(meta, NUM_CLASSES), EXPORT_SIZE)
    return export_dir, module


def test_image_bytes_and_tf_example_without_the_package(exported, tmp_path):
    export_dir, module = exported
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    encoded = [_png(image) for image in images]
    prefix = str(tmp_path / "out")
    for i, blob in enumerate(encoded):  # raw files: a numpy bytes array drops trailing NULs
        (tmp_path / f"out.image_bytes.{i}").write_bytes(blob)
        (tmp_path / f"out.tf_example.{i}").write_bytes(_example(blob, i))
    run_without_package(_CALLER, [str(export_dir), prefix, str(len(images))], tmp_path)

    largest = (max(h for h, _ in SIZES), max(w for _, w in SIZES))
    for name in ("image_bytes", "tf_example"):
        out = dict(np.load(f"{prefix}.{name}.npz"))
        assert out["panoptic"].shape == (len(SIZES), *largest), name
        np.testing.assert_array_equal(out["image_size"], SIZES)
        assert out["segment_scores"].shape == (len(SIZES), NUM_SLOTS)
        for b, (image, (h, w)) in enumerate(zip(images, SIZES, strict=True)):
            # serving_default on the uint8 image, in this process: each image's maps fill
            # its top-left corner, the padding is void.
            want = module.serving_default(tf.constant(image))
            for key in ("panoptic", "semantic", "instance"):
                got = out[key][b]
                np.testing.assert_array_equal(got[:h, :w], want[key].numpy(),
                                              err_msg=f"{name} {key} image {b}")
                assert not got[h:].any() and not got[:, w:].any(), (name, key, b)
            np.testing.assert_allclose(out["segment_scores"][b], want["segment_scores"].numpy(),
                                       rtol=1e-6)
            np.testing.assert_array_equal(out["segment_classes"][b],
                                          want["segment_classes"].numpy())
        assert len(np.unique(out["panoptic"][0])) >= 3  # segments, not all void


def test_saved_model_cli_lists_the_signatures_as_the_model_garden_names_them(exported):
    export_dir, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    for name in ("image_bytes", "tf_example"):
        show = subprocess.run([cli, "show", "--dir", str(export_dir), "--tag_set", "serve",
                               "--signature_def", name], capture_output=True, text=True,
                              timeout=120)
        assert show.returncode == 0, show.stderr[-2000:]
        inputs = show.stdout.split("outputs")[0]
        assert "['inputs'] tensor_info" in inputs and "DT_STRING" in inputs
        assert "shape: (-1)" in inputs
        assert "['image_size']" in show.stdout and "['panoptic']" in show.stdout


def test_jpeg_bytes_in_process(exported):
    """A JPEG (the usual encoded input) gives serving_default's result on its decoding."""
    export_dir, module = exported
    loaded = tf.saved_model.load(str(export_dir))
    image = _image(40, 30, 7)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    out = loaded.signatures["image_bytes"](inputs=tf.constant([buffer.getvalue()]))
    decoded = tf.io.decode_jpeg(buffer.getvalue(), channels=3)
    want = module.serving_default(decoded)
    np.testing.assert_array_equal(out["panoptic"][0].numpy(), want["panoptic"].numpy())
    np.testing.assert_array_equal(out["image_size"].numpy(), [[40, 30]])
