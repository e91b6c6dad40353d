"""Reproducing a published table: ``python -m research reproduce experiments/<paper>.toml``.

A paper file (TOML, read by :mod:`research.experiment.config.paper_file`) names a paper and the rows
of one of its tables: each a published test error and the training fields that reproduce it.
The command:

- trains each row on all 60,000 training images (the train and validation splits together, as
  the paper's final models were; ``--holdout`` trains on the 50,000 and logs validation curves
  instead, for choosing settings);
- evaluates each row once, at the end, on the 10,000 test images;
- prints the table side by side: the paper's error, ours with a 95% Wilson interval, the target
  (the paper's error plus the file's ``tolerance``), the epochs and the wall time.

Each row is one MLflow run, with its curves, test metrics and weights, under one parent run that
holds the table (``reproduce.md``, ``reproduce.json``). A row's training stops early when its
next epoch would pass the file's ``budget_minutes``; the table then says how many epochs it had.
``--quick`` trains every row for a few epochs on a subset (for the tests); its numbers are not
results.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from research.engine.optim import units_at_max_norm
from research.experiment.config.fields import (
    ConfigError,
    TrainConfig,
    show,
)
from research.experiment.config.paper_file import Paper, Row, load_paper, select_rows
from research.experiment.tracking.runs import TAG_PARENT, TAG_ROLE
from research.experiment.training.figures import save_rows_figure
from research.experiment.training.stats import wilson_interval
from research.experiment.training.train import DivergenceError, EpochMetrics, evaluate, train


@dataclass
class RowResult:
    """What training one row gave."""

    row: Row
    epochs_planned: int
    epochs: int = 0  # trained
    seconds: float = 0.0
    n_test: int = 0
    errors: int = 0
    diverged: str = ""  # the reason, if training diverged
    stopped_by_budget: bool = False
    run_id: str = ""
    history: list[EpochMetrics] = field(default_factory=list)
    # With max-norm: per epoch, the fraction of hidden units held at the radius (at its end).
    units_at_max_norm: list[float] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Test error in percent (NaN if there is none)."""
        return 100 * self.errors / self.n_test if self.n_test else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson interval of the test error, in percent."""
        if not self.n_test:
            return math.nan, math.nan
        low, high = wilson_interval(self.errors, self.n_test)
        return 100 * low, 100 * high


def describe(config: TrainConfig) -> str:
    """The network and its regularizers in a few words: ``relu 3×1024, dropout 0.2/0.5,
    max-norm 3.5``."""
    hidden = config.spec().sizes[1:-1]
    widths = f"{len(hidden)}×{hidden[0]}" if len(set(hidden)) == 1 else "-".join(map(str, hidden))
    parts = [f"{'logistic' if config.activation == 'sigmoid' else config.activation} {widths}"]
    if config.input_dropout or config.dropout:
        parts.append(f"dropout {config.input_dropout:g}/{config.dropout:g}")
    if config.max_norm:
        parts.append(f"max-norm {config.max_norm:g}")
    if config.l2:
        parts.append(f"l2 {config.l2:g}")
    return ", ".join(parts)


# --- the table ---------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def results_table(paper: Paper, results: Sequence[RowResult], quick: bool = False) -> str:
    """The table as Markdown: one line per row trained."""
    lines = [
        "| row | network | paper's error | ours (95% CI) | target | met | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        row, target = result.row, paper.target(result.row)
        if result.n_test:
            low, high = result.interval
            ours = f"{result.error:.2f}% ({low:.2f}–{high:.2f})"
            met = "yes" if result.error <= target + 1e-9 else "no"
        else:
            ours, met = f"diverged: {result.diverged}", "no"
        epochs = f"{result.epochs}" + (
            f" of {result.epochs_planned} (budget)" if result.stopped_by_budget else ""
        )
        lines.append(
            f"| {row.name} | {describe(row.config)} | {row.paper_error:.2f}% | {ours} | "
            f"≤ {target:.2f}% | {met} | {epochs} | {_minutes(result.seconds)} |"
        )
    if quick:
        lines.append("")
        lines.append("`--quick`: a few epochs on a subset, for the tests; these are not results.")
    return "\n".join(lines) + "\n"


def max_norm_line(result: RowResult) -> str:
    """Whether a max-norm row's constraint bound: the hidden units at the radius."""
    held = result.units_at_max_norm
    most = max(held)
    if most == 0:
        return f"max-norm {result.row.config.max_norm:g} never bound: no hidden unit reached it"
    return (
        f"max-norm {result.row.config.max_norm:g}: {100 * held[-1]:.1f}% of hidden units at the "
        f"radius after the last epoch (most {100 * most:.1f}%, epoch {held.index(most) + 1})"
    )


