"""`max-deeplab import-checkpoint`: a deeplab2 MaX-DeepLab checkpoint -> a checkpoint of ours."""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.file_system import directory_problem
from max_deeplab.gin_config import parse_config

FLAGS = shared_flags.new_flag_values()
shared_flags.define_gin_flags(FLAGS)
flags.DEFINE_string("reference_checkpoint", None,
                    "The reference (deeplab2) checkpoint: a prefix such as "
                    "DIR/ckpt-400000, its .index file, or a directory holding it.",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "Directory to write our checkpoint to (ckpt-0 plus the "
                    "'checkpoint' index file and reference_import.json).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists and is not empty.",
                  flag_values=FLAGS)

DOC = """Imports a published MaX-DeepLab checkpoint of the reference implementation (deeplab2,
TF2 checkpoint format; the deeplab2 code is not needed) into this project's model built from
--gin_file (e.g. max_deeplab_s_coco_641.gin, max_deeplab_s_coco_1025.gin,
max_deeplab_l_coco_1025.gin). Every reference weight is used and every model weight is
filled, or nothing is written and the unmatched variables of both sides are listed. The
semantic head drops deeplab2's void channel 0; optimizer state and the global_step /
save_counter counters are ignored. `evaluate --model_dir`, `export --checkpoint`, and
max_deeplab.model.restore() read the output like any checkpoint of ours.
See docs/reference_checkpoints.md."""

PROG = "max-deeplab import-checkpoint"


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, DOC) is None:
        return 0
    for name in ("reference_checkpoint", "output"):
        if not getattr(FLAGS, name):
            print(f"{PROG}: --{name} is required", file=sys.stderr)
            return 2
    if not FLAGS.gin_file:
        print(f"{PROG}: --gin_file is required (the config matching the checkpoint, e.g. "
              f"max_deeplab_s_coco_641.gin)", file=sys.stderr)
        return 2
    # Written as a sibling directory, then renamed into place: both it and its parent count.
    problem = directory_problem(FLAGS.output) or directory_problem(
        os.path.dirname(os.path.abspath(FLAGS.output)))
    if problem:
        print(f"{PROG}: --output: {problem}", file=sys.stderr)
        return 2
    if (os.path.exists(FLAGS.output) and not FLAGS.overwrite
            and not (os.path.isdir(FLAGS.output) and not os.listdir(FLAGS.output))):
        print(f"{PROG}: output {FLAGS.output!r} exists and is not empty (pass --overwrite "
              f"to replace it)", file=sys.stderr)
        return 1
    try:
        parse_config(FLAGS.gin_file, FLAGS.gin_bindings)
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2

    from max_deeplab.model import build_model
    from max_deeplab.model.reference_import import (
        ReferenceImportError,
        import_reference_checkpoint,
        read_reference,
        write_model_checkpoint,
    )

    start = time.time()
    try:
        # Open the reference first: a wrong path fails before the (slow) model build.
        prefix, _, shapes = read_reference(FLAGS.reference_checkpoint)
        print(f"reference checkpoint {prefix}: {len(shapes)} entries", flush=True)
        print(f"building the model from {', '.join(FLAGS.gin_file)} ...", flush=True)
        model = build_model()
        print(f"  built in {time.time() - start:.1f} s", flush=True)
        report = import_reference_checkpoint(model, prefix)
    except ReferenceImportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    info = {
        "reference_checkpoint": report.prefix,
        "gin_file": list(FLAGS.gin_file),
        "gin_bindings": list(FLAGS.gin_bindings),
        "mapped_variables": report.mapped,
        "values": report.values,
        "trainable_params": report.trainable_params,
        "ignored": {k: len(v) for k, v in report.plan.ignored.items()},
        "transformed": {k: f"[..., {t.start}:] ({t.reason})"
                        for k, t in report.plan.transforms.items()},
    }
    try:
        prefix = write_model_checkpoint(
            model, FLAGS.output, overwrite=FLAGS.overwrite,
            extra_files={"reference_import.json": json.dumps(info, indent=1) + "\n"})
    except OSError as e:
        print(f"{PROG}: cannot write {FLAGS.output!r}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {prefix} ({time.time() - start:.1f} s); use it with "
          f"`max-deeplab evaluate --model_dir {FLAGS.output}` or "
          f"`max-deeplab export --checkpoint {FLAGS.output}` and the same --gin_file")
    return 0
