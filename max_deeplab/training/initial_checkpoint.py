"""Initialising the panoptic model's backbone from a pretraining checkpoint (appendix A.6).

The paper pretrains the CNN path (stem and stages with their P2P blocks, plus, in
MaX-DeepLab-L, the backbone's own stacked decoder) on ImageNet, then adds the memory path
"with random initialization": the memory, the dual-path attentions and FFNs
(`_block<k>_transformer`), the `*_extra` layers (extra last stage, extra decoder stages, class
and mask feature FFNs) and the output heads. `load_backbone_checkpoint` copies exactly the
backbone variables from a checkpoint and leaves everything else as it is.

The encoder says which of its variables are the backbone (`variable_parts`, see
`max_deeplab.model.partition`); they are found in the checkpoint by their key below the
encoder: the classifier of `max-deeplab pretrain` and the panoptic model both hold the
encoder under the attribute `encoder`. Source checkpoints may be a pretraining checkpoint,
a panoptic checkpoint written by `train` (keys `model/encoder/...`), or one keyed like the
reference implementation (`encoder/...`); only their backbone variables are used.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf
from absl import logging

from max_deeplab.model.checkpoints import (
    checkpoint_keys,
    describe_mismatch,
    is_weight_key,
    match_keys,
    resolve_checkpoint_path,
    shape_mismatch_lines,
)

# Where the encoder's variables sit in checkpoints we can read, most specific first:
# ours (`tf.train.Checkpoint(model=...)` of `train` / `pretrain`) and the reference's.
ENCODER_PREFIXES = ("model/encoder/", "encoder/")

def backbone_variables(model: tf.Module) -> dict[str, tf.Variable]:
    """The model's backbone variables (its encoder's `backbone_variables`; an encoder that
    defines none is all backbone), keyed by their checkpoint key relative to its `encoder`
    attribute."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise TypeError(f"{type(model).__name__} has no `encoder` attribute; "
                        "expected a MaX-DeepLab model or pretraining classifier")
    backbone = {v.ref() for v in getattr(encoder, "backbone_variables", encoder.variables)}
    return {key: var for key, var in checkpoint_keys(encoder).items() if var.ref() in backbone}


@dataclasses.dataclass(frozen=True)
class BackboneLoadReport:
    """What `load_backbone_checkpoint` did."""
    checkpoint: str               # the checkpoint prefix read
    encoder_prefix: str           # where the encoder sat in it
    loaded: int                   # backbone variables copied
    model_variables: int          # all variables of the model (the rest keep their init)
    ignored_checkpoint_variables: int  # checkpoint encoder variables that are not backbone

    def __str__(self) -> str:
        return (f"initial checkpoint {self.checkpoint}: loaded {self.loaded} backbone "
                f"variables (of {self.model_variables} model variables; the memory path, "
                f"attentions, decoder extras and heads keep their random initialisation); "
                f"ignored {self.ignored_checkpoint_variables} non-backbone checkpoint "
                f"variables under {self.encoder_prefix!r}")


def load_backbone_checkpoint(model: tf.Module, path: str,
                             print_fn=print) -> BackboneLoadReport:
    """Copies every backbone variable of `model` from the checkpoint at `path`.

    `path` is a checkpoint prefix or a directory (its latest checkpoint). Every backbone
    variable of the model must be found with the same shape; otherwise a ValueError lists
    what did not match (a checkpoint of another architecture, width or depth). Variables
    outside the backbone are neither read nor changed. Returns (and prints) a report.
    """
    prefix = resolve_checkpoint_path(path)
    reader = tf.train.load_checkpoint(prefix)
    available = reader.get_variable_to_shape_map()
    wanted = backbone_variables(model)
    if not wanted:
        raise ValueError(f"{type(model).__name__} has no backbone variables (is it built?)")

    # Pick the encoder prefix under which most backbone keys are found.
    encoder_prefix = max(ENCODER_PREFIXES,
                         key=lambda p: sum(p + k in available for k in wanted))
    match = match_keys(wanted, available, encoder_prefix)
    encoder_keys = {k[len(encoder_prefix):]: tuple(s) for k, s in available.items()
                    if k.startswith(encoder_prefix) and is_weight_key(k)}
    # The checkpoint's encoder variables that may be backbone: all but those the model
    # itself has outside its backbone.
    not_backbone = set(checkpoint_keys(model.encoder)) - set(wanted)
    checkpoint_backbone = {k: s for k, s in encoder_keys.items() if k not in not_backbone}
    if len(match.missing) == len(wanted):
        raise ValueError(
            f"checkpoint {prefix} matches no backbone variable of the model (wrong "
            f"architecture, or not a MaX-DeepLab checkpoint; looked under "
            f"{', '.join(repr(p) for p in ENCODER_PREFIXES)}):\n"
            + describe_mismatch(match.missing, checkpoint_backbone))
    if match.wrong_shape or match.missing:
        unused = {k: s for k, s in checkpoint_backbone.items() if k not in wanted}
        message = [f"checkpoint {prefix} does not match the model's backbone "
                   f"(encoder keys under {encoder_prefix!r}):"]
        message.extend(shape_mismatch_lines(match.wrong_shape))
        if match.missing or unused:
            message.append(describe_mismatch(match.missing, unused))
        raise ValueError("\n".join(message))

    match.assign_from(reader)
    ignored = len(encoder_keys) - len(checkpoint_backbone)
    report = BackboneLoadReport(checkpoint=prefix, encoder_prefix=encoder_prefix,
                                loaded=len(match.found), model_variables=len(model.variables),
                                ignored_checkpoint_variables=ignored)
    logging.info("%s", report)
    if print_fn is not None:
        print_fn(str(report))
    return report
