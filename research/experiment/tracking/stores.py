"""Where the MLflow store is, clients, locks, and what goes wrong with a store.

The store defaults to MLflow's SQLite backend inside ``./mlruns`` (``mlruns/mlflow.db``) with
artifacts under ``mlruns/artifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` overrides it.
Everything goes through an explicit ``MlflowClient`` rather than MLflow's global active run, so
several runs (a study's parent and its trials) can be open at once without surprises.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

DEFAULT_STORE_DIR = Path("mlruns")


class TrackingError(Exception):
    """The tracking store cannot be opened or written; the message says which and why."""


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
            raise store_error(uri, error) from None


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


def mlflow_client(uri: str):
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # MLflow and alembic announce every schema step of a new SQLite store at INFO; users need none.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # It also logs every failed query as an ERROR with a full traceback (a full disk: dozens of
    # lines) before raising; we turn what it raises into one line (write_error, store_error).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Its per-download progress bar would break into our own progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet_psycopg_pipelines()

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


def quiet_psycopg_pipelines() -> None:
    """Drops psycopg's warning "error ignored terminating <psycopg.Pipeline ...>: pipeline
    aborted", and only it. psycopg runs a batch insert (``executemany``) in a pipeline; when a
    row fails there, it raises that error to the caller, and, now and then (about one time in
    ten under PostgreSQL 15), also fails to close the pipeline, which it logs as that warning.
    MLflow's SQL store inserts duplicate rows on purpose and handles the error (logging a model
    of a run re-inserts the run's metrics: every study's final fit), so the line said nothing
    and appeared on stderr of successful commands. The error itself is never hidden."""
    import logging

    logger = logging.getLogger("psycopg")
    if not any(isinstance(f, _PipelineNoise) for f in logger.filters):
        logger.addFilter(_PipelineNoise())


class _PipelineNoise:
    """The logging filter of :func:`quiet_psycopg_pipelines`."""

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith("error ignored terminating")


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


def store_error(uri: str, error: Exception) -> TrackingError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else repr(error)
    if (reason := unreachable(uri, error)) is not None:
        first_line = f"it is unreachable ({reason})"
    return TrackingError(
        f"cannot open the MLflow tracking store {redact(uri)}: {first_line}; "
        "check --tracking-uri / MLFLOW_TRACKING_URI"
    )


@contextlib.contextmanager
def store_writes(uri: str):
    """Turns any failure of the store at ``uri`` inside the block (a full disk under SQLite, a
    server gone) into one TrackingError naming it: MLflow raises many kinds, with long texts."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as error:
        raise write_error(uri, error) from None


def write_error(uri: str, error: Exception) -> TrackingError:
    """A write to an open store failed (a full disk, a database or server gone): one line."""
    if (down := unreachable_error(uri, error)) is not None:
        return down
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else repr(error)
    if "disk is full" in text or "No space left" in text:
        first_line = "the disk is full"
    return TrackingError(
        f"cannot write to the MLflow tracking store {redact(uri)}: {first_line}; free some space "
        "(or fix the store), then run the same command again to continue"
    )


def unreachable_error(uri: str, error: BaseException) -> TrackingError | None:
    """The one line for a tracking server or database that stopped answering (``error``, from
    MLflow, says it could not connect or lost the connection), else None: it names the store
    and says so, instead of the full-disk advice of :func:`write_error`."""
    reason = unreachable(uri, error)
    if reason is None:
        return None
    kind = "server" if uri.lower().startswith(("http://", "https://")) else "database"
    return TrackingError(
        f"the MLflow tracking {kind} {redact(uri)} is unreachable ({reason}); start it again "
        "(or check --tracking-uri / MLFLOW_TRACKING_URI), then run the same command again"
    )


def unreachable(uri: str, error: BaseException) -> str | None:
    """Why the store at ``uri`` (a server or a database server; never a SQLite file, whose
    OperationalError is a full disk or a lock) is unreachable, if ``error`` says it is: a
    refused, reset or timed-out HTTP connection (MLflow words them as "API request to ...
    failed with exception ...", raised while handling the ``requests`` error), or a database
    connection lost or refused (:func:`connection_lost`). None otherwise."""
    import re

    if uri.startswith("sqlite:") or "://" not in uri:
        return None
    if uri.lower().startswith(("http://", "https://")):
        failure = _first_in_chain(error, _http_connection_failure)
    else:
        failure = connection_failure(error)
    if failure is None:
        return None
    text = str(failure)
    errno_text = re.search(r"\[Errno -?\d+\] ([^\"')(]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    if "Remote end closed connection" in text or "Connection aborted" in text:
        return "the server closed the connection"
    if answered := re.search(r"too many \d+ error responses", text):
        return answered.group(0)
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(failure).__name__


def _http_connection_failure(error: BaseException) -> bool:
    """A connection that could not be made, was reset or timed out (``requests``, ``urllib3``
    or the standard library's own)."""
    names = {kind.__module__.split(".")[0] + "." + kind.__name__ for kind in type(error).__mro__}
    return isinstance(error, ConnectionError | TimeoutError) or bool(
        names
        & {
            "requests.ConnectionError",
            "requests.Timeout",
            "requests.RetryError",  # (a server that kept answering 502, 503 or 504)
            "urllib3.NewConnectionError",
            "urllib3.MaxRetryError",
            "urllib3.ProtocolError",
        }
    )


def connection_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) says a database server could not be
    reached or dropped the connection: a PEP 249 ``OperationalError`` or ``InterfaceError``
    (PostgreSQL's "connection refused", "terminating connection due to administrator
    command", "server closed the connection unexpectedly"), which SQLAlchemy and Optuna wrap
    in errors of their own. Not a bad query, a constraint or a missing row: those would fail
    the same way again. (Under SQLite an OperationalError is a lock or a full disk: callers
    ask only of database servers.)"""
    return connection_failure(error) is not None


def connection_failure(error: BaseException) -> BaseException | None:
    """The innermost error of ``error``'s chain that says a database connection failed
    (:func:`connection_lost`; its text is the driver's own words), else None."""
    found = None
    for cause in _chain(error):
        names = {kind.__name__ for kind in type(cause).__mro__}
        if getattr(cause, "connection_invalidated", False) or names & {
            "OperationalError",
            "InterfaceError",
        }:
            found = cause
    return found


def _first_in_chain(error: BaseException, test: Any) -> BaseException | None:
    return next((cause for cause in _chain(error) if test(cause)), None)


def _chain(error: BaseException) -> list[BaseException]:
    """``error``, what it was raised from, and so on (not past a ``raise ... from None``)."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        if cause.__cause__ is not None or cause.__suppress_context__:
            cause = cause.__cause__
        else:
            cause = cause.__context__
    return chain
