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
