"""`max-deeplab evaluate --model_dir DIR`: PQ / SQ / RQ of the latest checkpoint in DIR.

The model config and the evaluation data default to what `train` saved in DIR
(`config.gin`, `run.json`); --gin_file / --gin_bindings / --eval_data override them.
Writes DIR/eval/metrics.json and prints the PQ table (All / Things / Stuff, per class).
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from max_deeplab.cli import train
from max_deeplab.cli.flag_parsing import parse_flags


def main(argv: list[str]) -> int:
    if parse_flags(argv, __doc__) is None:
        return 0
    FLAGS = flags.FLAGS
    prog = argv[0]
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    saved_gin = os.path.join(FLAGS.model_dir, train.RUN_CONFIG_GIN)
    saved_run = os.path.join(FLAGS.model_dir, train.RUN_CONFIG_JSON)
    gin_files = list(FLAGS.gin_file)
    if not gin_files:
        if not os.path.isfile(saved_gin):
            print(f"{prog}: {saved_gin} not found; pass the model's --gin_file", file=sys.stderr)
            return 2
        gin_files = [saved_gin]
    eval_data = FLAGS.eval_data
    if not eval_data and os.path.isfile(saved_run):
        with open(saved_run) as f:
            eval_data = json.load(f).get("eval_data")
    if not eval_data:
        print(f"{prog}: no evaluation data: pass --eval_data (none recorded in {saved_run})",
              file=sys.stderr)
        return 2
    train_argv = [prog, "--mode", "eval", "--model_dir", FLAGS.model_dir,
                  "--eval_data", eval_data]
    for name in ("strategy", "tpu"):
        if getattr(FLAGS, name):
            train_argv += [f"--{name}", getattr(FLAGS, name)]
    train_argv += [arg for f in gin_files for arg in ("--gin_file", f)]
    train_argv += [arg for b in FLAGS.gin_bindings for arg in ("--gin_bindings", b)]
    code = train.main(train_argv)
    metrics_path = os.path.join(FLAGS.model_dir, "eval", "metrics.json")
    if code == 0 and os.path.isfile(metrics_path):
        from max_deeplab.evaluation.pq_core import format_table

        with open(metrics_path) as f:
            metrics = json.load(f)
        print(format_table(metrics))
        print(f"metrics: {metrics_path}")
    return code
