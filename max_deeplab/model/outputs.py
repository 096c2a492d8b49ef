"""The model's output contract (docs/design.md §3): the keys of the dict `MaXDeepLab` returns
and their shapes, and the check that the loss and the post-processing make of what they are
given. Stride-4 maps are not upsampled inside the model.

=====================  ==================  ================================================
key                    shape               content
=====================  ==================  ================================================
``mask_logits``        [B, h, w, N]        BN(f · g); softmax over N gives the masks m̂
``class_logits``       [B, N, C+1]         the last class is void ∅
``pixel_feature``      [B, h, w, D]        the L2-normalised decoder feature g
``semantic_logits``    [B, h, w, C]        the auxiliary semantic head (training only)
``m2p_attention``      [B, heads, N, h', w']  only with ``return_m2p_attention=True``: the last
                                           dual-path block's memory-to-pixel attention, at
                                           that block's resolution h' × w' (analysis)
=====================  ==================  ================================================

h, w = H/4, W/4 (stride 4); N mask slots; C classes; D mask channels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

MASK_LOGITS = "mask_logits"
CLASS_LOGITS = "class_logits"
PIXEL_FEATURE = "pixel_feature"
SEMANTIC_LOGITS = "semantic_logits"
OUTPUT_KEYS = (MASK_LOGITS, CLASS_LOGITS, PIXEL_FEATURE, SEMANTIC_LOGITS)
# Returned only on request (analysis, paper appendix A.5); not one of the OUTPUT_KEYS.
M2P_ATTENTION = "m2p_attention"
# Each output's dimensions, by name: one name means one size across the outputs ("C+1" is
# one more than "C").
OUTPUT_SHAPES: dict[str, tuple[str, ...]] = {
    MASK_LOGITS: ("B", "h", "w", "N"),
    CLASS_LOGITS: ("B", "N", "C+1"),
    PIXEL_FEATURE: ("B", "h", "w", "D"),
    SEMANTIC_LOGITS: ("B", "h", "w", "C"),
}


class OutputSizes(NamedTuple):
    """The static sizes of checked outputs (None where not known until run time)."""

    num_slots: int  # N (always static: the checks require it)
    num_classes: int | None  # C, the non-void classes
    height: int | None  # h
    width: int | None  # w


def shape_text(key: str) -> str:
    """The documented shape of output `key`, e.g. "[B, h, w, N]"."""
    return "[" + ", ".join(OUTPUT_SHAPES[key]) + "]"


def check_outputs(outputs: Mapping[str, Any], required: Sequence[str], user: str
                  ) -> OutputSizes:
    """Checks that `outputs` has the `required` keys with the contract's ranks and that the
    sizes they share agree (static sizes only; unknown ones are left to run time).

    `user` (e.g. "MaXDeepLabLoss") starts every message. Returns the sizes found.

    Raises:
      KeyError: a required output is missing (the message lists the contract's keys).
      ValueError: an output of another rank, sizes that disagree, or N not static.
    """
    missing = [key for key in required if key not in outputs]
    if missing:
        raise KeyError(f"{user}: model outputs lack {missing}; expected keys {OUTPUT_KEYS}")
    sizes: dict[str, tuple[int, str]] = {}  # dimension name -> (size, the output that set it)
    for key in OUTPUT_KEYS:
        if key not in outputs or (key not in required and outputs[key] is None):
            continue
        shape = _static_shape(outputs[key])
        names = OUTPUT_SHAPES[key]
        if shape is None or len(shape) != len(names):
            raise ValueError(f"{user}: outputs['{key}'] must be {shape_text(key)}, got shape "
                             f"{_shape_repr(outputs[key])}")
        for name, size in zip(names[1:], shape[1:], strict=True):
            if size is None:
                continue
            base, offset = (name[:-2], 1) if name.endswith("+1") else (name, 0)
            known = sizes.get(base)
            if known is None:
                sizes[base] = (size - offset, key)
            elif known[0] != size - offset:
                raise ValueError(_mismatch(user, key, name, size, known, offset))
    if "N" not in sizes:
        raise ValueError(f"{user}: the number of mask slots N must be static")
    return OutputSizes(num_slots=sizes["N"][0], num_classes=sizes.get("C", (None,))[0],
                       height=sizes.get("h", (None,))[0], width=sizes.get("w", (None,))[0])


def _mismatch(user: str, key: str, name: str, size: int, known: tuple[int, str],
              offset: int) -> str:
    base = name[:-2] if offset else name
    what = {"N": "slots", "C": "classes", "h": "rows", "w": "columns", "D": "channels"}[base]
    other_name = next(n for n in OUTPUT_SHAPES[known[1]][1:] if n.startswith(base))
    other_offset = 1 if other_name.endswith("+1") else 0
    return (f"{user}: {known[1]} has {other_name}={known[0] + other_offset} {what} but {key} "
            f"has {name}={size} (shapes: {known[1]} {shape_text(known[1])}, {key} "
            f"{shape_text(key)})")


def _static_shape(value: Any) -> tuple[int | None, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(None if d is None else int(d) for d in list(shape))
    except (TypeError, ValueError):  # a TensorShape of unknown rank
        return None


def _shape_repr(value: Any) -> str:
    return str(getattr(value, "shape", None))
