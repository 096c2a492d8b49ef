"""max-deeplab analyze: the paper's analysis pictures of a trained model (appendix A.3-A.5).

    max-deeplab analyze slots     --checkpoint CKPT --images GLOB --output_dir DIR
    max-deeplab analyze features  --checkpoint CKPT --images GLOB --output_dir DIR
    max-deeplab analyze attention --checkpoint CKPT --images GLOB --output_dir DIR [--slots 3,7]
    (each also takes --gin_file / --gin_bindings / --metadata)

slots (A.3): over all the images, which mask slot fires (owns a segment of the panoptic
  result) with which class, and each slot's average mask on the unit square, slots grouped
  by how often they fire. Writes DIR/slot_class_firings.png, DIR/slot_average_masks.png and
  the numbers, DIR/slot_statistics.json.
features (A.4): for a model with D = 3 mask channels (MaXDeepLab.mask_dim = 3, e.g.
  configs/ablations/mask_dim_3.gin), the normalised decoder feature g as RGB beside the
  image and its panoptic result: DIR/features/<image stem>.png.
attention (A.5): the memory-to-pixel attention of the last dual-path transformer block for
  chosen output masks (--slots, default: the slots of each image's largest thing and stuff
  segments, --num_masks of them), per head, coloured over the image (log scale of the
  attention relative to uniform): DIR/attention/<image stem>.png.

The images are resized to fit the model's input and padded, as the SavedModel does; the
pictures are at that size. CKPT is a `train` model directory (its latest checkpoint) or a
checkpoint prefix; the model config defaults to the run's config.gin and the category table
to the metadata of the run's data (run.json), as for `export`. Post-processing settings come
from gin (`postprocess.*` bindings). Exit codes: 0 done; 1 an image could not be read (the
others are analysed); 2 bad flags or inputs.
"""
from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator
from typing import Any

from absl import flags

from max_deeplab.cli import shared_flags

ANALYSES = ("slots", "features", "attention")

FLAGS = shared_flags.new_flag_values()

flags.DEFINE_string("checkpoint", None, "A `train` model directory (latest checkpoint) or a "
                    "checkpoint prefix.", flag_values=FLAGS)
flags.DEFINE_string("images", None, "Glob of input images (any format Pillow reads); "
                    "comma-separated globs allowed.", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Directory for the pictures (and slot numbers).",
                    flag_values=FLAGS)
flags.DEFINE_string("metadata", None, "Data-set metadata JSON (`convert`'s PREFIX-metadata"
                    ".json, or a COCO panoptic JSON with 'categories'). Default: the "
                    "metadata of the data in the run's run.json.", flag_values=FLAGS)
flags.DEFINE_list("slots", [], "attention: the mask slots to show (default: those of each "
                  "image's largest segments).", flag_values=FLAGS)
flags.DEFINE_integer("num_masks", 4, "attention: how many of the largest segments (things "
                     "and stuff in turn) to show when --slots is not given (at most 6).",
                     lower_bound=1, upper_bound=6, flag_values=FLAGS)
flags.DEFINE_integer("unit_size", 32, "slots: side of the unit square the masks are "
                     "averaged on.", lower_bound=2, upper_bound=512, flag_values=FLAGS)

shared_flags.define_gin_flags(FLAGS)
# Slot-statistics outputs.
SLOT_FIRINGS_PNG = "slot_class_firings.png"
SLOT_MASKS_PNG = "slot_average_masks.png"
SLOT_JSON = "slot_statistics.json"


class AnalyzeSetupError(ValueError):
    """A bad flag or input found before the model is built (the message names it)."""


