"""Reproducing a published table: ``python -m research reproduce experiments/<paper>.toml``.

A paper file (TOML, read by :mod:`research.experiment.config.paper_file`) names a paper and the rows
of one of its tables: each a published test error and the training fields that reproduce it.
The command:

- trains each row on all 60,000 training images (the train and validation splits together, as
  the paper's final models were; ``--holdout`` trains on the 50,000 and logs validation curves
  instead, for choosing settings);
- evaluates each row once, at the end, on the 10,000 test images; or, with the paper file's
  ``test_at = "best_validation_epoch"`` (Nielsen's protocol), trains on the 50,000 and tests the
  parameters of the epoch of best validation accuracy;
- prints the table side by side: the paper's error, ours with a 95% Wilson interval, the target
  (the paper's error plus the file's ``tolerance``), the epochs and the wall time.

Each row is one MLflow run, with its curves, test metrics and weights, under one parent run that
holds the table (``reproduce.md``, ``reproduce.json``). Running the same paper file again
continues that parent and keeps the rows that finished (:mod:`.resume`; ``--fresh`` starts
over). ``--out`` is checked before anything trains. A row's training stops early when its
next epoch would pass the file's ``budget_minutes``; the table then says how many epochs it had.
``--quick`` trains every row for a few epochs on a subset (for the tests); its numbers are not
results. Every run, rows and parent, ends through
:func:`~research.experiment.tracking.runs.run_lifecycle`: a crash or Ctrl-C leaves none RUNNING.
The table's text and data: :mod:`.paper_table`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from research.data import augment_factor
from research.engine.optim import units_at_max_norm
from research.experiment.config.fields import (
    ConfigError,
    TrainConfig,
    show,
)
from research.experiment.config.paper_file import Paper, Row, load_paper, select_rows
from research.experiment.reproduction.out_file import check_out, write_out
from research.experiment.reproduction.paper_table import (
    RowResult,
    describe,
    markdown_text,
    max_norm_line,
    met,
    minutes,
    results_json,
    results_table,
)
from research.experiment.reproduction.resume import (
    Resumed,
    keep_finished,
    open_parent,
    row_key,
)
from research.experiment.tracking.paper_runs import TAG_ROW_KEY
from research.experiment.tracking.runs import (
    TAG_PARENT,
    TAG_ROLE,
    Outputs,
    RunEnd,
    run_lifecycle,
    start_run,
)
from research.experiment.training.figures import save_rows_figure
from research.experiment.training.train import (
    DivergenceError,
    EpochMetrics,
    StopTraining,
    evaluate,
    train,
)

# --- the command line -------------------------------------------------------------------------


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reproduce`` command's own arguments (the command line adds the store and data
    flags)."""
    parser.description = (
        "Train each row of a paper file (e.g. experiments/dropout_paper.toml) on the 60,000 "
        "training images (or on the 50,000, tested at the best validation epoch, when the file "
        'says test_at = "best_validation_epoch"), evaluate it once on the test set, and print '
        "the paper's error beside ours with a 95% Wilson interval; every row is an MLflow run "
        "under one parent."
    )
    parser.add_argument("paper_file", help="e.g. experiments/dropout_paper.toml")
    parser.add_argument("--rows", type=_numbers, help="only these rows, from 1 (e.g. 1,3)")
    parser.add_argument(
        "--quick", action="store_true", help="a few epochs on a subset (for tests; not results)"
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="train on the 50,000 and log validation curves (to choose settings)",
    )
    parser.add_argument(
        "--out", type=Path, help="also write the table (Markdown) to this file (not a folder)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="a new parent run, every row trained (by default the same paper file and settings "
        "continue their latest parent run, keeping the rows that finished)",
    )
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def reproduce_command(args: argparse.Namespace, load_data: Callable[[TrainConfig], Any]) -> int:
    """Runs the paper file of a parsed ``reproduce`` command line (see :func:`run_paper`)."""
    return run_paper(
        load_paper(args.paper_file),
        load_data,
        rows=args.rows,
        quick=args.quick,
        holdout=args.holdout,
        tracking_uri=args.tracking_uri,
        track=not args.no_track,
        quiet=args.quiet,
        out=args.out,
        fresh=args.fresh,
    )


def _numbers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of row numbers") from None


# --- running -----------------------------------------------------------------------------------


@dataclass
class Splits:
    """What the rows train and are tested on."""

    x_train: np.ndarray
    labels_train: np.ndarray
    x_val: np.ndarray | None
    labels_val: np.ndarray | None
    x_test: np.ndarray
    labels_test: np.ndarray


def splits(data: Any, holdout: bool, subset: int | None) -> Splits:
    """All 60,000 training images (or the 50,000 with ``holdout``, validation kept apart),
    cut to the first ``subset`` rows if given, and the test split."""
    if holdout:
        x, labels = data.train.images, data.train.labels  # (uint8: floats per batch)
        x_val, labels_val = data.validation.x, data.validation.labels
    else:
        x = np.concatenate([data.train.images, data.validation.images])
        labels = np.concatenate([data.train.labels, data.validation.labels])
        x_val = labels_val = None
    if subset is not None:
        x, labels = x[:subset], labels[:subset]
    return Splits(x, labels, x_val, labels_val, data.test.x, data.test.labels)


def train_row(
    row: Row,
    data: Splits,
    budget_seconds: float,
    run: Any = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    restore_best: bool = False,
) -> RowResult:
    """Trains one row, then evaluates it once on the test split: with its last epoch's
    parameters, or with ``restore_best`` those of its best validation epoch (``data`` must hold
    validation rows). Logs epochs to ``run`` (a TrackedRun, inside its :func:`run_lifecycle`)
    if given, and its outputs once the block succeeds. A divergence is recorded in the result
    and ends the run, not raised."""
    config = row.config
    result = RowResult(
        row, epochs_planned=config.epochs, run_id=run.run_id if run is not None else ""
    )
    started = time.perf_counter()

    def epoch_done(metrics: EpochMetrics, params: Any) -> None:
        result.history.append(metrics)
        result.epochs = metrics.epoch + 1
        if run is not None:
            run.log_epoch(metrics)
        if config.max_norm:
            # Whether the constraint binds at all is the point of a max-norm row: say it.
            held = units_at_max_norm(params, config.max_norm)
            result.units_at_max_norm.append(held)
            if run is not None:
                run.log_metrics({"units_at_max_norm": held}, step=metrics.epoch)
        if on_epoch is not None:
            on_epoch(metrics)
        elapsed = time.perf_counter() - started
        # Stop before an epoch that would end past the budget (epochs take about as long).
        mean_epoch = elapsed / result.epochs
        if result.epochs < config.epochs and elapsed + mean_epoch > budget_seconds:
            result.stopped_by_budget = True
            raise StopTraining

    try:
        trained = train(
            config, data.x_train, data.labels_train, data.x_val, data.labels_val, epoch_done,
            restore_best=restore_best,
        )  # fmt: skip
    except DivergenceError as error:
        result.diverged = str(error)
        result.seconds = time.perf_counter() - started
        if run is not None:  # (what resume.read_back needs to keep the row)
            run.log_metrics(
                {"wall_seconds": result.seconds, "epochs_trained": float(result.epochs)},
                step=max(result.epochs - 1, 0),
            )
            run.diverged(error)
        return result
    loss, accuracy = evaluate(
        trained.params, data.x_test, data.labels_test, trained.model, state=trained.state
    )
    result.n_test = len(data.labels_test)
    result.errors = result.n_test - round(accuracy * result.n_test)
    result.best_epoch = trained.best_epoch
    result.seconds = time.perf_counter() - started
    if run is not None:
        _log_row_end(run, result, loss, accuracy)
        run.save_on_success(
            Outputs(result.history, row.name, trained.params, trained.model, state=trained.state)
        )
    return result


def _log_row_end(run: Any, result: RowResult, loss: float, accuracy: float) -> None:
    """A tested row's metrics on its run: the test figures, its interval, how long, which
    epoch was tested (when its best validation one)."""
    low, high = result.interval
    run.log_metrics(
        {
            "test_accuracy": accuracy,
            "test_loss": loss,
            "test_error": result.error,
            "test_error_ci_low": low,
            "test_error_ci_high": high,
            # exactly, for a command that keeps the row (resume.read_back)
            "test_errors": float(result.errors),
            "n_test": float(result.n_test),
            "wall_seconds": result.seconds,
            "epochs_trained": float(result.epochs),
        }
        | ({} if result.best_epoch is None else {"best_epoch": float(result.best_epoch)}),
        step=result.epochs - 1,
    )


def run_paper(
    paper: Paper,
    load_data: Callable[[TrainConfig], Any],
    *,
    rows: Sequence[int] | None = None,
    quick: bool = False,
    holdout: bool = False,
    tracking_uri: str | None = None,
    track: bool = True,
    quiet: bool = False,
    out: Path | None = None,
    fresh: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Trains the chosen rows (numbers from 1; all by default), prints the table, logs it all.

    With tracking, the latest parent run of the same paper file and settings is continued
    (unless ``fresh``) and the rows that finished under it are kept, not trained again
    (:mod:`.resume`).

    Args:
        load_data: ``config -> Dataset``: the splits of ``config.dataset``, its inputs as
            ``config.raw_inputs`` says.
        out: a file to write the table to as well (checked before anything trains).
    Returns:
        0 when every row trained, 1 when one diverged.
    Raises:
        ConfigError: a row cannot run here (batch larger than the rows, not enough memory), or
            ``out`` cannot be written.
    """
    if out is not None:
        check_out(out)
    # The book's protocol: validation rows kept apart, to choose the epoch the test reads.
    holdout = holdout or paper.best_validation_epoch
    chosen = [paper.rows[i] for i in select_rows(paper, rows)]
    if quick:
        chosen = [
            replace(r, config=replace(r.config, epochs=min(r.config.epochs, paper.quick_epochs)))
            for r in chosen
        ]
    data = _rows_data(chosen, load_data, holdout, paper.quick_subset if quick else None)
    note = " (--quick: not results)" if quick else ""
    say(f"{paper.title}: {len(chosen)} row(s), {_budgets(paper, chosen)}{note}")
    resumed = None
    if track:
        resumed = open_parent(
            paper, quick=quick, holdout=holdout, fresh=fresh, tracking_uri=tracking_uri
        )
    parent = resumed.parent if resumed is not None else None
    with run_lifecycle(parent):
        if resumed is not None and not resumed.continued:
            _log_settings(resumed.parent, paper, quick, holdout)
        elif resumed is not None:
            n_rows = {row.name: len(data[_data_key(row.config)].x_train) for row in chosen}
            keep_finished(resumed, paper, chosen, n_rows, holdout, say)
        results = [
            _row_result(paper, row, data[_data_key(row.config)], resumed, f"[{n}/{len(chosen)}]",
                        tracking_uri, quiet, holdout, say)
            for n, row in enumerate(chosen, 1)
        ]  # fmt: skip
        table = results_table(paper, results, quick)
        say("")
        say(table)
        diverged = [result.row.name for result in results if result.diverged]
        if parent is not None:
            _log_table(parent, paper, results, table, quick)
        if out is not None:
            write_out(out, table)
        if parent is not None and diverged:
            parent.end(RunEnd.FAIL, f"row(s) diverged: {', '.join(diverged)}")
    if parent is not None:
        say(f"MLflow: experiment {show(paper.name)}, parent run {parent.run_id}")
        say(f"browse it: {parent.ui_hint}")
    return 1 if diverged else 0


def _data_key(config: TrainConfig) -> tuple[str, bool]:
    return config.dataset, config.raw_inputs


def _rows_data(
    chosen: Sequence[Row],
    load_data: Callable[[TrainConfig], Any],
    holdout: bool,
    subset: int | None,
) -> dict[tuple[str, bool], Splits]:
    """The splits of each dataset and input scaling the rows train on (each loaded once), after
    checking that every row fits: its batch in the rows, its network in the memory."""
    from research.experiment.config.resources import check_memory

    data = {}
    for row in chosen:
        if _data_key(row.config) not in data:
            data[_data_key(row.config)] = splits(load_data(row.config), holdout, subset)
    for row in chosen:
        n_rows = len(data[_data_key(row.config)].x_train)
        if row.config.batch_size > n_rows:
            raise ConfigError(
                "batch_size",
                f"larger than the {n_rows} training rows of row {show(row.name)}",
                value=row.config.batch_size,
            )
        check_memory(row.config, n_rows)
    return data


def _row_result(
    paper: Paper,
    row: Row,
    data: Splits,
    resumed: Resumed | None,
    number: str,
    tracking_uri: str | None,
    quiet: bool,
    holdout: bool,
    say: Callable[[str], None],
) -> RowResult:
    """One row, kept (it finished under the parent run being continued) or trained (with its
    run, under the parent), and how it went, said."""
    kept = resumed.kept.get(row.name) if resumed is not None else None
    if kept is not None:
        ended = "diverged" if kept.diverged else "finished"
        say(f"{number} row {show(row.name)}: {ended} in run {kept.run_id}, kept")
        _say_result(kept, say)
        return kept
    n_rows = len(data.x_train)
    factor = augment_factor(row.config.augment)
    expanded = f" (expanded to {factor * n_rows:,})" if factor > 1 else ""
    say(
        f"{number} {row.name}: {describe(row.config)}, "
        f"{row.config.epochs} epochs on {n_rows:,} rows{expanded}"
    )
    parent = resumed.parent if resumed is not None else None
    key = row_key(paper, row, len(data.x_train), holdout)
    result = _train_tracked(paper, row, data, parent, key, tracking_uri, quiet)
    _say_result(result, say)
    return result


def _say_result(result: RowResult, say: Callable[[str], None]) -> None:
    row = result.row
    if result.diverged:
        say(f"    diverged: {result.diverged}")
    else:
        low, high = result.interval
        say(
            f"    test error {result.error:.2f}% (95% CI {low:.2f}–{high:.2f}), paper "
            f"{row.paper_error:.2f}%: {result.epochs} epochs, {minutes(result.seconds)}"
        )
    if result.units_at_max_norm:
        say(f"    {max_norm_line(result)}")


def _log_table(
    parent: Any, paper: Paper, results: Sequence[RowResult], table: str, quick: bool
) -> None:
    """The table on the parent run: ``reproduce.md``, the rows' training loss curves and
    ``reproduce.json``."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reproduce.md"
        path.write_text(f"# {markdown_text(paper.title)}\n\n{table}")
        parent.log_artifact(path)
        trained = [(r.row.name, r.history) for r in results if r.history]
        if trained:
            curves = Path(folder) / "rows_train_loss.png"
            parent.log_artifact(save_rows_figure(trained, curves, paper.title))
    parent.log_json("reproduce.json", results_json(paper, results, quick))


def _log_settings(parent: Any, paper: Paper, quick: bool, holdout: bool) -> None:
    settings = {"budget_minutes": paper.budget_minutes, "tolerance": paper.tolerance}
    parent.log_params(
        {"paper": paper.title, "file": str(paper.path), "quick": quick, "holdout": holdout}
        | settings
    )


def _train_tracked(
    paper: Paper,
    row: Row,
    data: Splits,
    parent: Any,
    key: str,
    tracking_uri: str | None,
    quiet: bool,
) -> RowResult:
    """One row with its MLflow run (under ``parent``, if any, tagged with the row's ``key``)
    and a progress bar."""
    from tqdm import tqdm

    run = None
    if parent is not None:
        run = start_run(
            paper.name,
            run_name=row.name,
            tags={
                TAG_PARENT: parent.run_id,
                TAG_ROLE: "row",
                TAG_ROW_KEY: key,
                "command": "reproduce",
            },
            tracking_uri=tracking_uri,
        )
    progress = tqdm(
        total=row.config.epochs, unit="epoch", disable=quiet, leave=False, dynamic_ncols=True,
        file=sys.stdout,
    )  # fmt: skip

    def on_epoch(metrics: EpochMetrics) -> None:
        progress.set_postfix_str(f"train/loss {metrics.train_loss:.4f}", refresh=False)
        progress.update(1)

    with progress, run_lifecycle(run):
        if run is not None:
            validation = data.x_val is not None
            run.log_config(
                row.config, len(data.x_train), validation, paper_error=row.paper_error,
                target_error=paper.target(row),
            )  # fmt: skip
        result = train_row(
            row, data, 60 * paper.budget(row), run, on_epoch, paper.best_validation_epoch
        )
        if run is not None and result.n_test:  # (the table's "met", on the row's run)
            run.log_metrics({"target_met": float(met(paper, result))}, step=result.epochs - 1)
        return result


def _budgets(paper: Paper, chosen: Sequence[Row]) -> str:
    """``at most 30 min each`` (or ``at most 30–45 min each`` when rows set their own)."""
    budgets = sorted({paper.budget(row) for row in chosen})
    span = f"{budgets[0]:g}" if len(budgets) == 1 else f"{budgets[0]:g}–{budgets[-1]:g}"
    return f"at most {span} min each"
