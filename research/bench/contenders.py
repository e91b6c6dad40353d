"""What the benchmark runs: the workloads, and each contender (the origin, the engine, JAX,
PyTorch), which lives in a worker process of its own and answers the driver's messages
(:mod:`research.bench.run`). A worker holds the workloads it was asked to prepare until told to
release them, so that two workloads can be timed in the same rounds (``Workload.baseline``)."""

from __future__ import annotations

import functools
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.bench import conv_workload, memory_traffic
from research.engine.blas_kernels import VARIABLE, loaded_kernels, numpy_openblas_pool
from research.engine.mlp import MLPSpec, init_params

ENGINE = "engine-f32"  # the contender every ratio is taken against
CONTENDERS = ("origin", "engine-f64", "engine-f32", "jax-f32", "torch-f32")
TRAIN_ROWS = 50_000


@dataclass(frozen=True)
class Workload:
    """One thing to time.

    Attributes:
        key: short name used in tables, JSON and MLflow metric names.
        title: what it is, in words.
        spec: the network; init: its initialization scheme.
        batch_size, learning_rate: the optimizer's settings (every contender does the same update).
        steps, quick_steps: optimizer steps per timed run (full / ``--quick``); 0 for evaluation.
        unit: what the reported time is per (``epoch``, ``step`` or ``pass``).
        contenders: who runs it.
        optimizer: ``sgd`` (plain SGD) or ``momentum`` (Nesterov momentum with ``beta``).
        input_dropout, dropout: inverted dropout on the inputs and on every hidden layer (0: none).
        max_norm: the cap on the norm of every hidden unit's incoming weights (0: none).
        baseline: the key of a workload timed in the same rounds, which this one is compared
            with per round and per contender ("" for none).
        layers: a ``layers`` value (the hidden layers, as ``train --layers`` reads them), or ""
            for the MLP of ``spec``. When given, the network is those layers on (1, 28, 28)
            images, then ``spec.sizes[-1]`` classes with the spec's activation, output and loss
            (:mod:`research.bench.conv_workload`); the spec's other sizes are unused.
    """

    key: str
    title: str
    spec: MLPSpec
    init: str
    batch_size: int
    learning_rate: float
    steps: int
    quick_steps: int
    unit: str
    contenders: tuple[str, ...]
    optimizer: str = "sgd"
    beta: float = 0.0
    input_dropout: float = 0.0
    dropout: float = 0.0
    max_norm: float = 0.0
    baseline: str = ""
    layers: str = ""

    def matmul_flops(self, rows: int | None = None) -> float:
        """Matrix-product FLOPs of one unit (see the module docstring)."""
        if self.layers:
            return conv_workload.matmul_flops(self)
        pairs = list(zip(self.spec.sizes[:-1], self.spec.sizes[1:]))
        if self.steps == 0:  # evaluation: the forward products over all rows
            return 2.0 * (rows or 0) * sum(n_in * n_out for n_in, n_out in pairs)
        per_row = 2 * sum(n_in * n_out for n_in, n_out in pairs)  # forward + weight gradients
        per_row += sum(n_in * n_out for n_in, n_out in pairs[1:])  # deltas below layer 0
        steps = self.steps if self.unit == "epoch" else 1
        return 2.0 * self.batch_size * per_row * steps


