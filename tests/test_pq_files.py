"""`max-deeplab pq` / `pq_compute`: COCO panoptic files, checked against hand-computed values
and against the COCO reference evaluator (panopticapi `pq_compute_single_core`, run in its
own environment by `reference_evaluator`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from png_files import ihdr, png_bytes, png_file
from random_pq_cases import (
    Segments,
    default_categories,
    random_ground_truth,
    random_prediction,
    write_coco_pair_set,
)
from reference_evaluator import reference_pq

from max_deeplab.cli import pq as pq_cli
from max_deeplab.evaluation.coco_panoptic import PanopticEvalError, pq_compute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PERSON, CAR, DOG, CAT = 1, 2, 3, 4  # things; DOG only in GT, CAT only in predictions
SKY, GRASS, WATER = 10, 11, 12  # stuff; WATER only in predictions
CATEGORIES = [{"id": i, "name": n, "isthing": t} for i, n, t in (
    (PERSON, "person", 1), (CAR, "car", 1), (DOG, "dog", 1), (CAT, "cat", 1),
    (SKY, "sky", 0), (GRASS, "grass", 0), (WATER, "water", 0))]


def _seg(shape, parts):
    """Segments from [(category, iscrowd, [(row slice, col slice), ...]), ...] painted in order."""
    index_map = np.zeros(shape, np.int32)
    for k, (_, _, boxes) in enumerate(parts):
        for ys, xs in boxes:
            index_map[ys, xs] = k + 1
    return Segments(index_map, [p[0] for p in parts], [p[1] for p in parts])


def crafted_pairs() -> list[tuple[Segments, Segments]]:
    """Three images covering the rules; expected counts are derived in the comments."""
    s = slice
    gt_a = _seg((10, 12), [
        (SKY, False, [(s(0, 2), s(0, 12))]),                    # 24 px
        (GRASS, False, [(s(7, 10), s(0, 12))]),                 # 36 px
        (PERSON, False, [(s(2, 3), s(0, 10))]),                 # p1: 10 px, cols 10-11 void
        (PERSON, False, [(s(3, 4), s(0, 10))]),                 # p2: 10 px, cols 10-11 void
        (CAR, False, [(s(4, 5), s(0, 12))]),                    # c1: 12 px
        (CAR, True, [(s(5, 6), s(0, 6))]),                      # crowd (not the last one)
        (CAR, True, [(s(5, 6), s(6, 12))]),                     # crowd, last of its class
        (DOG, False, [(s(6, 7), s(0, 6))]),                     # d1, never predicted
    ])                                                          # row 6 cols 6-11: void
    pred_a = _seg((10, 12), [
        (SKY, False, [(s(0, 2), s(0, 12))]),                    # TP, IoU 1
        (PERSON, False, [(s(2, 3), s(0, 6)), (s(2, 3), s(10, 12))]),  # 6/(8+10-6-2) = 0.6
        (PERSON, False, [(s(3, 4), s(0, 5)), (s(3, 4), s(10, 12))]),  # 5/(7+10-5-2) = 0.5
        (CAR, False, [(s(4, 5), s(0, 7))]),                     # 7/12 > 0.5: TP
        (CAR, False, [(s(5, 6), s(0, 4))]),                     # on the first crowd: FP
        (CAR, False, [(s(5, 6), s(6, 10))]),                    # on the last crowd: ignored
        (CAT, False, [(s(6, 7), s(6, 12))]),                    # all on void: ignored
        (CAT, False, [(s(7, 8), s(0, 3))]),                     # on grass: FP
        (GRASS, False, [(s(7, 8), s(3, 12))]),                  # 9/36: FP + FN
        (WATER, False, [(s(8, 10), s(0, 12))]),                 # FP
    ])
    gt_b = _seg((10, 20), [
        (PERSON, False, [(s(0, 5), s(0, 20))]),                 # 100 px
        (CAR, False, [(s(5, 10), s(0, 20))]),                   # 100 px
    ])
    pred_b = _seg((10, 20), [
        (PERSON, False, [(s(0, 2), s(0, 20)), (s(2, 3), s(0, 11))]),  # 51/100: TP
        (CAR, False, [(s(5, 7), s(0, 20)), (s(7, 8), s(0, 10))]),     # 50/100: FP + FN
    ])
    gt_c = _seg((4, 8), [
        (SKY, False, [(s(0, 2), s(0, 8))]),                     # 16 px; row 2 void
        (CAR, True, [(s(3, 4), s(0, 2))]),                      # crowd, 2 px
        (GRASS, False, [(s(3, 4), s(2, 8))]),                   # 6 px
    ])
    pred_c = _seg((4, 8), [
        (SKY, False, [(s(0, 1), s(0, 8)), (s(1, 2), s(7, 8))]),  # 9/16: TP
        (DOG, False, [(s(1, 3), s(0, 4))]),                     # 4 of 8 on void: FP
        (CAT, False, [(s(1, 2), s(4, 7)), (s(2, 3), s(4, 8))]),  # 4 of 7 on void: ignored
        (CAR, False, [(s(3, 4), s(0, 4))]),                     # 2 of 4 on crowd: FP
        (GRASS, False, [(s(3, 4), s(4, 8))]),                   # 4/6: TP
    ])
    return [(gt_a, pred_a), (gt_b, pred_b), (gt_c, pred_c)]


def crafted_expected() -> dict:
    """Hand-computed from the comments in `crafted_pairs`: (tp, fp, fn, iou_sum) per class."""
    counts = {PERSON: (2, 1, 1, 0.6 + 0.51), CAR: (1, 3, 1, 7 / 12), DOG: (0, 1, 1, 0.0),
              CAT: (0, 1, 0, 0.0), SKY: (2, 0, 0, 1.0 + 9 / 16), GRASS: (1, 1, 1, 4 / 6),
              WATER: (0, 1, 0, 0.0)}
    per_class = {}
    for c, (tp, fp, fn, iou) in counts.items():
        d = tp + fp / 2 + fn / 2
        per_class[c] = {"pq": iou / d, "sq": iou / tp if tp else 0.0, "rq": tp / d}
    out = {"per_class": per_class}
    for name, ids in (("All", list(counts)), ("Things", [PERSON, CAR, DOG, CAT]),
                      ("Stuff", [SKY, GRASS, WATER])):
        out[name] = {k: float(np.mean([per_class[c][k] for c in ids])) for k in ("pq", "sq", "rq")}
        out[name]["n"] = len(ids)
    return out


def assert_same(ours: dict, expected: dict, tol: float = 1e-9) -> None:
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == expected[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert abs(ours[name][k] - expected[name][k]) <= tol, (name, k, ours[name],
                                                                   expected[name])
    assert {int(c) for c in ours["per_class"]} == {int(c) for c in expected["per_class"]}
    for c, r in expected["per_class"].items():
        mine = ours["per_class"][c] if c in ours["per_class"] else ours["per_class"][str(c)]
        for k in ("pq", "sq", "rq"):
            assert abs(mine[k] - r[k]) <= tol, (c, k, mine, r)


def _paths(root) -> dict:
    root = str(root)
    return {"gt_json": os.path.join(root, "gt.json"), "gt_dir": os.path.join(root, "gt"),
            "pred_json": os.path.join(root, "pred.json"), "pred_dir": os.path.join(root, "pred")}


@pytest.fixture()
def crafted(tmp_path) -> dict:
    return write_coco_pair_set(str(tmp_path), crafted_pairs(), CATEGORIES, seed=5)


def test_crafted_cases_match_hand_computed_and_reference(crafted):
    ours = pq_compute(**crafted, num_workers=1)
    assert_same(ours, crafted_expected(), tol=1e-12)
    assert_same(ours, reference_pq(crafted))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    cats = default_categories(5, 4)
    pairs = []
    for _ in range(6):
        gt = random_ground_truth(rng, 48, 64, cats, num_things=(3, 12), crowd_prob=0.25)
        pairs.append((gt, random_prediction(rng, gt, cats, max_shift=2)))
    paths = write_coco_pair_set(str(tmp_path), pairs, cats, seed=seed)
    ref = reference_pq(paths)
    ours = pq_compute(**paths, num_workers=1)
    assert_same(ours, ref)
    # A non-trivial case: matches, misses and both groups present.
    assert 0.0 < ours["All"]["pq"] < 1.0 and ours["Things"]["n"] and ours["Stuff"]["n"]


def test_cli_two_workers_json_table_and_no_tensorflow_or_numpy(tmp_path):
    rng = np.random.default_rng(7)
    cats = default_categories(4, 3)
    pairs = []
    for _ in range(12):  # enough images that two worker processes are used
        gt = random_ground_truth(rng, 40, 50, cats, num_things=(2, 8))
        pairs.append((gt, random_prediction(rng, gt, cats)))
    paths = write_coco_pair_set(str(tmp_path / "set"), pairs, cats)
    out = tmp_path / "out" / "metrics.json"
    cmd = [sys.executable, "-X", "importtime", "-m", "max_deeplab", "pq",
           "--gt_json", paths["gt_json"], "--gt_dir", paths["gt_dir"],
           "--pred_json", paths["pred_json"], "--pred_dir", paths["pred_dir"],
           "--output", str(out), "--num_workers", "2", "--per_class"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    # The importtime listing is really there, and shows the C path was taken.
    assert "max_deeplab.evaluation._png_overlap" in imported
    assert not [m for m in imported
                if m.split(".")[0] in ("tensorflow", "tf_keras", "keras", "numpy")]
    assert "All" in proc.stdout and "Things" in proc.stdout and "thing0 (" in proc.stdout
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"All", "Things", "Stuff", "per_class"}
    assert set(metrics["All"]) == {"pq", "sq", "rq", "n"}
    assert set(metrics["per_class"]) == {str(c["id"]) for c in cats}
    assert_same(metrics, reference_pq(paths))
    # Same numbers in one process (the workers' partial sums add up exactly).
    assert_same(metrics, pq_compute(**paths, num_workers=1), tol=1e-12)


# ---------------------------------------------------------------------------- bad input


def _run_cli(paths: dict, capsys) -> tuple[int, str]:
    argv = ["max-deeplab pq", "--num_workers", "1"]
    for k in ("gt_json", "gt_dir", "pred_json", "pred_dir"):
        argv += [f"--{k}", paths[k]]
    code = pq_cli.main(argv)
    return code, capsys.readouterr().err


def _edit_json(path: str, fn) -> None:
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _png_ids(path: str) -> np.ndarray:
    a = np.asarray(Image.open(path)).astype(np.int64)
    return a[..., 0] + 256 * a[..., 1] + 65536 * a[..., 2]


def _write_ids(path: str, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_error_prediction_png_segment_not_in_json(crafted, capsys):
    path = os.path.join(crafted["pred_dir"], "000001.png")
    ids = _png_ids(path)
    ids[9, 19] = 123457  # a colour no segment has
    _write_ids(path, ids)
    code, err = _run_cli(crafted, capsys)
    assert code == 1
    assert "000001.png" in err and "123457" in err and "not in the prediction JSON" in err
    with pytest.raises(PanopticEvalError, match="123457"):
        pq_compute(**crafted, num_workers=1)


def test_error_prediction_json_segment_not_in_png(crafted, capsys):
    _edit_json(crafted["pred_json"], lambda d: d["annotations"][0]["segments_info"].append(
        {"id": 4242, "category_id": PERSON}))
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "4242" in err and "no pixels" in err and "000000.png" in err


def test_error_ground_truth_png_segment_not_in_json(crafted, capsys):
    _edit_json(crafted["gt_json"], lambda d: d["annotations"][1]["segments_info"].pop())
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "ground-truth PNG" in err and "000001.png" in err


def _set_first_segment(side: str, **fields):
    def edit(d):
        d["annotations"][1]["segments_info"][0].update(fields)
    return side, edit


@pytest.mark.parametrize("side,edit,message", [
    (*_set_first_segment("gt_json", id=0), "lists segment id 0, which is reserved for void"),
    (*_set_first_segment("pred_json", id=1 << 24), "id 16777216 is outside the RGB id range"),
    (*_set_first_segment("pred_json", id="seven"),
     r"segments_info\[0\]: 'id' is 'seven'; expected an integer"),
    (*_set_first_segment("pred_json", id="7"), r"'id' is '7'; expected an integer"),
    (*_set_first_segment("pred_json", id=7.5), r"'id' is 7.5; expected an integer"),
    (*_set_first_segment("pred_json", id=True), r"'id' is True; expected an integer"),
    (*_set_first_segment("gt_json", category_id=None),
     r"segments_info\[0\]: 'category_id' is None; expected an integer"),
    (*_set_first_segment("gt_json", iscrowd="no"), r"'iscrowd' is 'no'; expected 0 or 1"),
    (*_set_first_segment("gt_json", iscrowd=float("inf")), r"'iscrowd' is inf; expected 0 or 1"),
    (*_set_first_segment("gt_json", area=[1]), r"'area' is \[1\]; expected a positive number"),
    (*_set_first_segment("gt_json", area="12"), r"'area' is '12'; expected a positive number"),
    (*_set_first_segment("gt_json", area=0), "'area' is 0; expected a positive number"),
    (*_set_first_segment("gt_json", area=float("inf")), "'area' is inf; expected a positive"),
    (*_set_first_segment("pred_json", id=float("inf")), "'id' is inf; expected an integer"),
    ("pred_json", lambda d: d["annotations"][1]["segments_info"].__setitem__(0, 5),
     r"segments_info\[0\] is 5; expected an object"),
    ("pred_json", lambda d: d["annotations"][1]["segments_info"].append(
        dict(d["annotations"][1]["segments_info"][0])), "lists segment id .* twice"),
    ("gt_json", lambda d: d["annotations"][1].pop("segments_info"),
     "has no 'segments_info' list"),
])
def test_error_bad_segments_info_names_the_image_and_segment(crafted, capsys, side, edit,
                                                            message):
    import re

    _edit_json(crafted[side], edit)
    code, err = _run_cli(crafted, capsys)
    which = "ground-truth" if side == "gt_json" else "prediction"
    assert code == 1 and f"{which} JSON" in err and "image_id 1" in err, err
    assert re.search(message, err), err


def test_error_unknown_category(crafted, capsys):
    def bad(d):
        d["annotations"][1]["segments_info"][0]["category_id"] = 999
    _edit_json(crafted["pred_json"], bad)
    code, err = _run_cli(crafted, capsys)
    sid = json.load(open(crafted["pred_json"]))["annotations"][1]["segments_info"][0]["id"]
    assert code == 1 and "unknown category_id 999" in err and str(sid) in err


def test_error_category_without_isthing(crafted, capsys):
    # The reference evaluator fails here too; taking it as stuff would misreport Things/Stuff.
    def bad(d):
        del d["categories"][0]["isthing"]
    _edit_json(crafted["gt_json"], bad)
    cid = json.load(open(crafted["gt_json"]))["categories"][0]["id"]
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and crafted["gt_json"] in err
    assert f"category id {cid} has no 'isthing'" in err


@pytest.mark.parametrize("side", ["missing_prediction", "extra_prediction", "duplicate"])
def test_error_image_sets_differ(crafted, capsys, side):
    def edit(d):
        if side == "missing_prediction":
            d["annotations"].pop(1)
        elif side == "extra_prediction":
            d["annotations"].append(dict(d["annotations"][0], image_id=77))
        else:
            d["annotations"].append(dict(d["annotations"][0]))
    _edit_json(crafted["pred_json"], edit)
    code, err = _run_cli(crafted, capsys)
    assert code == 1
    expected = {"missing_prediction": "no prediction for image_id 1",
                "extra_prediction": "image_id 77", "duplicate": "two annotations"}[side]
    assert expected in err


def test_error_size_mismatch(crafted, capsys):
    path = os.path.join(crafted["pred_dir"], "000000.png")
    _write_ids(path, _png_ids(path)[:, :-1])
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "11x10" in err and "12x10" in err and "000000.png" in err


def test_error_missing_files(crafted, capsys, tmp_path):
    os.remove(os.path.join(crafted["gt_dir"], "000001.png"))
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "PNG not found" in err and "000001.png" in err
    code, err = _run_cli(dict(crafted, pred_json=str(tmp_path / "nope.json")), capsys)
    assert code == 1 and "nope.json" in err
    code, err = _run_cli(dict(crafted, pred_dir=str(tmp_path / "nodir")), capsys)
    assert code == 1 and "nodir" in err


def test_user_error_exits_without_traceback(crafted):
    _edit_json(crafted["pred_json"], lambda d: d["annotations"].pop(0))
    cmd = [sys.executable, "-m", "max_deeplab", "pq", "--gt_json", crafted["gt_json"],
           "--gt_dir", crafted["gt_dir"], "--pred_json", crafted["pred_json"],
           "--pred_dir", crafted["pred_dir"]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "no prediction for image_id 0" in proc.stderr


def test_program_exit_keeps_output_exit_codes_and_atexit_work(crafted, tmp_path):
    """`console_main` may end a `pq` process without the interpreter's teardown: the table,
    the metrics file and the exit code must still be there, and atexit work (e.g. coverage)
    must still run."""
    out = tmp_path / "m.json"
    args = [f"--{k}={v}" for k, v in crafted.items()] + ["--num_workers=1", f"--output={out}"]
    script = ("import atexit, sys\n"
              "if sys.argv[1] == 'atexit':\n"
              "    atexit.register(lambda: print('atexit ran', flush=True))\n"
              "sys.argv = ['max-deeplab', 'pq'] + sys.argv[2:]\n"
              "from max_deeplab.__main__ import console_main\n"
              "console_main()\n")
    for mode in ("plain", "atexit"):
        proc = subprocess.run([sys.executable, "-c", script, mode, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Things" in proc.stdout and f"metrics written to {out}" in proc.stdout
        assert ("atexit ran" in proc.stdout) == (mode == "atexit")
        assert json.loads(out.read_text())["All"]["n"] > 0
        out.unlink()
    proc = subprocess.run([sys.executable, "-c", script, "plain", *args, "--num_workers=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--num_workers" in proc.stderr


def test_missing_flags_is_a_usage_error(capsys):
    assert pq_cli.main(["max-deeplab pq", "--gt_json", "x.json"]) == 2
    assert "--gt_dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--num_workers", "0"], "--num_workers: expected an integer >= 1, got 0"),
    (["--num_workers=two"], "expected an integer >= 1, got 'two'"),
    (["--gt_jsn", "x.json"], "unrecognized arguments: --gt_jsn"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(capsys, argv, message):
    assert pq_cli.main(["max-deeplab pq", *argv]) == 2
    assert message in capsys.readouterr().err


def test_help_and_flag_spellings(crafted, capsys):
    assert pq_cli.main(["max-deeplab pq", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--pred_dir" in out and "--gt_dir panoptic_val/ \\\n" in out
    argv = ["max-deeplab pq", "--num_workers=1"] + [f"--{k}={v}" for k, v in crafted.items()]
    assert pq_cli.main(argv + ["--per_class"]) == 0
    with_classes = capsys.readouterr().out
    assert pq_cli.main(argv + ["--per_class", "--noper_class"]) == 0
    without = capsys.readouterr().out
    assert "person" in with_classes and "person" not in without
    for value, shown in (("true", True), ("1", True), ("false", False), ("no", False)):
        assert pq_cli.main(argv + [f"--per_class={value}"]) == 0
        assert ("person" in capsys.readouterr().out) == shown
    assert pq_cli.main(argv + ["--per_class=maybe"]) == 2
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err
    assert pq_cli.main(["max-deeplab pq", "--helpshort"]) == 0
    assert "--noper_class" in capsys.readouterr().out


def test_rgba_pngs_read_like_the_reference_and_gray_pngs_rejected(crafted, capsys):
    expected = pq_compute(**crafted, num_workers=1)
    # RGBA: the alpha channel is ignored, as by the reference evaluator.
    for d in (crafted["gt_dir"], crafted["pred_dir"]):
        for name in os.listdir(d):
            Image.open(os.path.join(d, name)).convert("RGBA").save(os.path.join(d, name))
    assert_same(pq_compute(**crafted, num_workers=1), expected, tol=0.0)
    assert_same(reference_pq(crafted), expected)
    # Single channel: not the format (the reference crashes on it): a clear error.
    path = os.path.join(crafted["pred_dir"], "000002.png")
    Image.open(path).convert("L").save(path)
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "000002.png" in err and "expected an RGB panoptic PNG" in err


# ------------------------------------------------------------------------- PNG decoding

@pytest.mark.parametrize("depth,channels,interlaced", [
    (8, 3, False), (8, 4, False), (16, 3, False), (16, 4, False), (8, 3, True), (16, 4, True)])
def test_png_variants_decode_to_the_ids_pillow_reads(tmp_path, depth, channels, interlaced):
    from max_deeplab.evaluation.numpy_png_overlap import read_png_rgb

    rng = np.random.default_rng(depth + channels + interlaced)
    h, w = 13, 11  # odd sizes: partial Adam7 blocks, a last pixel at an odd byte offset
    top = 256 if depth == 8 else 65536
    samples = rng.integers(0, top, (h, w, channels)).astype(np.uint8 if depth == 8 else np.uint16)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(samples, 2 if channels == 3 else 6, interlaced))
    high = samples[..., :3].astype(np.int64) >> (depth - 8)  # Pillow keeps the high byte
    expected = high[..., 0] + 256 * high[..., 1] + 65536 * high[..., 2]
    rgb = read_png_rgb(str(path))
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    ids = rgb.astype(np.int64)
    np.testing.assert_array_equal(ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2], expected)
    np.testing.assert_array_equal(expected, _png_ids(str(path)))  # what the reference reads


@pytest.mark.parametrize("shape,block", [
    ((1, 1), None), ((1, 2), None), ((1, 3), None), ((2, 3), None), ((7, 5), None),
    ((16, 16), None),
    # Blocks of a few pixels: runs that cross block boundaries, a last block of one pixel.
    ((7, 5), 1), ((7, 5), 2), ((7, 5), 5), ((16, 16), 17), ((16, 16), 255)])
def test_pair_runs_match_a_direct_computation(shape, block, monkeypatch):
    from max_deeplab.evaluation import numpy_png_overlap
    from max_deeplab.evaluation.numpy_png_overlap import pair_runs

    if block is not None:
        monkeypatch.setattr(numpy_png_overlap, "_RUN_BLOCK_PIXELS", block)
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    # Few distinct ids, some differing in one byte only (R, G or B), so runs form and every
    # byte position can be the only one that changes.
    palette = np.array([0, 1, 256, 65536, 0xFFFFFF, 0x010203, 0x010204, 0x020203], np.int64)
    ids = [palette[rng.integers(0, len(palette), shape)] for _ in range(2)]
    for m in ids:  # make some horizontal runs
        m[:, 1::2] = m[:, ::2][:, : m[:, 1::2].shape[1]]
    rgbs = [np.stack([m % 256, m // 256 % 256, m // 65536], -1).astype(np.uint8) for m in ids]
    starts, lengths, gt_run, pred_run = pair_runs(*rgbs)
    g, p = ids[0].reshape(-1), ids[1].reshape(-1)
    want = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (p[1:] != p[:-1])])
    np.testing.assert_array_equal(starts, want)
    np.testing.assert_array_equal(lengths, np.diff(np.r_[want, g.size]))
    np.testing.assert_array_equal(gt_run, g[want])
    np.testing.assert_array_equal(pred_run, p[want])


def test_error_corrupt_truncated_and_palette_pngs(crafted, capsys):
    path = os.path.join(crafted["pred_dir"], "000001.png")
    good = open(path, "rb").read()
    idat = good.index(b"IDAT")
    for bad, message in ((good[:idat + 8] + bytes([good[idat + 8] ^ 1]) + good[idat + 9:],
                          "CRC mismatch in chunk 'IDAT'"),
                         (good[:idat + 20], "truncated"),
                         (b"GIF89a" + good[6:], "not a PNG file")):
        with open(path, "wb") as f:
            f.write(bad)
        code, err = _run_cli(crafted, capsys)
        assert code == 1 and "000001.png" in err and message in err, err
    with open(path, "wb") as f:
        f.write(good)
    Image.open(path).convert("P").save(path)
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "000001.png" in err and "palette" in err
    assert "expected an RGB panoptic PNG" in err


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4)])
def test_error_malformed_pngs_with_valid_crcs(tmp_path, color_type, channels):
    """Errors the CRC check cannot see reach the decoders and come back as a clear error."""
    import zlib

    from max_deeplab.evaluation.numpy_png_overlap import read_png_rgb

    header = ihdr(5, 6, 8, color_type)
    row = 1 + 5 * channels
    cases = {
        "bad filter": (header, zlib.compress(b"\x07" + bytes(row - 1) + bytes(5 * row)),
                       "cannot decode PNG"),
        "short data": (header, zlib.compress(bytes(2 * row)), "cannot decode PNG"),
        "not zlib": (header, b"not a zlib stream", "cannot decode PNG"),
        # A header claiming 10^5 x 10^5 pixels for a few bytes of data: refused before any
        # decoder allocates ~30 GB for it.
        "huge header": (ihdr(100_000, 100_000, 8, color_type), zlib.compress(bytes(row)),
                        "more than its"),
    }
    for name, (header_bytes, compressed, message) in cases.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(png_file(header_bytes, compressed))
        with pytest.raises(PanopticEvalError, match=message):
            read_png_rgb(str(path))
    path = tmp_path / "good.png"
    path.write_bytes(png_file(header, zlib.compress(bytes(6 * row))))
    assert read_png_rgb(str(path)).shape == (6, 5, 3)


# ------------------------------------------------------------------ worker processes


def _many_pairs(root, n: int = 12, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    cats = default_categories(4, 3)
    pairs = []
    for _ in range(n):
        gt = random_ground_truth(rng, 30, 40, cats, num_things=(2, 6))
        pairs.append((gt, random_prediction(rng, gt, cats)))
    return write_coco_pair_set(str(root), pairs, cats, seed=seed)


def test_workers_report_the_first_bad_image_in_input_order(tmp_path):
    paths = _many_pairs(tmp_path)
    expected = pq_compute(**paths, num_workers=1)
    assert_same(pq_compute(**paths, num_workers=3), expected, tol=1e-12)
    # Two bad images: whichever process meets which first, the message names the earlier one,
    # as a single-process run does.
    for k in (3, 9):
        p = os.path.join(paths["pred_dir"], f"{k:06d}.png")
        ids = _png_ids(p)
        ids[0, 0] = 424242 + k
        _write_ids(p, ids)
    for workers in (1, 2, 3):
        with pytest.raises(PanopticEvalError, match="000003.png.*424245"):
            pq_compute(**paths, num_workers=workers)


def test_a_crashing_worker_is_reported_not_ignored(tmp_path, monkeypatch):
    import time

    from max_deeplab.evaluation import coco_panoptic

    paths = _many_pairs(tmp_path)
    parent = os.getpid()
    real = coco_panoptic.evaluate_image

    def flaky(job, stats):
        if os.getpid() != parent:  # only in the forked child
            raise ValueError("simulated bug in a worker")
        time.sleep(0.02)  # leave the child some images to take
        real(job, stats)

    monkeypatch.setattr(coco_panoptic, "evaluate_image", flaky)
    with pytest.raises(RuntimeError, match="simulated bug in a worker"):
        pq_compute(**paths, num_workers=2)


# ------------------------------------------------------------------- issue 22: bad input


@pytest.mark.parametrize("side, edit, message", [
    ("pred_json", lambda d: d["annotations"].__setitem__(1, "000001.png"),
     r"annotations\[1\] is '000001.png'; expected an object"),
    ("gt_json", lambda d: d["annotations"].__setitem__(0, None),
     r"annotations\[0\] is None; expected an object"),
    ("pred_json", lambda d: d["annotations"][1].update(image_id=[1]),
     r"annotations\[1\]: 'image_id' is \[1\]; expected an integer or a string"),
    ("gt_json", lambda d: d["annotations"][2].update(image_id={"id": 2}),
     r"annotations\[2\]: 'image_id' is \{'id': 2\}; expected an integer or a string"),
    ("gt_json", lambda d: d["annotations"][2].pop("image_id"),
     r"annotations\[2\]: 'image_id' is missing"),
])
def test_error_malformed_annotation_is_named(crafted, capsys, side, edit, message):
    import re

    _edit_json(crafted[side], edit)
    code, err = _run_cli(crafted, capsys)
    which = "ground-truth" if side == "gt_json" else "prediction"
    assert code == 1 and f"{which} JSON {crafted[side]}" in err, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_png_named_by_the_json_must_be_a_regular_file(crafted, capsys):
    path = os.path.join(crafted["pred_dir"], "000001.png")
    os.remove(path)
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    code, err = _run_cli(crafted, capsys)
    assert code == 1
    assert f"cannot read PNG {path}: not a regular file but a FIFO" in err


def test_nothing_evaluated_is_an_error(crafted, capsys):
    for side in ("gt_json", "pred_json"):
        _edit_json(crafted[side], lambda d: d.update(annotations=[]))
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "nothing to evaluate" in err and crafted["gt_json"] in err


def test_no_category_counted_is_an_error(crafted, capsys):
    """Images, but every ground-truth segment a crowd and no prediction: PQ would be 0 over
    no category at all."""
    def all_crowd(d):
        for ann in d["annotations"]:
            for seg in ann["segments_info"]:
                seg["iscrowd"] = 1
    _edit_json(crafted["gt_json"], all_crowd)
    _edit_json(crafted["pred_json"], lambda d: [a.update(segments_info=[])
                                                for a in d["annotations"]])
    for name in os.listdir(crafted["pred_dir"]):
        path = os.path.join(crafted["pred_dir"], name)
        _write_ids(path, np.zeros_like(_png_ids(path)))
    code, err = _run_cli(crafted, capsys)
    assert code == 1 and "no category" in err and "nothing was evaluated" in err


@pytest.mark.parametrize("output, expected", [
    ("{tmp}/a_file/metrics.json", "{tmp}/a_file is a file, not a directory"),
    ("{tmp}/a_file/sub/metrics.json", "{tmp}/a_file/sub cannot be created: {tmp}/a_file is a file"),
    ("{tmp}", "{tmp} is a directory"),
])
def test_output_location_is_checked_before_evaluating(crafted, capsys, tmp_path, monkeypatch,
                                                      output, expected):
    from max_deeplab.evaluation import coco_panoptic

    (tmp_path / "a_file").write_text("keep")
    monkeypatch.setattr(coco_panoptic, "build_jobs", lambda *a: pytest.fail("evaluated"))
    output, expected = (v.format(tmp=tmp_path) for v in (output, expected))
    argv = ["max-deeplab pq", f"--output={output}"] + [f"--{k}={v}" for k, v in crafted.items()]
    assert pq_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output {output}: {expected}" in err and "File exists" not in err, err
    assert (tmp_path / "a_file").read_text() == "keep"
