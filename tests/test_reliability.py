"""Faults caused for real, and checked for what they leave behind: a worker process killed with
SIGKILL mid-trial, a real SIGINT, four workers and four separate commands on one fresh store, a
real PostgreSQL server shared by two commands, a write that fails with EFBIG (a file-size limit)
or ENOTDIR (a file where the store's artifact folder should be), weights files that are not ours,
unreachable tracking stores, and an audit of the code for unpickling and shell commands.

The study-level checks that need no real fault (a stale RUNNING trial, Ctrl-C as a
KeyboardInterrupt, divergence, bad study files) live in test_study.py and test_study_config.py.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from postgres_server import find_binaries
from postgres_server import start as start_postgres
from postgres_server import stop as stop_postgres
from test_study import (
    MNIST_MLP,
    STUDY,
    by_trial_number,
    free_port,
    history,
    load_optuna_study,
    mlflow_client,
    run_cli,
    sqlite_uri,
    study_runs,
)

from research.cli import main
from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF
from research.experiment.studies.trials import counted_trials
from research.experiment.tracking.stores import sqlalchemy_url
from research.experiment.tracking.weights import WeightsError, load_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
EPOCH_KEYS = ("train/loss", "val/loss", "val/accuracy")


def study_argv(uri: str, n_trials: int, epochs: int = 2, subset: int = 1000) -> list[str]:
    return [
        "study", str(MNIST_MLP), "--n-trials", str(n_trials), "--epochs", str(epochs),
        "--subset", str(subset), "--tracking-uri", uri, "--no-final",
    ]  # fmt: skip


def python_m_research(
    argv: list[str], cwd: Path, max_file_bytes: int | None = None
) -> subprocess.Popen:
    """``python -m research ...`` as its own process (line-buffered text on stdout/stderr),
    optionally unable to write files larger than ``max_file_bytes`` (RLIMIT_FSIZE: a write past
    it fails with EFBIG). The limit is set by the child itself: a ``preexec_fn`` would fork this
    process, which JAX (imported by other tests) warns against."""
    limit = [] if max_file_bytes is None else [
        "-c",
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes})); "
        "sys.argv[0] = 'research'; runpy.run_module('research', run_name='__main__')",
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, *(limit or ["-m", "research"]), *argv],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(process: subprocess.Popen, pattern: str, seconds: float = 240) -> list[str]:
    """Stdout lines up to and including the first matching ``pattern``; fails if the process
    ends first. (The deadline is checked between lines: the study prints every epoch.)"""
    lines = []
    deadline = time.monotonic() + seconds
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if time.monotonic() > deadline:
            break
    process.kill()
    pytest.fail(f"no line matching {pattern!r}; stdout:\n{''.join(lines)}\n{process.stderr.read()}")


def snapshot(folder: Path, uri: str, name: str = STUDY) -> dict[int, dict[str, Any]]:
    """Every finished trial as Optuna and MLflow hold it: state, value, params, intermediate
    values, its run's id, status, params and metric histories."""
    runs = by_trial_number(study_runs(uri, name)[1])
    found = {}
    for trial in load_optuna_study(folder, name).get_trials():
        if trial.state.name == "RUNNING":
            continue
        run = runs[trial.number]
        found[trial.number] = {
            "state": trial.state.name,
            "value": trial.value,
            "params": trial.params,
            "intermediate": trial.intermediate_values,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "run_params": run.data.params,
            "histories": {key: history(uri, run.info.run_id, key) for key in EPOCH_KEYS},
        }
    return found


def assert_one_run_per_trial(trials: list[Any], uri: str, name: str = STUDY) -> dict[int, Any]:
    """No trial number duplicated or lost; exactly one MLflow run per Optuna trial, all under
    the study's one parent run. Returns the runs by trial number."""
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), numbers
    parents, children = study_runs(uri, name)
    assert len(parents) == 1, [p.info.run_id for p in parents]
    runs = by_trial_number(children)  # fails on two runs for one trial
    assert sorted(runs) == numbers
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    return runs


