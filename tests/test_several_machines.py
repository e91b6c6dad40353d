"""Several machines sharing one study, end to end on loopback: a real ``mlflow server`` with a
PostgreSQL backend store and served artifacts, Optuna's storage on the same PostgreSQL server, and
three ``python -m research study`` commands started together, each in its own UTS namespace with
its own hostname (``machine-1`` .. ``machine-3``) when ``unshare -u`` works, each with its own
working directory, talking to the stores only through their URLs.

Faults, caused for real: machine-1 is killed with SIGKILL in the middle of a trial; machine-2 is
stopped with SIGSTOP in the middle of a trial for longer than Optuna's heartbeat grace period,
then continued with SIGCONT. While machine-2 is stopped, past the grace period, machine-1 is
restarted with the same command: its start sweeps the stale trials (the dead one and the stopped
one; machine-3 may get there first, before its next trial), so that machine-2 wakes up to find
its trial failed, and must go on without a traceback. Starting the restart during the pause makes
that sweep certain: machine-3 alone may have used up the budget before the grace period ends.
At the end the study holds the requested number of counted trials, one parent run, one closed
MLflow run per trial under it, and artifacts the server serves back.

The heartbeat is shortened through ``RESEARCH_HEARTBEAT_INTERVAL`` / ``RESEARCH_HEARTBEAT_GRACE``
(read by research/experiment/studies/storage.py); the pause lasts as long as the grace period
the library actually uses, so without those knobs the test still works, in about a minute more.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_reliability import ENV, new_database, study_argv
from test_reliability import postgres as postgres  # the PostgreSQL fixture, shared
from test_study import (
    PNG_MAGIC,
    STUDY,
    by_trial_number,
    free_port,
    history,
    mlflow_client,
    stop_group,
    study_runs,
    wait_for_http,
)

from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF
from research.experiment.studies.trials import counted_trials
from research.experiment.tracking.stores import sqlalchemy_url

N_TRIALS = 8
EPOCHS = 3
SUBSET = 3000  # ~0.1 s per epoch: the signals land while two more epochs and the artifacts remain
HEARTBEAT = {"RESEARCH_HEARTBEAT_INTERVAL": "2", "RESEARCH_HEARTBEAT_GRACE": "8"}
MID_TRIAL = rf"^trial (\d+) epoch 1/{EPOCHS}:"
STARTED = rf"^study '{STUDY}': \d+/{N_TRIALS} trials done"  # printed after the stale-trial sweep
WAIT = 150  # seconds any one command may take


def hostnames_work() -> bool:
    """Whether ``unshare -u`` (a UTS namespace: a hostname of its own) works here (root)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-u", "sh", "-c", "hostname machine-0 && hostname"],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0 and done.stdout.strip() == "machine-0"


