"""Where the backward pass keeps memory: the activations the training step saves for its
gradient, per layer (docs/memory.md, "Saved activations").

A tensor the forward pass computes and the backward pass reads has to stay alive from the
moment it is computed until the backward pass reaches its consumer; at the turn between the
two passes all of them are alive at once, and with the weights, the optimiser state and the
gradient being computed they make the step's peak. This script finds them in the traced
graph of the step, with no run needed:

- the backward pass is every op that depends on the gradient's seed (the ones tensor the
  loss gradient starts from, named `backward_seed` here) and that the step's outputs need
  (ops the runtime would prune do not count);
- a saved activation is an input of a backward op produced outside the backward pass:
  variable reads, constants and the step's own inputs excluded (they are resident anyway),
  views followed to the buffer they share (Reshape, ExpandDims, Squeeze, Identity, the k-th
  output of an IdentityN to its k-th input, a Pad by zero), each buffer counted once. An op
  the backward pass needs that does not depend on the seed (`Shape`, a ReLU's mask) runs
  during the forward pass, so it is the forward tensor it keeps that counts, not its input.

Sizes are from the static shapes of a fixed-size batch; a tensor of unknown shape is
counted apart. Grappler and XLA may fuse, re-order or free earlier; this is the program as
traced (the BFC allocator's tensor peak of `bench_train_step.py` is the measured result).

The step is `bench_train_step.py`'s: MaX-DeepLab at a square crop, batch 1, training-mode
forward, `MaXDeepLabLoss` (scipy matcher), gradients of the total loss.

Usage:
  .venv/bin/python benchmarks/saved_activations.py [--config max_deeplab_s_coco_641.gin]
      [--crop 321] [--depth 3] [--top 15] [--gin "BlockGroup.rematerialize = True"]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SEED_NAME = "backward_seed"
# Ops whose output is a view of their first input's buffer (TensorFlow forwards it).
VIEW_OPS = frozenset({"Reshape", "ExpandDims", "Squeeze", "Identity", "IdentityN",
                      "StopGradient", "Snapshot", "EnsureShape", "PreventGradient"})
# Producers whose tensors are not activations of the step: resident anyway.
RESIDENT_OPS = frozenset({"ReadVariableOp", "Const", "Placeholder", "VarHandleOp"})
GRADIENT_SCOPE = "gradient_tape/"


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One buffer the backward pass reads: its bytes (None if its shape is not static), the
    tensor's name, its producing op's type, its shape and the layer scope it belongs to
    (the op's name scope, without TensorFlow's `gradient_tape/` prefix)."""

    nbytes: int | None
    name: str
    op_type: str
    shape: tuple
    scope: str


def _ancestors(ops) -> set:
    seen, stack = set(), list(ops)
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def _descendants(op, consumers) -> set:
    seen, stack = set(), [op]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(consumers.get(op, ()))
    return seen


def _zero_padding(op) -> bool:
    """A Pad whose paddings are all zero: TensorFlow forwards the input buffer."""
    if op.type not in ("Pad", "PadV2") or len(op.inputs) < 2:
        return False
    import tensorflow as tf

    paddings = tf.get_static_value(op.inputs[1])
    return paddings is not None and not paddings.any()


def _buffer_of(t):
    """The tensor whose buffer `t` shares: views followed to their source (an IdentityN's
    k-th output is its k-th input)."""
    while t.op.inputs and (t.op.type in VIEW_OPS or _zero_padding(t.op)):
        t = t.op.inputs[t.value_index if t.op.type == "IdentityN" else 0]
    return t


