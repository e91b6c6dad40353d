"""The side-by-side benchmark: the numpy engine against the origin, JAX and PyTorch.

``python -m research bench`` times every contender on every workload in interleaved rounds
(A B C A B C ...), so that a noisy, shared machine slows all of them alike, and reports medians,
min–max spreads and per-round ratios, the BLAS in use, the machine's measured matrix-product peak
and each contender's achieved GFLOP/s.

How contenders are kept from disturbing each other: each one runs in its own worker process, and
the parent drives them one at a time over a pipe, so exactly one contender computes at any moment.
In one shared process JAX's steps were much slower, because OpenBLAS's threads keep spin-waiting
for a while after every numpy matrix product and steal both cores from XLA's threads; separate
processes alone do not cure that (the spinning threads of the contender that just finished still
run), so the parent also leaves ``GAP_SECONDS`` of idle time before every timed measurement, long
enough for OpenBLAS's and XLA's threads to go to sleep (docs/performance.md).

FLOPs count matrix products only, 2·m·n·k each: per step, the forward product of every layer, the
weight gradient of every layer and the delta of every layer but the first (nothing needs ∂/∂x);
a convolution's product is its im2col one (w4, :mod:`research.bench.conv_workload`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from research.bench.contenders import (
    CONTENDERS,
    ENGINE,
    TRAIN_ROWS,
    WORKLOADS,
    Workload,
    worker,
)
from research.bench.memory_traffic import describe, traffic_results

# Idle time before every timed run: OpenBLAS's threads spin for 2^28 cycles after their last task
# before sleeping; 0.3 s leaves a margin.
GAP_SECONDS = 0.3


class BenchError(Exception):
    """A contender failed or the benchmark cannot run; the message says which and why."""


class _Workers:
    """One worker process per contender, driven one at a time."""

    def __init__(self, names: list[str], source_dir: str | None, data_dir: str | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: dict[str, Any] = {}
        self.processes: dict[str, Any] = {}
        for name in names:
            parent, child = context.Pipe()
            process = context.Process(
                target=worker, args=(child, name, source_dir, data_dir), daemon=True
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
    source_dir: str | None = None,
    data_dir: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every workload in interleaved rounds and returns the results (see ``format_table``).

    Args:
        quick: fewer steps per run and 2 rounds (under a minute; figures are rougher).
        rounds: rounds per workload (default 5, or 2 with ``quick``).
        source_dir, data_dir: where MNIST is (as for ``load_mnist``).
        say: receives one progress line at a time.
    """
    from research.data import load_mnist

    rounds = rounds or (2 if quick else 5)
    load_before = _load_average()
    load_mnist(source_dir, data_dir)  # prepares the cache once, before the workers read it
    names = [name for name in CONTENDERS if name != "torch-f32" or torch_available()]
    notes = []
    if "torch-f32" not in names:
        notes.append("PyTorch is not installed: skipped (pip install -e '.[bench]' adds it)")
        say(f"note: {notes[-1]}")
    say(f"starting {len(names)} worker processes ({', '.join(names)})...")
    started = time.perf_counter()
    workers = _Workers(names, source_dir, data_dir)
    try:
        size, repeats = (2048, 3) if quick else (4096, 5)
        say(f"measuring the {size}x{size} matrix-product peak...")
        peak = workers.ask(ENGINE, "peak", size, repeats)
        results: dict[str, Any] = {}
        for group in timing_groups(WORKLOADS):
            times = _time_group(workers, group, names, quick, rounds, say)
            for workload in group:
                steps = workload.quick_steps if quick else workload.steps
                results[workload.key] = _workload_result(workload, steps, times[workload.key], peak)
                if workload.baseline:
                    _add_baseline_ratios(results[workload.key], times, workload)
            for name in {name for per_contender in times.values() for name in per_contender}:
                workers.ask(name, "release")
        say("measuring the copy bandwidth...")
        traffic = traffic_results(
            WORKLOADS, results, lambda nbytes: workers.ask(ENGINE, "bandwidth", nbytes), ENGINE
        )
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
        "memory_traffic": traffic,
        "notes": notes,
    }


