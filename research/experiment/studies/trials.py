"""The Optuna side of a study: the study object, its sampler and pruner, one trial, the budget.

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
real failure such as divergence; trials that failed because their worker died do not count), or
until its deadline (no new trial starts after). With K workers, each checks the budget before it
starts a trial, so the study may end with up to K − 1 trials more than asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.experiment.config.search_space import SearchParam
from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.liveness import (
    ATTR_INTERRUPTED,
    ATTR_RETRY_OF,
    ATTR_WORKER,
    fail_stale_trials,
    heartbeat,
    worker_identity,
)
from research.experiment.studies.storage import StudyError, damaged_journal, open_storage
from research.experiment.tracking.stores import redact
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
    return open_study(config, storage_url, worker)[0]


def open_study(config: StudyConfig, storage_url: str, worker: int = 0) -> tuple[Any, bool]:
    """The study, and whether this call created it. Creation is atomic in every storage (a
    journal record, a database row with a unique name): of several commands started together,
    exactly one gets True, so it alone makes the study's MLflow parent run."""
    import optuna

    # Our own lines say what happens per trial and epoch, failures included; Optuna's would
    # repeat them (with a full traceback for every diverged trial).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(storage_url)
    created = True
    try:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=config.name,
                direction=config.direction,
                sampler=make_sampler(config),
                pruner=make_pruner(config),
            )
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            study = optuna.load_study(
                study_name=config.name,
                storage=storage,
                sampler=make_sampler(config),
                pruner=make_pruner(config),
            )
    except StudyError:
        raise
    except json.JSONDecodeError as error:  # read when the study's first record was appended
        raise damaged_journal(storage_url, error) from None
    except ValueError as error:  # e.g. an existing study with the other direction
        raise StudyError(f"study {config.name!r} in {redact(storage_url)}: {error}") from None
    if study.direction.name.lower() != config.direction:
        raise StudyError(
            f"study {config.name!r} in {redact(storage_url)} exists with direction "
            f"{study.direction.name.lower()}, but the file asks to {config.direction} "
            f"{config.objective}; use another --study-name"
        )
    study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)), worker)
    name_objective(study, config.objective)
    return study, created


def name_objective(study: Any, objective: str) -> None:
    """Names the study's objective (``val/accuracy``) where Optuna shows it (optuna-dashboard,
    ``trials_dataframe``) instead of "Objective 0"; a study that has the name is not written."""
    import optuna

    with warnings.catch_warnings():  # (metric names are "experimental" in Optuna)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != [objective]:
            study.set_metric_names([objective])


def study_exists(name: str, storage_url: str) -> bool:
    """Whether the storage holds a study of that name (without creating anything)."""
    import optuna

    return name in optuna.get_all_study_names(open_storage(storage_url))


def distribution(param: SearchParam):
    """The Optuna distribution :func:`suggest` draws ``param`` from."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if param.kind == "int":
        return IntDistribution(param.low, param.high, log=param.log, step=param.step or 1)
    if param.kind == "float":
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    return CategoricalDistribution(param.optuna_choices())


def describe_distribution(found: Any) -> str:
    """``int [16, 256] log``, ``categorical [16, 64, 256]``: a distribution in a message."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(found, CategoricalDistribution):
        return f"categorical {list(found.choices)}"
    kind = "int" if type(found).__name__.startswith("Int") else "float"
    return f"{kind} [{found.low}, {found.high}]" + (" log" if found.log else "")


def check_search_space(study: Any, config: StudyConfig, storage_url: str) -> None:
    """Refuses, before any trial starts, a search space that Optuna cannot mix with the study's
    earlier trials (a field searched as an integer, now as categorical, or other choices).
    Without this, each attempt adds a FAIL trial with no parameters and uses up the budget."""
    from optuna.distributions import check_distribution_compatibility

    wanted = {param.name: distribution(param) for param in config.search}
    for trial in study.get_trials(deepcopy=False):
        for name, earlier in trial.distributions.items():
            if name not in wanted:
                continue  # no longer searched: the file fixes it now, which Optuna allows
            try:
                check_distribution_compatibility(earlier, wanted[name])
            except ValueError:
                raise StudyError(
                    f"{config.path.name}: [search] {name} is {describe_distribution(wanted[name])}"
                    f", but study {config.name!r} in {redact(storage_url)} searched it as "
                    f"{describe_distribution(earlier)} (trial {trial.number}); Optuna cannot mix "
                    "the two in one study: give this search space a new --study-name, or change "
                    f"{name} back"
                ) from None


