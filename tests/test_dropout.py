"""Dropout's masks, tested statistically: the kept fraction stays inside its binomial 99.9%
interval, the values are exactly 0 and 1/keep, the same seed gives the same masks, and no mask
is ever reused across steps of a training run. (Dropout's gradients against JAX, with the same
masks on both sides: test_gradients.py; the in-place step against the pure one: test_inplace.py.)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import research.experiment.training.train as training
from research.engine.mlp import dropout_masks
from research.experiment.config.presets import PRESETS

#: z of a two-sided 99.9% normal interval
Z_999 = 3.2905


def binomial_interval(n: int, p: float) -> tuple[float, float]:
    """The 99.9% interval of a binomial(n, p) proportion (normal approximation; n·p ≫ 1)."""
    half = Z_999 * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kept_fraction_is_binomial(rate, dtype):
    rng = np.random.default_rng(0)
    sizes, rows, draws = (100, 50, 10), 32, 400
    outside, kept_total, units_total = 0, 0, 0
    for _ in range(draws):
        masks = dropout_masks(rng, rows, sizes, rate, rate, dtype)
        for mask, width in zip(masks, sizes[:-1]):
            assert mask.shape == (rows, width) and mask.dtype == dtype
            # exactly 0 or 1/keep: inverted dropout keeps the expected input unchanged
            assert set(np.unique(mask)) <= {dtype(0), dtype(1 / (1 - rate))}
            kept = int(np.count_nonzero(mask))
            low, high = binomial_interval(mask.size, 1 - rate)
            outside += not low <= kept / mask.size <= high
            kept_total += kept
            units_total += mask.size
    low, high = binomial_interval(units_total, 1 - rate)
    assert low <= kept_total / units_total <= high
    # 2 x 400 masks: about 0.8 expected outside their own 99.9% interval
    assert outside <= 6, outside


def test_a_rate_of_zero_draws_no_mask_and_nothing_from_the_generator():
    rng = np.random.default_rng(1)
    before = rng.bit_generator.state
    assert dropout_masks(rng, 8, (20, 10, 10, 3), 0.0, 0.0) == [None, None, None]
    assert rng.bit_generator.state == before
    masks = dropout_masks(rng, 8, (20, 10, 10, 3), 0.0, 0.5)
    assert masks[0] is None and masks[1] is not None and masks[2] is not None


def test_the_same_seed_gives_the_same_masks_and_each_draw_is_new():
    first = [dropout_masks(np.random.default_rng(7), 16, (30, 20, 5), 0.2, 0.5) for _ in range(2)]
    for a, b in zip(*first):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    draws = [dropout_masks(rng, 16, (30, 20, 5), 0.2, 0.5) for _ in range(3)]
    for i in range(3):
        for j in range(i):
            assert not np.array_equal(draws[i][1], draws[j][1])


def small_run(**overrides):
    rng = np.random.default_rng(3)
    x = rng.random((200, 784))
    labels = rng.integers(0, 10, 200)
    settings = {
        "hidden_size": 16, "n_hidden_layers": 2, "batch_size": 32, "epochs": 2,
        "input_dropout": 0.2, "dropout": 0.5,
    }  # fmt: skip
    config = replace(PRESETS["default"], **{**settings, **overrides})
    return config, x, labels


def test_a_training_run_draws_a_new_mask_every_step_and_is_reproducible(monkeypatch):
    drawn = []
    real = training.dropout_masks

    def recording(*args, **kwargs):  # calls through: the run is unchanged
        masks = real(*args, **kwargs)
        drawn.append(masks)
        return masks

    monkeypatch.setattr(training, "dropout_masks", recording)
    config, x, labels = small_run()
    result = training.train(config, x, labels, x[:20], labels[:20])
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    assert len(drawn) == steps
    seen = {mask.tobytes() for masks in drawn for mask in masks}
    assert len(seen) == steps * 3  # every mask of every step and layer is new
    again = training.train(config, x, labels, x[:20], labels[:20])
    for a, b in zip(result.params, again.params):
        np.testing.assert_array_equal(a["W"], b["W"])  # bit for bit
    other = training.train(replace(config, seed=1), x, labels, x[:20], labels[:20])
    assert not np.array_equal(other.params[0]["W"], result.params[0]["W"])


def test_evaluation_uses_no_dropout():
    """Validation metrics are those of the whole network: evaluate() of the final params."""
    config, x, labels = small_run(epochs=1)
    result = training.train(config, x, labels, x[:50], labels[:50])
    loss, accuracy = training.evaluate(result.params, x[:50], labels[:50], config.spec())
    assert (loss, accuracy) == (result.history[-1].val_loss, result.history[-1].val_accuracy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_units_at_max_norm_counts_the_units_the_projection_holds(dtype):
    """After a projection, exactly the hidden units whose incoming weights were longer than the
    radius sit on it; the output layer's columns never count."""
    from research.engine.optim import max_norm, units_at_max_norm

    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 3.0, 4.0], dtype=dtype)  # column norms before: 0.5 ... 4
    columns = rng.standard_normal((20, 4))
    W0 = (columns / np.linalg.norm(columns, axis=0) * scale).astype(dtype)
    params = [
        {"W": W0, "b": np.zeros(4, dtype)},
        {"W": np.full((4, 3), 100.0, dtype), "b": np.zeros(3, dtype)},  # the output layer
    ]
    assert units_at_max_norm(params, 0.0) == 0.0  # off
    assert units_at_max_norm(params, 10.0) == 0.0  # nothing reaches it
    projected = max_norm(params, 2.0)
    assert units_at_max_norm(projected, 2.0) == 0.5  # the norms 3 and 4, now 2
    assert units_at_max_norm(projected, 1.0) == 0.75  # 1, 2 and 2 reach 1
    assert units_at_max_norm(max_norm(params, 0.1), 0.1) == 1.0
