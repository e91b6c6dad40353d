"""Every use of Optuna's internals, in one place: each function says what it relies on, and
``tests/test_optuna_compat.py`` checks that against the installed Optuna, so an upgrade that
changes one fails there first, naming it. Tested with Optuna 5.1.0 (pyproject.toml pins the
major).

Public Optuna has no API for what the study runner needs outside ``study.optimize``: writing a
trial's system attribute (the worker running it, why it was interrupted), failing a trial from
another process (a dead worker's), and beating a trial's heart from an ask/tell loop. These go
through the study's storage (``Study._storage``, or a running trial's ``Trial.storage``) with the
trial's storage id (``Trial._trial_id``, also on ``FrozenTrial``), calling the storage methods of
``optuna.storages.BaseStorage`` and of the heartbeat mixin (``optuna.storages._heartbeat``).
The journal file is written by the project's own append (``storage.append_records``) through a
subclass of ``JournalFileBackend`` (:func:`journal_file`).

optuna is imported only inside the functions: importing this module stays light.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: What ``study.ask()`` warns on a storage with heartbeats (they are meant for
#: ``study.optimize``); the ask/tell loop beats with :func:`record_heartbeat` and silences it.
HEARTBEAT_ASK_WARNING = "Heartbeat of storage is supposed to be used"


def _storage(study: Any) -> Any:
    """The storage behind ``study`` (``Study._storage``: for a database, Optuna's cache in
    front of its ``RDBStorage``)."""
    return study._storage


def trial_id(trial: Any) -> int:
    """The storage's id of ``trial`` (a ``Trial`` or ``FrozenTrial``): ``_trial_id``. Not its
    number: ids run across the studies of a storage."""
    return trial._trial_id


def set_system_attr(trial: Any, key: str, value: Any, study: Any = None) -> None:
    """Sets the system attribute ``key`` of ``trial`` to ``value``, as ``trial.system_attrs``
    then shows it in every process: ``trial`` an ``optuna.Trial`` this process runs, or any
    trial listed by ``study`` (a ``FrozenTrial``, running in any process; then ``study`` is
    needed). Raises ``optuna.exceptions.UpdateFinishedTrialError`` if the trial has finished.

    Relies on ``Trial.storage`` (or ``Study._storage``), ``_trial_id`` and
    ``BaseStorage.set_trial_system_attr`` (``Trial.set_system_attr``, deprecated since Optuna
    3.1, is gone)."""
    storage = trial.storage if study is None else _storage(study)
    storage.set_trial_system_attr(trial_id(trial), key, value)


def queued_params(trial: Any) -> dict[str, Any] | None:
    """The parameters ``study.enqueue_trial`` queued for ``trial`` (an ``optuna.Trial`` just
    asked), which its ``suggest_*`` calls will return whatever their range; None for a trial
    the sampler draws.

    Relies on ``enqueue_trial`` storing them as the system attribute ``fixed_params`` (which
    ``Trial`` reads back), on ``Trial.storage``, ``_trial_id`` and
    ``BaseStorage.get_trial_system_attrs``."""
    return trial.storage.get_trial_system_attrs(trial_id(trial)).get("fixed_params")


def fail_trial(study: Any, trial: Any) -> None:
    """Marks ``trial`` of ``study`` FAIL, whichever process ran it (a dead worker's trial; its
    parameters stay as they were). Raises ``optuna.exceptions.UpdateFinishedTrialError`` if it
    has finished meanwhile (another command failed it first).

    Relies on ``Study._storage``, ``_trial_id`` and ``BaseStorage.set_trial_state_values``
    (``study.tell`` with the trial's number would word that race as a ValueError, like any
    misuse)."""
    from optuna.trial import TrialState

    _storage(study).set_trial_state_values(trial_id(trial), TrialState.FAIL)


def heartbeat_interval(study: Any) -> int | None:
    """Seconds between two heartbeats of a trial of ``study``; None when its storage has no
    heartbeat (the journal, or a database opened without ``heartbeat_interval``).

    Relies on ``Study._storage`` having ``record_heartbeat`` and ``get_heartbeat_interval`` (the
    ``BaseHeartbeat`` mixin of ``RDBStorage``, passed on by Optuna's cache) exactly when it can
    beat."""
    storage = _storage(study)
    if not hasattr(storage, "record_heartbeat"):
        return None
    return storage.get_heartbeat_interval()


def record_heartbeat(study: Any, trial: Any) -> None:
    """One heartbeat for the running ``trial`` of ``study``: Optuna's stale-trial sweep
    (``optuna.storages.fail_stale_trials``) then leaves it alone for the grace period.

    Relies on ``Study._storage``, ``_trial_id`` and ``BaseHeartbeat.record_heartbeat``."""
    _storage(study).record_heartbeat(trial_id(trial))


def journal_file(path: Path, append: Callable[[bytes, Any], None]) -> Any:
    """A backend for ``optuna.storages.JournalStorage`` over the journal file ``path``, Optuna's
    own, whose appends go to ``append(records, optuna_lock)``: ``records`` the operations as
    Optuna writes them (one compact JSON object a line, each line ending in a newline),
    ``optuna_lock`` Optuna's lock of that file (``acquire()``, ``release()``), which ``append``
    must hold while it writes.

    Relies on ``JournalFileBackend(file_path, lock_obj=...)`` and on replacing its
    ``append_logs``: ``JournalStorage`` writes only through ``append_logs`` and reads through
    ``read_logs``, which reads the file itself (nothing ``append_logs`` keeps), stops without an
    error at an unterminated last line and raises ``json.JSONDecodeError`` for a damaged record
    before it; and on ``JournalFileOpenLock`` taking the same lock file (``<path>.lock``) as the
    default ``JournalFileSymlinkLock``, so plain Optuna processes on the journal wait for it."""
    return _journal_file_class()(path, append)


@functools.cache
def _journal_file_class() -> type:
    """Made on first use: optuna is imported only when a study runs."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    class JournalFile(JournalFileBackend):
        """Optuna's journal file, appended to by ``append`` (:func:`journal_file`)."""

        def __init__(self, path: Path, append: Callable[[bytes, Any], None]) -> None:
            self.path = Path(path)
            self.lock = JournalFileOpenLock(str(self.path))
            self.append = append
            super().__init__(str(self.path), lock_obj=self.lock)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            records = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
            self.append(records.encode(), self.lock)

    return JournalFile


#: The methods of ``RDBStorage`` that Optuna's cache (``_CachedStorage``, which ``create_study``
#: and ``load_study`` put in front of every ``RDBStorage``) calls on it, each one transaction
#: that either committed or did not. Retried when the connection is lost (see
#: :func:`reconnecting_rdb_storage`), ``set_trial_state_values`` with a check of its own.
RETRIED_RDB_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "_create_new_trial",
    "_set_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "_get_best_trial_id",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "_get_trials",
    "_get_stale_trial_ids",
    "set_trial_state_values",  # (with a check of its own)
)
#: What the cache calls on it and is deliberately not retried: a heartbeat beats once (its
#: thread beats again at the next interval, and must not hold the trial's end for a minute),
#: the other two read settings, not the database.
UNRETRIED_RDB_METHODS = (
    "record_heartbeat",
    "get_heartbeat_interval",
    "get_heartbeat_stale_trial_callback",
)


