"""What a run needs from the machine, checked before any work: memory and worker processes.

Pure functions over configurations; the only things they read are how much memory is available
(:func:`available_memory`: ``/proc/meminfo``'s MemAvailable, lowered to a cgroup's limit) and
how many cores this process may use. A configuration that cannot fit raises
:class:`~.fields.ConfigError`: one line with the estimate, what is available
and what to change. The estimate (:func:`estimate_memory`) counts, per process: the interpreter
with its libraries, the dataset's splits (uint8 images), the training targets in the run's
dtype, three copies of the parameters (the stepper's, the last epoch's and the one being made),
the gradients, the optimizer's state, the float64 draws of initialization, one batch's
activations and deltas, and one evaluation chunk's activations. A network of ``layers`` is
estimated from its shapes the same way (:func:`estimate_network_memory`), with the unfolded
windows of its convolutions and poolings. It errs on the high side, as a MemoryError half-way
through a study costs more than a refusal that asks for a smaller network.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from research.data import N_CLASSES, N_PIXELS, N_TEST, N_TRAIN, N_VALIDATION, augment_factor
from research.engine.network import Network
from research.engine.stack_step import evaluation_chunk
from research.experiment.config.fields import FIELDS, ConfigError, TrainConfig, show
from research.experiment.config.layers_field import layer_params
from research.experiment.config.study_config import StudyConfig

#: Worker processes allowed per core: more than one per core only time-share it.
WORKERS_PER_CORE = 4
#: A Python process with numpy, MLflow and Optuna imported (measured: 170 MB RSS on Linux).
PROCESS_BYTES = 200 * 2**20
#: The splits each process loads (uint8 images and int64 labels), and the validation inputs
#: as float32 (evaluated every epoch; the training rows become floats one batch at a time).
DATA_BYTES = (N_TRAIN + N_VALIDATION + N_TEST) * (N_PIXELS + 8) + N_VALIDATION * N_PIXELS * 4
#: Rows :func:`research.experiment.training.train.evaluate` runs through the network at once.
EVALUATION_ROWS = min(10_000, N_VALIDATION)
#: Arrays of optimizer state per parameter array.
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}
_ITEMSIZE = {"float32": 4, "float64": 8}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> tuple[int, str] | None:
    """Bytes of memory a new allocation can get, and where that figure comes from; None if
    the system does not say. MemAvailable of ``/proc/meminfo`` (else free physical pages),
    lowered to what a cgroup (v2 or v1) memory limit leaves."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if pages > 0:
                found.append((pages, "free physical memory"))
        except (AttributeError, ValueError, OSError):
            pass
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1: "no limit" is huge
            found.append((max(0, limit - usage), f"the cgroup limit {cgroup / limit_file}"))
    return min(found) if found else None


def gigabytes(n_bytes: float) -> str:
    """``3.2 GB`` (decimal gigabytes, two significant digits below 10)."""
    value = n_bytes / 1e9
    return f"{value:.2g} GB" if value < 10 else f"{value:,.0f} GB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs to train one network, by part."""

    process: int  # the interpreter, its libraries and the dataset's splits
    data: int  # the training rows and targets in the run's dtype (beyond the splits)
    model: int  # parameters, gradients, optimizer state (or initialization's peak, if more)
    activations: int  # one training batch and one evaluation chunk

    @property
    def total(self) -> int:
        return self.process + self.data + self.model + self.activations

    def parts(self) -> str:
        """``model 17 GB, activations 0.1 GB, data and libraries 0.4 GB``."""
        return (
            f"model {gigabytes(self.model)}, activations {gigabytes(self.activations)}, "
            f"data and libraries {gigabytes(self.process + self.data)}"
        )


def estimate_memory(
    sizes: Iterable[int], batch_size: int, dtype: str, optimizer: str, n_train_rows: int
) -> MemoryEstimate:
    """The memory one process needs to train a network of layer ``sizes`` (784, ..., 10) on
    ``n_train_rows`` rows (see the module docstring for what is counted)."""
    sizes = tuple(sizes)
    itemsize = _ITEMSIZE[dtype]
    layers = list(itertools.pairwise(sizes))
    n_params = sum(n_in * n_out + n_out for n_in, n_out in layers)
    largest = max(n_in * n_out for n_in, n_out in layers)
    copies = 3 + 1 + OPTIMIZER_STATES[optimizer]  # params x3, gradients, state
    # initialization draws each weight matrix in float64 and scales it (two arrays at once)
    model = max(n_params * copies * itemsize, n_params * itemsize + 2 * 8 * largest)
    hidden = sum(sizes[1:-1])
    # the gathered batch and targets, each layer's output, each hidden layer's delta and
    # derivative; evaluation keeps every layer's pre-activation and activation of its chunk
    batch = batch_size * (sizes[0] + 2 * sizes[-1] + 3 * hidden) * itemsize
    evaluation = EVALUATION_ROWS * (sizes[0] + 2 * sum(sizes[1:]) + sizes[-1]) * itemsize
    # the one-hot targets; the uint8 images are used as loaded (DATA_BYTES)
    rows = n_train_rows * N_CLASSES * itemsize
    return MemoryEstimate(PROCESS_BYTES + DATA_BYTES, rows, model, batch + evaluation)


