"""Writing runs to MLflow, and reading one back: one path for ``train``, studies and ``rerun``.

A training run (of ``train``, or one trial of a study) is logged the same way whoever runs it:
:meth:`TrainingRun.log_config` (the fields of its
:class:`~research.experiment.config.fields.TrainConfig`
under their own names, plus ``sizes``, ``n_train_rows`` and ``blas_kernels``),
:meth:`TrainingRun.log_epoch` after every epoch, :meth:`TrainingRun.save_outputs` (loss curves,
and weights when it completed), and one ending, :meth:`TrainingRun.end` or
:meth:`TrainingRun.diverged`. The ending sets the tag ``research.state`` (``COMPLETE``,
``PRUNED`` or ``FAIL``) and, for a failure, ``research.error`` with the reason: a divergence reads
``training diverged at epoch E, step S: ...``; and the run's description (MLflow's
``mlflow.note.content``, the one place the UI shows it), e.g. ``PRUNED at epoch 2 of 8:
val/accuracy 96.13%``. :func:`read_run` reads it all back (``rerun``).

Every run also carries MLflow's own tags for who and what made it: ``mlflow.user``,
``mlflow.source.name`` (``python -m research train``), ``mlflow.source.type`` (``LOCAL``) and
``mlflow.source.git.commit`` (the commit, as ``research.git_commit`` has it with ``-dirty`` for a
tree with changes); and ``weights.npz`` comes with ``weights.txt``, its arrays and how to load it.

Studies have one parent run (:class:`StudyTracker`) with one child run per trial.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from research.data import N_TRAIN, N_VALIDATION
from research.experiment.tracking.inputs import dataset_inputs, duplicate_key
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

if TYPE_CHECKING:
    from research.engine.mlp import MLPSpec, Params
    from research.experiment.config.fields import TrainConfig
    from research.experiment.training.train import DivergenceError, EpochMetrics

TAG_ROLE = "research.role"
TAG_STUDY = "research.study"
TAG_TRIAL = "research.trial_number"
TAG_STATE = "research.state"  # COMPLETE, PRUNED, FAIL (RUNNING while it trains)
TAG_SEED = "research.seed"
TAG_COMMIT = "research.git_commit"
TAG_ERROR = "research.error"  # why a run failed; a divergence starts "training diverged"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests children under it
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the run's description in the UI
TAG_USER = "mlflow.user"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# Written by `train` before runs had one divergence tag; still read by read_run.
LEGACY_DIVERGED_TAG = "diverged"
#: A study's search space as data, on its parent run (a list of SearchParam.as_dict()).
SEARCH_SPACE = "study/search_space.json"


@dataclass
class TrainingRun:
    """An open MLflow run: log its definition, epochs as they come, artifacts and its ending."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str
    #: The epochs it was to train (from :meth:`log_config`) and the last it logged: its
    #: description says how far it got.
    planned_epochs: int | None = None
    last_epoch: EpochMetrics | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id, params=[Param(key, str(value)) for key, value in params.items()]
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Logs metrics at ``step`` in one batch (one transaction).

        Synchronous on purpose: MLflow's asynchronous logging flushes its queue on a timer, which
        made a trial's bookkeeping slower (docs/tracking.md).
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id,
                metrics=[
                    Metric(key, float(value), timestamp, step) for key, value in metrics.items()
                ],
            )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copies ``path`` into the run's artifacts; TrackingError (naming where) if it cannot
        be written, e.g. a full disk or an unwritable store."""
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except OSError as error:
            where = self.client.get_run(self.run_id).info.artifact_uri
            raise TrackingError(
                f"cannot save the artifact {Path(path).name} to {where}"
                f"{'/' + artifact_path if artifact_path else ''}: "
                f"{error.strerror or error} ({error.filename or path}); free space or make it "
                "writable, or choose another store with --tracking-uri"
            ) from None

    def log_json(self, artifact: str, data: Any) -> None:
        """Writes ``data`` as JSON to the artifact path ``artifact`` (``folder/name.json``)."""
        import json

        folder, _, name = artifact.rpartition("/")
        with tempfile.TemporaryDirectory() as temporary:
            path = Path(temporary) / name
            path.write_text(json.dumps(data, indent=2) + "\n")
            self.log_artifact(path, folder or None)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
            )

    def finish(self, status: str = "FINISHED") -> None:
        """Closes the run as FINISHED, FAILED or KILLED."""
        with store_writes(self.tracking_uri):
            self.client.set_terminated(self.run_id, status)

    # --- a training run, the same for `train` and a study's trials ----------------------------

    def log_config(
        self, config: TrainConfig, n_train_rows: int, validation: bool = True, **extra: Any
    ) -> None:
        """What the run trains: every field under its own name, the layer ``sizes``,
        ``n_train_rows``, the OpenBLAS kernels and ``extra`` params (one transaction); and its
        data as MLflow dataset inputs: the first ``n_train_rows`` rows of the official training
        set, and the validation rows unless ``validation`` is False."""
        from mlflow.entities import Param, RunTag

        from research.engine.blas_kernels import loaded_kernels

        params = {
            **config.as_texts(),  # the text TrainConfig.from_params reads back
            "sizes": list(config.spec().sizes),
            "n_train_rows": n_train_rows,
            "blas_kernels": loaded_kernels(),
            **extra,
        }
        self.planned_epochs = config.epochs
        tags = {TAG_SEED: config.seed, TAG_COMMIT: git_commit(), TAG_STATE: "RUNNING"}
        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id,
                params=[Param(key, str(value)) for key, value in params.items()],
                tags=[RunTag(key, str(value)) for key, value in tags.items()],
            )
        splits = {"training": (0, n_train_rows)}
        if validation:
            splits["validation"] = (N_TRAIN, N_TRAIN + N_VALIDATION)
        self.log_data(
            config.dataset, {k: (f"train[{a}:{b}]", b - a) for k, (a, b) in splits.items()}
        )

    def log_data(self, dataset: str, splits: dict[str, tuple[str, int]]) -> None:
        """Logs the run's data as MLflow dataset inputs (the UI's Dataset column), one per
        ``context: (rows, number of rows)``, e.g. ``"training": ("train[0:50000]", 50000)``."""
        inputs = dataset_inputs(dataset, splits)
        # MLflow creates an experiment's dataset record check-then-insert: workers logging the
        # same data at once would race on its unique key. The store's lock orders them; a
        # server (no lock here) that lost the race has the record now, so a second try links it.
        with store_writes(self.tracking_uri), store_lock(self.tracking_uri):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as error:
                if not duplicate_key(error):
                    raise
                self.client.log_inputs(self.run_id, datasets=inputs)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """One epoch's metrics, at its step (the epoch, from 0)."""
        self.log_metrics(metrics.as_metrics(), step=metrics.epoch)
        self.last_epoch = metrics

    def save_outputs(
        self,
        history: Sequence[EpochMetrics],
        title: str,
        params: Params | None = None,
        spec: MLPSpec | None = None,
    ) -> None:
        """The artifacts of a training: ``loss_curves.png`` (if an epoch ended) and, given
        params, ``weights.npz`` with ``weights.txt``. TrackingError (naming the file) if they
        cannot be written."""
        from research.experiment.training.figures import save_loss_curves

        try:
            with tempfile.TemporaryDirectory() as folder:
                if history:
                    curves = Path(folder) / "loss_curves.png"
                    self.log_artifact(save_loss_curves(history, curves, title=title))
        except OSError as error:
            raise TrackingError(
                f"cannot write {error.filename or 'a temporary file'}: {error.strerror or error}; "
                "free some space (or lift the limit), then run the same command again"
            ) from None
        if params is not None and spec is not None:
            self.log_weights(params, spec)

    def log_weights(self, params: Params, spec: MLPSpec, name: str = "weights.npz") -> None:
        """Logs the network as ``name`` (:func:`~.weights.save_weights`) and, beside it, the
        same name in ``.txt``: its arrays' shapes and how to load it. TrackingError (naming the
        file) if they cannot be written."""
        from research.experiment.tracking.weights import describe_weights, save_weights

        try:
            with tempfile.TemporaryDirectory() as folder:
                weights = Path(folder) / name
                save_weights(weights, params, spec)
                about = weights.with_suffix(".txt")
                about.write_text(describe_weights(params, spec, name))
                self.log_artifact(weights)
                self.log_artifact(about)
        except OSError as error:
            raise TrackingError(
                f"cannot write {error.filename or 'a temporary file'}: {error.strerror or error}; "
                "free some space (or lift the limit), then run the same command again"
            ) from None

    def end(self, state: str, status: str, error: str | None = None, **tags: Any) -> None:
        """Ends the run: ``research.state`` (COMPLETE, PRUNED, FAIL), the ``research.error``
        if any, its description (:meth:`describe`), other tags, then MLflow's status (FINISHED,
        FAILED, KILLED)."""
        note = self.describe(state, error)
        tags = {
            TAG_STATE: state,
            **({TAG_ERROR: error} if error is not None else {}),
            **({TAG_NOTE: note} if note else {}),
            **tags,
        }
        self.set_tags(tags)
        self.finish(status)

    def describe(self, state: str, error: str | None = None) -> str | None:
        """How the run ended, in a line: ``COMPLETE: val/accuracy 97.91% after 8 epochs``,
        ``PRUNED at epoch 2 of 8: val/accuracy 96.13%``, ``FAIL: <reason>``; None for a run
        that logged no epoch and gives no reason (a study's parent)."""
        if error:
            return f"{state}: {error}"
        last = self.last_epoch
        if last is None:
            return None
        done = last.epoch + 1
        of = f" of {self.planned_epochs}" if self.planned_epochs not in (None, done) else ""
        accuracy = last.val_accuracy
        score = f"val/accuracy {100 * accuracy:.2f}%" if math.isfinite(accuracy) else ""
        if state == "PRUNED":
            return f"PRUNED at epoch {done}{of}" + (f": {score}" if score else "")
        return f"{state}{': ' + score if score else ''} after {done}{of} epochs"

    def diverged(self, error: DivergenceError) -> None:
        """Ends a run whose training diverged: FAIL, with the epoch and step."""
        where = {"research.diverged_epoch": error.epoch, "research.diverged_step": error.step}
        self.end("FAIL", "FAILED", str(error), **where)

    @property
    def ui_hint(self) -> str:
        """Where a user finds this run."""
        return (
            f"python -m research ui --tracking-uri {self.tracking_uri}  "
            f"(experiment id {self.experiment_id}, run id {self.run_id})"
        )


