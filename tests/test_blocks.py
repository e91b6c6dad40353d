"""Elementwise stages block by block (research/engine/blocks.py) and dropout's keep decisions from
raw words (research/engine/keep_decisions.py): both must give exactly, bit for bit, what the
plain numpy calls give, or runs would stop being what they were.

- Every optimizer's ``update_in_place`` over arrays spanning many blocks (block sizes down to a
  few elements, blocks that do not divide the arrays) equals its pure ``update`` in float32 and
  float64, over several steps, with schedules.
- ``keep_decisions`` equals ``rng.random(shape, dtype=np.float32) >= rate`` and leaves the
  generator where that call leaves it, for odd and even counts (PCG64 keeps half a word between
  calls), rates of every float type, and other draws in between; other generators take
  ``rng.random`` itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import EXACT, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from research.engine import blocks, optim
from research.engine.keep_decisions import _agrees_with_numpy, _threshold, keep_decisions
from research.engine.mlp import dropout_masks

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.3),
    "momentum": lambda: optim.momentum(0.05, beta=0.8),
    "nesterov": lambda: optim.momentum(0.05, beta=optim.linear_ramp(0.5, 0.9, 3), nesterov=True),
    "adam": lambda: optim.adam(optim.linear_ramp(0.01, 0.001, 4), beta1=0.85, beta2=0.99),
}


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(OPTIMIZERS)),
    block_bytes=st.integers(8, 4096),
    dtype=st.sampled_from([np.float32, np.float64]),
    shapes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), min_size=1, max_size=3),
    seed=st.integers(0, 2**31),
    transposed=st.booleans(),
)
def test_update_in_place_in_blocks_is_update_exactly(
    name, block_bytes, dtype, shapes, seed, transposed
):
    default, blocks.BLOCKS.block_bytes = blocks.BLOCKS.block_bytes, block_bytes
    try:
        check_blocks(name, block_bytes, dtype, shapes, seed, transposed)
    finally:
        blocks.BLOCKS.block_bytes = default


def check_blocks(name, block_bytes, dtype, shapes, seed, transposed):
    rng = np.random.default_rng(seed)
    params = [
        {"W": rng.standard_normal(shape).astype(dtype), "b": rng.standard_normal(shape[1:])}
        for shape in shapes
    ]
    params = [{k: v.astype(dtype) for k, v in layer.items()} for layer in params]
    if transposed:  # a user layer's parameters may come in any layout (W.T)
        params[0]["W"] = np.ascontiguousarray(params[0]["W"].T).T
    pure, fast = OPTIMIZERS[name](), OPTIMIZERS[name]()
    expected, state = params, pure.init(params)
    ours, our_state = (
        [{k: v.copy() for k, v in layer.items()} for layer in params],
        fast.init(params),
    )
    for _ in range(5):
        grads = [
            {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p.items()} for p in params
        ]
        expected, state = pure.update(expected, grads, state)
        given = [{k: v.copy() for k, v in g.items()} for g in grads]
        fast.update_in_place(ours, given, our_state)
        assert_close(ours, expected, EXACT, what=f"{name} params, blocks of {block_bytes} bytes")
        for key in ("velocity", "mu", "nu"):
            if key in state:
                assert_close(our_state[key], state[key], EXACT, what=f"{name} {key}")
        if name != "sgd":  # (plain SGD's gradients are its scratch)
            assert_close(given, grads, EXACT, what=f"{name}: the gradients, only read")
    assert our_state["count"] == state["count"] == 5


def test_blocks_cover_every_element_once_in_order():
    seen: list[np.ndarray] = []
    runner = blocks.Blocks(block_bytes=40)  # 5 float64s a block
    a, b = np.arange(12.0).reshape(3, 4), np.arange(7.0)

    def kernel(x: np.ndarray, scratch: np.ndarray) -> None:
        assert len(scratch) == len(x) <= 5
        seen.append(x.copy())
        x *= 2

    runner.run(kernel, [(a,), (b,)], scratch=1)
    assert [len(x) for x in seen] == [5, 5, 2, 5, 2]
    np.testing.assert_array_equal(np.concatenate(seen), np.r_[np.arange(12.0), np.arange(7.0)])
    np.testing.assert_array_equal(a, 2 * np.arange(12.0).reshape(3, 4))
    # another layout: the kernel once, on the whole arrays, with scratch of their shape
    strided = np.arange(16.0).reshape(4, 4)[:, :2]
    seen.clear()
    runner.run(kernel, [(strided,)], scratch=1)
    assert [x.shape for x in seen] == [(4, 2)]
    np.testing.assert_array_equal(strided, 2 * np.arange(16.0).reshape(4, 4)[:, :2])
    # arrays of different shapes in a group: refused before any kernel runs
    before = a.copy()
    with pytest.raises(ValueError, match=r"one shape per group, got \(3, 4\), \(12,\)"):
        runner.run(kernel, [(a,), (a, a.reshape(-1))], scratch=1)
    np.testing.assert_array_equal(a, before)


# --- dropout's keep decisions -----------------------------------------------------------------

rates = st.one_of(
    st.floats(0.0, 0.999999),
    st.sampled_from([0.2, 0.5, 1 / 3, np.float64(0.3), np.float32(0.3), 0.9999999999]),
)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**63),
    draws=st.lists(
        st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=3), rates, st.booleans()),
        min_size=1,
        max_size=6,
    ),
)
def test_keep_decisions_are_numpys_and_leave_the_generator_where_numpy_does(seed, draws):
    ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
    for shape, rate, other_draw in draws:
        expected = theirs.random(tuple(shape), dtype=np.float32) >= rate
        got = keep_decisions(ours, tuple(shape), rate)
        assert got.shape == expected.shape and got.dtype == bool
        np.testing.assert_array_equal(got, expected)
        assert ours.bit_generator.state == theirs.bit_generator.state
        if other_draw:  # other draws in between stay in step
            assert (
                ours.random(3, dtype=np.float32).tolist()
                == theirs.random(3, dtype=np.float32).tolist()
            )


def test_the_threshold_is_where_numpys_comparison_turns():
    for rate in (0.0, 0.2, 0.5, 1 / 3, np.float32(0.7), np.float64(0.7), 0.9999999999):
        k = _threshold(rate)
        floats = np.array([(k - 1) * 2.0**-24, k * 2.0**-24], dtype=np.float32)
        assert ((floats >= rate).tolist() == [False, True]) if k else bool(floats[1] >= rate)


def test_a_python_float_and_an_equal_float64_keep_different_units():
    """numpy compares float32 uniforms with a Python float in float32, with a float64 in float64:
    at this rate the two thresholds differ by one, whichever is asked first."""
    rate = 0.9066351196001362
    for first, second in ((rate, np.float64(rate)), (np.float64(rate), rate)):
        _threshold.cache_clear()
        assert (_threshold(first), _threshold(second)) == (
            (15210813, 15210814) if type(first) is float else (15210814, 15210813)
        )
    floats = np.array([15210813 * 2.0**-24], dtype=np.float32)
    assert bool((floats >= rate)[0]) and not bool((floats >= np.float64(rate))[0])


def test_the_fast_path_is_taken_here():
    """(Else every test above would pass through rng.random itself.)"""
    assert _agrees_with_numpy()


def test_other_generators_and_rates_draw_through_numpy():
    ours, theirs = np.random.default_rng(5), np.random.default_rng(5)
    rate = np.asarray(0.5)  # a 0-d array: not hashable, drawn by numpy
    np.testing.assert_array_equal(
        keep_decisions(ours, (4,), rate), theirs.random(4, dtype=np.float32) >= rate
    )
    assert ours.bit_generator.state == theirs.bit_generator.state


def test_other_generators_draw_through_numpy():
    ours = np.random.Generator(np.random.Philox(3))
    theirs = np.random.Generator(np.random.Philox(3))
    np.testing.assert_array_equal(
        keep_decisions(ours, (5, 7), 0.5), theirs.random((5, 7), dtype=np.float32) >= 0.5
    )
    assert str(ours.bit_generator.state) == str(theirs.bit_generator.state)


def test_masks_are_what_they_were():
    """The masks of a seed as numpy's own draw and comparison make them (what dropout_masks did
    before its keep decisions came from raw words)."""
    rng, reference = np.random.default_rng(11), np.random.default_rng(11)
    masks = dropout_masks(rng, 5, (7, 6, 4), 0.2, 0.5, np.float64)
    for mask, (width, rate) in zip(masks, ((7, 0.2), (6, 0.5))):
        kept = reference.random((5, width), dtype=np.float32) >= rate
        np.testing.assert_array_equal(mask, kept.astype(np.float64) / (1 - rate))