def _run_files(checkpoint: str) -> tuple[str, list[str], str]:
    """(checkpoint prefix, gin files, metadata path): the flags, else the run's saved
    config.gin and the metadata of its recorded data."""
    from max_deeplab.training import run_directory

    try:
        prefix, run_dir = run_directory.checkpoint_run(checkpoint)
    except FileNotFoundError as e:
        raise AnalyzeSetupError(f"--checkpoint: {e}") from e
    gin_files = list(FLAGS.gin_file) or [run_directory.saved_gin_config(run_dir)]
    if gin_files == [None]:
        raise AnalyzeSetupError(f"no {run_directory.RUN_CONFIG_GIN} in {run_dir} (written by "
                                "`train`): pass --gin_file with the model's config")
    metadata_path = FLAGS.metadata or run_directory.data_metadata_path(run_dir, checkpoint)
    return prefix, gin_files, metadata_path


def _slot_list(num_slots: int) -> list[int] | None:
    """--slots as numbers, each checked against the model's N slots (None if not given)."""
    if not FLAGS.slots:
        return None
    try:
        slots = [int(s) for s in FLAGS.slots]
    except ValueError as e:
        raise AnalyzeSetupError(f"--slots must be slot numbers, e.g. 3,7; got "
                                f"{','.join(FLAGS.slots)}") from e
    if len(slots) > 6:
        raise AnalyzeSetupError(f"--slots: at most 6 masks (one colour each), got {len(slots)}")
    bad = [s for s in slots if not 0 <= s < num_slots]
    if bad:
        raise AnalyzeSetupError(f"--slots: {bad} not among the model's {num_slots} mask "
                                f"slots (0..{num_slots - 1})")
    return slots


def _prepare(analysis: str) -> dict:
    """Every check that needs no model; parses the gin config."""
    from max_deeplab.data.metadata import load_categories_file
    from max_deeplab.gin_config import configured_value, parse_config
    from max_deeplab.model import MaXDeepLab, MaXDeepLabEncoder, build_model

    for name in ("checkpoint", "images", "output_dir"):
        if not getattr(FLAGS, name):
            raise AnalyzeSetupError(f"--{name} is required")
    paths = sorted({p for pattern in FLAGS.images.split(",") if pattern.strip()
                    for p in glob.glob(pattern.strip()) if os.path.isfile(p)})
    if not paths:
        raise AnalyzeSetupError(f"no files match --images={FLAGS.images!r}")
    if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
        raise AnalyzeSetupError(f"--output_dir {FLAGS.output_dir} is a file; it must name a "
                                "directory (new or existing)")
    prefix, gin_files, metadata_path = _run_files(FLAGS.checkpoint)
    metadata = load_categories_file(metadata_path)
    parse_config(gin_files, FLAGS.gin_bindings)
    mask_dim = configured_value("MaXDeepLab", MaXDeepLab, "mask_dim")
    if analysis == "features" and mask_dim != 3:
        raise AnalyzeSetupError(
            f"analyze features needs a model with D = 3 mask channels; this config has "
            f"MaXDeepLab.mask_dim = {mask_dim}. Train one with --gin_bindings "
            "'MaXDeepLab.mask_dim = 3' (configs/ablations/mask_dim_3.gin binds it)")
    slots = (_slot_list(configured_value("MaXDeepLabEncoder", MaXDeepLabEncoder,
                                         "num_mask_slots"))
             if analysis == "attention" else None)
    size = tuple(configured_value("build_model", build_model, "input_size"))
    return {"paths": paths, "prefix": prefix, "metadata": metadata, "input_size": size,
            "slots": slots}


def _read_images(paths: list[str], failures: list[str]) -> Iterator[tuple[str, Any]]:
    """(stem, uint8 image) of every readable path; the others are reported and appended
    to `failures`."""
    import numpy as np
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"), np.uint8)
        except Exception as e:  # Pillow raises many types for corrupt data
            print(f"skipped {path}: cannot read image ({type(e).__name__}: {e})",
                  file=sys.stderr)
            failures.append(path)
            continue
        yield os.path.splitext(os.path.basename(path))[0], image


def _save(image, path: str) -> None:
    from max_deeplab.atomic_files import temporary_path

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    print(f"wrote {path}")


