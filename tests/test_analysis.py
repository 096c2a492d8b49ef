"""`max-deeplab analyze` (paper appendix A.3-A.5): slot statistics against numpy loops, the
feature and attention colourings, and the verb on the tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from max_deeplab.analysis.attention_maps import (
    attention_intensity,
    colorize_attention,
    largest_segment_slots,
)
from max_deeplab.analysis.decoder_features import FeatureDimensionError, feature_rgb
from max_deeplab.analysis.predictions import ImagePrediction, crop_to_image
from max_deeplab.analysis.slot_statistics import NEVER, SlotStatistics, unit_square
from max_deeplab.cli import analyze


def test_unit_square_is_the_area_average():
    rng = np.random.default_rng(0)
    mask = rng.random((12, 20)) > 0.5
    # Dividing evenly: block means.
    np.testing.assert_allclose(unit_square(mask, 4), mask.reshape(4, 3, 4, 5).mean(axis=(1, 3)))
    # Not dividing evenly: the integral over each cell, by sub-sampling every pixel 15 x 15.
    fine = np.kron(mask.astype(float), np.ones((15, 15)))  # [180, 300]: 7 rows -> 180 / 7
    got = unit_square(mask, 7)
    rows = np.linspace(0, 180, 8)
    cols = np.linspace(0, 300, 8)
    for i in range(7):
        for j in range(7):
            cell = fine[int(round(rows[i])):int(round(rows[i + 1])),
                        int(round(cols[j])):int(round(cols[j + 1]))]
            assert got[i, j] == pytest.approx(cell.mean(), abs=0.03)
    assert unit_square(np.ones((5, 9)), 3) == pytest.approx(np.ones((3, 3)))


def test_slot_statistics_equal_loops():
    rng = np.random.default_rng(1)
    num_slots, num_classes, size = 6, 4, 4
    stats = SlotStatistics(num_slots, num_classes, unit_size=size)
    firings = np.zeros(num_slots, int)
    joint = np.zeros((num_slots, num_classes), int)
    sums = np.zeros((num_slots, size, size))
    for _ in range(9):
        slot = rng.integers(-1, 4, (8, 12))  # slots 4 and 5 never fire
        slot[rng.random(slot.shape) < 0.3] = -1
        classes = rng.integers(0, num_classes, num_slots)
        stats.add(slot, classes)
        for s in range(num_slots):
            if (slot == s).any():
                firings[s] += 1
                joint[s, classes[s]] += 1
                block = (slot == s).reshape(size, 2, size, 3).mean(axis=(1, 3))
                sums[s] += block
    np.testing.assert_array_equal(stats.firings, firings)
    np.testing.assert_array_equal(stats.joint, joint)
    masks = stats.average_masks()
    for s in range(4):
        np.testing.assert_allclose(masks[s], sums[s] / firings[s])
    assert np.isnan(masks[4]).all() and np.isnan(masks[5]).all()
    groups = stats.frequency_groups()
    assert groups[NEVER] == [4, 5]
    fired = groups["frequent"] + groups["medium"] + groups["rare"]
    assert sorted(fired) == [0, 1, 2, 3] and len(groups["frequent"]) == 2
    assert [firings[s] for s in fired] == sorted(firings[:4], reverse=True)
    data = stats.to_json([f"c{i}" for i in range(num_classes)])
    assert data["firings"] == firings.tolist() and data["slot_class_firings"] == joint.tolist()
    assert data["average_masks"][4] is None and len(data["average_masks"][0]) == size
    json.dumps(data)  # plain JSON


def test_feature_rgb_maps_the_unit_sphere_to_colours():
    g = np.array([[[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]])
    np.testing.assert_array_equal(feature_rgb(g), [[[255, 128, 128], [128, 0, 128],
                                                    [128, 128, 255]]])
    with pytest.raises(FeatureDimensionError, match="D = 32 channels.*D = 3"):
        feature_rgb(np.zeros((2, 2, 32)))


def test_attention_intensity_and_colours():
    maps = np.full((2, 4, 5), 1 / 20)  # uniform: no colour
    maps[1] = 0.0
    maps[1, 2, 3] = 1.0  # all of slot 1's attention on one position: 20x uniform
    maps[0, 0, 0] = 4 / 20  # slot 0: 4x uniform there
    intensity = attention_intensity(maps)
    assert intensity[1, 2, 3] == pytest.approx(1.0)
    assert intensity[0, 0, 0] == pytest.approx(np.log(4) / np.log(20))
    assert intensity[0, 1, 1] == 0.0 and intensity[1, 0, 0] == 0.0
    # A flat head (at most 4x uniform) is measured against 10x: it stays faint.
    assert attention_intensity(maps[:1]).max() == pytest.approx(np.log(4) / np.log(10))
    image = np.full((40, 50, 3), 200, np.uint8)
    colored = colorize_attention(image, maps, colors=[(255, 0, 0), (0, 0, 255)])
    # Near slot 1's position the blue dominates; far from both, the darkened grey image.
    y, x = int(2 * 39 / 3), int(3 * 49 / 4)
    assert colored[y, x, 2] > 180 and colored[y, x, 0] < 60
    assert tuple(colored[39, 0]) == (70, 70, 70)


def _prediction(panoptic: np.ndarray, slot: np.ndarray, slot_classes) -> ImagePrediction:
    return ImagePrediction(image=np.zeros((*panoptic.shape, 3), np.uint8), panoptic=panoptic,
                           slot=slot, slot_classes=np.asarray(slot_classes),
                           pixel_feature=np.zeros((2, 2, 3)), m2p_attention=None,
                           input_fraction=(1.0, 1.0))


def test_largest_segment_slots_alternate_things_and_stuff():
    # Stuff class 2 (two slots: 0 owns more of it), things of class 0 (slots 3, 4, 5).
    slot = np.full((10, 10), -1)
    slot[:6] = 0
    slot[:2, :3] = 1
    slot[6:, :4] = 3
    slot[6:, 4:6] = 4
    slot[6:7, 6:7] = 5
    panoptic = np.where(slot >= 0, 0, 0)
    panoptic[slot <= 1] = 3 * 256
    panoptic[slot == -1] = 0
    for s in (3, 4, 5):
        panoptic[slot == s] = 1 * 256 + s + 1
    classes = [2, 2, 0, 0, 0, 0]
    is_thing = [True, False, False]
    prediction = _prediction(panoptic, slot, classes)
    assert largest_segment_slots(prediction, is_thing, 4) == [3, 0, 4, 5]
    assert largest_segment_slots(prediction, is_thing, 2) == [3, 0]


def test_crop_to_image_on_the_stride_grid():
    feature = np.arange(9 * 11).reshape(9, 11)
    # 33 x 41 input (stride 4: 9 x 11), the image covers 21 x 41 of it: rows 0..20 -> 0..5.
    assert crop_to_image(feature, (20 / 32, 1.0)).shape == (6, 11)
    assert crop_to_image(feature, (1.0, 1.0)).shape == (9, 11)


# --- the verb ---------------------------------------------------------------------------


def test_analyze_help_and_usage_errors(capsys, tmp_path):
    assert analyze.main(["max-deeplab analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("slots", "features", "attention", "--checkpoint", "--slots"):
        assert name in out
    assert analyze.main(["max-deeplab analyze"]) == 2
    assert "name the analysis first" in capsys.readouterr().err
    assert analyze.main(["max-deeplab analyze", "colours"]) == 2
    assert "unknown analysis 'colours'; expected one of slots, features, attention" in (
        capsys.readouterr().err)
    assert analyze.main(["max-deeplab analyze", "slots", "--images", "x"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert analyze.main(["max-deeplab analyze", "slots", "--checkpoint", str(tmp_path),
                         "--images", str(tmp_path / "*.jpg"), "--output_dir",
                         str(tmp_path / "out")]) == 2
    assert "no files match --images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny-config checkpoint (random weights), its categories and two images."""
    import tensorflow as tf

    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    root = tmp_path_factory.mktemp("tiny_run")
    parse_config(["tiny.gin"], [])
    model = build_model()
    tf.train.Checkpoint(model=model).save(str(root / "ckpt" / "ckpt"))
    cats = [{"id": 10 + i, "name": f"c{i}", "isthing": int(i < 4)} for i in range(8)]
    (root / "meta.json").write_text(json.dumps({"categories": cats}))
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a", (65, 97)), ("b", (50, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / f"{name}.png")
    return root