@dataclass
class Machine:
    """One ``python -m research`` command as one machine: its own process group, working
    directory and (if possible) hostname; stdout read line by line as it comes."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    own_hostname: bool
    process: subprocess.Popen = field(init=False)
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    lines: queue.Queue = field(default_factory=queue.Queue)
    readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        command = [sys.executable, "-m", "research", *self.argv]
        if self.own_hostname:
            hostname = self.name.split(" ")[0]
            # unshare and sh exec, so the pid is the python process's (it is in research:worker)
            script = f'hostname {hostname} && exec "$0" "$@"'
            command = ["unshare", "-u", "sh", "-c", script, *command]
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.out, True)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err, False)),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: Any, into: list[str], announce: bool) -> None:
        with stream:
            for line in stream:
                into.append(line)
                if announce:
                    self.lines.put(line)
        if announce:
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def skip_lines_so_far(self) -> None:
        """Forgets the lines already read, so :meth:`wait_for` sees only what comes next."""
        with contextlib.suppress(queue.Empty):
            while True:
                if self.lines.get_nowait() is None:
                    self.lines.put(None)
                    return

    def wait_for(self, pattern: str, seconds: float = WAIT) -> re.Match:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            if found := re.search(pattern, line):
                return found
        pytest.fail(f"{self.name}: no line matching {pattern!r}\n{self.describe()}")

    def finish(self, seconds: float = WAIT) -> int | None:
        """Its exit code, once it ends (None if it did not within ``seconds``)."""
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None
        for reader in self.readers:
            reader.join(timeout=10)
        return self.process.returncode

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGCONT)  # a stopped process dies just as well
            os.killpg(self.pid, signal.SIGKILL)
        self.finish(15)

    def describe(self, last: int = 12) -> str:
        tail = "".join(self.out[-last:])
        return (
            f"--- {self.name} (pid {self.pid}) stdout, last lines:\n{tail}--- stderr:\n"
            + (self.stderr[-3000:])
        )


def effective_heartbeat(storage_url: str, monkeypatch) -> tuple[int, int]:
    """(interval, grace) of the storage the commands will open with our environment: asked of
    the library itself, on a throwaway database (the study's must start empty)."""
    from research.experiment.studies.storage import open_storage

    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    storage = open_storage(storage_url)
    try:
        return storage.heartbeat_interval, storage.grace_period
    finally:
        storage.engine.dispose()


@contextlib.contextmanager
def optuna_study(storage_url: str):
    """The study as Optuna loads it from the database (no heartbeat: only reading)."""
    import optuna

    rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage_url))
    try:
        yield optuna.load_study(study_name=STUDY, storage=rdb)
    finally:
        rdb.engine.dispose()  # else its pooled connection is closed by the garbage collector


def load_trials(storage_url: str) -> list[Any]:
    with optuna_study(storage_url) as study:
        return study.get_trials()


def trial_state(storage_url: str, number: int) -> str:
    return next(t.state.name for t in load_trials(storage_url) if t.number == number)


def retries_of(trials: list[Any], number: int) -> list[Any]:
    """Trials queued again for trial ``number``: by Optuna's heartbeat retry or by our sweep."""
    return [
        t
        for t in trials
        if t.system_attrs.get("failed_trial") == number
        or number in t.system_attrs.get("retry_history", ())
        or t.user_attrs.get(ATTR_RETRY_OF) == number
    ]


