"""The faithful per-sample port of the origin equals the vectorized engine for the origin preset."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

from research.data import one_hot
from research.engine.mlp import init_params, loss_and_grads
from research.engine.optim import sgd
from research.experiment.config.presets import PRESETS
from research.verify.origin import origin_batch_gradient, origin_update_mini_batch

# The origin program's network ([784, 30, 10], sigmoid everywhere, squared error), as its
# preset has it.
ORIGIN = PRESETS["origin"].spec()


@pytest.mark.parametrize("raw", [False, True], ids=["scaled", "raw-pixels"])
def test_origin_per_sample_gradient_equals_vectorized(mnist, raw):
    spec = ORIGIN
    params = init_params(spec, seed=0)
    x = mnist.train.x[:64].astype(np.float64) * (255 if raw else 1)
    y = one_hot(mnist.train.labels[:64])
    origin_grads, printed = origin_batch_gradient(params, x, y)
    loss, grads = loss_and_grads(params, x, y, spec)
    assert_close(grads, origin_grads, "gradients", "grads")
    # The origin prints Σ(a−y)² per row averaged: twice the ½-squared-error it descends.
    assert_close(printed, 2 * loss, "same_operations", "printed cost", check_dtype=False)


def test_origin_update_equals_engine_sgd_step(mnist):
    spec = ORIGIN
    params = init_params(spec, seed=1)
    x = mnist.train.x[:32].astype(np.float64)
    y = one_hot(mnist.train.labels[:32])
    origin_params, _ = origin_update_mini_batch(params, x, y, learning_rate=0.01)
    optimizer = sgd(0.01)
    _, grads = loss_and_grads(params, x, y, spec)
    engine_params, _ = optimizer.update(params, grads, optimizer.init(params))
    assert_close(engine_params, origin_params, "same_operations", "params after the update")
