"""Validation accuracy against each searched hyperparameter, one panel each."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.store import SearchDimension
from analysis.style import (
    BEST,
    STATE_COLORS,
    new_figure,
    percent_formatter,
    plain_log_axis,
    require_rows,
)


def plot_metric_vs_param(
    trials: pd.DataFrame,
    ax: Any,
    dimension: SearchDimension,
    metric: str = "val/accuracy",
    best_run: str | None = None,
) -> None:
    """Each trial's last ``metric`` against its value of ``dimension``.

    Completed trials are filled dots, pruned ones hollow grey circles at the value they had when
    stopped; failed ones and any without a value are left out and counted in the legend. A log
    axis where the search was log; categorical choices are evenly spaced, in declared order
    (then any other value the trials used), with a small deterministic jitter so equal points
    stay visible. ``trials``: one row per trial run with ``run_id``, ``trial``, ``state``,
    ``metric`` and the parameter.
    """
    name = dimension.name
    require_rows(trials, f"{metric} against {name}", ("run_id", "trial", "state", metric, name))
    values = trials[metric].astype(float)
    if dimension.kind == "categorical":
        order = list(dimension.choices)
        known = {_key(choice) for choice in order}
        # A resumed study may have searched choices its first run did not record.
        order += [v for v in dict.fromkeys(trials[name].dropna()) if _key(v) not in known]
        position = {_key(choice): index for index, choice in enumerate(order)}
        x = trials[name].map(lambda v: position.get(_key(v), np.nan)).astype(float)
        # Deterministic jitter from the trial number: the same figure every time.
        x = x + ((trials["trial"].to_numpy() * 0.618) % 1.0 - 0.5) * 0.25
        ax.set_xticks(range(len(order)), [_short(choice) for choice in order])
        ax.set_xlim(-0.5, len(order) - 0.5)
    else:
        x = pd.to_numeric(trials[name], errors="coerce").astype(float)
        if dimension.log:
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
        elif dimension.kind == "int":
            ax.xaxis.get_major_locator().set_params(integer=True)
    styles = {
        "PRUNED": {"s": 26, "facecolors": "none", "edgecolors": STATE_COLORS["PRUNED"],
                   "linewidths": 1.0, "label": "pruned (value when stopped)", "zorder": 2},
        "COMPLETE": {"s": 30, "color": STATE_COLORS["COMPLETE"], "label": "complete",
                     "zorder": 3},
    }  # fmt: skip
    shown = np.isfinite(values) & np.isfinite(x) & trials["state"].isin(list(styles))
    for state, style in styles.items():
        rows = shown & (trials["state"] == state)
        if rows.any():
            ax.scatter(x[rows], values[rows], **style)
    best = shown & (trials["run_id"] == best_run)
    if best.any():
        ax.scatter(
            x[best],
            values[best],
            s=160,
            marker="*",
            color=BEST,
            edgecolors="black",
            linewidths=0.6,
            label=f"best (trial {int(trials.loc[best, 'trial'].iloc[0])})",
            zorder=4,
        )
    hidden = int((~shown).sum())
    if hidden:
        failed = int((trials["state"] == "FAIL").sum())
        what = "failed" if hidden == failed else "failed or without a value"
        ax.scatter(
            [], [], marker="x", color=STATE_COLORS["FAIL"], label=f"{hidden} {what} (not shown)"
        )
    ax.set_xlabel(f"{name}{' (log scale)' if dimension.log else ''}")
    ax.set_ylabel(metric)
    if "accuracy" in metric:
        ax.yaxis.set_major_formatter(percent_formatter())


def _key(value: Any) -> str:
    """A choice as text, the same for a list the study recorded and the tuple a trial logged."""
    return str(list(value)) if isinstance(value, list | tuple) else str(value)


def _short(value: Any) -> str:
    """A tick label: ``0.001``, ``relu``, ``512x512`` (a list of widths)."""
    if isinstance(value, list | tuple):
        return "x".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def metric_vs_params_figure(
    trials: pd.DataFrame,
    search: list[SearchDimension],
    metric: str = "val/accuracy",
    best_run: str | None = None,
):
    """One panel per searched hyperparameter (up to 3 per row), one legend below them all."""
    if not search:
        from analysis.style import EmptyDataError

        raise EmptyDataError(f"cannot draw {metric} against the parameters: nothing was searched")
    columns = 2 if len(search) == 4 else min(3, len(search))
    rows = math.ceil(len(search) / columns)
    figure, axes = new_figure(
        3.9 * columns, 3.3 * rows + 0.5, nrows=rows, ncols=columns, sharey=True, squeeze=False
    )
    for ax, dimension in zip(axes.flat, search):
        plot_metric_vs_param(trials, ax, dimension, metric, best_run)
    for ax in list(axes.flat)[len(search) :]:
        ax.set_visible(False)
    for ax in axes[:, 1:].flat:
        ax.set_ylabel("")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    figure.legend(
        list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend)
    )
    return figure