def assert_all_joined_one_study(outputs: list[str], trials: list[Any], parent_id: str) -> None:
    """Every command worked on the same study and parent run (it says so when it starts). How
    many of them got to run trials depends on timing (a command still starting up may find the
    budget used): at least one, and no worker but the commands (one process each)."""
    for out in outputs:
        assert re.search(rf"^MLflow: .*, parent run {parent_id}$", out, re.MULTILINE), out
    workers = {t.system_attrs["research:worker"] for t in trials}
    assert 1 <= len(workers) <= len(outputs), workers


# --- 1. kill -9 of a worker in the middle of a trial --------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_finishes_with_nothing_lost(tmp_path):
    uri = sqlite_uri(tmp_path)
    argv = study_argv(uri, n_trials=4, epochs=3)
    study = python_m_research(argv, tmp_path)
    try:
        read_until(study, r"^trial 2 epoch 1/3")  # trials 0 and 1 done, trial 2 mid-way
    finally:
        study.send_signal(signal.SIGKILL)
        study.wait(timeout=30)
        study.stdout.close()
        study.stderr.close()
    assert study.returncode == -signal.SIGKILL
    before = snapshot(tmp_path, uri)
    assert sorted(before) == [0, 1]
    killed = load_optuna_study(tmp_path).trials[2]
    assert killed.state.name == "RUNNING"  # what the kill left: no one closed it
    runs = by_trial_number(study_runs(uri)[1])
    assert runs[2].info.status == "RUNNING"

    code, out, err = run_cli(argv)  # the same command again
    assert code == 0, out + err
    assert "trial 2 was left RUNNING by a dead worker: marked FAIL, queued again" in out
    assert "4/4 trials counted" in out

    study = load_optuna_study(tmp_path)
    trials = study.get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    killed = trials[2]
    assert killed.state.name == "FAIL"
    assert "died while the trial was running" in killed.system_attrs[ATTR_INTERRUPTED]
    (retry,) = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == 2]
    assert retry.params == killed.params and retry.state.name in ("COMPLETE", "PRUNED")
    counted = [t for t in trials if ATTR_INTERRUPTED not in t.system_attrs]
    assert len(counted) == 4
    runs = assert_one_run_per_trial(trials, uri)
    assert runs[2].info.status == "FAILED"
    assert runs[2].data.tags["research.state"] == "FAIL"
    assert "died" in runs[2].data.tags["research.error"]
    after = snapshot(tmp_path, uri)
    for number, recorded in before.items():  # completed trials: values, params, histories
        assert after[number] == recorded, number


def test_heartbeat_retries_count_once_whatever_the_trial_ids(tmp_path):
    """Optuna's heartbeat retries record trial numbers; trial ids differ from them (from 1 in a
    database, global across studies), so only the failed attempts drop out of the count."""
    import optuna
    from optuna.trial import TrialState, create_trial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def study_of(name, *trials):
        study = optuna.create_study(study_name=name, storage=storage)
        for state, system_attrs in trials:
            value = None if state == TrialState.FAIL else 0.5
            study.add_trial(create_trial(state=state, value=value, system_attrs=system_attrs))
        return study

    done, failed = TrialState.COMPLETE, TrialState.FAIL
    # trial ids 1, 2, 3: trial 0's id is the number of the trial that was retried
    ids = study_of(
        "ids", (done, {}), (failed, {}), (done, {"failed_trial": 1, "retry_history": [1]})
    )
    assert counted_trials(ids) == 2  # trials 0 and 2
    chain = study_of(
        "chain",
        (done, {}),
        (failed, {}),  # 1: its heartbeat stopped
        (failed, {"failed_trial": 1, "retry_history": [1]}),  # 2: its retry failed too
        (done, {"failed_trial": 1, "retry_history": [1, 2]}),  # 3: the retry's retry
        (done, {ATTR_INTERRUPTED: "interrupted (Ctrl-C)"}),  # 4: queued again, not a result
    )
    assert counted_trials(chain) == 2  # trials 0 and 3


