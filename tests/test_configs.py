"""Every gin file under configs/ parses; the small ones build; all build in the slow run."""
from __future__ import annotations

import glob
import os

import gin
import pytest

from max_deeplab.gin_config import CONFIGS_DIR, configured_value, parse_config
from max_deeplab.model import build_model

ALL_CONFIGS = sorted(os.path.relpath(p, CONFIGS_DIR)
                     for p in glob.glob(os.path.join(CONFIGS_DIR, "**", "*.gin"), recursive=True))
SMALL_CONFIGS = ["tiny.gin", "quickstart.gin", "reference_tiny.gin", "overfit_coco_samples.gin"]


def test_configs_are_found():
    assert {"max_deeplab_s_coco_641.gin", "max_deeplab_s_coco_1025.gin",
            "max_deeplab_l_coco_1025.gin", "ablations/no_p2m.gin"} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config_parses(config):
    parse_config([config], [])
    assert gin.config_str()


@pytest.mark.parametrize("config", SMALL_CONFIGS)
def test_small_configs_build(config):
    parse_config([config], [])
    model = build_model()
    assert model.count_params() > 0


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if c not in SMALL_CONFIGS])
def test_every_config_builds(config):
    # Variables do not depend on the input size: build at a small one to save time.
    parse_config([config], ["build_model.input_size = (65, 65)"])
    model = build_model()
    assert model.count_params() > 0


def _recipe() -> dict:
    from max_deeplab.data.pipeline import build_dataset
    from max_deeplab.losses import MaXDeepLabLoss
    from max_deeplab.model.encoder import MaXDeepLabEncoder
    from max_deeplab.model.max_deeplab import batch_norm_layer
    from max_deeplab.training.experiment import experiment_options
    from max_deeplab.training.optimizers import build_optimizer

    return {
        "input": tuple(configured_value("build_model", build_model, "input_size")),
        "crop": tuple(configured_value("build_dataset", build_dataset, "crop_size")),
        "steps": configured_value("experiment_options", experiment_options, "total_steps"),
        "batch": configured_value("experiment_options", experiment_options,
                            "train_batch_size"),
        "lr": configured_value("max_deeplab_optimizer", build_optimizer, "base_learning_rate"),
        "sync_bn": configured_value("batch_norm_layer", batch_norm_layer, "synchronized"),
        "memory": configured_value("MaXDeepLabEncoder", MaXDeepLabEncoder, "memory_channels"),
        "losses": tuple(configured_value("MaXDeepLabLoss", MaXDeepLabLoss, f"use_{n}")
                        for n in ("instance_discrimination", "mask_id", "semantic")),
    }


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_training_crop_is_the_model_input_size(config):
    parse_config([config], [])
    recipe = _recipe()
    assert recipe["crop"] == recipe["input"]


# Paper §4 and the ablation tables: (input, steps, learning rate, sync BN, memory, losses
# (instance discrimination, mask-ID, semantic)); batch 64 everywhere.
ALL_LOSSES = (True, True, True)
PAPER_RECIPES = {
    "max_deeplab_s_coco_641.gin": ((641, 641), 400_000, 1e-3, True, 256, ALL_LOSSES),
    "max_deeplab_s_coco_1025.gin": ((1025, 1025), 400_000, 1e-3, True, 256, ALL_LOSSES),
    "max_deeplab_l_coco_1025.gin": ((1025, 1025), 400_000, 3e-4, True, 512, ALL_LOSSES),
    "ablations/baseline.gin": ((641, 641), 100_000, 1e-3, True, 512, ALL_LOSSES),
    "ablations/axial_p2p_1025.gin": ((1025, 1025), 100_000, 1e-3, True, 512, ALL_LOSSES),
    "ablations/decoder_l2.gin": ((1025, 1025), 100_000, 1e-3, True, 512, ALL_LOSSES),
    "ablations/pq_loss_only.gin": ((641, 641), 100_000, 1e-3, True, 512,
                                   (False, False, False)),
    "ablations/pq_and_instance_discrimination.gin": ((641, 641), 100_000, 1e-3, True, 512,
                                                     (True, False, False)),
    "ablations/pq_and_mask_id.gin": ((641, 641), 100_000, 1e-3, True, 512,
                                     (False, True, False)),
    "ablations/no_semantic.gin": ((641, 641), 100_000, 1e-3, True, 512, (True, True, False)),
}


