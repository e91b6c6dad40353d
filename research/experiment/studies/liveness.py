"""Who runs a trial, and whether it still does: worker identity, stale trials, heartbeats.

A journal has no heartbeat, so each trial records its worker as ``host:pid:start time``; when a
study resumes, a RUNNING trial whose worker on this host is gone (or that never recorded one, a
minute after it started) is marked FAIL, its MLflow run closed, and its parameters queued again.
Database storages have Optuna's heartbeats for that, which also see other hosts' workers: this
module beats for the trial that runs, and fails the stale ones of the study when a command starts
and before every trial.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import warnings
from collections.abc import Callable
from typing import Any

from research.experiment.studies.optuna_compat import (
    fail_trial,
    heartbeat_interval,
    record_heartbeat,
    set_system_attr,
)
from research.experiment.tracking.processes import process_alive, process_identity
from research.experiment.tracking.runs import TAG_TRIAL

ATTR_WORKER = "research:worker"
ATTR_INTERRUPTED = "research:interrupted"
ATTR_RETRY_OF = "research:retry_of"


def worker_identity() -> str:
    """``host:pid:start``: this process, as the worker running a trial."""
    return process_identity()


def worker_alive(worker: str) -> bool | None:
    """Whether the worker named ``worker`` still runs; None when it ran on another host, which
    only heartbeats can tell."""
    return process_alive(worker)


#: A RUNNING trial with no worker recorded this long after it started was orphaned between
#: Optuna's ``ask`` and the next write (its process killed there, or the disk full).
UNCLAIMED_SECONDS = 60


def _orphaned(trial: Any) -> bool:
    if ATTR_WORKER in trial.system_attrs or trial.datetime_start is None:
        return False
    started = trial.datetime_start
    now = datetime.datetime.now(started.tzinfo)
    return (now - started).total_seconds() > UNCLAIMED_SECONDS


def fail_stale_trials(study: Any) -> None:
    """Database storages: fails (and queues again, once) the trials whose heartbeat stopped.

    Optuna's public function; a no-op for storages without heartbeats (the journal). It is
    called when a study starts and before every trial, as ``study.optimize`` would."""
    import optuna

    with warnings.catch_warnings():  # (it is marked "experimental")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def recover_stale_trials(study: Any, tracker: Any, say: Callable[[str], None]) -> int:
    """Marks FAIL the RUNNING trials whose worker process on this host is gone, closes their
    MLflow runs, and queues their parameters again. Returns how many were recovered."""
    import optuna
    from optuna.trial import TrialState

    # Database storage: Optuna fails (and retries) trials whose heartbeat stopped; do it now,
    # not only when a new trial starts, or a stale trial would hold the budget forever.
    fail_stale_trials(study)
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(ATTR_WORKER, "")
        if _orphaned(trial):
            reason = f"its worker stopped before it recorded itself ({UNCLAIMED_SECONDS} s ago)"
        elif worker_alive(worker) is False:
            reason = f"worker {worker} died while the trial was running"
        else:
            continue  # alive, or another machine's: its heartbeat (database storage) tells
        try:
            set_system_attr(trial, ATTR_INTERRUPTED, reason, study=study)
            fail_trial(study, trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another command recovered it first
        tracker.close_trial_run(trial.number, "FAIL", reason)
        study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
        say(f"trial {trial.number} was left RUNNING by a dead worker: marked FAIL, queued again")
        recovered += 1
    close_ended_runs(study, tracker)
    return recovered


def close_ended_runs(study: Any, tracker: Any) -> None:
    """Closes as FAILED the MLflow runs still open for trials that have ended in Optuna (their
    worker died before closing them, or a heartbeat failed them)."""
    from optuna.trial import TrialState

    ended = {
        str(t.number): t.state.name
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED)
    }
    for run in tracker.trial_runs():
        number = run.data.tags.get(TAG_TRIAL)
        if run.info.status == "RUNNING" and number in ended:
            tracker.close_trial_run(int(number), ended[number], "its worker stopped")


@contextlib.contextmanager
def heartbeat(study: Any, trial: Any):
    """Beats for ``trial`` while the block runs, on storages with heartbeats (databases), as
    ``study.optimize`` does: a worker that stops beating (killed, stopped, cut off) has its
    trial failed and queued again by the others after the grace period."""
    interval = heartbeat_interval(study)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            # A beat that fails (the database briefly gone) is retried at the next interval.
            with contextlib.suppress(Exception):
                record_heartbeat(study, trial)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