# --- 2. a real SIGINT ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sent_signal", "exit_code", "reason"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_mid_trial_stops_at_once_with_one_line_and_resuming_runs_it_again(
    tmp_path, sent_signal, exit_code, reason
):
    """Ctrl-C, and SIGTERM (what kill, systemd and supervisord send), stop the study the same
    way: the trial failed and queued again, its run and the parent closed KILLED."""
    uri = sqlite_uri(tmp_path)
    argv = study_argv(uri, n_trials=1, epochs=3)
    study = python_m_research(argv, tmp_path)
    with study:
        read_until(study, r"^trial 0 epoch 1/3")
        study.send_signal(sent_signal)
        try:  # how fast: scripts/measure_stop_and_start_times.py (docs/reliability.md)
            study.wait(timeout=60)
        except subprocess.TimeoutExpired:
            study.kill()
            pytest.fail(f"the study did not stop within 60 s of {sent_signal.name}")
        err = study.stderr.read()
    assert study.returncode == exit_code, err
    assert err.splitlines() == [
        f"error: {reason}: the running trial is recorded as FAIL and queued again, its MLflow "
        "run as KILLED; run the same command again to continue the study"
    ]
    trial, queued = load_optuna_study(tmp_path).get_trials()
    assert (trial.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.user_attrs[ATTR_RETRY_OF] == 0
    assert trial.system_attrs[ATTR_INTERRUPTED] == reason
    ((parent,), (run,)) = study_runs(uri)
    assert run.info.status == "KILLED" and parent.info.status == "KILLED"

    code, out, err = run_cli(argv)
    assert code == 0, out + err
    trials = load_optuna_study(tmp_path).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs[ATTR_RETRY_OF] == 0
    assert_one_run_per_trial(trials, uri)


# --- 3. several workers on one fresh store ------------------------------------------------------


def check_concurrent_study(folder: Path, uri: str, n_trials: int, workers: int) -> list[Any]:
    trials = load_optuna_study(folder).get_trials()
    # each worker checks the budget before it starts a trial: at most workers - 1 extra
    assert n_trials <= len(trials) <= n_trials + workers - 1, len(trials)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    runs = assert_one_run_per_trial(trials, uri)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    for trial in trials:
        logged = history(uri, runs[trial.number].info.run_id, "val/accuracy")
        assert dict(logged) == trial.intermediate_values
    return trials


@pytest.mark.slow
def test_four_worker_processes_on_a_fresh_store(tmp_path, capfd):
    uri = sqlite_uri(tmp_path)
    code = main([*study_argv(uri, n_trials=8, epochs=1), "--workers", "4", "--quiet"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    trials = check_concurrent_study(tmp_path, uri, 8, 4)
    workers = {t.system_attrs["research:worker"] for t in trials}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)  # worker processes ran them
    assert 1 <= len(workers) <= 4, workers  # how many of the four: timing decides


@pytest.mark.slow
def test_four_separate_commands_started_together_on_a_fresh_store(tmp_path):
    uri = sqlite_uri(tmp_path)
    argv = [*study_argv(uri, n_trials=8, epochs=1), "--quiet"]
    commands = [python_m_research(argv, tmp_path) for _ in range(4)]
    results = []
    for command in commands:
        out, err = command.communicate(timeout=600)
        results.append((command.returncode, out, err))
    assert [code for code, _, _ in results] == [0] * 4, results
    assert all("Traceback" not in out + err for _, out, err in results)
    trials = check_concurrent_study(tmp_path, uri, 8, 4)
    ((parent,), _) = study_runs(uri)
    assert_all_joined_one_study([out for _, out, _ in results], trials, parent.info.run_id)


# --- 4. a real PostgreSQL server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    """The URL of a PostgreSQL server: $RESEARCH_POSTGRES_URL (.ci/run starts one), else a
    throwaway server started here. Without PostgreSQL this FAILS, unless the developer says
    RESEARCH_NO_POSTGRES=1 (a skip then shows in the summary; CI never sets it)."""
    if url := os.environ.get("RESEARCH_POSTGRES_URL"):
        yield url
        return
    if find_binaries() is None:
        if os.environ.get("RESEARCH_NO_POSTGRES") == "1":
            pytest.skip("RESEARCH_NO_POSTGRES=1: PostgreSQL is not installed on this machine")
        pytest.fail(
            "PostgreSQL is not installed (initdb not found); install it (apt-get install "
            "postgresql), set RESEARCH_POSTGRES_URL, or set RESEARCH_NO_POSTGRES=1 to skip"
        )
    folder = Path(tempfile.mkdtemp(prefix="research-test-pg-"))  # readable by the server user
    try:
        yield start_postgres(folder)
    finally:
        stop_postgres(folder)


def new_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}"')
        db.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.mark.slow
def test_two_commands_share_one_study_through_postgresql(postgres, tmp_path):
    """Two commands, as on two machines: the same postgresql:// URL for Optuna's storage and
    for MLflow's backend store, started together on fresh databases."""
    import optuna

    storage = new_database(postgres, "research_optuna")
    tracking = new_database(postgres, "research_mlflow")
    argv = [
        *study_argv(tracking, n_trials=8, epochs=2), "--storage", storage, "--quiet",
    ]  # fmt: skip
    commands = [python_m_research(argv, tmp_path) for _ in range(2)]
    results = [(*c.communicate(timeout=600), c.returncode) for c in commands]
    assert [code for _, _, code in results] == [0, 0], results

    rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage))
    try:
        trials = optuna.load_study(study_name=STUDY, storage=rdb).get_trials()
    finally:
        rdb.engine.dispose()  # else its pooled connection is closed by the garbage collector
    assert 8 <= len(trials) <= 9
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    runs = assert_one_run_per_trial(trials, sqlalchemy_url(tracking))
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert_all_joined_one_study([out for out, _, _ in results], trials, parent_id)
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
    assert not (tmp_path / "mlruns" / "optuna.journal").exists()  # the journal was not used