ORIGIN_SPEC = MLPSpec((784, 30, 10), "sigmoid", "sigmoid", "mse")
LARGE_SPEC = MLPSpec((784, 1024, 1024, 10), "relu", "softmax", "cross_entropy")
DEEP_SPEC = MLPSpec((784, 1024, 1024, 1024, 10), "relu", "softmax", "cross_entropy")
# w4's head: 10 classes, relu after every conv and dense layer, softmax cross-entropy
CONV_HEAD = MLPSpec((784, 10), "relu", "softmax", "cross_entropy")
# The dropout paper's MNIST recipe (Srivastava et al., 2014): what w3 trains.
W3_SETTINGS = {"optimizer": "momentum", "beta": 0.95}
# Radius 1.5 (reproduce row 4's) binds in each of the 40 timed steps (0-9 columns of 1,024 per
# layer), so the projection's scaling is timed too; at 3.5 no unit reached it.
W3_REGULARIZATION = {"input_dropout": 0.2, "dropout": 0.5, "max_norm": 1.5}
WORKLOADS = (
    Workload(
        "w1-epoch",
        "origin network [784,30,10] sigmoid/mse, SGD 0.01, batch 256: one epoch of 50,000 rows "
        "(195 steps, last partial batch dropped as the origin does)",
        ORIGIN_SPEC, "normal", 256, 0.01, TRAIN_ROWS // 256, 20, "epoch", CONTENDERS,
    ),
    Workload(
        "w1-eval",
        "origin network: evaluation (forward, loss and accuracy) over the 10,000 validation rows",
        ORIGIN_SPEC, "normal", 10_000, 0.01, 0, 0, "pass", ("engine-f64", "engine-f32"),
    ),
    Workload(
        "w2-b256",
        "[784,1024,1024,10] relu/softmax cross-entropy, SGD 0.01, batch 256 (time per step)",
        LARGE_SPEC, "he", 256, 0.01, 40, 4, "step", CONTENDERS[1:],
    ),
    Workload(
        "w2-b1024",
        "[784,1024,1024,10] relu/softmax cross-entropy, SGD 0.01, batch 1024 (time per step)",
        LARGE_SPEC, "he", 1024, 0.01, 10, 2, "step", CONTENDERS[1:],
    ),
    Workload(
        "w3-b256",
        "[784,1024,1024,1024,10] relu/softmax cross-entropy, input dropout 0.2, hidden dropout "
        "0.5, max-norm 1.5, Nesterov momentum 0.95, lr 0.01, batch 256 (time per step)",
        DEEP_SPEC, "he", 256, 0.01, 40, 4, "step", ("engine-f32", "jax-f32", "torch-f32"),
        **W3_SETTINGS, **W3_REGULARIZATION, baseline="w3-plain",
    ),
    Workload(
        "w3-plain",
        "w3's network and optimizer without dropout and max-norm (time per step), timed in the "
        "same rounds as w3-b256",
        DEEP_SPEC, "he", 256, 0.01, 40, 4, "step", ("engine-f32", "jax-f32", "torch-f32"),
        **W3_SETTINGS,
    ),
    Workload(
        "w4-b64",
        "conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100) on 1x28x28 images, relu, "
        "softmax cross-entropy, He init, SGD 0.01, batch 64 (time per step)",
        CONV_HEAD, "he", 64, 0.01, 40, 4, "step", ("engine-f32", "jax-f32"),
        layers="conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100)",
    ),
)  # fmt: skip


class _Data:
    """The MNIST rows, loaded once per worker: the training rows as uint8 ``images`` (N, 784),
    what ``train`` trains from and the engine and JAX gather their batches from; float32 inputs
    ``x`` made from them only for the contenders that train on floats (the origin's port,
    PyTorch); the validation rows float32 (``x_val``, for ``w1-eval``); one-hot float32
    ``targets``."""

    def __init__(self, source_dir: str | None, data_dir: str | None) -> None:
        from research.data import load_mnist

        data = load_mnist(source_dir, data_dir)
        self.images = np.ascontiguousarray(data.train.images[:TRAIN_ROWS])
        self.labels = data.train.labels[:TRAIN_ROWS]
        self.x_val = np.ascontiguousarray(data.validation.x, dtype=np.float32)
        self.labels_val = data.validation.labels
        self.targets = np.eye(10, dtype=np.float32)[self.labels]

    @functools.cached_property
    def x(self) -> np.ndarray:
        """The training inputs (N, 784) float32 (k/255), made at the first use: the engine's and
        JAX's workers never hold them."""
        from research.data import to_inputs

        return to_inputs(self.images)


Run = Callable[[], None]