def saved_activations(graph, seed_name: str = SEED_NAME) -> list[SavedTensor]:
    """The forward tensors the backward pass of `graph` reads (see the module docstring),
    largest first. `graph` is a traced step (`concrete_function.graph`) whose gradient
    starts from an op named `seed_name`."""
    ops = graph.get_operations()
    seed = graph.get_operation_by_name(seed_name)
    consumers: dict = collections.defaultdict(list)
    for op in ops:
        for t in op.inputs:
            consumers[t.op].append(op)
        for control in op.control_inputs:
            consumers[control].append(op)
    outputs = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    backward = _descendants(seed, consumers) & _ancestors(outputs)
    saved: dict[str, SavedTensor] = {}
    for op in backward:
        for t in op.inputs:
            if t.op in backward:
                continue
            t = _buffer_of(t)
            if t.op.type in RESIDENT_OPS or t.name in saved:
                continue
            shape = t.shape
            nbytes = (shape.num_elements() * t.dtype.size if shape.is_fully_defined()
                      else None)
            scope = t.op.name.removeprefix(GRADIENT_SCOPE)
            saved[t.name] = SavedTensor(nbytes, t.name, t.op.type,
                                        tuple(shape.as_list()) if shape.rank is not None
                                        else (), scope)
    return sorted(saved.values(), key=lambda s: (-(s.nbytes or 0), s.name))


def bytes_by_scope(saved: list[SavedTensor], depth: int) -> dict[str, int]:
    """Saved bytes per name scope cut to its first `depth` components (a tensor outside any
    layer counts under its op's name), largest first."""
    totals: collections.Counter = collections.Counter()
    for s in saved:
        totals["/".join(s.scope.split("/")[:depth])] += s.nbytes or 0
    return dict(totals.most_common())


def bytes_by_op_type(saved: list[SavedTensor]) -> dict[str, int]:
    """Saved bytes per producing op type, largest first."""
    totals: collections.Counter = collections.Counter()
    for s in saved:
        totals[s.op_type] += s.nbytes or 0
    return dict(totals.most_common())


def traced_training_step(config: str, crop: int, bindings: list[str]):
    """The graph of MaX-DeepLab's training-mode forward, loss and gradients for `config` at a
    `crop` x `crop` batch of one (bench_train_step.py's batch), its gradient seeded by an op
    named `SEED_NAME`."""
    import tensorflow as tf
    from synthetic_step_batch import synthetic_step_batch

    from max_deeplab.gin_config import parse_config
    from max_deeplab.losses import MaXDeepLabLoss
    from max_deeplab.model import build_model

    parse_config([config], [f"build_model.input_size = ({crop}, {crop})", *bindings])
    model = build_model()
    loss_fn = MaXDeepLabLoss(matching_backend="scipy")
    batch = synthetic_step_batch(model, crop)

    @tf.function
    def step(image):
        with tf.GradientTape() as tape:
            losses = loss_fn(model(image, training=True), dict(batch, image=image))
        seed = tf.ones_like(losses["total"], name=SEED_NAME)
        return tape.gradient(losses["total"], model.trainable_variables,
                             output_gradients=seed)

    return step.get_concrete_function(tf.TensorSpec(batch["image"].shape, tf.float32)).graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="max_deeplab_s_coco_641.gin")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--depth", type=int, default=3,
                        help="name-scope components per row (3: stage, 4: block)")
    parser.add_argument("--top", type=int, default=15, help="rows of each table")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    saved = saved_activations(traced_training_step(args.config, args.crop, args.gin))
    mib = 2 ** 20
    total = sum(s.nbytes or 0 for s in saved)
    unknown = sum(s.nbytes is None for s in saved)
    print(f"{args.config} at {args.crop}x{args.crop}, batch 1 {' '.join(args.gin)}: "
          f"{len(saved)} saved tensors, {total / mib:.1f} MiB"
          + (f" (+{unknown} of unknown shape)" if unknown else ""))
    print(f"\nby layer (name scope, {args.depth} components)")
    for scope, nbytes in list(bytes_by_scope(saved, args.depth).items())[:args.top]:
        print(f"  {nbytes / mib:8.1f} MiB {100 * nbytes / total:5.1f}%  {scope}")
    print("\nby producing op")
    for op_type, nbytes in list(bytes_by_op_type(saved).items())[:args.top]:
        print(f"  {nbytes / mib:8.1f} MiB {100 * nbytes / total:5.1f}%  {op_type}")
    print("\nlargest tensors")
    for s in saved[:args.top]:
        print(f"  {(s.nbytes or 0) / mib:8.2f} MiB  {s.op_type:<16} {str(s.shape):<22} {s.name}")


if __name__ == "__main__":
    main()
