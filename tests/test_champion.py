"""A study's champion (docs/models.md): ``models:/<study>@champion`` moves only to the refit of
the study's best trial, whichever command finishes last; and MLflow models a killed process left
PENDING are failed by the next command. Real stores in temporary folders, real processes and
signals, no mocks.

- The compare-and-set itself: refits published in the "wrong" order (a worse one after a better
  one, a stale one, the same one again), and an alias another writer moved to a worse version
  (as two publishers on a tracking server, which has no lock, may leave it), repaired.
- Two ``study`` commands on one journal and one SQLite store: A is stopped (SIGSTOP) in the
  middle of trial 0, B runs trial 1 on fewer rows (worse) and starts its refit, is stopped, A
  is continued and finishes (trial 0 best, refit, champion), then B is continued and finishes
  last. The alias, the parent run's ``best_trial`` and ``refit_trial`` and its
  ``best_weights.npz`` must agree with Optuna's best. (The same with PostgreSQL and an MLflow
  server: tests/test_several_machines.py.)
- Two commands started 50 ms apart on a new study register at most one version per refit.
- A ``kill -9`` while the refit's model is being logged leaves a PENDING LoggedModel; the next
  command of the study marks it FAILED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from test_reliability import ENV
from test_several_machines import Checks, Machine
from test_study import journal_storage, mlflow_client, run_cli, sqlite_uri, study_runs

from research.experiment.tracking.stores import sqlalchemy_url

NAME = "champion"
EPOCHS = 3
MID_TRIAL = rf"^trial (\d+) epoch 1/{EPOCHS}:"
REFITTING = r"^retraining the best configuration \(trial (\d+)\)"
WAIT = 240  # seconds any one command may take on a busy 2-core machine
STUDY = {
    "study": {
        "name": NAME,
        "objective": "val/accuracy",
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "seed": 0,
    },
    "fixed": {"epochs": EPOCHS, "hidden_size": 128},
    "search": {"l2": {"type": "categorical", "choices": [0.0, 1e-5]}},
}


def study_file(folder: Path) -> Path:
    path = folder / f"{NAME}.toml"
    path.write_text(tomli_w.dumps(STUDY))
    return path


def study_argv(path: Path, tracking: str, storage: str, subset: int) -> list[str]:
    return [
        "study", str(path), "--subset", str(subset), "--tracking-uri", tracking,
        "--storage", storage,
    ]  # fmt: skip


def signal_group(machine: Machine, number: int) -> None:
    os.killpg(machine.pid, number)


def optuna_trials(storage: str) -> list[Any]:
    """The study's trials as Optuna reads them (a journal path or a database URL)."""
    import optuna

    if "://" not in storage:
        return optuna.load_study(study_name=NAME, storage=journal_storage(Path(storage))).trials
    rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage))
    try:
        return optuna.load_study(study_name=NAME, storage=rdb).trials
    finally:
        rdb.engine.dispose()


# --- what must hold after any number of commands -------------------------------------------------


