"""Imports every module that registers gin configurables, so any gin file or binding can
name them regardless of which verb runs. Keep it to imports (tests/test_configs.py checks
that every module with a configurable is here)."""
# ruff: noqa: F401
import max_deeplab.data.imagenet
import max_deeplab.data.pipeline
import max_deeplab.inference.postprocess
import max_deeplab.layers.axial_attention
import max_deeplab.layers.batch_norm_folding
import max_deeplab.layers.block_group
import max_deeplab.layers.dual_path_transformer
import max_deeplab.layers.residual_blocks
import max_deeplab.losses.max_deeplab_loss
import max_deeplab.model.encoder
import max_deeplab.model.heads
import max_deeplab.model.max_deeplab
import max_deeplab.training.experiment
import max_deeplab.training.optimizers
import max_deeplab.training.pretrain
import max_deeplab.training.schedules
