"""The study command: data, stores, worker processes, the final fit and the summary.

One invocation opens (or creates) the MLflow experiment and parent run and the Optuna study once,
then runs trials in this process or in K spawned workers (:mod:`.trials` runs each trial), and at
the end retrains the best configuration on train+validation and evaluates it once on test.
Re-running the same command continues the same study. The Optuna study lives in the storage of
:mod:`.storage`.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.experiment.fields import TrainConfig
from research.experiment.storage import StudyError, default_storage_url
from research.experiment.study_config import StudyConfig
from research.experiment.tracking.stores import redact
from research.experiment.train import evaluate, train
from research.experiment.trials import (
    TrialContext,
    counted_trials,
    describe_pruner,
    format_value,
    load_study,
    make_pruner,
    optimize,
    recover_stale_trials,
    short,
)

# --- the study as a whole ----------------------------------------------------------------------


def best_trials_table(study: Any, config: StudyConfig, top: int = 5) -> str:
    """A plain-text table of the best completed trials."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    reverse = config.direction == "maximize"
    best = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    names = list(config.search_names)
    header = f"{'trial':>5}  {config.objective:>12}  {'seconds':>7}  " + "  ".join(
        f"{name:>13}" for name in names
    )
    lines = [header, "-" * len(header)]
    for trial in best:
        seconds = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else float("nan")
        )
        lines.append(
            f"{trial.number:>5}  {format_value(config, trial.value):>12}  {seconds:>7.1f}  "
            + "  ".join(f"{short(trial.params.get(name, '')):>13}" for name in names)
        )
    return "\n".join(lines)


def state_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def final_fit(
    study: Any,
    config: StudyConfig,
    x_train_full: np.ndarray,
    labels_train_full: np.ndarray,
    x_test: np.ndarray,
    labels_test: np.ndarray,
    say: Callable[[str], None],
) -> tuple[TrainConfig, float, Any]:
    """Retrains the best configuration on train+validation and evaluates it once on test."""
    best_config = config.train_config(study.best_trial.params)
    say(
        f"retraining the best configuration (trial {study.best_trial.number}) on "
        f"{len(x_train_full):,} train+validation rows, then one evaluation on the test split"
    )
    result = train(best_config, x_train_full, labels_train_full, None, None)
    _, test_accuracy = evaluate(result.params, x_test, labels_test, best_config.spec())
    return best_config, test_accuracy, result.params


def print_line(message: str) -> None:
    print(message, flush=True)


def worker_label(index: int, workers: int) -> Callable[[str], None]:
    if workers <= 1:
        return print_line
    return lambda message: print(f"[worker {index}] {message}", flush=True)


def say_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# --- orchestration: the study command ----------------------------------------------------------


@dataclass(frozen=True)
class StudyRequest:
    """Everything a worker process needs to rebuild its context (picklable)."""

    config: StudyConfig
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    mnist_dir: str | None
    data_dir: str | None
    subset: int | None
    workers: int
    deadline_seconds: float | None
    quiet: bool


def _load_splits(
    config: StudyConfig, mnist_dir: str | None, data_dir: str | None, subset: int | None
):
    """The MNIST splits and the (first ``subset`` rows of the) training split."""
    from research.data import load_mnist

    raw = bool(config.fixed.get("raw_inputs", False))
    data = load_mnist(mnist_dir, data_dir, raw=raw)
    x_train, labels_train = data.train.x, data.train.labels
    if subset is not None:
        x_train, labels_train = x_train[:subset], labels_train[:subset]
    return data, x_train, labels_train


def _blas_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _work(request: StudyRequest, index: int, started: float) -> None:
    """One worker: runs trials on the shared study until the budget is used."""
    from threadpoolctl import threadpool_limits

    from research.experiment.tracking.runs import StudyTracker

    say = worker_label(index, request.workers)
    if request.quiet:
        base = say

        def say(message: str) -> None:
            if not re.match(r"trial \d+ epoch ", message):
                base(message)

    data, x_train, labels_train = _load_splits(
        request.config, request.mnist_dir, request.data_dir, request.subset
    )
    threads = _blas_threads(request.workers)
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


def _worker_entry(request: StudyRequest, index: int, started_wall: float) -> None:
    # A spawned process: convert the wall-clock start into this process's monotonic clock.
    started = time.monotonic() - (time.time() - started_wall)
    from research.data import DataError
    from research.experiment.tracking.stores import TrackingError

    try:
        _work(request, index, started)
    except KeyboardInterrupt:
        sys.exit(130)
    except (StudyError, TrackingError, DataError) as error:  # e.g. a full disk: one line
        say_error(f"[worker {index}] {error}")
        sys.exit(2)