def start_training_run(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> TrainingRun:
    """Opens a new run in ``experiment`` (created if needed) and returns it."""
    uri = resolve_tracking_uri(tracking_uri)
    tags = tags or {}
    tags = {**source_tags(tags.get("command", "")), **tags}
    try:
        with store_lock(uri):
            client = mlflow_client(uri)
            experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    except TrackingError:
        raise
    except Exception as error:  # MLflow raises many kinds; the user needs the URI and the cause.
        raise store_error(uri, error) from None
    return TrainingRun(client, run.info.run_id, experiment_id, uri)


def log_benchmark(
    params: dict[str, str],
    metrics: dict[str, float],
    files: dict[str, str],
    experiment: str = "benchmarks",
    tracking_uri: str | None = None,
) -> TrainingRun:
    """Logs one benchmark run (``python -m research bench``) and closes it.

    Args:
        params: machine, library versions, thread counts, settings.
        metrics: flat ``name -> value`` (logged at step 0).
        files: artifact file name -> text content (e.g. the table and the JSON results).
    Returns:
        The finished run (for its id and UI hint).
    """
    run = start_training_run(
        experiment, run_name="bench", tags={"command": "bench"}, tracking_uri=tracking_uri
    )
    try:
        run.log_params(params)
        run.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory() as folder:
            for name, text in files.items():
                path = Path(folder) / name
                path.write_text(text)
                run.log_artifact(path)
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    return run


# --- studies: one parent run per study, one child run per trial --------------------------------


@functools.cache  # once per process: every trial run is tagged with it
def git_commit() -> str:
    """The commit of the code (with ``-dirty`` when the tree has changes), or ``unknown``."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own tags for who and what makes a run (the UI's User, Source and Version
    columns): the user, ``python -m research <command>`` as a local source, the git commit
    (without ``-dirty``: :data:`TAG_COMMIT` keeps that)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container), and no $USER
        user = "unknown"
    tags = {
        TAG_USER: user,
        TAG_SOURCE_NAME: f"python -m research {command}".strip(),
        TAG_SOURCE_TYPE: "LOCAL",
    }
    commit = git_commit().removesuffix("-dirty")
    if commit != "unknown":
        tags[TAG_GIT_COMMIT] = commit
    return tags


@dataclass
class StudyTracker:
    """The MLflow side of a study: its experiment, its parent run, and one child run per trial."""

    client: Any
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_name: str = ""

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

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, parent_run_id: str) -> StudyTracker:
        """The tracker of a study whose parent run exists (a worker process joining it)."""
        return cls(mlflow_client(tracking_uri), tracking_uri, experiment_id, parent_run_id)

    @property
    def parent(self) -> TrainingRun:
        return TrainingRun(self.client, self.parent_run_id, self.experiment_id, self.tracking_uri)

    def start_trial_run(self, study_name: str, trial_number: int) -> TrainingRun:
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
        return TrainingRun(self.client, run.info.run_id, self.experiment_id, self.tracking_uri)

    def trial_runs(self) -> list[Any]:
        """Every trial run under the parent (MLflow ``Run`` objects)."""
        with store_writes(self.tracking_uri):
            return self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                max_results=50_000,
            )

    def close_trial_run(self, trial_number: int, state: str, reason: str) -> None:
        """Ends the still-RUNNING run of a trial whose worker stopped: ``research.state`` as
        Optuna recorded it, with the reason; FINISHED for COMPLETE and PRUNED, else FAILED."""
        for run in self.trial_runs():
            if run.data.tags.get(TAG_TRIAL) == str(trial_number) and run.info.status == "RUNNING":
                closing = TrainingRun(
                    self.client, run.info.run_id, self.experiment_id, self.tracking_uri
                )
                closing.end(
                    state, "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED", reason
                )


@dataclass
class LoggedRun:
    """A training run as it was logged: what ``rerun`` needs to train it again and compare."""

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def state(self) -> str | None:
        return self.tags.get(TAG_STATE)

    @property
    def divergence(self) -> str | None:
        """The divergence the run ended with (``training diverged at ...``), or None."""
        error = self.tags.get(TAG_ERROR) or self.tags.get(LEGACY_DIVERGED_TAG) or ""
        return error if error.startswith("training diverged") else None


def read_run(run_id: str, metrics: Sequence[str], tracking_uri: str | None = None) -> LoggedRun:
    """The params, tags and ``metrics`` histories ((step, value) in step order) of run
    ``run_id``; TrackingError if there is no such run."""
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise TrackingError(
            f"no MLflow run with id {run_id!r} in {redact(uri)}; list runs with "
            "`python -m research ui` or pass the right --tracking-uri"
        ) from None
    histories = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in metrics
    }
    return LoggedRun(run_id, dict(run.data.params), dict(run.data.tags), histories)
