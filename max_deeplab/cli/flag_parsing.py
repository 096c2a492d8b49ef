"""absl flag parsing that can run more than once per process (tests call verbs in-process)."""
from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str], doc: str = "") -> list[str] | None:
    """Parses `argv` into absl FLAGS from scratch; returns the positional rest.

    Returns None after printing help for `--help`/`-h` (the caller exits with 0).
    Unknown or malformed flags raise SystemExit(2) with absl's message, naming the flag.
    """
    FLAGS = flags.FLAGS
    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
        if doc:
            print(doc.strip() + "\n")
        print(FLAGS)
        return None
    FLAGS.unparse_flags()
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