def results_json(paper: Paper, results: Sequence[RowResult], quick: bool) -> dict[str, Any]:
    """The table as data (``reproduce.json``)."""
    rows = []
    for result in results:
        low, high = result.interval
        rows.append(
            {
                "name": result.row.name,
                "network": describe(result.row.config),
                "paper_error": result.row.paper_error,
                "target": paper.target(result.row),
                "error": None if math.isnan(result.error) else result.error,
                "ci95": None if math.isnan(low) else [low, high],
                "errors": result.errors,
                "n_test": result.n_test,
                "epochs": result.epochs,
                "epochs_planned": result.epochs_planned,
                "stopped_by_budget": result.stopped_by_budget,
                "seconds": result.seconds,
                "diverged": result.diverged or None,
                "units_at_max_norm": (result.units_at_max_norm or [None])[-1],
                "units_at_max_norm_most": max(result.units_at_max_norm, default=None),
                "run_id": result.run_id,
                "fields": result.row.config.as_params(),
            }
        )
    return {"paper": paper.title, "file": str(paper.path), "quick": quick, "rows": rows}


# --- the command line -------------------------------------------------------------------------


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reproduce`` command's own arguments (the command line adds the store and data
    flags)."""
    parser.description = (
        "Train each row of a paper file (e.g. experiments/dropout_paper.toml) on the 60,000 "
        "training images, evaluate it once on the test set, and print the paper's error beside "
        "ours with a 95%% Wilson interval; every row is an MLflow run under one parent."
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
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
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
    )


def _numbers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of row numbers") from None


# --- running -----------------------------------------------------------------------------------


class _BudgetReached(Exception):
    """Raised from the epoch callback when the next epoch would pass the row's budget."""


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
) -> RowResult:
    """Trains one row, then evaluates it once on the test split. Logs epochs to ``run`` (a
    TrainingRun) if given. A divergence is recorded in the result, not raised."""
    config = row.config
    result = RowResult(
        row, epochs_planned=config.epochs, run_id=run.run_id if run is not None else ""
    )
    latest: dict[str, Any] = {}
    started = time.perf_counter()

    def epoch_done(metrics: EpochMetrics, params: Any) -> None:
        latest["params"] = params
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
            raise _BudgetReached

    try:
        train(config, data.x_train, data.labels_train, data.x_val, data.labels_val, epoch_done)
    except _BudgetReached:
        result.stopped_by_budget = True
    except DivergenceError as error:
        result.diverged = str(error)
        result.seconds = time.perf_counter() - started
        if run is not None:
            run.diverged(error)
        return result
    loss, accuracy = evaluate(latest["params"], data.x_test, data.labels_test, config.spec())
    result.n_test = len(data.labels_test)
    result.errors = result.n_test - round(accuracy * result.n_test)
    result.seconds = time.perf_counter() - started
    if run is not None:
        low, high = result.interval
        run.log_metrics(
            {
                "test_accuracy": accuracy,
                "test_loss": loss,
                "test_error": result.error,
                "test_error_ci_low": low,
                "test_error_ci_high": high,
                "wall_seconds": result.seconds,
                "epochs_trained": float(result.epochs),
            },
            step=result.epochs - 1,
        )
        run.save_outputs(result.history, row.name, latest["params"], config.spec())
        run.end("COMPLETE", "FINISHED")
    return result


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
    say: Callable[[str], None] = print,
) -> int:
    """Trains the chosen rows (numbers from 1; all by default), prints the table, logs it all.

    Args:
        load_data: ``config -> Dataset``: the splits of ``config.dataset``, its inputs as
            ``config.raw_inputs`` says.
    Returns:
        0 when every row trained, 1 when one diverged.
    Raises:
        ConfigError: a row cannot run here (batch larger than the rows, not enough memory).
    """
    from research.experiment.config.resources import check_memory

    chosen = [paper.rows[i] for i in select_rows(paper, rows)]
    if quick:
        chosen = [
            replace(r, config=replace(r.config, epochs=min(r.config.epochs, paper.quick_epochs)))
            for r in chosen
        ]
    subset = paper.quick_subset if quick else None

    def key(config: TrainConfig) -> tuple[str, bool]:
        return config.dataset, config.raw_inputs

    data = {}
    for row in chosen:  # (each dataset and input scaling once)
        if key(row.config) not in data:
            data[key(row.config)] = splits(load_data(row.config), holdout, subset)
    for row in chosen:
        n_rows = len(data[key(row.config)].x_train)
        if row.config.batch_size > n_rows:
            raise ConfigError(
                "batch_size",
                f"larger than the {n_rows} training rows of row {show(row.name)}",
                value=row.config.batch_size,
            )
        check_memory(row.config, n_rows)
    note = " (--quick: not results)" if quick else ""
    say(f"{paper.title}: {len(chosen)} row(s), at most {paper.budget_minutes:g} min each{note}")
    parent = _start_parent(paper, quick, holdout, tracking_uri) if track else None
    results: list[RowResult] = []
    try:
        for number, row in enumerate(chosen, 1):
            rows_data = data[key(row.config)]
            say(
                f"[{number}/{len(chosen)}] {row.name}: {describe(row.config)}, "
                f"{row.config.epochs} epochs on {len(rows_data.x_train):,} rows"
            )
            result = _train_tracked(paper, row, rows_data, parent, tracking_uri, quiet)
            results.append(result)
            if result.diverged:
                say(f"    diverged: {result.diverged}")
            else:
                low, high = result.interval
                say(
                    f"    test error {result.error:.2f}% (95% CI {low:.2f}–{high:.2f}), paper "
                    f"{row.paper_error:.2f}%: {result.epochs} epochs, {_minutes(result.seconds)}"
                )
            if result.units_at_max_norm:
                say(f"    {max_norm_line(result)}")
    except KeyboardInterrupt:
        if parent is not None:
            parent.end("FAIL", "KILLED", "interrupted")
        raise
    table = results_table(paper, results, quick)
    say("")
    say(table)
    if out is not None:
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(table)
        temporary.replace(out)
    diverged = any(result.diverged for result in results)
    if parent is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "reproduce.md"
            path.write_text(f"# {paper.title}\n\n{table}")
            parent.log_artifact(path)
            trained = [(r.row.name, r.history) for r in results if r.history]
            if trained:
                curves = Path(folder) / "rows_train_loss.png"
                parent.log_artifact(save_rows_figure(trained, curves, paper.title))
        parent.log_json("reproduce.json", results_json(paper, results, quick))
        parent.end("FAIL" if diverged else "COMPLETE", "FINISHED")
        say(f"MLflow: experiment {show(paper.name)}, parent run {parent.run_id}")
        say(f"browse it: {parent.ui_hint}")
    return 1 if diverged else 0


