"""What the benchmark runs: the workloads, and each contender (the origin, the engine, JAX,
PyTorch), which lives in a worker process of its own and answers the driver's messages
(:mod:`research.bench.run`)."""

from __future__ import annotations

import os
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

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
        batch_size, learning_rate: plain SGD's settings (every contender does the same update).
        steps, quick_steps: optimizer steps per timed run (full / ``--quick``); 0 for evaluation.
        unit: what the reported time is per (``epoch``, ``step`` or ``pass``).
        contenders: who runs it.
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

    def matmul_flops(self, rows: int | None = None) -> float:
        """Matrix-product FLOPs of one unit (see the module docstring)."""
        pairs = list(zip(self.spec.sizes[:-1], self.spec.sizes[1:]))
        if self.steps == 0:  # evaluation: the forward products over all rows
            return 2.0 * (rows or 0) * sum(n_in * n_out for n_in, n_out in pairs)
        per_row = 2 * sum(n_in * n_out for n_in, n_out in pairs)  # forward + weight gradients
        per_row += sum(n_in * n_out for n_in, n_out in pairs[1:])  # deltas below layer 0
        steps = self.steps if self.unit == "epoch" else 1
        return 2.0 * self.batch_size * per_row * steps


ORIGIN_SPEC = MLPSpec((784, 30, 10), "sigmoid", "sigmoid", "mse")
LARGE_SPEC = MLPSpec((784, 1024, 1024, 10), "relu", "softmax", "cross_entropy")
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
)  # fmt: skip


class _Data:
    """The MNIST training and validation rows, float32, loaded once per worker."""

    def __init__(self, mnist_dir: str | None, data_dir: str | None) -> None:
        from research.data import load_mnist

        data = load_mnist(mnist_dir, data_dir)
        self.x = np.ascontiguousarray(data.train.x[:TRAIN_ROWS], dtype=np.float32)
        self.labels = data.train.labels[:TRAIN_ROWS]
        self.x_val = np.ascontiguousarray(data.validation.x, dtype=np.float32)
        self.labels_val = data.validation.labels
        self.targets = np.eye(10, dtype=np.float32)[self.labels]


class _Contender:
    """Prepares a workload (untimed: conversions, compilation, a warm-up run), then runs it."""

    def __init__(self, data: _Data) -> None:
        self.data = data
        self.rng = np.random.default_rng(0)

    def prepare(self, workload: Workload, steps: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, str]:
        return {}

    def batches(self, workload: Workload, steps: int) -> np.ndarray:
        """(steps, batch_size) row indices: an epoch's shuffle, cut into batches."""
        order = self.rng.permutation(len(self.data.x))
        return order[: steps * workload.batch_size].reshape(steps, workload.batch_size)


class _Origin(_Contender):
    """The per-sample port of the origin program (float64, as the origin)."""

    def prepare(self, workload: Workload, steps: int) -> None:
        self.params = init_params(workload.spec, 0, np.float64, workload.init)
        self.x = self.data.x.astype(np.float64)
        self.y = self.data.targets.astype(np.float64)
        self.workload, self.steps = workload, steps

    def run(self) -> None:
        from research.verify.origin import origin_update_mini_batch

        for rows in self.batches(self.workload, self.steps):
            self.params, _ = origin_update_mini_batch(
                self.params, self.x[rows], self.y[rows], self.workload.learning_rate
            )


