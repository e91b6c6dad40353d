"""The JAX contender's programs: an epoch as one ``jax.jit``-compiled ``lax.scan`` over the
batches, for plain SGD (workloads w1 and w2) and for Nesterov momentum with inverted dropout and
max-norm (w3).

The math is the engine's step, written in ``jax.numpy`` as a JAX user would write it: the loss
with ``jax.nn``'s nonlinearities (for w3, of the masked network), its gradient from
``jax.value_and_grad``, then plain SGD, or optax's Nesterov rule (v ← βv + g;
p ← p − lr·(g + βv)) followed by every hidden unit's incoming weights scaled by min(1, r/‖w‖).
The w3 masks come from ``jax.random`` inside the compiled program (one key split per step). The
parameters (and the velocity) are donated, so XLA may update them in place.

Like the engine (``train`` on ``Split.images``), the programs train from uint8 images: each step
gathers its batch's rows as bytes and converts them to float32 k/255 inside the compiled program
(:func:`batch_inputs`), so the whole epoch, gathering and conversion included, runs without
returning to Python, and both contenders do the same work per batch. ``momentum_step`` and
``sgd_step`` are single steps on float inputs (the tests compare the first with the engine's step
in float64).

jax lives in ``research.verify.reference`` only (tests/test_layout.py); this module takes it from
there, at call time, so importing the benchmark stays light. ``reference.sgd_epoch``, on float
inputs, was the SGD program before the bench trained from bytes; :func:`sgd_epoch` is the same
math (tests/test_bench.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from research.engine.mlp import MLPSpec, Params


def _jax() -> tuple[Any, Any]:
    from research.verify import reference

    return reference.jax, reference.jnp


def batch_inputs(images: Any, rows: Any, dtype: Any) -> Any:
    """The batch's inputs (B, n) of ``dtype`` from uint8 ``images`` (N, n) and ``rows`` (B,):
    the rows gathered as bytes, then k/255.

    What a JAX user writes. XLA on the CPU turns the division into a product with 1/255, so 126
    of the 256 values are one ulp away from the correctly rounded k/255 the engine feeds
    (``research.data.pixel_values``); a timing cannot see that. (An exact table look-up,
    ``table[images[rows]]``, was 15% slower per w1 epoch.)
    """
    return images[rows].astype(dtype) / 255


def _objective(spec: MLPSpec) -> Callable[..., Any]:
    """``objective(params, x, y, masks) -> loss``: ``spec``'s batch-mean loss with the l2 term,
    the network written with ``jax.nn``; ``masks`` has one array (0 or 1/keep, multiplied into
    what that layer reads) or None per layer. The losses of the benchmark's workloads only:
    squared error on sigmoid outputs, and softmax cross-entropy."""
    if (spec.output, spec.loss) not in (("sigmoid", "mse"), ("softmax", "cross_entropy")):
        raise ValueError(
            "the benchmark's JAX programs are written for sigmoid/mse and softmax/cross-entropy, "
            f"not {spec.output}/{spec.loss}"
        )
    jax, jnp = _jax()
    hidden = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}[spec.activation]
    last = spec.n_layers - 1

    def objective(params: Any, x: Any, y: Any, masks: Sequence[Any]) -> Any:
        h = x
        for i, layer in enumerate(params):
            if masks[i] is not None:
                h = h * masks[i]
            z = h @ layer["W"] + layer["b"]
            if i < last:
                h = hidden(z)
        if spec.loss == "cross_entropy":
            value = -jnp.sum(y * jax.nn.log_softmax(z, axis=1)) / z.shape[0]
        else:
            value = 0.5 * jnp.sum((jax.nn.sigmoid(z) - y) ** 2) / z.shape[0]
        if spec.l2:
            value += 0.5 * spec.l2 * sum(jnp.sum(layer["W"] ** 2) for layer in params)
        return value

    return objective


def sgd_step(spec: MLPSpec, learning_rate: float) -> Callable[..., tuple[Any, Any]]:
    """One plain SGD step, not compiled: ``step(params, x, y) -> (params, loss)``, the loss
    before the step."""
    jax, _ = _jax()
    value_and_grad = jax.value_and_grad(_objective(spec))
    no_masks = (None,) * spec.n_layers

    def step(params: Any, x: Any, y: Any) -> Any:
        value, grads = value_and_grad(params, x, y, no_masks)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), value

    return step


def sgd_epoch(spec: MLPSpec, learning_rate: float) -> Callable[..., Any]:
    """``epoch(params, images, y, batches) -> (params, losses)``, compiled: a ``lax.scan`` of
    :func:`sgd_step` over ``batches`` (S, B) row indices, each batch gathered from the uint8
    ``images`` (N, n_in) and converted by :func:`batch_inputs` to the parameters' dtype."""
    jax, _ = _jax()
    step = sgd_step(spec, learning_rate)

    def epoch(params: Any, images: Any, y: Any, batches: Any) -> Any:
        dtype = params[0]["W"].dtype

        def body(params: Any, rows: Any) -> Any:
            return step(params, batch_inputs(images, rows, dtype), y[rows])

        return jax.lax.scan(body, params, batches)

    return jax.jit(epoch, donate_argnums=0)


