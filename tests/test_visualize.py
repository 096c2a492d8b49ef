"""Overlays (`max_deeplab.inference.visualize`, drawn by `predict` and `overlay`) are legible
on real photographs: every segment's colour stands out from the photo under it, boundaries
are one pixel wide, void stays the plain photo, names are drawn, and a legend lists the
classes present. Checked on the two bundled COCO photos with their ground truth."""
from __future__ import annotations

import numpy as np
import pytest
from coco_samples import annotations, photo, segment_id_map
from PIL import Image

from max_deeplab.cli.overlay import overlay_table
from max_deeplab.inference.coco_results import coco_to_panoptic
from max_deeplab.inference.visualize import (
    MIN_CONTRAST,
    contrasting_color,
    legend_entries,
    overlay,
    segment_edges,
)

ALPHA = 0.55
WHITE, DARK = (255, 255, 255), (20, 20, 20)


def _samples() -> list[tuple[np.ndarray, np.ndarray, dict, list[dict]]]:
    """(photo, panoptic map in the table's encoding, table, segments_info) per sample."""
    data = annotations()
    table = overlay_table(data["categories"], "samples")
    names = {image["id"]: image["file_name"] for image in data["images"]}
    out = []
    for ann in data["annotations"]:
        panoptic = coco_to_panoptic(segment_id_map(ann["file_name"]), ann["segments_info"],
                                    table)
        out.append((photo(names[ann["image_id"]]), panoptic, table, ann["segments_info"]))
    return out


SAMPLES = _samples()


def _drawn(image, panoptic, table, **kwargs) -> np.ndarray:
    return np.asarray(overlay(image, panoptic, table, alpha=ALPHA, **kwargs)).astype(np.float64)


@pytest.mark.parametrize("index", [0, 1])
def test_every_segment_stands_out_from_the_photo(index):
    """Mean colour of each segment in the overlay vs in the photo: at least alpha times
    MIN_CONTRAST apart (COCO's navy `truck` [0, 0, 70] on a dark red truck, olive `tree` on
    dark foliage were hard to see with the raw class colours)."""
    image, panoptic, table, _ = SAMPLES[index]
    drawn = _drawn(image, panoptic, table, names=False, legend=False)
    assert drawn.shape == image.shape
    interior = ~segment_edges(panoptic)
    weakest = np.inf
    for value in np.unique(panoptic):
        if value == 0:
            continue
        mask = (panoptic == value) & interior
        if not mask.any():
            continue
        shift = np.linalg.norm(drawn[mask].mean(0) - image[mask].astype(np.float64).mean(0))
        weakest = min(weakest, shift)
    assert weakest >= ALPHA * MIN_CONTRAST - 1.0, weakest


def test_dark_grey_class_on_a_dark_region_becomes_visible():
    image = np.full((40, 60, 3), 60, np.uint8)  # a dark photo
    panoptic = np.zeros((40, 60), np.int64)
    panoptic[10:30, 10:50] = 1 * 256  # class 0, COCO's `house` grey
    table = {"category_names": ["house"], "colors": [[70, 70, 70]], "isthing": [False],
             "label_divisor": 256, "label_offset": 1, "void_label": 0}
    drawn = _drawn(image, panoptic, table, names=False, legend=False)
    inside = drawn[12:28, 12:48].reshape(-1, 3)
    assert np.linalg.norm(inside.mean(0) - 60) >= ALPHA * MIN_CONTRAST - 1.0
    # Grey stays grey (lightened), not some other hue.
    assert np.ptp(inside.mean(0)) < 1.0
    color = contrasting_color([70, 70, 70], np.array([200.0, 200.0, 200.0]))
    assert np.linalg.norm(color - 200.0) >= MIN_CONTRAST  # on a light region: darker


