"""The study's worker processes: what each needs (:class:`StudyRequest`), one worker's loop
over trials (:func:`work`), and the command's side (:func:`run_workers`): spawning K of them,
waiting, and forwarding Ctrl-C or SIGTERM so that no worker outlives the command.

With one worker the trials run in the command's own process, on the data it loaded already.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.liveness import close_ended_runs, recover_stale_trials
from research.experiment.studies.optuna_study import load_study
from research.experiment.studies.storage import StudyError
from research.experiment.studies.trials import TrialContext, optimize
from research.experiment.training.train import (
    Terminated,
    interruption,
    raise_pending_interrupt,
    stop_on_sigterm,
)


def print_line(message: str) -> None:
    print(message, flush=True)


def worker_label(index: int, workers: int) -> Callable[[str], None]:
    if workers <= 1:
        return print_line
    return lambda message: print(f"[worker {index}] {message}", flush=True)


def say_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def exit_code(error: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C: the shell's 128 + signal number."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


@dataclass(frozen=True)
class StudyRequest:
    """Everything a worker process needs to rebuild its context (picklable)."""

    config: StudyConfig
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    source_dir: str | None
    data_dir: str | None
    subset: int | None
    workers: int
    deadline_seconds: float | None
    quiet: bool


def load_splits(
    config: StudyConfig, source_dir: str | None, data_dir: str | None, subset: int | None
):
    """The study's dataset's splits and the (first ``subset`` rows of the) training split."""
    from research.data import DEFAULT_DATASET, load_named

    raw = bool(config.fixed.get("raw_inputs", False))
    data = load_named(config.fixed.get("dataset", DEFAULT_DATASET), source_dir, data_dir, raw=raw)
    x_train, labels_train = data.train.images, data.train.labels  # (uint8: floats per batch)
    if subset is not None:
        x_train, labels_train = x_train[:subset], labels_train[:subset]
    return data, x_train, labels_train


def blas_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def work(request: StudyRequest, index: int, started: float, splits: Any = None) -> None:
    """One worker: runs trials on the shared study until the budget is used. ``splits`` are
    the command's own (data, x_train, labels_train) when it is the single worker: one copy."""
    from threadpoolctl import threadpool_limits

    from research.experiment.tracking.study_runs import StudyTracker

    say = worker_label(index, request.workers)
    if request.quiet:
        base = say

        def say(message: str) -> None:
            if not re.match(r"trial \d+ epoch ", message):
                base(message)

    data, x_train, labels_train = splits or load_splits(
        request.config, request.source_dir, request.data_dir, request.subset
    )
    threads = blas_threads(request.workers)
    tracker = StudyTracker.attach(
        request.tracking_uri, request.experiment_id, request.parent_run_id
    )
    context = TrialContext(
        request.config,
        x_train,
        labels_train,
        data.validation.x,
        data.validation.labels,
        tracker,
        say,
        threads,
    )
    study = load_study(request.config, request.storage_url, worker=index)
    deadline = None if request.deadline_seconds is None else started + request.deadline_seconds
    with threadpool_limits(limits=threads):
        optimize(study, context, deadline)


def _worker_entry(request: StudyRequest, index: int, started_wall: float, parent: int) -> None:
    # A spawned process: convert the wall-clock start into this process's monotonic clock.
    started = time.monotonic() - (time.time() - started_wall)
    from research.data import DataError
    from research.engine.allocator import keep_freed_memory
    from research.experiment.tracking.stores import TrackingError

    keep_freed_memory()  # as python -m research does at its entry
    stop_on_sigterm()
    try:
        _die_with_parent(parent)
        work(request, index, started)
    except KeyboardInterrupt as error:
        # Exit quietly: a terminal's Ctrl-C reaches every worker, and the command forwards its
        # own too; the trial was given back already.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(exit_code(error))
    except (StudyError, TrackingError, DataError) as error:  # e.g. a full disk: one line
        say_error(f"[worker {index}] {error}")
        sys.exit(2)


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the study process ``parent`` dies, even by
    SIGKILL, so no worker goes on running trials for a command that is gone."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call took effect
        raise Terminated("terminated (the study process is gone)")


def run_workers(
    request: StudyRequest, study: Any, tracker: Any, splits: Any, say: Callable[[str], None]
) -> list[int]:
    """Runs the study's trials: in this process with one worker (on ``splits``, the command's
    data), else in ``request.workers`` spawned processes. Returns the exit codes of the workers
    that failed. On Ctrl-C or SIGTERM, forwards it to every worker, waits for them, closes
    what they left open and re-raises it."""
    import multiprocessing

    started_wall = time.time()
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_entry, args=(request, index, started_wall, os.getpid()))
        for index in range(request.workers if request.workers > 1 else 0)
    ]
    try:
        if not processes:
            work(request, 0, time.monotonic(), splits)
        for process in processes:
            process.start()
        while any(process.is_alive() for process in processes):
            time.sleep(0.2)
            raise_pending_interrupt()  # a signal a finalizer swallowed: act on it now
    except KeyboardInterrupt as error:
        started = _stop_workers(processes, error)
        with contextlib.suppress(Exception):
            if started:  # their trials, if a worker could not record its own (all are gone)
                recover_stale_trials(load_study(request.config, request.storage_url), tracker, say)
            close_ended_runs(study, tracker)
        raise
    for process in processes:
        process.join()
    return [p.exitcode for p in processes if p.exitcode not in (0, None)]


def _stop_workers(processes: list[Any], error: KeyboardInterrupt) -> list[Any]:
    """Ctrl-C in a terminal reaches every worker; a signal to this process alone must too.
    Returns the workers that had started (all gone now)."""
    forwarded = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
    started = [process for process in processes if process.pid is not None]
    for process in started:
        if process.is_alive():
            os.kill(process.pid, forwarded)
    for process in started:
        process.join(timeout=30)
        if process.is_alive():  # stuck: it must not outlive us
            process.kill()
            process.join(timeout=5)
    return started


def interrupted_message(error: KeyboardInterrupt) -> str:
    return (
        f"{interruption(error)}: the running trial is recorded as FAIL and queued again, its "
        "MLflow run as KILLED; run the same command again to continue the study"
    )
