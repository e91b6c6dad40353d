"""One trial of a study, asked, trained and told; the budget. (The study object, its sampler,
pruner and search space: :mod:`.optuna_study`.)

Wires :mod:`research.experiment.training.train` (which knows nothing of Optuna or MLflow) to
Optuna and to tracking (the only code that talks to MLflow) through the ``on_epoch`` callback:
every epoch logs its metrics to the trial's MLflow run and reports the objective to Optuna, which
may prune the trial there and then.

One trial is asked, trained and told by :func:`run_next_trial`, an ask/tell loop rather than
``study.optimize``: Optuna is told how the trial ended before its MLflow run is closed, a trial
that is not a result (Ctrl-C, SIGTERM, a full disk) is given back, and one failed by another
worker while this one was stopped is dropped. Stale trials and heartbeats: :mod:`.liveness`.

Each trial names its MLflow run in its user attributes (``mlflow_run_id``,
``mlflow_experiment_id``), and the study names its objective (``study.metric_names``): what
optuna-dashboard shows over the journal (docs/studies.md).

Budget. A study runs until it holds ``n_trials`` finished trials (COMPLETE, PRUNED, or FAIL for a
real failure such as divergence; trials that failed because their worker died do not count,
nor queued trials dropped because today's search space no longer holds them), or until its
deadline (no new trial starts after). With K workers, each checks the budget before it
starts a trial, so the study may end with up to K − 1 trials more than asked.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.liveness import (
    ATTR_INTERRUPTED,
    ATTR_RETRY_OF,
    ATTR_WORKER,
    fail_stale_trials,
    heartbeat,
    worker_identity,
)
from research.experiment.studies.optuna_compat import (
    HEARTBEAT_ASK_WARNING,
    queued_params,
    set_system_attr,
)
from research.experiment.studies.optuna_study import queued_misfit, suggest
from research.experiment.studies.storage import StudyError
from research.experiment.tracking.runs import RunEnd, run_lifecycle
from research.experiment.training.train import (
    DivergenceError,
    EpochMetrics,
    interruption,
    raise_pending_interrupt,
    signals_deferred,
    train,
)

#: A trial's user attributes naming its MLflow run (optuna-dashboard shows them with the trial).
ATTR_MLFLOW_RUN = "mlflow_run_id"
ATTR_MLFLOW_EXPERIMENT = "mlflow_experiment_id"
#: A trial's system attribute: why its queued parameters were dropped (:func:`run_next_trial`).
ATTR_DROPPED = "research:dropped"


# --- trial budget and stale trials -------------------------------------------------------------


def counted_trials(study: Any) -> int:
    """Finished trials that count toward n_trials: not those that were interrupted (Ctrl-C, a
    dead worker) and queued again, nor those Optuna's heartbeat retried, nor queued trials
    dropped because they no longer fit the search space."""
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
        and ATTR_DROPPED not in trial.system_attrs
        and trial.number not in retried
    )


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


def run_next_trial(study: Any, context: TrialContext) -> None:
    """Asks Optuna for the next trial, trains it, tells Optuna how it ended, then closes its
    MLflow run the same way. Optuna is told first: it is the record the budget counts, so a run
    is never closed COMPLETE for a trial the storage could not record. A queued trial whose
    parameters no longer fit the search space is dropped first (:func:`_ask_fitting`).

    Raises:
        KeyboardInterrupt (Ctrl-C, SIGTERM), StudyError (the Optuna storage cannot be written),
        TrackingError (the MLflow store cannot): the trial is recorded FAIL where possible and
        queued again; it does not count toward ``n_trials``.
    """
    fail_stale_trials(study)
    trial = _ask_fitting(study, context)
    with heartbeat(study, trial):
        _run_and_tell(study, trial, context)


def _ask(study: Any) -> Any:
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for study.optimize: :func:`heartbeat` beats
        # for this loop as study.optimize would.
        warnings.filterwarnings("ignore", HEARTBEAT_ASK_WARNING)
        return study.ask()


def _ask_fitting(study: Any, context: TrialContext) -> Any:
    """The next trial, past the queued ones whose parameters do not fit today's search space
    (a trial given back, then resumed with narrower ranges): Optuna would run those with their
    old values, only warning. Each is told FAIL, marked :data:`ATTR_DROPPED` so that it does
    not count toward ``n_trials``, and said in one line; it has no parameters and no run."""
    from optuna.trial import TrialState

    while True:
        trial = _ask(study)
        queued = queued_params(trial)
        why = None if queued is None else queued_misfit(queued, context.config.search)
        if why is None:
            return trial
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        source = "queued" if retry_of is None else f"queued again from trial {retry_of}"
        with signals_deferred():
            set_system_attr(trial, ATTR_DROPPED, why)
            trial.set_user_attr("error", f"dropped: {why}")
            study.tell(trial, state=TrialState.FAIL)
            context.say(f"trial {trial.number} ({source}) is dropped: {why}")


def _run_and_tell(study: Any, trial: Any, context: TrialContext) -> None:
    """One asked trial: its parameters and MLflow run, then (inside the run's lifecycle, which
    closes it whatever happens) its training and how it ended, told to Optuna first."""
    from optuna.trial import TrialState

    try:
        train_config, run = _start_trial(trial, context)
    except BaseException as error:
        with signals_deferred():
            if _not_a_result(error):
                _give_back(study, trial, None, _reason(error), killed=_killed(error))
            else:
                with contextlib.suppress(Exception):
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    with run_lifecycle(run):
        _train_and_tell(study, trial, context, train_config, run)


def _start_trial(trial: Any, context: TrialContext) -> tuple[Any, Any]:
    """Records this worker on the trial, draws its parameters and opens its MLflow run (last,
    so that no run is left open by a failure here): (its TrainConfig, its TrackedRun)."""
    set_system_attr(trial, ATTR_WORKER, worker_identity())
    suggested = {param.name: suggest(trial, param) for param in context.config.search}
    train_config = context.config.train_config(suggested)
    return train_config, context.tracker.start_trial_run(context.config.name, trial.number)


def _train_and_tell(
    study: Any, trial: Any, context: TrialContext, train_config: Any, run: Any
) -> None:
    """Trains the trial and records how it ended: in Optuna, then on its run (which
    :func:`run_lifecycle` closes if this does not)."""
    import optuna
    from optuna.trial import TrialState

    label = f"trial {trial.number}"
    history: list[EpochMetrics] = []
    try:
        value = _train_trial(trial, context, train_config, run, history)
    except optuna.TrialPruned:
        _tell_pruned(study, trial, context, run, history)
        return
    except DivergenceError as error:  # a result: FAIL, counted, and the study goes on
        where = {"error": str(error), "diverged_epoch": error.epoch, "diverged_step": error.step}
        with signals_deferred():
            if _tell(study, trial, TrialState.FAIL, run, context, user_attrs=where):
                run.diverged(error)
                context.say(f"{label} FAIL: {error}")
        return
    except optuna.exceptions.UpdateFinishedTrialError:
        # This worker was stopped (SIGSTOP, a hung disk) past its heartbeat: another worker
        # failed the trial and queued it again. Drop this attempt and go on with the next.
        _taken_over(trial, run, context)
        return
    except BaseException as error:
        with signals_deferred():
            if _not_a_result(error):  # Ctrl-C, SIGTERM, a full disk: queued again, not counted
                _give_back(study, trial, run, _reason(error), killed=_killed(error))
            else:  # a crash: FAIL in Optuna; its run ends FAIL with the reason
                with contextlib.suppress(Exception):
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    # Outside the try: a signal raised once this is recorded must not give the trial back.
    with signals_deferred():
        if _tell(study, trial, TrialState.COMPLETE, run, context, value):
            run.end(RunEnd.COMPLETE)
            shown = format_value(context.config, value)
            context.say(f"{label} COMPLETE: {context.config.objective} {shown}")


def _train_trial(
    trial: Any,
    context: TrialContext,
    train_config: Any,
    run: Any,
    history: list[EpochMetrics],
) -> float:
    """Trains the trial, logging and reporting every epoch (appended to ``history``), then saves
    its curves and weights; returns the objective's value. Raises TrialPruned,
    DivergenceError (also for a non-finite objective) or what training raised."""
    import optuna

    config = context.config
    label = f"trial {trial.number}"
    trial.set_user_attr(ATTR_MLFLOW_RUN, run.run_id)
    trial.set_user_attr(ATTR_MLFLOW_EXPERIMENT, run.experiment_id)
    run.log_config(train_config, len(context.x_train), blas_threads=context.blas_threads)
    shown = ", ".join(f"{name}={short(value)}" for name, value in trial.params.items())
    context.say(f"{label} started: {shown}")

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
    result = train(
        train_config,
        context.x_train,
        context.labels_train,
        context.x_val,
        context.labels_val,
        on_epoch=on_epoch,
    )
    value = objective_value(config, result.history[-1])
    if not math.isfinite(value):
        raise DivergenceError(len(result.history) - 1, 0, f"objective is {value}")
    # The curves and weights first: a trial whose artifacts cannot be written (a full
    # disk) is not reported COMPLETE; TrackingError gives it back.
    run.save_outputs(history, label, result.params, result.model, result.state)
    run.log_metrics({"wall_seconds": time.perf_counter() - started}, step=len(history) - 1)
    return value


def _tell_pruned(
    study: Any, trial: Any, context: TrialContext, run: Any, history: list[EpochMetrics]
) -> None:
    """A pruned trial: its curves saved, PRUNED told to Optuna, then its run ended PRUNED."""
    from optuna.trial import TrialState

    from research.experiment.tracking.stores import TrackingError

    try:
        run.save_outputs(history, f"trial {trial.number}")
    except (KeyboardInterrupt, TrackingError) as error:
        with signals_deferred():
            _give_back(study, trial, run, _reason(error), killed=_killed(error))
        raise
    with signals_deferred():  # (a signal here is raised once the trial is recorded)
        if _tell(study, trial, TrialState.PRUNED, run, context):
            run.end(RunEnd.PRUNED)
            context.say(f"trial {trial.number} PRUNED after {len(history)} epochs")


def _not_a_result(error: BaseException) -> bool:
    """Ctrl-C, SIGTERM or a store that cannot be written: the trial is queued again."""
    from research.experiment.tracking.stores import TrackingError

    return isinstance(error, KeyboardInterrupt | StudyError | TrackingError)


def _killed(error: BaseException) -> bool:
    return isinstance(error, KeyboardInterrupt)


def _reason(error: BaseException) -> str:
    return interruption(error) if _killed(error) else str(error)


def _tell(
    study: Any,
    trial: Any,
    state: Any,
    run: Any,
    context: TrialContext,
    value: float | None = None,
    user_attrs: dict[str, Any] | None = None,
) -> bool:
    """Records how the trial ended (with ``user_attrs``); False when another worker had already
    failed it (this one was stopped past its heartbeat), in which case its run is closed so."""
    import optuna

    try:
        for key, attr in (user_attrs or {}).items():
            trial.set_user_attr(key, attr)
        frozen = study.tell(trial, value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        frozen = None  # failed by another worker between our read and our write
    except StudyError as error:  # the journal cannot be written: the run must not say COMPLETE
        with contextlib.suppress(Exception):
            run.end(RunEnd.FAIL, str(error))
        raise
    if frozen is not None and frozen.state == state:
        return True
    _taken_over(trial, run, context)
    return False


def _taken_over(trial: Any, run: Any, context: TrialContext) -> None:
    reason = (
        f"trial {trial.number} was failed and queued again by another worker while this one was "
        "stopped past its heartbeat; this attempt's result is dropped"
    )
    if run is not None:
        with contextlib.suppress(Exception):
            run.end(RunEnd.FAIL, reason)
    context.say(reason)


def _give_back(study: Any, trial: Any, run: Any, reason: str, killed: bool = False) -> None:
    """Not a result (Ctrl-C, SIGTERM, a full disk): FAIL marked interrupted, the parameters
    queued again, the run closed (KILLED or FAILED). Best effort: the disk may be full."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        set_system_attr(trial, ATTR_INTERRUPTED, reason)
        if not killed:
            trial.set_user_attr("error", reason)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
    if run is not None:
        with contextlib.suppress(Exception):
            run.end(RunEnd.KILLED if killed else RunEnd.FAIL, reason)


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
        raise_pending_interrupt()
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if counted_trials(study) + running >= n_trials:
            return
        run_next_trial(study, context)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            pick = max if context.config.direction == "maximize" else min
            best = pick(complete, key=lambda t: t.value)
            context.say(
                f"{counted_trials(study)}/{n_trials} trials done; best so far "
                f"{context.config.objective} {format_value(context.config, best.value)} "
                f"(trial {best.number})"
            )
