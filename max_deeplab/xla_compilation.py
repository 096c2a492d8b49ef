"""Whether the code being traced is compiled by XLA: one answer for every module that
chooses its ops by it (the matcher backend, post-processing's static-shape path)."""
from __future__ import annotations

import tensorflow as tf


def in_xla_compilation() -> bool:
    """True while tracing inside ``tf.function(jit_compile=True)`` or a TPU replica
    function (both are XLA contexts), at any depth of nested functions and loops."""
    if tf.executing_eagerly():
        return False
    try:  # not a public API; without it XLA compilation cannot be detected
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - depends on the TF version
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
