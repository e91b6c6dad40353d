"""Workloads given as a ``layers`` value (w4, a small convolutional network): the network, its
matrix-product FLOPs, and the engine's and JAX's runs of it.

The engine trains it as ``train`` would train any ``layers`` network: each batch gathered from
the uint8 images and converted by the byte table (``research.data.pixel_values``),
``network.loss_and_grads`` (the handwritten backward pass through the layers) and plain SGD's
``update_in_place``. JAX runs :func:`research.bench.jax_programs.conv_net_runner`, the same
network and update from the same initial parameters.

:func:`epoch_seconds` times whole epochs of w4's network on the 50,000 training rows (engine,
float32), the figure docs/performance.md quotes (``python -m research.bench.w4_epoch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from research.engine.mlp import MLPSpec

if TYPE_CHECKING:
    from research.engine.network import Network

Run = Callable[[], None]
Batches = Callable[[], np.ndarray]  # (steps, batch_size) row indices, a fresh shuffle per call


class Workload(Protocol):
    """What this module reads of a :class:`research.bench.contenders.Workload`."""

    layers: str
    spec: MLPSpec
    init: str
    batch_size: int
    learning_rate: float


def network_of(workload: Workload) -> Network:
    """The network of a ``layers`` workload: its hidden layers, then the classes of
    ``workload.spec`` (sizes[-1]), with the spec's activation, output and loss and the
    workload's init, on (1, 28, 28) images."""
    from research.engine.layers.parse import build_network

    spec = workload.spec
    return build_network(
        workload.layers,
        n_classes=spec.sizes[-1],
        output=spec.output,
        loss=spec.loss,
        activation=spec.activation,
        init=workload.init,
    )


def layer_multiply_adds(network: Network) -> list[int]:
    """Per example, the multiply-adds of each layer's forward product, for the layers that have
    one (convolutions: F·C·k²·Ho·Wo; dense layers: n_in·units), first to last."""
    from math import prod

    from research.engine.layers.conv import Conv2D
    from research.engine.layers.dense import Dense

    counts = []
    for layer, shape, out in zip(network.layers, network.shapes, network.shapes[1:]):
        if isinstance(layer, Conv2D):
            counts.append(shape[0] * layer.kernel**2 * prod(out))
        elif isinstance(layer, Dense):
            counts.append(prod(shape) * layer.units)
    return counts


def matmul_flops(workload: Workload) -> float:
    """FLOPs of one step's products (run.py's convention: forward and weight gradient of every
    layer, input gradient of all but the first), 2 per multiply-add."""
    counts = layer_multiply_adds(network_of(workload))
    return 2.0 * workload.batch_size * (2 * sum(counts) + sum(counts[1:]))


def prepare_engine(
    workload: Workload, images: np.ndarray, targets: np.ndarray, dtype: Any, batches: Batches
) -> Run:
    """The engine's run: one SGD step per batch of ``batches()``, from ``init_params(network,
    0)``; ``images`` uint8 (N, 784), ``targets`` one-hot (N, k). Runs once before returning
    (a warm-up)."""
    from research.data import pixel_values
    from research.engine.network import init_params, loss_and_grads
    from research.engine.optim import sgd

    network = network_of(workload)
    params = init_params(network, 0, dtype)
    optimizer = sgd(workload.learning_rate)
    state = optimizer.init(params)
    table = pixel_values(False, dtype)
    targets = targets.astype(dtype)

    def run() -> None:
        for rows in batches():
            x = table[images[rows]]  # (B, 784) -> loss_and_grads reshapes to (B, 1, 28, 28)
            _, grads, _ = loss_and_grads(network, params, x, targets[rows])
            optimizer.update_in_place(params, grads, state)

    with np.errstate(over="ignore"):
        run()
    return run


def prepare_jax(
    workload: Workload, images: np.ndarray, targets: np.ndarray, batches: Batches
) -> Run:
    """JAX's run (:func:`~research.bench.jax_programs.conv_net_runner`) from the engine's
    initial parameters in float32; compiles and runs once before returning."""
    from research.bench.jax_programs import conv_net_runner
    from research.engine.layers.pooling import MaxPool2D
    from research.engine.network import init_params

    network = network_of(workload)
    (pool,) = {layer.kernel for layer in network.layers if isinstance(layer, MaxPool2D)}
    params = [p for p in init_params(network, 0, np.float32) if p]
    runner = conv_net_runner(
        workload.learning_rate, pool, network.in_shape, params, images, targets
    )

    def run() -> None:
        runner(batches())

    run()
    return run


def epoch_seconds(
    workload: Workload,
    epochs: int,
    source_dir: str | None,
    data_dir: str | None,
    rows: int = 50_000,
) -> list[float]:
    """Seconds of each of ``epochs`` engine epochs (float32) of the workload's network over the
    first ``rows`` MNIST training rows (the last partial batch dropped), after one untimed epoch
    (the warm-up of :func:`prepare_engine`)."""
    from research.data import load_mnist

    data = load_mnist(source_dir, data_dir)
    images = np.ascontiguousarray(data.train.images[:rows])
    targets = np.eye(10, dtype=np.float32)[data.train.labels[:rows]]
    rng = np.random.default_rng(0)
    steps = len(images) // workload.batch_size

    def batches() -> np.ndarray:
        order = rng.permutation(len(images))[: steps * workload.batch_size]
        return order.reshape(steps, workload.batch_size)

    run = prepare_engine(workload, images, targets, np.float32, batches)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds
