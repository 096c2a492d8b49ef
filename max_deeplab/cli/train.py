"""`max-deeplab train`: train and/or evaluate MaX-DeepLab (paper §4, docs/design.md §6-7).

Examples:
  max-deeplab train --model_dir /tmp/run --gin_file quickstart.gin --train_data 'd/train-*' \\
      --eval_data 'd/val-*' --mode train_and_eval --steps 200 --checkpoint_every 50
    (the tiny model on CPU; d/ from `max-deeplab synthetic` + `max-deeplab convert`, as in
    scripts/quickstart.sh)
  max-deeplab train --tpu my-tpu --strategy tpu --model_dir gs://b/run \\
      --gin_file max_deeplab_s_coco_641.gin --train_data 'gs://b/coco/train-*'

The latest checkpoint in --model_dir is resumed automatically; without --gin_file and the
data flags, a resumed run takes them from what the run saved there (config.gin, run.json),
so `max-deeplab train --model_dir DIR` continues a run. The data and step flags override the
gin config (`experiment_options.*`) and are saved in DIR/config.gin with it.

Ctrl-C or SIGTERM saves a checkpoint at the current step (one-worker runs; TPU and
multi-worker runs save on preemption), prints where it is and the command that resumes, and
exits with 130 / 143. Exit codes: 0 done; 1 the loss became non-finite or the data or a
checkpoint could not be read while running; 2 bad flags, config, data or checkpoint (found
before the model is built); 128 + N stopped by signal N.
"""
from __future__ import annotations

import sys

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.cli.task_run import run_task
from max_deeplab.training.modes import MODES

FLAGS = shared_flags.new_flag_values()
shared_flags.define_model_dir_flag(FLAGS, "Directory for checkpoints, summaries and metrics.")
shared_flags.define_strategy_flags(FLAGS, "tpu with --tpu, multi_worker when TF_CONFIG is "
                                   "set, else mirrored")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.", flag_values=FLAGS)
flags.DEFINE_string("train_data", None, "Training TFRecord glob (from `max-deeplab convert`).",
                    flag_values=FLAGS)
shared_flags.define_eval_data_flag(FLAGS)
flags.DEFINE_integer("steps", None, "Total training steps (overrides the gin config).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_every", None, "Save a checkpoint every N steps.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("initial_checkpoint", None, "Checkpoint to initialise matching weights "
                    "from when the model directory has none (e.g. a pretrained backbone).",
                    flag_values=FLAGS)
shared_flags.define_step_compile_flags(FLAGS)
flags.DEFINE_integer("seed", None, "Make the run reproducible: model initialisation, data "
                     "order and augmentation, drop-path masks (experiment_options.seed).",
                     lower_bound=0, flag_values=FLAGS)
shared_flags.define_gin_flags(FLAGS)


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, __doc__) is None:
        return 0
    prog = argv[0]
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    from max_deeplab.training import task

    settings = task.RunSettings(
        model_dir=FLAGS.model_dir, mode=FLAGS.mode, train_data=FLAGS.train_data,
        eval_data=FLAGS.eval_data, gin_files=list(FLAGS.gin_file),
        gin_bindings=list(FLAGS.gin_bindings), strategy=FLAGS.strategy, tpu=FLAGS.tpu,
        option_overrides={"total_steps": FLAGS.steps, "checkpoint_every": FLAGS.checkpoint_every,
                          "initial_checkpoint": FLAGS.initial_checkpoint,
                          "jit_compile": FLAGS.jit_compile,
                          "mixed_precision": FLAGS.mixed_precision, "seed": FLAGS.seed})
    # Flag and config errors are reported before anything is written to --model_dir (a
    # failed start must not leave a run config behind) and before the model is built.
    try:
        settings = task.resume_settings(settings)
        options = task.configure(settings)
    except task.RunSetupError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return run_task(prog, argv, settings, options)
