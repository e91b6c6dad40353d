"""The study command's orchestration: data and stores checked, the study and its parent run
opened, the trials run (:mod:`.workers`), then the summary and the final fit.

One invocation opens (or creates) the MLflow experiment and parent run and the Optuna study once,
then runs trials in this process or in K spawned workers (:mod:`.trials` runs each trial), and at
the end retrains the best configuration on train+validation and evaluates it once on test.
Re-running the same command continues the same study. The Optuna study lives in the storage of
:mod:`.storage`; the parent run ends through
:func:`~research.experiment.tracking.runs.run_lifecycle`, as every run does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from research.data import N_TRAIN
from research.experiment.config.fields import FIELDS, TrainConfig
from research.experiment.config.study_config import StudyConfig
from research.experiment.studies.liveness import close_ended_runs, recover_stale_trials
from research.experiment.studies.optuna_study import (
    check_search_space,
    describe_pruner,
    load_study,
    make_pruner,
    open_study,
    study_exists,
)
from research.experiment.studies.storage import StudyError, check_storage, default_storage_url
from research.experiment.studies.trials import counted_trials, format_value, short
from research.experiment.studies.workers import (
    StudyRequest,
    blas_threads,
    exit_code,
    interrupted_message,
    load_splits,
    print_line,
    run_workers,
    say_error,
)
from research.experiment.tracking.runs import RunEnd, run_lifecycle
from research.experiment.tracking.stores import redact
from research.experiment.training.train import DivergenceError, evaluate, interruption, train

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
    """Retrains the best configuration on train+validation and evaluates it once on test;
    returns it, its test accuracy and the ``TrainResult`` (parameters, running state)."""
    best_config = config.train_config(study.best_trial.params)
    say(
        f"retraining the best configuration (trial {study.best_trial.number}) on "
        f"{len(x_train_full):,} train+validation rows, then one evaluation on the test split"
    )
    result = train(best_config, x_train_full, labels_train_full, None, None)
    _, test_accuracy = evaluate(
        result.params, x_test, labels_test, result.model, state=result.state
    )
    return best_config, test_accuracy, result


# --- orchestration: the study command ----------------------------------------------------------


def run_study(
    config: StudyConfig,
    *,
    storage_url: str | None,
    tracking_uri: str | None,
    workers: int = 1,
    subset: int | None = None,
    source_dir: str | None = None,
    data_dir: str | None = None,
    quiet: bool = False,
    final: bool = True,
) -> int:
    """Runs (or continues) a study; returns the process exit code.

    Raises StudyError, StudyConfigError, DataError or TrackingError for user mistakes.
    """
    from research.experiment.config.resources import check_workers
    from research.experiment.tracking.stores import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    storage_url = storage_url or default_storage_url(uri)
    check_workers(workers)
    splits = _checked_splits(config, source_dir, data_dir, subset, workers)
    check_storage(storage_url, uri)
    study, tracker = _open_study_and_parent(config, storage_url, uri)
    request = StudyRequest(
        config, storage_url, uri, tracker.experiment_id, tracker.parent_run_id, source_dir,
        data_dir, subset, workers, config.timeout, quiet,
    )  # fmt: skip
    say = print_line
    try:
        with run_lifecycle(tracker.parent) as parent:
            _log_study(parent, config, storage_url, say)
            recover_stale_trials(study, tracker, say)
            say(
                f"study {config.name!r}: {counted_trials(study)}/{config.n_trials} trials done; "
                f"optimizing {config.objective} ({config.direction}) with {config.sampler} "
                f"sampler, {config.pruner} pruner, {workers} worker(s) x "
                f"{blas_threads(workers)} BLAS thread(s)"
            )
            say(f"Optuna storage: {redact(storage_url)}")
            say(f"MLflow: {redact(uri)}, experiment {config.name!r}, parent run {parent.run_id}")
            return _run_and_finish(request, study, tracker, splits, final, tracking_uri, say)
    except KeyboardInterrupt as error:
        # Ctrl-C (or SIGTERM) during the refit or the summary: the trials are safe already.
        say_error(f"{interruption(error)}: run the same command again to finish the study")
        return exit_code(error)


def _checked_splits(
    config: StudyConfig,
    source_dir: str | None,
    data_dir: str | None,
    subset: int | None,
    workers: int,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The study's data, first: a missing data folder, an impossible batch size or a network
    the memory cannot hold (its largest trial, in every worker) stops us before anything is
    written. (data, x_train (N, 784), labels_train (N,))."""
    from research.experiment.config.resources import check_study_memory
    from research.experiment.config.study_config import check_batch_size

    data, x_train, labels_train = load_splits(config, source_dir, data_dir, subset)
    if subset is not None and not 1 <= subset <= len(data.train):
        raise StudyError(f"--subset {subset} must be between 1 and {len(data.train)}")
    check_batch_size(config, len(x_train))
    check_study_memory(config, len(x_train), workers)
    return data, x_train, labels_train


