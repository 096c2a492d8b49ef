"""Writing a file so that readers see either the old or the complete new contents.

Metrics, run configs and annotation files are read by other processes (a sweep's
collector, `evaluate`, a user's shell) while runs are still going, and a run may be killed
or preempted mid-write. Each file is therefore written under a temporary name in the same
directory and renamed over the target; on failure the temporary file is removed and the
previous file is left as it was.

Temporary names (`temporary_path`) are hidden, ``DIR/.NAME.tmp-<pid>``: a process killed
with SIGKILL cannot remove its temporary file, and a visible ``DIR/NAME.tmp-<pid>`` would
match the globs that pick up the finished files (``--train_data 'DIR/train-*'``, ``DIR/*``).
The writer's process id in the name tells a later run whether the writer is gone
(`temporary_owner`).

Local paths go through `os` (no TensorFlow import: the `pq` and `synthetic` verbs use this
too); URLs such as ``gs://bucket/run`` (Cloud TPU model directories) through
`tf.io.gfile`, imported only then.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from max_deeplab.file_system import is_url

# NAME.tmp-PID, hidden (a leading dot) or, as written before temporaries were hidden, not.
_TEMPORARY_NAME = re.compile(r"^\.?(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temporary_path(path: str) -> str:
    """Where this process writes `path` before renaming it into place: a hidden file in the
    same directory (same file system, so the rename is atomic), named with the process id."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def is_temporary(path: str) -> bool:
    """Whether `path` is named like a temporary file of `temporary_path` (or of the older,
    visible ``NAME.tmp-PID`` naming)."""
    return _TEMPORARY_NAME.match(os.path.basename(path)) is not None


def temporary_owner(path: str) -> int | None:
    """The id of the process that wrote the temporary file `path`; None if it is not one."""
    match = _TEMPORARY_NAME.match(os.path.basename(path))
    return int(match.group("pid")) if match else None


def process_is_running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie, exited but not yet reaped
    by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (command) state ...": the command may hold spaces and parentheses.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux), or it exited meanwhile
        return True


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see module docstring); creates the directory."""
    tmp = temporary_path(path)
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