def test_an_unreachable_postgresql_storage_fails_fast_with_one_line(tmp_path):
    port = free_port()
    argv = study_argv(sqlite_uri(tmp_path), 1)
    storage = f"postgresql://alice:s3cret@127.0.0.1:{port}/optuna"
    code, out, err = run_cli([*argv, "--storage", storage])
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(
        f"error: cannot open the Optuna storage postgresql://alice:***@127.0.0.1:{port}/optuna: "
    ), line
    assert "s3cret" not in out + err


# --- 5. unreachable tracking stores -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://127.0.0.1:{port}", "cannot reach the MLflow tracking server http://127.0.0.1:"),
        ("http://unreachable.invalid", "cannot reach the MLflow tracking server http://unreach"),
        (
            "postgresql://bob:pw@127.0.0.1:{port}/mlflow",
            "cannot open the MLflow tracking store postgresql://bob:***@127.0.0.1:",
        ),
    ],
    ids=["closed-port", "unknown-host", "postgresql-closed-port"],
)
@pytest.mark.parametrize("command", ["study", "train"])
def test_a_tracking_uri_that_cannot_be_opened_fails_fast(tmp_path, uri, message, command):
    """MLflow alone retries such a URI for minutes (about 4 for HTTP, 2 for a database)."""
    uri = uri.format(port=free_port())
    if command == "study":
        argv = study_argv(uri, 1)
    else:
        argv = ["train", "--subset", "512", "--epochs", "1", "--quiet", "--tracking-uri", uri]
    started = time.monotonic()
    code, out, err = run_cli(argv)
    seconds = time.monotonic() - started
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert line.startswith(f"error: {message}"), line
    assert line.endswith("check --tracking-uri / MLFLOW_TRACKING_URI"), line
    assert "pw@" not in line
    assert seconds < 60, f"took {seconds:.0f} s"  # generous: MLflow alone takes minutes
    assert not (tmp_path / "mlruns").exists()


