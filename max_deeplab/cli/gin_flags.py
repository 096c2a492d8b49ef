"""`--gin_file` / `--gin_bindings` for every verb that builds a model."""
from __future__ import annotations

import logging
import os

from absl import flags

flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); repeatable. Relative paths are "
                          "also looked up under the repo's configs/ directory.",
                          allow_override=True)
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. "
                          "'MaXDeepLab.num_mask_slots = 64'; repeatable.", allow_override=True)

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


class _QuietGinIncludeProbe(logging.Filter):
    """gin probes an `include` as a Python-package resource before its search paths and
    logs 'Path not found' at ERROR level even when the search path then finds it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                    and record.msg == "Path not found: %s")


logging.getLogger().addFilter(_QuietGinIncludeProbe())


def resolve_gin_file(path: str) -> str:
    """Finds a gin file as given, or relative to configs/; clear error otherwise."""
    candidates = [path, os.path.join(CONFIGS_DIR, path)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"gin file not found: {path!r} (looked in: {', '.join(candidates)})")


def parse_gin_flags(gin_files: list[str] | None = None,
                    gin_bindings: list[str] | None = None) -> None:
    """Clears gin state and applies the given (or flag) gin files and bindings."""
    import gin

    # Register every configurable before parsing so bindings can name them.
    import max_deeplab.configurables  # noqa: F401

    files = flags.FLAGS.gin_file if gin_files is None else gin_files
    bindings = flags.FLAGS.gin_bindings if gin_bindings is None else gin_bindings
    gin.clear_config()
    gin.add_config_file_search_path(CONFIGS_DIR)
    gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], bindings,
                                        finalize_config=False)