def _analyze(analysis: str, setup: dict) -> int:
    from max_deeplab.analysis.predictions import Predictor
    from max_deeplab.inference.export import category_table
    from max_deeplab.model import build_model, restore

    model = build_model()
    restore(model, setup["prefix"])
    print(f"restored {setup['prefix']}")
    num_classes = int(model.num_classes)
    table = category_table(setup["metadata"], num_classes)
    predictor = Predictor(model, table, setup["input_size"],
                          with_attention=analysis == "attention")
    table = {**table, **predictor.label_settings}
    out_dir = FLAGS.output_dir
    failures: list[str] = []
    if analysis == "slots":
        from max_deeplab.analysis.plots import draw_average_masks, draw_slot_class_firings
        from max_deeplab.analysis.slot_statistics import SlotStatistics

        stats = None
        for count, (_, image) in enumerate(_read_images(setup["paths"], failures), start=1):
            prediction = predictor(image)
            if stats is None:
                stats = SlotStatistics(len(prediction.slot_classes), num_classes,
                                       FLAGS.unit_size)
            stats.add(prediction.slot, prediction.slot_classes)
            if count % 10 == 0:
                print(f"{count}/{len(setup['paths'])} images")
        if stats is None:
            print(f"none of the {len(setup['paths'])} images could be read; nothing written",
                  file=sys.stderr)
            return 1
        names = table["category_names"]
        _save(draw_slot_class_firings(stats, names, table["isthing"]),
              os.path.join(out_dir, SLOT_FIRINGS_PNG))
        _save(draw_average_masks(stats, names), os.path.join(out_dir, SLOT_MASKS_PNG))
        from max_deeplab.atomic_files import write_json_atomic

        write_json_atomic(os.path.join(out_dir, SLOT_JSON), stats.to_json(names), indent=None)
        print(f"wrote {os.path.join(out_dir, SLOT_JSON)} ({stats.num_images} images; slots "
              f"firing: {int((stats.firings > 0).sum())} of {stats.num_slots})")
    else:
        from max_deeplab.analysis.attention_maps import (
            draw_attention_figure,
            largest_segment_slots,
        )
        from max_deeplab.analysis.decoder_features import draw_feature_panel

        for stem, image in _read_images(setup["paths"], failures):
            prediction = predictor(image)
            if analysis == "features":
                picture = draw_feature_panel(prediction, table)
            else:
                slots = setup["slots"] or largest_segment_slots(prediction, table["isthing"],
                                                                FLAGS.num_masks)
                if not slots:
                    print(f"{stem}: no segment predicted (all void); pass --slots to show "
                          "chosen slots anyway")
                    continue
                picture = draw_attention_figure(prediction, slots, table)
            _save(picture, os.path.join(out_dir, analysis, f"{stem}.png"))
    return 1 if failures else 0


def _usage(verb: str) -> str:
    return (f"usage: {verb} {{{'|'.join(ANALYSES)}}} --checkpoint CKPT --images GLOB "
            f"--output_dir DIR (see {verb} --help)")


def main(argv: list[str]) -> int:
    verb = argv[0]
    if len(argv) < 2 or argv[1].startswith("-"):
        if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:  # --help
            return 0
        print(f"{verb}: name the analysis first\n{_usage(verb)}", file=sys.stderr)
        return 2
    analysis = argv[1]
    if analysis not in ANALYSES:
        print(f"{verb}: unknown analysis {analysis!r}; expected one of "
              f"{', '.join(ANALYSES)}\n{_usage(verb)}", file=sys.stderr)
        return 2
    if shared_flags.parse_flags([f"{verb} {analysis}", *argv[2:]], FLAGS, __doc__) is None:
        return 0
    try:
        setup = _prepare(analysis)
    except (OSError, ValueError) as e:  # bad flags or inputs (named in the message)
        print(f"{verb} {analysis}: {e}", file=sys.stderr)
        return 2
    try:
        return _analyze(analysis, setup)
    except (FileNotFoundError, ValueError) as e:  # a checkpoint that does not fit, bad slots
        print(f"{verb} {analysis}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
