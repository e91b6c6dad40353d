"""Stores that stop answering, for real: a PostgreSQL server under a study's Optuna storage
restarted mid-study (stopped with ``pg_ctl -m fast``, as a restart does, then started again on
the same port and data) and stopped for good; MLflow's SQL store on PostgreSQL inserting rows it
expects to collide (psycopg's pipeline warning); an MLflow tracking server killed mid-run.

What must hold: a restart of a few seconds is waited out, with one note, and the study ends
complete (exit 0); a longer outage ends the command in one line, exit 2, within the bound
``RESEARCH_DATABASE_RETRY_SECONDS`` sets, and the same command continues the study once the
database is back; a successful command on PostgreSQL writes nothing on stderr; a tracking server
that is gone is named and said unreachable, never a full disk. The retry itself
(:class:`~research.experiment.studies.storage.DatabaseRetry`) and which Optuna calls are safe to
repeat (``optuna_compat.reconnecting_rdb_storage``) are checked against real errors and a real
storage too.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_server import find_binaries, pause, resume
from postgres_server import start as start_postgres
from postgres_server import stop as stop_postgres
from test_reliability import new_database, study_argv
from test_study import STUDY, free_port, sqlite_uri, started, stop_group, study_runs, wait_for_http

from research.experiment.studies.optuna_compat import (
    RETRIED_RDB_METHODS,
    UNRETRIED_RDB_METHODS,
    reconnecting_rdb_storage,
)
from research.experiment.studies.storage import DatabaseRetry, StudyError, database_retry_seconds
from research.experiment.studies.trials import counted_trials
from research.experiment.tracking.stores import TrackingError, sqlalchemy_url, write_error

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 6
EPOCHS = 3
SUBSET = 1000  # short epochs: the trial that runs writes to the storage within the outage
MID_TRIAL = rf"^trial 1 epoch 1/{EPOCHS}:"
NOTE = re.compile(
    r"^note: the Optuna database postgresql://postgres@127\.0\.0\.1:\d+/(\w+) is unreachable "
    r"\(.+\); retrying for up to (\d+) s$"
)
NOISE = "error ignored terminating"


# --- a PostgreSQL server of our own, to stop and start --------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[tuple[Path, str]]:
    """(its folder, its URL): a throwaway server this module may stop and start again (never
    $RESEARCH_POSTGRES_URL's, which other tests share). Without PostgreSQL this FAILS, unless
    RESEARCH_NO_POSTGRES=1 (a skip then shows in the summary)."""
    if find_binaries() is None:
        if os.environ.get("RESEARCH_NO_POSTGRES") == "1":
            pytest.skip("RESEARCH_NO_POSTGRES=1: PostgreSQL is not installed on this machine")
        pytest.fail(
            "PostgreSQL is not installed (initdb not found); install it (apt-get install "
            "postgresql), or set RESEARCH_NO_POSTGRES=1 to skip"
        )
    folder = Path(tempfile.mkdtemp(prefix="research-test-pg-restart-"))
    try:
        yield folder, start_postgres(folder)
    finally:
        stop_postgres(folder)


class Command:
    """``python -m research ARGV`` in its own process, its output read as it comes."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "research", *argv],
            cwd=cwd,
            env={**environment, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines: list[str], pattern: str, seconds: float) -> None:
        """Until one of ``lines`` (its ``out`` or ``err``) matches ``pattern``; fails if the
        command ends first or the time is up."""
        deadline = time.monotonic() + seconds
        while not any(re.search(pattern, line) for line in list(lines)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.finish(10)
                pytest.fail(f"no line matching {pattern!r}\n{self.describe()}")
            time.sleep(0.05)

    def finish(self, seconds: float) -> int:
        try:
            code = self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        for reader in self.readers:
            reader.join(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
        return code

    def describe(self) -> str:
        return "stdout:\n" + "\n".join(self.out[-30:]) + "\nstderr:\n" + "\n".join(self.err)


def load_trials(storage: str) -> tuple[list, int]:
    """(the study's trials, how many count toward n_trials), as Optuna reads them."""
    import optuna

    rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage))
    try:
        study = optuna.load_study(study_name=STUDY, storage=rdb)
        return study.get_trials(), counted_trials(study)
    finally:
        rdb.engine.dispose()  # else its pooled connection is closed by the garbage collector


def study_is_whole(storage: str, uri: str) -> None:
    """The study holds N_TRIALS counted trials, none left RUNNING or WAITING, and every trial's
    MLflow run is closed."""
    trials, counted = load_trials(storage)
    assert counted == N_TRIALS, [(t.number, t.state.name) for t in trials]
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    _, runs = study_runs(uri)
    assert runs and all(run.info.status != "RUNNING" for run in runs)


# --- a restart mid-study, and a server gone for good ----------------------------------------------


@pytest.mark.slow
def test_a_postgresql_restart_mid_study_is_waited_out(own_postgres, tmp_path):
    """The server stops mid-trial for about 5 s (as a restart does: every session cut), then
    starts again: the study finishes with exit 0, all its trials counted, after one note."""
    folder, server = own_postgres
    storage = new_database(server, "research_restart")
    uri = sqlite_uri(tmp_path)
    argv = [*study_argv(uri, N_TRIALS, EPOCHS, SUBSET), "--storage", storage]
    command = Command(argv, tmp_path)
    command.wait_for(command.out, MID_TRIAL, 240)
    pause(folder)
    stopped = time.monotonic()
    try:
        # Down until the command has met the outage (its note), and for 5 s at least.
        command.wait_for(command.err, NOTE.pattern, 120)
        time.sleep(max(0.0, 5 - (time.monotonic() - stopped)))
    finally:
        resume(folder, server)
    code = command.finish(600)
    assert code == 0, command.describe()
    (note,) = command.err  # one line, once
    assert NOTE.match(note).groups() == ("research_restart", "60"), note
    assert f"{N_TRIALS}/{N_TRIALS} trials counted" in "\n".join(command.out)
    study_is_whole(storage, uri)


@pytest.mark.slow
def test_a_postgresql_gone_for_good_stops_the_study_in_one_line(own_postgres, tmp_path):
    """The server stops mid-trial and stays down: the command ends with exit 2 and one error
    line once RESEARCH_DATABASE_RETRY_SECONDS has passed; when the server is back, the same
    command finishes the study with nothing lost."""
    folder, server = own_postgres
    storage = new_database(server, "research_gone")
    uri = sqlite_uri(tmp_path)
    argv = [*study_argv(uri, N_TRIALS, EPOCHS, SUBSET), "--storage", storage]
    command = Command(argv, tmp_path, env={"RESEARCH_DATABASE_RETRY_SECONDS": "3"})
    command.wait_for(command.out, MID_TRIAL, 240)
    done_before = sum(bool(re.match(r"^trial \d+ (COMPLETE|PRUNED)", line)) for line in command.out)
    pause(folder)
    stopped = time.monotonic()
    try:
        code = command.finish(120)
        seconds = time.monotonic() - stopped
    finally:
        resume(folder, server)
    assert code == 2, command.describe()
    assert seconds < 40, f"{seconds:.0f} s after the server stopped\n{command.describe()}"
    *notes, error = command.err
    assert len(notes) <= 1 and all(NOTE.match(note) for note in notes), command.describe()
    assert re.match(
        r"^error: the Optuna database postgresql://postgres@127\.0\.0\.1:\d+/research_gone "
        r"has not answered for \d+ s \(.+\); no finished trial is lost: run the same command "
        r"again once it answers",
        error,
    ), error
    trials, _ = load_trials(storage)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) >= done_before

    again = Command([*argv, "--quiet"], tmp_path)
    assert again.finish(600) == 0, again.describe()
    assert again.err == [], again.describe()
    study_is_whole(storage, uri)


