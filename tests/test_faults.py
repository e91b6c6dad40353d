"""Faults that used to lose trials or leave runs RUNNING, each caused for real: a full disk under
the Optuna journal and under the MLflow store (a tmpfs of a few KB or MB), a reused process id (a
study run as process 1 of a new PID namespace, as in a container), a worker on "another host"
(a UTS namespace with its own hostname) killed with SIGKILL, a worker stopped with SIGSTOP past
its heartbeat, a search space changed under an existing study, SIGTERM to a study with two
workers, a final refit that diverges or is interrupted, and a loss that explodes yet stays
finite. The Optuna internals the study runner relies on are pinned in test_optuna_compat.py.

Mounting a tmpfs and entering namespaces needs root (CI runs as root); elsewhere these tests fail
with a clear message unless ``RESEARCH_NO_ROOT=1`` is set, which skips them (the skips show).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from test_reliability import ENV, read_until, study_argv
from test_study import (
    MNIST_MLP,
    STUDY,
    load_optuna_study,
    run_cli,
    sqlite_uri,
    study_runs,
)

from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF
from research.experiment.studies.trials import counted_trials

TRACEBACK = "Traceback (most recent call last)"


def need_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("RESEARCH_NO_ROOT") == "1":
        pytest.skip("needs root (a tmpfs mount, namespaces); RESEARCH_NO_ROOT=1 set")
    pytest.fail(
        "this test needs root to mount a tmpfs or enter namespaces; RESEARCH_NO_ROOT=1 skips"
    )


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real small filesystem at ``folder``: writes past ``size`` fail with ENOSPC."""
    need_root()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def grow(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def one_error_line(err: str) -> str:
    """The command's stderr is exactly one ``error:`` line (no traceback); returns it."""
    assert TRACEBACK not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def no_run_left_running(uri: str, name: str = STUDY) -> None:
    parents, children = study_runs(uri, name)
    running = [r.info.run_name for r in parents + children if r.info.status == "RUNNING"]
    assert not running, running


def finished(study) -> dict[int, tuple]:
    """The finished trials (not interrupted ones) as (state, value, params, intermediates)."""
    return {
        t.number: (t.state.name, t.value, t.params, t.intermediate_values)
        for t in study.get_trials()
        if t.state.name in ("COMPLETE", "PRUNED") and ATTR_INTERRUPTED not in t.system_attrs
    }


def journal_study(path: Path, name: str = STUDY):
    import optuna

    from research.experiment.studies.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(path)))


