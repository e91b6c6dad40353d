"""Optuna studies over the verified MLP: objective, sampler and pruner, workers, resuming.

Wires :mod:`research.train` (which knows nothing of Optuna or MLflow) to Optuna and to
:mod:`research.tracking` (the only module that talks to MLflow) through the ``on_epoch`` callback:
every epoch logs its metrics to the trial's MLflow run and reports the objective to Optuna, which
may prune the trial there and then.

Storage. By default the Optuna study lives in a journal file beside the MLflow store
(``mlruns/optuna.journal``): Optuna's ``JournalFileBackend`` is safe for several processes on one
machine and needs no schema, so K workers started at once cannot race on creating tables. It has
no heartbeat, so each trial records its worker (host and pid); when a study resumes, a RUNNING
trial whose worker on this host is gone is marked FAIL, its MLflow run closed as FAILED, and its
parameters queued again so the study still ends with the requested number of trials. A
``--storage`` URL of a database (``postgresql://...``, ``sqlite:///...``) uses Optuna's RDB storage
with heartbeats instead: that is how several machines share one study.

Budget. A study runs until it holds ``n_trials`` finished trials (COMPLETE, PRUNED, or FAIL for a
real failure such as divergence; trials that failed because their worker died do not count), or
until ``timeout`` seconds have passed since this invocation started (no new trial starts after).
Re-running the same command continues the same study. With K workers, each checks the budget
before it starts a trial, so the study may end with up to K − 1 trials more than asked.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.study_config import SearchParam, StudyConfig
from research.tracking import TAG_TRIAL, redact, sqlalchemy_url, store_lock
from research.train import DivergenceError, EpochMetrics, TrainConfig, evaluate, train

ATTR_WORKER = "research:worker"
ATTR_INTERRUPTED = "research:interrupted"
ATTR_RETRY_OF = "research:retry_of"
JOURNAL_NAME = "optuna.journal"


class StudyError(Exception):
    """A study cannot run as asked; the message says why and how to fix it."""


# --- storage -------------------------------------------------------------------------------------


def default_storage_url(tracking_uri: str) -> str:
    """A journal file beside a local SQLite MLflow store, else in ``./mlruns``."""
    from research.tracking import local_store_folder

    return str(local_store_folder(tracking_uri) / JOURNAL_NAME)


def open_storage(url: str):
    """An Optuna storage for ``url``: a database URL (RDB, with heartbeats) or a journal file."""
    import optuna

    if "://" in url:
        try:
            with store_lock(url), warnings.catch_warnings():  # (the callback is "experimental")
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    sqlalchemy_url(url),
                    heartbeat_interval=20,
                    grace_period=60,
                    # A trial whose worker stopped beating is failed and queued again (once).
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=1
                    ),
                )
        except Exception as error:
            text = str(error).strip().splitlines()
            raise StudyError(
                f"cannot open the Optuna storage {redact(url)}: {text[0] if text else error!r}; "
                "check --storage"
            ) from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open lock (O_CREAT|O_EXCL on a lock file) works on every local filesystem.
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    except OSError as error:
        raise StudyError(
            f"cannot open the Optuna journal {path}: {error.strerror}; pass --storage"
        ) from None
    return optuna.storages.JournalStorage(backend)


def make_sampler(config: StudyConfig, n_existing: int = 0, worker: int = 0):
    """The study's sampler, seeded from the file's seed, the trials the study already holds and
    the worker index: a resumed study or a second worker must not replay the same suggestions
    (a seeded sampler restarted from the same seed would), yet every run stays reproducible."""
    import optuna

    seed = int(np.random.SeedSequence([config.seed, n_existing, worker]).generate_state(1)[0])
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(config: StudyConfig):
    import optuna

    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.fixed["epochs"])
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    # Let a trial run two epochs before judging it, and judge only once 4 trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)


def _describe(pruner: Any) -> str:
    """``MedianPruner(n_startup_trials=4, n_warmup_steps=1)``-style text for the parent run."""
    keys = ("_n_startup_trials", "_n_warmup_steps", "_min_resource", "_max_resource")
    shown = [f"{k.lstrip('_')}={getattr(pruner, k)}" for k in keys if hasattr(pruner, k)]
    return f"{type(pruner).__name__}({', '.join(shown)})"


def load_study(config: StudyConfig, storage_url: str, worker: int = 0):
    """Creates the study, or loads it when it exists (same name, same storage)."""
    import optuna

    # Our own lines say what happens per trial and epoch, failures included; Optuna's would
    # repeat them (with a full traceback for every diverged trial).
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    try:
        study = optuna.create_study(
            storage=open_storage(storage_url),
            study_name=config.name,
            direction=config.direction,
            sampler=make_sampler(config),
            pruner=make_pruner(config),
            load_if_exists=True,
        )
    except StudyError:
        raise
    except ValueError as error:  # e.g. an existing study with the other direction
        raise StudyError(f"study {config.name!r} in {redact(storage_url)}: {error}") from None
    if study.direction.name.lower() != config.direction:
        raise StudyError(
            f"study {config.name!r} in {redact(storage_url)} exists with direction "
            f"{study.direction.name.lower()}, but the file asks to {config.direction} "
            f"{config.objective}; use another --study-name"
        )
    study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)), worker)
    return study


def suggest(trial: Any, param: SearchParam) -> Any:
    """One Optuna suggestion for a searched field, named as the field."""
    if param.kind == "int":
        return trial.suggest_int(
            param.name, param.low, param.high, step=param.step or 1, log=param.log
        )
    if param.kind == "float":
        return trial.suggest_float(
            param.name, param.low, param.high, step=param.step, log=param.log
        )
    return trial.suggest_categorical(param.name, list(param.choices))


# --- trial budget and stale trials -------------------------------------------------------------


def counted_trials(study: Any) -> int:
    """Finished trials that count toward n_trials: not those that were interrupted (Ctrl-C, a
    dead worker) and queued again, nor those Optuna's heartbeat retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    # Optuna's RetryFailedTrialCallback records trial *numbers*: the first failed trial as
    # "failed_trial", every failed attempt in "retry_history".
    retried: set[int] = set()
    for trial in trials:
        retried.update(trial.system_attrs.get("retry_history", ()))
        if trial.system_attrs.get("failed_trial") is not None:
            retried.add(trial.system_attrs["failed_trial"])
    return sum(
        1
        for trial in trials
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        and ATTR_INTERRUPTED not in trial.system_attrs
        and trial.number not in retried
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: Any, tracker: Any, say: Callable[[str], None]) -> int:
    """Marks FAIL the RUNNING trials whose worker process on this host is gone, closes their
    MLflow runs, and queues their parameters again. Returns how many were recovered."""
    import optuna
    from optuna.trial import TrialState

    # Database storage: Optuna fails (and retries) trials whose heartbeat stopped; do it now,
    # not only when a new trial starts, or a stale trial would hold the budget forever.
    if isinstance(study._storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(ATTR_WORKER, "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue  # another machine's, or still alive: the RDB heartbeat handles those
        reason = f"worker {worker} died while the trial was running"
        study._storage.set_trial_system_attr(trial._trial_id, ATTR_INTERRUPTED, reason)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        tracker.close_trial_run(trial.number, "FAIL", reason)
        study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
        say(f"trial {trial.number} was left RUNNING by a dead worker: marked FAIL, queued again")
        recovered += 1
    # Any trial that has ended in Optuna but whose MLflow run is still open (its worker died
    # before closing it) gets its run closed as FAILED.
    ended = {
        str(t.number): t.state.name
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED)
    }
    for run in tracker.trial_runs():
        number = run.data.tags.get(TAG_TRIAL)
        if run.info.status == "RUNNING" and number in ended:
            tracker.close_trial_run(int(number), ended[number], "its worker stopped")
    return recovered


# --- the objective -----------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What a worker needs to run trials: the study file's config, data, tracking, output."""

    config: StudyConfig
    x_train: np.ndarray
    labels_train: np.ndarray
    x_val: np.ndarray
    labels_val: np.ndarray
    tracker: Any
    say: Callable[[str], None]
    blas_threads: int


def objective_value(config: StudyConfig, metrics: EpochMetrics) -> float:
    return metrics.val_accuracy if config.objective == "val/accuracy" else metrics.val_loss


def run_trial(trial: Any, context: TrialContext) -> float:
    """Trains one suggested configuration, logging every epoch to MLflow and Optuna."""
    import optuna

    from research.blas_kernels import loaded_kernels
    from research.figures import save_loss_curves
    from research.tracking import TAG_ERROR, TAG_STATE, save_weights

    config = context.config
    trial.storage.set_trial_system_attr(
        trial._trial_id, ATTR_WORKER, f"{socket.gethostname()}:{os.getpid()}"
    )
    suggested = {param.name: suggest(trial, param) for param in config.search}
    train_config: TrainConfig = config.train_config(suggested)
    run = context.tracker.start_trial_run(config.name, trial.number, train_config.seed)
    run.log_params(
        {
            **train_config.as_params(),
            "sizes": list(train_config.spec().sizes),
            "n_train_rows": len(context.x_train),
            "blas_threads": context.blas_threads,
            "blas_kernels": loaded_kernels(),
        }
    )
    label = f"trial {trial.number}"
    shown = ", ".join(f"{name}={_short(value)}" for name, value in suggested.items())
    context.say(f"{label} started: {shown}")
    history: list[EpochMetrics] = []

    def on_epoch(metrics: EpochMetrics, params: Any) -> None:
        history.append(metrics)
        run.log_metrics(metrics.as_metrics(), step=metrics.epoch)
        value = objective_value(config, metrics)
        trial.report(value, metrics.epoch)
        context.say(
            f"{label} epoch {metrics.epoch + 1}/{train_config.epochs}: "
            f"{config.objective} {_format_value(config, value)} ({metrics.seconds:.1f} s)"
        )
        # Pruning after the last epoch would only throw away a finished model.
        if metrics.epoch < train_config.epochs - 1 and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch}")

    started = time.perf_counter()
    try:
        result = train(
            train_config,
            context.x_train,
            context.labels_train,
            context.x_val,
            context.labels_val,
            on_epoch=on_epoch,
        )
    except optuna.TrialPruned:
        _save_artifacts(trial, run, lambda: _log_curves(run, history, label, save_loss_curves))
        run.set_tags({TAG_STATE: "PRUNED"})
        run.finish("FINISHED")
        context.say(f"{label} PRUNED after {len(history)} epochs")
        raise
    except DivergenceError as error:
        where = {"diverged_epoch": error.epoch, "diverged_step": error.step}
        run.set_tags(
            {TAG_STATE: "FAIL", TAG_ERROR: str(error)}
            | {f"research.{key}": str(value) for key, value in where.items()}
        )
        run.finish("FAILED")
        trial.set_user_attr("error", str(error))
        for key, value in where.items():
            trial.set_user_attr(key, value)
        context.say(f"{label} FAIL: {error}")
        raise
    except BaseException as error:  # Ctrl-C, a crash: close the run, let Optuna record FAIL
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C)" if interrupted else repr(error)
        run.set_tags({TAG_STATE: "FAIL", TAG_ERROR: reason})
        run.finish("KILLED" if interrupted else "FAILED")
        if interrupted:
            _requeue(trial, reason)
        raise
    value = objective_value(config, result.history[-1])
    if not math.isfinite(value):
        run.set_tags({TAG_STATE: "FAIL", TAG_ERROR: f"objective is {value}"})
        run.finish("FAILED")
        raise DivergenceError(len(result.history) - 1, 0, f"objective is {value}")

    def save_curves_and_weights() -> None:
        _log_curves(run, history, label, save_loss_curves)
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / "weights.npz"
            save_weights(weights, result.params, train_config.spec())
            run.log_artifact(weights)

    _save_artifacts(trial, run, save_curves_and_weights)
    run.log_metrics({"wall_seconds": time.perf_counter() - started}, step=len(history) - 1)
    run.set_tags({TAG_STATE: "COMPLETE"})
    run.finish("FINISHED")
    context.say(f"{label} COMPLETE: {config.objective} {_format_value(config, value)}")
    return value