# Thresholds off, so that the untrained model's slots yield segments to analyse.
_LOOSE = ["--gin_bindings", "postprocess.class_threshold = 0.0", "--gin_bindings",
          "postprocess.pixel_threshold = 0.0", "--gin_bindings",
          "postprocess.thing_area_limit = 0", "--gin_bindings", "postprocess.stuff_area_limit = 0"]


def _analyze(tiny_run, analysis: str, *extra: str) -> int:
    return analyze.main(["max-deeplab analyze", analysis, "--checkpoint",
                         str(tiny_run / "ckpt"), "--gin_file", "tiny.gin", "--metadata",
                         str(tiny_run / "meta.json"), "--images", str(tiny_run / "*.png"),
                         "--output_dir", str(tiny_run / "out"), *_LOOSE, *extra])


@pytest.mark.slow  # builds the tiny model three times (~1 min)
def test_analyze_on_the_tiny_model(tiny_run, capsys):
    assert _analyze(tiny_run, "slots") == 0
    out = tiny_run / "out"
    data = json.loads((out / "slot_statistics.json").read_text())
    assert data["num_images"] == 2 and data["num_slots"] == 16
    assert sum(data["firings"]) >= 2  # each image has at least one segment
    assert data["class_names"] == [f"c{i}" for i in range(8)]
    for name in ("slot_class_firings.png", "slot_average_masks.png"):
        assert Image.open(out / name).size[0] > 100

    assert _analyze(tiny_run, "attention", "--slots", "0,3") == 0
    picture = Image.open(out / "attention" / "a.png")
    assert picture.size[0] > 3 * 97  # the masks and 8 heads, three per row
    assert (out / "attention" / "b.png").is_file()

    # The tiny config has D = 32: features says what it needs before building anything.
    capsys.readouterr()
    assert _analyze(tiny_run, "features") == 2
    assert "needs a model with D = 3 mask channels; this config has MaXDeepLab.mask_dim = 32" \
        in capsys.readouterr().err
    assert _analyze(tiny_run, "attention", "--slots", "3,16") == 2
    assert "--slots: [16] not among the model's 16 mask slots" in capsys.readouterr().err


@pytest.mark.slow  # trains nothing: a D = 3 tiny model with random weights (~20 s)
def test_analyze_features_on_a_d3_model(tmp_path):
    import tensorflow as tf

    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    parse_config(["tiny.gin"], ["MaXDeepLab.mask_dim = 3"])
    tf.train.Checkpoint(model=build_model()).save(str(tmp_path / "ckpt" / "ckpt"))
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i < 4)} for i in range(8)]
    (tmp_path / "meta.json").write_text(json.dumps({"categories": cats}))
    Image.fromarray(np.full((65, 97, 3), 90, np.uint8)).save(tmp_path / "img.png")
    code = analyze.main(["max-deeplab analyze", "features", "--checkpoint",
                         str(tmp_path / "ckpt"), "--gin_file", "tiny.gin", "--gin_bindings",
                         "MaXDeepLab.mask_dim = 3", "--metadata", str(tmp_path / "meta.json"),
                         "--images", str(tmp_path / "img.png"), "--output_dir",
                         str(tmp_path / "out")])
    assert code == 0
    picture = np.asarray(Image.open(tmp_path / "out" / "features" / "img.png"))
    assert picture.shape[1] >= 3 * 97  # image | g as RGB | panoptic
