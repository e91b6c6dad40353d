"""20 training steps in numpy (handwritten backprop + research.engine.optim) against the same
20 steps in JAX (jax.grad of the reference loss + optax), from one initialization and one batch
order.

A per-step gradient agreement of ~1e-14 would allow drift, and the optimizers' update rules are
only checked here: after every step all parameter arrays must agree to the ``trajectory``
tolerance of research/verify/compare.py (rtol 1e-8, atol 1e-10; the parameters are O(1)). The
hyperparameters are not the defaults, so a swapped or ignored argument shows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close

from research.engine import mlp, optim
from research.engine.mlp import MLPSpec
from research.verify import reference

STEPS = 20
BATCH = 8

# name: (numpy optimizer, the optax transformation it claims to equal)
Factories = tuple[Callable[[], optim.Optimizer], Callable[[], optax.GradientTransformation]]
OPTIMIZERS: dict[str, Factories] = {
    "sgd": (lambda: optim.sgd(0.3), lambda: optax.sgd(0.3)),
    "momentum": (
        lambda: optim.momentum(0.05, beta=0.8),
        lambda: optax.sgd(0.05, momentum=0.8),
    ),
    "nesterov": (
        lambda: optim.momentum(0.05, beta=0.8, nesterov=True),
        lambda: optax.sgd(0.05, momentum=0.8, nesterov=True),
    ),
    "adam": (
        lambda: optim.adam(0.01, beta1=0.85, beta2=0.99, eps=1e-7),
        lambda: optax.adam(0.01, b1=0.85, b2=0.99, eps=1e-7),
    ),
}

SPECS = {
    "sigmoid-mse": (MLPSpec((20, 16, 8, 5), "sigmoid", "sigmoid", "mse"), "normal"),
    "relu-xent-l2": (MLPSpec((20, 16, 8, 5), "relu", "softmax", "cross_entropy", l2=1e-3), "he"),
}


def data(spec: MLPSpec) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """40 random rows with one-hot labels, and the fixed order of 20 batches of 8 (4 epochs)."""
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((40, spec.sizes[0]))
    y = np.eye(spec.sizes[-1])[rng.integers(0, spec.sizes[-1], size=40)]
    order = rng.permutation(40).reshape(-1, BATCH)
    batches = [order[step % len(order)] for step in range(STEPS)]
    return x, y, batches


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_numpy_training_matches_jax_and_optax(spec_name: str, optimizer: str) -> None:
    spec, scheme = SPECS[spec_name]
    make_numpy, make_optax = OPTIMIZERS[optimizer]
    x, y, batches = data(spec)
    init = mlp.init_params(spec, seed=0, scheme=scheme)

    # numpy
    opt = make_numpy()
    params = [dict(layer) for layer in init]
    state = opt.init(params)
    # JAX
    tx = make_optax()
    jparams = [{key: jnp.asarray(value) for key, value in layer.items()} for layer in init]
    jstate = tx.init(jparams)

    @jax.jit
    def jax_step(p, s, xb, yb):
        grads = jax.grad(reference.objective)(p, xb, yb, spec)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    first_loss = mlp.loss(params, x, y, spec)
    for step, rows in enumerate(batches, start=1):
        _, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec)
        params, state = opt.update(params, grads, state)
        jparams, jstate = jax_step(jparams, jstate, x[rows], y[rows])
        assert_close(params, jparams, "trajectory", what=f"{optimizer} params after step {step}")

    # The comparison is only meaningful if training really moved the parameters.
    moved = max(float(np.max(np.abs(p[key] - p0[key]))) for p, p0 in zip(params, init) for key in p)
    assert moved > 1e-2, f"parameters barely moved ({moved:.2e}); the check would be vacuous"
    assert mlp.loss(params, x, y, spec) < first_loss


def train_both_with_dropout(
    factories: Factories, rates: tuple[float, float], radius: float, seed: int, what: str
) -> tuple[mlp.Params, int]:
    """20 steps on both sides with fresh dropout masks at ``rates`` every step (drawn once, given
    to both; the JAX side applies them in its own reference code) and max-norm at ``radius``
    after every update (JAX: the reference's own projection; optax has none per unit).
    Asserts the ``trajectory`` tolerance after every step; returns the numpy parameters and
    how many columns the projection capped."""
    spec, scheme = SPECS["relu-xent-l2"]
    make_numpy, make_optax = factories
    x, y, batches = data(spec)
    init = mlp.init_params(spec, seed=0, scheme=scheme)
    rng = np.random.default_rng(seed)
    opt, tx = make_numpy(), make_optax()
    params, state = [dict(layer) for layer in init], opt.init(init)
    jparams = [{key: jnp.asarray(value) for key, value in layer.items()} for layer in init]
    jstate = tx.init(jparams)

    @jax.jit
    def jax_step(p, s, xb, yb, masks):
        grads = jax.grad(reference.objective)(p, xb, yb, spec, masks)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        return (reference.max_norm(p, radius) if radius else p), s

    capped = 0
    for step, rows in enumerate(batches, start=1):
        masks = mlp.dropout_masks(rng, BATCH, spec.sizes, *rates, np.float64)
        _, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec, masks)
        params, state = opt.update(params, grads, state)
        if radius:
            norms = [np.linalg.norm(layer["W"], axis=0) for layer in params[:-1]]
            capped += sum(int(np.sum(norm > radius)) for norm in norms)
        params = optim.max_norm(params, radius)
        jparams, jstate = jax_step(jparams, jstate, x[rows], y[rows], masks)
        assert_close(params, jparams, "trajectory", what=f"{what} after step {step}")
    moved = max(float(np.max(np.abs(p[key] - p0[key]))) for p, p0 in zip(params, init) for key in p)
    assert moved > 1e-2, f"parameters barely moved ({moved:.2e}); the check would be vacuous"
    return params, capped


@pytest.mark.parametrize("radius", [0.0, 0.6])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_numpy_training_with_dropout_matches_jax_and_optax(optimizer: str, radius: float) -> None:
    """The same with dropout (input 0.2, hidden 0.5), and max-norm or not."""
    params, capped = train_both_with_dropout(
        OPTIMIZERS[optimizer], (0.2, 0.5), radius, 5, optimizer
    )
    if radius:  # the projection really acted, and held
        assert capped > 0
        for number, layer in enumerate(params[:-1]):
            norms = np.linalg.norm(layer["W"], axis=0)  # none above the radius, but for rounding
            assert_close(np.minimum(norms, radius), norms, "same_operations", f"layer {number}")


def in_float64(schedule: optax.Schedule) -> optax.Schedule:
    """An optax schedule evaluated on a float64 step count: optax counts steps in int32, and
    its schedules then compute the rate in float32, 1e-8 off the float64 rate (measured: every
    bias 1.5e-8 off after one step), which would hide what this test checks."""
    return lambda count: schedule(jnp.asarray(count, jnp.float64))


def schedule_of(name: str, **options) -> optim.Schedule:
    return optim.learning_rate_schedule(0.05, name, total_steps=STEPS, **options)


# Schedules, each with the optax schedule it claims to equal (rates for 20 steps of 8 rows).
SCHEDULES: dict[str, tuple[optim.Schedule, optax.Schedule]] = {
    "step": (
        schedule_of("step", decay_steps=5, decay_rate=0.5),
        optax.exponential_decay(0.05, 5, 0.5, staircase=True),
    ),
    "exponential": (
        schedule_of("exponential", decay_steps=5, decay_rate=0.5),
        optax.exponential_decay(0.05, 5, 0.5),
    ),
    "cosine": (schedule_of("cosine"), optax.cosine_decay_schedule(0.05, STEPS)),
    "warmup-cosine": (
        schedule_of("cosine", warmup_steps=4),
        optax.join_schedules(
            [optax.linear_schedule(0.0, 0.05, 4), optax.cosine_decay_schedule(0.05, STEPS - 4)],
            [4],
        ),
    ),
    "warmup-step": (
        schedule_of("step", decay_steps=6, decay_rate=0.3, warmup_steps=3),
        optax.join_schedules(
            [
                optax.linear_schedule(0.0, 0.05, 3),
                optax.exponential_decay(0.05, 6, 0.3, staircase=True),
            ],
            [3],
        ),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_equal_optax_at_every_step(name: str) -> None:
    ours, theirs = SCHEDULES[name]
    for step in range(3 * STEPS):
        assert_close(ours(step), float(theirs(step)), "schedules", f"{name} at step {step}")
    ramp = optim.linear_ramp(0.5, 0.9, 10)
    reference_ramp = optax.linear_schedule(0.5, 0.9, 10)
    for step in range(30):
        assert_close(ramp(step), float(reference_ramp(step)), "schedules", f"ramp at {step}")


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov-ramp", "adam"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scheduled_training_matches_jax_and_optax(name: str, optimizer: str) -> None:
    """20 steps with a schedule (and Nesterov momentum ramped from 0.5 to 0.9 over 10 steps,
    optax's ``inject_hyperparams``), with dropout and max-norm too, against JAX + optax."""
    ours, theirs = SCHEDULES[name][0], in_float64(SCHEDULES[name][1])
    ramp = optim.linear_ramp(0.5, 0.9, 10)
    factories: Factories = {
        "sgd": (lambda: optim.sgd(ours), lambda: optax.sgd(theirs)),
        "nesterov-ramp": (
            lambda: optim.momentum(ours, beta=ramp, nesterov=True),
            lambda: optax.inject_hyperparams(optax.sgd)(
                learning_rate=theirs,
                momentum=in_float64(optax.linear_schedule(0.5, 0.9, 10)),
                nesterov=True,
            ),
        ),
        "adam": (
            lambda: optim.adam(ours, beta1=0.85, beta2=0.99, eps=1e-7),
            lambda: optax.adam(theirs, b1=0.85, b2=0.99, eps=1e-7),
        ),
    }[optimizer]
    train_both_with_dropout(factories, (0.1, 0.3), 1.0, 9, f"{name} {optimizer}")
