"""The error the file-based evaluator raises for bad input (`max-deeplab pq`)."""
from __future__ import annotations


class PanopticEvalError(Exception):
    """A user-caused input problem (bad JSON/PNG, mismatched sets); the message says where."""
