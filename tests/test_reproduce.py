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


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table line, split at its unescaped pipes, as GFM does."""
    import re

    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_free_text_in_the_table_is_escaped(tmp_path):
    """A row named with a pipe and HTML stays one cell, shown as written, not as markup."""
    text = TINY.replace('name = "small relu"', 'name = "a|b <i>x</i> & [y](javascript:z)"', 1)
    paper = load_paper(write(tmp_path, text))
    done = RowResult(paper.rows[0], epochs_planned=2, epochs=2, n_test=1000, errors=100)
    diverged = RowResult(paper.rows[1], epochs_planned=2, diverged="a | b <script>x</script>")
    lines = results_table(paper, [done, diverged]).splitlines()
    assert _cells(lines[2])[0] == "a\\|b &lt;i&gt;x&lt;/i&gt; &amp; [y\\](javascript:z)"
    assert len(_cells(lines[2])) == len(_cells(lines[0])) == 8
    assert _cells(lines[3])[3] == "diverged: a \\| b &lt;script&gt;x&lt;/script&gt;"
    assert len(_cells(lines[3])) == 8
    assert "<" not in "".join(lines)


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
        # a target no result can miss: refused, not met by a 53.94% error
        (('budget_minutes = 5', 'budget_minutes = 5\ntolerance = 1e300'),
         "paper.tolerance = 1e+300: out of range; allowed: a number in [0, 10]"),
        (('budget_minutes = 5', 'budget_minutes = 5\ntolerance = -0.1'),
         "paper.tolerance = -0.1: out of range"),
        (('paper_error = 20.0', 'paper_error = 99.9'),
         "rows[1].paper_error = 99.9: plus paper.tolerance = 0.15 is 100% or more"),
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
    # Again: a divergence is a result, kept as the finished row is (it would diverge again).
    argv = ["reproduce", str(tmp_path / "paper.toml"), "--quiet", "--tracking-uri", store]
    assert main(argv) == 1
    again = capsys.readouterr().out
    assert 'row "small relu": diverged in run' in again and _table(again) == _table(printed)
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_holdout_keeps_validation_apart(mnist):
    from research.experiment.reproduction.reproduce import splits

    full = splits(mnist, holdout=False, subset=None)
    held = splits(mnist, holdout=True, subset=None)
    assert len(full.x_train) == 60_000 and full.x_val is None
    assert len(held.x_train) == 50_000 and len(held.x_val) == 10_000
    np.testing.assert_array_equal(full.x_train[50_000:], mnist.validation.images)
    assert full.x_train.dtype == np.uint8  # floats are made per batch


# --- running the same paper file again: kept rows, a killed command, --fresh, --out ---------------


def _runs(store: str, experiment: str = "tiny_paper") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found is not None else []


def _parents(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("research.role") == "reproduce"]


def _table(printed: str) -> str:
    """The table a command printed (its lines starting with ``|``)."""
    return "\n".join(line for line in printed.splitlines() if line.startswith("|"))


@pytest.mark.slow
def test_running_the_same_paper_file_again_trains_nothing_and_prints_the_same_table(
    tmp_path, capsys
):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    paper, out = str(write(tmp_path, TINY)), tmp_path / "table.md"
    argv = ["reproduce", paper, "--quick", "--quiet", "--tracking-uri", store, "--out", str(out)]
    assert main(argv) == 0
    first, first_file = capsys.readouterr().out, out.read_text()
    runs = _runs(store)
    (parent,) = _parents(runs)
    rows = {r.info.run_name: r.info.run_id for r in runs if r not in _parents(runs)}
    assert len(rows) == 2

    assert main(argv) == 0
    second = capsys.readouterr().out
    assert f"continuing parent run {parent.info.run_id} (FINISHED" in second
    for name, run_id in rows.items():
        assert f'row "{name}": finished in run {run_id}, kept' in second
    assert _table(second) == _table(first) and out.read_text() == first_file
    assert "max-norm 2 never bound" in second  # read back from the row's run, as printed before
    again = _runs(store)
    assert len(again) == 3 and all(r.info.status == "FINISHED" for r in again)
    assert {r.info.run_id for r in again} == {parent.info.run_id, *rows.values()}

    # --fresh: a new parent, every row trained; the next command continues that one
    assert main([*argv, "--fresh"]) == 0
    fresh = capsys.readouterr().out
    assert "kept" not in fresh and "continuing" not in fresh and _table(fresh) != ""
    after = _runs(store)
    assert len(_parents(after)) == 2 and len(after) == 6
    newest = max(_parents(after), key=lambda r: r.info.start_time).info.run_id
    assert main(argv) == 0
    assert f"continuing parent run {newest} (FINISHED" in capsys.readouterr().out
    assert len(_runs(store)) == 6


@pytest.mark.slow
def test_a_failed_parent_is_continued_and_only_the_unfinished_row_trains(
    tmp_path, capsys, monkeypatch
):
    """The second row crashes: the parent ends FAILED. The same command again keeps the first
    row, trains the second, and the parent ends FINISHED without the old error."""
    import research.experiment.reproduction.reproduce as reproduce

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["reproduce", str(write(tmp_path, TINY)), "--quick", "--quiet", "--tracking-uri", store]
    trained, crash = [], [True]

    def crash_on_dropout(config, *args, **kwargs):
        trained.append(config.activation)
        if config.dropout and crash[0]:
            raise RuntimeError("the machine fell over")
        return real_train(config, *args, **kwargs)

    real_train = reproduce.train
    monkeypatch.setattr(reproduce, "train", crash_on_dropout)
    with pytest.raises(RuntimeError):
        main(argv)
    capsys.readouterr()
    (parent,) = _parents(_runs(store))
    assert parent.info.status == "FAILED" and "research.error" in parent.data.tags
    (first,) = [r for r in _runs(store) if r.info.run_name == "small relu"]

    trained.clear()
    crash[0] = False
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert trained == ["sigmoid"]  # only the row that had not finished
    assert f'row "small relu": finished in run {first.info.run_id}, kept' in printed
    runs = _runs(store)
    (again,) = _parents(runs)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert (
        "research.error" not in again.data.tags and again.data.tags["research.state"] == "COMPLETE"
    )
    statuses = sorted((r.info.run_name, r.info.status) for r in runs if r not in _parents(runs))
    assert statuses == [
        ("small relu", "FINISHED"),
        ("small sigmoid with dropout", "FAILED"),  # the crash, as it happened
        ("small sigmoid with dropout", "FINISHED"),
    ]


#: Row 2 trains 1000 epochs, for at most 15 s (its budget): long enough to be killed mid-way.
SLOW_SECOND_ROW = (
    TINY.replace("budget_minutes = 5", "budget_minutes = 0.25")
    .replace("epochs = 1\nsubset = 500", "epochs = 1000\nsubset = 2000")
    .replace("max_norm = 2.0\nepochs = 2", "max_norm = 2.0\nepochs = 1000")
)


def _wait_for_running_row(store: str, name: str, process, timeout: float = 120) -> None:
    """Waits until the command trains row ``name`` (its run RUNNING, an epoch logged)."""
    import time

    for line in process.stdout:  # (the store is made once the command says what it trains)
        if line.startswith("[2/2]"):
            break
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        running = [r for r in _runs(store) if r.info.run_name == name]
        if running and running[0].info.status == "RUNNING" and running[0].data.metrics:
            return
        time.sleep(0.1)
    raise AssertionError(f"row {name!r} never started")


@pytest.mark.slow
def test_a_command_killed_mid_row_is_resumed_training_only_that_row(tmp_path, capsys):
    """SIGKILL during row 2 leaves the parent and row 2 RUNNING. Meanwhile the same command is
    refused (the parent is in use); after the kill it continues the parent, closes row 2's run
    FAILED, keeps row 1 and trains row 2 only."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient  # (imported before the clock starts)

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'warm' / 'mlflow.db'}").search_experiments()
    capsys.readouterr()  # (MLflow's notes on making that store)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["reproduce", str(write(tmp_path, SLOW_SECOND_ROW)), "--quick", "--quiet",
            "--tracking-uri", store]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "research", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        _wait_for_running_row(store, "small sigmoid with dropout", process)
        assert main(argv) == 2
        refused = capsys.readouterr().err
        assert refused.count("\n") == 1 and "is in use by the command" in refused
        assert f":{process.pid}:" in refused and "--fresh" in refused
        assert process.poll() is None, "row 2 ended before the kill: lengthen it"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    before = {r.info.run_name: r for r in _runs(store)}
    assert before["reproduce-quick"].info.status == "RUNNING"
    assert before["small sigmoid with dropout"].info.status == "RUNNING"
    kept = before["small relu"]
    assert kept.info.status == "FINISHED"

    assert main(argv) == 0
    printed = capsys.readouterr().out
    parent_id = before["reproduce-quick"].info.run_id
    assert f"continuing parent run {parent_id} (left RUNNING by " in printed
    killed_id = before["small sigmoid with dropout"].info.run_id
    assert f"its run {killed_id} was left RUNNING by a command that stopped: closed FAILED" in (
        printed
    )
    assert f'row "small relu": finished in run {kept.info.run_id}, kept' in printed
    assert "[2/2] small sigmoid with dropout:" in printed  # trained again
    runs = _runs(store)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len(_parents(runs)) == 1 and len(runs) == 4
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[killed_id].info.status == "FAILED"
    assert by_id[killed_id].data.tags["research.error"] == "its command stopped"
    assert by_id[kept.info.run_id].info.end_time == kept.info.end_time  # untouched
    assert by_id[parent_id].info.status == "FINISHED"


