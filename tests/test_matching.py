"""Tests for `max_deeplab.matching.hungarian_match` (paper §3.2, docs/design.md §4).

Optimality is checked against an independent solver: `scipy.optimize.linear_sum_assignment`
run directly on the valid rows (and brute force over permutations for tiny matrices).
"""

import itertools

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf
from shared_strategies import mirrored_two_cpus

from max_deeplab.matching import hungarian_match, linear_sum_assignment_tf, resolve_backend

KINDS = ("uniform", "integer_ties", "wide", "all_equal", "signed")


def _make_cost(kind: str, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.random(shape)
    if kind == "integer_ties":  # few distinct values: many optimal assignments
        return rng.integers(0, 4, size=shape).astype(np.float64)
    if kind == "wide":  # log-uniform over 1e-3 .. 1e6
        return 10.0 ** rng.uniform(-3.0, 6.0, size=shape)
    if kind == "all_equal":
        return np.full(shape, 2.5)
    if kind == "signed":  # like the loss: cost = -similarity, plus an offset
        return -rng.random(shape) * 10.0 + 3.0
    raise ValueError(kind)


def _random_valid(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    valid = rng.random(shape) < 0.7
    valid[0] = True  # keep one fully valid element
    if shape[0] > 1:
        valid[1] = False  # and one with no valid row at all
    return valid


def _check_optimal(cost: np.ndarray, assignment: np.ndarray, valid: np.ndarray, rtol: float):
    """Asserts a valid matching of the valid rows whose total equals scipy's optimum."""
    batch, num_rows, num_cols = cost.shape
    assert assignment.shape == (batch, num_rows)
    assert assignment.dtype == np.int32
    for b in range(batch):
        rows = np.flatnonzero(valid[b])
        np.testing.assert_array_equal(assignment[b][~valid[b]], -1)
        cols = assignment[b, rows]
        assert np.all((cols >= 0) & (cols < num_cols)), cols
        assert len(set(cols.tolist())) == len(cols), f"column used twice: {cols}"
        if rows.size == 0:
            continue
        sub = cost[b, rows].astype(np.float64)
        ref_r, ref_c = scipy.optimize.linear_sum_assignment(sub)
        optimum = sub[ref_r, ref_c].sum()
        total = sub[np.arange(rows.size), cols].sum()
        scale = max(np.abs(sub[ref_r, ref_c]).sum(), 1e-12)
        assert abs(total - optimum) <= rtol * scale, (b, total, optimum)


@pytest.mark.parametrize("backend", ["tf", "scipy"])
@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 5, 5), (2, 0, 3), (3, 1, 1), (2, 6, 9)])
def test_eager_optimal(backend, shape):
    rng = np.random.default_rng(sum(shape))
    for kind in KINDS:
        cost = _make_cost(kind, shape, rng).astype(np.float32)
        valid = np.ones(shape[:2], bool)
        out = hungarian_match(tf.constant(cost), backend=backend).numpy()
        _check_optimal(cost, out, valid, rtol=1e-6)
        valid = _random_valid(shape[:2], rng)
        out = hungarian_match(tf.constant(cost), backend=backend, row_valid=valid).numpy()
        _check_optimal(cost, out, valid, rtol=1e-6)


def test_brute_force_tiny():
    rng = np.random.default_rng(7)
    for _ in range(20):
        cost = rng.integers(0, 3, size=(1, 3, 4)).astype(np.float32)
        out = hungarian_match(cost, backend="tf").numpy()[0]
        best = min(
            sum(cost[0, r, c] for r, c in enumerate(perm))
            for perm in itertools.permutations(range(4), 3)
        )
        assert cost[0, np.arange(3), out].sum() == best


# Shapes compiled once each under XLA; every call reuses the compiled program.
XLA_SHAPES = [(16, 10, 16), (16, 16, 16), (12, 30, 64), (4, 0, 5)]


@pytest.fixture(scope="module")
def xla_tf_match():
    return tf.function(lambda c, v: hungarian_match(c, backend="tf", row_valid=v), jit_compile=True)