def spawn(
    argv: list[str], cwd: Path, env: dict[str, str] = ENV, prefix: tuple[str, ...] = ()
) -> subprocess.Popen:
    """``python -m research ...`` as its own process (text pipes), after ``prefix`` (a
    namespace to run it in)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "research", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def command(argv: list[str], cwd: Path, env: dict[str, str] = ENV) -> tuple[int, str, str]:
    """``python -m research ...`` as its own process, to its end, as a real command runs."""
    with spawn(argv, cwd, env) as process:
        out, err = process.communicate(timeout=600)
    return process.returncode, out, err


# --- 1. a full disk under the Optuna journal -----------------------------------------------------


def test_a_cut_short_last_record_is_dropped_before_the_next_append(tmp_path):
    """A writer killed mid-append (or an older version on a full disk) leaves an unterminated
    last line; the next append must not glue its record to it."""
    import optuna

    from research.experiment.studies.storage import open_storage

    path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="cut", storage=open_storage(str(path)))
    study.enqueue_trial({"x": 1})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":5,"worker_id":"w","datetime_complete":"20')
    study = optuna.load_study(study_name="cut", storage=open_storage(str(path)))
    study.enqueue_trial({"x": 2})
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert path.read_bytes().startswith(whole)
    again = optuna.load_study(study_name="cut", storage=open_storage(str(path)))
    assert [t.system_attrs["fixed_params"] for t in again.get_trials()] == [{"x": 1}, {"x": 2}]


def test_a_journal_damaged_by_an_older_version_is_one_line_saying_how_to_repair_it(tmp_path):
    """Before the fix, a full disk left a record cut short and the next one glued to it."""
    import optuna

    from research.experiment.studies.storage import open_storage

    journal = tmp_path / "mlruns" / "optuna.journal"
    journal.parent.mkdir()
    optuna.create_study(study_name=STUDY, storage=open_storage(str(journal)))
    record = journal.read_bytes().rstrip(b"\n")
    journal.write_bytes(record[: len(record) // 2] + record + b"\n")
    code, out, err = run_cli(study_argv(sqlite_uri(tmp_path), n_trials=1, epochs=1))
    assert code == 2, out + err
    line = one_error_line(err)
    assert f"the Optuna journal {journal} holds a damaged record" in line, line
    assert 'delete the cut part (up to the next {"op_code") on that line' in line, line


def test_a_stopped_journal_writer_is_waited_for_not_overwritten(tmp_path):
    """A writer holding the journal's kernel lock (as one stopped mid-append by SIGSTOP does)
    makes the others wait: Optuna's own lock file would be broken after 30 s and the stopped
    writer, resuming, would cut off what was appended meanwhile."""
    import fcntl
    import threading

    import optuna

    from research.experiment.studies.storage import open_storage

    path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="wait", storage=open_storage(str(path)))
    with (tmp_path / "optuna.journal.flock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = threading.Thread(target=lambda: study.enqueue_trial({"x": 1}))
        writer.start()
        writer.join(timeout=2)
        assert writer.is_alive(), "the append did not wait for the lock's holder"
    writer.join(timeout=30)
    assert not writer.is_alive()
    again = optuna.load_study(study_name="wait", storage=open_storage(str(path)))
    assert [t.system_attrs["fixed_params"] for t in again.get_trials()] == [{"x": 1}]


@pytest.mark.slow
def test_a_full_disk_under_the_journal_loses_nothing_and_the_study_resumes(tmp_path):
    """The journal on an 8 KB tmpfs: the study stops with one line about the full disk, every
    line of the journal stays a whole record, and once the disk grows the same command finishes
    the study with every earlier trial intact."""
    uri = sqlite_uri(tmp_path)
    with tmpfs(tmp_path / "small", "8k") as small:
        journal = small / "optuna.journal"
        argv = [*study_argv(uri, n_trials=6, epochs=1, subset=500), "--storage", str(journal)]
        code, out, err = command(argv, tmp_path)
        assert code == 2, out + err
        line = one_error_line(err)
        assert f"cannot write to the Optuna journal {journal}: the disk is full" in line, line
        records = journal.read_bytes().split(b"\n")
        assert records[-1] == b"" and all(json.loads(record) for record in records[:-1])
        before = finished(journal_study(journal))
        assert before, "the disk filled before any trial finished: make the tmpfs larger"

        grow(small, "1m")
        for _ in range(2):
            code, out, err = command(argv, tmp_path)
            assert code == 0, out + err
        study = journal_study(journal)
        after = finished(study)
        assert {n: after[n] for n in before} == before  # every earlier trial, as it was
        assert counted_trials(study) == 6
        assert not [t for t in study.get_trials() if t.state.name == "RUNNING"]
        no_run_left_running(uri)


# --- 4. a full disk under the MLflow tracking store ----------------------------------------------


def fill(folder: Path, leave_kb: int) -> Path:
    """A file that takes all but ``leave_kb`` KB of the filesystem at ``folder``."""
    stats = os.statvfs(folder)
    free_kb = stats.f_bavail * stats.f_frsize // 1024
    filler = folder / "filler"
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(0, free_kb - leave_kb) * 1024)
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("size", ["1m", "3m", "database"])
def test_a_full_tracking_store_stops_with_one_line_and_the_trial_is_queued_again(tmp_path, size):
    """The MLflow SQLite store and its artifacts on a tmpfs too small for a study (1 or 3 MB:
    the artifacts fill it; "database": the store was made, then the disk filled to 4 KB, so the
    database's own writes fail): exit 2 with one line naming the store, any trial that was
    running FAIL but interrupted (not counted) and queued again; on a larger disk the same
    command finishes the study, with no run left RUNNING."""
    with tmpfs(tmp_path / "store", "16m" if size == "database" else size) as store:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        journal = tmp_path / "optuna.journal"
        argv = [*study_argv(uri, n_trials=2, epochs=1, subset=500), "--storage", str(journal)]
        if size == "database":
            code, out, err = command([*argv, "--n-trials", "1"], tmp_path)
            assert code == 0, out + err
            fill(store, leave_kb=4)
        code, out, err = command(argv, tmp_path)
        assert code == 2, out + err
        line = one_error_line(err)
        assert str(store) in line and re.search("free (some )?space", line), line
        study = journal_study(journal)
        failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
        assert all(ATTR_INTERRUPTED in t.system_attrs for t in failed)  # (none if it stopped
        # before a trial began: the database filled while reopening the parent run)
        assert counted_trials(study) == len(finished(study))
        queued = [t for t in study.get_trials() if t.state.name == "WAITING"]
        assert [t.user_attrs[ATTR_RETRY_OF] for t in queued] == [t.number for t in failed]

        grow(store, "64m")
        with contextlib.suppress(FileNotFoundError):
            (store / "filler").unlink()
        code, out, err = command(argv, tmp_path)
        assert code == 0, out + err
        study = journal_study(journal)
        assert counted_trials(study) == 2
        no_run_left_running(uri)


# --- 2. a reused process id ----------------------------------------------------------------------


def as_process_one(argv: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m research ...`` as process 1 of a new PID namespace (as in a container)."""
    need_root()
    return spawn(argv, cwd, prefix=("unshare", "-p", "-f", "--mount-proc"))


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.mark.slow
def test_a_dead_worker_is_not_taken_for_alive_when_its_pid_is_reused(tmp_path):
    """Run as process 1 and killed with SIGKILL, then run again as process 1 (a container
    restarted after an out-of-memory kill): the second run must see the first is gone."""
    uri = sqlite_uri(tmp_path)
    argv = study_argv(uri, n_trials=2, epochs=3)
    first = as_process_one(argv, tmp_path)
    with first:
        read_until(first, r"^trial 0 epoch 1/3")
        (pid_one,) = children_of(first.pid)  # unshare's child: process 1 inside
        os.kill(pid_one, signal.SIGKILL)
        first.wait(timeout=30)
    (trial,) = load_optuna_study(tmp_path).get_trials()
    assert trial.state.name == "RUNNING"
    assert trial.system_attrs["research:worker"].split(":")[1] == "1"

    second = as_process_one(argv, tmp_path)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, out + err
    assert "trial 0 was left RUNNING by a dead worker: marked FAIL, queued again" in out
    study = load_optuna_study(tmp_path)
    assert counted_trials(study) == 2
    assert study.trials[0].state.name == "FAIL" and study.trials[1].params == trial.params
    no_run_left_running(uri)


# --- 3 and 9. another host's worker killed, a worker stopped past its heartbeat ------------------


def as_host(hostname: str, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m research ...`` with its own hostname (a UTS namespace): another machine."""
    need_root()
    command = " ".join(["exec", sys.executable, "-m", "research", *map(shlex_quote, argv)])
    return subprocess.Popen(
        ["unshare", "-u", "sh", "-c", f"hostname {hostname} && {command}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


HEARTBEAT = {"RESEARCH_HEARTBEAT_INTERVAL": "1", "RESEARCH_HEARTBEAT_GRACE": "4"}


@pytest.mark.slow
def test_a_database_study_sweeps_another_hosts_dead_trial_when_it_starts(tmp_path, monkeypatch):
    """Optuna storage in a database (SQLite here; PostgreSQL in test_several_machines.py): a
    worker on "host-b" is killed with SIGKILL mid-trial. Its pid means nothing on this host, so
    only its heartbeat tells: once it is stale, the next command fails it, closes its run and
    queues it again, before starting anything."""
    import optuna

    from research.experiment.studies.storage import open_storage

    uri = sqlite_uri(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    argv = [*study_argv(uri, n_trials=2, epochs=3), "--storage", storage]
    other = as_host("host-b", argv, tmp_path, {**ENV, **HEARTBEAT})
    with other:  # (unshare and sh exec: other.pid is the study process itself)
        read_until(other, r"^trial 0 epoch 1/3")
        other.kill()
        other.wait(timeout=30)
    time.sleep(5)  # past the grace period

    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(argv)  # this host
    assert code == 0, out + err
    study = optuna.load_study(study_name=STUDY, storage=open_storage(storage))
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL", [t.state.name for t in trials]
    assert trials[0].system_attrs["research:worker"].startswith("host-b:")
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert counted_trials(study) == 2
    assert any(t.params == trials[0].params for t in trials[1:])  # retried
    no_run_left_running(uri)


def stop_outside_a_write(process: subprocess.Popen, database: Path) -> None:
    """SIGSTOP ``process`` at a moment it holds no write lock on the SQLite ``database``.

    Stopped inside a write (its heartbeat's, a few milliseconds each second) it would lock every
    other process out: that case is :func:`test_a_database_locked_by_a_stopped_writer_is_one_line`.
    The database is in WAL mode, where a stopped reader blocks no one."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for _ in range(100):
        process.send_signal(signal.SIGSTOP)
        try:
            with contextlib.closing(sqlite3.connect(database, timeout=0)) as connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            return
        except sqlite3.OperationalError:  # stopped mid-write: let it finish, stop it again
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError(f"{database} stayed locked through 100 tries")


def test_a_database_locked_by_a_stopped_writer_is_one_line(tmp_path, monkeypatch):
    """A process stopped inside a write to a SQLite study database holds its lock until it
    resumes; a command that waited for it as long as SQLite waits says so in one line, with
    the way out, and no traceback."""
    import sqlite3

    import optuna

    from research.experiment.studies import storage as storage_module

    database = tmp_path / "optuna.db"
    storage = f"sqlite:///{database}"
    optuna.create_study(
        study_name=STUDY, storage=storage_module.open_storage(storage), direction="maximize"
    )
    monkeypatch.setattr(storage_module, "SQLITE_BUSY_SECONDS", 1)
    argv = [*study_argv(sqlite_uri(tmp_path), n_trials=1, epochs=1), "--storage", storage]
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # the stopped writer's lock
        code, out, err = run_cli(argv)
    assert code == 2, out + err
    line = one_error_line(err)
    assert f"the Optuna database {storage} stayed locked for 1 s" in line, line
    assert "resume or end that process and run the command again" in line, line
    code, out, err = run_cli(argv)  # once the writer let go, the same command runs
    assert code == 0, out + err


@pytest.mark.slow
def test_a_worker_stopped_past_its_heartbeat_says_so_and_goes_on(tmp_path):
    """A worker stopped with SIGSTOP (a hung disk, a paused VM) past its heartbeat: another
    command fails its trial and queues it again. When the stopped worker resumes it must not
    crash ("Cannot tell a FAIL trial"): one line, its run closed, and on to the next trial."""
    import optuna

    from research.experiment.studies.storage import open_storage

    uri = sqlite_uri(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    argv = [*study_argv(uri, n_trials=3, epochs=3), "--storage", storage]
    env = {**ENV, **HEARTBEAT}
    stopped = spawn(argv, tmp_path, env)
    with stopped:
        read_until(stopped, r"^trial 0 epoch 1/3")
        stop_outside_a_write(stopped, tmp_path / "optuna.db")
        time.sleep(6)  # past the grace period
        code, other_out, other_err = command(argv, tmp_path, env)
        stopped.send_signal(signal.SIGCONT)
        out, err = stopped.communicate(timeout=300)
    assert code == 0, other_out + other_err
    assert stopped.returncode == 0, out + err
    assert TRACEBACK not in err, err
    assert re.search(r"trial 0 was failed and queued again by another worker", out), out
    study = optuna.load_study(study_name=STUDY, storage=open_storage(storage))
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL"
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert counted_trials(study) >= 3
    no_run_left_running(uri)
    runs = {r.data.tags["research.trial_number"]: r for r in study_runs(uri)[1]}
    assert runs["0"].info.status == "FAILED"


# --- 5. a search space changed under an existing study -------------------------------------------


def study_file(folder: Path, name: str, search: dict, n_trials: int = 1) -> Path:
    """A small study file: the shipped one's [fixed], 1 epoch, ``search`` as given."""
    import tomllib

    shipped = tomllib.loads(MNIST_MLP.read_text())
    shipped["study"].update(name=name, n_trials=n_trials, pruner="none")
    shipped["study"].pop("timeout", None)
    shipped["fixed"].update(epochs=1)
    shipped["fixed"].pop("hidden_size", None)
    shipped["search"] = search
    path = folder / f"{name}_{len(list(folder.glob('*.toml')))}.toml"
    path.write_text(tomli_w.dumps(shipped))
    return path


def test_a_changed_search_space_is_refused_before_any_trial_starts(tmp_path):
    uri = sqlite_uri(tmp_path)
    as_int = study_file(tmp_path, "space", {"hidden_size": {"type": "int", "low": 16, "high": 32}})
    common = ["--tracking-uri", uri, "--subset", "300", "--no-final"]
    code, out, err = run_cli(["study", str(as_int), *common])
    assert code == 0, out + err
    as_choices = study_file(
        tmp_path, "space", {"hidden_size": {"type": "categorical", "choices": [16, 32]}}, 2
    )
    for _ in range(2):  # and again: nothing is used up by a refused attempt
        code, out, err = run_cli(["study", str(as_choices), *common])
        assert code == 2, out + err
        line = one_error_line(err)
        assert (
            f"{as_choices.name}: [search] hidden_size is categorical [16, 32], but study 'space' "
            in line
            and "searched it as int [16, 32] (trial 0)" in line
            and "new --study-name" in line
        ), line
    study = load_optuna_study(tmp_path, "space")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]
    code, out, err = run_cli(["study", str(as_choices), *common, "--study-name", "space_2"])
    assert code == 0, out + err


# --- 6. SIGTERM with worker processes ------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            todo += children_of(current)
            found.append(current)
    return found


@pytest.mark.slow
def test_sigterm_stops_every_worker_and_closes_every_run(tmp_path):
    uri = sqlite_uri(tmp_path)
    argv = [*study_argv(uri, n_trials=4, epochs=3), "--workers", "2"]
    study = spawn(argv, tmp_path)
    with study:
        read_until(study, r"^\[worker \d\] trial \d epoch 1/3")
        tree = process_tree(study.pid)
        assert len(tree) >= 3, tree  # the command and its two workers (and their helpers)
        study.send_signal(signal.SIGTERM)
        out, err = study.communicate(timeout=90)
    assert study.returncode == 143, out + err
    assert TRACEBACK not in err, err
    assert "error: terminated (SIGTERM): the running trial is recorded as FAIL" in err, err
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in tree if Path(f"/proc/{pid}").exists()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in alive}
    assert not alive, f"processes outlived the study: {commands}"
    optuna_study = load_optuna_study(tmp_path)
    assert not [t for t in optuna_study.get_trials() if t.state.name == "RUNNING"]
    interrupted = [t for t in optuna_study.get_trials() if ATTR_INTERRUPTED in t.system_attrs]
    assert interrupted and all(
        t.system_attrs[ATTR_INTERRUPTED] == "terminated (SIGTERM)" for t in interrupted
    )
    no_run_left_running(uri)


# --- 7. the final refit -------------------------------------------------------------------------


def study_with_a_completed_trial(folder: Path, params: dict) -> list[str]:
    """A journal study whose budget (1 trial) is met by one COMPLETE trial with ``params``:
    the command goes straight to the refit of those parameters."""
    import optuna

    from research.experiment.config.study_config import load_study_config
    from research.experiment.studies.optuna_study import distribution
    from research.experiment.studies.storage import open_storage

    config = load_study_config(MNIST_MLP)
    storage = open_storage(str(folder / "mlruns" / "optuna.journal"))
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions={p.name: distribution(p) for p in config.search},
            value=0.9,
        )
    )
    uri = sqlite_uri(folder)
    return ["study", str(MNIST_MLP), "--n-trials", "1", "--epochs", "2", "--tracking-uri", uri]


