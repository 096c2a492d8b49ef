"""`max-deeplab summary`: parameter counts per part and FLOPs of the configured model."""
from __future__ import annotations

import sys

from absl import flags

from max_deeplab.cli import shared_flags
from max_deeplab.gin_config import parse_config

FLAGS = shared_flags.new_flag_values()
shared_flags.define_gin_flags(FLAGS)
flags.DEFINE_bool("flops", True, "Also count FLOPs at the configured input size (traces the "
                  "model once; a few seconds for MaX-DeepLab-S).", flag_values=FLAGS)

DOC = """Prints parameter counts (total, backbone, memory path, decoder, heads, semantic
branch) and FLOPs of the model configured by --gin_file/--gin_bindings. The line
`total_params: N` counts the trainable weights used at inference (everything except the
training-only auxiliary semantic branch); `semantic_head_params: N` counts that branch."""


def main(argv: list[str]) -> int:
    if shared_flags.parse_flags(argv, FLAGS, DOC) is None:
        return 0
    try:
        parse_config(FLAGS.gin_file, FLAGS.gin_bindings)
    except (FileNotFoundError, ValueError) as e:
        print(f"max-deeplab summary: {e}", file=sys.stderr)
        return 2
    import gin

    from max_deeplab.model import build_model
    from max_deeplab.model.partition import PART_DESCRIPTIONS
    from max_deeplab.model.summary import inference_params, model_flops, parameter_counts

    model = build_model()
    input_size = gin.query_parameter("build_model.input_size") if _bound(
        "build_model.input_size") else (641, 641)
    counts = parameter_counts(model)
    print(f"model: {model.name}  input: {input_size[0]}x{input_size[1]}")
    print(f"{'part':<16} {'trainable':>13} {'bn statistics':>14}  description")
    for part, c in counts.items():
        print(f"{part:<16} {c['trainable']:>13,} {c['non_trainable']:>14,}  "
              f"{PART_DESCRIPTIONS[part]}")
    total = inference_params(counts)
    print(f"total_params: {total}")
    print(f"semantic_head_params: {counts['semantic_branch']['trainable']}")
    print(f"bn_statistics: {sum(c['non_trainable'] for c in counts.values())}")
    if FLAGS.flops:
        flops, semantic_flops = model_flops(model, tuple(input_size))
        print(f"flops: {flops}  ({flops / 1e9:.1f} GFLOPs at batch 1, multiply-add = 2 FLOPs, "
              f"without the semantic branch)")
        print(f"semantic_branch_flops: {semantic_flops}")
    return 0


def _bound(name: str) -> bool:
    import gin
    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False
