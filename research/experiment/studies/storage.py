"""Where an Optuna study lives: a journal file beside the MLflow store, or a database.

By default the study lives in a journal file beside the MLflow store (``mlruns/optuna.journal``):
Optuna's ``JournalFileBackend`` is safe for several processes on one machine and needs no schema,
so K workers started at once cannot race on creating tables. A ``--storage`` URL of a database
(``postgresql://...``, ``sqlite:///...``) uses Optuna's RDB storage with heartbeats instead: that
is how several machines share one study. The study runner and the report open storages here.

A database that stops answering mid-study (a PostgreSQL restart, a network cut) is waited out:
every call of the study's storage is retried, with a one-line note, for up to
:data:`DATABASE_RETRY_SECONDS` (:class:`DatabaseRetry`), then the command stops with one line
(a :class:`StudyError`); which calls are safe to repeat is
:func:`~research.experiment.studies.optuna_compat.reconnecting_rdb_storage`'s docstring.

A journal survives a failed append (:func:`append_records`): a write cut short by a full disk is
rolled back, and a line left unterminated by a process killed mid-write is dropped before the next
append, so the records before it stay readable (Optuna's own backend appends after the cut line,
and the journal can no longer be read).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from research.experiment.studies.optuna_compat import journal_file, reconnecting_rdb_storage
from research.experiment.tracking.stores import (
    PREFLIGHT_TIMEOUT,
    connection_failure,
    connection_lost,
    local_store_folder,
    redact,
    sqlalchemy_url,
    store_lock,
)

JOURNAL_NAME = "optuna.journal"
#: Seconds between a trial's heartbeats on a database storage, and how long a silent trial lives.
HEARTBEAT_INTERVAL = 20
HEARTBEAT_GRACE = 60
#: Seconds a SQLite study database waits for another process's write lock before it gives up.
SQLITE_BUSY_SECONDS = 20
#: Seconds a study waits for a database server that stopped answering before it gives up.
DATABASE_RETRY_SECONDS = 60


class StudyError(Exception):
    """A study cannot run as asked; the message says why and how to fix it."""


class JournalWriteError(StudyError):
    """A record could not be appended to the journal (a full disk); nothing of it was kept."""


def default_storage_url(tracking_uri: str) -> str:
    """A journal file beside a local SQLite MLflow store, else in ``./mlruns``."""
    return str(local_store_folder(tracking_uri) / JOURNAL_NAME)


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds: 20 and 60, or ``$RESEARCH_HEARTBEAT_INTERVAL`` and
    ``$RESEARCH_HEARTBEAT_GRACE`` (the tests shorten them to stop a worker past its heartbeat)."""
    values = []
    for name, default in (
        ("RESEARCH_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
        ("RESEARCH_HEARTBEAT_GRACE", HEARTBEAT_GRACE),
    ):
        text = os.environ.get(name, "")
        if not text:
            values.append(default)
        elif text.isdigit() and int(text) >= 1:
            values.append(int(text))
        else:
            raise StudyError(f"{name}={text!r} is not allowed; give a whole number of seconds >= 1")
    interval, grace = values
    if grace <= interval:
        raise StudyError(
            f"RESEARCH_HEARTBEAT_GRACE ({grace} s) must be longer than RESEARCH_HEARTBEAT_INTERVAL "
            f"({interval} s), or every live trial would look stale"
        )
    return interval, grace


def database_retry_seconds() -> int:
    """How long an unreachable study database is waited for: :data:`DATABASE_RETRY_SECONDS`, or
    ``$RESEARCH_DATABASE_RETRY_SECONDS`` (0: not at all; the tests shorten it)."""
    name = "RESEARCH_DATABASE_RETRY_SECONDS"
    text = os.environ.get(name, "")
    if not text:
        return DATABASE_RETRY_SECONDS
    if not text.isdigit():
        raise StudyError(f"{name}={text!r} is not allowed; give a whole number of seconds >= 0")
    return int(text)


def _first_line(error: BaseException) -> str:
    """The driver's own words for a lost connection (the first line of the innermost error)."""
    failure = connection_failure(error) or error
    text = str(failure).strip()
    return text.splitlines()[0] if text else repr(failure)


class DatabaseRetry:
    """Calls an attempt until it returns, waiting out a study database that stopped answering
    (:func:`~research.experiment.tracking.stores.connection_lost`): again after 0.5, 1, 2 and
    4 s, then every 5 s, for up to ``seconds`` from the first failure, then a
    :class:`StudyError`. One note goes to stderr when a second attempt fails too (a blip, such
    as a pooled connection the server dropped, is retried quietly). Once it has given up it
    waits no more until the database answers again: the calls that follow (giving the running
    trial back) fail at once. Any other error is raised as it is."""

    def __init__(self, url: str, seconds: int) -> None:
        self.url = url
        self.seconds = seconds
        self.outage_started: float | None = None

    def __call__(self, attempt: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                result = attempt()
            except Exception as error:
                if isinstance(error, StudyError) or not connection_lost(error):
                    raise  # (a StudyError: an inner call gave up already)
                failures += 1
                self._wait(error, failures)
                continue
            self.outage_started = None
            return result

    def _wait(self, error: BaseException, failures: int) -> None:
        now = time.monotonic()
        if self.outage_started is None:
            self.outage_started = now
        waited = now - self.outage_started
        if waited >= self.seconds:
            raise StudyError(
                f"the Optuna database {redact(self.url)} has not answered for {waited:.0f} s "
                f"({_first_line(error)}); no finished trial is lost: run the same command again "
                "once it answers, to continue the study (RESEARCH_DATABASE_RETRY_SECONDS sets "
                "how long to wait)"
            ) from None
        if failures == 2:
            print(
                f"note: the Optuna database {redact(self.url)} is unreachable "
                f"({_first_line(error)}); retrying for up to {self.seconds} s",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(min(0.5 * 2 ** (failures - 1), 5.0, self.seconds - waited))


def check_storage(url: str, tracking_uri: str) -> None:
    """Refuses a ``--storage`` that cannot hold a study, before anything is written to it: a
    folder or device instead of a journal file, or the MLflow tracking database itself."""
    if "://" not in url:
        path = Path(url)
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise StudyError(
                f"--storage {url} is {kind}; give a journal file path (e.g. "
                f"{path / JOURNAL_NAME if path.is_dir() else 'mlruns/' + JOURNAL_NAME}) or a "
                "database URL"
            )
        return
    if _same_database(url, tracking_uri):
        raise StudyError(
            f"--storage {redact(url)} is the MLflow tracking database; Optuna's tables must not "
            "go into it: give another database (or a journal file path)"
        )


def _same_database(a: str, b: str) -> bool:
    from sqlalchemy.engine import make_url

    if "://" not in b:
        return False
    try:
        first, second = make_url(sqlalchemy_url(a)), make_url(sqlalchemy_url(b))
    except Exception:
        return False
    if first.get_backend_name() != second.get_backend_name():
        return False
    if first.get_backend_name() == "sqlite":
        return bool(first.database) and (
            Path(first.database).resolve() == Path(second.database or "").resolve()
        )
    return (first.host, first.port or 5432, first.database) == (
        second.host,
        second.port or 5432,
        second.database,
    )


def open_storage(url: str):
    """An Optuna storage for ``url``: a database URL (RDB, with heartbeats) or a journal file."""
    import optuna

    if "://" in url:
        try:
            storage = _open_database(url)
        except StudyError:
            raise
        except Exception as error:
            text = str(error).strip().splitlines()
            raise locked_database(error, url) or StudyError(
                f"cannot open the Optuna storage {redact(url)}: {text[0] if text else error!r}; "
                "check --storage"
            ) from None
        if url.startswith("sqlite:"):
            _write_ahead_log(url)
        return storage
    path = Path(url)
    if path.exists() and not path.is_file():
        raise StudyError(f"the Optuna journal {path} is not a regular file; pass --storage")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = journal_file(path, functools.partial(append_records, path))
    except OSError as error:
        raise StudyError(
            f"cannot open the Optuna journal {path}: {error.strerror}; pass --storage"
        ) from None
    try:
        return optuna.storages.JournalStorage(backend)  # (reads the whole journal)
    except json.JSONDecodeError as error:
        raise damaged_journal(path, error) from None


#: Database URLs this process has opened: one that stops answering later is waited for (a first
#: open fails at once: a wrong --storage is likelier than an outage).
_OPENED: set[str] = set()


def _open_database(url: str):
    """Optuna's RDB storage for ``url``, with heartbeats. A server's (not SQLite's) waits out a
    lost connection (:class:`DatabaseRetry`), checks a pooled connection before using it, and
    gives up connecting after :data:`PREFLIGHT_TIMEOUT` seconds."""
    import optuna

    interval, grace = heartbeat_settings()

    def rdb_storage(kind: Callable[..., Any], engine_kwargs: dict[str, Any]):
        with store_lock(url), warnings.catch_warnings():  # (the callback is "experimental")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return kind(
                sqlalchemy_url(url),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace,
                # A trial whose worker stopped beating is failed and queued again (up to 3
                # times: parameters that kill every worker they run on must end).
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )

    if url.startswith("sqlite:"):
        return rdb_storage(
            optuna.storages.RDBStorage, {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}}
        )
    retry = DatabaseRetry(url, database_retry_seconds())
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": PREFLIGHT_TIMEOUT}
    kind = functools.partial(reconnecting_rdb_storage, retry)
    opening = functools.partial(rdb_storage, kind, engine_kwargs)
    storage = retry(opening) if url in _OPENED else opening()
    _OPENED.add(url)
    return storage


def _write_ahead_log(url: str) -> None:
    """Puts a SQLite study database in write-ahead-log mode (kept in the file), where readers
    never block a writer: a worker stopped mid-read (SIGSTOP, a paused VM) then no longer locks
    every other worker out. Only a worker stopped inside a write transaction (milliseconds) can;
    :func:`locked_database` words that case. Best effort: a database in use stays as it is."""
    import sqlite3

    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:
        return  # (open_storage words a bad URL)
    if not database or database == ":memory:" or not Path(database).is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=1)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:
        pass


