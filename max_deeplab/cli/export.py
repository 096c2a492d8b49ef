"""max-deeplab export: a checkpoint -> a self-contained SavedModel (DESIGN.md §6).

    max-deeplab export --checkpoint CKPT --export_dir DIR [--gin_file F --gin_bindings B]
                       [--metadata PATH] [--input_size H,W]

The SavedModel loads with plain `tf.saved_model.load` (no custom ops, no need for this
package). Signatures: `serving_default` (uint8 image [H, W, 3], any size), `serving_batched`
(uint8 [B, H, W, 3]) and `metadata` (category ids, names, isthing). Post-processing
settings (thresholds, area limits) are taken from gin (`postprocess.*` bindings).
"""
from __future__ import annotations

import glob
import json
import os
import sys

from absl import flags

from max_deeplab.cli import gin_flags
from max_deeplab.cli.flag_parsing import parse_flags

flags.DEFINE_string("checkpoint", None, "Checkpoint directory (latest checkpoint) or prefix.",
                    allow_override=True)
flags.DEFINE_string("export_dir", None, "Directory to write the SavedModel to (must not "
                    "exist or be empty).", allow_override=True)
flags.DEFINE_string("metadata", None, "Data-set metadata JSON written by `convert` "
                    "(PREFIX-metadata.json), or a COCO panoptic JSON with 'categories'. "
                    "Default: a *metadata.json next to the checkpoint.", allow_override=True)
flags.DEFINE_string("input_size", None, "H,W the image is resized-to-fit and padded to "
                    "(default: gin build_model.input_size).", allow_override=True)

FLAGS = flags.FLAGS


def _find_metadata(checkpoint: str) -> str | None:
    """A metadata JSON beside the checkpoint (or in its parent directory), if any."""
    base = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
    for directory in (base, os.path.dirname(os.path.abspath(base))):
        found = sorted(glob.glob(os.path.join(directory, "*metadata.json")))
        if found:
            return found[0]
    return None


def _input_size() -> tuple[int, int]:
    import gin

    if FLAGS.input_size:
        try:
            h, w = (int(v) for v in FLAGS.input_size.split(","))
        except ValueError as e:
            raise ValueError(f"--input_size must be 'H,W', got {FLAGS.input_size!r}") from e
        return h, w
    try:
        size = gin.query_parameter("build_model.input_size")
    except ValueError:
        size = (641, 641)
    return int(size[0]), int(size[1])


def main(argv: list[str]) -> int:
    if parse_flags(argv, __doc__) is None:
        return 0
    for name in ("checkpoint", "export_dir"):
        if not getattr(FLAGS, name):
            print(f"{argv[0]}: --{name} is required", file=sys.stderr)
            return 2
    metadata_path = FLAGS.metadata or _find_metadata(FLAGS.checkpoint)
    if metadata_path is None:
        print(f"{argv[0]}: no data-set metadata found next to {FLAGS.checkpoint}; pass "
              "--metadata PATH (PREFIX-metadata.json from `convert`, or a COCO panoptic "
              "JSON with 'categories')", file=sys.stderr)
        return 2
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"{argv[0]}: cannot read metadata {metadata_path}: {e}", file=sys.stderr)
        return 2
    try:
        gin_flags.parse_gin_flags()
        input_size = _input_size()
    except (FileNotFoundError, ValueError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2

    from max_deeplab.inference import export_saved_model
    from max_deeplab.model import build_model, restore

    model = build_model()
    try:
        prefix = restore(model, FLAGS.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        # restore's message lists the unmatched variables on both sides.
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"restored {prefix}")
    try:
        export_saved_model(model, FLAGS.export_dir, metadata, input_size=input_size)
    except (FileExistsError, ValueError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"exported SavedModel to {FLAGS.export_dir} (input size {input_size[0]}x"
          f"{input_size[1]}, metadata {metadata_path})")
    return 0
