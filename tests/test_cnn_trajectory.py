"""A convolutional network trained both ways, and checked whole on real MNIST.

20 training steps of a small CNN (conv, batch norm, max- and average-pooling, a residual block
holding a conv and a batch norm, dropout, dense) in float64: numpy (the handwritten backward of
``research.engine.network.loss_and_grads`` in training mode, its running statistics advanced,
``research.engine.optim``) against JAX (``jax.grad`` of the layers' independent references chained
by ``research.verify.layer_check.reference_logits``, the loss and l2 term written here again) and
optax, from one initialization, one batch order and the same dropout masks (drawn once with
``research.engine.network.draw_masks``, given to both). The running statistics are advanced on
the JAX side from their definition (Keras' momentum convention, ``running = m·running + (1 −
m)·batch``, with the unbiased batch variance averaged in, as PyTorch does). After 20 steps the
parameters and the running statistics agree to the table's ``trajectory`` tolerance (rtol 1e-8,
atol 1e-10), and the evaluation-mode loss (running statistics, no dropout) to its ``loss`` one.

Then ``check_network`` compares the loss and every gradient of conv nets built from ``layers``
values on real MNIST rows, in float64 and float32. Real digits have blank borders: windows of
zeros give pre-activations of exactly the bias, where both sides take ReLU's derivative as 0,
and max-pool windows of equal zeros, where both route to the first maximum (see
``tests/test_layers_verify.py``), so the exact ties of real data are decided the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close

from research.engine import optim
from research.engine.layers.activations import Activation
from research.engine.layers.conv import Conv2D
from research.engine.layers.dense import Dense
from research.engine.layers.dropout import Dropout
from research.engine.layers.norm import BatchNorm
from research.engine.layers.parse import build_network
from research.engine.layers.pooling import AvgPool2D, MaxPool2D
from research.engine.layers.residual import Residual
from research.engine.network import (
    Network,
    draw_masks,
    init_params,
    init_state,
    loss,
    loss_and_grads,
)
from research.verify.compare import tolerance
from research.verify.layer_check import check_network, reference_logits
from research.verify.layer_refs import reference_for

STEPS = 20
BATCH = 8
N_CLASSES = 5
L2 = 1e-3

OPTIMIZERS: dict[str, tuple[Callable[[], optim.Optimizer], Callable[[], Any]]] = {
    "sgd": (lambda: optim.sgd(0.1), lambda: optax.sgd(0.1)),
    "momentum": (
        lambda: optim.momentum(0.05, beta=0.8),
        lambda: optax.sgd(0.05, momentum=0.8),
    ),
}


def small_cnn() -> Network:
    """(1, 12, 12) → conv → batch norm → relu → max-pool → res(batchnorm tanh conv) → avg-pool
    → dropout → dense(5); momenta 0.8 and 0.7 (not the default), so a swapped one shows. The
    first conv's bias has no gradient (the batch norm behind it subtracts it again); the block's
    conv, behind its norm (a pre-activation block), trains its bias."""
    layers = (
        Conv2D(4, 3, 1, 1, "he"),  # (4, 12, 12)
        BatchNorm(0.8),
        Activation("relu"),
        MaxPool2D(2, 2),  # (4, 6, 6)
        Residual((BatchNorm(0.7), Activation("tanh"), Conv2D(4, 3, 1, 1, "he"))),
        AvgPool2D(2, 2),  # (4, 3, 3)
        Dropout(0.3),
        Dense(N_CLASSES, "he"),
    )
    return Network(layers, (1, 12, 12), "softmax", "cross_entropy", L2)


def data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """40 random images (1, 12, 12) with one-hot labels, and 20 batches of 8 in a fixed order."""
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((40, 1, 12, 12))
    y = np.eye(N_CLASSES)[rng.integers(0, N_CLASSES, size=40)]
    order = rng.permutation(40).reshape(-1, BATCH)
    return x, y, [order[step % len(order)] for step in range(STEPS)]


# --- the JAX side, from the definitions --------------------------------------------------------


def cross_entropy_with_l2(logits: Any, y: Any, params: Any, l2: float) -> Any:
    """Mean cross-entropy of softmax(logits) (B, k) against one-hot y, plus (l2/2)·Σ‖W‖² over
    the conv and dense weights (``W``; inside a block ``<index>.W``), not biases nor gamma/beta."""
    data_loss = -jnp.sum(y * jax.nn.log_softmax(logits, axis=1)) / logits.shape[0]
    weights = [v for p in params for key, v in p.items() if key.split(".")[-1] == "W"]
    return data_loss + 0.5 * l2 * sum(jnp.sum(w * w) for w in weights)


def objective(network: Network, params: Any, x: Any, y: Any, state: Any, masks: Any) -> Any:
    """The training objective of the references' logits (batch statistics, the masks)."""
    logits = reference_logits(network, params, x, training=True, state=state, masks=masks)
    return cross_entropy_with_l2(logits, y, params, network.l2)


def _entries(index: int, values: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{index}."
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}


def step_state(layer: Any, params: Any, state: Any, h: Any, mask: Any) -> tuple[Any, Any]:
    """The layer's reference output in training mode, and its state after this batch: a batch
    norm averages in its input's per-channel mean and unbiased variance; a residual block does
    so for the layers inside it (keys ``<index>.<key>``)."""
    if isinstance(layer, Residual):
        inner, new_state = h, {}
        for i, sub in enumerate(layer.layers):
            sub_mask = None if mask is None else mask[i]
            inner, sub_state = step_state(
                sub, _entries(i, params), _entries(i, state), inner, sub_mask
            )
            new_state |= {f"{i}.{key}": value for key, value in sub_state.items()}
        return h + inner, new_state
    new_state = state
    if isinstance(layer, BatchNorm):
        axes = (0, *range(2, h.ndim))
        n = h.size // h.shape[1]
        mean, unbiased = jnp.mean(h, axis=axes), jnp.var(h, axis=axes) * n / (n - 1)
        m = layer.momentum
        new_state = {
            "mean": m * state["mean"] + (1 - m) * mean,
            "var": m * state["var"] + (1 - m) * unbiased,
        }
    reference = reference_for(layer)
    assert reference is not None, type(layer).__name__
    return reference(layer, params, h, training=True, state=state, mask=mask), new_state


