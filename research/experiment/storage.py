"""Where an Optuna study lives: a journal file beside the MLflow store, or a database.

By default the study lives in a journal file beside the MLflow store (``mlruns/optuna.journal``):
Optuna's ``JournalFileBackend`` is safe for several processes on one machine and needs no schema,
so K workers started at once cannot race on creating tables. A ``--storage`` URL of a database
(``postgresql://...``, ``sqlite:///...``) uses Optuna's RDB storage with heartbeats instead: that
is how several machines share one study. The study runner and the report open storages here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from research.experiment.tracking.stores import (
    local_store_folder,
    redact,
    sqlalchemy_url,
    store_lock,
)

JOURNAL_NAME = "optuna.journal"


class StudyError(Exception):
    """A study cannot run as asked; the message says why and how to fix it."""


def default_storage_url(tracking_uri: str) -> str:
    """A journal file beside a local SQLite MLflow store, else in ``./mlruns``."""
    return str(local_store_folder(tracking_uri) / JOURNAL_NAME)


def open_storage(url: str):
    """An Optuna storage for ``url``: a database URL (RDB, with heartbeats) or a journal file."""
    import optuna

    if "://" in url:
        try:
            with store_lock(url), warnings.catch_warnings():  # (the callback is "experimental")
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    sqlalchemy_url(url),
                    heartbeat_interval=20,
                    grace_period=60,
                    # A trial whose worker stopped beating is failed and queued again (once).
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=1
                    ),
                )
        except Exception as error:
            text = str(error).strip().splitlines()
            raise StudyError(
                f"cannot open the Optuna storage {redact(url)}: {text[0] if text else error!r}; "
                "check --storage"
            ) from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open lock (O_CREAT|O_EXCL on a lock file) works on every local filesystem.
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    except OSError as error:
        raise StudyError(
            f"cannot open the Optuna journal {path}: {error.strerror}; pass --storage"
        ) from None
    return optuna.storages.JournalStorage(backend)
