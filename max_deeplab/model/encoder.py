"""The MaX-DeepLab encoder: CNN/axial backbone with dual-path transformers and the stacked
hourglass decoder (paper §3.3, Fig. 2, appendix A.6).

One gin-configurable class covers both paper models and every architecture ablation:
- MaX-DeepLab-S: ResNet-50 with an Inception stem ('resnet_beta'), axial P2P blocks at
  stride >= 16, dual-path transformers at stride 32 (the last stage, run atrous at 16),
  one extra (non-pretrained) last-stage block, and a decoder up to stride 4 (L = 0).
- MaX-DeepLab-L: Wide-ResNet-41 ('wider_resnet'), wide axial blocks, dual-path transformers
  at stride >= 16, and stacked decoders (one in the backbone, one extra: L = 2 passes).
- Ablations: `use_axial_beyond_stride=0` (conv P2P), transformer strides 8 or 4, number of
  stacked decoders, P2M/M2M switches via `dual_path_transformer_config`.

Attribute names mirror the reference implementation's checkpoint layout (`_stem`,
`_stage2`…`_stage5`, `_stage5_extra`, `_decoder_stage{k}[_extra]`,
`_decoder_stage{k}_resized_fuse`, `_class_feature_extra`, `_mask_feature_extra`,
`memory_feature`), so its published checkpoints load block for block.
"""
from __future__ import annotations

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.block_group import BlockGroup
from max_deeplab.layers.convolutions import BatchNormFactory, Conv1DBN, ConvBN, get_activation
from max_deeplab.layers.resized_fuse import ResizedFuse
from max_deeplab.model.partition import variables_of

# Layers named with this are not part of the ImageNet-pretrained backbone (the reference's
# checkpoint names; `variable_parts` says which layers are which).
EXTRA = "extra"

# Where the auxiliary semantic head reads: the paper's placement or the reference's.
SEMANTIC_FEATURES = ("paper", "reference")


class InceptionStem(tfk.layers.Layer):
    """Three 3x3 convs (the first with stride 2) replacing ResNet's 7x7 stem."""

    def __init__(self, width_multiplier: float = 1.0, activation: str = "relu",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization):
        super().__init__(name="stem")
        self._conv1_bn_act = ConvBN(int(64 * width_multiplier), 3, "conv1_bn_act", strides=2,
                                    bn_layer=bn_layer, activation=activation)
        self._conv2_bn_act = ConvBN(int(64 * width_multiplier), 3, "conv2_bn_act",
                                    bn_layer=bn_layer, activation=activation)
        self._conv3_bn = ConvBN(int(128 * width_multiplier), 3, "conv3_bn", bn_layer=bn_layer)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        x = self._conv1_bn_act(x, training=training)
        x = self._conv2_bn_act(x, training=training)
        return self._conv3_bn(x, training=training)


def _decoder_strides(output_stride: int, high_resolution_output_stride: int,
                     num_stacks: int) -> list[tuple[int, int]]:
    """(stage index, stride) of every decoder stage of the stacked hourglass.

    Strides go output_stride/2 ... high_res, then back up to output_stride, and so on, until
    `num_stacks` returns to output_stride are made and the last pass ends at high_res.
    """
    stages = []
    stride, stacks, going_down = output_stride, 0, True
    while stacks < num_stacks or stride > high_resolution_output_stride:
        stride = stride // 2 if going_down else stride * 2
        if stride == output_stride:
            stacks += 1
            going_down = True
        stages.append((len(stages) + 1, stride))
        if stride == high_resolution_output_stride:
            going_down = False
    return stages


