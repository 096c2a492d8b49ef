"""The MaX-DeepLab model: encoder + mask transformer output heads (paper §3.1, §3.3).

Outputs: the dict of `max_deeplab.model.outputs` (stride-4 maps are not upsampled):
`mask_logits` = BN(f · g), whose softmax over the N slots gives the masks m̂ (Eq. 15),
`class_logits` (last class void ∅), `pixel_feature` g (L2-normalised), `semantic_logits`.

Mixed precision (tf_keras' mixed_bfloat16 policy, `max-deeplab train --mixed_precision
bfloat16`): weights stay float32 and the encoder and heads compute in bfloat16, but every
output is float32, so the losses, the matching and the softmaxes over slots and classes run
in float32. The mask-logit head (the L2 normalisation of g, f · g and its batch norm) is
float32 throughout: f · g sums D products and, with gamma 0.1, small logit differences decide
the masks. Under the float32 policy every cast here is an identity.
"""
from __future__ import annotations

import math

import gin
import tensorflow as tf
import tf_keras as tfk

from max_deeplab.layers.convolutions import Conv1DBN
from max_deeplab.model.encoder import MaXDeepLabEncoder
from max_deeplab.model.heads import ConvHead, SemanticDecoder
from max_deeplab.model.outputs import (
    CLASS_LOGITS,
    M2P_ATTENTION,
    MASK_LOGITS,
    PIXEL_FEATURE,
    SEMANTIC_LOGITS,
)
from max_deeplab.model.partition import PARTS, variables_of


@gin.configurable
def batch_norm_layer(momentum: float = 0.99, epsilon: float = 1e-3,
                     synchronized: bool = False):
    """The batch-norm factory every layer uses. `synchronized=True` gives cross-replica BN:
    batch statistics over the global batch, as the paper trains (§4, following
    Axial-DeepLab; set by the paper configs). Same variables either way."""

    def make(**kwargs):
        return tfk.layers.BatchNormalization(momentum=momentum, epsilon=epsilon,
                                             synchronized=synchronized, **kwargs)
    return make


