"""``python -m research reproduce``: the paper file, the Wilson interval, the budget, the table,
and the command end to end on a real MLflow store (``--quick``)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from research.cli import main
from research.experiment.config.fields import ConfigError
from research.experiment.config.paper_file import load_paper
from research.experiment.reproduction.paper_table import RowResult, results_table
from research.experiment.reproduction.reproduce import Splits, train_row
from research.experiment.training.stats import wilson_interval

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "experiments" / "dropout_paper.toml"

TINY = """
[paper]
name = "tiny_paper"
title = "A tiny table"
budget_minutes = 5

[quick]
epochs = 1
subset = 500

[[rows]]
name = "small relu"
paper_error = 10.0
[rows.fixed]
hidden_size = 16
epochs = 2
batch_size = 50

[[rows]]
name = "small sigmoid with dropout"
paper_error = 20.0
[rows.fixed]
hidden_size = 16
activation = "sigmoid"
input_dropout = 0.2
dropout = 0.5
max_norm = 2.0
epochs = 2
batch_size = 50
"""


def write(tmp_path: Path, text: str, name: str = "paper.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_dropout_paper_file_holds_the_four_rows_of_table_2():
    paper = load_paper(PAPER)
    assert [row.paper_error for row in paper.rows] == [1.60, 1.35, 1.25, 1.06]
    assert [paper.target(row) for row in paper.rows] == [1.75, 1.50, 1.40, 1.21]
    sizes = [row.config.spec().sizes for row in paper.rows]
    assert sizes == [(784, 800, 10)] + [(784, 1024, 1024, 1024, 10)] * 3
    activations = [row.config.activation for row in paper.rows]
    assert activations == ["sigmoid", "sigmoid", "relu", "relu"]
    assert [row.config.dropout for row in paper.rows] == [0.0, 0.5, 0.5, 0.5]
    assert [row.config.max_norm > 0 for row in paper.rows] == [False, False, False, True]
    assert paper.budget_minutes == 30


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval from its closed form (Wilson 1927), as fractions."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@settings(deadline=None)  # scipy's first import
@given(st.integers(1, 10_000), st.data())
def test_wilson_interval_matches_its_closed_form(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    expected = np.array(_wilson_by_hand(k, n))
    assert_close(np.array([low, high]), expected, "closed_form", f"the interval of {k} of {n}")
    assert 100 * low <= 100 * k / n <= 100 * high  # in percent, as the table shows it


def test_wilson_interval_of_the_papers_best_row():
    # 106 errors in 10,000: the interval is about ±0.2 points, so rows 0.15 apart overlap.
    low, high = (100 * end for end in wilson_interval(106, 10_000))
    assert 0.87 < low < 0.88 and 1.28 < high < 1.29


def test_table_marks_targets_and_budget_stops():
    paper = load_paper(PAPER)
    met = RowResult(paper.rows[0], epochs_planned=100, epochs=100, n_test=10_000, errors=175)
    missed = RowResult(
        paper.rows[3], epochs_planned=200, epochs=150, n_test=10_000, errors=122,
        stopped_by_budget=True,
    )  # fmt: skip
    diverged = RowResult(paper.rows[1], epochs_planned=200, diverged="the loss exploded")
    lines = results_table(paper, [met, missed, diverged]).splitlines()
    assert "| 1.60% | 1.75% (1.51–2.03) | ≤ 1.75% | yes | 100 |" in lines[2]
    assert "| 1.06% | 1.22% (1.02–1.45) | ≤ 1.21% | no | 150 of 200 (budget) |" in lines[3]
    assert "diverged: the loss exploded" in lines[4] and "| no |" in lines[4]


def _splits(mnist, rows: int) -> Splits:
    return Splits(
        mnist.train.x[:rows], mnist.train.labels[:rows], None, None,
        mnist.test.x[:1000], mnist.test.labels[:1000],
    )  # fmt: skip


def test_budget_stops_training_after_an_epoch_and_still_tests(tmp_path, mnist):
    paper = load_paper(write(tmp_path, TINY))
    row = paper.rows[1]
    result = train_row(row, _splits(mnist, 500), budget_seconds=0.0)
    assert result.stopped_by_budget
    assert result.epochs == 1 and len(result.history) == 1
    assert result.n_test == 1000 and 0 <= result.errors <= 1000
    within = train_row(row, _splits(mnist, 500), budget_seconds=3600.0)
    assert not within.stopped_by_budget and within.epochs == 2


def test_a_max_norm_row_says_whether_the_constraint_bound(tmp_path, mnist):
    """Per epoch, the fraction of hidden units at the radius: all of them at a tiny radius, none
    at a huge one, and the line printed under the row says so."""
    from dataclasses import replace

    from research.experiment.reproduction.paper_table import max_norm_line

    row = load_paper(write(tmp_path, TINY)).rows[1]
    tight = replace(row, config=replace(row.config, max_norm=0.01))
    held = train_row(tight, _splits(mnist, 500), budget_seconds=3600.0)
    assert held.units_at_max_norm == [1.0, 1.0]
    assert max_norm_line(held).startswith("max-norm 0.01: 100.0% of hidden units at the radius")
    loose = replace(row, config=replace(row.config, max_norm=1e6))
    free = train_row(loose, _splits(mnist, 500), budget_seconds=3600.0)
    assert free.units_at_max_norm == [0.0, 0.0]
    assert max_norm_line(free) == "max-norm 1e+06 never bound: no hidden unit reached it"
    plain = train_row(load_paper(write(tmp_path, TINY)).rows[0], _splits(mnist, 500), 3600.0)
    assert plain.units_at_max_norm == []


def test_a_row_trains_as_train_does(tmp_path, mnist):
    """The row's weights are the ones `train` gives for its fields: nothing is added."""
    from research.experiment.training.train import evaluate, train

    paper = load_paper(write(tmp_path, TINY))
    row = paper.rows[1]
    data = _splits(mnist, 500)
    result = train_row(row, data, budget_seconds=3600.0)
    reference = train(row.config, data.x_train, data.labels_train, None, None)
    _, accuracy = evaluate(reference.params, data.x_test, data.labels_test, row.config.spec())
    assert result.errors == round((1 - accuracy) * 1000)
    assert [m.train_loss for m in result.history] == [m.train_loss for m in reference.history]


