"""absl flag parsing that can run more than once per process (tests call verbs in-process)."""
from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

# Every verb takes --verbose: `max_deeplab.__main__` reads it before TensorFlow is imported.
flags.DEFINE_boolean("verbose", False, "Also show TensorFlow's start-up and C++ log lines "
                     "(hidden by default) and INFO log messages.", allow_override=True)


def parse_flags(argv: list[str], doc: str = "") -> list[str] | None:
    """Parses `argv` into absl FLAGS from scratch; returns `[argv[0]]` (no verb takes
    positional arguments).

    Returns None after printing help for `--help`/`-h` (the caller exits with 0).
    Unknown or malformed flags, and any positional argument, raise SystemExit(2) with a
    message naming them.
    """
    FLAGS = flags.FLAGS
    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
        if doc:
            print(doc.strip() + "\n")
        print(FLAGS)
        return None
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    if FLAGS.verbose:
        absl_logging.set_verbosity(absl_logging.INFO)
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
