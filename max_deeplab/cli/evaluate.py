"""`max-deeplab evaluate --model_dir DIR`: PQ / SQ / RQ of the latest checkpoint in DIR.

The model config and the evaluation data default to what `train` saved in DIR
(`config.gin`, `run.json`); --gin_file / --gin_bindings / --eval_data override them.
Writes DIR/eval/metrics.json and prints the PQ table (All / Things / Stuff).
DIR may be a file-system URL (gs://bucket/run).

Flags: --model_dir, --eval_data, --gin_file, --gin_bindings, --strategy, --tpu, and, for
the evaluation step, --jit_compile and --mixed_precision. Exit codes as `train`'s.
"""
from __future__ import annotations

import os
import sys

from max_deeplab.cli import shared_flags
from max_deeplab.cli.task_run import run_task
from max_deeplab.file_system import file_exists

FLAGS = shared_flags.new_flag_values()
shared_flags.define_model_dir_flag(FLAGS, "A `train` model directory: its latest checkpoint "
                                   "is evaluated.")
shared_flags.define_eval_data_flag(FLAGS)
shared_flags.define_strategy_flags(FLAGS, "tpu with --tpu, multi_worker when TF_CONFIG is "
                                   "set, else mirrored")
shared_flags.define_step_compile_flags(FLAGS)
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
        model_dir=FLAGS.model_dir, mode="eval", eval_data=FLAGS.eval_data,
        gin_files=list(FLAGS.gin_file), gin_bindings=list(FLAGS.gin_bindings),
        strategy=FLAGS.strategy, tpu=FLAGS.tpu,
        option_overrides={"jit_compile": FLAGS.jit_compile,
                          "mixed_precision": FLAGS.mixed_precision})
    try:
        # Before the model is built and summary directories are created in DIR.
        settings = task.evaluation_settings(settings)
        options = task.configure(settings)
    except task.RunSetupError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    code = run_task(prog, argv, settings, options)
    metrics = os.path.join(FLAGS.model_dir, "eval", "metrics.json")
    if code == 0 and file_exists(metrics):  # not written by a non-chief worker
        print(f"metrics: {metrics}")
    return code