@gin.configurable
class MaXDeepLabEncoder(tfk.layers.Layer):
    """Backbone + dual-path transformers + stacked decoder; returns named endpoints.

    Args (defaults = MaX-DeepLab-S):
      num_blocks: blocks of the stride-4/8/16/32 stages (a stride-2 stage of 3 blocks is
        prepended for 'wider_resnet').
      backbone_layer_multiplier / width_multiplier / stem_width_multiplier: depth/width
        scaling (the tiny test configs shrink them).
      output_stride: 16 (paper).
      backbone_type: 'resnet_beta' (S), 'wider_resnet' (L) or 'resnet'.
      use_axial_beyond_stride: axial P2P at strides >= this; 0 = conv P2P (ablation).
      backbone_use_transformer_beyond_stride / extra_decoder_use_transformer_beyond_stride:
        where dual-path transformers are inserted (32 for S; 16 for L; 8 or 4 for ablations).
      backbone_decoder_num_stacks / extra_decoder_num_stacks: stacked hourglass decoders in
        the pretrained backbone / in the extra layers (L = their sum; S: 0 + 0).
      num_mask_slots: N memory slots (paper 128); max_num_mask_slots sizes the memory weight.
      memory_channels: memory width (S 256, L 512).
      base_transformer_expansion: transformer width multiplier at stride 16 (S 1, L 2).
      global_feed_forward_network_channels: width of the class/mask feature FFNs.
      block_group_config: extra `BlockGroup` arguments (drop path, axial and transformer
        configs, attention bottleneck expansion).
      classification_mode: build only the pretrainable backbone (ImageNet pretraining).
      semantic_feature: where the auxiliary semantic head reads (`feature_semantic`).
        "paper" (§3.4 "Semantic segmentation"): on top of the backbone if there is no
        stacked decoder (L = 0), otherwise the first decoder output at stride 4 (kept apart
        from the final mask feature g). "reference" (deeplab2): the first stride-4 output
        of the extra (non-pretrained) decoder stacks if there are any, otherwise the
        backbone output, at stride 16 (so, e.g., after the backbone's own hourglass in the
        L = 1 ablation); MaX-DeepLab-L's published checkpoint was trained this way. The
        two agree for L = 0 (MaX-DeepLab-S).
    """

    def __init__(self, num_blocks=(3, 4, 6, 3), backbone_layer_multiplier: float = 1.0,
                 width_multiplier: float = 1.0, stem_width_multiplier: float = 1.0,
                 output_stride: int = 16, backbone_type: str = "resnet_beta",
                 use_axial_beyond_stride: int = 16,
                 backbone_use_transformer_beyond_stride: int = 32,
                 extra_decoder_use_transformer_beyond_stride: int = 32,
                 backbone_decoder_num_stacks: int = 0, backbone_decoder_blocks_per_stage: int = 1,
                 extra_decoder_num_stacks: int = 0, extra_decoder_blocks_per_stage: int = 1,
                 max_num_mask_slots: int = 128, num_mask_slots: int = 128,
                 memory_channels: int = 256, base_transformer_expansion: float = 1.0,
                 global_feed_forward_network_channels: int = 256,
                 high_resolution_output_stride: int = 4, activation: str = "relu",
                 block_group_config: dict | None = None, classification_mode: bool = False,
                 semantic_feature: str = "paper",
                 bn_layer: BatchNormFactory = tfk.layers.BatchNormalization,
                 name: str = "encoder"):
        super().__init__(name=name)
        if semantic_feature not in SEMANTIC_FEATURES:
            raise ValueError(f"semantic_feature must be one of {SEMANTIC_FEATURES}, got "
                             f"{semantic_feature!r}")
        self._semantic_feature = semantic_feature
        if extra_decoder_blocks_per_stage <= 0:
            raise ValueError("extra_decoder_blocks_per_stage must be positive")
        if num_mask_slots > max_num_mask_slots:
            raise ValueError(f"num_mask_slots={num_mask_slots} exceeds "
                             f"max_num_mask_slots={max_num_mask_slots}")
        block_group_config = dict(block_group_config or {})
        self._output_stride = output_stride
        self._high_res_stride = high_resolution_output_stride
        self._backbone_decoder_num_stacks = backbone_decoder_num_stacks
        self._extra_decoder_num_stacks = extra_decoder_num_stacks
        self._classification_mode = classification_mode
        self._activation_fn = get_activation(activation)
        self._num_mask_slots = num_mask_slots
        self._memory_shape = (1, max_num_mask_slots, memory_channels)
        self._use_memory = bool(backbone_use_transformer_beyond_stride or (
            extra_decoder_use_transformer_beyond_stride and not classification_mode))
        self._use_transformer = bool(backbone_use_transformer_beyond_stride
                                     or extra_decoder_use_transformer_beyond_stride)

        group_kwargs = dict(output_stride=output_stride, backbone_type=backbone_type,
                            use_axial_beyond_stride=use_axial_beyond_stride,
                            activation=activation, bn_layer=bn_layer, **block_group_config)
        input_strides = [1, 2, 4, 8, 16]
        stage_blocks = [3] + [int(n * backbone_layer_multiplier) for n in num_blocks]
        stage_strides = [2] * 5
        filters = [int(round(s * 32 * width_multiplier)) for s in input_strides]
        if backbone_type == "wider_resnet":
            filters[0] = int(round(32 * stem_width_multiplier))
            self._stem = ConvBN(int(round(64 * stem_width_multiplier)), 3, "stem", strides=2,
                                bn_layer=bn_layer)
            first_stage = 0
            stage_strides[0], input_strides[0] = 1, 2
        elif backbone_type == "resnet_beta":
            self._stem = InceptionStem(stem_width_multiplier, activation, bn_layer)
            first_stage = 1
        elif backbone_type == "resnet":
            self._stem = ConvBN(int(round(64 * stem_width_multiplier)), 7, "stem", strides=2,
                                bn_layer=bn_layer)
            first_stage = 1
        else:
            raise ValueError(f"backbone_type must be 'resnet', 'resnet_beta' or 'wider_resnet', "
                             f"got {backbone_type!r}")
        self._first_stage = first_stage
        for index in range(first_stage, 5):
            setattr(self, f"_stage{index + 1}", BlockGroup(
                filters[index], stage_blocks[index], f"stage{index + 1}",
                original_resnet_stride=stage_strides[index],
                original_resnet_input_stride=input_strides[index],
                use_transformer_beyond_stride=backbone_use_transformer_beyond_stride,
                transformer_expansion=base_transformer_expansion * input_strides[index] / 16,
                **group_kwargs))
        if classification_mode and backbone_decoder_num_stacks == 0:
            self._decoder_plan = []
            return
        if backbone_decoder_num_stacks == 0:
            self._stage5_extra = BlockGroup(
                filters[-1], extra_decoder_blocks_per_stage, "stage5_extra",
                original_resnet_stride=1, original_resnet_input_stride=32,
                use_transformer_beyond_stride=extra_decoder_use_transformer_beyond_stride,
                transformer_expansion=base_transformer_expansion, **group_kwargs)

        # The stacked decoder. Each stage: a ResizedFuse, then the block group of the
        # pretrained backbone part and/or of the extra part (the stage that closes the
        # backbone's last stack has both).
        self._decoder_plan = []
        stacks_done = 0
        in_backbone = backbone_decoder_num_stacks > 0
        visits = {}
        previous_stride = output_stride
        for stage, stride in _decoder_strides(output_stride, high_resolution_output_stride,
                                              backbone_decoder_num_stacks
                                              + extra_decoder_num_stacks):
            if stride == output_stride:
                stacks_done += 1
            nominal_stride = 32 if stride == output_stride else stride
            channels = int(round(nominal_stride * 64 * width_multiplier))
            expansion = base_transformer_expansion * stride / 16
            # Fuse inputs: the previous stage's output and the last two features at `stride`.
            visits[stride] = visits.get(stride, 0) + 1
            fuse_strides = [previous_stride] + [stride] * min(2, visits[stride])
            previous_stride = stride
            fuse_name = f"decoder_stage{stage}{'' if in_backbone else '_' + EXTRA}_resized_fuse"
            setattr(self, "_" + fuse_name, ResizedFuse(fuse_name, channels, fuse_strides, stride,
                                                      activation=activation, bn_layer=bn_layer))
            uses_backbone_group = in_backbone
            if in_backbone:
                setattr(self, f"_decoder_stage{stage}", BlockGroup(
                    channels // 4, backbone_decoder_blocks_per_stage, f"decoder_stage{stage}",
                    original_resnet_stride=1, original_resnet_input_stride=nominal_stride,
                    use_transformer_beyond_stride=backbone_use_transformer_beyond_stride,
                    transformer_expansion=expansion, **group_kwargs))
            ends_backbone = (stride == output_stride
                             and stacks_done == backbone_decoder_num_stacks)
            if ends_backbone:
                in_backbone = False
                if classification_mode:
                    self._decoder_plan.append((stage, fuse_name, stride, True, True, False))
                    break
            if not in_backbone:
                setattr(self, f"_decoder_stage{stage}_{EXTRA}", BlockGroup(
                    channels // 4, extra_decoder_blocks_per_stage,
                    f"decoder_stage{stage}_{EXTRA}",
                    original_resnet_stride=1, original_resnet_input_stride=nominal_stride,
                    use_transformer_beyond_stride=extra_decoder_use_transformer_beyond_stride,
                    transformer_expansion=expansion, **group_kwargs))
            self._decoder_plan.append((stage, fuse_name, stride, uses_backbone_group,
                                       ends_backbone, not in_backbone))
        if classification_mode:
            return
        if self._use_transformer:
            self._class_feature_extra = Conv1DBN(global_feed_forward_network_channels,
                                                 "class_feature_extra", bn_layer=bn_layer,
                                                 activation=activation)
            self._mask_feature_extra = Conv1DBN(global_feed_forward_network_channels,
                                                "mask_feature_extra", bn_layer=bn_layer,
                                                activation=activation)

    @property
    def semantic_feature_at_high_resolution(self) -> bool:
        """Whether `feature_semantic` is a stride-4 decoder output (else the stride-16
        backbone output, which needs a semantic decoder to reach stride 4)."""
        if self._semantic_feature == "paper":
            return self._backbone_decoder_num_stacks + self._extra_decoder_num_stacks > 0
        return self._extra_decoder_num_stacks > 0

    def variable_parts(self) -> dict[str, list[tf.Variable]]:
        """The encoder's variables by part of the network (`max_deeplab.model.partition`):
        ``backbone`` (the layers `classification_mode` builds, without their dual-path
        transformer blocks), ``memory_path`` (the memory, every dual-path transformer block,
        the class / mask feature FFNs) and ``decoder`` (the `*_extra` pixel-path layers).
        Every variable is in exactly one."""
        backbone = [self._stem] + [getattr(self, f"_stage{index + 1}")
                                   for index in range(self._first_stage, 5)]
        extra = [getattr(self, "_stage5_extra", None)]
        for stage, fuse_name, _, backbone_group, _, extra_group in self._decoder_plan:
            fuse = getattr(self, "_" + fuse_name)
            if backbone_group:
                backbone += [fuse, getattr(self, f"_decoder_stage{stage}")]
            else:
                extra.append(fuse)
            if extra_group:
                extra.append(getattr(self, f"_decoder_stage{stage}_{EXTRA}"))
        transformers = variables_of(block for group in backbone + extra
                                    if isinstance(group, BlockGroup)
                                    for block in group.transformer_blocks)
        memory = variables_of([getattr(self, "memory_feature", None), *transformers,
                               getattr(self, "_class_feature_extra", None),
                               getattr(self, "_mask_feature_extra", None)])
        in_memory = {v.ref() for v in transformers}
        return {
            "backbone": [v for v in variables_of(backbone) if v.ref() not in in_memory],
            "memory_path": memory,
            "decoder": [v for v in variables_of(extra) if v.ref() not in in_memory],
        }

    @property
    def backbone_variables(self) -> list[tf.Variable]:
        """The ImageNet-pretrainable backbone's variables (`variable_parts`)."""
        return self.variable_parts()["backbone"]

    def build(self, input_shape):
        if self._use_memory:
            self.memory_feature = self.add_weight(
                name="memory_feature", shape=self._memory_shape,
                initializer=tfk.initializers.TruncatedNormal(stddev=1.0))
        super().build(input_shape)

    def _run_group(self, group: BlockGroup, inputs, training: bool | None,
                   attention: dict | None):
        """`group(inputs)`; with an `attention` dict, its last dual-path block's M2P
        attention (if it has one) is stored there as "m2p_attention"."""
        if attention is None:
            return group(inputs, training=training)
        output, activated, memory, m2p = group(inputs, training=training,
                                               return_m2p_attention=True)
        if m2p is not None:
            attention["m2p_attention"] = m2p
        return output, activated, memory

    def call(self, images: tf.Tensor, training: bool | None = None,
             return_m2p_attention: bool = False) -> dict[str, tf.Tensor]:
        """Normalised images [b, H, W, 3] -> endpoints (features, memory-path features).

        With `return_m2p_attention`, the endpoint "m2p_attention": float32 [b, heads, N,
        h, w], the memory-to-pixel attention of the last dual-path transformer block run
        (paper appendix A.5), at that block's resolution.
        """
        attention = {} if return_m2p_attention else None
        memory = None
        if self._use_memory:
            memory = self.memory_feature[:, :self._num_mask_slots]
            memory = tf.tile(memory, [tf.shape(images)[0], 1, 1])
        endpoints = {}
        output = self._stem(images, training=training)
        activated = self._activation_fn(output)
        endpoints["stage1"], endpoints["res1"] = output, activated
        for index in range(self._first_stage, 5):
            output, activated, memory = self._run_group(
                getattr(self, f"_stage{index + 1}"), (activated, memory), training, attention)
            endpoints[f"stage{index + 1}"], endpoints[f"res{index + 1}"] = output, activated

        os = self._output_stride
        backbone_output = None
        if self._backbone_decoder_num_stacks == 0:
            backbone_output = activated
            endpoints["backbone_output"] = backbone_output
            if self._classification_mode:
                return endpoints
            output, activated, memory = self._run_group(
                self._stage5_extra, (activated, memory), training, attention)

        # Features available at each stride (the newest last); the stride-`os` list starts
        # with the last stage's output, which supersedes the backbone's stride-16 endpoint.
        stride_to_features: dict[int, list[tf.Tensor]] = {}
        for stage_stride, key in ((2, "stage1"), (4, "stage2"), (8, "stage3"), (16, "stage4")):
            stride_to_features[min(stage_stride, os)] = [endpoints[key]]
        stride_to_features[min(32, os)] = [output]
        stride_to_size = {s: feats[0].shape[1:3] for s, feats in stride_to_features.items()}

        high_res_outputs = []
        for stage, fuse_name, stride, backbone_group, ends_backbone, extra_group in (
                self._decoder_plan):
            inputs = [output] + stride_to_features[stride][-2:]
            fuse = getattr(self, "_" + fuse_name)
            activated = fuse(inputs, target_size=stride_to_size[stride],
                             training=training)
            if backbone_group:
                output, activated, memory = self._run_group(
                    getattr(self, f"_decoder_stage{stage}"), (activated, memory), training,
                    attention)
            if ends_backbone:
                backbone_output = activated
                endpoints["backbone_output"] = backbone_output
                if self._classification_mode:
                    return endpoints
            if extra_group:
                output, activated, memory = self._run_group(
                    getattr(self, f"_decoder_stage{stage}_{EXTRA}"), (activated, memory),
                    training, attention)
            stride_to_features[stride].append(output)
            if stride == self._high_res_stride:
                high_res_outputs.append(activated)

        if self._use_transformer:
            endpoints["transformer_class_feature"] = self._class_feature_extra(
                memory, training=training)
            endpoints["transformer_mask_feature"] = self._mask_feature_extra(
                memory, training=training)
        for index, feature in enumerate(high_res_outputs):
            endpoints[f"decoder_output{index}"] = feature  # stride-4 outputs, in order
        endpoints["feature_panoptic"] = high_res_outputs[-1]
        if not self.semantic_feature_at_high_resolution:
            endpoints["feature_semantic"] = backbone_output
        elif self._semantic_feature == "paper":
            endpoints["feature_semantic"] = high_res_outputs[0]
        else:
            endpoints["feature_semantic"] = high_res_outputs[self._backbone_decoder_num_stacks]
        if attention:
            endpoints.update(attention)
        return endpoints