def sgd_epoch_runner(
    spec: MLPSpec, learning_rate: float, params: Params, images: np.ndarray, y: np.ndarray
) -> Callable[[np.ndarray], None]:
    """The benchmark's JAX contender for a plain SGD workload: :func:`sgd_epoch` over device
    copies of the uint8 ``images`` (N, n_in) and the targets ``y`` (N, n_out). Returns
    ``run(batches)``: one epoch over ``batches`` (S, B) row indices, waiting for the result; the
    parameters stay on the device between calls."""
    jax, jnp = _jax()
    epoch = sgd_epoch(spec, learning_rate)
    images_device, y_device = jax.device_put(images), jax.device_put(y)
    state = {"params": [{key: jnp.asarray(v) for key, v in layer.items()} for layer in params]}

    def run(batches: np.ndarray) -> None:
        state["params"], losses = epoch(
            state["params"], images_device, y_device, np.asarray(batches, np.int32)
        )
        jax.block_until_ready((state["params"], losses))

    return run


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
    value_and_grad = jax.value_and_grad(_objective(spec))

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
    """``epoch(params, velocity, key, images, y, batches) -> (params, velocity, key, losses)``,
    compiled: a ``lax.scan`` of :func:`momentum_step` over ``batches`` (S, B) row indices, each
    batch gathered from the uint8 ``images`` (N, n_in) and converted by :func:`batch_inputs`,
    each step with fresh ``jax.random`` masks (each unit kept with probability 1 − rate)."""
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

    def epoch(params: Any, velocity: Any, key: Any, images: Any, y: Any, batches: Any) -> Any:
        dtype = params[0]["W"].dtype

        def body(carry: Any, rows: Any) -> Any:
            params, velocity, key = carry
            key, subkey = jax.random.split(key)
            masks = draw(subkey, rows.shape[0], dtype)
            x = batch_inputs(images, rows, dtype)
            params, velocity, value = step(params, velocity, x, y[rows], masks)
            return (params, velocity, key), value

        (params, velocity, key), losses = jax.lax.scan(body, (params, velocity, key), batches)
        return params, velocity, key, losses

    return jax.jit(epoch, donate_argnums=(0, 1))


def momentum_epoch_runner(
    epoch: Callable[..., Any], params: Params, images: np.ndarray, y: np.ndarray, seed: int = 0
) -> Callable[[np.ndarray], None]:
    """The benchmark's JAX contender for a momentum workload: an ``epoch`` of
    :func:`momentum_epoch` over device copies of the uint8 ``images`` (N, n_in) and the targets
    ``y`` (N, n_out). Returns ``run(batches)``: one epoch over ``batches`` (S, B) row indices,
    waiting for the result; parameters, velocity and key stay on the device between calls."""
    jax, jnp = _jax()
    images_device, y_device = jax.device_put(images), jax.device_put(y)
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
            images_device,
            y_device,
            np.asarray(batches, np.int32),
        )
        jax.block_until_ready((state["params"], losses))

    return run


