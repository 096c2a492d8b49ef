"""Session-wide test setup.

Splits the host CPU into two logical devices so distribution tests (MirroredStrategy over
two replicas) run on a CPU-only machine. Logical devices can only be configured before the
TensorFlow runtime initialises, so this happens at conftest import time, once per process.

Also the fixtures several test modules share: `no_model_build` (checks that must come before
the model is built) and `standin_saved_model` (an exported stand-in model).
"""

import pytest
import tensorflow as tf

_NUM_LOGICAL_CPUS = 2


def _configure_logical_cpus() -> None:
    cpus = tf.config.list_physical_devices("CPU")
    if not cpus or tf.config.get_logical_device_configuration(cpus[0]) is not None:
        return  # already configured (e.g. conftest re-imported)
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * _NUM_LOGICAL_CPUS
        )
    except RuntimeError:
        # The runtime was initialised earlier in this process; keep its device layout.
        pass


_configure_logical_cpus()


class ModelBuilt(Exception):
    """Raised instead of building the model (`no_model_build`)."""


@pytest.fixture
def no_model_build(monkeypatch):
    """Building the model ends the command: the checks under test must come before it."""
    import max_deeplab.model

    def build_model(*args, **kwargs):
        raise ModelBuilt

    monkeypatch.setattr(max_deeplab.model, "build_model", build_model)


@pytest.fixture(scope="module")
def standin_saved_model(tmp_path_factory) -> str:
    """A SavedModel of the test stand-in model with the synthetic data set's categories."""
    from test_export import StandIn

    from max_deeplab.data.synthetic import categories_json
    from max_deeplab.inference import export_saved_model

    categories = categories_json()
    export_dir = str(tmp_path_factory.mktemp("standin") / "export")
    export_saved_model(StandIn(num_classes=len(categories), num_slots=12), export_dir,
                       {"categories": categories}, input_size=(49, 65))
    return export_dir
