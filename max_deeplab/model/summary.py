"""Parameter counts per part and FLOPs of a built model (the `summary` verb)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from max_deeplab.model.partition import PARTS


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "non_trainable": n}} for each part of the network
    (`model.variable_parts()`, `max_deeplab.model.partition.PARTS`)."""
    counts = {}
    for part, variables in model.variable_parts().items():
        counts[part] = {"trainable": 0, "non_trainable": 0}
        for var in variables:
            kind = "trainable" if var.trainable else "non_trainable"
            counts[part][kind] += int(np.prod(var.shape))
    return {part: counts[part] for part in PARTS}


def inference_params(counts: dict[str, dict[str, int]]) -> int:
    """Trainable weights used at inference: everything but the auxiliary semantic branch
    (the convention of the paper's and the reference implementation's counts)."""
    return sum(c["trainable"] for part, c in counts.items() if part != "semantic_branch")


def _einsum_flops(equation: str, shapes: list[list[int]]) -> int:
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, shape in zip(inputs, shapes):
        if "..." in letters:
            return 0
        for letter, size in zip(letters, shape):
            sizes[letter] = size
    return 2 * int(np.prod(list(sizes.values()), dtype=np.int64))


def count_flops(fn: tf.types.experimental.ConcreteFunction,
                scope: str | None = None) -> int:
    """2 x multiply-accumulates of every convolution, matmul and einsum in a traced graph
    (only ops whose name contains `scope`, if given).

    Element-wise ops, softmaxes, normalisations and resizes are not counted (they are a few
    percent of the total for this network).
    """
    total = 0
    for op in fn.graph.get_operations():
        if scope is not None and scope not in op.name:
            continue
        try:
            out = op.outputs[0].shape.as_list() if op.outputs else None
            ins = [t.shape.as_list() for t in op.inputs]
        except ValueError:
            continue
        if op.type == "Conv2D":
            kh, kw, cin, _ = ins[1]
            total += 2 * int(np.prod(out)) * kh * kw * cin
        elif op.type == "DepthwiseConv2dNative":
            kh, kw, _, _ = ins[1]
            total += 2 * int(np.prod(out)) * kh * kw
        elif op.type == "Conv1D":
            total += 2 * int(np.prod(out)) * int(np.prod(ins[1][:-1]))
        elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            transpose_a = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
            k = ins[0][-2] if transpose_a else ins[0][-1]
            total += 2 * int(np.prod(out)) * k
        elif op.type == "Einsum":
            total += _einsum_flops(op.get_attr("equation").decode(), ins)
    return total


def model_flops(model, input_size: tuple[int, int]) -> tuple[int, int]:
    """(inference FLOPs without the semantic branch, semantic-branch FLOPs) of one forward
    pass at batch 1 and the given (height, width)."""
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, input_size[0], input_size[1], 3], tf.float32))
    semantic = sum(count_flops(fn, scope=f"/{layer.name}/")
                   for layer in (model.semantic_decoder, model.semantic_head) if layer is not None)
    return count_flops(fn) - semantic, semantic
