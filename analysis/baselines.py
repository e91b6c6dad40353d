"""A test accuracy placed against the published results on its dataset.

Each dataset's description lists published test accuracies of comparable models
(``DatasetInfo.baselines``: (who and what, accuracy in percent)). A result is *above* a baseline
when the baseline lies below its 95% Wilson interval, *below* it when the baseline lies above
the interval, and *within* otherwise (the interval's ends included): the test split cannot tell
the two apart. Pure functions; nothing here reads a store or a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from analysis.evaluation import wilson_interval


def place(baseline_percent: float, low: float, high: float) -> str:
    """Where a result with the 95% interval ``[low, high]`` (fractions) stands against a
    published accuracy ``baseline_percent`` (percent): ``above``, ``within`` or ``below``."""
    if not low <= high:
        raise ValueError(f"not an interval: [{low}, {high}]")
    if baseline_percent < 100 * low:
        return "above"
    if baseline_percent > 100 * high:
        return "below"
    return "within"


def against_baselines(
    correct: int, n: int, baselines: Iterable[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Each baseline with where ``correct`` of ``n`` test rows stands against it, through the
    95% Wilson interval of ``correct / n``: ``{"baseline", "accuracy_percent", "place"}``."""
    low, high = wilson_interval(correct, n)
    return [
        {
            "baseline": str(description),
            "accuracy_percent": float(accuracy),
            "place": place(float(accuracy), low, high),
        }
        for description, accuracy in baselines
    ]


def baselines_table(
    rows: list[dict[str, Any]], accuracy: float, low: float, high: float
) -> pd.DataFrame:
    """The report's table of :func:`against_baselines` rows: the baseline, its accuracy as
    published, ours with its 95% interval (fractions ``accuracy``, ``low``, ``high``), and
    whether ours is above, within or below it."""
    ours = f"{100 * accuracy:.2f}% ({100 * low:.2f}% to {100 * high:.2f}%)"
    return pd.DataFrame(
        {
            "baseline": [row["baseline"] for row in rows],
            "its test accuracy": [f"{row['accuracy_percent']:g}%" for row in rows],
            "ours (95% interval)": [ours] * len(rows),
            "ours is": [row["place"] for row in rows],
        },
        columns=["baseline", "its test accuracy", "ours (95% interval)", "ours is"],
    )