# --- nothing on stderr of a successful command on PostgreSQL --------------------------------------

DUPLICATES = """
import sys, uuid
from mlflow.entities import Metric
from research.experiment.tracking.stores import mlflow_client
client = mlflow_client(sys.argv[1])
run = client.create_run(client.create_experiment("duplicates-" + uuid.uuid4().hex))
client.log_batch(run.info.run_id, metrics=[Metric("a", 1.0, 1000, 0)])
for i in range(20):  # each batch: a row that is there already, then 50 new ones
    fresh = [Metric(f"m{i}_{j}", 1.0, 1000, 0) for j in range(50)]
    client.log_batch(run.info.run_id, metrics=[Metric("a", 1.0, 1000, 0), *fresh])
print("logged")
"""


@pytest.mark.slow
def test_mlflow_on_postgresql_inserts_colliding_rows_without_a_word(own_postgres, tmp_path):
    """MLflow's SQL store inserts rows that collide on purpose and handles the error (a logged
    model re-inserts its run's metrics: every final fit). psycopg often also logs "error
    ignored terminating <psycopg.Pipeline ...>: pipeline aborted" for it (the more rows after
    the colliding one, the likelier: 15 to 19 of these 20 batches, measured without the fix).
    Through the project's client, stderr stays empty."""
    _, server = own_postgres
    tracking = new_database(server, "research_noise")
    done = subprocess.run(
        [sys.executable, "-c", DUPLICATES, tracking],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "logged"
    assert done.stderr == "", done.stderr[:2000]


@pytest.mark.slow
def test_a_study_on_postgresql_writes_nothing_on_stderr(own_postgres, tmp_path):
    """A tiny study with both stores on PostgreSQL, its final fit (and model) included: exit 0
    and an empty stderr (no psycopg pipeline warning)."""
    _, server = own_postgres
    storage = new_database(server, "research_quiet_optuna")
    tracking = new_database(server, "research_quiet_mlflow")
    argv = [a for a in study_argv(tracking, 2, 1, SUBSET) if a != "--no-final"]
    command = Command([*argv, "--storage", storage, "--quiet"], tmp_path)
    assert command.finish(600) == 0, command.describe()
    assert command.err == [], command.describe()
    assert not any(NOISE in line for line in command.out)


# --- a tracking server that is gone ---------------------------------------------------------------


@pytest.mark.slow
def test_a_tracking_server_gone_mid_run_is_named_unreachable(tmp_path, monkeypatch):
    """An MLflow server killed under an open run: logging an artifact, or metrics, is one
    TrackingError naming the server as unreachable; none speaks of disk space."""
    from research.experiment.tracking.runs import start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (else minutes of retries)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
        sqlite_uri(tmp_path), "--artifacts-destination", str(tmp_path / "served"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    (tmp_path / "mlruns").mkdir()
    quiet = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # (no job runner)
    log = (tmp_path / "server.log").open("w")
    with log, started(command, tmp_path, stdout=log, stderr=log, env=quiet) as server:
        wait_for_http(f"{url}/health", server)
        run = start_run("gone", tracking_uri=url)
        artifact = tmp_path / "notes.txt"
        artifact.write_text("a line\n")
        run.log_artifact(artifact)  # (the server is up: this works)
        stop_group(server)
        errors = []
        for write in (lambda: run.log_artifact(artifact), lambda: run.log_metrics({"x": 1}, 0)):
            with pytest.raises(TrackingError) as raised:
                write()
            errors.append(str(raised.value))
    for error in errors:
        assert error.startswith(
            f"the MLflow tracking server {url} is unreachable (Connection refused); start it"
        ), error
        assert "space" not in error and "\n" not in error


# --- the retry, against real errors and a real storage --------------------------------------------


def refused(url_port: int) -> None:
    """A real refused connection: PostgreSQL's driver to a closed port."""
    import psycopg

    with psycopg.connect(f"postgresql://x@127.0.0.1:{url_port}/db", connect_timeout=5):
        pass


def test_the_retry_waits_out_refused_connections_with_one_note():
    port = free_port()
    calls = []

    def attempt() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            refused(port)
        return "answered"

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        retry = DatabaseRetry(f"postgresql://alice:s3cret@127.0.0.1:{port}/optuna", 60)
        assert retry(attempt) == "answered"
    assert len(calls) == 4
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert all(w <= gap < w + 1 for w, gap in zip((0.5, 1, 2), waits, strict=True)), waits
    (note,) = err.getvalue().splitlines()
    assert note.startswith(
        f"note: the Optuna database postgresql://alice:***@127.0.0.1:{port}/optuna is "
        "unreachable (connection failed: "
    ), note
    assert note.endswith("; retrying for up to 60 s")


def test_the_retry_gives_up_in_one_line_then_fails_at_once():
    port = free_port()
    retry = DatabaseRetry(f"postgresql://alice:s3cret@127.0.0.1:{port}/optuna", 2)
    started_at = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(StudyError) as raised:
        retry(lambda: refused(port))
    assert 2 <= time.monotonic() - started_at < 5
    (line,) = str(raised.value).splitlines()
    assert line.startswith(
        f"the Optuna database postgresql://alice:***@127.0.0.1:{port}/optuna has not answered "
        "for 2 s (connection failed: "
    ), line
    assert "s3cret" not in line
    started_at = time.monotonic()  # given up: the next call (giving a trial back) waits no more
    with pytest.raises(StudyError):
        retry(lambda: refused(port))
    assert time.monotonic() - started_at < 1


def test_the_retry_leaves_other_errors_alone(monkeypatch):
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("no such trial")

    with pytest.raises(KeyError):
        DatabaseRetry("postgresql://h/db", 60)(attempt)
    assert calls == [1]
    monkeypatch.setenv("RESEARCH_DATABASE_RETRY_SECONDS", "soon")
    with pytest.raises(StudyError, match="RESEARCH_DATABASE_RETRY_SECONDS='soon' is not allowed"):
        database_retry_seconds()


def test_every_call_optunas_cache_makes_is_retried_or_deliberately_not():
    """optuna_compat's lists against the installed Optuna: what ``_CachedStorage`` calls on its
    backend RDBStorage (an upgrade that adds a call fails here, naming it)."""
    import inspect

    import optuna
    from optuna.storages import _cached_storage

    called = set(re.findall(r"self\._backend\.(\w+)", inspect.getsource(_cached_storage)))
    assert called == set(RETRIED_RDB_METHODS) | set(UNRETRIED_RDB_METHODS)
    assert all(callable(getattr(optuna.storages.RDBStorage, name)) for name in called)


def test_optuna_puts_its_cache_in_front_of_the_reconnecting_storage(tmp_path):
    import optuna

    storage = reconnecting_rdb_storage(lambda attempt: attempt(), f"sqlite:///{tmp_path}/o.db")
    try:
        study = optuna.create_study(study_name="s", storage=storage)
        assert type(study._storage).__name__ == "_CachedStorage"
        assert study._storage._backend is storage
    finally:
        storage.engine.dispose()


def test_retried_writes_are_safe_to_repeat_after_they_committed(tmp_path):
    """A retry after a commit whose answer was lost runs the call again: each write the cache
    makes, run twice on a real storage, leaves what one run leaves (a trial's state and value
    told twice: True, not UpdateFinishedTrialError); a trial another process finished still
    raises it."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def twice(attempt):
        attempt()  # it committed, and its answer was lost
        return attempt()

    plain = optuna.storages.RDBStorage(url)
    storage = reconnecting_rdb_storage(twice, url)
    try:
        study = plain.create_new_study([StudyDirection.MAXIMIZE], "s")
        trial = plain.create_new_trial(study)
        storage.set_trial_param(trial, "x", 0.5, FloatDistribution(0, 1))
        storage.set_trial_user_attr(trial, "k", "v")
        storage.set_trial_system_attr(trial, "w", "host:1:2")
        storage.set_trial_intermediate_value(trial, 0, 0.25)
        storage.set_study_user_attr(study, "parent", "abc")
        assert storage.set_trial_state_values(trial, TrialState.COMPLETE, [0.75]) is True
        found = plain.get_trial(trial)
        assert (found.state, found.values, found.params) == (
            TrialState.COMPLETE,
            [0.75],
            {"x": 0.5},
        )
        assert (found.user_attrs, found.intermediate_values) == ({"k": "v"}, {0: 0.25})
        assert plain.get_study_user_attrs(study) == {"parent": "abc"}

        other = plain.create_new_trial(study)
        plain.set_trial_state_values(other, TrialState.FAIL)  # another process failed it
        with pytest.raises(UpdateFinishedTrialError):
            storage.set_trial_state_values(other, TrialState.COMPLETE, [0.5])
    finally:
        plain.engine.dispose()
        storage.engine.dispose()


def test_a_write_to_a_gone_server_is_unreachable_not_a_full_disk(monkeypatch):
    """MLflow's own error for a server that refuses connections (no server at all here)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Exception) as raised:
        MlflowClient(tracking_uri=url).set_tag("0123", "k", "v")
    message = str(write_error(url, raised.value))
    assert message == (
        f"the MLflow tracking server {url} is unreachable (Connection refused); start it again "
        "(or check --tracking-uri / MLFLOW_TRACKING_URI), then run the same command again"
    )
    full = write_error("sqlite:////x/mlflow.db", OSError(28, "No space left on device"))
    assert "free some space" in str(full)
