"""`max-deeplab evaluate --model_dir DIR`: PQ / SQ / RQ of the latest checkpoint in DIR.

The model config and the evaluation data default to what `train` saved in DIR
(`config.gin`, `run.json`); --gin_file / --gin_bindings / --eval_data override them.
Writes DIR/eval/metrics.json and prints the PQ table (All / Things / Stuff, per class).
DIR may be a file-system URL (gs://bucket/run).

Flags: --model_dir, --eval_data, --gin_file, --gin_bindings, --strategy, --tpu, and, for
the evaluation step, --jit_compile and --mixed_precision. `train`'s other flags (listed
below too: the verbs share one flag table) do not apply and are rejected.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import flags

from max_deeplab.cli import train
from max_deeplab.cli.flag_parsing import parse_flags
from max_deeplab.file_system import file_exists, read_text

# `train` flags that `evaluate` passes on to `train --mode eval`; the gin flags are passed
# on too. Any other `train` flag given to `evaluate` is an error: it would have no effect.
FORWARDED_TRAIN_FLAGS = ("model_dir", "eval_data", "strategy", "tpu", "jit_compile",
                         "mixed_precision")


class RunConfigError(ValueError):
    """A run directory's `run.json` is unreadable or not what `train` writes (names it)."""


def saved_gin_config(model_dir: str) -> str | None:
    """DIR/config.gin, the model config `train` saved in `model_dir`, if it is there."""
    path = os.path.join(model_dir, train.RUN_CONFIG_GIN)
    return path if file_exists(path) else None


def saved_data_flags(model_dir: str) -> dict[str, str | None]:
    """The data flags (`train_data`, `eval_data`) `train` recorded in DIR/run.json; {} when
    there is no run.json (e.g. a directory from `import-checkpoint`).

    Raises:
      RunConfigError: run.json is unreadable, not JSON, or not an object of data globs.
    """
    path = os.path.join(model_dir, train.RUN_CONFIG_JSON)
    try:
        if not file_exists(path):
            return {}
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise RunConfigError(f"cannot read the run config {path} (written by `train`): "
                             f"{e}") from e
    if not isinstance(data, dict):
        raise RunConfigError(f"run config {path} holds a JSON {type(data).__name__}; expected "
                             'an object like {"train_data": GLOB, "eval_data": GLOB}')
    for key in ("train_data", "eval_data"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RunConfigError(f"run config {path}: {key!r} must be a file glob (a string) "
                                 f"or null, got {data[key]!r}")
    return data


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
    if code == 0:
        _print_metrics(os.path.join(FLAGS.model_dir, "eval", "metrics.json"))
    return code


def _print_metrics(metrics_path: str) -> None:
    """Prints the PQ table of the metrics.json `train --mode eval` wrote."""
    from max_deeplab.evaluation.pq_core import format_table

    try:
        metrics: Any = json.loads(read_text(metrics_path))
    except FileNotFoundError:
        return  # not written by this worker (see `worker_write_dir`)
    print(format_table(metrics))
    print(f"metrics: {metrics_path}")
