"""`max-deeplab pretrain`: ImageNet pretraining of the backbone (paper appendix A.6)."""
from __future__ import annotations

import sys

from absl import flags

from max_deeplab.cli import gin_flags  # noqa: F401  (defines --gin_file/--gin_bindings)
from max_deeplab.cli.flag_parsing import parse_flags

# Names shared with `train` are defined with allow_override, and with `train`'s values and
# bounds: absl keeps one definition per name and process (the last one imported), so both
# verbs must accept the same values. `pretrain` rejects the modes it lacks itself, at once.
flags.DEFINE_string("model_dir", None, "Directory for checkpoints and summaries; the latest "
                    "checkpoint in it is resumed.", allow_override=True)
flags.DEFINE_string("data_dir", None, "TFDS data directory holding the prepared "
                    "'imagenet2012' (nothing is downloaded).", allow_override=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval", "continuous_eval"],
                  "train | eval | train_and_eval (the eval modes report top-1 / top-5 "
                  "accuracy); continuous_eval is `train`'s only.", allow_override=True)
flags.DEFINE_enum("strategy", None, ["mirrored", "multi_worker", "one_device", "tpu"],
                  "Distribution strategy (default: tpu with --tpu, else mirrored).",
                  allow_override=True)
flags.DEFINE_string("tpu", None, "TPU name or address (with --strategy=tpu).",
                    allow_override=True)
flags.DEFINE_integer("num_gpus", 0, "GPUs to use with mirrored/one_device.", lower_bound=0,
                     allow_override=True)
flags.DEFINE_integer("steps", None, "Train steps (overrides pretrain_options.train_epochs / "
                     "train_steps).", lower_bound=1, allow_override=True)
flags.DEFINE_integer("checkpoint_every", None, "Save a checkpoint every N steps "
                     "(overrides pretrain_options.checkpoint_every).", lower_bound=1,
                     allow_override=True)
flags.DEFINE_string("train_split", None, "TFDS training split (default: 'train').",
                    allow_override=True)
flags.DEFINE_string("eval_split", None, "TFDS evaluation split (default: 'validation').",
                    allow_override=True)

# `max_deeplab.training.pretrain.MODES`, checked before TensorFlow is imported.
PRETRAIN_MODES = ("train", "eval", "train_and_eval")

DOC = """Pretrains the MaX-DeepLab backbone (stem and stages with P2P blocks only; no memory,
no dual-path attention, no FFN) with global average pooling and a linear classifier on
TFDS imagenet2012, read from --data_dir, and reports top-1 / top-5 accuracy. The model
comes from the same --gin_file as `train` (e.g. max_deeplab_s_coco_641.gin); training
hyper-parameters are `pretrain_options.*` gin bindings. Initialise `train` from the result
with its initial-checkpoint option (max_deeplab.training.initial_checkpoint
.load_backbone_checkpoint)."""


def main(argv: list[str]) -> int:
    if parse_flags(argv, DOC) is None:
        return 0
    FLAGS = flags.FLAGS
    prog = "max-deeplab pretrain"
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    if FLAGS.mode not in PRETRAIN_MODES:
        print(f"{prog}: --mode must be one of {', '.join(PRETRAIN_MODES)}, got "
              f"{FLAGS.mode!r}", file=sys.stderr)
        return 2
    try:
        gin_flags.parse_gin_flags()
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
        # `train` defines the same flags (absl has one namespace): same defaults here.
        name = FLAGS.strategy or ("tpu" if FLAGS.tpu else "mirrored")
        strategy = create_strategy(name, FLAGS.tpu, FLAGS.num_gpus)
        run_pretraining(mode=FLAGS.mode, model_dir=FLAGS.model_dir, strategy=strategy,
                        data_dir=FLAGS.data_dir, options=options)
    except (ImageNetNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0