BEST = {"hidden_size": 64, "learning_rate": 0.05, "batch_size": 64, "l2": 0.0}


@pytest.mark.slow
def test_a_refit_that_diverges_ends_with_one_line_and_a_closed_parent(tmp_path):
    """The best trial's configuration diverges when refitted: here because the study file's
    [fixed] network (tanh, linear outputs, squared error) differs from the one the recorded trial
    ran, as a learning rate on the edge can diverge on the refit's 6x more steps. One line, the
    parent closed FAILED with the reason, no test_accuracy; the trials are kept."""
    argv = study_with_a_completed_trial(tmp_path, {**BEST, "learning_rate": 0.5})
    linear = tmp_path / "linear.toml"
    text = MNIST_MLP.read_text().replace('output = "softmax"', 'output = "identity"')
    text = text.replace('activation = "relu"', 'activation = "tanh"')
    linear.write_text(text.replace('loss = "cross_entropy"', 'loss = "mse"'))
    argv[1] = str(linear)
    argv += ["--subset", "1000"]
    code, out, err = run_cli(argv)
    assert code == 1, out + err
    line = one_error_line(err)
    assert "the refit of trial 0 on train+validation failed: training diverged" in line, line
    (parent,), _ = study_runs(sqlite_uri(tmp_path))
    assert parent.info.status == "FAILED"
    assert parent.data.tags["research.error"].startswith("the refit of trial 0")
    assert "test_accuracy" not in parent.data.metrics


