"""``rerun`` of a ``reproduce`` row: the rows it trained on (all 60,000 training images, the
50,000 with ``--holdout``, the first ``subset`` with ``--quick``), its validation metrics NaN by
design when it had no validation split, and the epochs it ran when its budget stopped it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import copy_run

from research.cli import main

ROWS = """
[paper]
name = "rows_to_rerun"
title = "Rows to rerun"
budget_minutes = 5

[quick]
epochs = 1
subset = 500

[[rows]]
name = "small relu"
paper_error = 10.0
[rows.fixed]
hidden_size = 16
epochs = 1
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
epochs = 1
batch_size = 50
"""


def reproduce(tmp_path: Path, text: str, *flags: str) -> tuple[str, dict[str, object]]:
    """Runs ``reproduce`` on the paper file ``text`` into a new store in ``tmp_path``; returns
    the store and the row runs by name."""
    from mlflow.tracking import MlflowClient

    paper = tmp_path / "paper.toml"
    paper.write_text(textwrap.dedent(text))
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert main(["reproduce", str(paper), "--quiet", "--tracking-uri", store, *flags]) == 0
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("rows_to_rerun")
    runs = client.search_runs([experiment.experiment_id])
    rows = {r.info.run_name: r for r in runs if r.data.tags.get("research.role") == "row"}
    return store, rows


def rerun(run_id: str, store: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["rerun", run_id, "--tracking-uri", store])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """``reproduce --quick`` of both rows: 500 training rows each, no validation split."""
    return reproduce(tmp_path_factory.mktemp("quick"), ROWS, "--quick")


@pytest.mark.slow
def test_rerun_of_a_quick_row_reproduces_it_exactly(quick_rows, capsys):
    store, rows = quick_rows
    assert set(rows) == {"small relu", "small sigmoid with dropout"}
    for run in rows.values():
        assert run.data.params["n_train_rows"] == "500"
        code, out, err = rerun(run.info.run_id, store, capsys)
        assert code == 0, out + err
        assert "500 training rows, no validation split" in out
        assert (
            "reproduced exactly: 1 epochs x 1 metric identical "
            "(val/loss, val/accuracy: NaN, no validation split)"
        ) in out
        assert "NOT reproduced" not in out and " *" not in out


@pytest.mark.slow
def test_rerun_names_the_rows_a_run_may_have_had(quick_rows, capsys):
    """An out-of-range n_train_rows blames the run only where it is out of range: up to 60,000
    for a row without validation, 50,000 for a run validated on the 10,000 after them."""
    from mlflow.tracking import MlflowClient

    store, rows = quick_rows
    client = MlflowClient(tracking_uri=store)
    source = rows["small relu"]
    experiment_id = source.info.experiment_id

    edited_row = copy_run(client, source, experiment_id, change={"n_train_rows": "70000"})
    client.set_tag(edited_row, "research.role", "row")
    code, _, err = rerun(edited_row, store, capsys)
    assert code == 2
    assert err.splitlines() == [
        f'error: run {edited_row} cannot be rerun: its params give n_train_rows = "70000": out '
        "of range; allowed: an integer from 1 to 60000 (a row without a validation split trains "
        "on at most the 60,000 training images)"
    ]

    # The same params on a run that is not a row (a trial, a `train` run): it validated on the
    # last 10,000 training images, so it cannot have trained on them too.
    edited_trial = copy_run(client, source, experiment_id, change={"n_train_rows": "60000"})
    code, _, err = rerun(edited_trial, store, capsys)
    assert code == 2
    assert err.splitlines() == [
        f'error: run {edited_trial} cannot be rerun: its params give n_train_rows = "60000": '
        "out of range; allowed: an integer from 1 to 50000 (a run with a validation split "
        "trains on at most the 50,000 training images before it)"
    ]


FULL = """
[paper]
name = "rows_to_rerun"
title = "Rows to rerun"
budget_minutes = 5

[[rows]]
name = "small relu"
paper_error = 10.0
[rows.fixed]
hidden_size = 16
epochs = 1
batch_size = 100
"""


@pytest.mark.slow
def test_rerun_of_a_full_row_trains_on_all_60000_training_images(tmp_path, capsys):
    store, rows = reproduce(tmp_path, FULL)
    (run,) = rows.values()
    assert run.data.params["n_train_rows"] == "60000"
    code, out, err = rerun(run.info.run_id, store, capsys)
    assert code == 0, out + err
    assert "60000 training rows, no validation split" in out
    assert "reproduced exactly: 1 epochs x 1 metric identical" in out


# A row whose budget stops it after its first epoch, on a schedule over its three: the rerun
# must train that one epoch with the three epochs' schedule.
HOLDOUT = """
[paper]
name = "rows_to_rerun"
title = "Rows to rerun"
budget_minutes = 1e-6

[quick]
epochs = 3
subset = 500

[[rows]]
name = "cosine relu"
paper_error = 10.0
[rows.fixed]
hidden_size = 16
epochs = 3
batch_size = 50
schedule = "cosine"
"""


@pytest.mark.slow
def test_rerun_of_a_holdout_row_stopped_by_its_budget(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store, rows = reproduce(tmp_path, HOLDOUT, "--quick", "--holdout")
    (run,) = rows.values()
    client = MlflowClient(tracking_uri=store)
    parent = run.data.tags["mlflow.parentRunId"]
    table = json.loads(
        Path(client.download_artifacts(parent, "reproduce.json", str(tmp_path))).read_text()
    )
    (entry,) = table["rows"]
    assert entry["stopped_by_budget"] and entry["epochs"] == 1
    assert run.data.metrics["epochs_trained"] == 1 and run.data.params["epochs"] == "3"

    code, out, err = rerun(run.info.run_id, store, capsys)
    assert code == 0, out + err
    assert "(500 training rows, 1 epochs)" in out
    assert "the run stopped after 1 of its 3 epochs (its time budget)" in out
    assert "reproduced exactly: 1 epochs x 3 metrics identical\n" in out
