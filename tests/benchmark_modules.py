"""A script of benchmarks/ imported as a module, for the tests of its functions."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/`name`.py as the module `name` (registered in sys.modules before it runs:
    a dataclass there looks its module up; loaded once per process)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS,
                                                                         name + ".py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
