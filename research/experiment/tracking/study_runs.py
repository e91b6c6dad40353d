"""A study's runs in MLflow: one parent run per study, one child run per trial.

:class:`StudyTracker` opens the study's experiment, elects its one parent run
(:meth:`StudyTracker.elect_parent`: chosen atomically through the Optuna study's attributes, for
commands started together on several machines), refuses a study whose trials live in another
Optuna storage (:meth:`StudyTracker.refuse_orphan`), starts each trial's run under the parent
and closes the runs of trials whose worker died. It talks to MLflow only; the Optuna study is
given as two functions that read and write its user attributes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from research.experiment.tracking.runs import (
    TAG_COMMIT,
    TAG_NOTE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    RunEnd,
    TrackedRun,
    git_commit,
    source_tags,
)
from research.experiment.tracking.stores import (
    TrackingError,
    get_or_create_experiment,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    store_error,
    store_lock,
    store_writes,
)

#: The study attributes naming its parent run and experiment (written by the elected command).
ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"
#: How long a command that did not create the study waits for its creator to name the parent run.
PARENT_WAIT_SECONDS = 60.0
#: How long a command that named a parent run itself waits before reading back the name that stayed.
PARENT_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class StudyAttributes:
    """The Optuna study as the parent election sees it: its user attributes, read and written,
    and whether it holds any trial."""

    read: Callable[[str], Any]
    write: Callable[[str, Any], None]
    has_trials: Callable[[], bool]


@dataclass
class StudyTracker:
    """The MLflow side of a study: its experiment, its parent run, and one child run per trial."""

    client: Any
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_name: str = ""
    _parent: TrackedRun | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, study_name: str, tracking_uri: str | None = None) -> StudyTracker:
        """The study's experiment and parent run: its earliest parent run, else a new one.

        ``study`` chooses the parent through the Optuna storage instead (atomically, for commands
        started together on several machines): :meth:`open_experiment`, then :meth:`use_parent`.
        """
        tracker = cls.open_experiment(study_name, tracking_uri)
        parents = tracker.study_parents()
        tracker.use_parent(parents[0] if parents else tracker.create_parent())
        return tracker

    @classmethod
    def open_experiment(cls, study_name: str, tracking_uri: str | None = None) -> StudyTracker:
        """The study's experiment (created if needed), with no parent run chosen yet."""
        uri = resolve_tracking_uri(tracking_uri)
        try:
            with store_lock(uri):
                client = mlflow_client(uri)
                experiment_id = get_or_create_experiment(client, study_name, uri)
        except TrackingError:
            raise
        except Exception as error:
            raise store_error(uri, error) from None
        return cls(client, uri, experiment_id, "", study_name)

    def study_parents(self) -> list[str]:
        """The ids of the runs tagged as this study's parent, earliest first."""
        with store_writes(self.tracking_uri):
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{self.study_name}'"
                ),
                max_results=1000,
            )
        found.sort(key=lambda run: (run.info.start_time, run.info.run_id))
        return [run.info.run_id for run in found]

    def create_parent(self) -> str:
        """A new parent run for the study; returns its id."""
        with store_writes(self.tracking_uri):
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"study-{self.study_name}",
                tags={
                    **source_tags("study"),
                    TAG_ROLE: "study",
                    TAG_STUDY: self.study_name,
                    TAG_COMMIT: git_commit(),
                },
            )
        return run.info.run_id

    def use_parent(self, run_id: str) -> None:
        """Makes ``run_id`` this tracker's parent run, and marks it RUNNING again."""
        with store_writes(self.tracking_uri):
            try:
                run = self.client.get_run(run_id)
            except Exception:
                run = None
            if run is None or run.info.experiment_id != self.experiment_id:
                raise TrackingError(
                    f"the study's parent run {run_id} (named in its Optuna storage) is not in "
                    f"experiment {self.study_name!r} of {redact(self.tracking_uri)}: pass the "
                    "--tracking-uri the study started with, or use a new --study-name"
                )
            if run.info.lifecycle_stage == "deleted":
                self.client.restore_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id

    def elect_parent(self, study: StudyAttributes, created: bool) -> str:
        """The study's one MLflow parent run, chosen atomically through the Optuna storage.

        The command that created the study (exactly one: creation is atomic) makes the parent
        run and names it in a study attribute; every other command uses the run named there,
        waiting for it if the creator is still starting. A study made before this rule has no
        attribute: its earliest parent run is adopted. No clock is compared, and no run with
        trials is deleted.
        """
        if created:
            parents = self.study_parents()  # an empty one left by an older version is reused
            run_id = parents[0] if parents else self.create_parent()
            self._name_parent(study, run_id)
            return run_id
        waited = time.monotonic()
        while True:
            run_id = study.read(ATTR_PARENT_RUN)
            if run_id:
                return run_id
            parents = self.study_parents()
            # A creator names the parent before any trial starts: trials mean none is coming.
            gave_up = time.monotonic() - waited > PARENT_WAIT_SECONDS
            if parents or study.has_trials() or gave_up:
                return self._adopt_parent(study, parents)
            time.sleep(0.5)

    def _adopt_parent(self, study: StudyAttributes, parents: list[str]) -> str:
        """An older study, or its creator died before naming a parent: adopt or make one. Two
        commands may get here together: each names its run, waits, and reads back which name
        stayed (the last written); the other's new run is deleted unused."""
        made = not parents
        run_id = parents[0] if parents else self.create_parent()
        self._name_parent(study, run_id)
        time.sleep(PARENT_SETTLE_SECONDS)
        named = study.read(ATTR_PARENT_RUN) or run_id
        if named != run_id and made:
            with contextlib.suppress(Exception):
                self.client.delete_run(run_id)
        return named

    def _name_parent(self, study: StudyAttributes, run_id: str) -> None:
        study.write(ATTR_PARENT_RUN, run_id)
        study.write(ATTR_EXPERIMENT, self.experiment_id)

    def refuse_orphan(self, storage_exists: Callable[[], bool], storage: str) -> None:
        """A study absent from its Optuna storage while the experiment holds its trials (a new
        journal beside an old store, or another --storage) must not add a second trial-0000 to
        them. ``storage_exists`` says whether the storage holds the study now (not made
        meanwhile); ``storage`` names it (redacted) in the message."""
        for run_id in self.study_parents():
            trials = self.trial_runs(run_id)
            if trials and not storage_exists():
                logged = self.client.get_run(run_id).data.tags.get("optuna.storage", "unknown")
                raise TrackingError(
                    f"experiment {self.study_name!r} in {redact(self.tracking_uri)} already "
                    f"holds study {self.study_name!r} (parent run {run_id}, {len(trials)} trial "
                    f"runs, Optuna storage {logged}), but {storage} has no such study: pass the "
                    "--storage it used to continue it, or use a new --study-name"
                )

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, parent_run_id: str) -> StudyTracker:
        """The tracker of a study whose parent run exists (a worker process joining it)."""
        return cls(mlflow_client(tracking_uri), tracking_uri, experiment_id, parent_run_id)

    @property
    def parent(self) -> TrackedRun:
        """The parent run, one object for the command: how it ended is known to every user."""
        if self._parent is None or self._parent.run_id != self.parent_run_id:
            self._parent = TrackedRun(
                self.client, self.parent_run_id, self.experiment_id, self.tracking_uri
            )
        return self._parent

    def start_trial_run(self, study_name: str, trial_number: int) -> TrackedRun:
        """A child run named ``trial-0007`` under the parent run."""
        with store_writes(self.tracking_uri):
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial_number:04d}",
                tags={
                    **source_tags("study"),
                    TAG_PARENT: self.parent_run_id,
                    TAG_ROLE: "trial",
                    TAG_STUDY: study_name,
                    TAG_TRIAL: str(trial_number),
                    TAG_STATE: "RUNNING",
                },
            )
        return TrackedRun(self.client, run.info.run_id, self.experiment_id, self.tracking_uri)

    def trial_runs(self, parent_run_id: str | None = None) -> list[Any]:
        """Every trial run under the parent (MLflow ``Run`` objects); under ``parent_run_id``
        if given."""
        with store_writes(self.tracking_uri):
            return self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id or self.parent_run_id}'",
                max_results=50_000,
            )

    def close_trial_run(self, trial_number: int, state: str, reason: str) -> None:
        """Ends the still-RUNNING run of a trial whose worker stopped: ``research.state`` as
        Optuna recorded it, with the reason; FINISHED for COMPLETE and PRUNED, else FAILED."""
        for run in self.trial_runs():
            if run.data.tags.get(TAG_TRIAL) == str(trial_number) and run.info.status == "RUNNING":
                closing = TrackedRun(
                    self.client, run.info.run_id, self.experiment_id, self.tracking_uri
                )
                closing.end(RunEnd.of_state(state), reason)


def describe_parent(parent: Any, name: str, counts: dict[str, int], best: str) -> str:
    """Sets the study's parent run's description (what MLflow's UI shows on its page) and
    returns it: the trials by state, the best trial (``best``, e.g. ``trial 7: val/accuracy
    98.12%``), and the refit's test accuracy and champion version when there is one:
    ``12 trials: 8 COMPLETE, 3 PRUNED, 1 FAIL. Best trial 7: val/accuracy 98.12%. Refit of
    trial 7: test accuracy 98.05%, registered as mnist_mlp version 3 (@champion).``"""
    from research.experiment.tracking.models import current_champion

    total = sum(counts.values())
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    note = f"{total} trials: {states}. Best {best}."
    with store_writes(parent.tracking_uri):
        data = parent.client.get_run(parent.run_id).data
    refit, accuracy = data.tags.get("refit_trial"), data.metrics.get("test_accuracy")
    champion = current_champion(parent, name)
    if refit is not None and accuracy is not None:
        note += f" Refit of trial {refit}: test accuracy {100 * accuracy:.2f}%"
        if champion is not None and champion.refit is not None:
            note += f", registered as {name} version {champion.version} (@champion)"
        note += "."
    parent.set_tags({TAG_NOTE: note})
    return note
