"""Where the reference implementation's fixture lives: `shared/` beside the repository
(as on CI's clean clone), else the development machine's /work/shared."""
from __future__ import annotations

import os

_CANDIDATES = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
                 "reference", "deeplab2"),
    "/work/shared/reference/deeplab2",
)
REFERENCE_DIR = os.path.normpath(next((p for p in _CANDIDATES if os.path.isdir(p)),
                                      _CANDIDATES[-1]))
