"""How many worker processes the verbs that fan out over images (`convert`, `pq`) start when
not told: the CPU cores this process may run on. Imports nothing heavy."""
from __future__ import annotations

import os


def default_num_workers() -> int:
    """The usable CPU cores (the process's CPU affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