def estimate_network_memory(
    network: Network, batch_size: int, dtype: str, optimizer: str, n_train_rows: int
) -> MemoryEstimate:
    """The memory one process needs to train ``network`` (a network of layers) on
    ``n_train_rows`` rows: what :func:`estimate_memory` counts, with every layer's input and
    output per example in place of the MLP's widths, and the windows a convolution or pooling
    unfolds its input into (C·k² values per output position)."""
    itemsize = _ITEMSIZE[dtype]
    pairs = _pairs(network)
    counts = [layer_params(layer, shape) for layer, shape in pairs]
    n_params, largest = sum(counts), max(counts, default=0)
    copies = 3 + 1 + OPTIMIZER_STATES[optimizer]
    model = max(n_params * copies * itemsize, n_params * itemsize + 2 * 8 * largest)
    # every layer's input (inside residual blocks too), and the logits
    values = sum(prod(shape) for _, shape in pairs) + network.n_outputs
    windows = sum(_windows(layer, shape) for layer, shape in pairs)
    # each layer's output and cache, its delta and derivative; the windows and their gradient
    batch = batch_size * (2 * network.n_outputs + 4 * values + 2 * windows) * itemsize
    # evaluation runs in chunks sized to bound every layer's outputs (stack_step)
    chunk = min(EVALUATION_ROWS, evaluation_chunk(network, dtype))
    evaluation = chunk * (2 * values + windows) * itemsize
    rows = n_train_rows * N_CLASSES * itemsize
    return MemoryEstimate(PROCESS_BYTES + DATA_BYTES, rows, model, batch + evaluation)


def _pairs(network: Network) -> list[tuple[Any, tuple[int, ...]]]:
    """(layer, its input shape) of every layer, those inside a residual block too."""
    from research.engine.layers.base import out_shape

    pairs: list[tuple[Any, tuple[int, ...]]] = []
    for layer, shape in zip(network.layers, network.shapes):
        inner = getattr(layer, "layers", None)
        if isinstance(inner, tuple):
            for each in inner:
                pairs.append((each, shape))
                shape = out_shape(each, shape)
        else:
            pairs.append((layer, shape))
    return pairs


def _windows(layer: Any, in_shape: tuple[int, ...]) -> int:
    """The values a convolution or pooling of ``layer`` unfolds one example into: C·k² per
    output position (0 for other layers)."""
    from research.engine.layers.base import out_shape

    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, int) or len(in_shape) != 3:
        return 0
    out = out_shape(layer, in_shape)
    return in_shape[0] * kernel * kernel * prod(out[1:])


def network(sizes: tuple[int, ...]) -> str:
    """``784x256x10``; ``784x[32 layers of 4096]x10`` for a deep one."""
    hidden = sizes[1:-1]
    if len(hidden) > 2 and len(set(hidden)) == 1:
        return f"{sizes[0]}x[{len(hidden)} layers of {hidden[0]}]x{sizes[-1]}"
    return "x".join(map(str, sizes))


def _estimate(config: TrainConfig, n_train_rows: int) -> MemoryEstimate:
    n_train_rows *= augment_factor(config.augment)  # the expanded rows are held too
    layers = config.network()
    if layers is not None:
        return estimate_network_memory(
            layers, config.batch_size, config.dtype, config.optimizer, n_train_rows
        )
    return estimate_memory(
        config.spec().sizes, config.batch_size, config.dtype, config.optimizer, n_train_rows
    )


def _described(config: TrainConfig) -> str:
    """The network of ``config`` for a message: ``784x256x10``, or its ``layers`` value."""
    return f"layers {show(config.layers)}" if config.layers else network(config.spec().sizes)


def _smaller(config: TrainConfig) -> str:
    """What to make smaller in ``config``'s network."""
    if config.layers:
        return "fewer or narrower layers (filters, units)"
    return "smaller hidden_sizes" if config.hidden_sizes else _SMALLER


def _processes(workers: int) -> int:
    """Processes holding the data: the command's own, plus one per worker beyond the first."""
    return 1 if workers <= 1 else workers + 1


def _needed(estimate: MemoryEstimate, workers: int) -> int:
    """All processes together: each holds the data, every worker trains (the command's own
    process trains only when it is the single worker)."""
    return _processes(workers) * (estimate.process + estimate.data) + max(1, workers) * (
        estimate.model + estimate.activations
    )


def _refuse(
    estimate: MemoryEstimate,
    workers: int,
    what: str,
    smaller: str,
    available: tuple[int, str] | None,
    path: Any = None,
) -> None:
    """ConfigError if ``workers`` processes of ``estimate`` do not fit in ``available``
    (default :func:`available_memory`; nothing is checked if the system does not say).
    ``what`` names what is estimated, ``smaller`` how to make it smaller."""
    if available is None:
        available = available_memory()
        if available is None:
            return
    free, source = available
    needed = _needed(estimate, workers)
    if needed <= free:
        return
    processes = "" if workers <= 1 else f" x {workers} workers"
    fitting = [k for k in range(1, workers) if _needed(estimate, k) <= free]
    allowed = f"at most {gigabytes(free)}: {smaller}"
    if fitting:
        allowed = f"at most {gigabytes(free)}: --workers {fitting[-1]} or fewer, or {smaller}"
    raise ConfigError(
        None,
        f"{what} needs about {gigabytes(needed)} of memory ({estimate.parts()} per "
        f"process{processes}), but {gigabytes(free)} is available ({source})",
        allowed=allowed,
        path=path,
    )


