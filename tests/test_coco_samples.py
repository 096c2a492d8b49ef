"""Real COCO data (data/samples/coco_val2017: two val2017 photos, 18 and 32 segments, crowd
regions, the 133 categories) through the tools: `convert` -> `decode_example` reproduces the
PNGs, `pq` equals the COCO reference evaluator on perturbed predictions of them, `predict`
runs on the photos at their real sizes, `overlay` draws them.

Expected values come from numpy/Pillow reading of the files and from the reference
evaluator (panopticapi, `reference_evaluator.reference_pq`)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from coco_samples import (
    GT_JSON,
    IMAGES_DIR,
    PANOPTIC_DIR,
    annotations,
    photo,
    segment_id_map,
)
from PIL import Image
from random_pq_cases import (
    Segments,
    random_prediction,
    segments_to_coco,
    write_png_ids,
)
from reference_evaluator import reference_pq
from test_pq_files import assert_same

from max_deeplab.cli import pq as pq_cli
from max_deeplab.data import IGNORE_PANOPTIC, decode_example, load_metadata
from max_deeplab.data.converter import convert

SIZES = {142238: (427, 640), 439180: (360, 640)}  # image_id -> (H, W)


def test_samples_are_what_the_readme_says():
    data = annotations()
    assert len(data["categories"]) == 133
    assert sum(c["isthing"] for c in data["categories"]) == 80
    counts = {a["image_id"]: (len(a["segments_info"]),
                              sum(s["iscrowd"] for s in a["segments_info"]))
              for a in data["annotations"]}
    assert counts == {142238: (18, 1), 439180: (32, 2)}
    for image in data["images"]:
        assert photo(image["file_name"]).shape[:2] == SIZES[image["id"]]
        assert image["license"] in (1, 2)  # CC BY-NC-SA 2.0 / CC BY-NC 2.0 (README)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("coco") / "val")
    convert(GT_JSON, IMAGES_DIR, PANOPTIC_DIR, prefix, num_shards=1, num_workers=1,
            log=lambda line: None)
    return prefix


def test_convert_then_decode_reproduces_every_segment_with_the_metadata_classes(converted):
    """Each non-crowd segment's exact pixel set, with class = the metadata's contiguous id
    of its COCO category and an instance id unique per class (0 for stuff); crowd and void
    pixels are IGNORE_PANOPTIC; the JPEG is stored unchanged."""
    data = annotations()
    metadata = load_metadata(converted + "-*.tfrecord")
    assert metadata["num_classes"] == 133 and len(metadata["thing_classes"]) == 80
    contiguous = {c["id"]: c["contiguous_id"] for c in metadata["categories"]}
    # As the metadata says: contiguous ids follow the sorted COCO ids, things are COCO's.
    assert [contiguous[c] for c in sorted(contiguous)] == list(range(133))
    isthing = {c["id"]: bool(c["isthing"]) for c in data["categories"]}
    assert {contiguous[c] for c, t in isthing.items() if t} == set(metadata["thing_classes"])
    by_id = {a["image_id"]: a for a in data["annotations"]}
    names = {i["id"]: i["file_name"] for i in data["images"]}

    records = list(tf.data.TFRecordDataset(glob.glob(converted + "-*.tfrecord")))
    assert len(records) == 2
    for raw in records:
        out = decode_example(raw)
        image_id = int(out["image_id"])
        ann = by_id[image_id]
        stored = tf.train.Example.FromString(raw.numpy()).features.feature
        with open(os.path.join(IMAGES_DIR, names[image_id]), "rb") as f:
            jpeg = f.read()
        assert stored["image/encoded"].bytes_list.value[0] == jpeg
        image = out["image"].numpy()
        assert image.shape == (*SIZES[image_id], 3)
        np.testing.assert_array_equal(image, tf.io.decode_jpeg(jpeg).numpy())
        # Pillow's decoder (other IDCT) agrees up to rounding.
        assert np.abs(image.astype(int) - photo(names[image_id])).mean() < 3.0

        ids = segment_id_map(ann["file_name"])
        panoptic = out["panoptic"].numpy()
        assert panoptic.shape == SIZES[image_id]
        labelled = np.zeros(ids.shape, bool)
        values = set()
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert mask.sum() == seg["area"]
            if seg["iscrowd"]:
                assert (panoptic[mask] == IGNORE_PANOPTIC).all()
                continue
            value = int(panoptic[mask][0])
            np.testing.assert_array_equal(panoptic == value, mask)
            assert value // metadata["label_divisor"] == contiguous[seg["category_id"]]
            assert (value % metadata["label_divisor"] > 0) == isthing[seg["category_id"]]
            assert value not in values
            values.add(value)
            labelled |= mask
        assert (panoptic[~labelled] == IGNORE_PANOPTIC).all()
        assert len(values) == sum(1 - s["iscrowd"] for s in ann["segments_info"])
        classes = out["segment_class"].numpy().tolist()
        assert classes == [contiguous[s["category_id"]] for s in ann["segments_info"]]


# ------------------------------------------------------------------------- pq parity


def _ground_truth_segments(ann: dict) -> tuple[Segments, list[int]]:
    """The real PNG as `Segments` (index k + 1 = segments_info[k]) and the COCO ids."""
    ids = segment_id_map(ann["file_name"])
    index_map = np.zeros(ids.shape, np.int32)
    for k, seg in enumerate(ann["segments_info"]):
        index_map[ids == seg["id"]] = k + 1
    infos = ann["segments_info"]
    return (Segments(index_map, [s["category_id"] for s in infos],
                     [bool(s["iscrowd"]) for s in infos]), [s["id"] for s in infos])


def _largest(gt: Segments, category: int, n: int) -> list[int]:
    """Indices of the n largest non-crowd segments of `category`."""
    areas = np.bincount(gt.index_map.ravel(), minlength=len(gt.category) + 1)[1:]
    ks = [k for k, c in enumerate(gt.category) if c == category and not gt.iscrowd[k]]
    return sorted(ks, key=lambda k: -areas[k])[:n]


def _perturbed(gt: Segments, kind: str, rng: np.random.Generator, categories: list[dict]
               ) -> Segments:
    """A prediction of the real ground truth with one kind of error (or all at random)."""
    ids = {c["name"]: c["id"] for c in categories}
    is_stuff = {c["id"]: not c["isthing"] for c in categories}
    if kind == "random":  # shift, drops, relabels, splits, FP blobs, blobs on crowd regions
        return random_prediction(rng, gt, categories, max_shift=4)
    index_map = gt.index_map.copy()
    category = list(gt.category)
    persons = _largest(gt, ids["person"], 4)
    stuff = [k for k, c in enumerate(category) if is_stuff[c]]
    if kind == "dropped":  # two persons and the largest stuff segment -> void (FN)
        areas = np.bincount(gt.index_map.ravel(), minlength=len(category) + 1)[1:]
        for k in persons[:2] + [max(stuff, key=lambda k: areas[k])]:
            index_map[index_map == k + 1] = 0
    elif kind == "merged":  # pairs of persons merged, and all stuff merged into the first
        for a, b in ((persons[0], persons[1]), (persons[2], persons[3])):
            index_map[index_map == b + 1] = a + 1
        for k in stuff[1:]:
            index_map[index_map == k + 1] = stuff[0] + 1
    elif kind == "relabelled":  # persons -> horse/dog, a stuff class -> another one
        category[persons[0]] = ids["horse"]
        category[persons[1]] = ids["dog"]
        category[stuff[0]] = ids["playingfield"]
    elif kind == "shifted":  # the whole map moved by 7 rows and 9 columns
        index_map = np.roll(index_map, (7, -9), axis=(0, 1))
    # Crowd regions become ordinary segments of their class in a prediction.
    present = np.bincount(index_map.ravel(), minlength=len(category) + 1)[1:] > 0
    keep = np.flatnonzero(present)
    remap = np.zeros(len(category) + 1, np.int32)
    remap[keep + 1] = np.arange(1, keep.size + 1)
    return Segments(remap[index_map], [category[k] for k in keep], [False] * keep.size)


def _write_predictions(root: str, kind: str, seed: int) -> dict:
    data = annotations()
    rng = np.random.default_rng(seed)
    pred_dir = os.path.join(root, "pred")
    os.makedirs(pred_dir, exist_ok=True)
    anns = []
    for ann in data["annotations"]:
        gt, _ = _ground_truth_segments(ann)
        pred = _perturbed(gt, kind, rng, data["categories"])
        coco, id_map = segments_to_coco(rng, pred, ann["image_id"], ann["file_name"],
                                        with_area=False)
        write_png_ids(os.path.join(pred_dir, ann["file_name"]), id_map)
        anns.append(coco)
    pred_json = os.path.join(root, "pred.json")
    with open(pred_json, "w") as f:
        json.dump({"annotations": anns}, f)
    return {"gt_json": GT_JSON, "gt_dir": PANOPTIC_DIR, "pred_json": pred_json,
            "pred_dir": pred_dir}


@pytest.mark.parametrize("kind,seed", [("dropped", 0), ("merged", 0), ("relabelled", 0),
                                       ("shifted", 0), ("random", 1), ("random", 2)])
def test_pq_on_the_real_pngs_equals_the_reference(tmp_path, kind, seed):
    paths = _write_predictions(str(tmp_path), kind, seed)
    output = tmp_path / "metrics.json"
    code = pq_cli.main(["max-deeplab pq", "--num_workers", "1", "--output", str(output),
                        *[arg for k, v in paths.items() for arg in (f"--{k}", v)]])
    assert code == 0
    ours = json.loads(output.read_text())
    reference = reference_pq(paths)
    assert_same(ours, reference, tol=1e-9)
    # Each perturbation costs quality but not all of it (random relabelling to any of the
    # 133 classes adds false-positive classes: N up to 17).
    assert 0.1 < ours["All"]["pq"] < 0.995
    assert ours["Things"]["n"] >= 4 and ours["Stuff"]["n"] >= 3


def test_pq_of_the_ground_truth_against_itself_is_perfect(tmp_path):
    output = tmp_path / "metrics.json"
    code = pq_cli.main(["max-deeplab pq", "--gt_json", GT_JSON, "--gt_dir", PANOPTIC_DIR,
                        "--pred_json", GT_JSON, "--pred_dir", PANOPTIC_DIR,
                        "--output", str(output)])
    assert code == 0
    ours = json.loads(output.read_text())
    # person, sports ball, truck, horse; tree, grass, sky, gravel.
    assert ours["Things"]["n"] == 4 and ours["Stuff"]["n"] == 4
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["pq"] == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------ predict / overlay


def _predict_photos(saved_model, out_dir, capsys) -> dict[int, tuple[np.ndarray, list[dict]]]:
    """`predict` on both photos (image ids from the GT JSON). Checks what every run must
    give: a panoptic PNG at the photo's size whose ids are those of its segments_info, and
    an overlay with the photo drawn on and a legend below; the reference evaluator accepts
    the results. Returns image_id -> (segment-id map, segments_info)."""
    from max_deeplab.cli import predict

    code = predict.main(["max-deeplab predict", "--saved_model", str(saved_model),
                         "--images", os.path.join(IMAGES_DIR, "*.jpg"),
                         "--output_dir", str(out_dir), "--images_json", GT_JSON])
    assert code == 0, capsys.readouterr().err
    with open(out_dir / "predictions.json") as f:
        pred = json.load(f)
    assert {a["image_id"] for a in pred["annotations"]} == set(SIZES)
    out = {}
    for ann in pred["annotations"]:
        height, width = SIZES[ann["image_id"]]
        png = np.asarray(Image.open(out_dir / "panoptic" / ann["file_name"])).astype(np.int64)
        assert png.shape == (height, width, 3)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert set(np.unique(ids[ids > 0]).tolist()) == {s["id"] for s in ann["segments_info"]}
        drawn = np.asarray(Image.open(out_dir / "overlays" / ann["file_name"]))
        assert drawn.shape[1] == width and drawn.shape[0] > height  # photo + legend
        original = photo(ann["file_name"].replace(".png", ".jpg"))
        assert np.abs(drawn[:height].astype(int) - original).mean() > 10
        out[ann["image_id"]] = (ids, ann["segments_info"])
    results = reference_pq({"gt_json": GT_JSON, "gt_dir": PANOPTIC_DIR,
                            "pred_json": str(out_dir / "predictions.json"),
                            "pred_dir": str(out_dir / "panoptic")})
    assert 0.0 <= results["All"]["pq"] <= 1.0
    return out


def test_predict_on_the_real_photos_at_their_real_sizes(tmp_path, capsys):
    """A SavedModel with the 133 COCO classes (the test stand-in network) on both photos:
    panoptic PNGs and overlays at 640x427 / 640x360, COCO results the reference accepts."""
    from test_export import StandIn

    from max_deeplab.inference import export_saved_model

    data = annotations()
    export_dir = tmp_path / "export"
    export_saved_model(StandIn(num_classes=133, num_slots=24), str(export_dir),
                       {"categories": data["categories"]}, input_size=(161, 241))
    valid = {c["id"] for c in data["categories"]}
    for _, segments in _predict_photos(export_dir, tmp_path / "pred", capsys).values():
        assert len(segments) >= 2
        assert {s["category_id"] for s in segments} <= valid


def test_overlay_verb_draws_ground_truth_beside_predictions(tmp_path, capsys):
    """`overlay` of the samples against themselves: one row per photo, two panels."""
    from max_deeplab.cli import overlay

    combined = tmp_path / "both.png"
    code = overlay.main(["max-deeplab overlay", "--gt_json", GT_JSON, "--gt_dir",
                         PANOPTIC_DIR, "--images_dir", IMAGES_DIR, "--pred_json", GT_JSON,
                         "--pred_dir", PANOPTIC_DIR, "--output_dir", str(tmp_path / "out"),
                         "--scale", "0.5", "--combined", str(combined)])
    assert code == 0, capsys.readouterr().err
    for image_id, (height, width) in SIZES.items():
        row = np.asarray(Image.open(tmp_path / "out" / f"{image_id:012d}.png"))
        assert row.shape[1] == 2 * (width // 2) + 4 and row.shape[0] > height // 2
        # The same files drawn the same way, under their titles.
        below_titles = row[overlay.TITLE_HEIGHT:]
        np.testing.assert_array_equal(below_titles[:, :width // 2],
                                      below_titles[:, width // 2 + 4:])
    assert Image.open(combined).mode == "P"
    code = overlay.main(["max-deeplab overlay", "--gt_json", GT_JSON, "--gt_dir",
                         PANOPTIC_DIR, "--images_dir", str(tmp_path), "--output_dir",
                         str(tmp_path / "out")])
    assert code == 2 and "cannot read" in capsys.readouterr().err


# ------------------------------------------------------------------------ slow: models


@pytest.mark.slow  # builds MaX-DeepLab-S (62M weights), exports it and runs it (~1 min)
def test_max_deeplab_s_predicts_on_the_real_photos(tmp_path, capsys):
    """The full-size MaX-DeepLab-S config (641x641, 128 slots, 133 classes), randomly
    initialised, through `export` and `predict` on the two photos at their real sizes.

    Random weights keep no slot at the paper's class threshold, so the thresholds and area
    limits are bound to 0: every pixel goes to a slot and the post-processing's argmaxes,
    stuff merging and resize back to 640x427 / 640x360 all run; the reference evaluator
    accepts the results."""
    from max_deeplab.cli import export as export_cli
    from max_deeplab.gin_config import parse_config
    from max_deeplab.model import build_model

    bindings = [f"max_deeplab.inference.postprocess.{name} = 0.0" for name in
                ("class_threshold", "pixel_threshold", "thing_area_limit", "stuff_area_limit")]
    parse_config(["max_deeplab_s_coco_641.gin"], bindings)
    model = build_model()
    assert model.output_shape["class_logits"][1:] == (128, 134)
    tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "ckpt"))
    export_dir = tmp_path / "export"
    code = export_cli.main(["max-deeplab export", "--checkpoint", str(tmp_path / "ckpt"),
                            "--export_dir", str(export_dir), "--metadata", GT_JSON,
                            "--gin_file", "max_deeplab_s_coco_641.gin",
                            *[arg for b in bindings for arg in ("--gin_bindings", b)]])
    assert code == 0, capsys.readouterr().err
    for ids, segments in _predict_photos(export_dir, tmp_path / "pred", capsys).values():
        assert (ids > 0).all()  # no threshold: every pixel belongs to a segment
        assert len(segments) >= 2
        present, counts = np.unique(ids, return_counts=True)
        assert dict(zip(present.tolist(), counts.tolist())) == {
            s["id"]: s["area"] for s in segments}


@pytest.mark.slow  # trains the tiny model for 1200 steps (~12-15 min on 2 CPU cores)
def test_overfit_script_learns_real_panoptic_segmentation(tmp_path):
    """scripts/overfit_coco_samples.sh: trained on the two photos and evaluated on them at
    their real sizes with COCO's rules, PQ >= 50 with Things and Stuff each >= 30; `pq`
    agrees with the reference evaluator on those predictions; the PQ curve is printed."""
    import subprocess

    from coco_samples import REPO

    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "overfit_coco_samples.sh"),
                           "run"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "pq.json").read_text())
    assert metrics["All"]["pq"] >= 0.5, metrics["All"]
    assert metrics["Things"]["pq"] >= 0.3, metrics["Things"]
    assert metrics["Stuff"]["pq"] >= 0.3, metrics["Stuff"]
    reference = reference_pq({"gt_json": GT_JSON, "gt_dir": PANOPTIC_DIR,
                              "pred_json": str(run / "predictions" / "predictions.json"),
                              "pred_dir": str(run / "predictions" / "panoptic")})
    assert_same(metrics, reference, tol=1e-9)
    curve = proc.stdout.split("PQ curve")[1].splitlines()[2:]
    steps = [int(line.split()[0]) for line in curve if line.strip()[:1].isdigit()]
    assert steps == list(range(100, 1201, 100))
    assert f"All {100 * metrics['All']['pq']:.1f}" in proc.stdout
    for name in ("000000142238.png", "000000439180.png"):
        assert (run / "predictions" / "overlays" / name).is_file()
        assert (run / "compare" / name).is_file()
    assert (run / "compare.png").is_file()