def _start_parent(paper: Paper, quick: bool, holdout: bool, tracking_uri: str | None) -> Any:
    from research.experiment.tracking.runs import start_training_run

    parent = start_training_run(
        paper.name,
        run_name="reproduce" + ("-quick" if quick else ""),
        tags={TAG_ROLE: "reproduce", "command": "reproduce"},
        tracking_uri=tracking_uri,
    )
    settings = {"budget_minutes": paper.budget_minutes, "tolerance": paper.tolerance}
    parent.log_params(
        {"paper": paper.title, "file": str(paper.path), "quick": quick, "holdout": holdout}
        | settings
    )
    return parent


def _train_tracked(
    paper: Paper,
    row: Row,
    data: Splits,
    parent: Any,
    tracking_uri: str | None,
    quiet: bool,
) -> RowResult:
    """One row with its MLflow run (under ``parent``, if any) and a progress bar."""
    from tqdm import tqdm

    from research.experiment.tracking.runs import start_training_run

    run = None
    if parent is not None:
        run = start_training_run(
            paper.name,
            run_name=row.name,
            tags={TAG_PARENT: parent.run_id, TAG_ROLE: "row", "command": "reproduce"},
            tracking_uri=tracking_uri,
        )
        run.log_config(
            row.config,
            len(data.x_train),
            validation=data.x_val is not None,
            paper_error=row.paper_error,
        )
    progress = tqdm(
        total=row.config.epochs, unit="epoch", disable=quiet, leave=False, dynamic_ncols=True,
        file=sys.stdout,
    )  # fmt: skip

    def on_epoch(metrics: EpochMetrics) -> None:
        progress.set_postfix_str(f"train/loss {metrics.train_loss:.4f}", refresh=False)
        progress.update(1)

    try:
        return train_row(row, data, 60 * paper.budget_minutes, run, on_epoch)
    except KeyboardInterrupt:
        if run is not None:
            run.end("FAIL", "KILLED", "interrupted")
        raise
    finally:
        progress.close()