@pytest.mark.parametrize(
    "change, expected",
    [
        (("[paper]", "[paper]\nsurprise = 1"), 'paper.surprise: unknown key'),
        (('paper_error = 10.0', ''), "rows[0].paper_error: missing (required)"),
        (('paper_error = 10.0', 'paper_error = 150'), "rows[0].paper_error = 150: out of range"),
        (("hidden_size = 16\nepochs = 2", "hidden_size = 0\nepochs = 2"),
         "rows[0].fixed.hidden_size = 0: out of range"),
        (("dropout = 0.5", "dropuot = 0.5"),
         'rows[1].fixed.dropuot: unknown key (did you mean "dropout"?)'),
        (('activation = "sigmoid"', 'activation = "sigmoid"\nloss = "bce"'),
         "rows[1].fixed: "),
        (('name = "small sigmoid with dropout"', 'name = "small relu"'),
         'rows: two rows are named "small relu"'),
        (("[quick]", "[quicker]"), 'quicker: unknown key (did you mean "quick"?)'),
        (('budget_minutes = 5', 'budget_minutes = -5'), "paper.budget_minutes = -5: out of range"),
        (("[paper]", "[paper"), "invalid TOML"),
    ],
)  # fmt: skip
def test_bad_paper_files_are_one_line_naming_file_and_key(tmp_path, capsys, change, expected):
    path = write(tmp_path, TINY.replace(*change, 1))
    with pytest.raises(ConfigError) as raised:
        load_paper(path)
    assert str(path) in str(raised.value) and expected in str(raised.value)
    code = main(["reproduce", str(path), "--no-track"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def test_unknown_row_number_and_missing_file_are_refused(tmp_path, capsys):
    path = write(tmp_path, TINY)
    assert main(["reproduce", str(path), "--rows", "3", "--no-track"]) == 2
    assert "--rows = 3: no such row; allowed: 1 to 2" in capsys.readouterr().err
    assert main(["reproduce", str(tmp_path / "none.toml"), "--no-track"]) == 2
    assert "cannot read the paper file" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_quick_logs_one_run_per_row_under_a_parent(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "table.md"
    code = main(
        ["reproduce", str(PAPER), "--quick", "--quiet", "--tracking-uri", store, "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = out.read_text()
    assert table in printed + "\n"
    assert "these are not results" in table
    assert table.count("| ≤ ") == 4
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("dropout_paper")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("research.role") == "reproduce"]
    rows = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(rows) == 4 and len(runs) == 5
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.params["quick"] == "True"
    summary = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "reproduce.json", str(tmp_path)))
        .read_text()
    )  # fmt: skip
    by_name = {r.info.run_name: r for r in rows}
    for entry in summary["rows"]:
        run = by_name[entry["name"]]
        assert entry["run_id"] == run.info.run_id
        assert run.data.metrics["test_error"] == pytest.approx(entry["error"])
        assert run.data.params["epochs"] == "2" and run.data.params["n_train_rows"] == "2000"
        assert entry["errors"] == round(entry["error"] * 100)
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
        held = client.get_metric_history(run.info.run_id, "units_at_max_norm")
        assert len(held) == (2 if entry["fields"]["max_norm"] else 0)
        assert (entry["units_at_max_norm"] is None) == (not held)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"loss_curves.png", "weights.npz", "weights.txt"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "reproduce.md",
        "reproduce.json",
        "rows_train_loss.png",
    }


@pytest.mark.slow
def test_a_diverging_row_is_reported_and_the_others_still_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    first = "hidden_size = 16\nepochs = 2"
    text = TINY.replace(first, first + "\nlearning_rate = 1000.0", 1)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["reproduce", str(write(tmp_path, text)), "--quiet", "--tracking-uri", store])
    printed = capsys.readouterr().out
    assert code == 1
    assert "| small relu |" in printed and "diverged: training diverged at epoch 1" in printed
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tiny_paper")
    statuses = {
        r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])
    }
    assert statuses == {
        "reproduce": "FAILED",  # one end state: a row diverged, so the table is a failure
        "small relu": "FAILED",
        "small sigmoid with dropout": "FINISHED",
    }


def test_holdout_keeps_validation_apart(mnist):
    from research.experiment.reproduction.reproduce import splits

    full = splits(mnist, holdout=False, subset=None)
    held = splits(mnist, holdout=True, subset=None)
    assert len(full.x_train) == 60_000 and full.x_val is None
    assert len(held.x_train) == 50_000 and len(held.x_val) == 10_000
    np.testing.assert_array_equal(full.x_train[50_000:], mnist.validation.images)
    assert full.x_train.dtype == np.uint8  # floats are made per batch
