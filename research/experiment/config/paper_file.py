"""The paper file of ``python -m research reproduce``: a published table as TOML.

A paper file names a paper (``[paper]``: the MLflow experiment, the title, the budget per row,
the tolerance, the preset, when the test split is read), the ``[quick]`` settings for tests, and
the rows of one of its tables (``[[rows]]``): each a published test error, optionally the
paper's own settings (printed beside ours) and a budget of its own, and the training fields that
reproduce it (``[rows.fixed]``, over the preset). :func:`load_paper` reads and validates one;
a mistake is one ``ConfigError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.experiment.config.config_text import check_keys, load_toml, table_of
from research.experiment.config.fields import FIELDS, ConfigError, Field, TrainConfig, show
from research.experiment.config.presets import PRESETS, configure, preset_name
from research.experiment.config.study_config import NAME_ALLOWED, NAME_PATTERN

#: When the test split is read (``[paper] test_at``).
TEST_AT = ("end", "best_validation_epoch")
#: The most percentage points above the paper's error a row may land and still meet its target.
MAX_TOLERANCE = 10.0

#: The ``[paper]`` table, declared like the training fields.
PAPER_FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field(
            "name", str, None, "the MLflow experiment", pattern=NAME_PATTERN,
            allowed_text=NAME_ALLOWED,
        ),
        Field("title", str, None, "the paper and the table, as cited"),
        Field("budget_minutes", float, 30.0, "wall time per row", gt=0, le=7 * 24 * 60),
        # Bounded: a target far above the paper's error says nothing about the paper.
        Field("tolerance", float, 0.15, "points above the paper's error a row may land", ge=0,
              le=MAX_TOLERANCE),
        Field("preset", str, "default", "the preset rows start from", choices=tuple(PRESETS)),
        Field("test_at", str, "end", "when the test split is read", choices=TEST_AT,
              allowed_text='"end" (trained on all 60,000, tested once at the end) or '
              '"best_validation_epoch" (trained on the 50,000, tested with the parameters of '
              "the epoch of best validation accuracy)"),
    )
}  # fmt: skip
ROW_FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("name", str, None, "the row as the paper names it", pattern=r".{1,100}",
              allowed_text="a string of 1 to 100 characters"),
        Field("paper_error", float, None, "the paper's test error, in percent", gt=0, lt=100),
        Field("note", str, "", "where the settings come from"),
        Field("paper_settings", str, "", "the paper's own settings, printed beside ours"),
        Field("budget_minutes", float, 0.0, "this row's wall time (0: the paper's budget)", ge=0,
              le=7 * 24 * 60),
    )
}  # fmt: skip
QUICK_FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("epochs", int, 2, "epochs per row with --quick", ge=1, le=1000),
        Field("subset", int, 2000, "training rows per row with --quick", ge=1, le=60_000),
    )
}


@dataclass(frozen=True)
class Row:
    """One row of the table: the published error and the fields that reproduce it."""

    name: str
    paper_error: float  # percent
    config: TrainConfig
    note: str = ""
    paper_settings: str = ""
    budget_minutes: float = 0.0  # 0: the paper's


@dataclass(frozen=True)
class Paper:
    """A paper file, validated."""

    path: Path
    name: str
    title: str
    budget_minutes: float
    tolerance: float
    rows: tuple[Row, ...]
    quick_epochs: int
    quick_subset: int
    test_at: str = "end"

    def target(self, row: Row) -> float:
        """The error (percent) a row must reach: the paper's plus the tolerance."""
        return round(row.paper_error + self.tolerance, 6)

    def budget(self, row: Row) -> float:
        """The wall time of ``row``, in minutes: its own, else the paper's."""
        return row.budget_minutes or self.budget_minutes

    @property
    def best_validation_epoch(self) -> bool:
        """Rows train on the 50,000 and are tested at their best validation epoch."""
        return self.test_at == "best_validation_epoch"


def load_paper(path: str | Path) -> Paper:
    """Reads and validates a paper file; ConfigError names the file, the key and what is
    allowed."""
    return load_toml(Path(path), "paper file", _parse)


def _settings(table: dict[str, Any], prefix: str, fields: dict[str, Field]) -> dict[str, Any]:
    check_keys(table, prefix, tuple(fields), [n for n, f in fields.items() if f.default is None])
    values = {name: f.default for name, f in fields.items()} | table
    return {name: fields[name].check(values[name], f"{prefix}{name}") for name in fields}


def _parse(path: Path, raw: dict[str, Any]) -> Paper:
    check_keys(raw, "", ("paper", "quick", "rows"), required=("paper", "rows"))
    paper = _settings(table_of(raw["paper"], "paper", "a [paper] table"), "paper.", PAPER_FIELDS)
    quick = _settings(
        table_of(raw.get("quick", {}), "quick", "a [quick] table"), "quick.", QUICK_FIELDS
    )
    tables = raw["rows"]
    if not isinstance(tables, list) or not tables:
        raise ConfigError("rows", "not a list of [[rows]] tables", allowed="one [[rows]] per row")
    base = PRESETS[preset_name(paper["preset"])]
    rows = []
    for i, table in enumerate(tables):
        prefix = f"rows[{i}]."
        table = table_of(table, f"rows[{i}]", "a [[rows]] table")
        fixed = table_of(table.pop("fixed", {}), f"{prefix}fixed", "a table of training fields")
        settings = _settings(table, prefix, ROW_FIELDS)
        if settings["paper_error"] + paper["tolerance"] >= 100:
            raise ConfigError(
                f"{prefix}paper_error",
                f"plus paper.tolerance = {show(paper['tolerance'])} is 100% or more: every result "
                "would meet that target",
                value=settings["paper_error"],
                allowed="a paper error and a tolerance that add up to less than 100",
            )
        check_keys(fixed, f"{prefix}fixed.", tuple(FIELDS))
        values = {name: FIELDS[name].check(v, f"{prefix}fixed.{name}") for name, v in fixed.items()}
        try:
            config = configure(base, **values)
        except ConfigError as error:
            raise error.but(key=f"{prefix}fixed.{error.key}") from None
        except ValueError as error:  # a combination, e.g. cross-entropy without softmax
            raise ConfigError(f"{prefix}fixed", str(error)) from None
        rows.append(
            Row(
                settings["name"], settings["paper_error"], config, settings["note"],
                settings["paper_settings"], settings["budget_minutes"],
            )
        )  # fmt: skip
    names = [row.name for row in rows]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("rows", f"two rows are named {show(name)}", allowed="unique names")
    return Paper(
        path=path,
        name=paper["name"],
        title=paper["title"],
        budget_minutes=paper["budget_minutes"],
        tolerance=paper["tolerance"],
        rows=tuple(rows),
        quick_epochs=quick["epochs"],
        quick_subset=quick["subset"],
        test_at=paper["test_at"],
    )


def select_rows(paper: Paper, numbers: Sequence[int] | None) -> list[int]:
    """Row indexes (from 0) for row numbers counted from 1 (all rows for None); ConfigError for
    a number the file does not have."""
    if not numbers:
        return list(range(len(paper.rows)))
    for number in numbers:
        if not 1 <= number <= len(paper.rows):
            raise ConfigError(
                "--rows", "no such row", value=number, allowed=f"1 to {len(paper.rows)}"
            )
    return sorted({number - 1 for number in numbers})
