"""The flags several verbs share, defined once, and absl flag parsing for the verbs.

Each verb keeps its flags in a `flags.FlagValues` of its own (`new_flag_values`), so it
defines, lists in its --help and accepts exactly its own flags, whichever other verbs the
process has imported (tests run verbs in-process). The definitions below are the ones used
by more than one verb.
"""
from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

from max_deeplab.training.modes import STRATEGIES


def new_flag_values() -> flags.FlagValues:
    """A verb's own flag table, with --verbose (every verb takes it:
    `max_deeplab.__main__` reads it before TensorFlow is imported)."""
    flag_values = flags.FlagValues()
    flags.DEFINE_boolean("verbose", False, "Also show TensorFlow's start-up and C++ log lines "
                         "(hidden by default) and INFO log messages.", flag_values=flag_values)
    return flag_values


def define_gin_flags(flag_values: flags.FlagValues) -> None:
    """--gin_file / --gin_bindings, for every verb that builds a model."""
    flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); repeatable. Relative paths "
                              "are also looked up in the bundled configs/ directory.",
                              flag_values=flag_values)
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. "
                              "'MaXDeepLab.num_mask_slots = 64'; repeatable.",
                              flag_values=flag_values)


def define_strategy_flags(flag_values: flags.FlagValues, strategy_default_help: str) -> None:
    """--strategy and --tpu, for the verbs that run a model under `tf.distribute`."""
    flags.DEFINE_enum("strategy", None, list(STRATEGIES),
                      f"Distribution strategy; default: {strategy_default_help}.",
                      flag_values=flag_values)
    flags.DEFINE_string("tpu", None, "TPU name or address (implies --strategy=tpu).",
                        flag_values=flag_values)


def define_model_dir_flag(flag_values: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE_string("model_dir", None, help_text, flag_values=flag_values)


def define_step_compile_flags(flag_values: flags.FlagValues) -> None:
    """--jit_compile and --mixed_precision: how a training or evaluation step is compiled."""
    flags.DEFINE_boolean("jit_compile", None, "Compile each step with XLA (single replica / "
                         "TPU).", flag_values=flag_values)
    flags.DEFINE_enum("mixed_precision", None, ["bfloat16"], "Mixed precision (TPU).",
                      flag_values=flag_values)


def define_eval_data_flag(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("eval_data", None, "Evaluation TFRecord glob.", flag_values=flag_values)


def parse_flags(argv: list[str], flag_values: flags.FlagValues, doc: str = ""
                ) -> list[str] | None:
    """Parses `argv` into `flag_values` from scratch (a verb may run more than once per
    process); returns `[argv[0]]` (no verb takes positional arguments).

    Returns None after printing help for `--help`/`-h` (the caller exits with 0).
    Unknown or malformed flags, and any positional argument, raise SystemExit(2) with a
    message naming them.
    """
    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
        if doc:
            print(doc.strip() + "\n")
        print(flag_values)
        return None
    flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    # absl's log handler writes a "logging before flag parsing" notice until its own
    # (global) flags are parsed; no verb takes them, so they are parsed empty.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS([argv[0]])
    absl_logging.set_verbosity(absl_logging.INFO if flag_values.verbose
                               else absl_logging.WARNING)
    if len(rest) > 1:
        # Every verb takes flags only; a stray word is most often the second file of an
        # unquoted glob (`--images dir/*.jpg`) or of `--gin_file a.gin b.gin`, and ignoring
        # it would silently process less than asked.
        stray = " ".join(repr(a) for a in rest[1:])
        print(f"{argv[0]}: unexpected positional argument(s): {stray}. Every value must "
              "follow its flag (--flag VALUE); quote globs so the shell does not expand "
              "them (--images 'dir/*.jpg'), and repeat a repeatable flag for each value "
              "(--gin_file a.gin --gin_file b.gin).", file=sys.stderr)
        raise SystemExit(2)
    return rest
