"""``python -m research report`` end to end: real studies in a temporary store (real Optuna journal,
real MLflow SQLite store, a subset of real MNIST), then the report command; no mocks."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from helpers import assert_close
from test_study import (
    PNG_MAGIC,
    PRUNE_FAIL_STUDY,
    artifact_paths,
    journal_storage,
    mlflow_client,
    run_cli,
    sqlite_uri,
)

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"
SEARCH_FIGURES = {
    "loss_curves.png",
    "val_accuracy_vs_params.png",
    "optimization_history.png",
    "param_importances.png",
}
TEST_FIGURES = {"confusion_matrix.png", "per_class_accuracy.png", "misclassified.png"}
N_TEST = 10_000


def assert_png(path: Path) -> None:
    """A readable, non-empty PNG at 150 dpi."""
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        dpi = image.info.get("dpi")
    assert width > 300 and height > 200, (path, image.size)
    assert dpi is not None and round(dpi[0]) == 150, (path, dpi)


def report_json(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The default study, 3 trials of 2 epochs on 2,000 rows with its final refit, then the
    report command (the default study name: the most recent one)."""
    folder = tmp_path_factory.mktemp("report")
    uri = sqlite_uri(folder)
    code, out, err = run_cli(
        [
            "study", str(MNIST_MLP), "--n-trials", "3", "--epochs", "2", "--subset", "2000",
            "--tracking-uri", uri, "--quiet",
        ]
    )  # fmt: skip
    assert code == 0, out + err
    code, out, err = run_cli(["report", "--tracking-uri", uri])
    return folder, uri, code, out, err