class _Contender:
    """Prepares a workload (untimed: conversions, compilation, a warm-up run) into a ``Run``:
    one timed run of it, which it holds until released."""

    def __init__(self, data: _Data) -> None:
        self.data = data
        self.rng = np.random.default_rng(0)

    def prepare(self, workload: Workload, steps: int) -> Run:
        raise NotImplementedError

    def info(self) -> dict[str, str]:
        return {}

    def batches(self, workload: Workload, steps: int) -> np.ndarray:
        """(steps, batch_size) row indices: an epoch's shuffle, cut into batches."""
        order = self.rng.permutation(len(self.data.images))
        return order[: steps * workload.batch_size].reshape(steps, workload.batch_size)


class _Origin(_Contender):
    """The per-sample port of the origin program (float64, as the origin)."""

    def prepare(self, workload: Workload, steps: int) -> Run:
        from research.verify.origin import origin_update_mini_batch

        state = {"params": init_params(workload.spec, 0, np.float64, workload.init)}
        x = self.data.x.astype(np.float64)
        y = self.data.targets.astype(np.float64)

        def run() -> None:
            for rows in self.batches(workload, steps):
                state["params"], _ = origin_update_mini_batch(
                    state["params"], x[rows], y[rows], workload.learning_rate
                )

        return run


class _Engine(_Contender):
    """The project's engine: ``train_epoch`` over an ``InPlaceTrainingStep``, as ``train`` runs
    on ``Split.images``: each batch gathered as uint8 and converted by the step."""

    def __init__(self, data: _Data, dtype: type) -> None:
        super().__init__(data)
        self.dtype = np.dtype(dtype)

    def info(self) -> dict[str, str]:
        from threadpoolctl import threadpool_info

        # numpy's own BLAS (SciPy may have loaded another OpenBLAS), else the first one found
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        pool = numpy_openblas_pool() or (blas[0] if blas else None)
        if pool is None:
            return {"numpy": np.__version__, "blas": "none found"}
        return {
            "numpy": np.__version__,
            "blas": f"{pool['internal_api']} {pool['version']} ({pool.get('architecture', '?')})",
            "blas_threads": str(pool["num_threads"]),
            "blas_kernels": loaded_kernels(),
            # what asked for them: `python -m research` on AMD Zen 4, or the user
            "openblas_coretype": os.environ.get(VARIABLE, "(unset)"),
        }

    def prepare(self, workload: Workload, steps: int) -> Run:
        """What ``train`` runs for this workload: ``train_epoch`` over the uint8 images and an
        ``InPlaceTrainingStep`` given ``pixel_values`` (with ``max_norm``), with fresh
        ``mlp.dropout_masks`` for every batch when the workload has dropout. ``w1-eval``
        evaluates the float32 validation inputs; a ``layers`` workload (w4) steps
        ``network.loss_and_grads`` (:func:`research.bench.conv_workload.prepare_engine`)."""
        from research.data import pixel_values
        from research.engine.inplace import InPlaceTrainingStep
        from research.engine.mlp import dropout_masks
        from research.engine.optim import momentum, sgd
        from research.experiment.training.train import evaluate, train_epoch

        if workload.layers:
            return conv_workload.prepare_engine(
                workload,
                self.data.images,
                self.data.targets,
                self.dtype,
                lambda: self.batches(workload, steps),
            )
        spec, dtype = workload.spec, self.dtype
        images = self.data.images
        targets = self.data.targets.astype(dtype)
        x_val = self.data.x_val.astype(dtype)
        params = init_params(spec, 0, dtype, workload.init)
        optimizer = (
            momentum(workload.learning_rate, beta=workload.beta, nesterov=True)
            if workload.optimizer == "momentum"
            else sgd(workload.learning_rate)
        )
        stepper = InPlaceTrainingStep(
            spec,
            params,
            optimizer,
            workload.batch_size,
            max_norm=workload.max_norm,
            pixel_values=pixel_values(False, dtype),
        )
        draw = None
        if workload.input_dropout or workload.dropout:
            mask_rng = np.random.default_rng(1)

            def draw(rows: int) -> Any:
                return dropout_masks(
                    mask_rng, rows, spec.sizes, workload.input_dropout, workload.dropout, dtype
                )

        def run() -> None:
            if steps == 0:
                evaluate(stepper.params, x_val, self.data.labels_val, spec)
                return
            order = self.rng.permutation(len(images))
            with np.errstate(over="ignore"):
                train_epoch(stepper, images, targets, order, steps, draw_masks=draw)

        run()
        return run

    def peak_gflops(self, size: int, repeats: int) -> dict[str, float]:
        """The best-of-``repeats`` GFLOP/s of a (size × size) @ (size × size) product."""
        peaks = {}
        for dtype in (np.float32, np.float64):
            a = self.rng.random((size, size)).astype(dtype)
            b = self.rng.random((size, size)).astype(dtype)
            out = np.empty_like(a)
            np.matmul(a, b, out=out)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                np.matmul(a, b, out=out)
                times.append(time.perf_counter() - started)
            peaks[np.dtype(dtype).name] = 2.0 * size**3 / statistics.median(times) / 1e9
        return peaks

    def peak_memory(self, workload: Workload, steps: int) -> dict[str, float]:
        """tracemalloc's peak while a fresh stepper is built and trained for ``steps`` steps.

        numpy reports its allocations to tracemalloc; the training data (uint8 images) and the
        starting parameters exist before tracing starts (the stepper's own copy of the
        parameters and its uint8 batch buffer are counted). OpenBLAS's
        internal work buffer, allocated once per process, is not seen.
        """
        import tracemalloc

        from research.data import pixel_values
        from research.engine.inplace import InPlaceTrainingStep
        from research.engine.optim import sgd
        from research.experiment.training.train import train_epoch

        images = self.data.images
        targets = self.data.targets.astype(self.dtype)
        params = init_params(workload.spec, 0, self.dtype, workload.init)
        table = pixel_values(False, self.dtype)
        order = self.rng.permutation(len(images))
        tracemalloc.start()
        try:
            stepper = InPlaceTrainingStep(
                workload.spec,
                params,
                sgd(workload.learning_rate),
                workload.batch_size,
                pixel_values=table,
            )
            train_epoch(stepper, images, targets, order, steps)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        item = self.dtype.itemsize
        n_params = workload.spec.n_params
        activations = workload.batch_size * sum(workload.spec.sizes) * item
        budget = 2 * n_params * item + activations  # params + grads (+ SGD's empty state)
        return {"peak_bytes": float(peak), "budget_bytes": float(budget)}