def locked_database(error: BaseException, url: str) -> StudyError | None:
    """The one-line error for a SQLite study database whose write lock another process held past
    :data:`SQLITE_BUSY_SECONDS` (a worker stopped mid-write, a hung disk), else None."""
    cause: BaseException | None = error
    while cause is not None:
        if "database is locked" in str(cause):
            return StudyError(
                f"the Optuna database {redact(url)} stayed locked for {SQLITE_BUSY_SECONDS} s: "
                "another process holds its write lock (a worker stopped with Ctrl-Z or SIGSTOP, "
                "or a hung disk); resume or end that process and run the command again (studies "
                "whose workers may stop are safer in PostgreSQL)"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def damaged_journal(path: Path | str, error: Exception) -> StudyError:
    """A journal record that is not JSON: one cut short by a version before :func:`append_records`
    on a full disk, with the next record written after it on the same line."""
    return StudyError(
        f"the Optuna journal {path} holds a damaged record ({error}): a record cut short, "
        "which versions before 2026-11-29 could leave on a full disk, with the next one "
        'written after it on the same line; delete the cut part (up to the next {"op_code"'
        ") on that line, or pass another --storage"
    )


def append_records(path: Path, records: bytes, optuna_lock: Any) -> None:
    """Appends ``records`` (whole lines) to the journal ``path``, safe against a failed or
    cut-short append: how the journal of :func:`open_storage` writes (through
    :func:`~research.experiment.studies.optuna_compat.journal_file`).

    It holds two locks: an ``flock`` on a sidecar file, which the kernel releases when its
    holder dies and which no one can steal from a holder that is merely stopped (Optuna's own
    lock file is broken after 30 s, and a writer resuming after that would write over the
    records appended meanwhile), and ``optuna_lock``, Optuna's lock file, so that plain Optuna
    processes on the same journal wait too. Under them it drops an unterminated last line (a
    writer killed mid-write), appends the records unbuffered with ``O_APPEND``, and if the write
    fails (``ENOSPC``, ``EFBIG``, ``EIO``) truncates the file back to its size before the append
    and raises :class:`JournalWriteError`: the journal holds whole records only, and the
    operation simply did not happen. A record written whole whose ``fsync`` fails stays (readers
    may have read it already); the error is raised all the same.
    """
    import fcntl

    try:
        held = open(path.with_name(path.name + ".flock"), "a")  # closing it releases the flock
    except OSError as error:
        raise journal_error(path, error) from None
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            optuna_lock.acquire()
        except OSError as error:
            raise journal_error(path, error) from None
        try:
            _append(path, records)
        finally:
            optuna_lock.release()
    finally:
        held.close()


def _append(path: Path, records: bytes) -> None:
    with open(path, "r+b", buffering=0) as journal:
        end = _whole_records_end(journal)
        if end != journal.seek(0, os.SEEK_END):
            try:
                journal.truncate(end)  # a record cut short: never whole, never read
            except OSError as error:
                raise journal_error(path, error) from None
    with open(path, "ab", buffering=0) as journal:
        start = os.fstat(journal.fileno()).st_size
        try:
            view = memoryview(records)
            while view:
                view = view[journal.write(view) :]
        except OSError as error:
            # Shrinking needs no free space: leave the file as it was before this append.
            if os.fstat(journal.fileno()).st_size >= start:
                with contextlib.suppress(OSError):
                    journal.truncate(start)
            raise journal_error(path, error) from None
        try:
            os.fsync(journal.fileno())
        except OSError as error:
            raise journal_error(path, error) from None


def journal_error(path: Path, error: OSError) -> JournalWriteError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    why = "the disk is full" if full else (error.strerror or repr(error))
    return JournalWriteError(
        f"cannot write to the Optuna journal {path}: {why}; nothing of the failed record was "
        "kept, so free some space and run the same command again to continue the study"
    )


def _whole_records_end(journal: Any) -> int:
    """The offset just past the journal's last newline (0 if it has none): where the next
    record goes. Anything after it is a record cut short, never complete, so it is dropped."""
    size = journal.seek(0, os.SEEK_END)
    position = size
    while position > 0:
        start = max(0, position - 65536)
        journal.seek(start)
        chunk = journal.read(position - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0
