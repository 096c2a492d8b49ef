"""Import of the reference implementation's (deeplab2) MaX-DeepLab checkpoints.

The paper's authors published COCO-trained MaX-DeepLab checkpoints (S at 641 and 1025, L at
1025) in their TF2 implementation's object-based checkpoint format (docs/design.md §3,
`docs/reference_checkpoints.md`). Our model is laid out block for block like theirs, and
`MaXDeepLab.checkpoint_items` names its top-level parts as theirs, so
`checkpoint_keys(model.checkpoint_items)` reproduces their checkpoint keys
(`<top>/<attribute path>/.ATTRIBUTES/VARIABLE_VALUE`). The mapping is therefore the identity
on names, with exactly these documented exceptions:

* **Semantic head output channels.** deeplab2's COCO label space has 134 semantic channels,
  channel 0 being COCO's void/ignore label and channels 1..133 the 133 classes; our
  auxiliary semantic head has C = 133 outputs (class k = their channel k + 1). The importer
  takes ``[..., 1:]`` of ``semantic_last_layer/kernel`` and ``/bias``, after checking that the
  reference has exactly one more channel than our layer.
* The transformer class head needs no change: its 134 outputs are the 133 classes followed by
  the void class ∅, which is our ``class_logits`` layout ``[C + 1]``.
* **Ignored entries** (reported, never used): the bookkeeping counters ``global_step`` and
  ``save_counter``; the optimizers' state a deeplab2 training checkpoint carries (everything
  under the top-level ``optimizer`` / ``backbone_optimizer`` entries, and slot variables,
  whose keys contain ``/.OPTIMIZER_SLOT/``); the ``_CHECKPOINTABLE_OBJECT_GRAPH`` record,
  which is the checkpoint's object-graph description, not a variable.

Anything else must match one to one: every reference variable is used and every model
variable is filled with a value of the same shape, or `ReferenceImportError` lists what is
left on each side (with the closest shape matches) and the model is left untouched.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.model.checkpoints import (
    VARIABLE_SUFFIX,
    checkpoint_keys,
    describe_mismatch,
    shape_mismatch_lines,
)

BOOKKEEPING_KEYS = (f"global_step{VARIABLE_SUFFIX}", f"save_counter{VARIABLE_SUFFIX}")
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
OPTIMIZER_ROOTS = ("optimizer", "backbone_optimizer")
OPTIMIZER_SLOT_MARKER = "/.OPTIMIZER_SLOT/"
# What TensorFlow's checkpoint reader raises on unreadable files (a truncated .data file
# gives IndexError "Read less bytes than requested").
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError)


class ReferenceImportError(ValueError):
    """The reference checkpoint cannot be read or does not match the model."""


@dataclasses.dataclass(frozen=True)
class ChannelSlice:
    """Our variable is the reference variable's last axis from ``start`` on."""

    start: int
    reason: str

    def reference_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
        ours = tuple(int(d) for d in ours)
        return ours[:-1] + (ours[-1] + self.start,)

    def __call__(self, value: np.ndarray) -> np.ndarray:
        return value[..., self.start:]


_VOID_CHANNEL = ChannelSlice(
    1, "deeplab2's COCO semantic channel 0 is the void/ignore label; channels 1..133 are "
       "our classes 0..132")
TRANSFORMS: dict[str, ChannelSlice] = {
    f"semantic_last_layer/kernel{VARIABLE_SUFFIX}": _VOID_CHANNEL,
    f"semantic_last_layer/bias{VARIABLE_SUFFIX}": _VOID_CHANNEL,
}


def classify_reference_key(key: str) -> str:
    """'weight', or why the key is ignored: 'bookkeeping', 'optimizer' or 'metadata'."""
    if key in BOOKKEEPING_KEYS:
        return "bookkeeping"
    if key == OBJECT_GRAPH_KEY:
        return "metadata"
    if key.split("/", 1)[0] in OPTIMIZER_ROOTS or OPTIMIZER_SLOT_MARKER in key:
        return "optimizer"
    return "weight"


