"""benchmarks/memory_table.py reads XLA's buffer assignment right: checked on a toy program
whose memory is counted by hand (docs/memory.md).

The toy is compiled in a child process: XLA_FLAGS must be set before TensorFlow initialises
XLA, and this process's TensorFlow is already initialised (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys

from benchmark_modules import load_benchmark

# x @ w1 -> h [256, 1024] (1 MiB), h @ w2 -> y [256, 128] (128 KiB), v += y, return sum(y).
TOY = r"""
import os, sys
os.environ["XLA_FLAGS"] = sys.argv[1]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
v = tf.Variable(tf.zeros([256, 128]))

@tf.function(jit_compile=True)
def toy(x, w1, w2):
    y = tf.matmul(tf.matmul(x, w1), w2)
    v.assign_add(y)
    return tf.reduce_sum(y)

toy.experimental_get_compiler_ir(
    tf.TensorSpec([256, 512]), tf.TensorSpec([512, 1024]),
    tf.TensorSpec([1024, 128]))(stage="optimized_hlo")
"""


def test_buffer_assignment_of_a_toy_matches_the_hand_count(tmp_path):
    memory_table = load_benchmark("memory_table")
    dump = str(tmp_path / "dump")
    subprocess.run([sys.executable, "-c", TOY, memory_table.xla_dump_flags(dump)],
                   check=True, capture_output=True, timeout=120)
    report = memory_table.read_memory_report(dump)

    f32 = 4
    parameters = (256 * 512 + 512 * 1024 + 1024 * 128 + 256 * 128) * f32  # x, w1, w2, v
    temporaries = (256 * 1024 + 256 * 128) * f32  # h and y, both live while y is computed
    # The variable's update is written in place (aliased to its parameter): no extra output.
    assert report.by_kind["parameter"] == parameters
    assert temporaries <= report.by_kind["temp"] <= temporaries + 4096
    assert report.by_kind["output"] < 1024  # the scalar and the output tuple's pointers
    assert report.total_bytes == sum(report.by_kind.values())
    hand = parameters + temporaries
    assert hand <= report.total_bytes <= 1.01 * hand

    # The largest temporary is h, the first MatMul's output.
    sizes = [size for size, *_ in report.largest_temporaries]
    assert sizes == sorted(sizes, reverse=True)
    size, _, shape, op_name = report.largest_temporaries[0]
    assert (size, shape.split("{")[0], op_name) == (256 * 1024 * f32, "f32[256,1024]", "MatMul")

    optimised = os.path.join(dump, report.module + ".txt")
    assert memory_table.compute_dtypes(optimised) == {"dot f32": 2}