@pytest.mark.parametrize("shape", XLA_SHAPES)
def test_xla_tf_backend_matches_scipy_optimum(xla_tf_match, shape):
    """Hundreds of matrices in total: 5 kinds × (all valid, padded) per shape."""
    rng = np.random.default_rng(shape[1] * 100 + shape[2])
    for kind in KINDS:
        cost = _make_cost(kind, shape, rng).astype(np.float32)
        for valid in (np.ones(shape[:2], bool), _random_valid(shape[:2], rng)):
            out = xla_tf_match(tf.constant(cost), tf.constant(valid)).numpy()
            _check_optimal(cost, out, valid, rtol=1e-6)


@pytest.mark.parametrize("kind,rtol", [("integer_ties", 0.0), ("uniform", 1e-5), ("signed", 1e-5)])
def test_xla_float32_compute_dtype(kind, rtol):
    """The float32 path used on TPU: exact on small integers, ~1e-5 on floats in [0, 10]."""
    fn = tf.function(
        lambda c: linear_sum_assignment_tf(c, compute_dtype=tf.float32), jit_compile=True
    )
    rng = np.random.default_rng(3)
    shape = (16, 24, 32)
    cost = _make_cost(kind, shape, rng).astype(np.float32)
    out = fn(tf.constant(cost)).numpy()
    _check_optimal(cost, out, np.ones(shape[:2], bool), rtol=rtol)


def test_graph_mode_tf_backend():
    fn = tf.function(lambda c: hungarian_match(c, backend="tf"))
    rng = np.random.default_rng(11)
    cost = rng.random((3, 7, 9)).astype(np.float32)
    _check_optimal(cost, fn(tf.constant(cost)).numpy(), np.ones((3, 7), bool), rtol=1e-6)


@pytest.mark.parametrize("backend", ["tf", "scipy"])
def test_padded_rows_do_not_influence_valid_rows(backend):
    rng = np.random.default_rng(5)
    cost = rng.random((4, 6, 8)).astype(np.float32)
    valid = np.array([[1, 1, 0, 1, 0, 0]] * 4, bool)
    base = hungarian_match(cost, backend=backend, row_valid=valid).numpy()
    garbage = cost.copy()
    garbage[:, ~valid[0]] = -1e9  # would grab columns if they took part
    garbage[0, 2, 0] = np.nan  # and non-finite padding must not raise
    garbage[1, 4, 3] = np.inf
    out = hungarian_match(garbage, backend=backend, row_valid=valid).numpy()
    np.testing.assert_array_equal(out, base)
    # Same as solving only the valid rows.
    sub = hungarian_match(cost[:, valid[0]], backend=backend).numpy()
    np.testing.assert_array_equal(out[:, valid[0]], sub)


def test_scipy_backend_in_tf_function_has_static_shape():
    fn = tf.function(lambda c: hungarian_match(c, backend="scipy"))
    concrete = fn.get_concrete_function(tf.TensorSpec([4, 5, 7], tf.float32))
    assert concrete.structured_outputs.shape.as_list() == [4, 5]
    rng = np.random.default_rng(2)
    cost = rng.random((4, 5, 7)).astype(np.float32)
    _check_optimal(cost, fn(tf.constant(cost)).numpy(), np.ones((4, 5), bool), rtol=1e-7)


def test_scipy_backend_inside_mirrored_strategy():
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "tests/conftest.py should configure two logical CPUs"
    strategy = mirrored_two_cpus()
    rng = np.random.default_rng(9)
    cost = rng.random((4, 5, 8)).astype(np.float32)  # 2 per replica
    dataset = tf.data.Dataset.from_tensor_slices(cost).batch(4)
    dist = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def step(c):
        def replica_fn(c):
            # "auto" must choose scipy under MirroredStrategy.
            assert resolve_backend("auto") == "scipy"
            return hungarian_match(c, backend="auto")

        return strategy.run(replica_fn, args=(c,))

    per_replica = step(next(iter(dist)))
    parts = strategy.experimental_local_results(per_replica)
    assert len(parts) == 2
    out = np.concatenate([p.numpy() for p in parts], axis=0)
    _check_optimal(cost, out, np.ones((4, 5), bool), rtol=1e-7)


def test_auto_backend_picks_tf_under_tpu_strategy(monkeypatch):
    fake = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
    monkeypatch.setattr(tf.distribute, "get_strategy", lambda: fake)
    assert resolve_backend("auto") == "tf"
    monkeypatch.undo()
    assert resolve_backend("auto") == "scipy"