@dataclasses.dataclass
class ImportPlan:
    """Model key -> how to fill it from the reference (same key; optional transform)."""

    keys: list[str]
    transforms: dict[str, ChannelSlice]
    ignored: dict[str, list[str]]  # category -> reference keys

    def describe_ignored(self) -> list[str]:
        lines = []
        if self.ignored.get("bookkeeping"):
            names = ", ".join(sorted(k.split("/", 1)[0] for k in self.ignored["bookkeeping"]))
            lines.append(f"ignored {len(self.ignored['bookkeeping'])} bookkeeping counter(s) "
                         f"(not model weights): {names}")
        if self.ignored.get("optimizer"):
            lines.append(f"ignored {len(self.ignored['optimizer'])} optimizer entries "
                         f"({'/'.join(OPTIMIZER_ROOTS)} state and .OPTIMIZER_SLOT variables)")
        for key, transform in self.transforms.items():
            lines.append(f"transformed {key.replace(VARIABLE_SUFFIX, '')}: "
                         f"[..., {transform.start}:] ({transform.reason})")
        return lines


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def plan_import(model_shapes: Mapping[str, Sequence[int]],
                reference_shapes: Mapping[str, Sequence[int]],
                source: str = "reference checkpoint") -> ImportPlan:
    """Matches model keys to reference keys one to one, checking shapes.

    Raises ReferenceImportError listing the model variables left without a value, the
    reference variables left unused (each missing one with a same-shape candidate), and the
    variables present on both sides with another shape.
    """
    ignored: dict[str, list[str]] = {"bookkeeping": [], "optimizer": [], "metadata": []}
    weights: dict[str, tuple[int, ...]] = {}
    for key, shape in reference_shapes.items():
        kind = classify_reference_key(key)
        if kind == "weight":
            weights[key] = _shape(shape)
        else:
            ignored[kind].append(key)
    missing: dict[str, tuple[int, ...]] = {}
    mismatched: list[str] = []
    transforms: dict[str, ChannelSlice] = {}
    for key, shape in model_shapes.items():
        shape = _shape(shape)
        if key not in weights:
            missing[key] = shape
            continue
        transform = TRANSFORMS.get(key)
        expected = transform.reference_shape(shape) if transform else shape
        if weights[key] != expected:
            note = f" (reference expected to be {list(expected)}: {transform.reason})" \
                if transform else ""
            mismatched.append(f"  - {key}: model {list(shape)}, reference "
                              f"{list(weights[key])}{note}")
        elif transform:
            transforms[key] = transform
    unused = {k: s for k, s in weights.items() if k not in model_shapes}
    if missing or unused or mismatched:
        lines = [f"{source} does not match the model: {len(model_shapes)} model variables, "
                 f"{len(weights)} reference weights"]
        lines.extend(shape_mismatch_lines(mismatched, "on both sides with another shape"))
        lines.append(describe_mismatch(missing, unused))
        lines.append("Is --gin_file the config the checkpoint was trained with "
                     "(e.g. max_deeplab_s_coco_641.gin for MaX-DeepLab-S)?")
        raise ReferenceImportError("\n".join(line for line in lines if line))
    return ImportPlan(keys=list(model_shapes), transforms=transforms, ignored=ignored)


def resolve_reference_path(path: str) -> str:
    """A checkpoint prefix from a prefix, an ``.index``/``.data-*`` file name, or a
    directory (its ``checkpoint`` file, else the only ``*.index`` file beneath it, as in an
    unpacked model-zoo tarball)."""
    if path.endswith(".index") and tf.io.gfile.exists(path):
        return path[: -len(".index")]
    if ".data-" in os.path.basename(path) and tf.io.gfile.exists(path):
        return path[: path.rindex(".data-")]
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is not None:
            return latest
        found = sorted(glob.glob(os.path.join(path, "**", "*.index"), recursive=True))
        if len(found) == 1:
            return found[0][: -len(".index")]
        if not found:
            raise ReferenceImportError(f"no checkpoint in directory {path!r}: expected a "
                                       f"'checkpoint' file or a '<prefix>.index' file")
        raise ReferenceImportError(
            f"several checkpoints in {path!r}; pass one prefix: "
            + ", ".join(f[: -len(".index")] for f in found[:10]))
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise ReferenceImportError(
        f"no reference checkpoint at {path!r} (expected a directory, a checkpoint prefix "
        f"with a '.index' file beside it, or the '.index' file itself)")


