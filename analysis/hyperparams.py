"""The objective against each searched hyperparameter, one panel each."""

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


def plot_objective_vs_param(
    trials: pd.DataFrame,
    ax: Any,
    dimension: SearchDimension,
    objective: str = "val/accuracy",
    best_trial: int | None = None,
) -> None:
    """Each trial's last ``objective`` against its value of ``dimension``.

    Completed trials are filled dots, pruned ones hollow grey circles at the value they had when
    stopped, failed ones (no usable objective) are left out and counted in the legend. A log
    axis where the search was log; categorical choices are evenly spaced, in declared order,
    with a small deterministic jitter so equal points stay visible.
    ``trials``: one row per trial with ``trial``, ``state``, ``objective`` and the parameter.
    """
    name = dimension.name
    require_rows(trials, f"{objective} against {name}", ("trial", "state", objective, name))
    values = trials[objective].astype(float)
    is_accuracy = "accuracy" in objective
    categorical = dimension.kind == "categorical"
    if categorical:
        order = list(dimension.choices) or sorted(trials[name].dropna().unique().tolist())
        position = {str(choice): index for index, choice in enumerate(order)}
        x = trials[name].map(lambda v: position.get(str(v), np.nan)).astype(float)
        # Deterministic jitter from the trial number: the same figure every time.
        x = x + ((trials["trial"].to_numpy() * 0.618) % 1.0 - 0.5) * 0.25
        ax.set_xticks(range(len(order)), [_short(choice) for choice in order])
        ax.set_xlim(-0.5, len(order) - 0.5)
    else:
        x = trials[name].astype(float)
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
    for state, style in styles.items():
        rows = (trials["state"] == state) & np.isfinite(values) & np.isfinite(x)
        if rows.any():
            ax.scatter(x[rows], values[rows], **style)
    failed = int((~np.isfinite(values) | (trials["state"] == "FAIL")).sum())
    if best_trial is not None and (trials["trial"] == best_trial).any():
        rows = trials["trial"] == best_trial
        ax.scatter(
            x[rows],
            values[rows],
            s=160,
            marker="*",
            color=BEST,
            edgecolors="black",
            linewidths=0.6,
            label=f"best (trial {best_trial})",
            zorder=4,
        )
    if failed:
        ax.scatter(
            [], [], marker="x", color=STATE_COLORS["FAIL"], label=f"{failed} failed (not shown)"
        )
    ax.set_xlabel(f"{name}{' (log scale)' if dimension.log else ''}")
    ax.set_ylabel(objective)
    if is_accuracy:
        ax.yaxis.set_major_formatter(percent_formatter())


def _short(value: Any) -> str:
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.0e}"
    return str(value)


def objective_vs_params_figure(
    trials: pd.DataFrame,
    search: list[SearchDimension],
    objective: str,
    best_trial: int | None,
):
    """One panel per searched hyperparameter (up to 3 per row), a shared legend below."""
    if not search:
        from analysis.style import EmptyDataError

        raise EmptyDataError(
            "cannot draw the objective against the parameters: nothing was searched"
        )
    columns = 2 if len(search) == 4 else min(3, len(search))
    rows = math.ceil(len(search) / columns)
    figure, axes = new_figure(
        3.9 * columns, 3.3 * rows + 0.5, nrows=rows, ncols=columns, sharey=True, squeeze=False
    )
    for ax, dimension in zip(axes.flat, search):
        plot_objective_vs_param(trials, ax, dimension, objective, best_trial)
    for ax in list(axes.flat)[len(search) :]:
        ax.set_visible(False)
    for ax in axes[:, 1:].flat:
        ax.set_ylabel("")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    return figure