@pytest.mark.slow
def test_ctrl_c_during_the_refit_closes_the_parent_run(tmp_path):
    argv = study_with_a_completed_trial(tmp_path, BEST)
    argv[argv.index("--epochs") + 1] = "40"  # a refit long enough to be interrupted (~1 s/epoch)
    study = spawn(argv, tmp_path)
    with study:
        read_until(study, r"^retraining the best configuration")
        time.sleep(1)
        study.send_signal(signal.SIGINT)
        out, err = study.communicate(timeout=60)
    assert study.returncode == 130, out + err
    line = one_error_line(err)
    assert line.startswith("error: interrupted (Ctrl-C): run the same command again"), line
    (parent,), _ = study_runs(sqlite_uri(tmp_path))
    assert parent.info.status == "KILLED"


# --- 10. a loss that explodes but stays finite ---------------------------------------------------


@pytest.mark.parametrize("learning_rate", [100.0, 1000.0])
def test_a_loss_that_explodes_but_stays_finite_is_divergence(mnist, learning_rate):
    """Learning rates of 100 to 1000 on softmax cross-entropy drive the loss to 1e9..1e15 with
    finite weights; every epoch used to complete at chance accuracy."""
    from research.experiment.config.fields import TrainConfig
    from research.experiment.training.train import DivergenceError, train

    config = TrainConfig(
        learning_rate=learning_rate, output="softmax", loss="cross_entropy", epochs=2
    )
    x, labels = mnist.train.x[:2000], mnist.train.labels[:2000]
    with pytest.raises(DivergenceError, match=r"epoch 1, .* the loss exploded: .* last quarter"):
        train(config, x, labels, mnist.validation.x[:500], mnist.validation.labels[:500])