def _open_study_and_parent(config: StudyConfig, storage_url: str, uri: str) -> tuple[Any, Any]:
    """The MLflow experiment, the Optuna study and the study's parent run, all created here,
    once, before any worker starts (concurrent schema creation is what crashes): (the study,
    its StudyTracker)."""
    from research.experiment.tracking.study_runs import StudyAttributes, StudyTracker

    tracker = StudyTracker.open_experiment(config.name, uri)
    if not study_exists(config.name, storage_url):
        tracker.refuse_orphan(lambda: study_exists(config.name, storage_url), redact(storage_url))
    study, created = open_study(config, storage_url)
    check_search_space(study, config, storage_url)
    attributes = StudyAttributes(
        read=lambda key: study.user_attrs.get(key),
        write=study.set_user_attr,
        has_trials=lambda: bool(study.get_trials(deepcopy=False)),
    )
    tracker.use_parent(tracker.elect_parent(attributes, created))
    return study, tracker


def _log_study(parent: Any, config: StudyConfig, storage_url: str, say: Callable) -> None:
    """The study's settings as the parent run's params (the first run's are kept: MLflow params
    are immutable, so a resumed study says what differs), its storage, file and search space."""
    from research.experiment.tracking.runs import SEARCH_SPACE
    from research.experiment.tracking.stores import TrackingError

    existing = parent.client.get_run(parent.run_id).data.params
    settings = _study_settings(config)
    if not existing:
        try:
            parent.log_params(settings)
        except TrackingError:
            # Commands joining a new study together may log its params at the same moment:
            # one wins (MLflow params are immutable); the others read what it logged.
            if not parent.client.get_run(parent.run_id).data.params:
                raise
    else:
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