class _Engine(_Contender):
    """The project's engine: ``train_epoch`` over an ``InPlaceTrainingStep``, as ``train`` runs."""

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

    def prepare(self, workload: Workload, steps: int) -> None:
        from research.engine.inplace import InPlaceTrainingStep
        from research.engine.optim import sgd

        self.workload, self.steps = workload, steps
        self.x = self.data.x.astype(self.dtype)
        self.targets = self.data.targets.astype(self.dtype)
        self.x_val = self.data.x_val.astype(self.dtype)
        params = init_params(workload.spec, 0, self.dtype, workload.init)
        self.stepper = InPlaceTrainingStep(
            workload.spec, params, sgd(workload.learning_rate), workload.batch_size
        )
        self.run()

    def run(self) -> None:
        from research.experiment.train import evaluate, train_epoch

        if self.steps == 0:
            evaluate(self.stepper.params, self.x_val, self.data.labels_val, self.workload.spec)
            return
        order = self.rng.permutation(len(self.x))
        with np.errstate(over="ignore"):
            train_epoch(self.stepper, self.x, self.targets, order, self.steps)

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

        numpy reports its allocations to tracemalloc; the training data and the starting
        parameters exist before tracing starts (the stepper's own copy of the parameters is
        counted). OpenBLAS's internal work buffer, allocated once per process, is not seen.
        """
        import tracemalloc

        from research.engine.inplace import InPlaceTrainingStep
        from research.engine.optim import sgd
        from research.experiment.train import train_epoch

        x = self.data.x.astype(self.dtype)
        targets = self.data.targets.astype(self.dtype)
        params = init_params(workload.spec, 0, self.dtype, workload.init)
        order = self.rng.permutation(len(x))
        tracemalloc.start()
        try:
            stepper = InPlaceTrainingStep(
                workload.spec, params, sgd(workload.learning_rate), workload.batch_size
            )
            train_epoch(stepper, x, targets, order, steps)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        item = self.dtype.itemsize
        n_params = workload.spec.n_params
        activations = workload.batch_size * sum(workload.spec.sizes) * item
        budget = 2 * n_params * item + activations  # params + grads (+ SGD's empty state)
        return {"peak_bytes": float(peak), "budget_bytes": float(budget)}


class _Jax(_Contender):
    """``jax.jit`` of a whole epoch: ``lax.scan`` over the batches (``reference.sgd_epoch``)."""

    def info(self) -> dict[str, str]:
        from research.verify.reference import versions

        return versions()

    def prepare(self, workload: Workload, steps: int) -> None:
        from research.verify.reference import sgd_epoch_runner

        self.workload, self.steps = workload, steps
        params = init_params(workload.spec, 0, np.float32, workload.init)
        self.epoch = sgd_epoch_runner(
            workload.spec, workload.learning_rate, params, self.data.x, self.data.targets
        )
        self.run()  # compiles

    def run(self) -> None:
        self.epoch(self.batches(self.workload, self.steps))


class _Torch(_Contender):
    """PyTorch on the CPU: the same network, autograd, and the same SGD update."""

    def info(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}

    def prepare(self, workload: Workload, steps: int) -> None:
        import torch

        self.torch = torch
        self.workload, self.steps = workload, steps
        self.x = torch.from_numpy(self.data.x)
        self.y = torch.from_numpy(self.data.targets)
        params = init_params(workload.spec, 0, np.float32, workload.init)
        self.params = [
            torch.from_numpy(layer[key].copy()).requires_grad_()
            for layer in params
            for key in ("W", "b")
        ]
        self.run()

    def _loss(self, x, y):
        torch, spec = self.torch, self.workload.spec
        h = x
        layers = len(self.params) // 2
        for i in range(layers):
            h = torch.addmm(self.params[2 * i + 1], h, self.params[2 * i])
            if i < layers - 1:
                h = torch.sigmoid(h) if spec.activation == "sigmoid" else torch.relu(h)
        if spec.loss == "cross_entropy":
            return -(y * torch.log_softmax(h, dim=1)).sum() / len(x)
        return 0.5 * ((torch.sigmoid(h) - y) ** 2).sum() / len(x)

    def run(self) -> None:
        torch = self.torch
        rate = self.workload.learning_rate
        for rows in torch.from_numpy(self.batches(self.workload, self.steps)):
            loss = self._loss(self.x.index_select(0, rows), self.y.index_select(0, rows))
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                for p, g in zip(self.params, grads):
                    p.sub_(g, alpha=rate)


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


def worker(connection: Any, name: str, mnist_dir: str | None, data_dir: str | None) -> None:
    """A contender's process: answers (command, *args) messages until told to stop."""
    try:
        contender = _make_contender(name, _Data(mnist_dir, data_dir))
        connection.send(("ok", contender.info()))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    workloads = {w.key: w for w in WORKLOADS}
    while True:
        command, *args = connection.recv()
        if command == "stop":
            return
        try:
            if command == "prepare":
                key, steps = args
                contender.prepare(workloads[key], steps)
                answer: Any = None
            elif command == "run":
                started = time.perf_counter()
                contender.run()
                answer = time.perf_counter() - started
            elif command == "peak":
                answer = contender.peak_gflops(*args)
            else:  # memory
                key, steps = args
                answer = contender.peak_memory(workloads[key], steps)
            connection.send(("ok", answer))
        except BaseException:
            connection.send(("error", traceback.format_exc()))
