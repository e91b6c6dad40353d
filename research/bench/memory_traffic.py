"""The elementwise part of an engine step against the machine's memory bandwidth: the bytes its
stages read and write per step (a model of the engine as written), and a copy's measured speed.

GFLOP/s judge the matrix products against the GEMM peak; this judges the rest. Every stage is
counted at its least traffic given how the engine computes it: each array it reads once and each
array it writes once per stage (the optimizer runs block by block, :mod:`research.engine.blocks`,
so its many operations make one pass), with the bytes of each dtype (float32 values, bool masks,
uint8 images, the uint32 words dropout draws). The output layer's softmax and loss over (B, 10),
max-norm's per-column factors and its scaling of the few columns over the radius are left out (a
fraction of a percent). The time at bandwidth is those bytes over a copy's read-plus-write speed
for arrays of the workload's parameter size: a floor for the stages, not a prediction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: A :class:`research.bench.contenders.Workload` (not imported: contenders imports this module).
Workload = Any

#: Arrays read and written per parameter by each optimizer's in-place update (blocked): plain SGD
#: updates the weights inside their gradient's product (none); the others read p, g and their
#: state and write p and the state.
OPTIMIZER_ARRAYS = {"sgd": 0, "momentum": 5, "adam": 7}


def elementwise_bytes(workload: Workload, itemsize: int = 4) -> dict[str, float]:
    """Bytes per step of the engine's elementwise stages of an MLP ``workload`` (see the module
    docstring), by stage: ``input`` (gather the uint8 rows, convert them into the batch),
    ``activations`` (bias add, activation and derivative forward, the derivative product
    backward; counted as ReLU's passes, whatever the activation: w1's sigmoid layer is 30 units),
    ``bias_gradients``, ``optimizer``, ``dropout`` (drawing the masks and applying them),
    ``max_norm`` (the column norms); {} for a ``layers`` workload or an evaluation."""
    if workload.layers or workload.steps == 0:
        return {}
    spec, rows, s = workload.spec, workload.batch_size, itemsize
    hidden = list(spec.sizes[1:-1])
    hidden_units = rows * sum(hidden)
    weights = sum(a * b for a, b in zip(spec.sizes[:-2], spec.sizes[1:-1]))  # hidden layers'
    inputs = rows * spec.sizes[0]
    stages = {
        # bytes read and written, then converted into the batch
        "input": inputs * (1 + 1 + 1 + s),
        # forward: bias add (r, w), σ (relu: z > 0 as bool, then z·mask), backward: δ·σ'
        "activations": hidden_units * ((2 * s) + (s + 1) + (2 * s + 1) + (2 * s + 1)),
        "bias_gradients": rows * sum(spec.sizes[1:]) * s,
        "optimizer": spec.n_params * s * OPTIMIZER_ARRAYS.get(workload.optimizer, 5),
    }
    # drawing a mask: uint32 words written and compared into bools, made floats and scaled
    draw = 4 + 4 + 1 + (1 + s) + (2 * s)
    dropout = 0
    if workload.input_dropout:
        dropout += inputs * (draw + 3 * s)  # x·mask
    if workload.dropout:
        # mask·σ' (r, r, w) forward; z·that and δ·that (r, r, w) instead of z·σ' and δ·σ'
        dropout += hidden_units * (draw + (2 * s + 1) + 2 * (s - 1))
    if dropout:
        stages["dropout"] = dropout
    if workload.max_norm:
        # read W for the norms; the scaling touches only the columns over the radius (0-9 of
        # 1,024 per layer in w3's bench steps), left out as a whole pass would not be
        stages["max_norm"] = weights * s
    return {stage: float(value) for stage, value in stages.items()}


def copy_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes per second (read plus write) of a copy between two float32 arrays of ``nbytes``
    (at least 1 MiB): the median of ``repeats`` after one warm-up."""
    count = max(nbytes, 1 << 20) // 4
    source = np.ones(count, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return 2.0 * source.nbytes / statistics.median(times)


def traffic_results(
    workloads: tuple[Workload, ...],
    results: dict[str, Any],
    bandwidth: Callable[[int], float],
    engine: str,
) -> dict[str, Any]:
    """Per MLP workload the ``engine`` timed: its stages' bytes per step, the copy bandwidth
    ``bandwidth(nbytes)`` for arrays of its parameters' size (asked once per size), the time
    those bytes take at it, and the engine's median step."""
    measured: dict[int, float] = {}
    traffic = {}
    for workload in workloads:
        stages = elementwise_bytes(workload)
        row = results.get(workload.key, {}).get("contenders", {}).get(engine)
        if not stages or row is None:
            continue
        nbytes = workload.spec.n_params * 4
        if nbytes not in measured:
            measured[nbytes] = bandwidth(nbytes)
        per_step = row["seconds"]["median"] / (workload.steps if workload.unit == "epoch" else 1)
        total = sum(stages.values())
        traffic[workload.key] = {
            "bytes": stages,
            "total_bytes": total,
            "copy_bytes": float(max(nbytes, 1 << 20)),
            "bandwidth": measured[nbytes],
            "seconds_at_bandwidth": total / measured[nbytes],
            "engine_step_seconds": per_step,
        }
    return traffic


def describe(traffic: dict[str, Any], engine: str = "engine-f32") -> list[str]:
    """The table's lines on it (see :func:`traffic_results`)."""
    if not traffic:
        return []
    lines = [
        f"elementwise traffic per {engine} step (a model: research/bench/memory_traffic.py), "
        "against a copy of the parameters' size:"
    ]
    for key, row in traffic.items():
        stages = ", ".join(f"{name} {value / 1e6:.1f}" for name, value in row["bytes"].items())
        at = row["seconds_at_bandwidth"]
        lines.append(
            f"  {key}: {row['total_bytes'] / 1e6:.1f} MB ({stages}) = {1e3 * at:.2f} ms at "
            f"{row['bandwidth'] / 1e9:.1f} GB/s (copies of {row['copy_bytes'] / 2**20:.1f} MiB), "
            f"{100 * at / row['engine_step_seconds']:.0f}% of its "
            f"{1e3 * row['engine_step_seconds']:.2f} ms step"
        )
    return lines