def _study_settings(config: StudyConfig) -> dict[str, Any]:
    """The study's settings as the parent run's params."""
    return {
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


def _run_and_finish(
    request: StudyRequest,
    study: Any,
    tracker: Any,
    splits: tuple[Any, np.ndarray, np.ndarray],
    final: bool,
    tracking_uri: str | None,
    say: Callable[[str], None],
) -> int:
    """The trials (here or in worker processes), the summary and the refit; the exit code.
    Ends the parent run when it did not succeed; :func:`run_study`'s lifecycle ends it else."""
    config, parent = request.config, tracker.parent
    started_wall = time.time()
    try:
        failed = run_workers(request, study, tracker, splits, say)
    except KeyboardInterrupt as error:
        parent.end(RunEnd.KILLED, interruption(error))
        say_error(interrupted_message(error))
        return exit_code(error)
    if failed:
        say_error(f"{len(failed)} worker(s) exited with codes {failed}")
    study = load_study(config, request.storage_url)
    # Trials a worker left RUNNING (killed: out of memory) and runs a heartbeat's sweep failed
    # while their worker was gone: every worker of this command has ended by now.
    if request.workers > 1:
        recover_stale_trials(study, tracker, say)
    close_ended_runs(study, tracker)
    best = _summary(study, config, parent, time.time() - started_wall, say)
    failure = f"{len(failed)} worker(s) exited with codes {failed}" if failed else None
    if best is None:
        reason = "no trial completed, so there is no best configuration yet"
        say_error(reason)
        parent.end(RunEnd.FAIL, failure or reason)
        return 1
    if final and not _refit_best(study, config, splits, parent, say):
        return 1
    _describe(study, config, parent)
    if failed:
        parent.end(RunEnd.FAIL, failure)
    say(
        f"done in {time.time() - started_wall:.0f} s (best {config.objective} "
        f"{format_value(config, best.value)}); browse: python -m research ui"
        + ("" if tracking_uri is None else f" --tracking-uri {redact(request.tracking_uri)}")
        + f"   (experiment {config.name!r})"
    )
    return 1 if failed else 0


def _summary(
    study: Any, config: StudyConfig, parent: Any, elapsed: float, say: Callable[[str], None]
) -> Any:
    """Says how many trials ended how, and the best ones; logs the best on the parent run.
    Returns the best trial, or None when no trial completed."""
    from optuna.trial import TrialState

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    say(
        f"\nstudy {config.name!r}: {counted_trials(study)}/{config.n_trials} trials counted "
        f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) after {elapsed:.0f} s"
    )
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
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
    return best


def _describe(study: Any, config: StudyConfig, parent: Any) -> None:
    """The parent run's description: trials by state, the best, the refit and champion."""
    from research.experiment.tracking.study_runs import describe_parent

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    best = study.best_trial
    describe_parent(
        parent,
        config.name,
        counts,
        f"trial {best.number}: {config.objective} {format_value(config, best.value)}",
    )


def _refit_best(
    study: Any,
    config: StudyConfig,
    splits: tuple[Any, np.ndarray, np.ndarray],
    parent: Any,
    say: Callable[[str], None],
) -> bool:
    """The final fit: the best configuration retrained on train+validation, evaluated once on
    test; its MLflow model becomes the study's champion, and its weights go on the parent run,
    if its trial is still the study's best when the alias moves (:func:`_publish_refit`). No
    refit when the champion already is the refit of a best trial with these settings (another
    command, or an earlier run of this one, made it). False (the parent ended FAIL, the user
    told) if it diverged."""
    from types import SimpleNamespace

    from research.experiment.tracking.pending_models import fail_abandoned_models

    data, x_train, labels_train = splits
    if abandoned := fail_abandoned_models(parent):
        say(f"note: {len(abandoned)} MLflow model(s) left PENDING by a killed command: FAILED")
    best = study.best_trial
    rows = _refit_rows(len(x_train))
    if done := _current_champion(study, config, parent, rows):
        say(
            f"the champion is already the refit of trial {done.refit.trial} (version "
            f"{done.version}), with these settings: no refit"
        )
        return True
    x_full = np.concatenate([x_train, data.validation.images])
    labels_full = np.concatenate([labels_train, data.validation.labels])
    try:
        # the trial chosen here, not whichever is best by the time final_fit asks
        fitted = final_fit(
            SimpleNamespace(best_trial=best), config, x_full, labels_full, data.test.x,
            data.test.labels, say,
        )  # fmt: skip
    except DivergenceError as error:
        reason = f"the refit of trial {best.number} on train+validation failed: {error}"
        parent.end(RunEnd.FAIL, reason, refit_trial=best.number)
        say_error(
            f"{reason}. The trials are kept; run the study with --no-final to skip the "
            "refit, or narrow the learning_rate range and continue it"
        )
        return False
    say(f"test_accuracy of the retrained best configuration: {100 * fitted[1]:.2f}%")
    _publish_refit(study, config, best, parent, fitted, (data, rows, len(x_full)), say)
    return True


