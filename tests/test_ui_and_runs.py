"""What a user meets in the MLflow UI and optuna-dashboard: ``ui``'s links, and what the runs say.

A tiny study and a ``train`` run through the real command, real MLflow SQLite and Optuna journal
stores in a temporary folder, a real ``python -m research ui`` answering over HTTP; no mocks.
Only the saved view's version gate (another MLflow version than the installed one) runs against
a stub of MLflow's REST API.
"""

from __future__ import annotations

import getpass
import http.server
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from test_study import (
    COMMIT,
    MNIST_MLP,
    REPO,
    SERVER_WAIT,
    STUDY,
    artifact_dir,
    artifact_paths,
    by_trial_number,
    free_port,
    history,
    http_json,
    load_optuna_study,
    mlflow_client,
    run_cli,
    sqlite_uri,
    started,
    study_runs,
)

from research.experiment.config.fields import FIELDS, TrainConfig
from research.experiment.config.study_config import load_study_config
from research.experiment.studies.trials import ATTR_MLFLOW_EXPERIMENT, ATTR_MLFLOW_RUN
from research.experiment.tracking import ui
from research.experiment.tracking.runs import RunEnd, start_run
from research.experiment.tracking.ui import (
    COMPLETE_FILTER,
    COMPLETE_VIEW_KEY,
    MODE_HINT,
    TRAIN_PARAMS,
    VIEW_KEY,
    VIEW_TAG,
    Linked,
    _Output,
    ensure_view,
    linked_experiments,
    runs_link,
    say_links,
    view_state,
)
from research.experiment.tracking.weights import load_weights
from research.experiment.training.train import DivergenceError, EpochMetrics

NOTE = "mlflow.note.content"
LINK = re.compile(r"^  (runs|charts|complete): +(http://\S+)$")


@dataclass
class Store:
    folder: Path
    uri: str


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A 3-trial study of 2 epochs on 2,000 rows (no refit) and one ``train`` run."""
    folder = tmp_path_factory.mktemp("ui_and_runs")
    uri = sqlite_uri(folder)
    code, out, err = run_cli(
        ["study", str(MNIST_MLP), "--n-trials", "3", "--epochs", "2", "--subset", "2000",
         "--no-final", "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    code, out, err = run_cli(
        ["train", "--epochs", "2", "--subset", "2000", "--tracking-uri", uri, "--quiet"]
    )
    assert code == 0, out + err
    return Store(folder, uri)


def train_runs(uri: str) -> list:
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("train")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def check_weights_text(uri: str, run) -> None:
    """``weights.txt`` beside ``weights.npz``: every array's shape, and the load calls."""
    where = run.info.run_name
    assert {"weights.npz", "weights.txt"} <= artifact_paths(uri, run.info.run_id), where
    folder = artifact_dir(run)
    text = (folder / "weights.txt").read_text()
    spec, params = load_weights(folder / "weights.npz")
    for i, layer in enumerate(params):
        assert re.search(rf"^  W{i} +\({layer['W'].shape[0]}, {layer['W'].shape[1]}\)", text, re.M)
        assert re.search(rf"^  b{i} +\({layer['b'].shape[0]},\)", text, re.M), (where, text)
    assert " -> ".join(map(str, spec.sizes)) in text
    assert "from research.experiment.tracking.weights import load_weights" in text
    assert 'load_weights("weights.npz")' in text
    assert 'numpy.load("weights.npz", allow_pickle=False)' in text


def check_source(run, command: str) -> None:
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() == run.info.user_id
    assert tags["mlflow.source.name"] == f"python -m research {command}"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert COMMIT.fullmatch(tags["research.git_commit"])  # kept, with -dirty if so
    assert tags["research.git_commit"].startswith(tags["mlflow.source.git.commit"])


# --- what the runs say ----------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_say_how_they_ended_who_made_them_and_how_to_load_their_weights(store):
    parents, children = study_runs(store.uri)
    (parent,) = parents
    check_source(parent, "study")
    # the study command describes its parent: its trials and the best (no refit: --no-final)
    best = load_optuna_study(store.folder).best_trial
    assert parent.data.tags[NOTE] == (
        f"3 trials: 3 COMPLETE. Best trial {best.number}: val/accuracy {100 * best.value:.2f}%."
    )
    for number, run in by_trial_number(children).items():
        check_source(run, "study")
        accuracy = history(store.uri, run.info.run_id, "val/accuracy")[-1][1]
        expected = f"COMPLETE: val/accuracy {100 * accuracy:.2f}% after 2 epochs"
        assert run.data.tags[NOTE] == expected, number
        check_weights_text(store.uri, run)

    (run,) = train_runs(store.uri)
    check_source(run, "train")
    accuracy = history(store.uri, run.info.run_id, "val/accuracy")[-1][1]
    assert run.data.tags[NOTE] == f"COMPLETE: val/accuracy {100 * accuracy:.2f}% after 2 epochs"
    check_weights_text(store.uri, run)


