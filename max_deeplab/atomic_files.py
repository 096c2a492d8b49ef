"""Writing a file so that readers see either the old or the complete new contents.

Metrics, run configs and annotation files are read by other processes (a sweep's
collector, `evaluate`, a user's shell) while runs are still going, and a run may be killed
or preempted mid-write. Each file is therefore written under a temporary name in the same
directory and renamed over the target; on failure the temporary file is removed and the
previous file is left as it was.

Local paths go through `os` (no TensorFlow import: the `pq` and `synthetic` verbs use this
too); URLs such as ``gs://bucket/run`` (Cloud TPU model directories) through
`tf.io.gfile`, imported only then.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from max_deeplab.file_system import is_url


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see module docstring); creates the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_url(path):
        import tensorflow as tf

        gfile = tf.io.gfile
        gfile.makedirs(os.path.dirname(path))
        try:
            with gfile.GFile(tmp, "w") as f:  # GFile writes UTF-8
                f.write(text)
            gfile.rename(tmp, path, overwrite=True)
        finally:
            _remove_quietly(gfile.exists, gfile.remove, tmp)
        return
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        _remove_quietly(os.path.exists, os.remove, tmp)


def _remove_quietly(exists: Callable[[str], bool], remove: Callable[[str], None],
                    path: str) -> None:
    """Removes a leftover temporary file; a failure here must not hide the write's error."""
    try:
        if exists(path):
            remove(path)
    except Exception:  # best effort: the caller's own exception is what matters
        pass


def write_json_atomic(path: str, data: Any, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Writes ``data`` as newline-terminated JSON atomically (``indent``, ``default`` as in
    `json.dumps`)."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=default) + "\n")
