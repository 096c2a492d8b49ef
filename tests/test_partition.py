"""The network's own partition of its variables (`max_deeplab.model.partition`) selects what
the regular expressions over variable names and checkpoint keys it replaced selected: the
backbone (learning-rate multiplier, backbone-only initial checkpoints), the parts `summary`
counts, and the kernels weight decay applies to — on the tiny model, MaX-DeepLab-S and -L."""
from __future__ import annotations

import re

import pytest

from max_deeplab.gin_config import parse_config
from max_deeplab.model import build_model
from max_deeplab.model.checkpoints import checkpoint_keys
from max_deeplab.model.partition import PARTS, check_partition, in_order_of, kernel_variables
from max_deeplab.training.initial_checkpoint import backbone_variables
from max_deeplab.training.optimizers import build_optimizer

# The selections as they were made before the model defined its partition (by name).
OLD_BACKBONE_VARIABLE_REGEX = (r"(^|/)encoder/(stem|stage[1-5]|decoder_stage\d+"
                               r"(_resized_fuse)?)/(?!block\d+_transformer/)")
OLD_KERNEL_VARIABLE_REGEX = r"kernel(:\d+)?$"


def old_is_backbone_key(encoder_relative_key: str) -> bool:
    head = encoder_relative_key.split("/", 1)[0]
    if head.startswith("memory_feature") or "extra" in head:
        return False
    return re.search(r"(^|/)_block\d+_transformer(/|$)", encoder_relative_key) is None


def old_part_of(key: str) -> str:
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


def _check_same_selection_as_before(model) -> None:
    parts = model.variable_parts()
    assert list(parts) == list(PARTS)
    check_partition(parts, model)  # every variable in exactly one part
    part_of = {v.ref(): part for part, variables in parts.items() for v in variables}
    for key, variable in checkpoint_keys(model.checkpoint_items).items():
        assert part_of[variable.ref()] == old_part_of(key), key

    # The backbone learning-rate multiplier and the weight decay of the optimiser.
    trainable = model.trainable_variables
    inner = build_optimizer(100_000, model).inner_optimizer
    multiplied = [v.name for v in trainable if inner.multiplier_of(v) == 0.1]
    assert multiplied == [v.name for v in trainable
                          if re.search(OLD_BACKBONE_VARIABLE_REGEX, v.name)]
    assert all(inner.multiplier_of(v) == 1.0 for v in trainable if v.name not in multiplied)
    decayed = [v.name for v in trainable if inner.decays(v)]
    old_kernels = [v.name for v in trainable if re.search(OLD_KERNEL_VARIABLE_REGEX, v.name)]
    assert decayed == old_kernels
    # Non-trainable variables are never kernels; the order is the model's (sums over the
    # kernels, as the pretraining loss's weight decay, add in the same order as before).
    assert [v.name for v in in_order_of(kernel_variables(model), trainable)] == old_kernels
    assert [v.name for v in kernel_variables(model)] == old_kernels

    # Backbone-only initial checkpoints load the same keys.
    assert set(backbone_variables(model)) == {
        key for key in checkpoint_keys(model.encoder) if old_is_backbone_key(key)}
    assert len(multiplied) > 0 and len(decayed) > 0


def test_tiny_model_partition_selects_what_the_names_did():
    parse_config(["tiny.gin"], [])
    _check_same_selection_as_before(build_model())


@pytest.mark.parametrize("gin_file", [
    "max_deeplab_s_coco_641.gin",
    pytest.param("max_deeplab_l_coco_1025.gin", marks=pytest.mark.slow),
])
def test_paper_model_partition_selects_what_the_names_did(gin_file):
    # The variables do not depend on the input size: built small to save time.
    parse_config([gin_file], ["build_model.input_size = (65, 65)"])
    try:
        _check_same_selection_as_before(build_model())
    finally:
        parse_config(["tiny.gin"], [])


def test_pretraining_classifier_decays_the_kernels_it_did():
    from max_deeplab.training.pretrain import build_classifier

    parse_config(["tiny.gin"], [])
    classifier = build_classifier(num_classes=10, image_size=33)
    trainable = classifier.trainable_variables
    assert [v.name for v in in_order_of(kernel_variables(classifier), trainable)] == [
        v.name for v in trainable if re.search(OLD_KERNEL_VARIABLE_REGEX, v.name)]
    # Its encoder is all backbone (what `load_backbone_checkpoint` copies).
    assert {v.ref() for v in classifier.encoder.backbone_variables} == {
        v.ref() for v in classifier.encoder.variables}
