"""`max-deeplab pretrain`: ImageNet pretraining of the backbone (paper appendix A.6)."""
from __future__ import annotations

import sys

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.gin_config import parse_config
from max_deeplab.training.modes import PRETRAIN_MODES, default_strategy

FLAGS = shared_flags.new_flag_values()
shared_flags.define_model_dir_flag(FLAGS, "Directory for checkpoints and summaries; the latest "
                                   "checkpoint in it is resumed.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding the prepared "
                    "'imagenet2012' (nothing is downloaded).", flag_values=FLAGS)
flags.DEFINE_enum("mode", "train", list(PRETRAIN_MODES), "What to run (the eval modes report "
                  "top-1 / top-5 accuracy).", flag_values=FLAGS)
shared_flags.define_strategy_flags(FLAGS, "tpu with --tpu, else mirrored")
flags.DEFINE_integer("num_gpus", 0, "GPUs to use with mirrored/one_device.", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Train steps (overrides pretrain_options.train_epochs / "
                     "train_steps).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_every", None, "Save a checkpoint every N steps "
                     "(overrides pretrain_options.checkpoint_every).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("train_split", None, "TFDS training split (default: 'train').",
                    flag_values=FLAGS)
flags.DEFINE_string("eval_split", None, "TFDS evaluation split (default: 'validation').",
                    flag_values=FLAGS)
shared_flags.define_gin_flags(FLAGS)

DOC = """Pretrains the MaX-DeepLab backbone (stem and stages with P2P blocks only; no memory,
no dual-path attention, no FFN) with global average pooling and a linear classifier on
TFDS imagenet2012, read from --data_dir, and reports top-1 / top-5 accuracy. The model
comes from the same --gin_file as `train` (e.g. max_deeplab_s_coco_641.gin); training
hyper-parameters are `pretrain_options.*` gin bindings. Initialise `train` from the result
with its initial-checkpoint option (max_deeplab.training.initial_checkpoint
.load_backbone_checkpoint)."""


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, DOC) is None:
        return 0
    prog = "max-deeplab pretrain"
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    try:
        parse_config(FLAGS.gin_file, FLAGS.gin_bindings)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2

    from max_deeplab.data.imagenet import ImageNetNotFoundError
    from max_deeplab.training.experiment import create_strategy
    from max_deeplab.training.pretrain import run_pretraining

    options = {}
    if FLAGS.steps is not None:
        options["train_steps"] = FLAGS.steps
    if FLAGS.checkpoint_every is not None:
        options["checkpoint_every"] = FLAGS.checkpoint_every
    if FLAGS.train_split:
        options["train_split"] = FLAGS.train_split
    if FLAGS.eval_split:
        options["eval_split"] = FLAGS.eval_split
    try:
        name = FLAGS.strategy or default_strategy(FLAGS.tpu, read_tf_config=False)
        strategy = create_strategy(name, FLAGS.tpu, FLAGS.num_gpus)
        run_pretraining(mode=FLAGS.mode, model_dir=FLAGS.model_dir, strategy=strategy,
                        data_dir=FLAGS.data_dir, options=options)
    except (ImageNetNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0
