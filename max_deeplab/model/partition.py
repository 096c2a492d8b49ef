"""What each variable of the network is (docs/design.md §3), as the model's own structure says
it — not its name: which part of the network it belongs to, and whether it is the kernel of
a linear map.

Parts (`PARTS`; `MaXDeepLabEncoder.variable_parts`, `MaXDeepLab.variable_parts`):

* ``backbone``: the ImageNet-pretrainable pixel path — stem, stages and, in MaX-DeepLab-L,
  the backbone's own stacked decoder; what the encoder builds in `classification_mode`
  (paper appendix A.6). The optimiser's backbone learning-rate multiplier
  (`max_deeplab.training.optimizers.build_optimizer`) and backbone-only initial checkpoints
  (`max_deeplab.training.initial_checkpoint`) apply to exactly these.
* ``memory_path``: the memory, every dual-path transformer block (also those inside the
  backbone's stages) and the class / mask feature FFNs — trained from scratch.
* ``decoder``: the extra pixel-path layers (`*_extra`: the extra last stage, the extra
  stacked-decoder stages and their fuses).
* ``heads``: the pixel-space, mask and class heads and their batch norms.
* ``semantic_branch``: the auxiliary semantic decoder and head (training only).

Kernels (`kernel_variables`): the weights of the convolutions and dense layers, and those a
custom layer lists as `linear_kernels` (axial attention's query/key/value projection) — what
weight decay applies to (paper §4). Batch-norm parameters, biases, relative position
embeddings and the memory are not kernels.
"""
from __future__ import annotations

from collections.abc import Iterable

import tensorflow as tf
import tf_keras as tfk

PARTS = ("backbone", "memory_path", "decoder", "heads", "semantic_branch")
PART_DESCRIPTIONS = {
    "backbone": "pixel path of the pretrainable backbone (stem, stages, backbone decoder)",
    "memory_path": "dual-path transformers, memory slots, class/mask feature FFNs",
    "decoder": "extra pixel-path blocks and the stacked decoder (not pretrained)",
    "heads": "pixel-space, mask and class heads",
    "semantic_branch": "auxiliary semantic decoder + head (training only)",
}

# Keras layers whose kernel attributes are the weights of a linear map.
_LINEAR_LAYERS = (tfk.layers.Conv1D, tfk.layers.Conv2D, tfk.layers.Conv3D,
                  tfk.layers.DepthwiseConv2D, tfk.layers.SeparableConv2D, tfk.layers.Dense,
                  tfk.layers.EinsumDense)
_KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def variables_of(modules: Iterable[tf.Module | tf.Variable | None]) -> list[tf.Variable]:
    """The variables of `modules` (a variable stands for itself; None is skipped), each
    once, in order."""
    seen, out = set(), []
    for module in modules:
        if module is None:
            continue
        for variable in ([module] if isinstance(module, tf.Variable) else module.variables):
            if variable.ref() not in seen:
                seen.add(variable.ref())
                out.append(variable)
    return out


def in_order_of(variables: Iterable[tf.Variable], order: Iterable[tf.Variable]
                ) -> list[tf.Variable]:
    """`variables` in the order they have in `order` (e.g. a model's `variables`)."""
    wanted = {v.ref() for v in variables}
    return [v for v in order if v.ref() in wanted]


def kernel_variables(module: tf.Module) -> list[tf.Variable]:
    """The kernels of `module`'s layers (module docstring), in `module.variables` order."""
    kernels = []
    for layer in (module, *module.submodules):
        if isinstance(layer, _LINEAR_LAYERS):
            kernels += [getattr(layer, name) for name in _KERNEL_ATTRIBUTES
                        if isinstance(getattr(layer, name, None), tf.Variable)]
        kernels += list(getattr(layer, "linear_kernels", ()))
    return in_order_of(kernels, module.variables)


def check_partition(parts: dict[str, list[tf.Variable]], module: tf.Module) -> None:
    """Raises ValueError unless every variable of `module` is in exactly one part."""
    counts: dict[object, int] = {}
    for variables in parts.values():
        for variable in variables:
            counts[variable.ref()] = counts.get(variable.ref(), 0) + 1
    twice = [ref.deref().name for ref, n in counts.items() if n > 1]
    missing = [v.name for v in module.variables if v.ref() not in counts]
    if twice or missing:
        raise ValueError(f"{module.name}: variables in several parts: {twice[:5]}; in none: "
                         f"{missing[:5]}")