@pytest.mark.slow
def test_the_report_of_a_tiny_study_has_every_figure_and_consistent_numbers(tiny_report):
    folder, uri, code, out, err = tiny_report
    assert code == 0, out + err
    assert err == ""
    reports = folder / "mlruns" / "reports" / "mnist_mlp"
    assert "report written in " in out and str(reports / "report.html") in out

    expected = SEARCH_FIGURES | TEST_FIGURES
    pngs = {path.name for path in reports.glob("*.png")}
    assert pngs == expected
    for name in expected:
        assert_png(reports / name)
    assert not list(reports.parent.glob(".*")), "a staging folder was left behind"

    # The HTML embeds every figure (opens offline) and references no outside file.
    html = (reports / "report.html").read_text()
    for name in expected:
        encoded = base64.b64encode((reports / name).read_bytes()).decode()
        assert f'alt="{name}" src="data:image/png;base64,{encoded}"' in html, name
    assert not re.search(r'src="(?!data:)', html)
    # Markdown's code spans are <code> there, never backticks shown as they are
    body = html.split("<body>", 1)[1]
    assert "`" not in body and "<code>python -m research" in body
    markdown = (reports / "report.md").read_text()
    for name in expected:
        assert f"]({name})" in markdown, name

    # The same files are artifacts of the study's parent run.
    client = mlflow_client(uri)
    summary = report_json(reports)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["research.role"] == "study"
    logged = artifact_paths(uri, parent.info.run_id, "report")
    assert {f"report/{name}" for name in expected | {"report.html", "report.md"}} <= logged

    # One evaluation of the final refit on the whole test split, consistent with itself and with
    # the test_accuracy the study logged for the same weights.
    test = summary["test"]
    assert "retrained on train+validation" in test["source"]
    confusion = np.array(test["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum() == test["n"] == N_TEST
    assert np.trace(confusion) == test["correct"]
    per_class = test["per_class"]
    assert [row["n"] for row in per_class] == list(confusion.sum(axis=1))
    weighted = sum(row["accuracy"] * row["n"] for row in per_class) / N_TEST
    assert_close(weighted, test["accuracy"], "closed_form", "the weighted per-class accuracy")
    assert test["accuracy"] == parent.data.metrics["test_accuracy"]
    # And independently: the refit's weights through the JAX reference forward pass.
    from research.data import load_mnist
    from research.experiment.tracking.weights import load_weights
    from research.verify import reference

    weights = client.download_artifacts(parent.info.run_id, "best_weights.npz", str(folder))
    spec, params = load_weights(Path(weights))
    data = load_mnist()
    predicted = reference.forward(params, data.test.x, spec).argmax(axis=1)
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (data.test.labels, predicted), 1)
    assert (confusion == expected).all()
    assert test["ci_low"] < test["accuracy"] < test["ci_high"]
    assert test["ci_high"] - test["ci_low"] < 0.03  # 10,000 rows pin it to about ±1%
    assert f"test accuracy {100 * test['accuracy']:.2f}%" in out

    # Runs logged without a dataset param are MNIST's: its digits, and its published baseline
    # placed against the interval.
    from analysis.baselines import place

    assert summary["dataset"] == test["dataset"] == "mnist"
    assert [row["class"] for row in per_class] == [str(digit) for digit in range(10)]
    (baseline,) = test["baselines"]
    assert baseline["baseline"] == "Simard et al. (2003), MLP with 800 hidden units"
    assert baseline["accuracy_percent"] == 98.4
    assert baseline["place"] == place(98.4, test["ci_low"], test["ci_high"]) == "below"
    assert "on the 10,000 MNIST test digits" in out
    assert "against published MNIST results: ours is below Simard et al. (2003)" in out
    assert "Dataset: MNIST." in markdown
    assert "## Against published MNIST results" in markdown
    assert "| Simard et al. (2003), MLP with 800 hidden units | 98.4% | " in markdown

    # The report names the best trial the study chose.
    assert summary["best_trial"] == int(parent.data.tags["best_trial"])
    assert summary["states"] == {"COMPLETE": 3}
    assert set(summary["importances"]) == {"hidden_size", "learning_rate", "batch_size", "l2"}
    spread = summary["importances_leave_one_out"]  # one completed trial left out at a time
    assert set(spread) == set(summary["importances"])
    assert all(0 <= low <= high <= 1 for low, high in spread.values()), spread


@pytest.mark.slow
def test_running_the_report_again_replaces_it_whole(tiny_report):
    folder, uri, *_ = tiny_report
    reports = folder / "mlruns" / "reports" / "mnist_mlp"
    stale = reports / "stale.png"
    stale.write_bytes(PNG_MAGIC)
    out_dir = folder / "elsewhere"
    code, out, err = run_cli(["report", "mnist_mlp", "--tracking-uri", uri, "--out", str(out_dir)])
    assert code == 0, out + err
    assert {p.name for p in out_dir.glob("*.png")} == SEARCH_FIGURES | TEST_FIGURES
    missing = folder / "moved" / "optuna.journal"
    code, out, err = run_cli(
        ["report", "--tracking-uri", uri, "--no-log", "--storage", str(missing)]
    )
    assert code == 0, out + err
    assert not stale.exists()  # the folder was replaced, not merged into
    assert f"the Optuna storage {missing} does not exist; pass --storage" in out
    assert not missing.parent.exists()  # looking for it created nothing
    assert not (reports / "param_importances.png").exists()


@pytest.mark.slow
def test_the_comparison_takes_the_origin_from_a_train_run_of_the_exact_preset(
    tiny_report, tmp_path
):
    from dataclasses import replace

    from research.data import N_TRAIN
    from research.experiment.config.presets import PRESETS
    from research.experiment.tracking.runs import RunEnd, start_run

    uri = tiny_report[1]
    origin = PRESETS["origin"]
    # What `train --preset origin --evaluate-test` logged when the preset was called "seed";
    # then a shorter run, newer but not the origin's configuration, which the comparison must
    # not take.
    for name, epochs, test_accuracy in (("seed", 200, 0.448), ("origin", 5, 0.113)):
        run = start_run("train", tags={"preset": name}, tracking_uri=uri)
        config = replace(origin, epochs=epochs)
        run.log_params(
            {**config.as_texts(), "sizes": list(config.spec().sizes), "n_train_rows": N_TRAIN}
        )
        run.log_metrics({"val/accuracy": test_accuracy - 0.01}, step=epochs - 1)
        run.log_metrics({"test_accuracy": test_accuracy, "wall_seconds": 61.5}, step=epochs - 1)
        run.end(RunEnd.COMPLETE)
    out_dir = tmp_path / "report"
    code, out, err = run_cli(
        ["report", "mnist_mlp", "--tracking-uri", uri, "--no-log", "--out", str(out_dir)]
    )
    assert code == 0, out + err
    rows = [
        line for line in (out_dir / "report.md").read_text().splitlines()
        if line.startswith(("| origin", "| tuned best"))
    ]  # fmt: skip
    origin, tuned_origin, tuned = rows
    assert origin.startswith("| origin preset: [784, 30, 10]")
    assert "| 43.80% | 44.80% | 200 | 61.5 | 23,860 | train run " in origin
    assert "not in this store; run `python -m research study experiments/origin_baseline.toml`" in (
        tuned_origin
    )
    best = report_json(out_dir)["test"]["accuracy"]
    assert f"| {100 * best:.2f}% | 2 |" in tuned


@pytest.mark.slow
def test_failed_single_and_running_trials(tmp_path):
    """A diverged trial is counted and explained, a lone completed trial still gives a report
    (without importances, evaluated from the trial's own weights: no final refit), and a trial
    still running is left out and named."""
    import optuna

    from research.experiment.tracking.study_runs import StudyTracker

    # test_study's float32 network with linear outputs and momentum: quick trials, and a
    # learning rate that surely diverges. Two trials, so its median pruner never prunes.
    study_file = tmp_path / "edge.toml"
    study_file.write_text(PRUNE_FAIL_STUDY)
    uri = sqlite_uri(tmp_path)
    journal = tmp_path / "mlruns" / "optuna.journal"
    journal.parent.mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="edge", storage=journal_storage(journal), direction="maximize"
    )
    study.enqueue_trial({"hidden_size": 48, "learning_rate": 50.0})  # diverges
    study.enqueue_trial({"hidden_size": 64, "learning_rate": 0.02})  # (0.05 explodes: 1e24)
    code, out, err = run_cli(
        ["study", str(study_file), "--study-name", "edge", "--n-trials", "2", "--epochs", "2",
         "--subset", "1000", "--tracking-uri", uri, "--no-final", "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    assert "1 COMPLETE, 1 FAIL" in out, out
    # A worker that is still training trial 2: its MLflow run is open (RUNNING).
    tracker = StudyTracker.open("edge", uri)
    tracker.start_trial_run("edge", 2)

    code, out, err = run_cli(["report", "edge", "--tracking-uri", uri])
    assert code == 0, out + err
    reports = tmp_path / "mlruns" / "reports" / "edge"
    summary = report_json(reports)
    assert summary["states"] == {"COMPLETE": 1, "FAIL": 1}
    assert summary["skipped_running"] == [2]
    assert "1 trial(s) still running were left out: 2" in out
    assert "need at least 2 completed trials, the study has 1" in out
    assert summary["importances"] is None
    assert summary["test"]["source"].startswith("trial 1's weights")
    assert summary["test"]["logged_test_accuracy"] is None
    assert {p.name for p in reports.glob("*.png")} == (
        SEARCH_FIGURES - {"param_importances.png"}
    ) | TEST_FIGURES
    for path in reports.glob("*.png"):
        assert_png(path)
    markdown = (reports / "report.md").read_text()
    diverged = r"\| 0 \| training diverged at epoch 1, step \d+: the batch loss is inf"
    assert re.search(diverged, markdown)
    assert "1 FAIL" in markdown

    # A final fit of another trial (as when a later --no-final invocation found a better one):
    # not the best trial's refit, so not used.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent_id = tracker.parent_run_id
    assert "refit_trial" not in client.get_run(parent_id).data.tags  # --no-final
    client.set_tag(parent_id, "refit_trial", "0")
    code, out, err = run_cli(
        ["report", "edge", "--tracking-uri", uri, "--no-log", "--out", str(tmp_path / "other")]
    )
    assert code == 0, out + err
    assert "the study's final fit retrained trial 0, not the best trial 1 shown here" in out
    assert report_json(tmp_path / "other")["test"]["source"].startswith("trial 1's weights")

    # An unreadable weights artifact: one line, and no report folder.
    trial_run = next(
        run for run in client.search_runs([client.get_run(parent_id).info.experiment_id])
        if run.data.tags.get("research.trial_number") == "1"
    )  # fmt: skip
    artifacts = Path(unquote(urlparse(trial_run.info.artifact_uri).path))
    (artifacts / "weights.npz").write_bytes(b"not a zip file")
    out_dir = tmp_path / "broken"
    code, out, err = run_cli(
        ["report", "edge", "--tracking-uri", uri, "--no-log", "--out", str(out_dir)]
    )
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert line.startswith(
        "error: cannot evaluate trial 1's weights (trained on the training split only): the "
        f"artifact weights.npz of run {trial_run.info.run_id}: not a weights file"
    ), line
    assert not out_dir.exists()


def test_an_unknown_study_lists_the_studies_that_exist(tmp_path):
    from research.experiment.tracking.study_runs import StudyTracker

    uri = sqlite_uri(tmp_path)
    for name in ("mnist_mlp", "origin_baseline"):
        StudyTracker.open(name, uri)
    code, _out, err = run_cli(["report", "mnist_mpl", "--tracking-uri", uri])
    assert code == 2
    assert err == (
        f"error: no study named 'mnist_mpl' in {uri}; "
        "the studies there are: mnist_mlp, origin_baseline\n"
    )
    assert not (tmp_path / "mlruns" / "reports").exists()


def test_a_mistyped_store_is_an_error_and_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}"
    code, _out, err = run_cli(["report", "--tracking-uri", uri])
    assert code == 2
    assert err.startswith(
        f"error: there is no tracking store at {tmp_path / 'typo' / 'mlflow.db'};"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_store_without_studies_says_how_to_make_one(tmp_path):
    from research.experiment.tracking.runs import RunEnd, start_run

    uri = sqlite_uri(tmp_path)
    start_run("train", tracking_uri=uri).end(RunEnd.COMPLETE)  # a store with a train run only
    code, _out, err = run_cli(["report", "--tracking-uri", uri])
    assert code == 2
    assert err.startswith(f"error: there is no study in the tracking store {uri}; run one with")
    assert not (tmp_path / "mlruns" / "reports").exists()


def test_a_study_logged_before_the_search_space_was_reads_it_from_its_study_file(tmp_path):
    """Older parent runs have the study file but no study/search_space.json: the report reads the
    file's [search] tables, normalized as the study normalized them (int choices of a float
    field become floats), and keeps a table the field table no longer knows as it is."""
    from research.experiment.config.study_config import load_study_config
    from research.experiment.tracking.results import _as_searched, find_study, search_space
    from research.experiment.tracking.study_runs import StudyTracker

    uri = sqlite_uri(tmp_path)
    study_file = tmp_path / "old_study.toml"
    study_file.write_text(
        MNIST_MLP.read_text().replace("choices = [0.0, 1e-5, 1e-4]", "choices = [0, 1e-5, 1e-4]")
    )
    tracker = StudyTracker.open("old_study", uri)
    tracker.parent.log_params({"study_file": study_file.name})
    tracker.parent.log_artifact(study_file, "study")
    space = search_space(find_study("old_study", uri), uri)
    assert space == [param.as_dict() for param in load_study_config(study_file).search]
    (l2,) = [entry for entry in space if entry["name"] == "l2"]
    assert l2["choices"] == [0.0, 1e-5, 1e-4] and isinstance(l2["choices"][0], float)
    unknown = {"type": "float", "low": 0.0, "high": 0.5}  # (not a field of the table)
    assert _as_searched("label_smoothing", unknown) == {"name": "label_smoothing", **unknown}
