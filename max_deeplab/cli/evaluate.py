"""`max-deeplab evaluate --model_dir DIR`: PQ / SQ / RQ of the latest checkpoint in DIR.

The model config and the evaluation data default to what `train` saved in DIR
(`config.gin`, `run.json`); --gin_file / --gin_bindings / --eval_data override them.
Writes DIR/eval/metrics.json and prints the PQ table (All / Things / Stuff).
DIR may be a file-system URL (gs://bucket/run).

Flags: --model_dir, --eval_data, --gin_file, --gin_bindings, --strategy, --tpu, and, for
the evaluation step, --jit_compile and --mixed_precision. `train`'s other flags (listed
below too: the verbs share one flag table) do not apply and are rejected.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from max_deeplab.cli import train
from max_deeplab.cli.flag_parsing import parse_flags
from max_deeplab.file_system import file_exists
from max_deeplab.run_config import (  # noqa: F401  (RunConfigError: also for export)
    RunConfigError,
    saved_data_flags,
    saved_gin_config,
)

# `train` flags that `evaluate` passes on to `train --mode eval`; the gin flags are passed
# on too. Any other `train` flag given to `evaluate` is an error: it would have no effect.
FORWARDED_TRAIN_FLAGS = ("model_dir", "eval_data", "strategy", "tpu", "jit_compile",
                         "mixed_precision")


def _inapplicable_flags() -> list[str]:
    """`train` flags given on the command line that `evaluate` does not pass on."""
    FLAGS = flags.FLAGS
    names = {f.name for f in FLAGS.get_flags_for_module(train.__name__)}
    # By name: another verb's module may hold the current definition of a shared flag.
    return sorted(n for n in names - set(FORWARDED_TRAIN_FLAGS) if FLAGS[n].present)


def _forwarded_flag_args() -> list[str]:
    """--strategy / --tpu / --jit_compile / --mixed_precision as given, for `train`."""
    FLAGS = flags.FLAGS
    args = []
    for name in ("strategy", "tpu", "mixed_precision"):
        if getattr(FLAGS, name):
            args.append(f"--{name}={getattr(FLAGS, name)}")
    if FLAGS.jit_compile is not None:
        args.append("--jit_compile" if FLAGS.jit_compile else "--nojit_compile")
    return args


def _has_checkpoint(model_dir: str) -> bool:
    """Whether `model_dir` holds a checkpoint `train --mode eval` would restore."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(model_dir) is not None


def main(argv: list[str]) -> int:
    if parse_flags(argv, __doc__) is None:
        return 0
    FLAGS = flags.FLAGS
    prog = argv[0]
    if not FLAGS.model_dir:
        print(f"{prog}: --model_dir is required", file=sys.stderr)
        return 2
    inapplicable = _inapplicable_flags()
    if inapplicable:
        listed = ", ".join("--" + name for name in inapplicable)
        verb = "does" if len(inapplicable) == 1 else "do"
        print(f"{prog}: {listed} {verb} not apply to evaluate (it evaluates the latest "
              "checkpoint in --model_dir on --eval_data); training flags belong to "
              "`max-deeplab train`", file=sys.stderr)
        return 2
    try:
        gin_files = list(FLAGS.gin_file)
        if not gin_files:
            saved_gin = saved_gin_config(FLAGS.model_dir)
            if saved_gin is None:
                print(f"{prog}: {os.path.join(FLAGS.model_dir, train.RUN_CONFIG_GIN)} not "
                      "found; pass the model's --gin_file", file=sys.stderr)
                return 2
            gin_files = [saved_gin]
        eval_data = FLAGS.eval_data or saved_data_flags(FLAGS.model_dir).get("eval_data")
    except (OSError, RunConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not eval_data:
        saved_run = os.path.join(FLAGS.model_dir, train.RUN_CONFIG_JSON)
        print(f"{prog}: no evaluation data: pass --eval_data (none recorded in {saved_run})",
              file=sys.stderr)
        return 2
    # Before `train` builds the model and creates summary directories in DIR.
    if not _has_checkpoint(FLAGS.model_dir):
        print(f"{prog}: no checkpoint to evaluate in {FLAGS.model_dir} (no 'checkpoint' "
              "file naming one; `train` writes them there)", file=sys.stderr)
        return 2
    train_argv = [prog, "--mode", "eval", "--model_dir", FLAGS.model_dir,
                  "--eval_data", eval_data, *_forwarded_flag_args()]
    train_argv += [arg for f in gin_files for arg in ("--gin_file", f)]
    train_argv += [arg for b in FLAGS.gin_bindings for arg in ("--gin_bindings", b)]
    code = train.main(train_argv)
    metrics = os.path.join(FLAGS.model_dir, "eval", "metrics.json")
    if code == 0 and file_exists(metrics):  # not written by a non-chief worker
        print(f"metrics: {metrics}")
    return code
