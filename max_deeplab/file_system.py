"""Reading files by local path or TensorFlow file-system URL (``gs://bucket/...``).

Cloud TPU runs keep their data, model directories and configs in GCS buckets, which only
`tf.io.gfile` reads; verbs that must not import TensorFlow (`pq`, `synthetic`) read local
files. So: local paths through `os` / `glob`, URLs through `tf.io.gfile`, with TensorFlow
imported only for a URL. Also the local-directory helpers the writers share (where a
new directory would hang; creating missing directories and removing them again after a
failure). (Atomic writes: `max_deeplab.atomic_files`.)
"""
from __future__ import annotations

import errno
import glob
import os


def is_url(path: str) -> bool:
    """A TensorFlow file-system URL (``gs://...``, ``ram://...``) rather than a local path."""
    return "://" in path


def file_exists(path: str) -> bool:
    """Whether `path` is an existing file (not a directory). Raises OSError when a URL's
    file system cannot be asked (e.g. no permission)."""
    if not is_url(path):
        return os.path.isfile(path)
    import tensorflow as tf

    try:
        return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)
    except tf.errors.OpError as e:
        raise OSError(f"cannot access {path}: {e.message}") from e


def read_text(path: str) -> str:
    """The contents of the UTF-8 text file `path`. Raises OSError (FileNotFoundError when
    it does not exist), UnicodeDecodeError for a binary file."""
    if not is_url(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    except tf.errors.NotFoundError as e:
        # The same exception (and message) as `open` gives for a missing local file.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from e
    except tf.errors.OpError as e:
        raise OSError(f"cannot read {path}: {e.message}") from e


def glob_files(pattern: str) -> list[str]:
    """The paths matching the glob `pattern`, sorted; [] also when its directory does not
    exist. Raises OSError when a URL's file system cannot be listed."""
    if not is_url(pattern):
        return sorted(glob.glob(pattern))
    import tensorflow as tf

    try:
        return sorted(tf.io.gfile.glob(pattern))
    except tf.errors.NotFoundError:
        return []
    except tf.errors.OpError as e:
        raise OSError(f"cannot list {pattern}: {e.message}") from e


def nearest_existing_path(path: str) -> str:
    """The absolute local `path` itself or its closest ancestor that exists: where a
    directory still to be created would hang (a file there means it cannot be)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def create_missing_dirs(path: str) -> list[str]:
    """Creates directory `path` and any missing parents; returns those it created, deepest
    first, so that a writer that fails can remove them again (`remove_empty_dirs`)."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    created: list[str] = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
            created.insert(0, directory)
    except OSError:
        remove_empty_dirs(created)
        raise
    return created


def remove_empty_dirs(directories: list[str]) -> None:
    """Removes `directories` (deepest first) while they are empty; best effort, as the
    writer's own error is the one to report."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (another process wrote there) or already gone
            return