class Checks:
    """Every property is checked, so one failure message shows all that is wrong at once."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str, detail: Any = "") -> None:
        if not ok:
            self.failed.append(f"{what}: {detail}")


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, folder: Path) -> Iterator[str]:
    """``mlflow server`` over ``backend`` serving artifacts from ``artifacts``, on loopback, in
    its own process group (stopped with it); yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
        "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with (folder / "mlflow-server.log").open("w") as log:
        server = subprocess.Popen(
            command,
            cwd=folder,
            # no background job runner (GenAI jobs, more processes): not needed here
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert wait_for_http(f"{url}/health", server) == b"OK"
            yield url
        finally:
            stop_group(server)


@dataclass
class Outcome:
    """What the machines did: each command's exit code, the trials hit by the signals, the
    stopped trial's state when its machine was continued."""

    machines: list[Machine]
    codes: dict[str, int | None]
    killed: int
    stopped: int
    state_at_continue: str
    story: list[str]  # what happened, for the failure message


def run_machines(argv: list[str], folder: Path, storage: str, grace: int, hostnames: bool):
    """Three machines started together; machine-1 killed mid-trial, machine-2 stopped mid-trial
    past the heartbeat grace period; machine-1 restarted meanwhile (its start sweeps the stale
    trials); machine-2 continued; all waited for."""
    env = {**ENV, **HEARTBEAT}
    machines: list[Machine] = []
    story: list[str] = []

    def machine(name: str, cwd: str) -> Machine:
        machines.append(Machine(name, argv, folder / cwd, env, hostnames))
        return machines[-1]

    try:
        one, two, _ = (machine(f"machine-{i}", f"machine-{i}") for i in (1, 2, 3))
        killed = int(one.wait_for(MID_TRIAL)[1])
        one.process.send_signal(signal.SIGKILL)
        assert one.finish(30) == -signal.SIGKILL
        two.skip_lines_so_far()  # its next first epoch, not one printed a while ago
        stopped = int(two.wait_for(MID_TRIAL)[1])
        two.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        story.append(f"machine-1 killed in trial {killed}; machine-2 stopped in trial {stopped}")
        # the signals landed mid-trial: nobody has closed those trials
        assert trial_state(storage, killed) == "RUNNING", (
            f"machine-1 was not killed mid-trial {killed}"
        )
        assert trial_state(storage, stopped) == "RUNNING", (
            f"machine-2 was not stopped mid-trial {stopped}"
        )

        # past the grace period of the stopped trial's last heartbeat (the killed one's is older)
        time.sleep(max(0.0, stopped_at + grace + 2 - time.monotonic()))
        restart = machine("machine-1 (restarted)", "machine-1")
        restart.wait_for(STARTED)  # printed once its start has swept the stale trials
        state_at_continue = trial_state(storage, stopped)
        two.process.send_signal(signal.SIGCONT)
        story.append(
            f"machine-2 continued after {time.monotonic() - stopped_at:.1f} s stopped; "
            f"its trial was {state_at_continue} by then"
        )
        codes = {m.name: m.finish() for m in machines}
    finally:
        for m in machines:
            if m.process.poll() is None:
                m.kill_group()
    return Outcome(machines, codes, killed, stopped, state_at_continue, story)


@pytest.mark.slow
def test_three_machines_with_a_killed_and_a_stopped_one_share_one_study(
    postgres, tmp_path, monkeypatch
):
    began = time.monotonic()
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # (the download below)
    probe = new_database(postgres, "research_machines_probe")
    interval, grace = effective_heartbeat(probe, monkeypatch)
    storage = new_database(postgres, "research_machines_optuna")
    backend = sqlalchemy_url(new_database(postgres, "research_machines_mlflow"))
    artifacts = tmp_path / "server-artifacts"
    hostnames = hostnames_work()
    story = [
        f"heartbeat: every {interval} s, stale after {grace} s"
        + (" (the library ignores the test's knobs)" if (interval, grace) == (20, 60) else "")
        + f"; a hostname per machine: {'yes' if hostnames else 'no (unshare -u unavailable)'}"
    ]
    with mlflow_server(backend, artifacts, tmp_path) as tracking:
        story.append(f"MLflow server up after {time.monotonic() - began:.1f} s")
        argv = [*study_argv(tracking, N_TRIALS, EPOCHS, SUBSET), "--storage", storage]
        outcome = run_machines(argv, tmp_path, storage, grace, hostnames)
        story += [*outcome.story, f"machines done after {time.monotonic() - began:.0f} s"]
        failed = check_study(outcome, storage, tracking, artifacts, tmp_path / "download", story)
    story.append(f"wall time {time.monotonic() - began:.0f} s")
    assert not failed, "\n".join([*failed, "", "what happened:", *story])


def check_study(
    outcome: Outcome, storage: str, tracking: str, artifacts: Path, download: Path, story: list[str]
) -> list[str]:
    """Checks what the study holds; returns what is wrong, and adds what it holds to ``story``
    (for the failure message)."""
    machines, codes, killed, stopped = (
        outcome.machines,
        outcome.codes,
        outcome.killed,
        outcome.stopped,
    )
    with optuna_study(storage) as study:
        trials = study.get_trials()
        counted = counted_trials(study)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    by_pid = {str(m.pid): m.name for m in machines}
    ran: dict[str, list[int]] = {}
    for trial in trials:
        host, pid = worker_host_and_pid(trial)
        ran.setdefault(f"{by_pid.get(pid, 'unknown')} [host {host}]", []).append(trial.number)
    story.append(f"exit codes: {codes}")
    story.append(f"trials per state: {states}; counted toward n_trials: {counted}")
    story += [f"  {name} ran trials {numbers}" for name, numbers in sorted(ran.items())]
    story += [m.describe(last=8) for m in machines if m.err]
    mine = re.compile(rf"\btrial {stopped}\b")
    story.append(
        "machine-2 on its stopped trial:\n"
        + "".join(f"  | {line}" for line in machines[1].out if mine.search(line))
    )

    check = Checks()
    check(codes["machine-1"] == -signal.SIGKILL, "machine-1 died of SIGKILL", codes["machine-1"])
    for name in ("machine-2", "machine-3", "machine-1 (restarted)"):
        check(codes[name] == 0, f"{name} exited 0", codes[name])
    for m in machines:
        check("Traceback" not in m.stderr + m.stdout, f"{m.name}: no traceback", m.stderr[-2000:])
        if codes[m.name] == 0:
            lines = m.stderr.splitlines()
            check(not lines, f"{m.name}: nothing on stderr", f"{len(lines)} lines: {lines[:2]}")
    check(
        outcome.state_at_continue == "FAIL",
        "the stopped trial was failed by another machine while its own was stopped",
        outcome.state_at_continue,
    )
    if machines[0].own_hostname:
        hosts = {worker_host_and_pid(t)[0] for t in trials}
        check(hosts <= {"machine-1", "machine-2", "machine-3"}, "trials name their machine", hosts)

    # Optuna: the budget, nothing left open, the two interrupted trials failed and run again.
    # Each command checks the budget before it starts a trial; three may run at once at the end.
    check(
        N_TRIALS <= counted <= N_TRIALS + 2, f"{N_TRIALS}..{N_TRIALS + 2} trials counted", counted
    )
    numbers = sorted(t.number for t in trials)
    check(numbers == list(range(len(trials))), "trial numbers without gaps", numbers)
    left = [(t.number, t.state.name) for t in trials if t.state.name in ("RUNNING", "WAITING")]
    check(not left, "no trial left RUNNING or WAITING", left)
    by_number = {t.number: t for t in trials}
    for label, number in (("killed", killed), ("stopped", stopped)):
        trial = by_number[number]
        check(trial.state.name == "FAIL", f"the {label} trial {number} is FAIL", trial.state.name)
        retried = retries_of(trials, number)
        done = [t for t in retried if t.state.name in ("COMPLETE", "PRUNED")]
        check(
            len(done) == 1 and done[0].params == trial.params,
            f"the {label} trial {number} ran again once, with its params, and finished",
            [(t.number, t.state.name, t.params) for t in retried],
        )
        check(
            ATTR_INTERRUPTED in trial.system_attrs or number in retried_numbers(trials),
            f"the {label} trial {number} is not counted",
            trial.system_attrs,
        )

    # MLflow, through the server: one parent, one closed run per trial under it, artifacts
    parents, children = study_runs(tracking)
    # Deleted runs count too: a parent run made by each command and all but one deleted is the
    # race of commands started together that the study's one atomic choice must avoid.
    deleted = [p.info.run_id for p in deleted_parent_runs(tracking)]
    check(
        len(parents) == 1 and not deleted,
        "exactly one parent run in the experiment (none made, then deleted)",
        f"{len(parents)} parent run(s), {len(deleted)} deleted: {deleted}",
    )
    parent_id = parents[0].info.run_id if parents else None
    announced = {
        m.name: found[1]
        for m in machines
        if (found := re.search(r"^MLflow: .*, parent run (\w+)$", m.stdout, re.MULTILINE))
    }
    check(
        set(announced.values()) == {parent_id} and len(announced) == len(machines),
        "every command worked under that parent run",
        announced,
    )
    try:
        runs = by_trial_number(children)
    except AssertionError as error:
        check(False, "one MLflow run per trial number", error)
        runs = {int(run.data.tags["research.trial_number"]): run for run in children}
    check(sorted(runs) == numbers, "an MLflow run for every trial", (sorted(runs), numbers))
    strays = [r.info.run_id for r in children if r.data.tags["mlflow.parentRunId"] != parent_id]
    check(not strays, "every trial run under the one parent run", strays)
    still_running = [
        (r.data.tags.get("research.trial_number", "parent"), r.info.run_id)
        for r in parents + children
        if r.info.status == "RUNNING"
    ]
    check(not still_running, "no MLflow run left RUNNING", still_running)
    for label, number in (("killed", killed), ("stopped", stopped)):
        run = runs.get(number)
        status = None if run is None else (run.info.status, run.data.tags.get("research.state"))
        check(status == ("FAILED", "FAIL"), f"the {label} trial's run is FAILED, FAIL", status)

    client = mlflow_client(tracking)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.number in runs]
    for trial in finished:
        run_id = runs[trial.number].info.run_id
        logged = dict(history(tracking, run_id, "val/accuracy"))
        check(logged == trial.intermediate_values, f"trial {trial.number}: curve as in Optuna")
        listed = {a.path for a in client.list_artifacts(run_id)}
        expected = {"loss_curves.png"}
        if trial.state.name == "COMPLETE":
            expected.add("weights.npz")
        check(expected <= listed, f"trial {trial.number}: artifacts {sorted(expected)}", listed)
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    if complete:
        run_id = runs[complete[0].number].info.run_id
        download.mkdir()
        curves = Path(client.download_artifacts(run_id, "loss_curves.png", str(download)))
        check(curves.read_bytes()[:8] == PNG_MAGIC, "a loss curve downloads through the server")
        on_server = list(artifacts.rglob(f"{run_id}/**/loss_curves.png"))
        check(len(on_server) == 1, "it lies in the server's --artifacts-destination", on_server)
    local = [p for m in machines for p in (m.cwd / "mlruns").rglob("*") if p.is_file()]
    check(not local, "no machine wrote to a local ./mlruns", local)
    return check.failed


