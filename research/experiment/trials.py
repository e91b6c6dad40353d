"""The Optuna side of a study: the study object, its sampler and pruner, one trial, the budget.

Wires :mod:`research.experiment.train` (which knows nothing of Optuna or MLflow) to Optuna and to
tracking (the only code that talks to MLflow) through the ``on_epoch`` callback: every epoch logs
its metrics to the trial's MLflow run and reports the objective to Optuna, which may prune the
trial there and then.

Stale trials. The journal has no heartbeat, so each trial records its worker (host and pid); when
a study resumes, a RUNNING trial whose worker on this host is gone is marked FAIL, its MLflow run
closed as FAILED, and its parameters queued again so the study still ends with the requested
number of trials. Database storages have Optuna's heartbeats for that.

Budget. A study runs until it holds ``n_trials`` finished trials (COMPLETE, PRUNED, or FAIL for a
real failure such as divergence; trials that failed because their worker died do not count), or
until its deadline (no new trial starts after). With K workers, each checks the budget before it
starts a trial, so the study may end with up to K − 1 trials more than asked.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.experiment.search_space import SearchParam
from research.experiment.storage import StudyError, open_storage
from research.experiment.study_config import StudyConfig
from research.experiment.tracking.runs import TAG_TRIAL
from research.experiment.tracking.stores import redact
from research.experiment.train import DivergenceError, EpochMetrics, train

ATTR_WORKER = "research:worker"
ATTR_INTERRUPTED = "research:interrupted"
ATTR_RETRY_OF = "research:retry_of"


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


def describe_pruner(pruner: Any) -> str:
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

    config = context.config
    trial.storage.set_trial_system_attr(
        trial._trial_id, ATTR_WORKER, f"{socket.gethostname()}:{os.getpid()}"
    )
    suggested = {param.name: suggest(trial, param) for param in config.search}
    train_config = config.train_config(suggested)
    run = context.tracker.start_trial_run(config.name, trial.number)
    run.log_config(train_config, len(context.x_train), blas_threads=context.blas_threads)
    label = f"trial {trial.number}"
    shown = ", ".join(f"{name}={short(value)}" for name, value in suggested.items())
    context.say(f"{label} started: {shown}")
    history: list[EpochMetrics] = []

    def on_epoch(metrics: EpochMetrics, params: Any) -> None:
        history.append(metrics)
        run.log_epoch(metrics)
        value = objective_value(config, metrics)
        trial.report(value, metrics.epoch)
        context.say(
            f"{label} epoch {metrics.epoch + 1}/{train_config.epochs}: "
            f"{config.objective} {format_value(config, value)} ({metrics.seconds:.1f} s)"
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
        _save_outputs(trial, run, history, label)
        run.end("PRUNED", "FINISHED")
        context.say(f"{label} PRUNED after {len(history)} epochs")
        raise
    except DivergenceError as error:
        run.diverged(error)
        trial.set_user_attr("error", str(error))
        trial.set_user_attr("diverged_epoch", error.epoch)
        trial.set_user_attr("diverged_step", error.step)
        context.say(f"{label} FAIL: {error}")
        raise
    except BaseException as error:  # Ctrl-C, a crash: close the run, let Optuna record FAIL
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C)" if interrupted else repr(error)
        run.end("FAIL", "KILLED" if interrupted else "FAILED", reason)
        if interrupted:
            _requeue(trial, reason)
        raise
    value = objective_value(config, result.history[-1])
    if not math.isfinite(value):
        run.end("FAIL", "FAILED", f"objective is {value}")
        raise DivergenceError(len(result.history) - 1, 0, f"objective is {value}")
    _save_outputs(trial, run, history, label, result.params, train_config)
    run.log_metrics({"wall_seconds": time.perf_counter() - started}, step=len(history) - 1)
    run.end("COMPLETE", "FINISHED")
    context.say(f"{label} COMPLETE: {config.objective} {format_value(config, value)}")
    return value


def _requeue(trial: Any, reason: str) -> None:
    """Not a result (Ctrl-C, a full disk): the trial will not count toward n_trials, and its
    parameters run again when the study resumes."""
    trial.storage.set_trial_system_attr(trial._trial_id, ATTR_INTERRUPTED, reason)
    trial.study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})


def _save_outputs(
    trial: Any,
    run: Any,
    history: list[EpochMetrics],
    label: str,
    params: Any = None,
    train_config: Any = None,
) -> None:
    """The trial's curves (and weights); if the disk is full or the store unwritable, the trial
    is not reported COMPLETE with missing artifacts: its run is closed FAILED with the reason,
    the trial queued again, and TrackingError (naming the path) stops the study."""
    from research.experiment.tracking.stores import TrackingError

    spec = None if train_config is None else train_config.spec()
    try:
        run.save_outputs(history, label, params, spec)
    except TrackingError as error:
        run.end("FAIL", "FAILED", str(error))
        trial.set_user_attr("error", str(error))
        _requeue(trial, str(error))
        raise


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_value(config: StudyConfig, value: float) -> str:
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
                f"{context.config.objective} {format_value(context.config, best.value)} "
                f"(trial {best.number})"
            )
