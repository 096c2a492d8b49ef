"""`max-deeplab synthetic`: a COCO-panoptic-format data set of shapes on textured regions.

    max-deeplab synthetic --output_dir D --num_images N --seed S [--height H --width W]
        [--num_val_images V] [--overwrite]

Writes D/annotations/panoptic_{train,val}.json, D/panoptic_{train,val}/*.png and
D/{train,val}/*.jpg: 4 thing classes (disc, square, triangle, cross; several occluding
instances per image, sometimes a crowd group) on 4 stuff textures, with void clutter.
Category ids are non-contiguous, like COCO's. The same seed gives the same files.
A D that already holds a data set is refused unless --overwrite replaces it; a failed run
leaves nothing behind. No TensorFlow is imported by this verb.
"""
from __future__ import annotations

import sys
import time

from absl import flags

from max_deeplab.cli import shared_flags

FLAGS = shared_flags.new_flag_values()
flags.DEFINE_string("output_dir", None, "Directory to write the data set into.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_images", 100, "Total number of images (train + val).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random seed; image i depends only on (seed, i).",
                     flag_values=FLAGS)
flags.DEFINE_integer("height", 128, "Image height in pixels.", lower_bound=16, flag_values=FLAGS)
flags.DEFINE_integer("width", 160, "Image width in pixels.", lower_bound=16, flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace the data set already in --output_dir (its "
                  "annotations/panoptic_{train,val}.json, {train,val}/ and panoptic_{train,val}/, "
                  "whole); other files there are kept.", flag_values=FLAGS)
flags.DEFINE_integer("num_val_images", None, "Images in the val split (the last ones); "
                     "default: a fifth of --num_images (at least 1 when there are 2+).",
                     lower_bound=0, flag_values=FLAGS)


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    if not FLAGS.output_dir:
        print(f"{argv[0]}: missing required flag --output_dir", file=sys.stderr)
        return 2
    if FLAGS.num_val_images is not None and FLAGS.num_val_images > FLAGS.num_images:
        print(f"{argv[0]}: --num_val_images={FLAGS.num_val_images} exceeds "
              f"--num_images={FLAGS.num_images}", file=sys.stderr)
        return 2
    from max_deeplab.data.synthetic import DatasetExistsError, write_dataset

    start = time.perf_counter()
    last = [start]

    def progress(split: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 2.0:
            last[0] = now
            print(f"{split}: {done}/{total} images", flush=True)

    try:
        counts = write_dataset(FLAGS.output_dir, FLAGS.num_images, FLAGS.seed, FLAGS.height,
                               FLAGS.width, FLAGS.num_val_images, progress,
                               overwrite=FLAGS.overwrite)
    except DatasetExistsError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{argv[0]}: error: cannot write to {FLAGS.output_dir}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train and {counts['val']} val images to "
          f"{FLAGS.output_dir} in {time.perf_counter() - start:.1f} s")
    return 0