@pytest.mark.parametrize("shape", [(3, 0, 5), (2, 0, 0), (2, 4, 6)])
def test_xla_tf_backend_with_sizes_unknown_when_traced(shape):
    """Under XLA with a trace-time shape of [None, None, None] (R only known when the
    program runs): R = 0 gives [B, 0] (it failed with "Slice dim size 1 greater than
    dynamic slice dimension: 0"), other sizes the optimum."""
    fn = tf.function(lambda c: hungarian_match(c, backend="tf"), jit_compile=True,
                     input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    cost = np.random.default_rng(5).random(shape).astype(np.float32)
    out = fn(tf.constant(cost)).numpy()
    assert out.shape == shape[:2]
    _check_optimal(cost, out, np.ones(shape[:2], bool), rtol=1e-6)


def test_auto_backend_is_tf_inside_any_xla_compilation():
    """"auto" is the pure-TF matcher wherever the step is compiled by XLA (TPU or
    `jit_compile=True` on CPU/GPU: scipy's host call cannot be compiled), scipy elsewhere."""
    seen = {}

    def record(name):
        def fn(c):
            seen[name] = resolve_backend("auto")
            return hungarian_match(c, backend="auto")
        return fn

    cost = np.random.default_rng(2).random((2, 3, 5)).astype(np.float32)
    outs = {"eager": record("eager")(tf.constant(cost)),
            "graph": tf.function(record("graph"))(tf.constant(cost)),
            "xla": tf.function(record("xla"), jit_compile=True)(tf.constant(cost))}
    assert seen == {"eager": "scipy", "graph": "scipy", "xla": "tf"}
    for out in outs.values():
        _check_optimal(cost, out.numpy(), np.ones((2, 3), bool), rtol=1e-6)


def test_scipy_backend_inside_xla_is_a_clear_error():
    fn = tf.function(lambda c: hungarian_match(c, backend="scipy"), jit_compile=True)
    with pytest.raises(ValueError, match=r"'scipy'.*XLA.*'auto' or 'tf'"):
        fn(tf.zeros([1, 2, 3]))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        hungarian_match(tf.zeros([1, 2, 2]), backend="cuda")


@pytest.mark.parametrize("backend", ["tf", "scipy"])
def test_more_rows_than_columns_is_an_error(backend):
    with pytest.raises(ValueError, match=r"R=5.*C=3"):
        hungarian_match(tf.zeros([2, 5, 3]), backend=backend)


def test_more_rows_than_columns_dynamic_shape():
    fn = tf.function(
        lambda c: hungarian_match(c, backend="scipy"),
        input_signature=[tf.TensorSpec([None, None, None], tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="rows R <= columns C"):
        fn(tf.zeros([1, 4, 2]))


@pytest.mark.parametrize("backend", ["tf", "scipy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_non_finite_cost_is_an_error(backend, bad, mode):
    cost = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    cost[1, 2, 1] = bad
    fn = lambda c: hungarian_match(c, backend=backend)
    if mode == "graph":
        fn = tf.function(fn)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        fn(tf.constant(cost)).numpy()


def test_non_finite_cost_under_xla_returns_minus_one(xla_tf_match):
    """XLA drops assertions: the affected batch element gets -1, never a wrong match."""
    rng = np.random.default_rng(4)
    shape = XLA_SHAPES[0]
    cost = rng.random(shape).astype(np.float32)
    cost[3, 2, 5] = np.nan
    cost[7, 0, 0] = np.inf
    valid = np.ones(shape[:2], bool)
    out = xla_tf_match(tf.constant(cost), tf.constant(valid)).numpy()
    np.testing.assert_array_equal(out[[3, 7]], -1)
    keep = np.setdiff1d(np.arange(shape[0]), [3, 7])
    _check_optimal(cost[keep], out[keep], valid[keep], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 128, 128), (8, 100, 128)])
def test_xla_tf_backend_large(shape):
    fn = tf.function(lambda c: hungarian_match(c, backend="tf"), jit_compile=True)
    rng = np.random.default_rng(shape[1])
    for kind in KINDS:
        cost = _make_cost(kind, shape, rng).astype(np.float32)
        _check_optimal(cost, fn(tf.constant(cost)).numpy(), np.ones(shape[:2], bool), rtol=1e-6)
