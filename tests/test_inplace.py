"""The training loop's fast path against the pure functions it replaces (to the
``same_operations`` tolerance of research/verify/compare.py).

``InPlaceTrainingStep.step`` must equal ``mlp.loss_and_grads`` + ``optimizer.update`` (which
tests/test_trajectory.py checks against JAX + optax), and ``optimizer.update_in_place`` must equal
``optimizer.update``, in float64, for every activation, output/loss pairing, optimizer, depth and
partial batches. ``train()`` runs on the fast path; its whole trajectory is compared with a loop
written with the pure functions.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import ACTIVATIONS, EXACT, OUTPUT_LOSSES, assert_close, make_targets
from hypothesis import given, settings
from hypothesis import strategies as st

from research.engine import mlp, optim
from research.engine.blas import gemm_update
from research.engine.inplace import InPlaceTrainingStep
from research.experiment.config.presets import PRESETS
from research.experiment.training.train import train
from research.verify.compare import tolerance

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.3),
    "momentum": lambda: optim.momentum(0.05, beta=0.8),
    "nesterov": lambda: optim.momentum(0.05, beta=0.8, nesterov=True),
    "adam": lambda: optim.adam(0.01, beta1=0.85, beta2=0.99, eps=1e-7),
}


def copy_params(params: mlp.Params) -> mlp.Params:
    return [{key: value.copy() for key, value in layer.items()} for layer in params]


@settings(max_examples=60, deadline=None)
@given(
    activation=st.sampled_from(ACTIVATIONS),
    output_loss=st.sampled_from(OUTPUT_LOSSES),
    optimizer=st.sampled_from(list(OPTIMIZERS)),
    hidden=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    l2=st.sampled_from([0.0, 0.01]),
    batch_size=st.integers(1, 12),
    blas_update=st.booleans(),
    seed=st.integers(0, 2**31),
    input_dropout=st.sampled_from([0.0, 0.2]),
    dropout=st.sampled_from([0.0, 0.5]),
    radius=st.sampled_from([0.0, 0.5]),
)
def test_in_place_step_equals_loss_and_grads_then_update(
    activation, output_loss, optimizer, hidden, l2, batch_size, blas_update, seed,
    input_dropout, dropout, radius,
):  # fmt: skip
    output, loss = output_loss
    spec = mlp.MLPSpec((6, *hidden, 4), activation, output, loss, l2=l2)
    rng = np.random.default_rng(seed)
    start = mlp.init_params(spec, rng, scheme="xavier")
    untouched = copy_params(start)
    x = rng.standard_normal((30, 6))
    y = make_targets(rng, 30, 4, output, loss)

    pure_optimizer = OPTIMIZERS[optimizer]()
    params, state = start, pure_optimizer.init(start)
    stepper = InPlaceTrainingStep(
        spec, start, OPTIMIZERS[optimizer](), batch_size, blas_update, max_norm=radius
    )
    for step in range(8):
        # full batches, a short last batch, and the whole of x (rows=None) once
        n = batch_size if step % 3 else max(1, batch_size // 2)
        rows = rng.permutation(30)[:n]
        masks = mlp.dropout_masks(rng, n, spec.sizes, input_dropout, dropout, np.float64)
        expected_loss, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec, masks)
        params, state = pure_optimizer.update(params, grads, state)
        params = optim.max_norm(params, radius)
        if step == 5:
            loss_value = stepper.step(x[rows], y[rows], masks=masks)
        else:
            loss_value = stepper.step(x, y, rows, masks)
        assert_close(loss_value, expected_loss, "same_operations", f"loss of step {step + 1}")
        assert_close(stepper.params, params, "same_operations", f"params after step {step + 1}")
    assert_close(start, untouched, EXACT, what="the caller's parameters")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_update_in_place_is_update_exactly(optimizer):
    """Same operations in the same order: float64 results are bit-for-bit those of update."""
    rng = np.random.default_rng(1)
    spec = mlp.MLPSpec((7, 5, 3), "tanh", "softmax", "cross_entropy")
    params = mlp.init_params(spec, rng)
    pure, fast = OPTIMIZERS[optimizer](), OPTIMIZERS[optimizer]()
    pure_params, pure_state = params, pure.init(params)
    fast_params, fast_state = copy_params(params), fast.init(params)
    for _ in range(5):
        grads = [
            {key: rng.standard_normal(v.shape) for key, v in layer.items()} for layer in params
        ]
        pure_params, pure_state = pure.update(pure_params, grads, pure_state)
        fast.update_in_place(fast_params, copy_params(grads), fast_state)
        assert_close(fast_params, pure_params, EXACT, what="params")
    if optimizer == "adam":
        assert fast_state["count"] == pure_state["count"] == 5


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    n_out=st.integers(1, 200),
    share_over=st.sampled_from([0.0, 0.01, 0.03, 0.1, 1.0]),
    diverged=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_max_norm_in_place_is_max_norm_exactly(dtype, n_out, share_over, diverged, seed):
    """Column by column (few columns over the radius) or in one pass (many), the projection is
    bit for bit ``max_norm``'s, a NaN column (a diverged W) included."""
    rng = np.random.default_rng(seed)
    params = [
        {"W": rng.standard_normal((7, n_out)).astype(dtype), "b": np.ones(n_out, dtype)},
        {"W": rng.standard_normal((n_out, 3)).astype(dtype), "b": np.ones(3, dtype)},
    ]
    radius = 10.0  # no column of standard normals over it, but those blown up here
    over = rng.random(n_out) < share_over
    params[0]["W"][:, over] *= 100
    if diverged:
        params[0]["W"][2, rng.integers(n_out)] = np.nan
    expected = optim.max_norm(params, radius)
    projected = copy_params(params)
    optim.max_norm_in_place(projected, radius, [np.empty(n_out, dtype)])
    assert_close(projected, expected, EXACT, what="projected params")
    assert_close(projected[1:], params[1:], EXACT, what="the output layer, untouched")


