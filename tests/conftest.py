"""Session-wide test setup.

Splits the host CPU into two logical devices so distribution tests (MirroredStrategy over
two replicas) run on a CPU-only machine. Logical devices can only be configured before the
TensorFlow runtime initialises, so this happens at conftest import time, once per process.
"""

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
