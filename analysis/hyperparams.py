"""Validation accuracy against each searched hyperparameter, one panel each."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
import pandas as pd

from analysis.store import SearchDimension
from analysis.style import (
    BEST,
    STATE_COLORS,
    epochs_text,
    new_figure,
    plain_log_axis,
    require_rows,
    value_range,
)
from analysis.trial_axes import (
    far_out,
    mark_far_out,
    mark_in_strip,
    pruned_label,
    set_value_axis,
)


def plot_metric_vs_param(
    trials: pd.DataFrame,
    ax: Any,
    dimension: SearchDimension,
    metric: str = "val/accuracy",
    best_run: str | None = None,
    direction: str = "maximize",
) -> None:
    """Each trial's last ``metric`` against its value of ``dimension``.

    Completed trials are filled dots, and only they set the range of the ``metric`` axis
    (far-out ones on the worse side of ``direction`` at its edge, their value written:
    :mod:`analysis.trial_axes`); pruned trials, whose value after an epoch or two is not
    comparable with a finished trial's, are hollow grey circles in a grey strip below the range
    (at their parameter value); failed ones and any without a value are left out and counted in
    the legend. A log axis where the search was log; categorical choices are evenly spaced, in
    declared order (then any other value the trials used), with a small deterministic jitter so
    equal points stay visible. ``trials``: one row per trial run with ``run_id``, ``trial``,
    ``state``, ``metric`` and the parameter (and ``epochs_run``, if known, for the legend).
    """
    name = dimension.name
    require_rows(trials, f"{metric} against {name}", ("run_id", "trial", "state", metric, name))
    values = trials[metric].astype(float)
    x = _parameter_axis(trials, ax, dimension)
    # the range and the far-out trials from every completed value, whatever its parameter: the
    # panels of one figure share their value axis
    valued = (trials["state"] == "COMPLETE") & np.isfinite(values)
    far = valued & far_out(values.where(valued), direction)
    complete = valued & np.isfinite(x)
    pruned = (trials["state"] == "PRUNED") & np.isfinite(x)
    # (from the states alone: panels sharing their value axis all keep the strip, or none)
    strip = bool((trials["state"] == "PRUNED").any())
    accuracy = "accuracy" in metric
    _draw_trials(trials, ax, x, values, (complete, far, pruned), best_run)
    if (complete & far).any():
        mark_far_out(ax, x[complete & far], values[complete & far], direction, strip, accuracy)
    set_value_axis(ax, values[valued & ~far], strip, accuracy)
    if dimension.kind != "categorical":
        # The pruned trials' markers do not widen the axes by themselves.
        drawn = x[complete | pruned].to_numpy()
        span = value_range(drawn, log=dimension.log, pad=0.06)
        if span is not None:
            ax.set_xlim(*span)
    ax.set_xlabel(f"{name}{' (log scale)' if dimension.log else ''}")
    ax.set_ylabel(metric)


def _parameter_axis(trials: pd.DataFrame, ax: Any, dimension: SearchDimension) -> pd.Series:
    """Each trial's position on the x axis of ``ax`` (NaN without a usable value), one per row of
    ``trials``; sets up that axis: the choices as ticks (categorical), a log scale, or integer
    ticks."""
    name = dimension.name
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
    return x


def _draw_trials(
    trials: pd.DataFrame,
    ax: Any,
    x: pd.Series,
    values: pd.Series,
    masks: tuple[pd.Series, pd.Series, pd.Series],
    best_run: str | None,
) -> None:
    """The trials' markers, at positions ``x`` and heights ``values`` (one per row of
    ``trials``), by the masks ``(complete, far, pruned)``: pruned ones in the strip, completed
    ones not far out as dots, the best run as a star; failed ones counted in the legend only
    (the far-out ones are drawn by the caller)."""
    complete, far, pruned = masks
    hidden = int((~(complete | pruned)).sum())
    complete = complete & ~far
    if pruned.any():
        mark_in_strip(
            ax,
            x[pruned],
            s=26,
            facecolors="none",
            edgecolors=STATE_COLORS["PRUNED"],
            linewidths=1.0,
            label=pruned_label(trials[pruned]),
            zorder=2,
        )
    if complete.any():
        ax.scatter(
            x[complete],
            values[complete],
            s=30,
            color=STATE_COLORS["COMPLETE"],
            label=_complete_label(trials[complete]),
            zorder=3,
        )
    best = complete & (trials["run_id"] == best_run)
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
    if hidden:
        failed = int((trials["state"] == "FAIL").sum())
        what = "failed" if hidden == failed else "failed or without a value"
        ax.scatter(
            [], [], marker="x", color=STATE_COLORS["FAIL"], label=f"{hidden} {what} (not shown)"
        )


def _complete_label(rows: pd.DataFrame) -> str:
    """``complete (8 epochs)``: how long the trials whose values are drawn ran, if known."""
    ran = epochs_text(rows["epochs_run"]) if "epochs_run" in rows.columns else ""
    return f"complete ({ran.removeprefix('after ')})" if ran else "complete"


def _key(value: Any) -> str:
    """A choice as text, the same for a list the study recorded and the tuple a trial logged."""
    return str(list(value)) if isinstance(value, list | tuple) else str(value)


def _short(value: Any) -> str:
    """A tick label: ``0.001``, ``relu``, ``512x512`` (a list of widths); a long text (a
    ``layers`` value) wrapped at its spaces, so that neighbouring labels do not overlap."""
    if isinstance(value, list | tuple):
        return "x".join(map(str, value))
    if isinstance(value, str) and len(value) > 16:
        return "\n".join(textwrap.wrap(value, 16, break_long_words=False))
    return f"{value:g}" if isinstance(value, float) else str(value)


def metric_vs_params_figure(
    trials: pd.DataFrame,
    search: list[SearchDimension],
    metric: str = "val/accuracy",
    best_run: str | None = None,
    direction: str = "maximize",
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
        plot_metric_vs_param(trials, ax, dimension, metric, best_run, direction)
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
