"""`max-deeplab predict` (docs/design.md §6): overlays + COCO panoptic results accepted by the
reference evaluator (panopticapi, run in its own environment), unreadable images skipped."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from max_deeplab.inference.coco_results import panoptic_to_coco
from max_deeplab.panoptic_labels import id_to_rgb

TABLE = {"category_ids": [7, 9, 30], "category_names": ["a", "b", "c"],
         "label_divisor": 256, "label_offset": 1, "void_label": 0}


def test_panoptic_to_coco_segments_by_hand():
    pan = np.array([[0, 257, 257],
                    [3 * 256, 3 * 256, 258],
                    [3 * 256, 0, 258]])
    ids, infos = panoptic_to_coco(pan, TABLE, segment_scores=[0.9, 0.8, 0.0])
    # Segments in increasing panoptic value: 257 (class a, slot 0), 258 (a, slot 1), 768.
    np.testing.assert_array_equal(ids, [[0, 1, 1], [3, 3, 2], [3, 0, 2]])
    assert infos == [
        {"id": 1, "category_id": 7, "iscrowd": 0, "bbox": [1, 0, 2, 1], "area": 2,
         "score": 0.9},
        {"id": 2, "category_id": 7, "iscrowd": 0, "bbox": [2, 1, 1, 2], "area": 2,
         "score": pytest.approx(0.8)},
        {"id": 3, "category_id": 30, "iscrowd": 0, "bbox": [0, 1, 2, 2], "area": 3},
    ]
    rgb = id_to_rgb(np.array([[0, 1, 256 + 2, 65536 * 3 + 5]]))
    np.testing.assert_array_equal(rgb[0], [[0, 0, 0], [1, 0, 0], [2, 1, 0], [5, 0, 3]])
    with pytest.raises(ValueError, match="outside the 3 categories"):
        panoptic_to_coco(np.array([[5 * 256]]), TABLE)


def test_predict_cli_outputs_accepted_by_reference_evaluator(tmp_path, capsys):
    from reference_evaluator import reference_pq
    from test_export import StandIn

    from max_deeplab.cli import predict
    from max_deeplab.data.synthetic import write_dataset
    from max_deeplab.inference import export_saved_model

    data = tmp_path / "data"
    write_dataset(str(data), num_images=4, seed=0, height=64, width=80)
    with open(data / "annotations" / "panoptic_train.json") as f:
        gt = json.load(f)
    categories = gt["categories"]
    model = StandIn(num_classes=len(categories), num_slots=12)
    export_dir = tmp_path / "export"
    export_saved_model(model, str(export_dir), {"categories": categories},
                       input_size=(49, 65))
    (data / "train" / "broken.jpg").write_bytes(b"not an image")

    out_dir = tmp_path / "pred"
    code = predict.main(["max-deeplab predict", "--saved_model", str(export_dir),
                         "--images", str(data / "train" / "*.jpg"),
                         "--output_dir", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 1  # an image was skipped (the others' predictions are written)
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "[3/4]" in captured.out and "[4/4]" in captured.err  # progress; broken is last
    with open(out_dir / "predictions.json") as f:
        pred = json.load(f)
    assert len(pred["annotations"]) == len(gt["annotations"]) == 3
    assert sum(len(a["segments_info"]) for a in pred["annotations"]) >= 3
    valid_ids = {c["id"] for c in categories}
    for ann in pred["annotations"]:
        assert {s["category_id"] for s in ann["segments_info"]} <= valid_ids
        png = np.asarray(Image.open(out_dir / "panoptic" / ann["file_name"]))
        assert png.shape == (64, 80, 3)
    overlays = sorted(glob.glob(str(out_dir / "overlays" / "*.png")))
    assert len(overlays) == 3
    ov = np.asarray(Image.open(overlays[0]))
    img = np.asarray(Image.open(data / "train" / (os.path.basename(overlays[0])[:-4] + ".jpg")))
    # The photo part is aligned with the image and drawn on; the legend strip is below it.
    h = img.shape[0]
    assert ov.shape[1:] == img.shape[1:] and ov.shape[0] > h
    assert np.abs(ov[:h].astype(int) - img).mean() > 5

    results = reference_pq({"gt_json": str(data / "annotations" / "panoptic_train.json"),
                            "gt_dir": str(data / "panoptic_train"),
                            "pred_json": str(out_dir / "predictions.json"),
                            "pred_dir": str(out_dir / "panoptic")})
    assert 0.0 <= results["All"]["pq"] <= 1.0


def test_predict_cli_user_errors(tmp_path, capsys):
    from max_deeplab.cli import predict

    code = predict.main(["max-deeplab predict", "--saved_model", str(tmp_path),
                         "--images", str(tmp_path / "*.jpg"), "--output_dir", str(tmp_path)])
    assert code == 2 and "no files match" in capsys.readouterr().err
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.jpg")
    code = predict.main(["max-deeplab predict", "--saved_model", str(tmp_path),
                         "--images", str(tmp_path / "*.jpg"), "--output_dir", str(tmp_path)])
    assert code == 2 and "not a SavedModel" in capsys.readouterr().err


def test_predict_writes_nothing_when_no_image_is_readable(standin_saved_model, tmp_path,
                                                           capsys):
    from max_deeplab.cli import predict

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    out_dir = tmp_path / "pred"
    code = predict.main(["max-deeplab predict", "--saved_model", standin_saved_model,
                         "--images", str(tmp_path / "*.*"), "--output_dir", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert "none of the 2 images could be read; nothing written" in err
    assert not out_dir.exists()


def test_predictions_json_is_replaced_whole_or_not_at_all(standin_saved_model, tmp_path,
                                                           monkeypatch):
    """A failure while writing predictions.json keeps the previous run's file intact."""
    from max_deeplab.cli import predict
    from max_deeplab.inference import coco_results

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.jpg")
    out_dir = tmp_path / "pred"
    out_dir.mkdir()
    (out_dir / "predictions.json").write_text('{"previous": "run"}')
    real = coco_results.panoptic_to_coco

    def unserialisable_segments(*args, **kwargs):
        ids, segments = real(*args, **kwargs)
        return ids, [*segments, {"id": object()}]

    monkeypatch.setattr(coco_results, "panoptic_to_coco", unserialisable_segments)
    with pytest.raises(TypeError, match="not JSON serializable"):
        predict.main(["max-deeplab predict", "--saved_model", standin_saved_model,
                      "--images", str(tmp_path / "a.jpg"), "--output_dir", str(out_dir)])
    assert (out_dir / "predictions.json").read_text() == '{"previous": "run"}'
    assert sorted(os.listdir(out_dir)) == ["overlays", "panoptic", "predictions.json"]