@pytest.mark.parametrize(
    "where, problem",
    [
        ("{tmp}", "is a folder"),
        ("/tmp", "is a folder"),
        ("{tmp}/missing/table.md", "its folder {tmp}/missing does not exist"),
        ("{tmp}/paper.toml/table.md", "its folder {tmp}/paper.toml is not a folder"),
        ("/proc/table.md", "cannot write in its folder /proc"),  # unwritable, even for root
        # a device or a pipe (never /dev/null itself: as root, a regression would replace it)
        ("{tmp}/pipe", "is not a regular file"),
    ],
)
def test_a_bad_out_is_refused_before_anything_trains(tmp_path, capsys, where, problem):
    import os

    os.mkfifo(tmp_path / "pipe")
    out = where.format(tmp=tmp_path)
    strays = [Path(out.rstrip("/") + ".tmp"), Path(out).parent / f".{Path(out).name}.tmp"]
    before = [stray.exists() for stray in strays]
    store = tmp_path / "mlflow.db"
    paper = write(tmp_path, TINY)
    code = main(["reproduce", str(paper), "--quick", "--tracking-uri", f"sqlite:///{store}",
                 "--out", out])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    expected = f"error: --out {out}: {problem.format(tmp=tmp_path)}"
    assert captured.err.startswith(expected), captured.err
    assert "allowed: a file in an existing folder you can write to" in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""  # nothing trained, nothing said
    assert not store.exists()  # no run opened
    assert [stray.exists() for stray in strays] == before