@pytest.mark.parametrize("config", sorted(PAPER_RECIPES))
def test_paper_configs_carry_the_paper_recipe(config):
    parse_config([config], [])
    size, steps, lr, sync_bn, memory, losses = PAPER_RECIPES[config]
    assert _recipe() == {"input": size, "crop": size, "steps": steps, "batch": 64, "lr": lr,
                         "sync_bn": sync_bn, "memory": memory, "losses": losses}


# --- max_deeplab.configs.load: the config a Python user gets is the CLI's -------------------

def test_load_in_a_fresh_process_registers_everything_and_resolves_includes(tmp_path):
    """Nothing imported but `max_deeplab.configs`: the paper config (bindings of the data
    pipeline, the model, the optimiser) and the `include` in reference_tiny.gin resolve."""
    import subprocess
    import sys
    import textwrap

    check = textwrap.dedent("""
        import gin
        import max_deeplab.configs
        files = max_deeplab.configs.load("reference_tiny",
                                         bindings=["MaXDeepLab.num_classes = 8"])
        print(files)
        print(gin.query_parameter("MaXDeepLab.num_classes"))
        print(gin.query_parameter("MaXDeepLabEncoder.width_multiplier"))  # reference_tiny
        print(gin.query_parameter("experiment_options.total_steps"))  # the included S config
        print(gin.query_parameter("build_dataset.crop_size"))
    """)
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()[-5:]
    assert lines[0] == repr([os.path.join(CONFIGS_DIR, "reference_tiny.gin")])
    assert lines[1:] == ["8", "0.125", "400000", "(65, 65)"]


def test_load_gives_the_config_the_cli_parses():
    from max_deeplab import configs

    bindings = ["MaXDeepLab.num_classes = 8", "experiment_options.total_steps = 3"]
    parse_config(["ablations/no_p2m.gin"], bindings)
    cli_config = gin.config_str()
    assert configs.load("ablations/no_p2m", bindings=bindings) == [
        os.path.join(CONFIGS_DIR, "ablations", "no_p2m.gin")]
    assert gin.config_str() == cli_config
    # A list of files applies them in order, as repeated --gin_file flags do.
    configs.load([os.path.join(CONFIGS_DIR, "tiny.gin"), "quickstart.gin"])
    assert configured_value("build_model", build_model, "input_size") == (129, 161)


def test_load_names_what_is_wrong(tmp_path):
    from max_deeplab import configs

    with pytest.raises(FileNotFoundError, match="no_such_config"):
        configs.load("no_such_config")
    with pytest.raises(configs.GinConfigError,
                       match="invalid --gin_bindings value 'NoSuch.value = 1'"):
        configs.load("tiny.gin", bindings=["NoSuch.value = 1"])
    with pytest.raises(configs.GinConfigError, match="expected int"):
        configs.load("tiny", bindings=['MaXDeepLab.num_classes = "abc"'])
    configs.load("tiny")  # leaves a valid config for the tests that follow


def test_every_module_with_a_configurable_is_registered_by_configurables():
    """`configurables` is what makes every configurable nameable in a config (`load`,
    --gin_file): a module with one that it does not import would be unknown to gin unless
    something else happened to import it first."""
    import re
    import sys

    import max_deeplab
    import max_deeplab.configurables  # noqa: F401

    package = os.path.dirname(max_deeplab.__file__)
    registering = set()
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        with open(path) as f:
            if re.search(r"^\s*@gin\.configurable", f.read(), re.MULTILINE):
                relative = os.path.relpath(path, os.path.dirname(package))
                registering.add(relative[:-3].replace(os.sep, "."))
    assert "max_deeplab.training.schedules" in registering
    assert sorted(m for m in registering if m not in sys.modules) == []