def _refit_rows(n_train: int) -> str:
    """The rows a refit trains on: a --subset's first rows (or all), then the validation rows."""
    rows = f"train[0:{n_train}]" + ("" if n_train == N_TRAIN else "+train[50000:60000]")
    return rows.replace(f"train[0:{N_TRAIN}]", "train[0:60000]")


def _current_champion(study: Any, config: StudyConfig, parent: Any, rows: str) -> Any:
    """The study's champion if it already is the refit of a best trial (by value: a tie
    counts) with the settings this command would refit that trial with; else None."""
    from optuna.trial import TrialState

    from research.experiment.tracking.models import Refit, current_champion, refit_settings

    champion = current_champion(parent, config.name)
    if champion is None or champion.refit is None:
        return None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trial = next((t for t in complete if t.number == champion.refit.trial), None)
    if trial is None or trial.value != study.best_value:
        return None
    settings = refit_settings(config.train_config(trial.params), rows)
    ours = Refit(trial.number, trial.value, config.direction, config.objective, settings)
    return champion if champion.refit == ours else None


def _publish_refit(
    study: Any,
    config: StudyConfig,
    best: Any,
    parent: Any,
    fitted: tuple[TrainConfig, float, Any],
    data_rows: tuple[Any, str, int],
    say: Callable[[str], None],
) -> None:
    """Logs the refit of trial ``best`` as an MLflow model and makes it the champion, with its
    ``best_weights.npz``, ``test_accuracy`` and ``refit_trial`` on the parent run, if ``best`` is
    still a best trial of the study (asked again under the store's lock, as the alias moves) and
    the champion is not this very refit already; else says why the alias stays."""
    from research.experiment.tracking.models import (
        CHAMPION,
        Refit,
        log_model,
        publish_champion,
        refit_settings,
    )

    best_config, test_accuracy, result = fitted
    params = result.params
    data, rows, n_rows = data_rows
    step = len(study.trials)
    settings = refit_settings(best_config, rows)
    refit = Refit(best.number, best.value, config.direction, config.objective, settings)
    better: list[int] = []

    def still_best() -> bool:
        now = study.best_trial  # read from the storage again
        if now.value != best.value:
            better.append(now.number)
        return not better

    state = result.state

    def metric(champion: bool) -> dict[str, float]:
        return {"test_accuracy": test_accuracy} if champion else {}

    def with_champion() -> None:
        # (test_accuracy is on the parent already: the champion's model logged it, as its own)
        parent.log_weights(params, result.model, "best_weights.npz", state=state)
        # which trial best_weights.npz and test_accuracy belong to: best_trial moves with every
        # invocation, --no-final ones included
        parent.set_tags({"refit_trial": str(best.number)})

    published = publish_champion(
        parent,
        config.name,
        refit,
        # the model's one metric: its test accuracy (on the parent run if it is the champion)
        log=lambda tags, champion: log_model(
            parent, params, best_config, data.test.images, step, tags, state, metric(champion)
        ),
        still_best=still_best,
        with_champion=with_champion,
        tags={"test_accuracy": test_accuracy},
    )
    champion = f"models:/{config.name}@{CHAMPION}"
    if published.outcome == "champion":
        parent.log_data(
            best_config.dataset,
            {"training": (rows, n_rows), "test": ("test[0:10000]", len(data.test))},
        )
        say(f"the refit best as an MLflow model: {champion} (version {published.version})")
    elif published.outcome == "kept":
        say(
            f"the champion is already the refit of trial {best.number} (version "
            f"{published.version}), made by another command: this refit is not registered again"
        )
    else:
        which = f"trial {better[0]} is" if better else "a better refit holds the alias"
        stays = f"version {published.version}" if published.version else "unset"
        say(
            f"trial {best.number} is no longer the study's best ({which}): {champion} stays "
            f"{stays}; this refit is logged as {published.model_uri} on the parent run only"
        )