def _requeue(trial: Any, reason: str) -> None:
    """Not a result (Ctrl-C, a full disk): the trial will not count toward n_trials, and its
    parameters run again when the study resumes."""
    trial.storage.set_trial_system_attr(trial._trial_id, ATTR_INTERRUPTED, reason)
    trial.study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})


def _save_artifacts(trial: Any, run: Any, save: Callable[[], None]) -> None:
    """Runs ``save``; if the disk is full or the store unwritable, the trial is not reported
    COMPLETE with missing artifacts: its run is closed FAILED with the reason, the trial queued
    again, and TrackingError (naming the path) stops the study."""
    from research.tracking import TAG_ERROR, TAG_STATE, TrackingError

    try:
        save()
    except (OSError, TrackingError) as error:
        if isinstance(error, OSError):
            error = TrackingError(
                f"cannot write {error.filename or 'a temporary file'}: {error.strerror or error}; "
                "free some space (or lift the limit), then run the same command again"
            )
        run.set_tags({TAG_STATE: "FAIL", TAG_ERROR: str(error)})
        run.finish("FAILED")
        trial.set_user_attr("error", str(error))
        _requeue(trial, str(error))
        raise error from None


def _log_curves(run: Any, history: list[EpochMetrics], label: str, save: Callable) -> None:
    if not history:
        return
    with tempfile.TemporaryDirectory() as folder:
        run.log_artifact(save(history, Path(folder) / "loss_curves.png", title=label))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_value(config: StudyConfig, value: float) -> str:
    return f"{100 * value:.2f}%" if config.objective == "val/accuracy" else f"{value:.4f}"


