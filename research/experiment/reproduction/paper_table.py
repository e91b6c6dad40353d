"""A paper's table as ``reproduce`` prints and logs it: what training one row gave
(:class:`RowResult`, with its test error's 95% Wilson interval), the table in Markdown
(:func:`results_table`) and as data (:func:`results_json`, ``reproduce.json``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from research.experiment.config.fields import TrainConfig
from research.experiment.config.paper_file import Paper, Row
from research.experiment.training.stats import wilson_interval
from research.experiment.training.train import EpochMetrics


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
    best_epoch: int | None = None  # the epoch (from 0) tested, when the best validation one
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
    if config.layers:
        parts = [config.layers]
    else:
        hidden = config.spec().sizes[1:-1]
        widths = (
            f"{len(hidden)}×{hidden[0]}" if len(set(hidden)) == 1 else "-".join(map(str, hidden))
        )
        parts = [f"{'logistic' if config.activation == 'sigmoid' else config.activation} {widths}"]
    if config.input_dropout or config.dropout:
        parts.append(f"dropout {config.input_dropout:g}/{config.dropout:g}")
    if config.max_norm:
        parts.append(f"max-norm {config.max_norm:g}")
    if config.l2:
        parts.append(f"l2 {config.l2:g}")
    if config.augment != "none":
        parts.append(f"augment {config.augment}")
    return ", ".join(parts)


# --- the table ---------------------------------------------------------------------------------


#: What Markdown would read as markup in free text (row names, reasons, the title): escapes,
#: entities and raw HTML (``<i>``, ``<script>``), and line breaks, which would end a table row.
#: Links (``[x](javascript:...)``) are broken at ``](``; a table cell also escapes ``|``.
_MARKDOWN_ESCAPES = str.maketrans(
    {"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": " ", "\r": " "}
)


def markdown_text(text: object) -> str:
    """``text`` as Markdown that shows it as it is, never as markup, a link or HTML."""
    return str(text).translate(_MARKDOWN_ESCAPES).replace("](", "\\](")


def markdown_cell(text: object) -> str:
    """``text`` in a Markdown table's cell: :func:`markdown_text`, and ``|`` escaped."""
    return markdown_text(text).replace("|", "\\|")


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def met(paper: Paper, result: RowResult) -> bool:
    """Whether a tested row's error is within its target (the paper's error + the tolerance)."""
    return bool(result.n_test) and result.error <= paper.target(result.row) + 1e-9


def results_table(paper: Paper, results: Sequence[RowResult], quick: bool = False) -> str:
    """The table as Markdown: one line per row trained, its free text escaped
    (:func:`markdown_cell`)."""
    lines = [
        "| row | network | paper's error | ours (95% CI) | target | met | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        row, target = result.row, paper.target(result.row)
        if result.n_test:
            low, high = result.interval
            ours = f"{result.error:.2f}% ({low:.2f}–{high:.2f})"
            reached = "yes" if met(paper, result) else "no"
        else:
            ours, reached = f"diverged: {markdown_cell(result.diverged)}", "no"
        epochs = f"{result.epochs}" + (
            f" of {result.epochs_planned} (budget)" if result.stopped_by_budget else ""
        )
        if result.best_epoch is not None:
            epochs += f", tested at {result.best_epoch + 1}"
        lines.append(
            f"| {markdown_cell(row.name)} | {describe(row.config)} | {row.paper_error:.2f}% | "
            f"{ours} | ≤ {target:.2f}% | {reached} | {epochs} | {minutes(result.seconds)} |"
        )
    if quick:
        lines.append("")
        lines.append("`--quick`: a few epochs on a subset, for the tests; these are not results.")
    if any(result.row.paper_settings for result in results):
        lines += ["", "| row | the paper's settings | ours |", "|---|---|---|"]
        lines += [
            f"| {markdown_cell(r.row.name)} | {markdown_cell(r.row.paper_settings)} | "
            f"{settings_words(r.row.config)} |"
            for r in results
        ]
    return "\n".join(lines) + "\n"


def settings_words(config: TrainConfig) -> str:
    """How a row trains, in a few words: ``batch 50, Nesterov 0.9, rate 0.05 cosine, 30
    epochs, l2 1e-4, shift1``."""
    if config.optimizer == "momentum":
        rule = f"{'Nesterov' if config.nesterov else 'momentum'} {config.momentum:g}"
    else:
        rule = config.optimizer.upper() if config.optimizer == "sgd" else config.optimizer
    parts = [
        f"batch {config.batch_size}",
        rule,
        f"rate {config.learning_rate:g}"
        + ("" if config.schedule == "constant" else f" {config.schedule}"),
        f"{config.epochs} epochs",
    ]
    if config.l2:
        parts.append(f"l2 {config.l2:g}")
    if config.augment != "none":
        parts.append(f"augment {config.augment}")
    return ", ".join(parts)


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
                "met": met(paper, result),
                "error": None if math.isnan(result.error) else result.error,
                "ci95": None if math.isnan(low) else [low, high],
                "errors": result.errors,
                "n_test": result.n_test,
                "epochs": result.epochs,
                "epochs_planned": result.epochs_planned,
                "best_epoch": result.best_epoch,
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