@gin.configurable
class MaXDeepLab(tfk.Model):
    """MaX-DeepLab panoptic model.

    Args:
      num_classes: C, the number of thing + stuff classes (COCO: 133).
      mask_dim: D, channels of the mask embeddings f and pixel features g (paper: 128).
      pixel_head_channels / semantic_head_channels: widths of the 5x5 head convs.
      void_prior_prob: initial void probability of every slot (a constant logit offset,
        as in the reference implementation): 0.9.
      use_semantic_head: build the auxiliary semantic head (training-only, §3.4).
      encoder: the encoder (gin-configured `MaXDeepLabEncoder` by default).
    """

    def __init__(self, num_classes: int = 133, mask_dim: int = 128,
                 pixel_head_channels: int = 256, semantic_head_channels: int = 256,
                 void_prior_prob: float = 0.9, use_semantic_head: bool = True,
                 encoder: tfk.layers.Layer | None = None, name: str = "max_deeplab"):
        # autocast=False: images reach `call` as given and are normalised in float32 before the
        # encoder (a mixed-precision layer) casts them to its compute dtype.
        super().__init__(name=name, autocast=False)
        bn = batch_norm_layer()
        self.num_classes = num_classes
        self.encoder = encoder if encoder is not None else MaXDeepLabEncoder(bn_layer=bn)
        self.pixel_space_head = ConvHead(pixel_head_channels, mask_dim, "pixel_space_head",
                                         bn_layer=bn)
        self.transformer_mask_head = Conv1DBN(mask_dim, "transformer_mask_head", bn_layer=bn)
        self.transformer_class_head = Conv1DBN(
            num_classes + 1, "transformer_class_head", use_bias=True, use_bn=False,
            kernel_initializer=tfk.initializers.TruncatedNormal(stddev=0.01))
        # The mask-logit head's batch norms compute (and output) float32 under any policy.
        self.pixel_space_feature_batch_norm = bn(axis=-1, name="pixel_space_feature_batch_norm",
                                                 dtype="float32")
        # A low initial temperature on the mask logits (gamma 0.1), shared by all slots.
        self.pixel_space_mask_batch_norm = bn(
            axis=-1, name="pixel_space_mask_batch_norm",
            gamma_initializer=tfk.initializers.Constant(0.1), dtype="float32")
        self._void_logit_offset = math.log(num_classes * void_prior_prob / (1 - void_prior_prob))
        self.use_semantic_head = use_semantic_head
        self.semantic_decoder = None
        self.semantic_head = None
        if use_semantic_head:
            # A semantic feature at stride 16 (the backbone output; see
            # `MaXDeepLabEncoder.semantic_feature`) needs its own decoder to reach stride 4.
            if not getattr(self.encoder, "semantic_feature_at_high_resolution", False):
                self.semantic_decoder = SemanticDecoder(bn_layer=bn)
            self.semantic_head = ConvHead(semantic_head_channels, num_classes, "semantic_head",
                                          bn_layer=bn)

    @property
    def checkpoint_items(self) -> dict[str, tf.Module]:
        """Top-level objects under the reference implementation's checkpoint names."""
        items = {
            "encoder": self.encoder,
            "pixel_space_head": self.pixel_space_head,
            "transformer_mask_head": self.transformer_mask_head,
            "transformer_class_head": self.transformer_class_head,
            "pixel_space_feature_batch_norm": self.pixel_space_feature_batch_norm,
            "pixel_space_mask_batch_norm": self.pixel_space_mask_batch_norm,
        }
        if self.semantic_decoder is not None:
            items["semantic_decoder"] = self.semantic_decoder
        if self.semantic_head is not None:
            items["semantic_head_without_last_layer"] = self.semantic_head.conv_block
            items["semantic_last_layer"] = self.semantic_head.final_conv
        return items

    @property
    def semantic_branch_variables(self) -> list[tf.Variable]:
        """Weights used only by the training-time auxiliary semantic loss."""
        return variables_of([self.semantic_decoder, self.semantic_head])

    def variable_parts(self) -> dict[str, list[tf.Variable]]:
        """Every variable by part of the network (`max_deeplab.model.partition.PARTS`): the
        encoder's parts, the heads and the semantic branch; each variable in exactly one."""
        parts = self.encoder.variable_parts()
        parts["heads"] = variables_of([
            self.pixel_space_head, self.transformer_mask_head, self.transformer_class_head,
            self.pixel_space_feature_batch_norm, self.pixel_space_mask_batch_norm])
        parts["semantic_branch"] = self.semantic_branch_variables
        return {part: parts[part] for part in PARTS}

    @property
    def backbone_variables(self) -> list[tf.Variable]:
        """The ImageNet-pretrainable backbone's variables (learning-rate multiplier,
        backbone-only initial checkpoints; `max_deeplab.model.partition`)."""
        return self.encoder.backbone_variables

    def call(self, images: tf.Tensor, training: bool | None = None,
             return_m2p_attention: bool = False) -> dict[str, tf.Tensor]:
        """float images [B, H, W, 3] in [0, 255] -> the output dict (`outputs.OUTPUT_KEYS`).

        `return_m2p_attention=True` adds `outputs.M2P_ATTENTION`: float32 [B, heads, N, h, w],
        the memory-to-pixel attention of the last dual-path transformer block (paper
        appendix A.5; its share of each slot's softmax over the h·w pixels and, with M2M, the
        N slots), for analysis; the default call (and the SavedModel) leave it out.
        """
        x = tf.cast(images, tf.float32) / 127.5 - 1.0
        if return_m2p_attention:
            endpoints = self.encoder(x, training=training, return_m2p_attention=True)
        else:
            endpoints = self.encoder(x, training=training)
        outputs = {}
        if M2P_ATTENTION in endpoints:
            outputs[M2P_ATTENTION] = endpoints[M2P_ATTENTION]
        if self.semantic_head is not None:
            semantic_feature = endpoints["feature_semantic"]
            if (self.semantic_decoder is not None and semantic_feature.shape[1:3]
                    != endpoints["feature_panoptic"].shape[1:3]):
                semantic_feature = self.semantic_decoder(semantic_feature, endpoints,
                                                         training=training)
            outputs[SEMANTIC_LOGITS] = tf.cast(
                self.semantic_head(semantic_feature, training=training), tf.float32)

        # g: per-pixel mask embedding, batch-normalised then L2-normalised (paper Eq. 15).
        pixel_feature = self.pixel_space_head(endpoints["feature_panoptic"], training=training)
        pixel_feature = self.pixel_space_feature_batch_norm(pixel_feature, training=training)
        pixel_feature = tf.math.l2_normalize(tf.cast(pixel_feature, tf.float32), axis=-1)
        outputs[PIXEL_FEATURE] = pixel_feature

        class_logits = tf.cast(self.transformer_class_head(
            endpoints["transformer_class_feature"], training=training), tf.float32)
        void_offset = tf.one_hot(self.num_classes, self.num_classes + 1,
                                 on_value=self._void_logit_offset, dtype=tf.float32)
        outputs[CLASS_LOGITS] = class_logits + void_offset

        # f: per-slot mask embedding; m̂ logits = BN(f · g), one BN shared by all slots.
        mask_kernel = tf.cast(self.transformer_mask_head(endpoints["transformer_mask_feature"],
                                                         training=training), tf.float32)
        mask_logits = tf.einsum("bhwd,bnd->bhwn", pixel_feature, mask_kernel)
        mask_logits = self.pixel_space_mask_batch_norm(mask_logits[..., None], training=training)
        outputs[MASK_LOGITS] = mask_logits[..., 0]
        return outputs


@gin.configurable
def build_model(input_size: tuple[int, int] = (641, 641), batch_size: int | None = None,
                model_cls=MaXDeepLab) -> MaXDeepLab:
    """Builds the gin-configured model and creates its weights with a symbolic call.

    `input_size` is the (height, width) the model is built and traced for; the layers
    themselves work for any size whose stride-16 feature map fits the axial span.
    """
    model = model_cls()
    images = tfk.Input(shape=(input_size[0], input_size[1], 3), batch_size=batch_size)
    model(images, training=False)
    return model