# --- running trials in this process ------------------------------------------------------------


def optimize(
    study: Any,
    context: TrialContext,
    deadline: float | None,
) -> None:
    """Runs trials one at a time until the study holds n_trials or the deadline passes."""
    from optuna.trial import TrialState

    n_trials = context.config.n_trials
    while deadline is None or time.monotonic() < deadline:
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if counted_trials(study) + running >= n_trials:
            return
        study.optimize(
            lambda trial: run_trial(trial, context), n_trials=1, catch=(DivergenceError,)
        )
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            pick = max if context.config.direction == "maximize" else min
            best = pick(complete, key=lambda t: t.value)
            context.say(
                f"{counted_trials(study)}/{n_trials} trials done; best so far "
                f"{context.config.objective} {_format_value(context.config, best.value)} "
                f"(trial {best.number})"
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
            f"{trial.number:>5}  {_format_value(config, trial.value):>12}  {seconds:>7.1f}  "
            + "  ".join(f"{_short(trial.params.get(name, '')):>13}" for name in names)
        )
    return "\n".join(lines)


def state_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def save_study_figures(study: Any, folder: Path) -> list[Path]:
    """Optimization history, parameter importances and intermediate values as 150 dpi PNGs,
    through Optuna's matplotlib visualizations (figures that need more trials are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    paths = []
    figures = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
        "intermediate_values.png": optuna_plots.plot_intermediate_values,
    }
    for name, plot in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # e.g. "too few trials to compute importances": the figure says so itself.
            warnings.simplefilter("ignore", UserWarning)
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances need two completed trials with varied params
        figure = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        path = folder / name
        figure.savefig(path, dpi=150)
        plt.close(figure)
        paths.append(path)
    return paths


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

    from research.tracking import StudyTracker

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
    from research.tracking import TrackingError

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

    from research.study_config import check_batch_size
    from research.tracking import StudyTracker, resolve_tracking_uri, save_weights

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
        "pruner_settings": _describe(make_pruner(config)),
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
    say(f"best: trial {best.number}, {config.objective} {_format_value(config, best.value)}")
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
    with tempfile.TemporaryDirectory() as folder:
        for path in save_study_figures(study, Path(folder)):
            parent.log_artifact(path, "figures")
        if final:
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
            # which trial best_weights.npz and test_accuracy belong to: best_trial moves with
            # every invocation, --no-final ones included
            parent.set_tags({"refit_trial": str(best.number)})
    parent.finish(status)
    say(
        f"done in {time.time() - started_wall:.0f} s (best {config.objective} "
        f"{_format_value(config, best.value)}); browse: python -m research ui"
        + ("" if tracking_uri is None else f" --tracking-uri {uri}")
        + f"   (experiment {config.name!r})"
    )
    return 0 if status == "FINISHED" else 1