def champion_checks(tracking: str, storage: str, folder: Path) -> tuple[list[str], dict]:
    """What is wrong with the study's champion (the alias, the registry, the parent run) against
    Optuna's best, and what was found (for the failure message)."""
    from research.experiment.tracking.models import CHAMPION
    from research.experiment.tracking.weights import load_weights

    trials = optuna_trials(storage)
    complete = {t.number: t.value for t in trials if t.state.name == "COMPLETE"}
    best_value = max(complete.values())
    client = mlflow_client(tracking)
    (parent,), _ = study_runs(tracking, NAME)
    tags = parent.data.tags
    champion = client.get_model_version_by_alias(NAME, CHAMPION)
    versions = client.search_model_versions(f"name = '{NAME}'")
    refits = [(v.tags.get("refit_trial"), v.tags.get("research.refit_settings")) for v in versions]
    found = {
        "Optuna (COMPLETE trials: value)": complete,
        "champion": (champion.version, champion.tags),
        "parent best_trial, refit_trial": (tags.get("best_trial"), tags.get("refit_trial")),
        "versions (refit_trial, settings)": refits,
    }
    check = Checks()
    trial = int(champion.tags.get("refit_trial", -1))  # the trial the version is the refit of
    check(
        complete.get(trial) == best_value,
        "the champion is the refit of a best COMPLETE trial (Optuna's best value)",
        (trial, complete.get(trial), best_value),
    )
    check(tags.get("refit_trial") == str(trial), "the parent's refit_trial is the champion's")
    check(
        complete.get(int(tags.get("best_trial", -1))) == best_value,
        "the parent's best_trial is a best trial",
    )
    check(champion.run_id == parent.info.run_id, "the champion comes from the study's parent run")
    check(len(set(refits)) == len(refits), "one version per refit (trial and settings)", refits)
    logged = client.get_metric_history(parent.info.run_id, "test_accuracy")
    last = max(logged, key=lambda m: (m.step, m.timestamp)).value if logged else None
    check(
        last == float(champion.tags["test_accuracy"]),
        "the parent's test_accuracy is the champion's",
        (last, champion.tags["test_accuracy"]),
    )
    # the parent's best_weights.npz is the champion model's network
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as the library does

    model_id = champion.source.removeprefix("models:/")
    model = Path(
        mlflow.artifacts.download_artifacts(
            # (a models:/ URI would be looked up in MLflow's default store, not `tracking`)
            artifact_uri=client.get_logged_model(model_id).artifact_location,
            dst_path=str(folder / "champion"),
            tracking_uri=sqlalchemy_url(tracking),
        )
    )
    ours = client.download_artifacts(parent.info.run_id, "best_weights.npz", str(folder))
    _, served = load_weights(next(model.rglob("weights.npz")))
    _, kept = load_weights(Path(ours))
    same = all(
        np.array_equal(a[k], b[k]) for a, b in zip(served, kept, strict=True) for k in ("W", "b")
    )
    check(same, "the parent's best_weights.npz is the champion model's weights")
    linked = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions", "[]"))
    check(
        {"name": NAME, "version": str(champion.version)} in linked,
        "the champion's MLflow model names its registered version (the UI: not 'Not registered')",
        linked,
    )
    models = client.search_logged_models([parent.info.experiment_id])
    pending = [m.model_id for m in models if m.status.name == "PENDING"]
    check(not pending, "no MLflow model left PENDING", pending)
    return check.failed, found


# --- the compare-and-set, directly ---------------------------------------------------------------


@pytest.fixture
def parent_run(tmp_path):
    from research.experiment.tracking.runs import start_run

    return start_run("cas", tracking_uri=sqlite_uri(tmp_path))


def publish(run: Any, trial: int, value: float, settings: str = "s", best: bool = True):
    """Publishes a refit of ``trial`` (a tiny real network) as the study ``cas``'s champion;
    (what happened, how often ``with_champion`` was called)."""
    from research.engine.mlp import init_params
    from research.experiment.config.fields import TrainConfig
    from research.experiment.tracking.models import Refit, log_model, publish_champion

    config = TrainConfig(hidden_size=8, epochs=1)
    params = init_params(config.spec(), seed=trial, dtype=np.float32)
    images = np.zeros((2, 784), np.uint8)
    written: list[bool] = []
    published = publish_champion(
        run,
        "cas",
        Refit(trial, value, "maximize", "val/accuracy", settings),
        log=lambda tags, _: log_model(run, params, config, images, 0, tags),
        still_best=lambda: best,
        with_champion=lambda: written.append(True),
        tags={"test_accuracy": value},
    )
    return published, written


def alias_of(run: Any) -> str:
    return str(run.client.get_model_version_by_alias("cas", "champion").version)


