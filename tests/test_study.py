"""Optuna studies end to end, through the real command: real Optuna journal and MLflow SQLite
stores in a temporary folder, real MNIST (a subset), no mocks.

One tiny study (3 trials, then continued to 5) is shared by the read-only tests of this module:
its contents, the MLflow REST API over it, ``rerun`` of one of its trials and ``ui``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import copy_run

from research.cli import main
from research.engine.blas_kernels import loaded_kernels
from research.experiment.config.fields import FIELDS, TrainConfig
from research.experiment.config.study_config import load_study_config
from research.experiment.tracking.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"
STUDY = "mnist_mlp"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTRA_PARAMS = {"sizes", "n_train_rows", "blas_threads", "blas_kernels"}
EPOCH_METRICS = ("train/loss", "val/loss", "val/accuracy", "epoch_seconds", "learning_rate")
COMMIT = re.compile(r"[0-9a-f]{40}(-dirty)?")
SERVER_WAIT = 90  # seconds: an MLflow server needs ~10 s to start on a busy 2-core machine


# --- helpers ------------------------------------------------------------------------------------


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def journal_storage(path: Path):
    """The Optuna journal the study command writes, opened with Optuna's own API."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def load_optuna_study(folder: Path, name: str = STUDY):
    import optuna

    return optuna.load_study(
        study_name=name, storage=journal_storage(folder / "mlruns" / "optuna.journal")
    )


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def study_runs(uri: str, name: str = STUDY) -> tuple[list[Any], list[Any]]:
    """(parent runs, child runs) of a study's experiment."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r} in {uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("research.role") == "study"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) + len(children) == len(runs), "a run is neither a parent nor a trial"
    return parents, children


def by_trial_number(children: list[Any]) -> dict[int, Any]:
    runs = {int(run.data.tags["research.trial_number"]): run for run in children}
    assert len(runs) == len(children), "two MLflow runs name the same trial"
    return runs


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key))


def artifact_dir(run: Any) -> Path:
    """The local folder of a run's artifacts (the store keeps them beside the SQLite file)."""
    uri = run.info.artifact_uri
    assert uri.startswith("file://"), uri
    return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in mlflow_client(uri).list_artifacts(run_id, path)}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``python -m research ...`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200, url
        return json.loads(response.read())


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = SERVER_WAIT) -> bytes:
    """Polls ``url`` until it answers 200 (bounded); fails if the process exits first."""
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return response.read()
        except (OSError, urllib.error.URLError) as error:
            last = error
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer within {seconds} s (last error: {last!r})")


@contextlib.contextmanager
def started(command: list[str], cwd: Path, **kwargs: Any):
    """A subprocess in its own process group, always stopped (with its children) on exit."""
    process = subprocess.Popen(command, cwd=cwd, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Ctrl-C to the process group we started (the server and its workers), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def wait_until_gone(pgid: int, seconds: float = 15) -> list[int]:
    """Polls until process group ``pgid`` has no live process (SIGKILL is not instant); returns
    what is left when the time is up."""
    deadline = time.monotonic() + seconds
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def child_pids(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


# --- the shared tiny study ----------------------------------------------------------------------


@dataclass
class TinyStudy:
    folder: Path
    uri: str
    first: tuple[int, str, str]  # exit code, stdout, stderr of the 3-trial run
    second: tuple[int, str, str]  # ... of the same command with --n-trials 5
    first_trials: list[tuple[int, str, dict[str, Any]]]  # Optuna (number, state, params)
    first_parents: list[str]  # MLflow parent run ids after the first run
    first_children: dict[int, str]  # trial number -> MLflow run id after the first run


def tiny_study_argv(uri: str, n_trials: int) -> list[str]:
    return [
        "study", str(MNIST_MLP), "--n-trials", str(n_trials), "--epochs", "2",
        "--subset", "2000", "--tracking-uri", uri, "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyStudy:
    """The default study, 3 trials of 2 epochs on 2,000 rows; then the same command with
    ``--n-trials 5``. What the first run left is recorded before the second starts."""
    folder = tmp_path_factory.mktemp("tiny_study")
    uri = sqlite_uri(folder)
    first = run_cli(tiny_study_argv(uri, 3))
    study = load_optuna_study(folder)
    first_trials = [(t.number, t.state.name, dict(t.params)) for t in study.get_trials()]
    parents, children = study_runs(uri)
    first_children = {n: run.info.run_id for n, run in by_trial_number(children).items()}
    second = run_cli(tiny_study_argv(uri, 5))
    return TinyStudy(
        folder,
        uri,
        first,
        second,
        first_trials,
        [run.info.run_id for run in parents],
        first_children,
    )


# --- 1. a tiny study through the real command ---------------------------------------------------


@pytest.mark.slow
def test_tiny_study_records_every_trial_in_optuna_and_mlflow(tiny):
    code, out, err = tiny.first
    assert code == 0, out + err
    assert "3/3 trials counted (3 COMPLETE)" in out
    config = load_study_config(MNIST_MLP)

    # Optuna, after the first run: 3 finished trials 0, 1, 2
    assert [(n, state) for n, state, _ in tiny.first_trials] == [
        (0, "COMPLETE"),
        (1, "COMPLETE"),
        (2, "COMPLETE"),
    ]
    assert len(tiny.first_parents) == 1
    assert sorted(tiny.first_children) == [0, 1, 2]

    # MLflow: one parent, one child per trial, nested under it
    study = load_optuna_study(tiny.folder)
    trials = {t.number: t for t in study.get_trials()}
    parents, children = study_runs(tiny.uri)
    (parent,) = parents
    parent_id = parent.info.run_id
    runs = by_trial_number(children)
    assert sorted(runs) == sorted(trials)
    field_names = set(TrainConfig.field_names())
    for number, run in runs.items():
        trial = trials[number]
        run_id = run.info.run_id
        where = f"trial {number} (run {run_id})"
        assert run.data.tags["mlflow.parentRunId"] == parent_id, where
        assert run.info.run_name == f"trial-{number:04d}", where
        tags = run.data.tags
        assert tags["research.study"] == STUDY, where
        assert tags["research.trial_number"] == str(number), where
        # trials 3 and 4 (the continuation) may be pruned: the median pruner judges from 4 on
        assert tags["research.state"] == trial.state.name, where
        assert trial.state.name in (("COMPLETE",) if number < 3 else ("COMPLETE", "PRUNED"))
        assert tags["research.seed"] == str(config.fixed["seed"]), where
        assert COMMIT.fullmatch(tags["research.git_commit"]), tags["research.git_commit"]
        assert run.info.status == "FINISHED", where
        # MLflow's own tags: who, what and which commit made it, and how it ended
        assert tags["mlflow.source.name"] == "python -m research study", where
        assert tags["mlflow.source.type"] == "LOCAL", where
        assert tags["research.git_commit"].startswith(tags["mlflow.source.git.commit"]), where
        assert tags["mlflow.user"] == run.info.user_id != "unknown", where
        assert tags["mlflow.note.content"].startswith(trial.state.name), where
        # the Optuna trial names its run (optuna-dashboard shows it)
        assert trial.user_attrs["mlflow_run_id"] == run_id, where
        assert trial.user_attrs["mlflow_experiment_id"] == run.info.experiment_id, where

        # params: the Optuna param name is the MLflow param key, with the same value
        params = run.data.params
        assert set(params) == field_names | EXTRA_PARAMS, where
        assert set(trial.params) == set(config.search_names), where
        for name, value in trial.params.items():
            assert params[name] == str(value), (where, name)
        for name, value in config.fixed.items():
            expected = 2 if name == "epochs" else value
            assert params[name] == FIELDS[name].text(expected), (where, name)
        assert params["n_train_rows"] == "2000", where
        assert params["sizes"] == str([784, trial.params["hidden_size"], 10]), where

        # per-epoch metrics at steps 0 and 1, the same numbers Optuna was told
        for key in EPOCH_METRICS:
            assert [step for step, _ in history(tiny.uri, run_id, key)] == [0, 1], (where, key)
        accuracy = history(tiny.uri, run_id, "val/accuracy")
        assert dict(accuracy) == trial.intermediate_values, where
        if trial.state.name == "COMPLETE":
            assert trial.value == accuracy[-1][1], where
            note = f"COMPLETE: val/accuracy {100 * trial.value:.2f}% after 2 epochs"
            assert tags["mlflow.note.content"] == note, where
        assert all(0 < value <= 1 for _, value in accuracy), where
        assert all(np.isfinite(v) and v > 0 for _, v in history(tiny.uri, run_id, "val/loss"))

        # artifacts: curves for every trial that trained, weights for complete ones
        folder = artifact_dir(run)
        assert (folder / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC, where
        if trial.state.name == "PRUNED":
            assert artifact_paths(tiny.uri, run_id) == {"loss_curves.png"}, where
            continue
        assert artifact_paths(tiny.uri, run_id) == {
            "loss_curves.png",
            "weights.npz",
            "weights.txt",  # the arrays' shapes and how to load them
        }, where
        spec, weights = load_weights(folder / "weights.npz")
        assert spec.sizes == (784, trial.params["hidden_size"], 10), where
        assert all(np.isfinite(layer["W"]).all() for layer in weights), where
        about = (folder / "weights.txt").read_text()
        assert f"W0  {(784, trial.params['hidden_size'])}" in about, where
        assert 'load_weights("weights.npz")' in about, where

    # the study names its objective for Optuna's tools (optuna-dashboard), not "Objective 0"
    assert study.metric_names == ["val/accuracy"]

    # the parent: study file, figures, best value, test accuracy
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"study-{STUDY}"
    assert parent.data.tags["research.study"] == STUDY
    assert parent.data.tags["optuna.storage"] == str(tiny.folder / "mlruns" / "optuna.journal")
    assert parent.data.params["study_file"] == MNIST_MLP.name
    assert parent.data.params["objective"] == "val/accuracy"
    assert artifact_paths(tiny.uri, parent_id, "study") == {
        f"study/{MNIST_MLP.name}",
        "study/search_space.json",
    }
    folder = artifact_dir(parent)
    assert (folder / "study" / MNIST_MLP.name).read_bytes() == MNIST_MLP.read_bytes()
    # the search space as data, as the study file declares it (the report reads it back)
    space = json.loads((folder / "study" / "search_space.json").read_text())
    assert space == [param.as_dict() for param in config.search]
    assert [entry["name"] for entry in space] == list(config.search_names)
    # the figures, drawn as the report draws them
    figures = artifact_paths(tiny.uri, parent_id, "figures")
    assert {
        "figures/optimization_history.png",
        "figures/loss_curves.png",
        "figures/val_accuracy_vs_params.png",
    } <= figures
    assert figures <= {
        "figures/optimization_history.png",
        "figures/loss_curves.png",
        "figures/val_accuracy_vs_params.png",
        "figures/param_importances.png",
    }
    for figure in figures:
        assert (folder / figure).read_bytes()[:8] == PNG_MAGIC, figure
    assert "best_weights.npz" in artifact_paths(tiny.uri, parent_id)
    test_accuracy = parent.data.metrics["test_accuracy"]
    assert 0.5 < test_accuracy <= 1, test_accuracy
    best = max((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == best.value == study.best_value
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["refit_trial"] == str(best.number)  # whose best_weights.npz these are
    # the parent's description (its page in the UI): trials by state, the best, the refit
    states = sorted(t.state.name for t in trials.values())
    by_state = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    champion = mlflow_client(tiny.uri).get_model_version_by_alias(STUDY, "champion")
    assert parent.data.tags["mlflow.note.content"] == (
        f"{len(trials)} trials: {by_state}. Best trial {best.number}: val/accuracy "
        f"{100 * best.value:.2f}%. Refit of trial {best.number}: test accuracy "
        f"{100 * test_accuracy:.2f}%, registered as {STUDY} version {champion.version} "
        "(@champion)."
    )
    # each run of the command retrains the best and logs its test accuracy, at step = trials
    printed = [
        line.rsplit(" ", 1)[1]
        for line in (tiny.first[1] + tiny.second[1]).splitlines()
        if line.startswith("test_accuracy of the retrained best configuration: ")
    ]
    logged = history(tiny.uri, parent_id, "test_accuracy")
    assert [step for step, _ in logged] == [3, 5]
    assert len(printed) == 2
    assert [f"{100 * value:.2f}%" for _, value in logged] == printed  # the logged values, printed
    assert logged[-1][1] == test_accuracy
    assert [step for step, _ in history(tiny.uri, parent_id, "best_value")] == [3, 5]


@pytest.mark.slow
def test_running_the_command_again_continues_the_same_study(tiny):
    code, out, err = tiny.second
    assert code == 0, out + err
    assert "3/5 trials done" in out
    assert "5/5 trials counted (" in out

    study = load_optuna_study(tiny.folder)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    # the first three trials are untouched; the two new ones do not replay their params
    assert [(t.number, t.state.name, t.params) for t in trials[:3]] == tiny.first_trials
    old = [params for _, _, params in tiny.first_trials]
    for trial in trials[3:]:
        assert trial.params not in old, f"trial {trial.number} replays {trial.params}"
        # a continuous value comes back only if the sampler replays its sequence
        assert trial.params["learning_rate"] not in [p["learning_rate"] for p in old]
    assert trials[3].params != trials[4].params

    # still exactly one parent run; the new trials are nested under it
    parents, children = study_runs(tiny.uri)
    assert [run.info.run_id for run in parents] == tiny.first_parents
    assert parents[0].data.tags["n_trials"] == "5"
    assert parents[0].info.status == "FINISHED"
    runs = by_trial_number(children)
    assert sorted(runs) == [0, 1, 2, 3, 4]
    for number, run_id in tiny.first_children.items():
        assert runs[number].info.run_id == run_id  # the old runs are neither redone nor copied
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == tiny.first_parents[0]


# --- 2. pruned and failed trials ----------------------------------------------------------------

# Squared error on identity outputs diverges for a large learning rate (a softmax/cross-entropy
# network never does: its ReLUs die first), so this study searches learning_rate up to 100.
PRUNE_FAIL_STUDY = """\
[study]
name = "prune_fail"
objective = "val/accuracy"
n_trials = 8
sampler = "tpe"
pruner = "median"
seed = 0

[fixed]
n_hidden_layers = 1
activation = "tanh"
output = "identity"
loss = "mse"
init = "xavier"
optimizer = "momentum"
momentum = 0.9
nesterov = true
batch_size = 128
l2 = 0.0
epochs = 3
seed = 0
drop_last = false
raw_inputs = false
dtype = "float32"

[search.hidden_size]
type = "int"
low = 32
high = 64

[search.learning_rate]
type = "float"
low = 0.0001
high = 100.0
log = true
"""


@pytest.mark.slow
def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    import optuna

    study_file = tmp_path / "prune_fail.toml"
    study_file.write_text(PRUNE_FAIL_STUDY)
    uri = sqlite_uri(tmp_path)
    journal = tmp_path / "mlruns" / "optuna.journal"
    journal.parent.mkdir()
    # Four trials so the median pruner (4 startup trials, judged from epoch 1 on) is armed, two
    # good and two slow (val/accuracy after epoch 1 here: 68%, 66%, 41%, 30%); then one far too
    # slow (9%: pruned after epoch 1), one that diverges, and a copy of the best (not pruned).
    queued = [
        {"hidden_size": 48, "learning_rate": 0.012},
        {"hidden_size": 64, "learning_rate": 0.01},
        {"hidden_size": 64, "learning_rate": 0.003},
        {"hidden_size": 64, "learning_rate": 0.002},
        {"hidden_size": 64, "learning_rate": 0.0002},  # pruned
        {"hidden_size": 64, "learning_rate": 50.0},  # diverges
        {"hidden_size": 48, "learning_rate": 0.012},  # trains exactly as trial 0 did
    ]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="prune_fail", storage=journal_storage(journal), direction="maximize"
    )
    for params in queued:
        study.enqueue_trial(params)

    code, out, err = run_cli(
        ["study", str(study_file), "--subset", "1000", "--tracking-uri", uri, "--no-final"]
    )
    assert code == 0, out + err
    assert "8/8 trials counted" in out, out

    study = load_optuna_study(tmp_path, "prune_fail")
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(8))
    assert [t.params for t in trials[:7]] == queued
    states = [t.state.name for t in trials]
    assert states[:7] == ["COMPLETE"] * 4 + ["PRUNED", "FAIL", "COMPLETE"], states
    assert states[7] in ("COMPLETE", "PRUNED", "FAIL")  # sampled after the failure: it ran
    pruned, failed = trials[4], trials[5]
    assert sorted(pruned.intermediate_values) == [0, 1]  # judged at epoch 1, never reached 2
    diverged = re.fullmatch(
        r"training diverged at epoch (\d+), step (\d+): the batch loss is (inf|nan); "
        r"try a smaller learning_rate",
        failed.user_attrs["error"],
    )
    assert diverged, failed.user_attrs["error"]
    epochs_done = int(diverged[1]) - 1  # 0 here: within the first of 8 steps per epoch
    # where it diverged, as numbers too (Optuna user attrs, MLflow tags below: from 0)
    assert failed.user_attrs["diverged_epoch"] == epochs_done
    assert failed.user_attrs["diverged_step"] == int(diverged[2]) - 1
    assert sorted(failed.intermediate_values) == list(range(epochs_done))
    assert trials[6].intermediate_values == trials[0].intermediate_values

    parents, children = study_runs(uri, "prune_fail")
    (parent,) = parents
    runs = by_trial_number(children)
    assert sorted(runs) == list(range(8))
    for number, run in runs.items():
        assert run.data.tags["research.state"] == states[number], number
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == ("FAILED" if states[number] == "FAIL" else "FINISHED"), number

    run = runs[4]  # PRUNED: metrics up to the prune only, curves but no weights
    for key in EPOCH_METRICS:
        assert [step for step, _ in history(uri, run.info.run_id, key)] == [0, 1], key
    assert dict(history(uri, run.info.run_id, "val/accuracy")) == pruned.intermediate_values
    assert artifact_paths(uri, run.info.run_id) == {"loss_curves.png"}
    assert "research.error" not in run.data.tags
    # its description tells it from a COMPLETE run (the UI shows both as Finished)
    assert run.data.tags["mlflow.note.content"] == (
        f"PRUNED at epoch 2 of 3: val/accuracy {100 * pruned.intermediate_values[1]:.2f}%"
    )

    run = runs[5]  # FAIL: the divergence named, the epochs before it, no artifacts
    assert run.data.tags["research.error"] == failed.user_attrs["error"]
    assert run.data.tags["research.diverged_epoch"] == str(epochs_done)
    assert run.data.tags["research.diverged_step"] == str(int(diverged[2]) - 1)  # (from 0)
    assert run.data.tags["mlflow.note.content"] == f"FAIL: {failed.user_attrs['error']}"
    for key in EPOCH_METRICS:
        steps = [step for step, _ in history(uri, run.info.run_id, key)]
        assert steps == list(range(epochs_done)), key
    assert artifact_paths(uri, run.info.run_id) == set()

    run = runs[6]  # the study went on after the failure
    assert [step for step, _ in history(uri, run.info.run_id, "val/loss")] == [0, 1, 2]
    assert artifact_paths(uri, run.info.run_id) == {"loss_curves.png", "weights.npz", "weights.txt"}
    assert "trial 4 PRUNED after 2 epochs" in out
    assert f"trial 5 FAIL: {failed.user_attrs['error']}" in out

    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == best.value
    assert "test_accuracy" not in parent.data.metrics  # --no-final
    assert "refit_trial" not in parent.data.tags

    # rerun reproduces a pruned trial (the epochs it ran) and a diverged one (the divergence)
    code, out, err = run_cli(["rerun", runs[4].info.run_id, "--tracking-uri", uri])
    assert code == 0, out + err
    assert "(1000 training rows, 2 epochs)" in out
    assert "reproduced exactly: 2 epochs x 3 metrics identical\n" in out
    code, out, err = run_cli(["rerun", runs[5].info.run_id, "--tracking-uri", uri])
    assert code == 0, out + err
    assert (
        f"reproduced exactly: {epochs_done} epochs x 3 metrics identical, "
        f"then the same divergence: {failed.user_attrs['error']}"
    ) in out


# --- 3. the MLflow server's REST API over the study's store -------------------------------------


@pytest.mark.slow
def test_mlflow_server_serves_the_study_through_its_rest_api(tiny, tmp_path):
    parents, children = study_runs(tiny.uri)
    child = by_trial_number(children)[1]
    expected_history = history(tiny.uri, child.info.run_id, "val/loss")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tiny.uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # no background job runner (GenAI jobs, 8 more processes): this test reads runs only
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with started(
        command, tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as server:
        assert wait_for_http(f"{base}/health", server) == b"OK"
        api = f"{base}/api/2.0/mlflow"
        experiment = http_json(
            f"{api}/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": STUDY})
        )["experiment"]
        parent_id = parents[0].info.run_id
        found = http_json(
            f"{api}/runs/search",
            {
                "experiment_ids": [experiment["experiment_id"]],
                "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
                "max_results": 100,
            },
        )["runs"]
        numbers = sorted(
            int(tag["value"])
            for run in found
            for tag in run["data"]["tags"]
            if tag["key"] == "research.trial_number"
        )
        assert numbers == [0, 1, 2, 3, 4]
        trial_1 = next(run for run in found if run["info"]["run_id"] == child.info.run_id)
        assert trial_1["info"]["run_name"] == "trial-0001"
        metrics = http_json(
            f"{api}/metrics/get-history?"
            + urllib.parse.urlencode({"run_id": child.info.run_id, "metric_key": "val/loss"})
        )["metrics"]
        assert sorted((int(m["step"]), m["value"]) for m in metrics) == expected_history
        assert [step for step, _ in expected_history] == [0, 1]


# --- 4. rerun ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_reproduces_a_trial_exactly_and_rejects_unknown_runs(tiny, capfd):
    run_id = tiny.first_children[0]
    code = main(["rerun", run_id, "--tracking-uri", tiny.uri])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert f"rerunning {run_id} (2000 training rows, 2 epochs)" in out
    assert "reproduced exactly: 2 epochs x 3 metrics identical" in out
    assert "NOT reproduced" not in out and " *" not in out

    unknown = "0" * 32
    code = main(["rerun", unknown, "--tracking-uri", tiny.uri])
    out, err = capfd.readouterr()
    assert code == 2
    assert err.splitlines() == [
        f"error: no MLflow run with id {unknown!r} in {tiny.uri}; list runs with "
        "`python -m research ui` or pass the right --tracking-uri"
    ]

    parent_id = tiny.first_parents[0]  # a study's parent run has no training params
    code = main(["rerun", parent_id, "--tracking-uri", tiny.uri])
    out, err = capfd.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"error: run {parent_id} lacks the params hidden_size, "), line
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_rerun_says_when_the_run_used_other_blas_kernels(tiny, capfd):
    # Copies of a trial run, as if trained where OpenBLAS ran other kernels, or logged before
    # runs recorded them (MLflow params are immutable, so each copy is a new run with the same
    # params and metric histories), in an experiment of their own so that the other tests'
    # view of the study is unchanged.
    client = mlflow_client(tiny.uri)
    source = client.get_run(tiny.first_children[0])
    experiment_id = client.create_experiment("rerun-kernels")

    def copy_with(kernels: str | None) -> str:
        change = {"blas_kernels": kernels} if kernels else None
        return copy_run(client, source, experiment_id, drop=("blas_kernels",), change=change)

    code = main(["rerun", copy_with("Prescott"), "--tracking-uri", tiny.uri])
    out, err = capfd.readouterr()
    assert code == 0, out + err  # here the kernels are in fact the same: the values agree
    assert (
        f"note: the run used OpenBLAS's Prescott kernels and this process runs {loaded_kernels()}"
        in out
    )
    assert "OPENBLAS_CORETYPE=Prescott python -m research rerun" in out

    code = main(["rerun", copy_with(None), "--tracking-uri", tiny.uri])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "note: the run did not record its OpenBLAS kernels" in out
    assert f"this process runs {loaded_kernels()}" in out

    code = main(["rerun", tiny.first_children[0], "--tracking-uri", tiny.uri])
    out, _ = capfd.readouterr()
    assert code == 0 and "note:" not in out


# --- 5. bad study files and flags ---------------------------------------------------------------

BAD_STUDIES = {
    # id: (replace this, with this, the start of the key part of the message)
    "unknown-key": ("n_trials = 20 ", "n_trails = 20 ", "study.n_trails: unknown key"),
    "bad-range": ("low = 0.01\n", "low = 0.0\n", "search.learning_rate.low = 0.0"),
    "bad-name": ('activation = "relu"', 'activation = "rleu"', 'fixed.activation = "rleu"'),
}


@pytest.mark.parametrize(("old", "new", "key"), list(BAD_STUDIES.values()), ids=list(BAD_STUDIES))
def test_a_bad_study_file_is_one_line_naming_file_and_key(tmp_path, capfd, old, new, key):
    text = MNIST_MLP.read_text()
    assert text.count(old) == 1, old
    study_file = tmp_path / "bad.toml"
    study_file.write_text(text.replace(old, new))
    code = main(["study", str(study_file), "--tracking-uri", sqlite_uri(tmp_path)])
    out, err = capfd.readouterr()
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert line.startswith(f"error: {study_file}: {key}"), line
    assert not (tmp_path / "mlruns").exists()  # nothing was created


def test_a_missing_study_file(tmp_path, capfd):
    missing = tmp_path / "nope.toml"
    code = main(["study", str(missing), "--tracking-uri", sqlite_uri(tmp_path)])
    _, err = capfd.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"error: {missing}: cannot read the study file"), line


def test_a_bad_override_names_the_command_line(tmp_path, capfd):
    code = main(
        ["study", str(MNIST_MLP), "--n-trials", "0", "--tracking-uri", sqlite_uri(tmp_path)]
    )
    _, err = capfd.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"error: {MNIST_MLP}: study.n_trials = 0: out of range"), line
    assert "(given on the command line)" in line


@pytest.mark.parametrize(
    ("subset", "message"),
    [
        (
            "100",
            f"error: {MNIST_MLP}: search.batch_size.choices = [64, 128, 256]: [128, 256] larger "
            "than the 100 training rows; allowed: at most the 100 training rows",
        ),
        ("0", "error: --subset 0 must be between 1 and 50000"),
        ("50001", "error: --subset 50001 must be between 1 and 50000"),
    ],
    ids=["smaller-than-the-batches", "zero", "more-than-the-split"],
)
def test_a_subset_that_cannot_hold_a_batch_is_a_clear_error(tmp_path, capfd, subset, message):
    argv = ["study", str(MNIST_MLP), "--subset", subset, "--tracking-uri", sqlite_uri(tmp_path)]
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, out + err
    assert err.splitlines() == [message]
    assert not (tmp_path / "mlruns").exists()  # checked before any store is created


# --- 6. ui --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ui_binds_loopback_answers_and_stops_with_its_server(tiny, tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "research", "ui", "--port", str(port), "--tracking-uri", tiny.uri,
    ]  # fmt: skip
    # one server worker process instead of MLflow's 4: the machine under test may have 2 cores
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_WORKERS": "1"}
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    server_groups: set[int] = set()
    with (
        out.open("w") as stdout,
        err.open("w") as stderr,
        started(command, tmp_path, env=env, stdout=stdout, stderr=stderr) as ui,
    ):
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", ui)
            # `ui` prints its URL once its own probe has an answer too, a moment after ours,
            # then the links to the study's runs (table and charts)
            deadline = time.monotonic() + SERVER_WAIT
            while "charts:" not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            links = re.findall(r"^  (?:runs|charts): +(\S+)$", out.read_text(), re.M)
            assert len(links) == 2, out.read_text()
            for link in links:
                assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/"), link
                with urllib.request.urlopen(link, timeout=10) as response:
                    assert response.status == 200, link
            server_groups = {os.getpgid(pid) for pid in child_pids(ui.pid)}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                assert response.status == 200
                assert b"<html" in response.read(4096).lower()
            assert listening_addresses(port) == {"127.0.0.1"}

            # stopped the way a process manager stops it: SIGTERM to the `ui` process alone
            ui.send_signal(signal.SIGTERM)
            assert ui.wait(timeout=60) == 0
            assert listening_addresses(port) == set()
            for group in server_groups:
                assert wait_until_gone(group) == [], f"MLflow processes left in group {group}"
        finally:
            for group in server_groups:  # never leave a server behind, whatever failed
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
    assert out.read_text().splitlines()[0] == (
        f"MLflow UI on http://127.0.0.1:{port} over {tiny.uri} (Ctrl-C stops it)"
    )
    assert out.read_text().splitlines()[1].startswith(f"study {STUDY} (experiment ")
    assert "no authentication" not in err.read_text()
    assert "Traceback" not in err.read_text()  # the server's, when it is stopped


def test_ui_on_all_interfaces_warns_that_there_is_no_authentication(tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "research", "ui", "--host", "0.0.0.0", "--port", str(port),
        "--tracking-uri", sqlite_uri(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server_groups: set[int] = set()
    with started(
        command, tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as ui:
        try:
            # The warning comes first, the banner once the MLflow process is launched; stop at
            # once, long before MLflow has imported enough to bind 0.0.0.0.
            warning = ui.stderr.readline()
            banner = ui.stdout.readline()
            server_groups = {os.getpgid(pid) for pid in child_pids(ui.pid)}
            stop_group(ui)
            assert ui.returncode == 0
            for group in server_groups:
                assert wait_until_gone(group) == [], f"MLflow processes left in group {group}"
        finally:
            for group in server_groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
    assert warning == (
        "warning: binding the MLflow UI to 0.0.0.0: it has no authentication, anyone who can "
        "reach this address can read and change every run\n"
    )
    assert banner == (
        f"MLflow UI on http://0.0.0.0:{port} over {sqlite_uri(tmp_path)} (Ctrl-C stops it)\n"
    )
    assert len(server_groups) == 1


# --- 7. several workers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicates(tmp_path, capfd):
    uri = sqlite_uri(tmp_path)
    argv = [
        "study", str(MNIST_MLP), "--n-trials", "4", "--epochs", "1", "--subset", "1000",
        "--workers", "2", "--tracking-uri", uri, "--no-final", "--quiet",
    ]  # fmt: skip
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 0, out + err
    study = load_optuna_study(tmp_path)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    # Each worker checks the budget before it starts a trial, so two workers checking at once
    # may start one trial more than asked (never more than workers - 1 extra).
    assert sorted(numbers) == list(range(len(trials)))
    assert 4 <= len(trials) <= 5, numbers
    assert f"{len(trials)}/4 trials counted ({len(trials)} COMPLETE)" in out
    assert all(t.state.name == "COMPLETE" for t in trials)
    workers = {t.system_attrs["research:worker"] for t in trials}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), workers  # worker processes

    parents, children = study_runs(uri)
    assert len(parents) == 1
    assert len(children) == len(trials)
    runs = by_trial_number(children)  # fails on two runs for one trial
    assert sorted(runs) == sorted(numbers)
    for trial in trials:
        run = runs[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # the cores are shared by the 2 workers
        assert run.data.params["blas_threads"] == str(max(1, (os.cpu_count() or 1) // 2))
        for name, value in trial.params.items():
            assert run.data.params[name] == str(value)
        assert history(uri, run.info.run_id, "val/accuracy") == [(0, trial.value)]


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_queued_again(tmp_path, capfd):
    """A worker killed mid-trial leaves its trial RUNNING in the journal (no heartbeat) and its
    MLflow run RUNNING; resuming marks the trial FAIL, closes the run FAILED, retries its
    parameters, and still ends with the requested number of counted trials."""
    import optuna
    from optuna.trial import TrialState

    from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF, ATTR_WORKER
    from research.experiment.studies.optuna_compat import set_system_attr
    from research.experiment.tracking.study_runs import StudyTracker

    uri = sqlite_uri(tmp_path)
    code, _, err = run_cli([*tiny_study_argv(uri, 1), "--no-final"])
    assert code == 0, err
    # A process that has exited: its pid is free (not reused within this test in practice).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    study = load_optuna_study(tmp_path)
    stale = study.ask(
        {
            "hidden_size": optuna.distributions.IntDistribution(64, 1024, log=True),
            "learning_rate": optuna.distributions.FloatDistribution(0.01, 0.5, log=True),
            "batch_size": optuna.distributions.CategoricalDistribution([64, 128, 256]),
            "l2": optuna.distributions.CategoricalDistribution([0.0, 1e-5, 1e-4]),
        }
    )
    set_system_attr(stale, ATTR_WORKER, f"{socket.gethostname()}:{dead_pid}")
    tracker = StudyTracker.open(STUDY, uri)
    orphan = tracker.start_trial_run(STUDY, stale.number)

    code, out, err = run_cli([*tiny_study_argv(uri, 3), "--no-final"])
    assert code == 0, err
    assert f"trial {stale.number} was left RUNNING by a dead worker" in out
    study = load_optuna_study(tmp_path)
    failed = study.trials[stale.number]
    assert failed.state == TrialState.FAIL
    assert "died" in failed.system_attrs[ATTR_INTERRUPTED]
    retries = [t for t in study.trials if t.user_attrs.get(ATTR_RETRY_OF) == stale.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == stale.params
    counted = [
        t for t in study.trials
        if t.state != TrialState.RUNNING and ATTR_INTERRUPTED not in t.system_attrs
    ]  # fmt: skip
    assert len(counted) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    run = mlflow_client(uri).get_run(orphan.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["research.state"] == "FAIL"
    assert "died" in run.data.tags["research.error"]


def test_ctrl_c_records_the_trial_as_interrupted_and_resuming_runs_it_again(tmp_path, monkeypatch):
    """A KeyboardInterrupt during a trial's second epoch (what Ctrl-C raises): exit 130, the
    trial FAIL and marked interrupted, its MLflow run KILLED, its params queued; the same command
    then completes the study with the requested number of counted trials."""
    from optuna.trial import TrialState

    import research.experiment.studies.trials as trials_module
    from research.experiment.studies.liveness import ATTR_INTERRUPTED, ATTR_RETRY_OF

    real_train = trials_module.train

    def interrupted_train(*args, **kwargs):
        on_epoch = kwargs["on_epoch"]

        def on_epoch_then_ctrl_c(metrics, params):
            on_epoch(metrics, params)
            raise KeyboardInterrupt

        return real_train(*args, **{**kwargs, "on_epoch": on_epoch_then_ctrl_c})

    uri = sqlite_uri(tmp_path)
    monkeypatch.setattr(trials_module, "train", interrupted_train)
    code, _, err = run_cli([*tiny_study_argv(uri, 2), "--no-final"])
    assert code == 130
    assert "interrupted" in err and "run the same command again" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    study = load_optuna_study(tmp_path)
    (first,) = study.get_trials(states=(TrialState.FAIL,))
    assert "interrupted" in first.system_attrs[ATTR_INTERRUPTED]
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs[ATTR_RETRY_OF] == first.number
    _, children = study_runs(uri)
    (run,) = children
    assert run.info.status == "KILLED" and run.data.tags["research.state"] == "FAIL"

    monkeypatch.setattr(trials_module, "train", real_train)
    code, _, err = run_cli([*tiny_study_argv(uri, 2), "--no-final"])
    assert code == 0, err
    study = load_optuna_study(tmp_path)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    retry = next(t for t in complete if t.user_attrs.get(ATTR_RETRY_OF) == first.number)
    assert retry.params == first.params


def test_storage_passwords_are_never_shown():
    from research.experiment.tracking.stores import redact

    assert (
        redact("postgresql://alice:s3cret@db:5432/optuna")
        == "postgresql://alice:***@db:5432/optuna"
    )
    assert redact("postgresql://alice@db/optuna") == "postgresql://alice@db/optuna"
    assert redact("/tmp/optuna.journal") == "/tmp/optuna.journal"