def epoch(number: int, accuracy: float) -> EpochMetrics:
    return EpochMetrics(number, 0.5, 0.4, accuracy, 1.0, 0.1)


def test_a_pruned_or_failed_run_says_so_in_its_description(tmp_path):
    uri = sqlite_uri(tmp_path)
    config = TrainConfig(epochs=8)

    pruned = start_run("described", "pruned", {"command": "study"}, uri)
    pruned.log_config(config, 2000)
    for number, accuracy in enumerate((0.9502, 0.9613)):
        pruned.log_epoch(epoch(number, accuracy))
    pruned.end(RunEnd.PRUNED)

    diverged = start_run("described", "diverged", {"command": "study"}, uri)
    diverged.log_config(config, 2000)
    diverged.log_epoch(epoch(0, 0.5))
    error = DivergenceError(1, 17, "the loss is nan")
    diverged.diverged(error)

    killed = start_run("described", "killed", {"command": "train"}, uri)
    killed.log_config(config, 2000)
    killed.end(RunEnd.KILLED, "interrupted (Ctrl-C)")

    cut = start_run("described", "cut", {"command": "reproduce"}, uri)
    cut.log_config(config, 2000, validation=False)
    cut.log_epoch(epoch(2, float("nan")))  # no validation split: no accuracy to tell
    cut.end(RunEnd.COMPLETE)

    client = mlflow_client(uri)
    tags = {
        run.info.run_name: (run.info.status, run.data.tags)
        for run in client.search_runs([pruned.experiment_id])
    }
    assert tags["pruned"][0] == "FINISHED"
    assert tags["pruned"][1][NOTE] == "PRUNED at epoch 2 of 8: val/accuracy 96.13%"
    assert tags["pruned"][1]["research.state"] == "PRUNED"  # as before, beside the description
    assert (
        tags["diverged"][1][NOTE]
        == f"FAIL: {error}"
        == f"FAIL: {tags['diverged'][1]['research.error']}"
    )
    assert tags["killed"][0] == "KILLED"
    assert tags["killed"][1][NOTE] == "FAIL: interrupted (Ctrl-C)"
    assert tags["cut"][1][NOTE] == "COMPLETE after 3 of 8 epochs"
    assert tags["cut"][1]["mlflow.source.name"] == "python -m research reproduce"


# --- what optuna-dashboard shows ---------------------------------------------------------------


@pytest.mark.slow
def test_trials_name_their_mlflow_runs_and_the_study_its_objective(store):
    study = load_optuna_study(store.folder)
    assert study.metric_names == ["val/accuracy"]  # not "Objective 0"
    _, children = study_runs(store.uri)
    runs = by_trial_number(children)
    assert sorted(runs) == [trial.number for trial in study.trials] == [0, 1, 2]
    for trial in study.trials:
        run = runs[trial.number]
        assert trial.user_attrs[ATTR_MLFLOW_RUN] == run.info.run_id
        assert trial.user_attrs[ATTR_MLFLOW_EXPERIMENT] == run.info.experiment_id


# --- ui -------------------------------------------------------------------------------------------


def wait_for_lines(path: Path, process, count: int) -> list[str]:
    """The lines of ``path`` once it has ``count`` of them (bounded); fails if ``process``
    exits first."""
    deadline = time.monotonic() + SERVER_WAIT
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines()
        if len(lines) >= count:
            return lines
        if process.poll() is not None:
            pytest.fail(f"ui exited with code {process.returncode}: {lines}")
        time.sleep(0.2)
    pytest.fail(f"ui printed {path.read_text()!r} in {SERVER_WAIT} s, not {count} lines")


