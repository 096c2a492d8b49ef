"""Parameter counts per part and FLOPs of a built model (the `summary` verb)."""
from __future__ import annotations

import collections
import re

import numpy as np
import tensorflow as tf

from max_deeplab.model.checkpoints import checkpoint_keys

PARTS = ("backbone", "memory_path", "decoder", "heads", "semantic_branch")
PART_DESCRIPTIONS = {
    "backbone": "pixel path of the pretrainable backbone (stem, stages, backbone decoder)",
    "memory_path": "dual-path transformers, memory slots, class/mask feature FFNs",
    "decoder": "extra pixel-path blocks and the stacked decoder (not pretrained)",
    "heads": "pixel-space, mask and class heads",
    "semantic_branch": "auxiliary semantic decoder + head (training only)",
}


def part_of(key: str) -> str:
    """Which part of the network a checkpoint key belongs to."""
    if key.startswith(("semantic_decoder/", "semantic_head_without_last_layer/",
                       "semantic_last_layer/")):
        return "semantic_branch"
    if not key.startswith("encoder/"):
        return "heads"
    if re.search(r"_transformer/|memory_feature|_class_feature_extra|_mask_feature_extra", key):
        return "memory_path"
    if re.search(r"_extra(/|_resized_fuse)", key):
        return "decoder"
    return "backbone"


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "non_trainable": n}} plus totals, by checkpoint key."""
    counts = collections.defaultdict(lambda: {"trainable": 0, "non_trainable": 0})
    for key, var in checkpoint_keys(model.checkpoint_items).items():
        kind = "trainable" if var.trainable else "non_trainable"
        counts[part_of(key)][kind] += int(np.prod(var.shape))
    return {part: dict(counts[part]) for part in PARTS}


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