def read_reference(path: str) -> tuple[str, tf.train.CheckpointReader, dict[str, tuple]]:
    """Opens a reference checkpoint: (prefix, reader, key -> shape)."""
    prefix = resolve_reference_path(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = {k: _shape(s) for k, s in reader.get_variable_to_shape_map().items()}
    except _READ_ERRORS as e:
        message = getattr(e, "message", str(e)).strip().splitlines()[0]
        raise ReferenceImportError(f"cannot read reference checkpoint {prefix!r}: {message} "
                                   f"(is it a complete, uncorrupted TF checkpoint?)") from e
    return prefix, reader, shapes


def model_reference_keys(model: tfk.Model) -> dict[str, tf.Variable]:
    """Every model variable under its reference checkpoint key.

    Raises ReferenceImportError if the model is unbuilt or holds variables that
    ``checkpoint_items`` does not reach (they could never be filled from the reference).
    """
    if not model.variables:
        raise ReferenceImportError("the model has no variables yet: build it first "
                                   "(max_deeplab.model.build_model())")
    keys = checkpoint_keys(model.checkpoint_items)
    reached = {id(v) for v in keys.values()}
    stray = [v.name for v in model.variables if id(v) not in reached]
    if stray:
        raise ReferenceImportError(
            f"{len(stray)} model variable(s) are outside checkpoint_items and have no "
            f"reference counterpart: " + ", ".join(stray[:20]))
    return keys


@dataclasses.dataclass
class ImportReport:
    prefix: str
    mapped: int
    values: int
    trainable_params: int
    plan: ImportPlan

    def lines(self) -> list[str]:
        return [f"mapped {self.mapped} variables from {self.prefix} "
                f"({self.values:,} values; {self.trainable_params:,} trainable parameters)",
                *self.plan.describe_ignored()]


def import_reference_checkpoint(model: tfk.Model, path: str) -> ImportReport:
    """Fills every weight of a built ``model`` from a deeplab2 MaX-DeepLab checkpoint.

    All values are read and checked before any is assigned, so on error the model is left
    unchanged. Returns a report of what was mapped, transformed and ignored.
    """
    prefix, reader, shapes = read_reference(path)
    variables = model_reference_keys(model)
    plan = plan_import({k: v.shape for k, v in variables.items()}, shapes,
                       source=f"reference checkpoint {prefix}")
    values = {}
    for key in plan.keys:
        try:
            value = reader.get_tensor(key)
        except _READ_ERRORS as e:
            message = getattr(e, "message", str(e)).strip().splitlines()[0]
            raise ReferenceImportError(f"cannot read {key!r} from reference checkpoint "
                                       f"{prefix!r}: {message} (is the .data file complete "
                                       f"and uncorrupted?)") from e
        if key in plan.transforms:
            value = plan.transforms[key](value)
        values[key] = value
    for key, value in values.items():
        variables[key].assign(value.astype(variables[key].dtype.as_numpy_dtype, copy=False))
    report = ImportReport(
        prefix=prefix, mapped=len(values),
        values=int(sum(np.prod(v.shape) for v in values.values())),
        trainable_params=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        plan=plan)
    return report


def _mkdir_mode() -> int:
    """The permissions `os.mkdir` gives a new directory: 0o777 less the process umask (which
    can only be read by setting it; it is restored at once)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o777 & ~umask


def write_model_checkpoint(model: tfk.Model, output_dir: str, overwrite: bool = False,
                           extra_files: Mapping[str, str] | None = None) -> str:
    """Writes ``tf.train.Checkpoint(model=model)`` as ``output_dir/ckpt-0`` (with the
    ``checkpoint`` index file, so `max_deeplab.model.restore(model, output_dir)` finds it),
    plus ``extra_files`` (file name -> text) beside it.

    Atomic: written into a temporary sibling directory, then renamed into place, so a failure
    leaves no partial output. Returns the checkpoint prefix.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not (os.path.isdir(output_dir)
                                           and not os.listdir(output_dir)):
        if not overwrite:
            raise FileExistsError(f"output {output_dir!r} exists and is not empty "
                                  f"(pass --overwrite to replace it)")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        # mkdtemp makes the directory 0700; the output gets what a plain mkdir would give,
        # so other users (a serving account) can read the imported checkpoint.
        os.chmod(tmp, _mkdir_mode())
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), tmp,
                                             max_to_keep=1)
        manager.save(checkpoint_number=0)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        old = None
        if os.path.exists(output_dir):
            # Move the previous output aside, and back if the final rename fails.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.rename(output_dir, os.path.join(old, "previous"))
        try:
            os.rename(tmp, output_dir)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, "previous"), output_dir)
                os.rmdir(old)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(output_dir, "ckpt-0")
