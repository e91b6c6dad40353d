"""The JAX contender of workload w3: Nesterov momentum with inverted dropout and max-norm, an
epoch as one ``jax.jit``-compiled ``lax.scan``.

The math is the engine's step (``InPlaceTrainingStep`` fed ``mlp.dropout_masks``, with
``max_norm``), written in ``jax.numpy`` as a JAX user would write it: the loss of the masked
network, its gradient from ``jax.value_and_grad``, optax's Nesterov rule (v ← βv + g;
p ← p − lr·(g + βv)), then every hidden unit's incoming weights scaled by min(1, r/‖w‖). The masks
come from ``jax.random`` inside the compiled program (one key split per step), so the whole epoch,
batch gathering included, runs without returning to Python; the parameters and the velocity are
donated, so XLA may update them in place. ``momentum_step`` is the same step for masks given
explicitly (the tests compare it with the engine's step in float64).

jax lives in ``research.verify.reference`` only (tests/test_layout.py); this module takes it from
there, at call time, so importing the benchmark stays light. The program could move beside
``reference.sgd_epoch``, the JAX contender of w1 and w2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from research.engine.mlp import MLPSpec, Params


def _jax() -> tuple[Any, Any]:
    from research.verify import reference

    return reference.jax, reference.jnp


def momentum_step(
    spec: MLPSpec, learning_rate: float, beta: float, max_norm: float
) -> Callable[..., tuple[Any, Any, Any]]:
    """One step, not compiled: ``step(params, velocity, x, y, masks) -> (params, velocity,
    loss)``; ``masks`` has one array (0 or 1/keep, multiplied into what that layer reads) or None
    per layer, as ``mlp.dropout_masks`` gives them; ``max_norm`` 0 for none."""
    if spec.activation != "relu" or spec.loss != "cross_entropy":
        raise ValueError("the w3 program is written for relu hidden layers and cross-entropy")
    jax, jnp = _jax()
    last = spec.n_layers - 1

    def objective(params: Any, x: Any, y: Any, masks: Sequence[Any]) -> Any:
        h = x
        for i, layer in enumerate(params):
            if masks[i] is not None:
                h = h * masks[i]
            z = h @ layer["W"] + layer["b"]
            if i < last:
                h = jax.nn.relu(z)
        value = -jnp.sum(y * jax.nn.log_softmax(z, axis=1)) / z.shape[0]
        if spec.l2:
            value += 0.5 * spec.l2 * sum(jnp.sum(layer["W"] ** 2) for layer in params)
        return value

    value_and_grad = jax.value_and_grad(objective)

    def project(params: Any) -> Any:
        projected = []
        for i, layer in enumerate(params):
            W = layer["W"]
            if i < last:
                norms = jnp.sqrt(jnp.sum(W * W, axis=0))
                tiny = jnp.finfo(W.dtype).tiny
                W = W * jnp.minimum(1, max_norm / jnp.maximum(norms, tiny))
            projected.append({"W": W, "b": layer["b"]})
        return projected

    def step(params: Any, velocity: Any, x: Any, y: Any, masks: Sequence[Any]) -> Any:
        value, grads = value_and_grad(params, x, y, masks)
        velocity = jax.tree.map(lambda v, g: beta * v + g, velocity, grads)
        params = jax.tree.map(
            lambda p, g, v: p - learning_rate * (g + beta * v), params, grads, velocity
        )
        if max_norm:
            params = project(params)
        return params, velocity, value

    return step


def momentum_epoch(
    spec: MLPSpec,
    learning_rate: float,
    beta: float,
    input_dropout: float,
    dropout: float,
    max_norm: float,
) -> Callable[..., Any]:
    """``epoch(params, velocity, key, x, y, batches) -> (params, velocity, key, losses)``,
    compiled: a ``lax.scan`` of :func:`momentum_step` over ``batches`` (S, B) row indices, each
    step with fresh ``jax.random`` masks (each unit kept with probability 1 − rate)."""
    jax, _ = _jax()
    step = momentum_step(spec, learning_rate, beta, max_norm)
    rates = [input_dropout, *[dropout] * (spec.n_layers - 1)]

    def draw(key: Any, rows: int, dtype: Any) -> list[Any]:
        masks = []
        for key_i, width, rate in zip(jax.random.split(key, len(rates)), spec.sizes, rates):
            if rate == 0:
                masks.append(None)
            else:
                kept = jax.random.bernoulli(key_i, 1 - rate, (rows, width))
                masks.append(kept.astype(dtype) * (1 / (1 - rate)))
        return masks

    def epoch(params: Any, velocity: Any, key: Any, x: Any, y: Any, batches: Any) -> Any:
        def body(carry: Any, rows: Any) -> Any:
            params, velocity, key = carry
            key, subkey = jax.random.split(key)
            masks = draw(subkey, rows.shape[0], x.dtype)
            params, velocity, value = step(params, velocity, x[rows], y[rows], masks)
            return (params, velocity, key), value

        (params, velocity, key), losses = jax.lax.scan(body, (params, velocity, key), batches)
        return params, velocity, key, losses

    return jax.jit(epoch, donate_argnums=(0, 1))


def momentum_epoch_runner(
    epoch: Callable[..., Any], params: Params, x: np.ndarray, y: np.ndarray, seed: int = 0
) -> Callable[[np.ndarray], None]:
    """The benchmark's JAX contender for a momentum workload: an ``epoch`` of
    :func:`momentum_epoch` over device copies of the data. Returns ``run(batches)``: one epoch
    over ``batches`` (S, B) row indices, waiting for the result; parameters, velocity and key
    stay on the device between calls."""
    jax, jnp = _jax()
    x_device, y_device = jax.device_put(x), jax.device_put(y)
    state = {
        "params": [{key: jnp.asarray(v) for key, v in layer.items()} for layer in params],
        "velocity": [{key: jnp.zeros_like(v) for key, v in layer.items()} for layer in params],
        "key": jax.random.key(seed),
    }

    def run(batches: np.ndarray) -> None:
        state["params"], state["velocity"], state["key"], losses = epoch(
            state["params"],
            state["velocity"],
            state["key"],
            x_device,
            y_device,
            np.asarray(batches, np.int32),
        )
        jax.block_until_ready((state["params"], losses))

    return run