@pytest.mark.parametrize("share", [0.0, 1.0])
@pytest.mark.parametrize("diverged", [False, True])
def test_both_ways_of_max_norm_scaling_are_max_norm_exactly(monkeypatch, share, diverged):
    """Every column over the radius scaled one by one (share 1), or W in one pass (share 0)."""
    monkeypatch.setattr(optim, "COLUMN_BY_COLUMN_SHARE", share)
    rng = np.random.default_rng(5)
    params = [
        {"W": rng.standard_normal((9, 64)).astype(np.float32), "b": np.zeros(64, np.float32)},
        {"W": rng.standard_normal((64, 3)).astype(np.float32), "b": np.zeros(3, np.float32)},
    ]
    params[0]["W"][:, [3, 17, 40]] *= 100
    if diverged:
        params[0]["W"][4, 17] = np.nan
    expected = optim.max_norm(params, 10.0)
    projected = copy_params(params)
    optim.max_norm_in_place(projected, 10.0, [np.empty(64, np.float32)])
    assert_close(projected, expected, EXACT, what=f"projected params, share {share}")
    assert not np.array_equal(projected[0]["W"][:, 3], params[0]["W"][:, 3])  # it did scale


def test_relu_steps_with_masks_on_some_layers_only():
    """ReLU's factor (z > 0), times the mask where a layer has one, with masks on the inputs and
    the second hidden layer only: the fast path follows the pure functions step after step
    (float64, as the module's other comparisons)."""
    dtype = np.float64
    spec = mlp.MLPSpec((6, 5, 4, 3), "relu", "softmax", "cross_entropy")
    rng = np.random.default_rng(11)
    start = mlp.init_params(spec, rng, dtype=dtype, scheme="he")
    x = rng.standard_normal((20, 6)).astype(dtype)
    y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 20)]
    update = optim.momentum(0.05, beta=0.9, nesterov=True)
    params, state = start, update.init(start)
    stepper = InPlaceTrainingStep(spec, start, optim.momentum(0.05, 0.9, True), 8)
    for step in range(6):
        n = 8 if step % 2 else 5
        rows = rng.permutation(20)[:n]
        masks = [
            (rng.random((n, 6)) >= 0.3).astype(dtype) / dtype(0.7),
            None,
            (rng.random((n, 4)) >= 0.5).astype(dtype) * dtype(2),
        ]
        expected_loss, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec, masks)
        params, state = update.update(params, grads, state)
        loss_value = stepper.step(x, y, rows, masks)
        assert_close(loss_value, expected_loss, "same_operations", f"loss of step {step + 1}")
        assert_close(stepper.params, params, "same_operations", f"params after step {step + 1}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_gemm_update_accumulates_into_its_output(dtype):
    update = gemm_update()
    if update is None:
        pytest.skip("numpy's BLAS offers no cblas ?gemm64_ here; the stepper uses numpy instead")
    rng = np.random.default_rng(4)
    buffer = rng.standard_normal((9, 6)).astype(dtype)
    a = buffer[:5]  # a leading slice of a buffer, as the stepper passes
    b = rng.standard_normal((5, 4)).astype(dtype)
    c = rng.standard_normal((6, 4)).astype(dtype)
    expected = 0.75 * c.astype(np.float64) - 0.3 * (a.T.astype(np.float64) @ b)
    update(c, a, b, -0.3, 0.75)
    assert_close(c, expected, tolerance("gemm", dtype), "c", check_dtype=False)
    with pytest.raises(ValueError, match="shapes do not fit"):
        update(c, b, a, 1.0, 1.0)


def test_in_place_step_keeps_float32_and_rejects_oversized_batches():
    spec = mlp.MLPSpec((5, 4, 3), "sigmoid", "sigmoid", "mse")
    params = mlp.init_params(spec, 0, dtype=np.float32)
    stepper = InPlaceTrainingStep(spec, params, optim.sgd(0.1), batch_size=4)
    x = np.ones((10, 5), np.float32)
    y = np.zeros((10, 3), np.float32)
    value = stepper.step(x, y, np.arange(4))
    assert isinstance(value, float)
    assert all(array.dtype == np.float32 for layer in stepper.params for array in layer.values())
    with pytest.raises(ValueError, match="batch of 5 rows does not fit batch_size=4"):
        stepper.step(x, y, np.arange(5))


def pure_train(config, x, labels, x_val, labels_val):
    """train()'s loop written with the pure functions (the loop before the fast path)."""
    spec = config.spec()
    dtype = np.dtype(config.dtype)
    init_rng, shuffle_rng, dropout_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
    )
    params = mlp.init_params(spec, init_rng, dtype=dtype, scheme=config.init)
    options = {"beta": config.momentum, "nesterov": config.nesterov}
    optimizer = optim.make_optimizer(
        config.optimizer,
        config.learning_rate,
        **(options if config.optimizer == "momentum" else {}),
    )
    state = optimizer.init(params)
    x = x.astype(dtype)
    targets = np.eye(10, dtype=dtype)[labels]
    losses = []
    for _ in range(config.epochs):
        order = shuffle_rng.permutation(len(x))
        total = 0.0
        n_batches = (
            len(x) // config.batch_size if config.drop_last else -(-len(x) // config.batch_size)
        )
        for step in range(n_batches):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            masks = None
            if config.input_dropout or config.dropout:
                masks = mlp.dropout_masks(
                    dropout_rng, len(rows), spec.sizes, config.input_dropout, config.dropout, dtype
                )
            value, grads = mlp.loss_and_grads(params, x[rows], targets[rows], spec, masks)
            params, state = optimizer.update(params, grads, state)
            params = optim.max_norm(params, config.max_norm)
            total += value * len(rows)
        losses.append(total / (n_batches * config.batch_size if config.drop_last else len(x)))
    return params, losses


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the default: relu, softmax cross-entropy, Nesterov momentum
        {"activation": "sigmoid", "output": "sigmoid", "loss": "mse", "optimizer": "sgd"},
        {"activation": "tanh", "optimizer": "adam", "learning_rate": 0.003, "l2": 1e-3},
        {"optimizer": "momentum", "nesterov": False, "n_hidden_layers": 2, "drop_last": True},
        {"n_hidden_layers": 2, "input_dropout": 0.2, "dropout": 0.5},
        {"activation": "tanh", "optimizer": "adam", "learning_rate": 0.003, "dropout": 0.3},
        {"n_hidden_layers": 2, "dropout": 0.5, "max_norm": 0.3, "optimizer": "sgd"},
    ],
    ids=[
        "default",
        "seed-like",
        "tanh-adam-l2",
        "momentum-deep-drop-last",
        "dropout",
        "tanh-adam-dropout",
        "sgd-dropout-max-norm",
    ],
)
def test_train_trajectory_equals_the_pure_loop(overrides):
    rng = np.random.default_rng(3)
    x = rng.random((230, 784))
    labels = rng.integers(0, 10, 230)
    config = replace(
        PRESETS["default"], hidden_size=16, batch_size=32, epochs=3, dtype="float64", **overrides
    )
    result = train(config, x, labels, x[:20], labels[:20])
    params, losses = pure_train(config, x, labels, x[:20], labels[:20])
    assert_close(result.params, params, "same_operations", what="final params")
    history = np.array([m.train_loss for m in result.history])
    assert_close(history, np.array(losses), "same_operations", "train losses")
