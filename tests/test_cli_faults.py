"""Issue 22 for `predict`, `import-checkpoint` and `export`: a bad image is skipped with a
reason (and said so by the exit code), output locations are checked before the work, and an
export into a symlink to an empty directory works."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from max_deeplab.cli import import_checkpoint as import_cli
from max_deeplab.cli import predict as predict_cli


def test_predict_skips_an_image_above_the_decompression_bomb_limit(standin_saved_model,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images / "big.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(images / "c.png")
    # Pillow refuses images above 2 x MAX_IMAGE_PIXELS (a 30000 x 6000 photo at the default).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = tmp_path / "out"
    code = predict_cli.main(["max-deeplab predict", f"--saved_model={standin_saved_model}",
                             f"--images={images / '*.png'}", f"--output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 1  # not every image was predicted
    assert f"skipped {images / 'big.png'}" in captured.err
    assert "decompression bomb" in captured.err and "Traceback" not in captured.err
    predictions = json.loads((out / "predictions.json").read_text())
    assert [a["file_name"] for a in predictions["annotations"]] == ["a.png", "c.png"]
    assert sorted(os.listdir(out / "panoptic")) == ["a.png", "c.png"]
    assert "1 skipped" in captured.out


def test_predict_exits_0_when_every_image_is_predicted(standin_saved_model, tmp_path):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert predict_cli.main(["max-deeplab predict", f"--saved_model={standin_saved_model}",
                             f"--images={tmp_path / 'a.png'}",
                             f"--output_dir={tmp_path / 'out'}"]) == 0


@pytest.mark.parametrize("layout, expected", [
    ("file", "{out} is a file, not a directory"),
    ("under_file", "{out} cannot be created: {tmp}/a_file is a file"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_import_checkpoint_output_is_checked_before_anything_is_read(tmp_path, capsys,
                                                                     layout, expected,
                                                                     overwrite):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    out = a_file if layout == "file" else a_file / "ckpt"
    argv = ["max-deeplab import-checkpoint", f"--reference_checkpoint={tmp_path / 'none'}",
            "--gin_file=tiny.gin", f"--output={out}"] + (["--overwrite"] if overwrite else [])
    assert import_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected.format(out=out, tmp=tmp_path) in err, err
    assert "exists and is not empty" not in err and "Traceback" not in err
    assert a_file.read_text() == "keep"


def test_export_into_a_symlink_to_an_empty_directory(tmp_path):
    from test_export import CATEGORIES, StandIn

    from max_deeplab.inference import export_saved_model

    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    export_saved_model(StandIn(), str(link), {"categories": CATEGORIES}, input_size=(33, 49))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(link))
    out = loaded.signatures["serving_default"](image=tf.zeros([20, 30, 3], tf.uint8))
    assert out["panoptic"].shape == (20, 30)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no staging left
