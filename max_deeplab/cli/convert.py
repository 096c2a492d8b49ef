"""`max-deeplab convert`: COCO panoptic -> sharded TFRecords plus a metadata file.

    max-deeplab convert --annotations annotations/panoptic_train2017.json \\
        --images train2017/ --panoptic annotations/panoptic_train2017/ \\
        --output /data/coco/train [--num_shards 256] [--num_workers 8]

Writes /data/coco/train-00000-of-00256.tfrecord ... and /data/coco/train-metadata.json
(categories with isthing and colour, contiguous class mapping, label divisor, ignore value),
which training, evaluation, export and prediction read. The Example schema is documented in
`max_deeplab.data.schema`. Works on the COCO 2017 panoptic layout unchanged. Every image
is validated (missing or corrupt files, size mismatches, segment ids in the JSON but not in
the PNG or the reverse, unknown categories); on any error the message names the file and
segment, the exit code is 1 and no shard is left behind. Ctrl-C or SIGTERM also leaves
nothing behind (exit code 130 / 143); temporary files of a run killed outright are removed by
the next run into the same --output.
"""
from __future__ import annotations

import sys

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.panoptic_labels import LABEL_DIVISOR

FLAGS = shared_flags.new_flag_values()
flags.DEFINE_string("annotations", None, "COCO panoptic annotation JSON.", flag_values=FLAGS)
flags.DEFINE_string("images", None, "Directory of the images (images[].file_name).",
                    flag_values=FLAGS)
flags.DEFINE_string("panoptic", None, "Directory of the panoptic PNGs (annotations[].file_name).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output prefix: PREFIX-NNNNN-of-KKKKK.tfrecord and "
                    "PREFIX-metadata.json.", flag_values=FLAGS)
flags.DEFINE_integer("num_shards", 8, "Number of TFRecord shards.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("num_workers", None, "Decoding worker processes (default: the usable "
                     "CPU cores; 1 = convert in this process).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("label_divisor", LABEL_DIVISOR,
                     "panoptic = class * label_divisor + instance.", lower_bound=2,
                     flag_values=FLAGS)


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    missing = [n for n in ("annotations", "images", "panoptic", "output") if not FLAGS[n].value]
    if missing:
        print(f"{argv[0]}: missing required flag(s): " + ", ".join(f"--{n}" for n in missing),
              file=sys.stderr)
        return 2
    from max_deeplab.data.coco_format import ConversionError
    from max_deeplab.data.converter import check_output_prefix, convert
    from max_deeplab.interruption import Interrupted, signals_raise_interrupted

    try:
        check_output_prefix(FLAGS.output)
    except ValueError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 2

    try:
        with signals_raise_interrupted():
            convert(FLAGS.annotations, FLAGS.images, FLAGS.panoptic, FLAGS.output,
                    num_shards=FLAGS.num_shards, num_workers=FLAGS.num_workers,
                    label_divisor=FLAGS.label_divisor,
                    log=lambda line: print(line, flush=True))
    except Interrupted as e:
        print(f"{argv[0]}: interrupted by {e}: stopped before the new shards were complete; "
              "their temporary files are removed and shards already in place are untouched",
              file=sys.stderr)
        return e.exit_code
    except ConversionError as e:
        print(f"{argv[0]}: error: {e} (no shard written)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{argv[0]}: error: cannot write {FLAGS.output}: {e} (no shard written)",
              file=sys.stderr)
        return 1
    return 0