# --- w4: a small convolutional network ---------------------------------------------------------


def conv_net_step(
    learning_rate: float, pool: int, image_shape: Sequence[int]
) -> Callable[..., Any]:
    """One plain SGD step of w4's network, not compiled: ``step(params, x, y) -> (params,
    loss)``, the loss before the step; ``x`` (B, n) or (B, *image_shape).

    The network, as a JAX user writes it (NCHW): for each of the first two parameter dicts a
    convolution (``lax.conv_general_dilated``, stride 1, no padding, W (F, C, k, k)), ReLU and
    max-pooling (``lax.reduce_window``, ``pool`` × ``pool``, stride ``pool``); then the flattened
    (C, H, W) features through dense ReLU layers, the last dict giving the logits; softmax
    cross-entropy, the batch mean. ``params`` holds only the layers with parameters, in order.
    """
    jax, jnp = _jax()
    lax = jax.lax

    def conv(h: Any, layer: Any) -> Any:
        z = lax.conv_general_dilated(
            h, layer["W"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return z + layer["b"][None, :, None, None]

    def max_pool(h: Any) -> Any:
        window = (1, 1, pool, pool)
        start = np.array(
            -np.inf, h.dtype
        )  # a constant: JAX sees the max monoid and differentiates it
        return lax.reduce_window(h, start, lax.max, window, window, "VALID")

    def objective(params: Any, x: Any, y: Any) -> Any:
        h = x.reshape(x.shape[0], *image_shape)
        convs = [layer for layer in params if layer["W"].ndim == 4]
        dense = params[len(convs) :]
        for layer in convs:
            h = max_pool(jax.nn.relu(conv(h, layer)))
        h = h.reshape(h.shape[0], -1)
        for layer in dense[:-1]:
            h = jax.nn.relu(h @ layer["W"] + layer["b"])
        z = h @ dense[-1]["W"] + dense[-1]["b"]
        return -jnp.sum(y * jax.nn.log_softmax(z, axis=1)) / z.shape[0]

    value_and_grad = jax.value_and_grad(objective)

    def step(params: Any, x: Any, y: Any) -> Any:
        value, grads = value_and_grad(params, x, y)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), value

    return step


def conv_net_runner(
    learning_rate: float,
    pool: int,
    image_shape: Sequence[int],
    params: Params,
    images: np.ndarray,
    y: np.ndarray,
) -> Callable[[np.ndarray], None]:
    """The benchmark's JAX contender for w4: :func:`conv_net_step` on batches gathered from
    device copies of the uint8 ``images`` (N, n) and converted by :func:`batch_inputs`, compiled
    as one step (parameters donated) that Python calls once per batch. ``params``: the layers
    with parameters. Returns ``run(batches)``: the steps over ``batches`` (S, B) row indices,
    waiting for the result.

    Not a ``lax.scan`` over the batches as for w1-w3: XLA's CPU backend ran this network's steps
    about 5x slower inside a scan (docs/measurements/2026-12-06-w4.md), so the fastest program
    JAX offers here is the compiled step.
    """
    jax, jnp = _jax()
    step = conv_net_step(learning_rate, pool, image_shape)

    def gathered_step(params: Any, images: Any, y: Any, rows: Any) -> Any:
        return step(params, batch_inputs(images, rows, params[0]["W"].dtype), y[rows])

    compiled = jax.jit(gathered_step, donate_argnums=0)
    images_device, y_device = jax.device_put(images), jax.device_put(y)
    state = {"params": [{key: jnp.asarray(v) for key, v in layer.items()} for layer in params]}

    def run(batches: np.ndarray) -> None:
        for rows in np.asarray(batches, np.int32):
            state["params"], value = compiled(state["params"], images_device, y_device, rows)
        jax.block_until_ready((state["params"], value))

    return run
