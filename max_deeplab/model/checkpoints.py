"""Checkpoint keys of a model's variables and restoring with a clear report of mismatches.

Also the check that a checkpoint's files are whole (`check_checkpoint`): TensorFlow reports a
truncated data file as an IndexError "Read less bytes than requested" and a damaged index as
"not an sstable", naming no file; `train` (resuming or --initial_checkpoint), `evaluate` and
`export` call it before they build the model.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import tensorflow as tf

VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def checkpoint_keys(root: tf.Module | dict, prefix: str = "") -> dict[str, tf.Variable]:
    """Maps each variable reachable from `root` to the key `tf.train.Checkpoint` saves it
    under (breadth-first shortest attribute path, as TensorFlow names them).

    `root` may be a trackable or a dict of named trackables (like `tf.train.Checkpoint(**d)`).
    """
    children = root.items() if isinstance(root, dict) else None
    queue = collections.deque()
    seen: set[int] = set()
    keys: dict[str, tf.Variable] = {}
    if children is None:
        queue.append((prefix.rstrip("/"), root))
    else:
        for name, obj in children:
            queue.append((f"{prefix}{name}", obj))
    while queue:
        path, obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, tf.Variable):
            keys[path + VARIABLE_SUFFIX] = obj
            continue
        trackable_children = getattr(obj, "_trackable_children", None)
        if trackable_children is None:
            continue
        for name, child in trackable_children(save_type="checkpoint").items():
            queue.append((f"{path}/{name}" if path else name, child))
    return keys


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint); local or a
    URL (gs://...). The prefix is tried first: some file systems (ram://) also call a
    prefix of existing files a directory."""
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint found in directory {path!r}")
        return latest
    raise FileNotFoundError(f"no checkpoint at {path!r} (expected a directory holding a "
                            f"'checkpoint' file or a prefix with a '.index' file)")


class CheckpointReadError(ValueError):
    """A checkpoint's files are missing, truncated or corrupt (the message names the file)."""


_REPAIR_HINT = ("Restore the file from a copy, or, to continue from an earlier checkpoint of "
                "the same directory, name that one in the directory's 'checkpoint' file")


def _first_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return message.strip().splitlines()[0]


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _stored_bytes(reader: tf.train.CheckpointReader, key: str, dtype: tf.DType,
                  shape: Sequence[int]) -> int:
    """Bytes of one tensor's value in a checkpoint data file (TensorFlow's tensor bundle:
    fixed-size values back to back; a string tensor as varint lengths, a 4-byte checksum of
    them, then the bytes). String tensors (the object graph) are small and read here."""
    if dtype != tf.string:
        return math.prod(shape) * dtype.size
    value = reader.get_tensor(key)
    strings = [value] if isinstance(value, bytes) else list(value.reshape(-1))
    return sum(_varint_bytes(len(v)) + len(v) for v in strings) + 4


def check_checkpoint(prefix: str) -> None:
    """Raises CheckpointReadError unless checkpoint `prefix` looks whole: its index reads,
    and its data files exist and hold at least the bytes of the values the index lists.

    Cheap (the index, the file sizes and the small string tensors; no weight is read), so it
    runs before a model is built. Catches truncated copies and saves cut short (disk full, a
    kill mid-copy) and damaged indexes; damage inside a data file that keeps its length
    surfaces when the values are read (`reading_checkpoint`).
    """
    index = prefix + ".index"
    try:
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, IndexError, ValueError) as e:
        raise CheckpointReadError(
            f"checkpoint {prefix} cannot be read: its index file {index} is truncated or "
            f"not a checkpoint index ({_first_line(e)}). {_REPAIR_HINT}.") from e
    data_files = sorted(tf.io.gfile.glob(prefix + ".data-?????-of-?????"))
    if not data_files:
        raise CheckpointReadError(
            f"checkpoint {prefix} has no data file ({prefix}.data-00000-of-00001 missing: "
            f"only its index {index} is there). {_REPAIR_HINT}.")
    named = ", ".join(data_files)
    try:
        expected = sum(_stored_bytes(reader, key, dtype, shapes[key])
                       for key, dtype in dtypes.items())
    except (tf.errors.OpError, IndexError) as e:  # IndexError: "Read less bytes than ..."
        raise CheckpointReadError(
            f"checkpoint {prefix} cannot be read: its data file(s) {named} are truncated or "
            f"corrupt ({_first_line(e)}). {_REPAIR_HINT}.") from e
    actual = sum(tf.io.gfile.stat(path).length for path in data_files)
    if actual < expected:
        raise CheckpointReadError(
            f"checkpoint {prefix} is truncated: its data file(s) {named} hold {actual} bytes "
            f"but its index lists {expected} bytes of values (a save or copy cut short?). "
            f"{_REPAIR_HINT}.")


@contextlib.contextmanager
def reading_checkpoint(prefix: str) -> Iterator[None]:
    """Within the block, an error of TensorFlow's checkpoint reader (damaged files) becomes
    a CheckpointReadError naming checkpoint `prefix`."""
    try:
        yield
    except (tf.errors.OpError, IndexError) as e:  # IndexError: "Read less bytes than ..."
        raise CheckpointReadError(
            f"checkpoint {prefix} cannot be read: its data is corrupt ({_first_line(e)}). "
            f"{_REPAIR_HINT}.") from e


