"""A stage of residual blocks, each optionally followed by a dual-path transformer block.

Paper §3.3: the dual-path transformer "can be inserted at any stride": a block group at
(nominal ResNet) stride >= `use_transformer_beyond_stride` pairs every P2P block with a
memory-path layer. Blocks at stride >= `use_axial_beyond_stride` use axial attention for
P2P, others convolution. Strides beyond the output stride become atrous rates.
"""
from __future__ import annotations

import math

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.convolutions import BatchNormFactory, get_activation
from max_deeplab.layers.drop_path import constant_or_linear_keep_prob
from max_deeplab.layers.dual_path_transformer import DualPathTransformerBlock
from max_deeplab.layers.rematerialize import rematerialized_call
from max_deeplab.layers.residual_blocks import ResidualBlock


@gin.configurable
class BlockGroup(tfk.layers.Layer):
    """Residual blocks of one resolution, with optional dual-path transformer layers.

    Args:
      filters: base width of the group (the 3x3/attention width of a bottleneck).
      num_blocks: residual blocks in the group.
      original_resnet_stride: stride of the group's first block in the plain ResNet (1/2).
      original_resnet_input_stride: total input stride in the plain ResNet; with an output
        stride cap, striding beyond it turns into dilation.
      output_stride: largest stride of the network (paper: 16).
      backbone_type: 'resnet_beta' / 'resnet' (bottlenecks) or 'wider_resnet' (basic blocks
        and a wide last stage).
      use_axial_beyond_stride: axial attention P2P at strides >= this (0: never).
      use_transformer_beyond_stride: dual-path transformer at strides >= this (0: never).
      transformer_expansion: width multiplier of the transformer (filters = 128 * it).
      drop_path_keep_prob: keep probability of the residual branches (and the dual-path
        transformer's) at nominal stride >= drop_path_beyond_stride: the paper's drop path
        rate 0.2 is keep 0.8.
      drop_path_beyond_stride: the first nominal stride whose blocks drop paths (paper: 16;
        MaX-DeepLab-L's config: 4, as the reference's). A block's stride here is the one at
        its input: the first, striding block of a stage counts at the previous stride.
      drop_path_schedule: "constant" (default; the paper's single rate for every such
        block) or "linear" (the reference implementation's option: the rate grows with
        depth, keep 0.95 / 0.9 / 0.85 / 0.8 at stride 4 / 8 / 16 / 32 for keep 0.8; see
        `drop_path.constant_or_linear_keep_prob`).
      attention_bottleneck_expansion: width of an axial block's 1x1 convs vs `filters`.
      rematerialize: activation rematerialisation (default off; docs/design.md §7). In a
        training-mode call, each axial-attention residual block and each dual-path
        transformer block of the group keeps only its inputs and outputs for the backward
        pass, which recomputes its forward pass (1x1 convs, batch norms, the attention
        logits and softmaxes, drop path) to differentiate it
        (`max_deeplab.layers.rematerialize`). The recomputation updates no batch-norm
        moving statistics (the forward pass does, once per step) and reopens the forward
        pass's step-seed scope, so it draws the same drop-path masks: gradients, moving
        statistics and updates are the plain step's (bit for bit without XLA). Calls that
        build a block, and calls out of training, run normally. Convolutional blocks are
        not recomputed (recomputing them too saved nothing more). Measured on
        MaX-DeepLab-S, 321² crop, batch 1, RAdam + Lookahead, 2 CPU cores
        (benchmarks/bench_train_step.py, paper+remat): TF's allocator peak 2.27 -> 2.03
        GB (the step's own share above weights and optimiser slots 0.95 -> 0.76 GB), peak
        RSS unchanged, step time x1.10-1.14.
    """

    def __init__(self, filters: int, num_blocks: int, name: str, *,
                 original_resnet_stride: int, original_resnet_input_stride: int,
                 output_stride: int = 16, backbone_type: str = "resnet_beta",
                 use_axial_beyond_stride: int = 16, use_transformer_beyond_stride: int = 32,
                 transformer_expansion: float = 1.0, drop_path_keep_prob: float = 0.8,
                 drop_path_beyond_stride: int = 16, drop_path_schedule: str = "constant",
                 attention_bottleneck_expansion: int = 2, activation: str = "relu",
                 axial_layer_config: dict | None = None,
                 dual_path_transformer_config: dict | None = None,
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 rematerialize: bool = False):
        super().__init__(name=name)
        self._rematerialize = bool(rematerialize)
        self._axial_blocks: set[int] = set()
        for what, value in (("original_resnet_input_stride", original_resnet_input_stride),
                            ("output_stride", output_stride)):
            if value & (value - 1):
                raise ValueError(f"{what} must be a power of 2, got {value}")
        self._num_blocks = num_blocks
        self._activation_fn = get_activation(activation)
        current_stride = original_resnet_input_stride
        for index in range(num_blocks):
            first = index == 0
            strides = (original_resnet_stride
                       if first and original_resnet_input_stride < output_stride else 1)
            atrous_rate = current_stride // output_stride if current_stride > output_stride else 1
            end_stride = original_resnet_input_stride * original_resnet_stride
            second_rate = (end_stride // output_stride if first and end_stride > output_stride
                           else atrous_rate)
            keep_prob = 1.0
            if current_stride >= drop_path_beyond_stride:
                keep_prob = constant_or_linear_keep_prob(
                    drop_path_keep_prob, drop_path_schedule,
                    int(round(math.log2(current_stride) - 1)))
            attention_type = None
            if current_stride >= use_axial_beyond_stride > 0:
                attention_type = "axial"
                self._axial_blocks.add(index)
                filters_list = [filters * attention_bottleneck_expansion, filters, filters * 4]
            elif backbone_type in ("resnet", "resnet_beta"):
                filters_list = [filters, filters, filters * 4]
            elif backbone_type == "wider_resnet":
                filters_list = ([filters * 4, filters * 4] if end_stride < 32
                                else [filters, filters * 2, filters * 4])
            else:
                raise ValueError(f"backbone_type must be 'resnet', 'resnet_beta' or "
                                 f"'wider_resnet', got {backbone_type!r}")
            setattr(self, f"_block{index + 1}", ResidualBlock(
                filters_list, f"block{index + 1}", strides=strides, atrous_rate=atrous_rate,
                attention_type=attention_type, drop_path_keep_prob=keep_prob,
                drop_path_site=f"{name}/block{index + 1}", activation=activation,
                axial_layer_config=axial_layer_config,
                basic_block_second_conv_atrous_rate=second_rate, bn_layer=bn_layer))
            if first and original_resnet_stride > 1:
                current_stride *= original_resnet_stride
            transformer = None
            if current_stride >= use_transformer_beyond_stride > 0:
                transformer = DualPathTransformerBlock(
                    name=f"block{index + 1}_transformer",
                    filters=int(128 * transformer_expansion), drop_path_keep_prob=keep_prob,
                    drop_path_site=f"{name}/block{index + 1}_transformer",
                    activation=activation, bn_layer=bn_layer,
                    **(dual_path_transformer_config or {}))
            setattr(self, f"_block{index + 1}_transformer", transformer)

    @property
    def transformer_blocks(self) -> list[DualPathTransformerBlock]:
        blocks = (getattr(self, f"_block{i + 1}_transformer") for i in range(self._num_blocks))
        return [b for b in blocks if b is not None]

    @property
    def rematerialize(self) -> bool:
        return self._rematerialize

    def _recompute(self, block: tfk.layers.Layer, training) -> bool:
        """Whether this call of `block` is rematerialised: the switch is on, the call is a
        Python-True training call, and the block exists already (its first call builds it,
        and variables cannot be created inside a custom gradient)."""
        return (self._rematerialize and isinstance(training, (bool, int)) and bool(training)
                and block.built)

    def call(self, inputs, training: bool | None = None,
             return_m2p_attention: bool = False):
        """(activated pixels [b,h,w,c], memory [b,N,Cm] or None) -> (pixels, activated, memory).

        With `return_m2p_attention`, a fourth element: the memory-to-pixel attention of the
        group's last dual-path transformer block, float32 [b, heads, N, h, w] (the pixel
        part of the memory queries' softmax over [pixels; memory], paper §3.3), or None if
        the group has no transformer block.
        """
        activated, memory = inputs
        features = activated
        m2p_attention = None
        for index in range(self._num_blocks):
            block = getattr(self, f"_block{index + 1}")
            if index in self._axial_blocks and self._recompute(block, training):
                features, activated = rematerialized_call(
                    block, [activated], lambda x, block=block: block(x, training=True))
            else:
                features, activated = block(activated, training=training)
            transformer = getattr(self, f"_block{index + 1}_transformer")
            if transformer is not None:
                if memory is None:
                    raise ValueError(f"{self.name}: a dual-path transformer needs the memory")
                _, height, width, channels = features.shape.as_list()
                flat = tf.reshape(features, [-1, height * width, channels])
                if not return_m2p_attention and self._recompute(transformer, training):
                    flat, flat_activated, memory = rematerialized_call(
                        transformer, [flat, memory],
                        lambda p, m, block=transformer: block((p, m), training=True))
                    weights = []
                else:
                    flat, flat_activated, memory, *weights = transformer(
                        (flat, memory), training=training,
                        return_attention_weights=return_m2p_attention)
                if weights:
                    memory_weights = weights[0]["memory"]  # [b, heads, N, hw (+ N)]
                    m2p_attention = tf.reshape(
                        tf.cast(memory_weights[..., :height * width], tf.float32),
                        [-1, memory_weights.shape[1], memory_weights.shape[2], height, width])
                features = tf.reshape(flat, [-1, height, width, channels])
                activated = tf.reshape(flat_activated, [-1, height, width, channels])
        if return_m2p_attention:
            return features, activated, memory, m2p_attention
        return features, activated, memory
