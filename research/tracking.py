"""The only module that talks to MLflow: where the store is, runs, metrics, artifacts.

The store defaults to MLflow's SQLite backend inside ``./mlruns`` (``mlruns/mlflow.db``) with
artifacts under ``mlruns/artifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` overrides it.
Everything goes through an explicit ``MlflowClient`` rather than MLflow's global active run, so
several runs (a study's parent and its trials) can be open at once without surprises.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.mlp import MLPSpec, Params

DEFAULT_STORE_DIR = Path("mlruns")


class TrackingError(Exception):
    """The tracking store cannot be opened or written; the message says which and why."""


def default_tracking_uri(store_dir: Path | None = None) -> str:
    """``sqlite:///<abs path>/mlruns/mlflow.db`` (relative to the current directory)."""
    store = (store_dir or DEFAULT_STORE_DIR).resolve()
    return f"sqlite:///{store / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else the default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _artifact_root(uri: str) -> str | None:
    """Artifacts sit beside a local SQLite store (``<dir>/artifacts``); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def _client(uri: str):
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # MLflow and alembic announce every schema step of a new SQLite store at INFO; users need none.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"cannot create the tracking store folder {folder}: {error.strerror}; "
                "pass --tracking-uri or set MLFLOW_TRACKING_URI to a writable place"
            ) from None
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:
        # Another process may have created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def save_weights(path: Path, params: Params, spec: MLPSpec) -> None:
    """Writes params as ``.npz`` (``W0, b0, W1, b1, ...`` and the spec as JSON text).

    Written to a temporary file and renamed, so a crash never leaves a half-written file.
    """
    arrays = {}
    for i, layer in enumerate(params):
        arrays[f"W{i}"] = layer["W"]
        arrays[f"b{i}"] = layer["b"]
    arrays["spec"] = np.array(
        json.dumps(
            {
                "sizes": list(spec.sizes),
                "activation": spec.activation,
                "output": spec.output,
                "loss": spec.loss,
                "l2": spec.l2,
            }
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        tmp = Path(handle.name)
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[MLPSpec, Params]:
    """Reads a file written by :func:`save_weights` (never unpickles)."""
    with np.load(path, allow_pickle=False) as data:
        spec_fields = json.loads(str(data["spec"]))
        spec = MLPSpec(
            sizes=tuple(spec_fields["sizes"]),
            activation=spec_fields["activation"],
            output=spec_fields["output"],
            loss=spec_fields["loss"],
            l2=spec_fields["l2"],
        )
        params = [
            {"W": data[f"W{i}"].copy(), "b": data[f"b{i}"].copy()} for i in range(spec.n_layers)
        ]
    for i, (layer, n_in, n_out) in enumerate(zip(params, spec.sizes[:-1], spec.sizes[1:])):
        if layer["W"].shape != (n_in, n_out) or layer["b"].shape != (n_out,):
            raise ValueError(
                f"{path}: layer {i} has shapes that do not match its spec {spec.sizes}"
            )
    return spec, params


@dataclass
class TrainingRun:
    """An open MLflow run of one training: log epochs as they come, artifacts at the end."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(key, str(value)) for key, value in params.items()]
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Logs metrics at ``step`` in one batch (one transaction: ~5 ms on SQLite).

        MLflow's asynchronous logging was tried for per-epoch metrics and made a trial's
        bookkeeping ~1 s slower: its queue is flushed on a timer.
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), timestamp, step) for key, value in metrics.items()],
        )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(
            self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
        )

    def finish(self, status: str = "FINISHED") -> None:
        """Closes the run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

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
    try:
        client = _client(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    except TrackingError:
        raise
    except Exception as error:  # MLflow raises many kinds; the user needs the URI and the cause.
        raise _store_error(uri, error) from None
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

TAG_ROLE = "research.role"
TAG_STUDY = "research.study"
TAG_TRIAL = "research.trial_number"
TAG_STATE = "research.state"
TAG_SEED = "research.seed"
TAG_COMMIT = "research.git_commit"
TAG_ERROR = "research.error"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests children under it


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


@dataclass
class StudyTracker:
    """The MLflow side of a study: its experiment, its parent run, and one child run per trial."""

    client: Any
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    @classmethod
    def open(cls, study_name: str, tracking_uri: str | None = None) -> StudyTracker:
        """Finds the study's parent run by tag, or creates the experiment and the run.

        Re-running a study re-uses its parent run, so its trials stay under one run.
        """
        uri = resolve_tracking_uri(tracking_uri)
        try:
            client = _client(uri)
            experiment_id = get_or_create_experiment(client, study_name, uri)
            found = client.search_runs(
                [experiment_id],
                filter_string=(
                    f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study_name}'"
                ),
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                run = client.create_run(
                    experiment_id,
                    run_name=f"study-{study_name}",
                    tags={TAG_ROLE: "study", TAG_STUDY: study_name, TAG_COMMIT: git_commit()},
                )
                run_id = run.info.run_id
        except TrackingError:
            raise
        except Exception as error:
            raise _store_error(uri, error) from None
        return cls(client, uri, experiment_id, run_id)

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, parent_run_id: str) -> StudyTracker:
        """The tracker of a study whose parent run exists (a worker process joining it)."""
        return cls(_client(tracking_uri), tracking_uri, experiment_id, parent_run_id)

    @property
    def parent(self) -> TrainingRun:
        return TrainingRun(self.client, self.parent_run_id, self.experiment_id, self.tracking_uri)

    def start_trial_run(self, study_name: str, trial_number: int, seed: int) -> TrainingRun:
        """A child run named ``trial-0007`` under the parent run."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial_number:04d}",
            tags={
                TAG_PARENT: self.parent_run_id,
                TAG_ROLE: "trial",
                TAG_STUDY: study_name,
                TAG_TRIAL: str(trial_number),
                TAG_SEED: str(seed),
                TAG_COMMIT: git_commit(),
                TAG_STATE: "RUNNING",
            },
        )
        return TrainingRun(self.client, run.info.run_id, self.experiment_id, self.tracking_uri)

    def trial_runs(self) -> list[Any]:
        """Every trial run under the parent (MLflow ``Run`` objects)."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
            max_results=50_000,
        )

    def close_trial_run(self, trial_number: int, state: str, reason: str) -> None:
        """Ends the still-RUNNING run of a trial whose worker died: FAILED, with the reason."""
        for run in self.trial_runs():
            if run.data.tags.get(TAG_TRIAL) == str(trial_number) and run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, TAG_STATE, state)
                self.client.set_tag(run.info.run_id, TAG_ERROR, reason)
                self.client.set_terminated(run.info.run_id, "FAILED")


def _store_error(uri: str, error: Exception) -> TrackingError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else repr(error)
    return TrackingError(
        f"cannot open the MLflow tracking store {uri}: {first_line}; "
        "check --tracking-uri / MLFLOW_TRACKING_URI"
    )


def find_run(run_id: str, tracking_uri: str | None = None) -> tuple[Any, TrainingRun]:
    """The MLflow run ``run_id`` and a handle on it; TrackingError if there is none."""
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise TrackingError(
            f"no MLflow run with id {run_id!r} in {uri}; list runs with "
            "`python -m research ui` or pass the right --tracking-uri"
        ) from None
    return run, TrainingRun(client, run_id, run.info.experiment_id, uri)


def metric_history(run: TrainingRun, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric, in step order."""
    history = run.client.get_metric_history(run.run_id, key)
    return sorted((m.step, m.value) for m in history)