@pytest.mark.slow
def test_ui_prints_links_to_the_best_runs_that_answer_and_stops_quietly(store, tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "research", "ui", "--port", str(port), "--tracking-uri", store.uri,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    base = f"http://127.0.0.1:{port}"
    with out.open("w") as stdout, err.open("w") as stderr:
        with started(command, tmp_path, env=env, stdout=stdout, stderr=stderr) as ui:
            # the banner; the study's title and 3 links; train's title and 2; the mode hint
            lines = wait_for_lines(out, ui, 9)
            assert lines[8] == MODE_HINT
            assert lines[0] == f"MLflow UI on {base} over {store.uri} (Ctrl-C stops it)"
            study_id = mlflow_client(store.uri).get_experiment_by_name(STUDY).experiment_id
            (train,) = train_runs(store.uri)
            assert lines[1] == f"study {STUDY} (experiment {study_id}), best val/accuracy first:"
            train_id = train.info.experiment_id
            assert (
                lines[5]
                == f"train runs in 'train' (experiment {train_id}), best val/accuracy first:"
            )
            links = {}
            for line, kind, experiment_id in (
                (lines[2], "runs", study_id),
                (lines[3], "charts", study_id),
                (lines[4], "complete", study_id),
                (lines[6], "runs", train_id),
                (lines[7], "charts", train_id),
            ):
                match = LINK.match(line)
                assert match and match[1] == kind, line
                links[kind, experiment_id] = match[2]
            for (kind, experiment_id), link in links.items():
                # each link answers 200 with the UI's page, and opens that experiment's runs in
                # the Model training mode through the saved view (in the charts for "charts")
                with urllib.request.urlopen(link, timeout=10) as response:
                    assert response.status == 200, link
                    assert b"<html" in response.read(4096).lower()
                page, _, fragment = link.partition("#")
                assert page == f"{base}/"
                path, _, query = fragment.partition("?")
                assert path == f"/experiments/{experiment_id}/runs"
                key = COMPLETE_VIEW_KEY if kind == "complete" else VIEW_KEY
                expected = {"workflowType": ["machine_learning"], "viewStateShareKey": [key]}
                if kind == "charts":
                    expected["compareRunsMode"] = ["CHART"]
                assert urllib.parse.parse_qs(query) == expected, link

            # the saved view: sorted by val/accuracy, best first, with the metric columns, the
            # state and the searched params (the train runs': the fields declared as columns)
            searched = load_study_config(MNIST_MLP).search_names
            columns_of_train = tuple(name for name, field in FIELDS.items() if field.column)
            assert {"hidden_size", "learning_rate", "dataset"} <= set(columns_of_train)
            for experiment_id, params in ((study_id, searched), (train_id, columns_of_train)):
                answer = http_json(
                    f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
                )
                tags = {t["key"]: t["value"] for t in answer["experiment"]["tags"]}
                envelope = json.loads(tags[VIEW_TAG])
                assert envelope["name"] == "best val/accuracy first"
                state = json.loads(envelope["state"])
                assert state["orderByKey"] == "metrics.`val/accuracy`"
                assert state["orderByAsc"] is False
                columns = state["selectedColumns"]
                assert {
                    "tags.`research.state`",
                    "metrics.`val/accuracy`",
                    "metrics.`val/loss`",
                } <= set(columns)
                assert {f"params.`{name}`" for name in params} <= set(columns)
                # that order puts the study's best trial first
                body = {
                    "experiment_ids": [experiment_id],
                    "order_by": ["metrics.`val/accuracy` DESC"],
                    "max_results": 1,
                }
                (first,) = http_json(f"{base}/api/2.0/mlflow/runs/search", body)["runs"]
                if experiment_id == study_id:
                    best = load_optuna_study(store.folder).best_trial
                    assert first["info"]["run_id"] == best.user_attrs[ATTR_MLFLOW_RUN]

            # the next start finds the view in the listing and keeps it (a user's change too)
            mine = json.dumps({"name": "mine", "createdAt": 1, "updatedAt": 1, "state": "{}"})
            body = {"experiment_id": study_id, "key": VIEW_TAG, "value": mine}
            http_json(f"{base}/api/2.0/mlflow/experiments/set-experiment-tag", body)
            (study_view, _) = linked_experiments(base)
            assert study_view.experiment_id == study_id and study_view.tags[VIEW_TAG] == mine
            assert ensure_view(base, study_view)
            answer = http_json(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={study_id}")
            assert {t["key"]: t["value"] for t in answer["experiment"]["tags"]}[VIEW_TAG] == mine

            ui.send_signal(signal.SIGTERM)
            assert ui.wait(timeout=60) == 0
    # stopping the server printed nothing: no CancelledError traceback, no warnings, no
    # access log lines
    assert err.read_text() == ""
    assert len(out.read_text().splitlines()) == 9


def test_links_without_a_saved_view_carry_the_sort_in_the_url():
    study = Linked("3", "study s (experiment 3)", "val/accuracy", False, ("l2",), {})
    assert runs_link("http://127.0.0.1:5000", study, view=False) == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&orderByKey=metrics.%60val/accuracy%60&orderByAsc=false"
    )
    losses = Linked("4", "study t (experiment 4)", "val/loss", True, (), {})
    assert runs_link("http://[::1]:5000", losses, view=False, chart=True) == (
        "http://[::1]:5000/#/experiments/4/runs?workflowType=machine_learning"
        "&orderByKey=metrics.%60val/loss%60&orderByAsc=true&compareRunsMode=CHART"
    )
    assert view_state(losses)["selectedColumns"][:4] == [
        "tags.`research.state`",
        "metrics.`val/loss`",
        "metrics.`val/accuracy`",
        "metrics.`train/loss`",
    ]


def test_a_train_runs_view_shows_the_fields_the_table_declares_as_columns():
    assert TRAIN_PARAMS == tuple(name for name, field in FIELDS.items() if field.column)
    assert {"dataset", "hidden_size", "optimizer", "learning_rate", "epochs"} <= set(TRAIN_PARAMS)
    assert "seed" not in TRAIN_PARAMS  # a few columns that tell runs apart, not all 28


class StubMLflow(http.server.BaseHTTPRequestHandler):
    """Just enough of MLflow's REST API for ``say_links``: a study (experiment 1) and ``train``
    runs (experiment 2); every page answers 200; set-experiment-tag calls are kept."""

    tags_written: ClassVar[list[dict]] = []

    def do_GET(self):
        self.answer(b"<html></html>", "text/html")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path.removeprefix("/api/2.0/mlflow/")
        if path == "experiments/search":
            experiments = [{"experiment_id": i, "name": n} for i, n in (("1", "s"), ("2", "t"))]
            answer = {"experiments": experiments}
        elif path == "runs/search" and "research.role" in body["filter"]:
            params = [{"key": "objective", "value": "val/loss"}, {"key": "search.l2", "value": ""}]
            run = {"info": {"experiment_id": "1"}, "data": {"params": params}}
            answer = {"runs": [run]}
        elif path == "runs/search":
            answer = {"runs": [{}] if body["experiment_ids"] == ["2"] else []}
        else:
            assert path == "experiments/set-experiment-tag", path
            StubMLflow.tags_written.append(body)
            answer = {}
        self.answer(json.dumps(answer).encode(), "application/json")

    def answer(self, content: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_mlflow():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubMLflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubMLflow.tags_written = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("version", ["3.17.2", "3.17.0", "3.18.0", "4.0.1", "3.2.0"])
def test_the_saved_view_is_written_only_for_an_mlflow_whose_format_is_known(
    stub_mlflow, monkeypatch, capsys, version
):
    """MLflow's saved view is undocumented: for another version than 3.17 ``ui`` writes none,
    says so once, and its links carry the sort (which every version's URLs take)."""
    monkeypatch.setattr(ui, "mlflow_version", lambda: version)
    said: list[str] = []
    say_links(stub_mlflow, said.append)
    err = capsys.readouterr().err
    links = [line.split()[-1] for line in said if line.startswith("  ")]
    assert len(links) == 5  # runs and charts, of the study and of the train runs; complete
    complete_tag = f"mlflow.sharedViewState.{COMPLETE_VIEW_KEY}"
    if version.startswith("3.17."):
        written = [body["key"] for body in StubMLflow.tags_written]
        assert written == [VIEW_TAG, complete_tag, VIEW_TAG]  # the study's two, train's one
        assert all(f"viewStateShareKey={VIEW_KEY}" in link for link in links[:2] + links[3:])
        assert f"viewStateShareKey={COMPLETE_VIEW_KEY}" in links[2]
        complete = json.loads(json.loads(StubMLflow.tags_written[1]["value"])["state"])
        assert complete["searchFilter"] == COMPLETE_FILTER
        assert err == ""
    else:
        assert StubMLflow.tags_written == []
        assert not any("viewStateShareKey" in link for link in links)
        assert all("orderByKey=metrics.%60val/" in link for link in links)
        query = urllib.parse.parse_qs(links[2].partition("?")[2])
        assert query["searchFilter"] == [COMPLETE_FILTER]  # the filter in the URL instead
        assert err.count("note:") == 1 and f"MLflow {version} may save views differently" in err
        assert said[-2].startswith("(to see the metrics, add their columns")
    assert said[-1] == ui.MODE_HINT and '"Model training"' in said[-1]  # every version: 3.x


def test_the_servers_warnings_are_dropped_and_nothing_passes_once_it_is_stopped(capfd):
    read, write = os.pipe()
    with os.fdopen(read, "rb") as stream:
        output = _Output(stream)
        output.passing.set()
        os.write(
            write,
            b"INFO: Started server process\n"
            b"/x/fastapi_app.py:23: StarletteDeprecationWarning: starlette.middleware.wsgi is\n"
            b"  from starlette.middleware.wsgi import WSGIResponder\n"
            b"/y/z.py:5: FutureWarning: soon\n"
            b"ERROR: a real error\n",
        )
        passed = ""
        deadline = time.monotonic() + 10
        while "a real error" not in passed and time.monotonic() < deadline:
            time.sleep(0.05)
            passed += capfd.readouterr().err
        assert passed == "INFO: Started server process\nERROR: a real error\n"
        output.passing.clear()  # as ``ui`` does before it stops the server
        os.write(write, b"ERROR:    Traceback (most recent call last):\n  CancelledError\n")
        os.close(write)
        output.thread.join(timeout=10)
    assert capfd.readouterr().err == ""
    assert list(output.lines) == [
        "ERROR:    Traceback (most recent call last):",
        "  CancelledError",
    ]