class _Jax(_Contender):
    """``jax.jit`` of a whole epoch: ``lax.scan`` over the batches, each gathered from the uint8
    images and converted inside the program, as the engine does (``research.bench.jax_programs``:
    ``sgd_epoch``, ``momentum_epoch``)."""

    def info(self) -> dict[str, str]:
        from research.verify.reference import versions

        return versions()

    def prepare(self, workload: Workload, steps: int) -> Run:
        from research.bench.jax_programs import (
            momentum_epoch,
            momentum_epoch_runner,
            sgd_epoch_runner,
        )

        if workload.layers:
            return conv_workload.prepare_jax(
                workload, self.data.images, self.data.targets, lambda: self.batches(workload, steps)
            )
        params = init_params(workload.spec, 0, np.float32, workload.init)
        images, targets = self.data.images, self.data.targets
        if workload.optimizer == "sgd":
            epoch = sgd_epoch_runner(workload.spec, workload.learning_rate, params, images, targets)
        else:
            program = momentum_epoch(
                workload.spec,
                workload.learning_rate,
                workload.beta,
                workload.input_dropout,
                workload.dropout,
                workload.max_norm,
            )
            epoch = momentum_epoch_runner(program, params, images, targets)

        def run() -> None:
            epoch(self.batches(workload, steps))

        run()  # compiles
        return run


