"""Running the same paper file again continues it: the rows that finished are kept.

A ``reproduce`` command opens the latest parent run whose paper file settings (the ``[paper]``
and ``[quick]`` values, ``--quick``, ``--holdout``) are the same as its own
(:func:`paper_key`), whether it ended FINISHED, FAILED, KILLED, or was left RUNNING by a command
that is gone (killed outright); ``--fresh`` makes a new one. Under it, a row whose run finished
(or diverged) with the same settings (:func:`row_key`: its name, paper error, every training
field, the rows it trains on, the budget) is kept: its result is read back from its run, exactly.
A row's run left RUNNING by a command that stopped is closed FAILED and the row trained again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from research.experiment.config.fields import show
from research.experiment.config.layers_field import layer_files
from research.experiment.config.paper_file import Paper, Row
from research.experiment.reproduction.paper_table import RowResult
from research.experiment.tracking.paper_runs import (
    TAG_ROW_KEY,
    LoggedRow,
    PaperParent,
    claim_parent,
    close_row,
    logged_rows,
    metric_histories,
)
from research.experiment.tracking.processes import process_alive, process_identity
from research.experiment.tracking.runs import TAG_ERROR, TAG_STATE, TrackedRun
from research.experiment.training.train import EpochMetrics

#: What a row's run logs at its end, read back to keep it (besides its per-epoch metrics).
ROW_END_METRICS = ("test_errors", "n_test", "epochs_trained", "wall_seconds")
#: The per-epoch metrics a kept row's history is rebuilt from.
EPOCH_METRICS = ("train/loss", "val/loss", "val/accuracy", "epoch_seconds", "learning_rate")
MAX_NORM_METRIC = "units_at_max_norm"


def _digest(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def paper_key(paper: Paper, quick: bool, holdout: bool) -> str:
    """The digest of what a parent run stands for: the paper file's ``[paper]`` and ``[quick]``
    settings as they shape the table, ``--quick`` and ``--holdout``."""
    return _digest(
        {
            "version": 1,
            "title": paper.title,
            "budget_minutes": paper.budget_minutes,
            "tolerance": paper.tolerance,
            "quick": [paper.quick_epochs, paper.quick_subset] if quick else None,
            "holdout": holdout,
        }
        # (only when set: the digests of earlier paper files stay as they were)
        | ({"test_at": paper.test_at} if paper.best_validation_epoch else {})
    )


def row_key(paper: Paper, row: Row, n_train_rows: int, holdout: bool) -> str:
    """The digest of everything a row's result depends on: its name and paper error, every
    training field (after ``--quick``), the rows it trains on, ``--holdout``, the budget and the
    SHA-256 of its user layers' files."""
    return _digest(
        {
            "version": 1,
            "name": row.name,
            "paper_error": row.paper_error,
            "fields": row.config.as_texts(),
            "n_train_rows": n_train_rows,
            "holdout": holdout,
            "budget_minutes": paper.budget(row),
        }
        | ({"test_at": paper.test_at} if paper.best_validation_epoch else {})
        # the code of its user layers: an edited file trains the row again
        | ({"layer_files": files} if (files := layer_files(row.config)) else {})
    )


# --- which command has a parent open ---------------------------------------------------------


def command_may_run(identity: str) -> bool:
    """Whether the command ``identity`` names may still run: False only when it ran on this
    host and is gone; True for another host's (which cannot be seen from here)."""
    alive = process_alive(identity)
    return bool(identity) if alive is None else alive


# --- continuing a parent -----------------------------------------------------------------------


@dataclass
class Resumed:
    """The parent run a command logs under, how it found it, and the rows it keeps (by name)."""

    claimed: PaperParent
    kept: dict[str, RowResult] = field(default_factory=dict)

    @property
    def parent(self) -> TrackedRun:
        return self.claimed.run

    @property
    def continued(self) -> bool:
        return self.claimed.continued is not None


def open_parent(
    paper: Paper, *, quick: bool, holdout: bool, fresh: bool, tracking_uri: str | None
) -> Resumed:
    """The parent run to log under: the latest one of the same paper file and settings (unless
    ``fresh``) if no running command holds it, else a new one. Its rows are read by
    :func:`keep_finished`, inside the parent's lifecycle."""
    claimed = claim_parent(
        paper.name,
        paper_key(paper, quick, holdout),
        process_identity(),
        still_running=command_may_run,
        fresh=fresh,
        run_name="reproduce" + ("-quick" if quick else ""),
        tags={"command": "reproduce"},
        tracking_uri=tracking_uri,
    )
    return Resumed(claimed)


def keep_finished(
    resumed: Resumed,
    paper: Paper,
    chosen: Sequence[Row],
    n_train_rows: dict[str, int],
    holdout: bool,
    say: Callable[[str], None],
) -> None:
    """Under a continued parent: closes FAILED the row runs a stopped command left RUNNING, and
    keeps (read back into ``resumed.kept``) the ``chosen`` rows that finished with the same
    settings (``n_train_rows``: the rows each trains on, by name)."""
    if not resumed.continued:
        return
    say(_continuing(resumed.claimed))
    logged = logged_rows(resumed.parent)
    for run in logged:
        if run.status == "RUNNING":
            close_row(resumed.parent, run, "its command stopped")
            say(f"row {show(run.name)}: its run {run.run_id} was left RUNNING by a command that "
                "stopped: closed FAILED")  # fmt: skip
    for row in chosen:
        key = row_key(paper, row, n_train_rows[row.name], holdout)
        done = [run for run in logged if run.tags.get(TAG_ROW_KEY) == key and _finished(run)]
        if done:
            resumed.kept[row.name] = read_back(resumed.parent, row, done[-1])


def _continuing(claimed: PaperParent) -> str:
    was = claimed.continued
    if was == "RUNNING":
        was = f"left RUNNING by {claimed.previous_command}, which is gone"
    return f"continuing parent run {claimed.run.run_id} ({was}; --fresh starts a new one)"


def _finished(run: LoggedRow) -> bool:
    """A row run that ended with a result: tested, or diverged (training it again with the
    same settings would diverge again)."""
    if "wall_seconds" not in run.metrics:
        return False
    if run.status == "FINISHED" and run.tags.get(TAG_STATE) == "COMPLETE":
        return all(name in run.metrics for name in ROW_END_METRICS)
    return run.status == "FAILED" and run.tags.get(TAG_ERROR, "").startswith("training diverged")


def read_back(parent: TrackedRun, row: Row, run: LoggedRow) -> RowResult:
    """The result of ``row`` as its run logged it: the same numbers training gave."""
    histories = metric_histories(parent, run.run_id, [*EPOCH_METRICS, MAX_NORM_METRIC])
    losses = histories["train/loss"]
    columns = [dict(histories[name]) for name in EPOCH_METRICS]
    nan = float("nan")
    history = [
        EpochMetrics(step, loss, *(column.get(step, nan) for column in columns[1:]))
        for step, loss in losses
    ]
    result = RowResult(row, epochs_planned=row.config.epochs, run_id=run.run_id)
    result.history = history
    result.epochs = len(history)
    result.seconds = run.metrics["wall_seconds"]
    result.units_at_max_norm = [value for _, value in histories[MAX_NORM_METRIC]]
    if run.status == "FAILED":
        result.diverged = run.tags[TAG_ERROR]
        return result
    result.n_test = round(run.metrics["n_test"])
    result.errors = round(run.metrics["test_errors"])
    result.stopped_by_budget = result.epochs < result.epochs_planned
    if "best_epoch" in run.metrics:
        result.best_epoch = round(run.metrics["best_epoch"])
    return result