@pytest.mark.parametrize("index", [0, 1])
def test_boundaries_are_one_pixel_and_void_stays_the_photo(index):
    image, panoptic, table, _ = SAMPLES[index]
    drawn = _drawn(image, panoptic, table, names=False, legend=False)
    edges = np.zeros(panoptic.shape, bool)  # pixels whose right or lower neighbour differs
    edges[:, :-1] |= np.diff(panoptic, axis=1) != 0
    edges[:-1, :] |= np.diff(panoptic, axis=0) != 0
    np.testing.assert_array_equal(segment_edges(panoptic), edges)
    is_boundary_color = (drawn == WHITE).all(-1) | (drawn == DARK).all(-1)
    assert is_boundary_color[edges].all()
    # Off the edges, boundary colours are (almost) never drawn: the lines are one pixel.
    assert is_boundary_color[~edges].mean() < 1e-3
    void = (panoptic == 0) & ~edges
    assert void.sum() > 1000
    np.testing.assert_array_equal(drawn[void], image[void])


@pytest.mark.parametrize("index", [0, 1])
def test_legend_lists_the_classes_present_with_their_colours(index):
    image, panoptic, table, segments = SAMPLES[index]
    by_id = {c["id"]: c for c in annotations()["categories"]}
    expected = {}
    for seg in segments:
        name = by_id[seg["category_id"]]["name"]
        expected[name] = expected.get(name, 0) + 1
    entries = legend_entries(image, panoptic, table)
    assert {e.name: e.num_segments for e in entries} == expected
    assert [e.area for e in entries] == sorted((e.area for e in entries), reverse=True)
    thing_names = {c["name"] for c in by_id.values() if c["isthing"]}
    assert {e.name for e in entries if e.is_thing} == thing_names & set(expected)

    full = np.asarray(overlay(image, panoptic, table, alpha=ALPHA))
    height = image.shape[0]
    assert full.shape[0] > height and full.shape[1] == image.shape[1]
    # The photo part is the overlay without legend; the strip below holds a swatch of each
    # class colour.
    np.testing.assert_array_equal(full[:height], _drawn(image, panoptic, table, legend=False))
    strip = full[height:].reshape(-1, 3)
    for entry in entries:
        assert (strip == entry.color).all(-1).sum() >= 36, entry


def test_class_names_are_drawn_on_the_largest_segments():
    image, panoptic, table, _ = SAMPLES[0]
    plain = _drawn(image, panoptic, table, names=False, legend=False)
    named = _drawn(image, panoptic, table, legend=False)
    values, areas = np.unique(panoptic[panoptic > 0], return_counts=True)
    for value in values[np.argsort(-areas)][:3]:  # the three largest segments (no overlap)
        ys, xs = np.nonzero(panoptic == value)
        k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        y, x = ys[k], xs[k]
        window = (slice(max(y - 10, 0), y + 11), slice(max(x - 40, 0), x + 41))
        changed = (named[window] != plain[window]).any(-1)
        assert changed.sum() > 50  # a text box around the anchor
        assert (named[window][changed] <= 40).all(-1).mean() > 0.5  # mostly its black box


def test_predict_style_table_without_colours_or_isthing():
    """A table with neither `colors` nor `isthing` (older SavedModels) still draws."""
    image = np.asarray(Image.new("RGB", (30, 20), (120, 90, 60)))
    panoptic = np.zeros((20, 30), np.int64)
    panoptic[:, 15:] = 2 * 256 + 1
    table = {"category_names": ["a", "b"], "label_divisor": 256, "label_offset": 1,
             "void_label": 0}
    drawn = np.asarray(overlay(image, panoptic, table))
    assert drawn.shape[1] == 30 and drawn.shape[0] > 20
    assert [e.name for e in legend_entries(image, panoptic, table)] == ["b"]
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, panoptic[:10], table)


def test_colorize_gives_each_segment_its_own_colour_and_void_black():
    from max_deeplab.inference.visualize import colorize

    panoptic = np.array([[[0, 257, 257, 258], [512, 512, 0, 259]],
                         [[257, 0, 0, 0], [512, 258, 258, 258]]])
    rgb = colorize(panoptic)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 4, 3)
    assert (rgb[panoptic == 0] == 0).all()
    colours = {}
    for value, colour in zip(panoptic.ravel(), rgb.reshape(-1, 3), strict=True):
        colours.setdefault(int(value), set()).add(tuple(int(c) for c in colour))
    assert all(len(c) == 1 for c in colours.values())  # the same in every image
    instance_colours = [next(iter(colours[v])) for v in (257, 258, 259)]
    assert len(set(instance_colours)) == 3  # touching instances of one class differ
    assert (0, 0, 0) not in instance_colours + [next(iter(colours[512]))]