def worker_host_and_pid(trial: Any) -> tuple[str, str]:
    """Where a trial ran, from its ``research:worker`` attribute (``host:pid:start``, or
    ``host:pid`` from older versions)."""
    host, _, rest = trial.system_attrs.get("research:worker", "?:?").partition(":")
    return host, rest.partition(":")[0]


def retried_numbers(trials: list[Any]) -> set[int]:
    """Trial numbers Optuna's heartbeat retry replaced (what counted_trials leaves out)."""
    numbers: set[int] = set()
    for trial in trials:
        numbers.update(trial.system_attrs.get("retry_history", ()))
        if trial.system_attrs.get("failed_trial") is not None:
            numbers.add(trial.system_attrs["failed_trial"])
    return numbers


def deleted_parent_runs(tracking_uri: str) -> list[Any]:
    from mlflow.entities import ViewType

    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    return client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`research.role` = 'study'",
        run_view_type=ViewType.DELETED_ONLY,
    )


@pytest.mark.slow
def test_a_stale_refit_finishing_last_does_not_take_the_champion_on_a_server(postgres, tmp_path):
    """tests/test_champion.py's two commands (one stopped mid-trial, the other stopped in its
    refit of a trial that is then beaten, and finishing last) as two machines: Optuna on
    PostgreSQL, a real MLflow server, which has no lock: the alias is compared, set and read
    back. ``models:/<study>@champion`` must end on the refit of Optuna's best trial, and the
    parent run's ``best_trial``, ``refit_trial`` and ``best_weights.npz`` with it."""
    from test_champion import check_stale_refit, run_stale_refit

    storage = new_database(postgres, "research_champion_optuna")
    backend = sqlalchemy_url(new_database(postgres, "research_champion_mlflow"))
    with mlflow_server(backend, tmp_path / "server-artifacts", tmp_path) as tracking:
        outcome = run_stale_refit(tmp_path, tracking, storage)
        check_stale_refit(tracking, storage, tmp_path, *outcome)