def test_a_run_that_learns_stays_under_the_explosion_limit(mnist):
    """Including one whose first steps spike to twenty times chance and recover (Adam at 0.1:
    batch losses 2.3, 20, 28, 44, 43, 31, 14, 4.9 in its first epoch of 8 batches)."""
    from research.experiment.config.fields import TrainConfig
    from research.experiment.training.train import loss_limit, train

    x, labels = mnist.train.x[:2000], mnist.train.labels[:2000]
    for config, accuracy in (
        (TrainConfig(learning_rate=0.5, output="softmax", loss="cross_entropy", epochs=2), 0.8),
        (
            TrainConfig(
                optimizer="adam",
                learning_rate=0.1,
                batch_size=256,
                output="softmax",
                loss="cross_entropy",
                epochs=3,
            ),
            0.6,
        ),
    ):
        result = train(config, x, labels, mnist.validation.x[:500], mnist.validation.labels[:500])
        assert result.history[-1].val_accuracy > accuracy
    assert loss_limit(0.1) == pytest.approx(10 * np.log(10))  # never below ten times chance
    assert loss_limit(5.0) == 50.0


# --- stores that must be refused -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "/dev/null", "the MLflow database"])
def test_a_storage_that_cannot_hold_a_study_is_refused_before_anything_is_written(tmp_path, where):
    uri = sqlite_uri(tmp_path)
    storage = {
        "folder": str(tmp_path),
        "/dev/null": "/dev/null",
        "the MLflow database": uri,
    }[where]
    code, out, err = run_cli([*study_argv(uri, n_trials=1, epochs=1), "--storage", storage])
    assert code == 2, out + err
    line = one_error_line(err)
    assert {
        "folder": f"--storage {tmp_path} is a folder; give a journal file path",
        "/dev/null": "--storage /dev/null is not a regular file",
        "the MLflow database": f"--storage {uri} is the MLflow tracking database",
    }[where] in line, line
    if where == "the MLflow database":
        import sqlite3

        path = tmp_path / "mlruns" / "mlflow.db"
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as db:
                tables = {row[0] for row in db.execute("select name from sqlite_master")}
            assert "studies" not in tables and "trials" not in tables, tables


