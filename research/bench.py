"""The side-by-side benchmark: the numpy engine against the origin, JAX and PyTorch.

``python -m research bench`` times every contender on every workload in interleaved rounds
(A B C A B C ...), so that a noisy, shared machine slows all of them alike, and reports medians,
min–max spreads and per-round ratios, the BLAS in use, the machine's measured matrix-product peak
and each contender's achieved GFLOP/s.

How contenders are kept from disturbing each other: each one runs in its own worker process, and
the parent drives them one at a time over a pipe, so exactly one contender computes at any moment.
In one shared process JAX measured 23–26 ms per step instead of 14 on workload 2, because
OpenBLAS's threads keep spin-waiting for ~0.1 s after every numpy matrix product and steal both
cores from XLA's threads; separate processes alone do not cure that (the spinning threads of the
contender that just finished still run), so the parent also leaves ``GAP_SECONDS`` of idle time
before every timed measurement, long enough for OpenBLAS's and XLA's threads to go to sleep.

FLOPs count matrix products only, 2·m·n·k each: per step, the forward product of every layer, the
weight gradient of every layer and the delta of every layer but the first (nothing needs ∂/∂x).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.blas_kernels import VARIABLE, loaded_kernels, numpy_openblas_pool
from research.mlp import MLPSpec, init_params

# Idle time before every timed run: OpenBLAS's threads spin for 2^28 cycles (~0.1 s) after their
# last task before sleeping; 0.3 s leaves a margin.
GAP_SECONDS = 0.3
ENGINE = "engine-f32"  # the contender every ratio is taken against
CONTENDERS = ("origin", "engine-f64", "engine-f32", "jax-f32", "torch-f32")
TRAIN_ROWS = 50_000


class BenchError(Exception):
    """A contender failed or the benchmark cannot run; the message says which and why."""


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


# --- contenders (each lives in its own worker process) -----------------------------------------


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
        from research.origin import origin_update_mini_batch

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
            # what asked for them: research.blas_kernels on AMD Zen 4, or the user
            "openblas_coretype": os.environ.get(VARIABLE, "(unset)"),
        }

    def prepare(self, workload: Workload, steps: int) -> None:
        from research.inplace import InPlaceTrainingStep
        from research.optim import sgd

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
        from research.train import evaluate, train_epoch

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

        from research.inplace import InPlaceTrainingStep
        from research.optim import sgd
        from research.train import train_epoch

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
        from research.reference import versions

        return versions()

    def prepare(self, workload: Workload, steps: int) -> None:
        from research.reference import sgd_epoch_runner

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


def _worker(connection: Any, name: str, mnist_dir: str | None, data_dir: str | None) -> None:
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


class _Workers:
    """One worker process per contender, driven one at a time."""

    def __init__(self, names: list[str], mnist_dir: str | None, data_dir: str | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: dict[str, Any] = {}
        self.processes: dict[str, Any] = {}
        for name in names:
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker, args=(child, name, mnist_dir, data_dir), daemon=True
            )
            process.start()
            self.connections[name], self.processes[name] = parent, process
        self.info = {name: self._answer(name) for name in names}

    def _answer(self, name: str) -> Any:
        try:
            status, answer = self.connections[name].recv()
        except EOFError:
            code = self.processes[name].exitcode
            raise BenchError(f"the {name} worker died (exit code {code})") from None
        if status == "error":
            raise BenchError(f"the {name} contender failed:\n{answer}")
        return answer

    def ask(self, name: str, *message: Any) -> Any:
        self.connections[name].send(message)
        return self._answer(name)

    def close(self) -> None:
        for connection in self.connections.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                connection.send(("stop",))
        for process in self.processes.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


# --- the run ------------------------------------------------------------------------------------


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_facts() -> dict[str, str]:
    """CPU model, core count, OS and Python (no host names: results get shared)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def run_benchmark(
    quick: bool = False,
    rounds: int | None = None,
    mnist_dir: str | None = None,
    data_dir: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every workload in interleaved rounds and returns the results (see ``format_table``).

    Args:
        quick: fewer steps per run and 2 rounds (under a minute; figures are rougher).
        rounds: rounds per workload (default 5, or 2 with ``quick``).
        mnist_dir, data_dir: where MNIST is (as for ``load_mnist``).
        say: receives one progress line at a time.
    """
    from research.data import load_mnist

    rounds = rounds or (2 if quick else 5)
    load_before = _load_average()
    load_mnist(mnist_dir, data_dir)  # prepares the cache once, before the workers read it
    names = [name for name in CONTENDERS if name != "torch-f32" or torch_available()]
    notes = []
    if "torch-f32" not in names:
        notes.append("PyTorch is not installed: skipped (pip install -e '.[bench]' adds it)")
        say(f"note: {notes[-1]}")
    say(f"starting {len(names)} worker processes ({', '.join(names)})...")
    started = time.perf_counter()
    workers = _Workers(names, mnist_dir, data_dir)
    try:
        size, repeats = (2048, 3) if quick else (4096, 5)
        say(f"measuring the {size}x{size} matrix-product peak...")
        peak = workers.ask(ENGINE, "peak", size, repeats)
        results: dict[str, Any] = {}
        for workload in WORKLOADS:
            steps = workload.quick_steps if quick else workload.steps
            contenders = [name for name in workload.contenders if name in names]
            for name in contenders:
                # the origin's per-sample loop is slow: a quick run times a few of its batches
                workers.ask(name, "prepare", workload.key, steps)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for round_number in range(rounds):
                say(f"{workload.key}: round {round_number + 1}/{rounds}")
                for name in contenders:
                    time.sleep(GAP_SECONDS)
                    times[name].append(workers.ask(name, "run"))
            results[workload.key] = _workload_result(workload, steps, times, peak)
        (memory_workload,) = [w for w in WORKLOADS if w.key == "w2-b256"]
        memory = workers.ask(ENGINE, "memory", memory_workload.key, 3)
        memory["workload"] = memory_workload.key
    finally:
        workers.close()
    return {
        "quick": quick,
        "rounds": rounds,
        "gap_seconds": GAP_SECONDS,
        "seconds": time.perf_counter() - started,
        "machine": machine_facts(),
        # other processes' demand on the cores while this ran (1-minute load averages)
        "load_average": {"start": load_before, "end": _load_average()},
        "libraries": {k: v for info in workers.info.values() for k, v in info.items()},
        "peak_gflops": peak,
        "workloads": results,
        "memory": memory,
        "notes": notes,
    }


def _workload_result(
    workload: Workload, steps: int, times: dict[str, list[float]], peak: dict[str, float]
) -> dict[str, Any]:
    """Per-unit times, GFLOP/s and per-round ratios against the engine in float32."""
    # A quick run times fewer steps than an epoch: scale to a whole one, and say so.
    scale = 1.0
    if workload.unit == "epoch":
        scale = workload.steps / steps
    elif workload.unit == "step":
        scale = 1.0 / steps
    flops = workload.matmul_flops(rows=10_000)
    contenders = {}
    for name, seconds in times.items():
        per_unit = [s * scale for s in seconds]
        ratios = [s / e for s, e in zip(seconds, times[ENGINE])]
        gflops = flops / statistics.median(per_unit) / 1e9
        contenders[name] = {
            "seconds": _summary(per_unit),
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["float32" if name != "engine-f64" else "float64"],
            "engine_speedup": _summary(ratios),
        }
    return {
        "title": workload.title,
        "unit": workload.unit,
        "steps_timed": steps,
        "scaled_to_unit": scale != 1.0 and workload.unit == "epoch",
        "matmul_gflop_per_unit": flops / 1e9,
        "contenders": contenders,
    }


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table, with the machine facts above it."""
    lines = []
    libraries = results["libraries"]
    facts = results["machine"]
    load = results["load_average"]
    lines.append(
        f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['os']}; load average "
        f"{load['start']:.2f} at the start, {load['end']:.2f} at the end"
    )
    lines.append(
        "libraries: "
        + ", ".join(f"{key} {value}" for key, value in libraries.items() if key != "jax_device")
    )
    peak = results["peak_gflops"]
    lines.append(
        f"matrix-product peak: float32 {peak['float32']:.0f} GFLOP/s, "
        f"float64 {peak['float64']:.0f} GFLOP/s"
    )
    lines.append(
        f"{results['rounds']} interleaved rounds, each contender in its own process, "
        f"{results['gap_seconds']} s idle before each timed run"
        + (" (--quick: fewer steps, rougher figures)" if results["quick"] else "")
    )
    header = (
        f"{'workload':<9} {'contender':<11} {'median':>16} {'min':>10} {'max':>10} "
        f"{'GFLOP/s':>8} {'% peak':>6}  engine-f32 speed-up: median (min-max)"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for key, workload in results["workloads"].items():
        for name, row in workload["contenders"].items():
            seconds, ratio = row["seconds"], row["engine_speedup"]
            speedup = (
                "-"
                if name == ENGINE
                else f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
            )
            median = f"{_time(seconds['median'])}/{workload['unit']}"
            lines.append(
                f"{key:<9} {name:<11} {median:>16} {_time(seconds['min']):>10} "
                f"{_time(seconds['max']):>10} {row['gflops']:>8.1f} "
                f"{100 * row['fraction_of_peak']:>5.0f}%  {speedup}"
            )
    memory = results["memory"]
    lines.append(
        f"peak memory ({memory['workload']}, engine-f32, tracemalloc): "
        f"{memory['peak_bytes'] / 2**20:.1f} MiB = "
        f"{memory['peak_bytes'] / memory['budget_bytes']:.2f}x the parameters + gradients + "
        f"one batch's activations ({memory['budget_bytes'] / 2**20:.1f} MiB)"
    )
    for workload_key, workload in results["workloads"].items():
        if workload["scaled_to_unit"]:
            lines.append(
                f"{workload_key}: timed {workload['steps_timed']} steps, scaled to an epoch"
            )
    lines.extend(f"note: {note}" for note in results["notes"])
    return "\n".join(lines)


def _time(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: ``<workload>/<contender>/<quantity>``, the peaks and memory."""
    metrics = {f"peak_gflops/{dtype}": value for dtype, value in results["peak_gflops"].items()}
    for key, workload in results["workloads"].items():
        for name, row in workload["contenders"].items():
            prefix = f"{key}/{name}"
            metrics[f"{prefix}/seconds_median"] = row["seconds"]["median"]
            metrics[f"{prefix}/seconds_min"] = row["seconds"]["min"]
            metrics[f"{prefix}/seconds_max"] = row["seconds"]["max"]
            metrics[f"{prefix}/gflops"] = row["gflops"]
            metrics[f"{prefix}/fraction_of_peak"] = row["fraction_of_peak"]
            if name != ENGINE:
                metrics[f"{prefix}/engine_speedup_median"] = row["engine_speedup"]["median"]
    metrics["load_average/start"] = results["load_average"]["start"]
    metrics["load_average/end"] = results["load_average"]["end"]
    memory = results["memory"]
    metrics["memory/peak_bytes"] = memory["peak_bytes"]
    metrics["memory/ratio_to_budget"] = memory["peak_bytes"] / memory["budget_bytes"]
    return metrics


def params_of(results: dict[str, Any], command: str) -> dict[str, str]:
    """Flat MLflow params: the machine, library versions and threads, the run's settings."""
    return {
        **results["machine"],
        **results["libraries"],
        "quick": str(results["quick"]),
        "rounds": str(results["rounds"]),
        "gap_seconds": str(results["gap_seconds"]),
        "command": command,
    }


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, sort_keys=True)