# --- 6. a full disk or an unwritable store while saving artifacts -------------------------------

BIG_WEIGHTS_STUDY = """\
[study]
name = "big_weights"
objective = "val/accuracy"
n_trials = 1
sampler = "random"
pruner = "none"
seed = 0

[fixed]
hidden_size = 1024
n_hidden_layers = 1
activation = "relu"
output = "softmax"
loss = "cross_entropy"
init = "he"
optimizer = "sgd"
momentum = 0.0
nesterov = false
batch_size = 128
l2 = 0.0
epochs = 1
seed = 0
drop_last = false
raw_inputs = false
dtype = "float64"

[search.learning_rate]
type = "float"
low = 0.01
high = 0.1
log = true
"""


def big_weights_study(folder: Path) -> tuple[str, list[str]]:
    """The tracking URI and the command of the one-trial study above, in ``folder``."""
    study_file = folder / "big_weights.toml"
    study_file.write_text(BIG_WEIGHTS_STUDY)
    uri = sqlite_uri(folder)
    return uri, [
        "study", str(study_file), "--subset", "1000", "--tracking-uri", uri, "--quiet",
        "--no-final",
    ]  # fmt: skip


def assert_trial_not_complete(folder: Path, uri: str, name: str, reason: str) -> None:
    """The failed trial: FAIL with the reason, queued again, its MLflow run FAILED."""
    trials = load_optuna_study(folder, name).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"], trials
    assert reason in trials[0].user_attrs["error"]
    assert reason in trials[0].system_attrs[ATTR_INTERRUPTED]  # not counted: not a result
    assert trials[1].user_attrs[ATTR_RETRY_OF] == 0
    ((parent,), (run,)) = study_runs(uri, name)
    assert run.info.status == "FAILED"
    assert run.data.tags["research.state"] == "FAIL"
    assert reason in run.data.tags["research.error"]
    assert "best_value" not in parent.data.metrics