def _time_group(
    workers: _Workers,
    group: list[Workload],
    names: list[str],
    quick: bool,
    rounds: int,
    say: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """Each contender's seconds per timed run, per workload of ``group``: a workload and its
    baseline are timed in the same rounds, one after the other (the workers keep them prepared
    until released)."""
    times: dict[str, dict[str, list[float]]] = {}
    for workload in group:
        steps = workload.quick_steps if quick else workload.steps
        contenders = [name for name in workload.contenders if name in names]
        for name in contenders:
            # the origin's per-sample loop is slow: a quick run times a few of its batches
            workers.ask(name, "prepare", workload.key, steps)
        times[workload.key] = {name: [] for name in contenders}
    keys = " and ".join(workload.key for workload in group)
    for round_number in range(rounds):
        say(f"{keys}: round {round_number + 1}/{rounds}")
        for workload in group:
            for name, seconds in times[workload.key].items():
                time.sleep(GAP_SECONDS)
                seconds.append(workers.ask(name, "run", workload.key))
    return times


def timing_groups(workloads: tuple[Workload, ...]) -> list[list[Workload]]:
    """The workloads in the order they are timed: each alone, but a workload with a baseline
    together with it (in the order they are listed), so that their per-round ratio compares
    runs made minutes apart at most."""
    groups: dict[str, list[Workload]] = {}
    for workload in workloads:
        groups.setdefault(workload.baseline or workload.key, []).append(workload)
    return list(groups.values())


def _add_baseline_ratios(
    result: dict[str, Any], times: dict[str, dict[str, list[float]]], workload: Workload
) -> None:
    """Per contender, the per-round ratio of this workload's time to its baseline's (both
    timed the same number of steps)."""
    result["baseline"] = workload.baseline
    for name, row in result["contenders"].items():
        baseline = times[workload.baseline].get(name)
        if baseline:
            ratios = [s / b for s, b in zip(times[workload.key][name], baseline)]
            row["baseline_ratio"] = _summary(ratios)


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
    result = {
        "title": workload.title,
        "unit": workload.unit,
        "steps_timed": steps,
        "scaled_to_unit": scale != 1.0 and workload.unit == "epoch",
        "matmul_gflop_per_unit": flops / 1e9,
        "contenders": contenders,
    }
    if workload.layers:  # a network given as layers: what its epochs take, from the step
        result["steps_per_epoch"] = TRAIN_ROWS // workload.batch_size
    return result


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
    lines.extend(_lines_under_the_table(results))
    return "\n".join(lines)


def _lines_under_the_table(results: dict[str, Any]) -> list[str]:
    """What follows the table: peak memory, baseline ratios, elementwise traffic, epochs, notes."""
    lines = []
    memory = results["memory"]
    lines.append(
        f"peak memory ({memory['workload']}, engine-f32, tracemalloc): "
        f"{memory['peak_bytes'] / 2**20:.1f} MiB = "
        f"{memory['peak_bytes'] / memory['budget_bytes']:.2f}x the parameters + gradients + "
        f"one batch's activations ({memory['budget_bytes'] / 2**20:.1f} MiB)"
    )
    for workload_key, workload in results["workloads"].items():
        if workload.get("baseline"):
            ratios = ", ".join(
                f"{name} {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
                for name, row in workload["contenders"].items()
                if (ratio := row.get("baseline_ratio"))
            )
            lines.append(
                f"{workload_key} / {workload['baseline']} per {workload['unit']}, median (min-max) "
                f"of the per-round ratios: {ratios}"
            )
    lines.extend(describe(results.get("memory_traffic", {})))
    for workload_key, workload in results["workloads"].items():
        if "steps_per_epoch" in workload:
            steps = workload["steps_per_epoch"]
            epochs = ", ".join(
                f"{name} {_time(row['seconds']['median'] * steps)}"
                for name, row in workload["contenders"].items()
            )
            lines.append(
                f"{workload_key}: an epoch of {TRAIN_ROWS:,} rows = {steps} steps, the median "
                f"step times {steps}: {epochs}"
            )
    for workload_key, workload in results["workloads"].items():
        if workload["scaled_to_unit"]:
            lines.append(
                f"{workload_key}: timed {workload['steps_timed']} steps, scaled to an epoch"
            )
    lines.extend(f"note: {note}" for note in results["notes"])
    return lines


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
            if "baseline_ratio" in row:
                metrics[f"{prefix}/baseline_ratio_median"] = row["baseline_ratio"]["median"]
    metrics["load_average/start"] = results["load_average"]["start"]
    metrics["load_average/end"] = results["load_average"]["end"]
    memory = results["memory"]
    metrics["memory/peak_bytes"] = memory["peak_bytes"]
    metrics["memory/ratio_to_budget"] = memory["peak_bytes"] / memory["budget_bytes"]
    for key, row in results.get("memory_traffic", {}).items():
        metrics[f"{key}/engine-f32/elementwise_bytes"] = row["total_bytes"]
        metrics[f"{key}/engine-f32/elementwise_seconds_at_bandwidth"] = row["seconds_at_bandwidth"]
        metrics[f"{key}/copy_bandwidth"] = row["bandwidth"]
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


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` beside ``path`` and renames it into place: never a half-written file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, sort_keys=True)


def bench_command(
    *,
    quick: bool,
    rounds: int | None,
    json_file: str | None,
    experiment: str | None,
    tracking_uri: str | None,
    source_dir: str | None,
    data_dir: str | None,
) -> int:
    """``python -m research bench``: runs the benchmark (progress on stderr), prints its table,
    writes its JSON if asked, and logs both to MLflow ``experiment`` (None: not logged).

    Raises:
        BenchError: a bad option, or a contender failed; DataError, TrackingError.
    """
    from research.experiment.tracking.runs import log_benchmark

    if rounds is not None and rounds < 1:
        raise BenchError(f"--rounds {rounds} is not allowed; give an integer >= 1")
    json_path = Path(json_file) if json_file else None
    if json_path is not None and not json_path.parent.is_dir():
        raise BenchError(f"--json {json_file}: the folder {json_path.parent} does not exist")
    try:
        results = run_benchmark(
            quick=quick,
            rounds=rounds,
            source_dir=source_dir,
            data_dir=data_dir,
            say=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        print("interrupted; nothing was logged", file=sys.stderr)
        return 130
    table = format_table(results)
    print(table)
    text = to_json(results)
    if json_path is not None:
        write_text(json_path, text)
        print(f"results written to {json_path}")
    if experiment is not None:
        command = "python -m research bench" + (" --quick" if quick else "")
        run = log_benchmark(
            params_of(results, command),
            metrics_of(results),
            {"bench_table.txt": table + "\n", "bench_results.json": text},
            experiment=experiment,
            tracking_uri=tracking_uri,
        )
        print(f"MLflow run {run.run_id} in experiment '{experiment}'")
        print(f"browse it: {run.ui_hint}")
    return 0
