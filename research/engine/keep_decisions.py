"""Dropout's keep decisions from the generator's raw words: exactly the decisions of
``rng.random(shape, dtype=np.float32) >= rate``, with the generator left in exactly the state that
call leaves it in, in less than half its time.

numpy makes each float32 uniform from one 32-bit word w of its bit generator, as
``(w >> 8) · 2⁻²⁴``; PCG64 makes its 32-bit words two at a time from one 64-bit output, the low
half first, and keeps the high half for the next call (``has_uint32`` and ``uinteger`` in its
state). So a unit is kept iff ``w >> 8 >= k``, for the least k whose float ``k · 2⁻²⁴`` compares
``>= rate`` as numpy compares it (:func:`_threshold`): an integer comparison on the words
``random_raw`` gives, without turning a million words into floats per w3 step (1.3 ms instead of
2.9 ms on the 2-vCPU Intel Xeon of docs/performance.md).

Masks, and so runs, stay what they were: the first use in a process checks this against
``rng.random`` on a fresh generator (odd and even counts, a word left over between calls), and any
other generator, or a numpy that makes its floats otherwise, takes ``rng.random`` itself.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: A float32 uniform is (w >> 8)·2⁻²⁴: 24 random bits.
_BITS = 24


def keep_decisions(rng: np.random.Generator, shape: tuple[int, ...], rate: Any) -> np.ndarray:
    """``rng.random(shape, dtype=np.float32) >= rate`` (a bool array of ``shape``), advancing
    ``rng`` exactly as that call does. Unlike that call it does not hold the generator's lock
    throughout: a generator drawn from by several threads at once must not come here."""
    plain = isinstance(rate, float | int | np.floating | np.integer)  # (a scalar, hashable)
    if type(rng.bit_generator) is not np.random.PCG64 or not plain or not _agrees_with_numpy():
        return rng.random(shape, dtype=np.float32) >= rate
    return _from_words(rng, shape, rate)


def inverted_dropout_mask(
    rng: np.random.Generator, shape: tuple[int, ...], rate: float, dtype: Any
) -> np.ndarray:
    """A fresh inverted-dropout mask of ``shape``: 0 where a unit is dropped, 1/(1 − rate) where
    it is kept (:func:`keep_decisions`), in ``dtype``; what ``mlp.dropout_masks`` and the
    ``dropout`` layer draw."""
    kept = keep_decisions(rng, shape, rate)  # rng.random(float32) >= rate
    return kept.astype(dtype) * np.asarray(1 / (1 - rate), dtype=dtype)


def _from_words(rng: np.random.Generator, shape: tuple[int, ...], rate: Any) -> np.ndarray:
    """:func:`keep_decisions` from PCG64's raw 64-bit outputs (see the module docstring)."""
    generator = rng.bit_generator
    count = int(np.prod(shape, dtype=np.int64))
    least = _threshold(rate) << (32 - _BITS)  # w >> 8 >= k  iff  w >= k·2⁸
    kept = np.empty(count, dtype=bool)
    state = generator.state
    start = 0
    if count and state["has_uint32"]:  # the high half the last call kept comes first
        kept[0] = state["uinteger"] >= least
        state["has_uint32"], start = 0, 1
        generator.state = state
    rest = count - start
    words = generator.random_raw((rest + 1) // 2).view(np.uint32)  # low half, high half, ...
    np.greater_equal(words[:rest], least, out=kept[start:])
    if rest:  # numpy keeps the last high half it made: left over (odd) or used (even)
        state = generator.state
        state["has_uint32"], state["uinteger"] = rest % 2, int(words[rest if rest % 2 else -1])
        generator.state = state
    return kept.reshape(shape)


@functools.lru_cache(maxsize=None, typed=True)  # (0.7 and float64(0.7) compare differently)
def _threshold(rate: Any) -> int:
    """The least k in [0, 2²⁴] with ``float32(k · 2⁻²⁴) >= rate`` as numpy compares a float32
    array with ``rate`` (2²⁴ when no float32 uniform reaches it). Found by bisection, with
    numpy's own comparison, so that a Python float, a float64 or a float32 rate each mean
    what they mean in ``rng.random(...) >= rate``."""

    def reaches(k: int) -> bool:
        return bool((np.array([k * 2.0**-_BITS], dtype=np.float32) >= rate)[0])

    low, high = 0, 1 << _BITS  # reaches(high) is taken as True: no word is that large
    while low < high:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle + 1
    return low


@functools.cache
def _agrees_with_numpy() -> bool:
    """Whether :func:`_from_words` gives this numpy's decisions and leaves its state: tried once
    per process on fresh generators, over counts that leave a word over and take it back."""
    ours, theirs = np.random.default_rng(20261206), np.random.default_rng(20261206)
    for count, rate in ((7, 0.5), (1, 0.2), (6, 0.5), (5, 1 / 3), (1000, 0.8), (3, 0.5)):
        expected = theirs.random(count, dtype=np.float32) >= rate
        if not np.array_equal(_from_words(ours, (count,), rate), expected):
            return False
        if ours.bit_generator.state != theirs.bit_generator.state:
            return False
    return ours.bit_generator.state == theirs.bit_generator.state