def reconnecting_rdb_storage(retry: Callable[[Callable[[], Any]], Any], *args, **kwargs) -> Any:
    """An ``optuna.storages.RDBStorage(*args, **kwargs)`` whose database calls go through
    ``retry(attempt)``, which calls ``attempt()`` until it returns (waiting out a database that
    restarts) or raises; ``retry`` decides which errors are worth another attempt.

    Why each retried call is safe to repeat (``RETRIED_RDB_METHODS``): reads are; attribute and
    intermediate-value writes are upserts; a parameter written twice is a duplicate key Optuna
    ignores; ``set_trial_state_values`` whose first attempt committed before the connection
    dropped would raise ``UpdateFinishedTrialError`` on its retry, so a retry that finds the
    trial already in the asked state and values returns True (a WAITING trial moved to RUNNING
    by such a lost first attempt reads as taken by another worker: Optuna asks the next one, and
    the trial, RUNNING with no worker recorded, is recovered as orphaned by
    ``liveness.recover_stale_trials`` once it is a minute old, when a study command starts).
    ``create_new_study`` repeated after a lost commit raises ``DuplicatedStudyError``, which
    ``open_study`` reads as another command's creation (its MLflow parent run is then made
    after a wait, as ``StudyTracker.elect_parent`` does for a creator that died).
    ``_create_new_trial`` cannot tell a lost commit from none: Optuna itself already retries it
    five times on any database error, so this adds nothing new; a trial created twice leaves
    one RUNNING with no worker, recovered as orphaned likewise (it does not count).

    Relies on: ``_CachedStorage`` calling exactly the methods of ``RETRIED_RDB_METHODS`` and
    ``UNRETRIED_RDB_METHODS`` on its backend; ``create_study`` and ``load_study`` wrapping any
    ``RDBStorage`` instance (a subclass too) in ``_CachedStorage``; and the semantics of
    ``set_trial_state_values`` above."""
    return _reconnecting_class()(retry, *args, **kwargs)


def _retried(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (a method of ``RDBStorage``) called through the storage's retry."""

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: original(self, *args, **kwargs))

    return method


@functools.cache
def _reconnecting_class() -> type:
    """Made on first use: optuna is imported only when a study runs."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RDBStorage

    class ReconnectingRDBStorage(RDBStorage):
        """Optuna's RDB storage whose calls wait out a lost connection
        (:func:`reconnecting_rdb_storage`)."""

        def __init__(self, retry: Callable[[Callable[[], Any]], Any], *args, **kwargs) -> None:
            self._retry = retry
            super().__init__(*args, **kwargs)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            attempts = 0

            def attempt() -> bool:
                nonlocal attempts
                attempts += 1
                try:
                    return RDBStorage.set_trial_state_values(self, trial_id, state, values)
                except UpdateFinishedTrialError:
                    if attempts == 1:
                        raise
                    # Our first attempt may have committed before its connection dropped.
                    trial = RDBStorage.get_trial(self, trial_id)
                    if trial.state == state and (values is None or trial.values == list(values)):
                        return True
                    raise

            return self._retry(attempt)

    for name in RETRIED_RDB_METHODS:
        if name not in vars(ReconnectingRDBStorage):  # (set_trial_state_values is above)
            setattr(ReconnectingRDBStorage, name, _retried(getattr(RDBStorage, name)))
    return ReconnectingRDBStorage
