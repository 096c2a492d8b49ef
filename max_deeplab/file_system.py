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
import stat


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


def file_size(path: str) -> int:
    """The size of file `path` in bytes. Raises OSError (FileNotFoundError when it does not
    exist)."""
    if not is_url(path):
        return os.path.getsize(path)
    import tensorflow as tf

    try:
        return tf.io.gfile.stat(path).length
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from e
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


class NotARegularFileError(OSError):
    """A path named as a data file is a FIFO, a device, a socket or a directory."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def read_regular_file(path: str) -> bytes:
    """The bytes of the local file `path`, which must be a regular file (or a symlink to one).

    For files named by a data set (annotation JSON -> images, PNGs): reading a FIFO named
    there would wait for a writer forever and a device such as /dev/zero would never end, so
    the file is opened without blocking and checked before it is read. Raises OSError:
    FileNotFoundError, NotARegularFileError (its message says what the path is), others.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise NotARegularFileError(f"not a regular file but {kind}")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


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


def directory_problem(directory: str) -> str | None:
    """Why files cannot be written in the local `directory` (created if missing), or None:
    a file at or above it, or no permission to write where it is or would be created."""
    path = os.path.abspath(directory)
    anchor = nearest_existing_path(path)
    if not os.path.isdir(anchor):
        if anchor == path:
            return f"{directory} is a file, not a directory"
        return f"{directory} cannot be created: {anchor} is a file"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return f"no permission to write in {anchor}"
    return None


def output_file_problem(path: str) -> str | None:
    """Why the local file `path` cannot be written (atomically, beside itself), or None:
    it is a directory, or `directory_problem` of its directory. Cheap: for checking an
    output flag before the work starts."""
    if os.path.isdir(path):
        return f"{path} is a directory"
    return directory_problem(os.path.dirname(os.path.abspath(path)))


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