def run_study(
    config: StudyConfig,
    *,
    storage_url: str | None,
    tracking_uri: str | None,
    workers: int = 1,
    subset: int | None = None,
    mnist_dir: str | None = None,
    data_dir: str | None = None,
    quiet: bool = False,
    final: bool = True,
) -> int:
    """Runs (or continues) a study; returns the process exit code.

    Raises StudyError, StudyConfigError, DataError or TrackingError for user mistakes.
    """
    import multiprocessing

    from research.experiment.study_config import check_batch_size
    from research.experiment.tracking.runs import SEARCH_SPACE, StudyTracker
    from research.experiment.tracking.stores import resolve_tracking_uri
    from research.experiment.tracking.weights import save_weights

    say = print_line
    uri = resolve_tracking_uri(tracking_uri)
    storage_url = storage_url or default_storage_url(uri)
    if workers < 1:
        raise StudyError(f"--workers {workers} is not allowed; give an integer >= 1")
    # Data first: a missing MNIST folder or an impossible batch size stops us before anything.
    data, x_train, labels_train = _load_splits(config, mnist_dir, data_dir, subset)
    if subset is not None and not 1 <= subset <= len(data.train):
        raise StudyError(f"--subset {subset} must be between 1 and {len(data.train)}")
    check_batch_size(config, len(x_train))

    # The MLflow store, the experiment, the parent run and the Optuna study are all created here,
    # once, before any worker starts: concurrent schema creation is what crashes.
    tracker = StudyTracker.open(config.name, uri)
    study = load_study(config, storage_url)
    parent = tracker.parent
    existing = tracker.client.get_run(tracker.parent_run_id).data.params
    settings = {
        "objective": config.objective,
        "direction": config.direction,
        "sampler": config.sampler,
        "pruner": config.pruner,
        "pruner_settings": describe_pruner(make_pruner(config)),
        "sampler_seed": config.seed,
        "study_file": config.path.name,
        **{f"fixed.{name}": value for name, value in config.fixed.items()},
        **{
            f"search.{p.name}": (
                list(p.choices)
                if p.kind == "categorical"
                else f"{p.kind} [{p.low}, {p.high}]{' log' if p.log else ''}"
            )
            for p in config.search
        },
    }
    if not existing:
        parent.log_params(settings)
    else:
        # MLflow params are immutable: a resumed study keeps the first run's; say what differs.
        changed = {
            key: (existing[key], str(value))
            for key, value in settings.items()
            if key in existing and existing[key] != str(value)
        }
        if changed:
            say(
                "note: this run's settings differ from the study's first run (kept on its parent "
                "run): " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            )
    parent.set_tags({"optuna.storage": redact(storage_url), "n_trials": str(config.n_trials)})
    parent.log_artifact(config.path, "study")
    # The search space as data, for the report (the search.<name> params are for reading).
    parent.log_json(SEARCH_SPACE, [param.as_dict() for param in config.search])
    request = StudyRequest(
        config,
        storage_url,
        uri,
        tracker.experiment_id,
        tracker.parent_run_id,
        mnist_dir,
        data_dir,
        subset,
        workers,
        config.timeout,
        quiet,
    )

    recover_stale_trials(study, tracker, say)
    done = counted_trials(study)
    say(
        f"study {config.name!r}: {done}/{config.n_trials} trials done; optimizing "
        f"{config.objective} ({config.direction}) with {config.sampler} sampler, "
        f"{config.pruner} pruner, {workers} worker(s) x {_blas_threads(workers)} BLAS thread(s)"
    )
    say(f"Optuna storage: {redact(storage_url)}")
    say(f"MLflow: {redact(uri)}, experiment {config.name!r}, parent run {tracker.parent_run_id}")

    started_wall = time.time()
    status = "FINISHED"
    processes = []
    try:
        if workers == 1:
            _work(request, 0, time.monotonic())
        else:
            context = multiprocessing.get_context("spawn")
            processes = [
                context.Process(target=_worker_entry, args=(request, index, started_wall))
                for index in range(workers)
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            failed = [p.exitcode for p in processes if p.exitcode not in (0, None)]
            if failed:
                status = "FAILED"
                say_error(f"{len(failed)} worker(s) exited with codes {failed}")
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches every worker; a SIGINT to this process alone must too.
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=30)
        parent.finish("KILLED")
        say_error(
            "interrupted: the running trial is recorded as FAIL and its MLflow run as KILLED; "
            "run the same command again to continue the study"
        )
        return 130

    study = load_study(config, storage_url)
    counts = state_counts(study)
    elapsed = time.time() - started_wall
    say(
        f"\nstudy {config.name!r}: {counted_trials(study)}/{config.n_trials} trials counted "
        f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) after {elapsed:.0f} s"
    )
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        parent.finish("FAILED" if status == "FAILED" else "FINISHED")
        say_error("no trial completed, so there is no best configuration yet")
        return 1
    say(best_trials_table(study, config))
    best = study.best_trial
    say(f"best: trial {best.number}, {config.objective} {format_value(config, best.value)}")
    parent.log_metrics(
        {"best_value": best.value, "n_trials_complete": counts.get("COMPLETE", 0)},
        step=len(study.trials),
    )
    parent.set_tags(
        {
            "best_trial": str(best.number),
            **{f"best.{name}": str(value) for name, value in best.params.items()},
        }
    )
    if final:
        with tempfile.TemporaryDirectory() as folder:
            x_full = np.concatenate([x_train, data.validation.x])
            labels_full = np.concatenate([labels_train, data.validation.labels])
            best_config, test_accuracy, params = final_fit(
                study, config, x_full, labels_full, data.test.x, data.test.labels, say
            )
            say(f"test_accuracy of the retrained best configuration: {100 * test_accuracy:.2f}%")
            parent.log_metrics({"test_accuracy": test_accuracy}, step=len(study.trials))
            weights = Path(folder) / "best_weights.npz"
            save_weights(weights, params, best_config.spec())
            parent.log_artifact(weights)
        # which trial best_weights.npz and test_accuracy belong to: best_trial moves with every
        # invocation, --no-final ones included
        parent.set_tags({"refit_trial": str(best.number)})
    parent.finish(status)
    say(
        f"done in {time.time() - started_wall:.0f} s (best {config.objective} "
        f"{format_value(config, best.value)}); browse: python -m research ui"
        + ("" if tracking_uri is None else f" --tracking-uri {uri}")
        + f"   (experiment {config.name!r})"
    )
    return 0 if status == "FINISHED" else 1
