"""The study command: data, stores, worker processes, the final fit and the summary.

One invocation opens (or creates) the MLflow experiment and parent run and the Optuna study once,
then runs trials in this process or in K spawned workers (:mod:`.trials` runs each trial), and at
the end retrains the best configuration on train+validation and evaluates it once on test.
Re-running the same command continues the same study. The Optuna study lives in the storage of
:mod:`.storage`.
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

import numpy as np

from research.data import N_TRAIN
from research.experiment.config.fields import FIELDS, TrainConfig
from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.liveness import close_ended_runs, recover_stale_trials
from research.experiment.studies.storage import StudyError, check_storage, default_storage_url
from research.experiment.studies.trials import (
    TrialContext,
    check_search_space,
    counted_trials,
    describe_pruner,
    format_value,
    load_study,
    make_pruner,
    open_study,
    optimize,
    short,
    study_exists,
)
from research.experiment.tracking.stores import redact
from research.experiment.training.train import (
    DivergenceError,
    Terminated,
    evaluate,
    interruption,
    raise_pending_interrupt,
    stop_on_sigterm,
    train,
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
    """The study's dataset's splits and the (first ``subset`` rows of the) training split."""
    from research.data import DEFAULT_DATASET, load_named

    raw = bool(config.fixed.get("raw_inputs", False))
    data = load_named(config.fixed.get("dataset", DEFAULT_DATASET), mnist_dir, data_dir, raw=raw)
    x_train, labels_train = data.train.images, data.train.labels  # (uint8: floats per batch)
    if subset is not None:
        x_train, labels_train = x_train[:subset], labels_train[:subset]
    return data, x_train, labels_train


def _blas_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _work(request: StudyRequest, index: int, started: float, splits: Any = None) -> None:
    """One worker: runs trials on the shared study until the budget is used. ``splits`` are
    the command's own (data, x_train, labels_train) when it is the single worker: one copy."""
    from threadpoolctl import threadpool_limits

    from research.experiment.tracking.runs import StudyTracker

    say = worker_label(index, request.workers)
    if request.quiet:
        base = say

        def say(message: str) -> None:
            if not re.match(r"trial \d+ epoch ", message):
                base(message)

    data, x_train, labels_train = splits or _load_splits(
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


def _worker_entry(request: StudyRequest, index: int, started_wall: float, parent: int) -> None:
    # A spawned process: convert the wall-clock start into this process's monotonic clock.
    started = time.monotonic() - (time.time() - started_wall)
    from research.data import DataError
    from research.experiment.tracking.stores import TrackingError

    stop_on_sigterm()
    try:
        _die_with_parent(parent)
        _work(request, index, started)
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


def exit_code(error: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C: the shell's 128 + signal number."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"
#: How long a command that did not create the study waits for its creator to name the parent run.
PARENT_WAIT_SECONDS = 60.0
#: How long a command that named a parent run itself waits before reading back the name that stayed.
PARENT_SETTLE_SECONDS = 2.0


def choose_parent_run(study: Any, created: bool, tracker: Any) -> str:
    """The study's one MLflow parent run, chosen atomically through the Optuna storage.

    The command that created the study (exactly one: creation is atomic) makes the parent run
    and names it in a study attribute; every other command uses the run named there, waiting
    for it if the creator is still starting. A study made before this rule has no attribute:
    its earliest parent run is adopted. No clock is compared, and no run with trials is deleted.
    """
    if created:
        parents = tracker.study_parents()  # an empty one left by an older version is reused
        run_id = parents[0] if parents else tracker.create_parent()
        study.set_user_attr(ATTR_PARENT_RUN, run_id)
        study.set_user_attr(ATTR_EXPERIMENT, tracker.experiment_id)
        return run_id
    waited = time.monotonic()
    while True:
        run_id = study.user_attrs.get(ATTR_PARENT_RUN)
        if run_id:
            return run_id
        parents = tracker.study_parents()
        # A creator names the parent before any trial starts: trials mean no creator is coming.
        older = bool(study.get_trials(deepcopy=False))
        gave_up = time.monotonic() - waited > PARENT_WAIT_SECONDS
        if parents or older or gave_up:
            # An older study, or its creator died before naming a parent: adopt or make one.
            # Two commands may get here together: each names its run, waits, and reads back
            # which name stayed (the last written); the other's new run is deleted unused.
            made = not parents
            run_id = parents[0] if parents else tracker.create_parent()
            study.set_user_attr(ATTR_PARENT_RUN, run_id)
            study.set_user_attr(ATTR_EXPERIMENT, tracker.experiment_id)
            time.sleep(PARENT_SETTLE_SECONDS)
            named = study.user_attrs.get(ATTR_PARENT_RUN, run_id)
            if named != run_id and made:
                with contextlib.suppress(Exception):
                    tracker.client.delete_run(run_id)
            return named
        time.sleep(0.5)


def refuse_orphan_parent(config: StudyConfig, tracker: Any, storage_url: str) -> None:
    """A study absent from its storage while the experiment holds its trials (a new journal
    beside an old store, or another --storage) must not add a second trial-0000 to them."""
    for run_id in tracker.study_parents():
        tracker.parent_run_id = run_id
        trials = tracker.trial_runs()
        if trials and not study_exists(config.name, storage_url):  # (not made meanwhile)
            logged = tracker.client.get_run(run_id).data.tags.get("optuna.storage", "unknown")
            tracker.parent_run_id = ""
            raise StudyError(
                f"experiment {config.name!r} in {redact(tracker.tracking_uri)} already holds "
                f"study {config.name!r} (parent run {run_id}, {len(trials)} trial runs, Optuna "
                f"storage {logged}), but {redact(storage_url)} has no such study: pass the "
                "--storage it used to continue it, or use a new --study-name"
            )
    tracker.parent_run_id = ""


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
    from research.data import DataError
    from research.experiment.config.resources import check_study_memory, check_workers
    from research.experiment.config.study_config import check_batch_size
    from research.experiment.tracking.runs import SEARCH_SPACE, StudyTracker
    from research.experiment.tracking.stores import TrackingError, resolve_tracking_uri

    say = print_line
    uri = resolve_tracking_uri(tracking_uri)
    storage_url = storage_url or default_storage_url(uri)
    check_workers(workers)
    # Data first: a missing data folder, an impossible batch size or a network the memory
    # cannot hold (its largest trial, in every worker) stops us before anything is written.
    data, x_train, labels_train = _load_splits(config, mnist_dir, data_dir, subset)
    if subset is not None and not 1 <= subset <= len(data.train):
        raise StudyError(f"--subset {subset} must be between 1 and {len(data.train)}")
    check_batch_size(config, len(x_train))
    check_study_memory(config, len(x_train), workers)

    check_storage(storage_url, uri)

    # The MLflow store, the experiment, the parent run and the Optuna study are all created here,
    # once, before any worker starts: concurrent schema creation is what crashes.
    tracker = StudyTracker.open_experiment(config.name, uri)
    if not study_exists(config.name, storage_url):
        refuse_orphan_parent(config, tracker, storage_url)
    study, created = open_study(config, storage_url)
    check_search_space(study, config, storage_url)
    tracker.use_parent(choose_parent_run(study, created, tracker))
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
        **{f"fixed.{name}": FIELDS[name].text(value) for name, value in config.fixed.items()},
        **{
            f"search.{p.name}": (
                p.as_dict()["choices"]
                if p.kind == "categorical"
                else f"{p.kind} [{p.low}, {p.high}]{' log' if p.log else ''}"
            )
            for p in config.search
        },
    }
    if not existing:
        try:
            parent.log_params(settings)
        except TrackingError:
            # Commands joining a new study together may log its params at the same moment:
            # one wins (MLflow params are immutable); the others read what it logged.
            if not tracker.client.get_run(tracker.parent_run_id).data.params:
                raise
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

    try:
        return _run_and_finish(
            request, study, tracker, data, x_train, labels_train, final, tracking_uri, say
        )
    except KeyboardInterrupt as error:
        # Ctrl-C (or SIGTERM) during the refit or the summary: the trials are safe already.
        with contextlib.suppress(Exception):
            parent.finish("KILLED")
        say_error(f"{interruption(error)}: run the same command again to finish the study")
        return exit_code(error)
    except (StudyError, TrackingError, DataError):
        with contextlib.suppress(Exception):
            parent.finish("FAILED")
        raise


def _run_and_finish(
    request: StudyRequest,
    study: Any,
    tracker: Any,
    data: Any,
    x_train: np.ndarray,
    labels_train: np.ndarray,
    final: bool,
    tracking_uri: str | None,
    say: Callable[[str], None],
) -> int:
    """The trials (here or in worker processes), the summary and the refit; the exit code."""
    import multiprocessing

    from research.experiment.tracking.models import log_champion

    config, storage_url, workers = request.config, request.storage_url, request.workers
    uri = request.tracking_uri
    parent = tracker.parent
    started_wall = time.time()
    status = "FINISHED"
    processes = []
    try:
        if workers == 1:
            _work(request, 0, time.monotonic(), (data, x_train, labels_train))
        else:
            context = multiprocessing.get_context("spawn")
            processes = [
                context.Process(
                    target=_worker_entry, args=(request, index, started_wall, os.getpid())
                )
                for index in range(workers)
            ]
            for process in processes:
                process.start()
            while any(process.is_alive() for process in processes):
                time.sleep(0.2)
                raise_pending_interrupt()  # a signal a finalizer swallowed: act on it now
            for process in processes:
                process.join()
            failed = [p.exitcode for p in processes if p.exitcode not in (0, None)]
            if failed:
                status = "FAILED"
                say_error(f"{len(failed)} worker(s) exited with codes {failed}")
    except KeyboardInterrupt as error:
        # Ctrl-C in a terminal reaches every worker; a signal to this process alone must too.
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
        with contextlib.suppress(Exception):
            if started:  # their trials, if a worker could not record its own (all are gone)
                recover_stale_trials(load_study(config, storage_url), tracker, say)
            close_ended_runs(study, tracker)
            parent.finish("KILLED")
        say_error(
            f"{interruption(error)}: the running trial is recorded as FAIL and queued again, its "
            "MLflow run as KILLED; run the same command again to continue the study"
        )
        return exit_code(error)

    study = load_study(config, storage_url)
    # Trials a worker left RUNNING (killed: out of memory) and runs a heartbeat's sweep failed
    # while their worker was gone: every worker of this command has ended by now.
    if processes:
        recover_stale_trials(study, tracker, say)
    close_ended_runs(study, tracker)
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
        x_full = np.concatenate([x_train, data.validation.images])
        labels_full = np.concatenate([labels_train, data.validation.labels])
        try:
            best_config, test_accuracy, params = final_fit(
                study, config, x_full, labels_full, data.test.x, data.test.labels, say
            )
        except DivergenceError as error:
            reason = f"the refit of trial {best.number} on train+validation failed: {error}"
            parent.end("FAIL", "FAILED", reason, refit_trial=best.number)
            say_error(
                f"{reason}. The trials are kept; run the study with --no-final to skip the "
                "refit, or narrow the learning_rate range and continue it"
            )
            return 1
        say(f"test_accuracy of the retrained best configuration: {100 * test_accuracy:.2f}%")
        parent.log_metrics({"test_accuracy": test_accuracy}, step=len(study.trials))
        n_train = len(x_train)  # (a --subset's first rows, then all validation rows)
        rows = f"train[0:{n_train}]" + ("" if n_train == N_TRAIN else "+train[50000:60000]")
        rows = rows.replace(f"train[0:{N_TRAIN}]", "train[0:60000]")
        parent.log_data(
            best_config.dataset,
            {"training": (rows, len(x_full)), "test": ("test[0:10000]", len(data.test))},
        )
        parent.log_weights(params, best_config.spec(), "best_weights.npz")  # and its .txt
        tags = {"refit_trial": best.number, "test_accuracy": test_accuracy}
        champion = log_champion(
            parent, config.name, params, best_config, data.test.images, len(study.trials), tags
        )
        say(f"the refit best as an MLflow model: {champion}")
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