def test_a_new_journal_beside_an_existing_studys_runs_is_refused(tmp_path):
    """The journal deleted (or another --storage given) while the MLflow store holds the
    study's runs: a second trial-0000 under the old parent would mix two studies."""
    uri = sqlite_uri(tmp_path)
    argv = study_argv(uri, n_trials=1, epochs=1, subset=300)
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    (tmp_path / "mlruns" / "optuna.journal").rename(tmp_path / "moved.journal")
    code, out, err = run_cli(argv)
    assert code == 2, out + err
    line = one_error_line(err)
    assert "already holds study 'mnist_mlp'" in line and "1 trial runs" in line, line
    assert "pass the --storage it used" in line and "new --study-name" in line, line
    journal = tmp_path / "mlruns" / "optuna.journal"
    assert not journal.exists() or STUDY not in journal.read_text()  # nothing created
    parents, children = study_runs(uri)
    assert len(parents) == 1 and len(children) == 1
    code, out, err = run_cli([*argv, "--storage", str(tmp_path / "moved.journal")])
    assert code == 0, out + err


def test_commands_started_together_name_one_parent_run_through_the_storage(tmp_path):
    """The parent run is chosen by whoever created the study (atomic), and named in the study:
    no clock is compared and no run deleted."""
    from research.experiment.tracking.study_runs import ATTR_PARENT_RUN

    uri = sqlite_uri(tmp_path)
    code, out, err = run_cli(study_argv(uri, n_trials=1, epochs=1, subset=300))
    assert code == 0, out + err
    study = load_optuna_study(tmp_path)
    (parent,), _ = study_runs(uri)
    assert study.user_attrs[ATTR_PARENT_RUN] == parent.info.run_id


def test_a_trial_orphaned_before_its_worker_recorded_itself_is_recovered(tmp_path, monkeypatch):
    """Killed (or out of disk) between Optuna's ask and the write naming its worker, a trial
    is RUNNING with no worker: after a minute it is failed and retried like any other."""
    import optuna

    import research.experiment.studies.liveness as workers
    from research.experiment.studies.storage import open_storage

    journal = tmp_path / "mlruns" / "optuna.journal"
    journal.parent.mkdir()
    study = optuna.create_study(
        study_name=STUDY, storage=open_storage(str(journal)), direction="maximize"
    )
    study.ask().suggest_int("hidden_size", 64, 1024, log=True)  # and nothing more
    monkeypatch.setattr(workers, "UNCLAIMED_SECONDS", 0)
    code, out, err = run_cli(study_argv(sqlite_uri(tmp_path), n_trials=1, epochs=1, subset=300))
    assert code == 0, out + err
    assert "trial 0 was left RUNNING by a dead worker: marked FAIL, queued again" in out, out
    states = [t.state.name for t in load_optuna_study(tmp_path).get_trials()]
    assert states == ["FAIL", "COMPLETE"], states