def suggest(trial: Any, param: SearchParam) -> Any:
    """One Optuna suggestion for a searched field, named as the field (a list as its text:
    :meth:`StudyConfig.train_config` reads it back)."""
    if param.kind == "int":
        return trial.suggest_int(
            param.name, param.low, param.high, step=param.step or 1, log=param.log
        )
    if param.kind == "float":
        return trial.suggest_float(
            param.name, param.low, param.high, step=param.step, log=param.log
        )
    return trial.suggest_categorical(param.name, param.optuna_choices())


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
    is never closed COMPLETE for a trial the storage could not record.

    Raises:
        KeyboardInterrupt (Ctrl-C, SIGTERM), StudyError (the Optuna storage cannot be written),
        TrackingError (the MLflow store cannot): the trial is recorded FAIL where possible and
        queued again; it does not count toward ``n_trials``.
    """
    fail_stale_trials(study)
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for study.optimize: :func:`heartbeat` beats
        # for this loop as study.optimize would.
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        trial = study.ask()
    with heartbeat(study, trial):
        _run_and_tell(study, trial, context)


def _run_and_tell(study: Any, trial: Any, context: TrialContext) -> None:
    import optuna
    from optuna.trial import TrialState

    from research.experiment.tracking.stores import TrackingError

    config = context.config
    label = f"trial {trial.number}"
    run = None
    history: list[EpochMetrics] = []
    try:
        trial.storage.set_trial_system_attr(trial._trial_id, ATTR_WORKER, worker_identity())
        suggested = {param.name: suggest(trial, param) for param in config.search}
        train_config = config.train_config(suggested)
        run = context.tracker.start_trial_run(config.name, trial.number)
        trial.set_user_attr(ATTR_MLFLOW_RUN, run.run_id)
        trial.set_user_attr(ATTR_MLFLOW_EXPERIMENT, run.experiment_id)
        run.log_config(train_config, len(context.x_train), blas_threads=context.blas_threads)
        shown = ", ".join(f"{name}={short(value)}" for name, value in suggested.items())
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
        # disk) is not reported COMPLETE; TrackingError gives it back below.
        run.save_outputs(history, label, result.params, train_config.spec())
        run.log_metrics({"wall_seconds": time.perf_counter() - started}, step=len(history) - 1)
    except optuna.TrialPruned:
        try:
            run.save_outputs(history, label)
        except (KeyboardInterrupt, TrackingError) as error:
            with signals_deferred():
                _give_back(study, trial, run, _reason(error), killed=_killed(error))
            raise
        with signals_deferred():  # (a signal here is raised once the trial is recorded)
            if _tell(study, trial, TrialState.PRUNED, run, context):
                run.end("PRUNED", "FINISHED")
                context.say(f"{label} PRUNED after {len(history)} epochs")
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
    except (KeyboardInterrupt, StudyError, TrackingError) as error:
        # Not a result (Ctrl-C, SIGTERM, a full disk): queued again, not counted.
        with signals_deferred():
            _give_back(study, trial, run, _reason(error), killed=_killed(error))
        raise
    except BaseException as error:  # a crash: FAIL with the reason
        with signals_deferred():
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if run is not None:
                with contextlib.suppress(Exception):
                    run.end("FAIL", "FAILED", repr(error))
        raise
    # Outside the try: a signal raised once this is recorded must not give the trial back.
    with signals_deferred():
        if _tell(study, trial, TrialState.COMPLETE, run, context, value):
            run.end("COMPLETE", "FINISHED")
            context.say(f"{label} COMPLETE: {config.objective} {format_value(config, value)}")


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
            run.end("FAIL", "FAILED", str(error))
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
            run.end("FAIL", "FAILED", reason)
    context.say(reason)


def _give_back(study: Any, trial: Any, run: Any, reason: str, killed: bool = False) -> None:
    """Not a result (Ctrl-C, SIGTERM, a full disk): FAIL marked interrupted, the parameters
    queued again, the run closed (KILLED or FAILED). Best effort: the disk may be full."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        trial.storage.set_trial_system_attr(trial._trial_id, ATTR_INTERRUPTED, reason)
        if not killed:
            trial.set_user_attr("error", reason)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
    if run is not None:
        with contextlib.suppress(Exception):
            run.end("FAIL", "KILLED" if killed else "FAILED", reason)


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