@pytest.mark.slow
def test_the_alias_moves_only_to_a_refit_at_least_as_good(parent_run):
    from research.experiment.tracking.models import Refit

    run = parent_run
    first, written = publish(run, 0, 0.90)
    assert (first.outcome, first.version, written) == ("champion", "1", [True])
    # the wrong order: a worse refit published after the better one (the last writer)
    worse, written = publish(run, 1, 0.80)
    assert (worse.outcome, worse.version, written) == ("superseded", "1", [])
    assert worse.model_uri is not None  # logged on the run, not registered
    # a refit whose trial is no longer the study's best, though better than the champion
    stale, written = publish(run, 2, 0.95, best=False)
    assert (stale.outcome, stale.version, written) == ("superseded", "1", [])
    # the champion's very refit again (another command made it too): nothing new
    same, written = publish(run, 0, 0.90)
    assert (same.outcome, same.version, same.model_uri, written) == ("kept", "1", None, [])
    # as good (a tie, or the same trial on other rows): the alias moves
    other_rows, written = publish(run, 0, 0.90, settings="more rows")
    assert (other_rows.outcome, other_rows.version, written) == ("champion", "2", [True])
    assert alias_of(run) == "2"
    versions = run.client.search_model_versions("name = 'cas'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    # (rank: larger is better, whichever the direction)
    lower, higher = (Refit(n, v, "minimize", "val/loss", "s") for n, v in ((0, 0.3), (1, 0.5)))
    assert lower.rank() > higher.rank()


@pytest.mark.slow
def test_an_alias_moved_back_by_an_interleaved_writer_is_repaired(parent_run):
    """A tracking server has no lock: a publisher that read the champion before a better one
    was registered can set the alias after it. The next read-back moves it to the best tagged
    refit again."""
    from research.experiment.tracking.models import Refit, _register, settle_alias

    run = parent_run
    publish(run, 0, 0.90)
    worse = Refit(1, 0.80, "maximize", "val/accuracy", "s")
    uri = f"models:/{run.client.create_logged_model(run.experiment_id, name='m').model_id}"
    late = _register(run, "cas", uri, worse.tags())  # registered and aliased without a compare
    run.client.set_registered_model_alias("cas", "champion", late)
    assert alias_of(run) == late
    assert settle_alias(run.client, "cas", run.run_id, late, run.tracking_uri) == "1"
    assert alias_of(run) == "1"


# --- two commands on one study ------------------------------------------------------------------


def run_stale_refit(folder: Path, tracking: str, storage: str) -> tuple[dict, dict, list[str]]:
    """A (3,000 rows) stopped mid-trial 0; B (300 rows: worse) runs trial 1 and is stopped in its
    refit; A continued to its end; B continued, finishing last. Returns (exit codes, stdouts,
    story)."""
    path = study_file(folder)
    env = {**ENV, "RESEARCH_HEARTBEAT_GRACE": "3600"}  # a stopped command is not stale here
    story: list[str] = []
    machines: list[Machine] = []
    try:
        a = Machine("A", study_argv(path, tracking, storage, 3000), folder / "a", env, False)
        machines.append(a)
        stopped = int(a.wait_for(MID_TRIAL, WAIT)[1])
        signal_group(a, signal.SIGSTOP)
        story.append(f"A stopped in trial {stopped}")
        b = Machine("B", study_argv(path, tracking, storage, 300), folder / "b", env, False)
        machines.append(b)
        refit = int(b.wait_for(REFITTING, WAIT)[1])
        signal_group(b, signal.SIGSTOP)
        story.append(f"B stopped while refitting trial {refit}")
        assert (stopped, refit) == (0, 1), f"A was not stopped mid-trial 0: {story}"
        assert "MLflow model" not in b.stdout, "B published its refit before it was stopped"
        signal_group(a, signal.SIGCONT)
        codes = {"A": a.finish(WAIT)}
        story.append(f"A finished ({codes['A']})")
        signal_group(b, signal.SIGCONT)
        codes["B"] = b.finish(WAIT)
        story.append(f"B finished ({codes['B']})")
    finally:
        for machine in machines:
            if machine.process.poll() is None:
                machine.kill_group()
    story += [m.describe(last=6) for m in machines]
    return codes, {m.name: m.stdout for m in machines}, story


def check_stale_refit(
    tracking: str, storage: str, folder: Path, codes: dict, outs: dict, story: list[str]
) -> None:
    """The champion is trial 0's refit (A's); B, finishing last with trial 1's, said so."""
    trials = {t.number: t for t in optuna_trials(storage)}
    # the scenario itself: trial 0 (10x the rows) is the better one
    assert trials[0].value > trials[1].value, (trials[0].value, trials[1].value, story)
    failed, found = champion_checks(tracking, storage, folder)
    check = Checks()
    check(codes == {"A": 0, "B": 0}, "both commands exited 0", codes)
    versions = mlflow_client(tracking).search_model_versions(f"name = '{NAME}'")
    check(len(versions) == 1, "one version: trial 0's refit", len(versions))
    said = "trial 1 is no longer the study's best (trial 0 is): models:/champion@champion stays"
    check(said in outs["B"], "B says why it did not move the alias")
    failed += check.failed
    assert not failed, "\n".join([*failed, "", *map(str, found.items()), "", *story])


@pytest.mark.slow
def test_a_command_finishing_last_with_a_stale_refit_does_not_take_the_champion(tmp_path):
    tracking = sqlite_uri(tmp_path)
    storage = str(tmp_path / "mlruns" / "optuna.journal")
    check_stale_refit(tracking, storage, tmp_path, *run_stale_refit(tmp_path, tracking, storage))


@pytest.mark.slow
def test_two_commands_started_together_register_each_refit_once(tmp_path):
    tracking = sqlite_uri(tmp_path)
    storage = str(tmp_path / "mlruns" / "optuna.journal")
    path = study_file(tmp_path)
    machines = []
    try:
        for name in ("A", "B"):
            argv = study_argv(path, tracking, storage, 2000)
            machines.append(Machine(name, [*argv, "--quiet"], tmp_path / name, ENV, False))
            time.sleep(0.05)
        codes = {m.name: m.finish(WAIT) for m in machines}
    finally:
        for machine in machines:
            if machine.process.poll() is None:
                machine.kill_group()
    story = [m.describe(last=6) for m in machines]
    failed, found = champion_checks(tracking, storage, tmp_path)
    if codes != {"A": 0, "B": 0}:
        failed.append(f"both commands exited 0: {codes}")
    # each command registered its refit, or said why not (the same refit is the champion
    # already, found before refitting or after; or its trial was no longer the best)
    said = [
        line
        for m in machines
        for line in m.out
        if "refit best as an MLflow model" in line
        or "the champion is already the refit" in line
        or "is no longer the study's best" in line
    ]
    registered = [line for line in said if "refit best as an MLflow model" in line]
    versions = mlflow_client(tracking).search_model_versions(f"name = '{NAME}'")
    if len(said) != 2 or len(registered) != len(versions):
        failed.append(f"each command registered its refit or said why not: {said}")
    print("\n".join(said))  # (shown with -s: which way it went this time)
    assert not failed, "\n".join([*failed, "", *map(str, found.items()), "", *story])


# --- a model left PENDING -----------------------------------------------------------------------

#: A process that dies (SIGKILL, for real) in the middle of logging an MLflow model: after MLflow
#: created the LoggedModel (PENDING), before its artifacts and status are written.
KILLED_WHILE_LOGGING = """
import os, signal, sys
import mlflow.models
mlflow.models.Model.log = staticmethod(lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
{body}
"""
LOG_ONE_MODEL = """
import numpy as np
from research.engine.mlp import init_params
from research.experiment.config.fields import TrainConfig
from research.experiment.tracking.models import log_model
from research.experiment.tracking.runs import start_run
config = TrainConfig(hidden_size=8, epochs=1)
run = start_run("pending", tracking_uri=sys.argv[1])
log_model(run, init_params(config.spec()), config, np.zeros((2, 784), np.uint8))
"""
RUN_A_STUDY = """
from research.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def killed_while_logging(body: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = KILLED_WHILE_LOGGING.format(body=body)
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


@pytest.mark.slow
def test_a_model_whose_writer_was_killed_is_failed_and_a_live_ones_is_not(tmp_path):
    from research.experiment.tracking.pending_models import TAG_WRITER, fail_abandoned_models
    from research.experiment.tracking.processes import process_identity
    from research.experiment.tracking.runs import TrackedRun

    tracking = sqlite_uri(tmp_path)
    done = killed_while_logging(LOG_ONE_MODEL, [tracking], tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name("pending").experiment_id
    (dead,) = client.search_logged_models([experiment])
    assert dead.status.name == "PENDING"
    # being logged right now: by this process, and by one on another host
    live = client.create_logged_model(
        experiment, name="live", tags={TAG_WRITER: process_identity()}
    )
    elsewhere = client.create_logged_model(
        experiment, name="elsewhere", tags={TAG_WRITER: "another-host:1:1"}
    )
    (run,) = client.search_runs([experiment])
    failed = fail_abandoned_models(TrackedRun(client, run.info.run_id, experiment, tracking))
    assert failed == [dead.model_id]
    status = {m.model_id: m.status.name for m in client.search_logged_models([experiment])}
    assert status == {
        dead.model_id: "FAILED",
        live.model_id: "PENDING",
        elsewhere.model_id: "PENDING",
    }
    assert "died" in client.get_logged_model(dead.model_id).tags["research.error"]


@pytest.mark.slow
def test_the_next_command_fails_a_model_left_pending_by_a_killed_refit(tmp_path):
    tracking = sqlite_uri(tmp_path)
    storage = str(tmp_path / "mlruns" / "optuna.journal")
    argv = [*study_argv(study_file(tmp_path), tracking, storage, 1000), "--quiet"]
    killed = killed_while_logging(RUN_A_STUDY, argv, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "retraining the best configuration" in killed.stdout
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name(NAME).experiment_id
    (pending,) = client.search_logged_models([experiment])
    assert pending.status.name == "PENDING"

    code, out, err = run_cli(argv)  # the same command again
    assert code == 0, out + err
    assert "note: 1 MLflow model(s) left PENDING by a killed command: FAILED" in out
    status = {m.model_id: m.status.name for m in client.search_logged_models([experiment])}
    assert status.pop(pending.model_id) == "FAILED"
    assert list(status.values()) == ["READY"]  # the refit, registered as the champion
    failed, found = champion_checks(tracking, storage, tmp_path)
    assert not failed, "\n".join([*failed, *map(str, found.items())])