class _Torch(_Contender):
    """PyTorch on the CPU: the same network, autograd, and the same update (plain SGD by hand;
    Nesterov momentum by ``torch.optim.SGD``, the same rule as optax's), with
    ``torch.nn.functional.dropout`` (inverted, as the engine's) and max-norm in torch. It
    gathers its batches from the float32 inputs (not from the uint8 images, as the engine and
    JAX do: the difference was not measured with PyTorch, which this machine lacks)."""

    def info(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}

    def prepare(self, workload: Workload, steps: int) -> Run:
        import torch

        x = torch.from_numpy(self.data.x)
        y = torch.from_numpy(self.data.targets)
        init = init_params(workload.spec, 0, np.float32, workload.init)
        params = [
            torch.from_numpy(layer[key].copy()).requires_grad_()
            for layer in init
            for key in ("W", "b")
        ]
        weights = params[0::2]
        rate = workload.learning_rate
        rates = [workload.input_dropout] + [workload.dropout] * (len(weights) - 1)
        optimizer = None
        if workload.optimizer == "momentum":
            optimizer = torch.optim.SGD(params, lr=rate, momentum=workload.beta, nesterov=True)
        tiny = float(np.finfo(np.float32).tiny)

        def loss(xb: Any, yb: Any) -> Any:
            spec, h = workload.spec, xb
            for i, (W, b) in enumerate(zip(weights, params[1::2])):
                if rates[i]:
                    h = torch.nn.functional.dropout(h, rates[i], training=True)
                h = torch.addmm(b, h, W)
                if i < len(weights) - 1:
                    h = torch.sigmoid(h) if spec.activation == "sigmoid" else torch.relu(h)
            if spec.loss == "cross_entropy":
                return -(yb * torch.log_softmax(h, dim=1)).sum() / len(xb)
            return 0.5 * ((torch.sigmoid(h) - yb) ** 2).sum() / len(xb)

        def run() -> None:
            for rows in torch.from_numpy(self.batches(workload, steps)):
                value = loss(x.index_select(0, rows), y.index_select(0, rows))
                if optimizer is None:
                    grads = torch.autograd.grad(value, params)
                    with torch.no_grad():
                        for p, g in zip(params, grads):
                            p.sub_(g, alpha=rate)
                else:
                    optimizer.zero_grad()
                    value.backward()
                    optimizer.step()
                if workload.max_norm:
                    with torch.no_grad():
                        for W in weights[:-1]:
                            norms = torch.linalg.vector_norm(W, dim=0).clamp_min_(tiny)
                            W.mul_(torch.clamp(workload.max_norm / norms, max=1.0))

        run()
        return run


def _make_contender(name: str, data: _Data) -> _Contender:
    if name == "origin":
        return _Origin(data)
    if name == "engine-f64":
        return _Engine(data, np.float64)
    if name == "engine-f32":
        return _Engine(data, np.float32)
    if name == "jax-f32":
        return _Jax(data)
    return _Torch(data)


def worker(connection: Any, name: str, source_dir: str | None, data_dir: str | None) -> None:
    """A contender's process: answers (command, *args) messages until told to stop."""
    try:
        contender = _make_contender(name, _Data(source_dir, data_dir))
        connection.send(("ok", contender.info()))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    workloads = {w.key: w for w in WORKLOADS}
    runs: dict[str, Run] = {}  # the prepared workloads
    while True:
        command, *args = connection.recv()
        if command == "stop":
            return
        try:
            answer: Any = None
            if command == "prepare":
                key, steps = args
                runs[key] = contender.prepare(workloads[key], steps)
            elif command == "release":
                runs.clear()
            elif command == "run":
                run = runs[args[0]]
                started = time.perf_counter()
                run()
                answer = time.perf_counter() - started
            elif command == "peak":
                answer = contender.peak_gflops(*args)
            elif command == "bandwidth":
                answer = memory_traffic.copy_bandwidth(*args)
            else:  # memory
                key, steps = args
                answer = contender.peak_memory(workloads[key], steps)
            connection.send(("ok", answer))
        except BaseException:
            connection.send(("error", traceback.format_exc()))
