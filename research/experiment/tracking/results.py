"""Reading runs and studies back from the tracking store: one run for ``rerun``
(:func:`read_run`), studies for ``analysis/`` (which never trains).

Everything returned is plain data (records, pandas DataFrames in ``mlflow.search_runs``'s layout,
files); a store that cannot be read is one :class:`TrackingError` naming it and the cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from research.experiment.tracking.runs import (
    LEGACY_DIVERGED_TAG,
    SEARCH_SPACE,
    TAG_ERROR,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
)
from research.experiment.tracking.stores import (
    TrackingError,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    store_error,
)


@dataclass(frozen=True)
class StudyRecord:
    """A study as the tracking store knows it: its experiment and its parent run."""

    name: str
    experiment_id: str
    parent_run_id: str
    last_active_ms: int  # the latest start or end time of its parent run


def check_store_exists(uri: str) -> None:
    """TrackingError if ``uri`` is a local SQLite store that is not there: reading a store must
    not create a new empty one (nor its folder) at a mistyped path."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise TrackingError(
                f"there is no tracking store at {path}; pass --tracking-uri (or set "
                "MLFLOW_TRACKING_URI) to the store your runs were logged to, e.g. "
                "sqlite:///mlruns/mlflow.db"
            )


def _read_client(uri: str):
    """A client for reading an existing store (:func:`check_store_exists`)."""
    check_store_exists(uri)
    return mlflow_client(uri)


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
        raise store_error(uri, error) from None


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


def search_space(record: StudyRecord, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The study's search space as data: one mapping per searched field, in the study file's
    keys (``name``, ``type``, ``low``, ``high``, ``log``, ``step`` or ``choices``).

    From the parent run's ``study/search_space.json``; for studies logged before it existed,
    from the ``[search]`` tables of the study file logged beside it (``study/<file>.toml``),
    normalized as the study normalized them (``l2`` choices ``[0, 1e-4]`` are floats). Empty if
    the study recorded neither.
    """
    import json
    import tempfile
    import tomllib

    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        path = download_artifact(record.parent_run_id, SEARCH_SPACE, Path(folder), uri)
        if path is not None:
            return json.loads(path.read_text())
        client = _read_client(uri)
        params = _reading(
            uri,
            f"study {record.name!r}",
            lambda: client.get_run(record.parent_run_id).data.params,
        )
        study_file = params.get("study_file")
        path = study_file and download_artifact(
            record.parent_run_id, f"study/{study_file}", Path(folder), uri
        )
        if not path:
            return []
        tables = tomllib.loads(path.read_text()).get("search", {})
    return [_as_searched(name, table) for name, table in tables.items()]


def _as_searched(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """A ``[search.<name>]`` table as SearchParam.as_dict() gives it; as it is, if the field
    table no longer accepts it (a field since removed, say)."""
    from research.experiment.config.fields import ConfigError
    from research.experiment.config.search_space import SearchParam

    try:
        options = {key: value for key, value in table.items() if key != "type"}
        return SearchParam(name, table.get("type"), **options).as_dict()
    except (ConfigError, TypeError):
        return {"name": name, **table}


# --- one run, for rerun ------------------------------------------------------------------------


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