def next_running_statistics(network: Network, params: Any, state: Any, x: Any, masks: Any) -> Any:
    """Every layer's state after a training forward pass on x."""
    new_state, h = [], x
    for i, layer in enumerate(network.layers):
        h, layer_state = step_state(layer, params[i], state[i], h, masks[i])
        new_state.append(layer_state)
    return new_state


# --- 20 steps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_cnn_training_matches_jax_and_optax(optimizer: str) -> None:
    network = small_cnn()
    make_numpy, make_optax = OPTIMIZERS[optimizer]
    x, y, batches = data()
    init, state0 = init_params(network, seed=0), init_state(network)

    opt = make_numpy()
    params, state, opt_state = [dict(p) for p in init], [dict(s) for s in state0], opt.init(init)
    tx = make_optax()
    jparams = jax.tree_util.tree_map(jnp.asarray, init)
    jstate, jopt_state = jax.tree_util.tree_map(jnp.asarray, state0), tx.init(jparams)

    @jax.jit
    def jax_step(p: Any, s: Any, o: Any, xb: Any, yb: Any, masks: Any) -> Any:
        grads = jax.grad(objective, argnums=1)(network, p, xb, yb, s, masks)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), next_running_statistics(network, p, s, xb, masks), o

    rng = np.random.default_rng(7)
    first_loss = loss(network, init, x, y, state=state0)
    for step, rows in enumerate(batches, start=1):
        masks = draw_masks(network, rng, BATCH, np.float64)
        _, grads, state = loss_and_grads(
            network, params, x[rows], y[rows], state=state, masks=masks, training=True
        )
        params, opt_state = opt.update(params, grads, opt_state)
        jparams, jstate, jopt_state = jax_step(jparams, jstate, jopt_state, x[rows], y[rows], masks)
        assert_close(params, jparams, "trajectory", what=f"{optimizer} params after step {step}")
        assert_close(state, jstate, "trajectory", what=f"{optimizer} statistics after step {step}")

    # not vacuous: parameters and running statistics moved, and the loss went down
    moved = max(float(np.max(np.abs(p[k] - p0[k]))) for p, p0 in zip(params, init) for k in p)
    assert moved > 1e-2, f"parameters barely moved ({moved:.2e})"
    assert {k for s in state for k in s} == {"mean", "var", "0.mean", "0.var"}
    stats_moved = max(
        float(np.max(np.abs(s[k] - s0[k]))) for s, s0 in zip(state, state0) for k in s
    )
    assert stats_moved > 1e-2, f"running statistics barely moved ({stats_moved:.2e})"
    final_loss = loss(network, params, x, y, state=state)
    assert final_loss < first_loss

    # evaluation mode (running statistics, no dropout) gives the same loss on both sides
    logits = reference_logits(network, jparams, jnp.asarray(x), training=False, state=jstate)
    jax_loss = cross_entropy_with_l2(logits, jnp.asarray(y), jparams, network.l2)
    assert_close(final_loss, float(jax_loss), tolerance("loss", np.float64), "evaluation loss")


# --- the whole network on real MNIST ----------------------------------------------------------


SIMPLE_CNN = "conv(4,5) maxpool(2) dense(16)"
NORMED_CNN = (
    "conv(4,5,1,2) batchnorm maxpool(2) res(conv(4,3,1,1) batchnorm) avgpool(2) dropout(0.25) "
    "dense(16)"
)


# Batch norm's float32 statistics over a conv output (channels-last in memory, 12,544 values per
# channel here) are accumulated in float64: summed one value after another in float32, they were
# 3e-5 off, which put 2 of the first conv's 100 weight gradients outside the float32 tolerance.
@pytest.mark.parametrize(
    ("layers", "dtype"),
    [
        (SIMPLE_CNN, np.float64),
        (SIMPLE_CNN, np.float32),
        (NORMED_CNN, np.float64),
        (NORMED_CNN, np.float32),
    ],
)
def test_check_network_on_real_mnist(mnist, layers: str, dtype: type) -> None:
    """The loss and every gradient array of a conv net on 16 real training digits, in training
    mode (batch statistics, drawn dropout masks), at the table's tolerances for the dtype."""
    network = build_network(layers, n_classes=10, output="softmax", loss="cross_entropy", l2=1e-3)
    assert network.in_shape == (1, 28, 28)
    params = init_params(network, seed=0, dtype=dtype)
    rows = mnist.train[:16]
    x = rows.x.astype(dtype).reshape(16, 1, 28, 28)
    y = np.eye(10, dtype=dtype)[rows.labels]
    masks = draw_masks(network, np.random.default_rng(0), 16, dtype)
    checks = check_network(
        network, params, x, y, state=init_state(network, dtype), masks=masks, training=True
    )
    failures = [check.describe() for check in checks if not check.passed]
    assert not failures, f"{layers} ({np.dtype(dtype).name}):\n  " + "\n  ".join(failures)
    n_arrays = sum(len(p) for p in params)
    assert len(checks) == 1 + n_arrays  # the loss, then every parameter array
