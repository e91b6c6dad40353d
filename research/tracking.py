"""The only module that talks to MLflow: where the store is, runs, metrics, artifacts.

The store defaults to MLflow's SQLite backend inside ``./mlruns`` (``mlruns/mlflow.db``) with
artifacts under ``mlruns/artifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` overrides it.
Everything goes through an explicit ``MlflowClient`` rather than MLflow's global active run, so
several runs (a study's parent and its trials) can be open at once without surprises.
"""

from __future__ import annotations

import contextlib
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


class WeightsError(ValueError):
    """A weights file is not one :func:`save_weights` wrote for a valid network."""


# Seconds the pre-flight check waits for a tracking server or database to answer. Without it,
# MLflow retries an unreachable server for ~4 minutes and a database for ~2 before saying so.
PREFLIGHT_TIMEOUT = 10


def sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` with the psycopg 3 driver the project ships (SQLAlchemy's default
    PostgreSQL driver is psycopg2, which is not installed); other URLs unchanged."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def default_tracking_uri(store_dir: Path | None = None) -> str:
    """``sqlite:///<abs path>/mlruns/mlflow.db`` (relative to the current directory)."""
    store = (store_dir or DEFAULT_STORE_DIR).resolve()
    return f"sqlite:///{store / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else the default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def local_store_folder(uri: str) -> Path:
    """The folder of a local SQLite store, else ``./mlruns`` (absolute): where the Optuna journal
    and the reports go by default."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    return DEFAULT_STORE_DIR.resolve()


def _artifact_root(uri: str) -> str | None:
    """Artifacts sit beside a local SQLite store (``<dir>/artifacts``); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def _preflight(uri: str) -> None:
    """Fails fast, with the cause, when a tracking server or database cannot be reached."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PREFLIGHT_TIMEOUT):
                return
        except urllib.error.HTTPError:
            return  # it answered: a server is there (a proxy in front may not know /health)
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            raise TrackingError(
                f"cannot reach the MLflow tracking server {redact(uri)}: {reason}; start it "
                "(mlflow server ...) or check --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
    elif scheme and scheme != "sqlite" and scheme.split("+")[0] in _DATABASES:
        import sqlalchemy

        arguments = {"connect_timeout": PREFLIGHT_TIMEOUT} if scheme.startswith("postgres") else {}
        try:
            engine = sqlalchemy.create_engine(
                sqlalchemy_url(uri), poolclass=sqlalchemy.pool.NullPool, connect_args=arguments
            )
            with engine.connect():
                pass
        except Exception as error:
            raise _store_error(uri, error) from None


_DATABASES = ("postgresql", "mysql", "mssql")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for printing and logging)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _client(uri: str):
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # MLflow and alembic announce every schema step of a new SQLite store at INFO; users need none.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its per-download progress bar would break into our own progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"cannot create the tracking store folder {folder}: {error.strerror}; "
                "pass --tracking-uri or set MLFLOW_TRACKING_URI to a writable place"
            ) from None
    else:
        _preflight(uri)
    uri = sqlalchemy_url(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def store_lock(url: str):
    """Holds a lock shared by every process using the store at ``url`` (a SQLite file: a lock
    file beside it; PostgreSQL: an advisory lock in its database; else none).

    Creating a store's schema, a study's experiment and its parent run is check-then-create:
    K commands started together on a fresh store would otherwise race (schema creation fails
    with duplicate keys, or each makes its own parent run).
    """
    if url.startswith("sqlite:///"):
        import fcntl

        lock = Path(url.removeprefix("sqlite:///")).with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield
    elif url.startswith(("postgresql://", "postgresql+psycopg://")):
        import psycopg

        plain = "postgresql://" + url.split("://", 1)[1]
        with psycopg.connect(plain, autocommit=True, connect_timeout=PREFLIGHT_TIMEOUT) as db:
            db.execute("SELECT pg_advisory_lock(%s)", (STORE_LOCK_KEY,))
            yield  # the lock ends with the session
    else:
        yield


STORE_LOCK_KEY = 0x7265_7365_6172  # "resear": any fixed 64-bit key


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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
            tmp = Path(handle.name)
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except OSError as error:  # a full disk: name the file (zipfile's errors do not)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def load_weights(path: Path) -> tuple[MLPSpec, Params]:
    """Reads a file written by :func:`save_weights`; never unpickles.

    Returns the spec and one ``{"W": (n_in, n_out), "b": (n_out,)}`` dict per layer. Raises
    WeightsError, naming the file and the array, for anything else: pickled (object) arrays, a
    missing or unreadable spec, missing or extra arrays, shapes that do not match the spec, or
    arrays that are not float32/float64 of one dtype.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except (OSError, ValueError, EOFError) as error:  # not a zip, or an object (pickled) array
        raise WeightsError(f"{path}: not a weights file written by this project: {error}") from None
    try:
        fields = json.loads(str(arrays.pop("spec")))
        spec = MLPSpec(
            sizes=tuple(fields["sizes"]),
            activation=fields["activation"],
            output=fields["output"],
            loss=fields["loss"],
            l2=fields["l2"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: no valid network spec in the file ({error!r})") from None
    expected = {}
    for i, (n_in, n_out) in enumerate(zip(spec.sizes[:-1], spec.sizes[1:])):
        expected[f"W{i}"], expected[f"b{i}"] = (n_in, n_out), (n_out,)
    if set(arrays) != set(expected):
        raise WeightsError(
            f"{path}: arrays {sorted(arrays)} do not match the spec {spec.sizes}, which needs "
            f"{sorted(expected)}"
        )
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise WeightsError(
                f"{path}: {name} has shape {arrays[name].shape}, but the spec {spec.sizes} "
                f"needs {shape}"
            )
    for name in expected:
        if arrays[name].dtype not in (np.float32, np.float64):
            raise WeightsError(
                f"{path}: {name} has dtype {arrays[name].dtype}; allowed: float32 or float64"
            )
    dtypes = sorted({str(array.dtype) for array in arrays.values()})
    if len(dtypes) > 1:
        raise WeightsError(
            f"{path}: the arrays mix dtypes {', '.join(dtypes)}; a network has one dtype"
        )
    params = [{"W": arrays[f"W{i}"], "b": arrays[f"b{i}"]} for i in range(spec.n_layers)]
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
        with store_lock(uri):
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
            with store_lock(uri):
                client = _client(uri)
                experiment_id = get_or_create_experiment(client, study_name, uri)
                run_id = _study_parent_run(client, experiment_id, study_name)
                if run_id is None:
                    client.create_run(
                        experiment_id,
                        run_name=f"study-{study_name}",
                        tags={TAG_ROLE: "study", TAG_STUDY: study_name, TAG_COMMIT: git_commit()},
                    )
                    # Commands started together on machines sharing one database may each
                    # have made a parent run: all keep the earliest, the others are deleted.
                    run_id = _study_parent_run(client, experiment_id, study_name, dedupe=True)
                client.update_run(run_id, status="RUNNING")
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


def _study_parent_run(
    client: Any, experiment_id: str, study_name: str, dedupe: bool = False
) -> str | None:
    """The id of the study's parent run: the earliest one tagged for it (by start time, then
    id, so every process picks the same). With ``dedupe``, later duplicates are deleted."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study_name}'",
        max_results=1000,
    )
    if not found:
        return None
    found.sort(key=lambda run: (run.info.start_time, run.info.run_id))
    if dedupe:
        for duplicate in found[1:]:
            client.delete_run(duplicate.info.run_id)
    return found[0].info.run_id


def _store_error(uri: str, error: Exception) -> TrackingError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else repr(error)
    return TrackingError(
        f"cannot open the MLflow tracking store {redact(uri)}: {first_line}; "
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
            f"no MLflow run with id {run_id!r} in {redact(uri)}; list runs with "
            "`python -m research ui` or pass the right --tracking-uri"
        ) from None
    return run, TrainingRun(client, run_id, run.info.experiment_id, uri)


def metric_history(run: TrainingRun, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric, in step order."""
    history = run.client.get_metric_history(run.run_id, key)
    return sorted((m.step, m.value) for m in history)


# --- reading studies back (for analysis/) ------------------------------------------------------


@dataclass(frozen=True)
class StudyRecord:
    """A study as the tracking store knows it: its experiment and its parent run."""

    name: str
    experiment_id: str
    parent_run_id: str
    last_active_ms: int  # the latest start or end time of its parent run


def _read_client(uri: str):
    """A client for reading an existing store: a SQLite store that is not there is an error,
    not a new empty store (a mistyped path must not create one)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise TrackingError(
                f"there is no tracking store at {path}; pass --tracking-uri (or set "
                "MLFLOW_TRACKING_URI) to the store your studies wrote, e.g. "
                "sqlite:///mlruns/mlflow.db"
            )
    return _client(uri)


def _reading(uri: str, what: str, action):
    """Runs ``action()``; MLflow's many error kinds become one TrackingError naming ``what``."""
    try:
        return action()
    except TrackingError:
        raise
    except Exception as error:  # MLflow, SQLAlchemy, HTTP: the user needs the URI and the cause
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else repr(error)
        raise TrackingError(f"cannot read {what} from {redact(uri)}: {first_line}") from None


def list_studies(tracking_uri: str | None = None) -> list[StudyRecord]:
    """Every study in the store (one parent run tagged ``research.role=study``), newest first."""
    uri = resolve_tracking_uri(tracking_uri)
    client = _read_client(uri)

    def parents() -> list[Any]:
        experiment_ids = [e.experiment_id for e in client.search_experiments(max_results=50_000)]
        if not experiment_ids:
            return []
        return client.search_runs(
            experiment_ids, filter_string=f"tags.`{TAG_ROLE}` = 'study'", max_results=50_000
        )

    records = [
        StudyRecord(
            name=run.data.tags.get(TAG_STUDY, ""),
            experiment_id=run.info.experiment_id,
            parent_run_id=run.info.run_id,
            last_active_ms=max(run.info.start_time or 0, run.info.end_time or 0),
        )
        for run in _reading(uri, "the studies", parents)
    ]
    return sorted(records, key=lambda record: record.last_active_ms, reverse=True)


def find_study(name: str | None, tracking_uri: str | None = None) -> StudyRecord:
    """The study called ``name`` (the most recent one if ``None``); TrackingError listing the
    studies that exist if there is no such study."""
    uri = resolve_tracking_uri(tracking_uri)
    studies = list_studies(uri)
    if not studies:
        raise TrackingError(
            f"there is no study in the tracking store {redact(uri)}; run one with "
            "`python -m research study experiments/mnist_mlp.toml` or pass --tracking-uri"
        )
    if name is None:
        return studies[0]
    for record in studies:
        if record.name == name:
            return record
    known = ", ".join(sorted({record.name for record in studies}))
    raise TrackingError(f"no study named {name!r} in {redact(uri)}; the studies there are: {known}")


def study_runs(record: StudyRecord, tracking_uri: str | None = None):
    """The parent run and the trial runs of a study, from ``mlflow.search_runs``.

    Returns ``(parent, trials)``: two pandas DataFrames in MLflow's layout (``run_id``,
    ``status``, ``start_time``, ``end_time``, ``params.<name>``, ``metrics.<name>`` holding the
    last logged value, ``tags.<name>``); ``parent`` has one row.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    _read_client(uri)

    def search(filter_string: str):
        return mlflow.search_runs(
            experiment_ids=[record.experiment_id],
            filter_string=filter_string,
            max_results=50_000,
            output_format="pandas",
        )

    parent = _reading(
        uri,
        f"study {record.name!r}",
        lambda: search(f"attributes.run_id = '{record.parent_run_id}'"),
    )
    trials = _reading(
        uri,
        f"the trials of study {record.name!r}",
        lambda: search(f"tags.`{TAG_PARENT}` = '{record.parent_run_id}'"),
    )
    return parent, trials


def metric_histories(run_ids: list[str], keys: list[str], tracking_uri: str | None = None):
    """Every logged value of ``keys`` for ``run_ids``: a long pandas DataFrame with the columns
    ``run_id``, ``key``, ``step``, ``value`` (sorted by run, key and step)."""
    import pandas as pd

    uri = resolve_tracking_uri(tracking_uri)
    client = _read_client(uri)

    def read() -> list[tuple[str, str, int, float]]:
        return [
            (run_id, key, metric.step, metric.value)
            for run_id in run_ids
            for key in keys
            for metric in client.get_metric_history(run_id, key)
        ]

    frame = pd.DataFrame(
        _reading(uri, "the metric histories", read), columns=["run_id", "key", "step", "value"]
    )
    return frame.sort_values(["run_id", "key", "step"], ignore_index=True)


def download_artifact(
    run_id: str, artifact_path: str, folder: Path, tracking_uri: str | None = None
) -> Path | None:
    """Copies one artifact of a run into ``folder``; ``None`` if the run has no such artifact."""
    uri = resolve_tracking_uri(tracking_uri)
    client = _read_client(uri)

    def download() -> Path | None:
        parent = Path(artifact_path).parent
        listed = client.list_artifacts(run_id, None if parent == Path(".") else str(parent))
        if artifact_path not in {info.path for info in listed}:
            return None
        return Path(client.download_artifacts(run_id, artifact_path, str(folder)))

    return _reading(uri, f"artifact {artifact_path} of run {run_id}", download)


def log_artifacts(
    run_id: str, folder: Path, artifact_path: str, tracking_uri: str | None = None
) -> None:
    """Logs every file of ``folder`` under ``artifact_path`` of an existing run."""
    uri = resolve_tracking_uri(tracking_uri)
    client = _read_client(uri)
    try:
        client.log_artifacts(run_id, str(folder), artifact_path)
    except OSError as error:
        raise TrackingError(
            f"cannot write the artifacts of run {run_id} ({error.filename or folder}): "
            f"{error.strerror}"
        ) from None
    except Exception as error:
        raise _store_error(uri, error) from None


def find_runs(experiment: str, filter_string: str, tracking_uri: str | None = None):
    """Runs of ``experiment`` matching ``filter_string``, newest first, as a pandas DataFrame in
    ``mlflow.search_runs``'s layout (empty if the experiment does not exist)."""
    import mlflow
    import pandas as pd

    uri = resolve_tracking_uri(tracking_uri)
    client = _read_client(uri)

    def search():
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return pd.DataFrame()
        return mlflow.search_runs(
            experiment_ids=[found.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            output_format="pandas",
        )

    return _reading(uri, f"the runs of experiment {experiment!r}", search)