def remove_unfinished_saves(directory: str) -> list[str]:
    """Removes what checkpoint saves killed outright (SIGKILL, power loss) left in
    `directory`: TensorFlow writes a checkpoint into ``PREFIX_temp/`` and its state file
    through ``checkpoint.tmp<hex>`` before renaming them into place. Returns what it
    removed. Only for a directory no other process is saving into (a run's chief, at start).
    """
    directory = directory.rstrip("/")
    gfile = tf.io.gfile
    removed = []
    leftovers = gfile.glob(f"{directory}/*_temp") + gfile.glob(f"{directory}/checkpoint.tmp*")
    for path in sorted(leftovers):
        name = path.rsplit("/", 1)[-1]
        if name.endswith("_temp") and gfile.isdir(path):
            gfile.rmtree(path)
        elif name.startswith("checkpoint.tmp") and not gfile.isdir(path):
            gfile.remove(path)
        else:
            continue
        removed.append(path)
    return removed


def shape_mismatch_lines(entries: list[str], header: str = "with a different shape",
                         limit: int = 20) -> list[str]:
    """'N variable(s) <header>:' followed by at most `limit` of the entries."""
    if not entries:
        return []
    lines = [f"{len(entries)} variable(s) {header}:", *entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    return lines


def describe_mismatch(missing: dict[str, tuple], unused: dict[str, tuple],
                      limit: int = 20) -> str:
    """Lists unmatched names on both sides, each missing one with its closest shape match."""
    lines = []
    if missing:
        lines.append(f"{len(missing)} model variable(s) not found in the checkpoint:")
        by_shape = collections.defaultdict(list)
        for name, shape in unused.items():
            by_shape[tuple(shape)].append(name)
        for name, shape in list(missing.items())[:limit]:
            same = by_shape.get(tuple(shape), [])
            hint = f"  (same shape in checkpoint: {same[0]})" if same else ""
            lines.append(f"  - {name} {list(shape)}{hint}")
        if len(missing) > limit:
            lines.append(f"  ... and {len(missing) - limit} more")
    if unused:
        lines.append(f"{len(unused)} checkpoint variable(s) not used by the model:")
        for name, shape in list(unused.items())[:limit]:
            lines.append(f"  - {name} {list(shape)}")
        if len(unused) > limit:
            lines.append(f"  ... and {len(unused) - limit} more")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class KeyMatch:
    """How a model's variables (by checkpoint key) line up with a checkpoint's entries."""
    found: dict[str, tf.Variable]   # checkpoint key -> variable, same shape on both sides
    missing: dict[str, tuple]       # model keys absent from the checkpoint -> model shape
    wrong_shape: list[str]          # "  - key: model [..], checkpoint [..]" lines

    def assign_from(self, reader: tf.train.CheckpointReader) -> None:
        """Copies every found variable's value from the checkpoint."""
        for key, variable in self.found.items():
            variable.assign(reader.get_tensor(key))


def match_keys(wanted: Mapping[str, tf.Variable], available: Mapping[str, Sequence[int]],
               checkpoint_prefix: str = "") -> KeyMatch:
    """Matches `wanted` (model key -> variable) against `available` (a checkpoint's
    `get_variable_to_shape_map()`), the checkpoint's keys being `checkpoint_prefix + key`."""
    found, missing, wrong_shape = {}, {}, []
    for key, variable in wanted.items():
        theirs = available.get(checkpoint_prefix + key)
        if theirs is None:
            missing[key] = tuple(variable.shape)
        elif tuple(theirs) != tuple(variable.shape):
            wrong_shape.append(f"  - {checkpoint_prefix + key}: model {list(variable.shape)}, "
                               f"checkpoint {list(theirs)}")
        else:
            found[checkpoint_prefix + key] = variable
    return KeyMatch(found, missing, wrong_shape)


def is_weight_key(key: str) -> bool:
    """A model weight's key: not an optimiser slot (`.../.OPTIMIZER_SLOT/...`) nor bookkeeping
    (`save_counter`, `_CHECKPOINTABLE_OBJECT_GRAPH`)."""
    return key.endswith(VARIABLE_SUFFIX) and "/.OPTIMIZER_SLOT/" not in key


def restore(model: tf.keras.Model, path: str, *, root_name: str = "model",
            allow_unused: bool = True) -> str:
    """Loads every model weight from a checkpoint written by `train` or `import-checkpoint`.

    Checkpoints hold the model under `root_name` (`tf.train.Checkpoint(model=model, ...)`);
    other entries (optimizer, step) are ignored. Raises ValueError listing unmatched
    variables on each side (with the closest shape matches) if any model weight is missing
    or has another shape, CheckpointReadError (a ValueError) naming a damaged file. Returns
    the checkpoint prefix that was read.
    """
    prefix = resolve_checkpoint_path(path)
    check_checkpoint(prefix)
    reader = tf.train.load_checkpoint(prefix)
    available = reader.get_variable_to_shape_map()
    wanted = checkpoint_keys({root_name: model})
    match = match_keys(wanted, available)
    model_prefix = root_name + "/"
    unused = {k: tuple(s) for k, s in available.items()
              if k.startswith(model_prefix) and k not in wanted and is_weight_key(k)}
    if match.missing or match.wrong_shape or (unused and not allow_unused):
        message = [f"checkpoint {prefix} does not match the model:"]
        message.extend(shape_mismatch_lines(match.wrong_shape))
        message.append(describe_mismatch(match.missing, unused))
        raise ValueError("\n".join(m for m in message if m))
    with reading_checkpoint(prefix):
        match.assign_from(reader)
    return prefix