def check_workers(workers: int, cores: int | None = None) -> None:
    """ConfigError unless ``workers`` is an integer from 1 to WORKERS_PER_CORE x the cores this
    process may use (``cores``, default :func:`usable_cores`). Memory is checked with the
    configuration: :func:`check_study_memory`."""
    cores = usable_cores() if cores is None else cores
    most = WORKERS_PER_CORE * cores
    allowed = f"an integer from 1 to {most}; {cores} (one per core) is usually fastest"
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(None, f"--workers {workers} is not allowed", allowed=allowed)
    if workers > most:
        raise ConfigError(
            None,
            f"--workers {workers} is too many: this process may use {cores} CPU core(s), "
            f"more than {WORKERS_PER_CORE} workers per core only share them, and each worker "
            f"loads the data again ({gigabytes(PROCESS_BYTES + DATA_BYTES)} with its libraries)",
            allowed=allowed,
        )


#: What to make smaller when the network is the shorthand (else: smaller hidden_sizes).
_SMALLER = "a smaller hidden_size, n_hidden_layers"


def check_memory(
    config: TrainConfig,
    n_train_rows: int,
    workers: int = 1,
    available: tuple[int, str] | None = None,
) -> None:
    """ConfigError if training ``config`` on ``n_train_rows`` rows, in ``workers`` processes at
    once, needs more memory than is available (``available``: bytes and where that figure comes
    from; default :func:`available_memory`; nothing is checked when that is None)."""
    what = (
        f"the network {_described(config)} ({config.dtype}, {config.optimizer}, batch_size "
        f"{config.batch_size})"
    )
    smaller = f"{_smaller(config)} or batch_size"
    _refuse(_estimate(config, n_train_rows), workers, what, smaller, available)


def _largest(config: StudyConfig, name: str) -> Any:
    """The largest value a study can give the numeric field ``name`` (fixed, or the high end or
    largest choice of its search)."""
    if name in config.fixed:
        return config.fixed[name]
    param = next(param for param in config.search if param.name == name)
    return max(param.choices) if param.kind == "categorical" else param.high


def worst_case(config: StudyConfig) -> TrainConfig:
    """The trial of study ``config`` that needs the most memory: the largest hidden_size,
    n_hidden_layers and batch_size its search can reach (or, when a searched layers or
    hidden_sizes defines the network, its choice that needs the most), the optimizer with the
    most state, other fields as in its first trial corner (every searched field at its first
    value)."""
    values = dict(config.fixed)
    for param in config.search:
        values[param.name] = param.corners()[0]
    values["batch_size"] = _largest(config, "batch_size")
    if "optimizer" not in config.fixed:
        choices = next(param for param in config.search if param.name == "optimizer").choices
        values["optimizer"] = max(choices, key=OPTIMIZER_STATES.__getitem__)
    # the field that defines the network, when searched: its choice that needs the most
    defining = next((n for n in ("layers", "hidden_sizes") if n in config.search_names), None)
    if defining is not None:

        def need(value: Any) -> int:
            return _estimate(TrainConfig(**{**values, defining: value}), N_TRAIN).total

        choices = next(param for param in config.search if param.name == defining).choices
        values[defining] = max(choices, key=need)
    elif not values.get("layers") and not values.get("hidden_sizes"):
        for name in ("hidden_size", "n_hidden_layers"):
            values[name] = _largest(config, name)
    return TrainConfig(**values)


def check_study_memory(
    config: StudyConfig,
    n_train_rows: int,
    workers: int,
    available: tuple[int, str] | None = None,
) -> None:
    """ConfigError naming the study file if the study's largest trial (:func:`worst_case`) on
    ``n_train_rows`` rows, in ``workers`` processes at once, needs more memory than is
    available (see :func:`check_memory`)."""
    worst = worst_case(config)
    searched = [
        f"{name} = {FIELDS[name].text(getattr(worst, name))}"
        for name in ("hidden_size", "n_hidden_layers", "hidden_sizes", "batch_size", "optimizer")
        if name in config.search_names
    ]
    if worst.layers:  # its layers as written in a study file, searched or fixed
        searched.insert(0, f"layers = {show(worst.layers)}")
    else:
        searched.append(f"a {network(worst.spec().sizes)} network")
    what = f"the study's largest trial ({', '.join(searched)}, {worst.dtype})"
    smaller = (
        f"{_smaller(worst)} or batch_size (in [fixed], or the high end or largest choice of its "
        "[search] table)"
    )
    _refuse(_estimate(worst, n_train_rows), workers, what, smaller, available, path=config.path)
