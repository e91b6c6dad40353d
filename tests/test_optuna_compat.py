"""The contracts of ``research/experiment/studies/optuna_compat.py`` with the installed Optuna.

Each function there uses an Optuna internal; each test here checks, against real storages (a
journal file and a SQLite database in a temporary folder), the behaviour the study runner relies
on. An Optuna upgrade that changes one fails here first, with the function's name in the test's.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from research.experiment.studies.optuna_compat import (
    HEARTBEAT_ASK_WARNING,
    fail_trial,
    heartbeat_interval,
    journal_file,
    record_heartbeat,
    set_system_attr,
    trial_id,
)
from research.experiment.studies.storage import open_storage


def storage_url(tmp_path: Path, kind: str) -> str:
    """The project's journal file, or a SQLite database with heartbeats (as ``--storage``)."""
    return str(tmp_path / "optuna.journal") if kind == "journal" else f"sqlite:///{tmp_path}/o.db"


def ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", HEARTBEAT_ASK_WARNING)
        return study.ask()


def locked_append(path: Path, appended: list[bytes], locks: list):
    """An ``append`` for :func:`journal_file` that writes the records as they come, under
    Optuna's lock, and keeps them and the lock."""

    def append(records: bytes, optuna_lock) -> None:
        locks.append(optuna_lock)
        optuna_lock.acquire()
        try:
            with open(path, "ab") as journal:
                journal.write(records)
            appended.append(records)
        finally:
            optuna_lock.release()

    return append


def reloaded(url: str, name: str = "s") -> optuna.Study:
    """The study as another process sees it: a new storage over the same file."""
    return optuna.load_study(study_name=name, storage=open_storage(url))


@pytest.fixture(params=["journal", "sqlite"])
def url(request, tmp_path) -> str:
    return storage_url(tmp_path, request.param)


# --- a trial's storage id, its system attributes, its state ---------------------------------------


def test_trial_id_is_the_storage_id_of_a_trial_and_of_its_frozen_copy(url):
    storage = open_storage(url)
    first = optuna.create_study(study_name="first", storage=storage)
    second = optuna.create_study(study_name="s", storage=storage)
    ask(first)
    trial = ask(second)
    assert isinstance(trial_id(trial), int)
    (frozen,) = second.get_trials(deepcopy=False)
    assert trial_id(frozen) == trial_id(trial)
    # ids run across the storage's studies: not the trial's number
    assert trial.number == 0 and trial_id(trial) != trial_id(first.trials[0])


def test_set_system_attr_writes_a_running_trials_attribute_for_every_process(url):
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    trial = ask(study)
    set_system_attr(trial, "research:worker", "host:1:2")  # the trial this process runs
    sweeper = reloaded(url)  # another command, as recover_stale_trials runs
    (listed,) = sweeper.get_trials(deepcopy=False)
    set_system_attr(listed, "research:interrupted", "why", study=sweeper)  # a FrozenTrial
    (seen,) = reloaded(url).trials
    assert seen.system_attrs["research:worker"] == "host:1:2"
    assert seen.system_attrs["research:interrupted"] == "why"
    study.tell(trial, state=TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        set_system_attr(trial, "research:interrupted", "too late")
    with pytest.raises(UpdateFinishedTrialError):
        set_system_attr(listed, "research:interrupted", "too late", study=reloaded(url))


def test_fail_trial_fails_another_processs_running_trial_once(url):
    worker = optuna.create_study(study_name="s", storage=open_storage(url))
    trial = ask(worker)
    trial.suggest_int("x", 1, 9)
    sweeper = reloaded(url)  # another command, as recover_stale_trials runs
    (running,) = sweeper.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    fail_trial(sweeper, running)
    (failed,) = reloaded(url).trials
    assert failed.state == TrialState.FAIL and failed.params == trial.params
    # the race with another command that failed it first: told apart, not a second FAIL
    with pytest.raises(UpdateFinishedTrialError):
        fail_trial(reloaded(url), running)


# --- heartbeats -----------------------------------------------------------------------------------


def test_heartbeat_interval_is_the_databases_and_none_without_heartbeats(tmp_path, monkeypatch):
    journal = optuna.create_study(storage=open_storage(storage_url(tmp_path, "journal")))
    assert heartbeat_interval(journal) is None
    monkeypatch.setenv("RESEARCH_HEARTBEAT_INTERVAL", "7")
    monkeypatch.setenv("RESEARCH_HEARTBEAT_GRACE", "30")
    beating = optuna.create_study(storage=open_storage(storage_url(tmp_path, "sqlite")))
    assert heartbeat_interval(beating) == 7
    silent = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/silent.db")
    assert heartbeat_interval(optuna.create_study(storage=silent)) is None


def test_asking_with_heartbeats_warns_as_heartbeat_ask_warning_says(tmp_path):
    study = optuna.create_study(storage=open_storage(storage_url(tmp_path, "sqlite")))
    with pytest.warns(UserWarning, match=HEARTBEAT_ASK_WARNING):
        study.ask()  # (run_next_trial silences exactly this warning)


def test_record_heartbeat_keeps_a_trial_from_the_stale_trial_sweep(tmp_path):
    with warnings.catch_warnings():  # (heartbeats are "experimental")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{tmp_path}/o.db", heartbeat_interval=1, grace_period=1
        )
    study = optuna.create_study(storage=storage)
    stopped, beating, never = ask(study), ask(study), ask(study)
    record_heartbeat(study, stopped)
    record_heartbeat(study, beating)
    time.sleep(2.5)  # past the grace period (SQLite's clock counts whole seconds)
    record_heartbeat(study, beating)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    # a trial that never beat is not stale to Optuna (liveness recovers it as orphaned)
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    assert [stopped.number, beating.number, never.number] == [0, 1, 2]


