"""Bipartite matching of ground-truth to predicted masks (paper §3.2): `hungarian_match`."""

from max_deeplab.matching.hungarian import BACKENDS, hungarian_match, resolve_backend
from max_deeplab.matching.tf_backend import linear_sum_assignment_tf

__all__ = ["BACKENDS", "hungarian_match", "linear_sum_assignment_tf", "resolve_backend"]
