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
from helpers import assert_trees_close

from research.engine import mlp, optim
from research.engine.mlp import MLPSpec
from research.verify import reference
from research.verify.compare import tolerance

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

    tol = tolerance("trajectory", np.float64)
    first_loss = mlp.loss(params, x, y, spec)
    for step, rows in enumerate(batches, start=1):
        _, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec)
        params, state = opt.update(params, grads, state)
        jparams, jstate = jax_step(jparams, jstate, x[rows], y[rows])
        assert_trees_close(
            params, jparams, tol.rtol, tol.atol, what=f"{optimizer} params after step {step}"
        )

    # The comparison is only meaningful if training really moved the parameters.
    moved = max(float(np.max(np.abs(p[key] - p0[key]))) for p, p0 in zip(params, init) for key in p)
    assert moved > 1e-2, f"parameters barely moved ({moved:.2e}); the check would be vacuous"
    assert mlp.loss(params, x, y, spec) < first_loss


@pytest.mark.parametrize("radius", [0.0, 0.6])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_numpy_training_with_dropout_matches_jax_and_optax(optimizer: str, radius: float) -> None:
    """The same, with dropout (input 0.2, hidden 0.5), and max-norm or not: each step's masks,
    drawn once, are given to both sides; the JAX side applies them, and projects the weights
    after each optax update, in its own reference code."""
    spec, scheme = SPECS["relu-xent-l2"]
    make_numpy, make_optax = OPTIMIZERS[optimizer]
    x, y, batches = data(spec)
    init = mlp.init_params(spec, seed=0, scheme=scheme)
    rng = np.random.default_rng(5)
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

    tol = tolerance("trajectory", np.float64)
    capped = 0
    for step, rows in enumerate(batches, start=1):
        masks = mlp.dropout_masks(rng, BATCH, spec.sizes, 0.2, 0.5, np.float64)
        _, grads = mlp.loss_and_grads(params, x[rows], y[rows], spec, masks)
        params, state = opt.update(params, grads, state)
        before = np.linalg.norm(params[0]["W"], axis=0)
        params = optim.max_norm(params, radius)
        capped += int(np.sum(before > radius)) if radius else 0
        jparams, jstate = jax_step(jparams, jstate, x[rows], y[rows], masks)
        assert_trees_close(
            params, jparams, tol.rtol, tol.atol, what=f"{optimizer} params after step {step}"
        )
    moved = max(float(np.max(np.abs(p[key] - p0[key]))) for p, p0 in zip(params, init) for key in p)
    assert moved > 1e-2, f"parameters barely moved ({moved:.2e}); the check would be vacuous"
    if radius:  # the projection really acted, and held
        assert capped > 0
        for layer in params[:-1]:
            assert np.all(np.linalg.norm(layer["W"], axis=0) <= radius * (1 + 1e-12))