# --- the journal file -----------------------------------------------------------------------------


def test_journal_file_writes_only_through_append_whole_lines_under_optunas_lock(tmp_path):
    path = tmp_path / "optuna.journal"
    appended: list[bytes] = []
    append = locked_append(path, appended, [])
    storage = optuna.storages.JournalStorage(journal_file(path, append))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"x": 1})
    trial = study.ask()
    study.tell(trial, trial.suggest_int("x", 1, 9))
    assert len(appended) >= 4 and path.read_bytes() == b"".join(appended)
    for records in appended:
        lines = records.split(b"\n")
        assert lines[-1] == b"" and all(isinstance(json.loads(line), dict) for line in lines[:-1])
    # what plain Optuna reads, and what it appends is read back through the same storage
    plain = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    assert optuna.load_study(study_name="s", storage=plain).best_value == 1
    optuna.load_study(study_name="s", storage=plain).enqueue_trial({"x": 2})
    assert [t.params.get("x") for t in study.get_trials()] == [1, None]
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == [{"x": 1}, {"x": 2}]


def test_journal_file_reading_skips_a_cut_last_line_and_raises_on_a_damaged_record(tmp_path):
    path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)))
    study.enqueue_trial({"x": 1})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":5,"worker_id":"w","datetime_comp')
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.system_attrs["fixed_params"] for t in again.get_trials()] == [{"x": 1}]
    first, rest = whole.split(b"\n", 1)
    path.write_bytes(first[: len(first) // 2] + first + b"\n" + rest)
    with pytest.raises(json.JSONDecodeError):
        optuna.storages.JournalStorage(journal_file(path, lambda records, lock: None))


def test_journal_files_lock_makes_a_plain_optuna_writer_wait(tmp_path):
    path = tmp_path / "optuna.journal"
    locks: list = []
    storage = optuna.storages.JournalStorage(journal_file(path, locked_append(path, [], locks)))
    optuna.create_study(study_name="s", storage=storage)
    lock = locks[0]
    plain = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    lock.acquire()
    try:
        writer = threading.Thread(target=lambda: optuna.create_study(study_name="p", storage=plain))
        writer.start()
        writer.join(timeout=1)
        assert writer.is_alive(), "a plain Optuna append did not wait for the journal's lock"
    finally:
        lock.release()
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert optuna.get_all_study_names(plain) == ["s", "p"]


# --- public, but what the search-space check relies on --------------------------------------------


def test_check_distribution_compatibility_refuses_another_kind():
    from optuna.distributions import (
        CategoricalDistribution,
        IntDistribution,
        check_distribution_compatibility,
    )

    with pytest.raises(ValueError, match="different distribution kind"):
        check_distribution_compatibility(IntDistribution(16, 32), CategoricalDistribution([16, 32]))
