"""Every gin file under configs/ parses; the small ones build; all build in the slow run."""
from __future__ import annotations

import glob
import os

import gin
import pytest

from max_deeplab.cli.gin_flags import CONFIGS_DIR, parse_gin_flags
from max_deeplab.model import build_model

ALL_CONFIGS = sorted(os.path.relpath(p, CONFIGS_DIR)
                     for p in glob.glob(os.path.join(CONFIGS_DIR, "**", "*.gin"), recursive=True))
SMALL_CONFIGS = ["tiny.gin", "quickstart.gin", "reference_tiny.gin"]


def test_configs_are_found():
    assert {"max_deeplab_s_coco_641.gin", "max_deeplab_s_coco_1025.gin",
            "max_deeplab_l_coco_1025.gin", "ablations/no_p2m.gin"} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config_parses(config):
    parse_gin_flags([config], [])
    assert gin.config_str()


@pytest.mark.parametrize("config", SMALL_CONFIGS)
def test_small_configs_build(config):
    parse_gin_flags([config], [])
    model = build_model()
    assert model.count_params() > 0


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if c not in SMALL_CONFIGS])
def test_every_config_builds(config):
    # Variables do not depend on the input size: build at a small one to save time.
    parse_gin_flags([config], ["build_model.input_size = (65, 65)"])
    model = build_model()
    assert model.count_params() > 0