@pytest.mark.slow
def test_a_file_size_limit_while_saving_weights_fails_the_trial_not_completes_it(tmp_path):
    """A real failed write (EFBIG, as a full disk gives ENOSPC): the process may write files of
    at most 4 MB; the stores stay far below, the 6.4 MB of float64 weights do not fit."""
    uri, argv = big_weights_study(tmp_path)
    limit = 4 * 2**20

    study = python_m_research(argv, tmp_path, max_file_bytes=limit)
    out, err = study.communicate(timeout=300)
    assert study.returncode == 2, out + err
    (line,) = err.splitlines()
    assert re.fullmatch(
        r"error: cannot write /\S+/weights\.npz: File too large; free some space "
        r"\(or lift the limit\), then run the same command again",
        line,
    ), line
    assert_trial_not_complete(tmp_path, uri, "big_weights", "File too large")
    assert max(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= limit

    code, out, err = run_cli(argv)  # without the limit: the queued trial completes
    assert code == 0, out + err
    trials = load_optuna_study(tmp_path, "big_weights").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    runs = by_trial_number(study_runs(uri, "big_weights")[1])
    assert {a.path for a in mlflow_client(uri).list_artifacts(runs[1].info.run_id)} == {
        "loss_curves.png",
        "weights.npz",
        "weights.txt",
    }


@pytest.mark.slow
def test_an_unwritable_artifact_store_stops_the_study_before_any_trial(tmp_path):
    """Tests run as root, for whom permissions do not block writes: the store's artifact folder
    is made a plain file, so creating a run's folder in it really fails (ENOTDIR). The study's
    first artifact (its file, on the parent run) fails, before any trial trains."""
    from research.experiment.tracking.study_runs import StudyTracker

    uri, argv = big_weights_study(tmp_path)
    tracker = StudyTracker.open("big_weights", uri)
    location = mlflow_client(uri).get_experiment(tracker.experiment_id).artifact_location
    blocked = Path(location.removeprefix("file://"))
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a folder")

    code, out, err = run_cli(argv)
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert line == (
        f"error: cannot save the artifact big_weights.toml to {location}/"
        f"{tracker.parent_run_id}/artifacts/study: Not a directory ({blocked}/"
        f"{tracker.parent_run_id}); free space or make it writable, or choose another store "
        "with --tracking-uri"
    )
    assert load_optuna_study(tmp_path, "big_weights").get_trials() == []

    blocked.unlink()
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    trials = load_optuna_study(tmp_path, "big_weights").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"]


# --- 7. weights files ---------------------------------------------------------------------------


def good_weights(tmp_path: Path, dtype: str = "float32") -> tuple[Path, Any, Any]:
    from research.engine.mlp import MLPSpec, init_params

    spec = MLPSpec((784, 16, 10), "relu", "softmax", "cross_entropy", 0.0)
    params = init_params(spec, 0, dtype=np.dtype(dtype), scheme="he")
    path = tmp_path / "weights.npz"
    save_weights(path, params, spec)
    return path, spec, params


def rewrite(path: Path, change) -> Path:
    """A copy of the weights file at ``path`` with ``change(arrays)`` applied."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    out = path.with_name("changed.npz")
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_round_trip(tmp_path, dtype):
    path, spec, params = good_weights(tmp_path, dtype)
    loaded_spec, loaded = load_weights(path)
    assert loaded_spec == spec
    for layer, original in zip(loaded, params, strict=True):
        for key in ("W", "b"):
            assert layer[key].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(layer[key], original[key])


BAD_WEIGHTS = {
    "transposed-W": (lambda a: a.update(W0=a["W0"].T.copy()), "W0 has shape (16, 784), but the"),
    "short-b": (lambda a: a.update(b1=a["b1"][:5]), "b1 has shape (5,), but the spec"),
    "int-W": (lambda a: a.update(W1=a["W1"].astype(np.int64)), "W1 has dtype int64; allowed"),
    "float16-b": (lambda a: a.update(b0=a["b0"].astype(np.float16)), "b0 has dtype float16"),
    "mixed": (
        lambda a: a.update(W0=a["W0"].astype(np.float64)),
        "the arrays mix dtypes float32, float64",
    ),
    "missing-layer": (lambda a: a.pop("W1"), "arrays ['W0', 'b0', 'b1'] do not match the spec"),
    "extra-array": (lambda a: a.update(W2=a["W1"]), "do not match the spec (784, 16, 10)"),
    "no-spec": (lambda a: a.pop("spec"), "no valid network spec in the file"),
    "bad-spec": (lambda a: a.update(spec=np.array('{"sizes": [784]}')), "no valid network spec"),
    "other-spec": (
        lambda a: a.update(spec=np.array(str(a["spec"]).replace("16", "32"))),
        "W0 has shape (784, 16), but the spec (784, 32, 10) needs (784, 32)",
    ),
}


@pytest.mark.parametrize(("change", "message"), BAD_WEIGHTS.values(), ids=BAD_WEIGHTS.keys())
def test_weights_that_do_not_fit_their_spec_are_refused(tmp_path, change, message):
    path, _, _ = good_weights(tmp_path)
    bad = rewrite(path, change)
    with pytest.raises(WeightsError) as error:
        load_weights(bad)
    assert str(error.value).startswith(f"{bad}: ") and message in str(error.value)


def test_a_pickled_weights_file_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    path, _, _ = good_weights(tmp_path)
    bad = rewrite(path, lambda a: a.update(W0=np.array([Payload()], dtype=object)))
    with pytest.raises(WeightsError, match="not a weights file written by this project"):
        load_weights(bad)
    assert not marker.exists()
    for text in (b"not a zip at all", b""):
        (tmp_path / "junk.npz").write_bytes(text)
        with pytest.raises(WeightsError, match="not a weights file"):
            load_weights(tmp_path / "junk.npz")
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "missing.npz")


# --- 8. security audit --------------------------------------------------------------------------

SOURCES = sorted(
    path
    for folder in ("research", "analysis", "scripts", "experiments")
    for path in (REPO / folder).rglob("*.py")
)
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
# torch may be imported (the benchmark's optional contender) but never asked to load a file: its
# loader unpickles.
TORCH_LOADERS = ("torch.load", "torch.jit.load")
SHELLS = {"os.system", "os.popen", "os.spawnl", "os.execl", "eval", "exec", "commands.getoutput"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def audit(path: Path, root: Path = REPO) -> list[str]:
    """Unpickling and shell commands in one source file, as ``file:line: what`` (the file
    relative to ``root``)."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            problems += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name in SHELLS:
            problems.append(f"{where}: calls {name}")
        if name.endswith(TORCH_LOADERS):
            problems.append(f"{where}: calls {name}")
        for keyword in node.keywords:
            value = keyword.value
            is_true = isinstance(value, ast.Constant) and value.value is True
            if keyword.arg == "shell" and not (isinstance(value, ast.Constant) and not value.value):
                problems.append(f"{where}: {name}(shell=...)")
            if keyword.arg == "allow_pickle" and (is_true or not isinstance(value, ast.Constant)):
                problems.append(f"{where}: {name}(allow_pickle={ast.unparse(value)})")
        if name.startswith("subprocess.") and node.args:
            if isinstance(node.args[0], ast.Constant | ast.JoinedStr | ast.BinOp):
                problems.append(f"{where}: {name} with a command string, not an argument list")
        if name.endswith("np.load") and not any(k.arg == "allow_pickle" for k in node.keywords):
            problems.append(f"{where}: np.load without allow_pickle=False")
    return problems


def test_the_audit_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "research" / "_audit_example.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle\nimport subprocess, os\nimport numpy as np\n"
        "subprocess.run(f'ls {x}', shell=True)\nos.system('ls')\nnp.load(p)\n"
        "np.load(p, allow_pickle=True)\nimport torch\ntorch.load(p)\nself.torch.load(p)\n"
    )
    problems = audit(bad, root=tmp_path)
    assert problems[0].startswith("research/_audit_example.py:1: ")
    found = [line.split(": ", 1)[1] for line in problems]
    assert found == [
        "imports pickle",
        "subprocess.run(shell=...)",
        "subprocess.run with a command string, not an argument list",
        "calls os.system",
        "np.load without allow_pickle=False",
        "np.load(allow_pickle=True)",
        "calls torch.load",
        "calls self.torch.load",
    ]


def test_no_unpickling_and_no_shell_commands_in_the_project():
    assert len(SOURCES) > 10
    problems = [problem for path in SOURCES for problem in audit(path)]
    assert problems == []


def test_subprocesses_are_started_from_argument_lists():
    """The only subprocesses: git (fixed arguments), the MLflow UI, whose user-given values
    (host, port, tracking URI) are separate list items, never parsed by a shell, and the
    commands a measurement script times (argument lists too)."""
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and dotted(node.func).startswith("subprocess."):
                calls.append((path.name, dotted(node.func)))
    assert sorted(set(calls)) == [
        ("measure_stop_and_start_times.py", "subprocess.Popen"),
        ("runs.py", "subprocess.run"),
        ("ui.py", "subprocess.Popen"),
    ]
