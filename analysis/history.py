"""How the search went: the optimization history and the parameter importances."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.style import BEST, STATE_COLORS, new_figure, percent_formatter, require_rows


def best_so_far(trials: pd.DataFrame, objective: str, direction: str) -> pd.Series:
    """The best ``objective`` among COMPLETE trials up to each trial number (NaN before the
    first complete one), indexed like ``trials`` sorted by trial number."""
    ordered = trials.sort_values("trial")
    values = ordered[objective].astype(float).where(ordered["state"] == "COMPLETE")
    running = values.cummax() if direction == "maximize" else values.cummin()
    # cummax leaves NaN at the trials that did not complete; the best so far carries over them.
    running = running.ffill()
    return running.set_axis(ordered["trial"].to_numpy())


def plot_optimization_history(
    trials: pd.DataFrame, ax: Any, objective: str = "val/accuracy", direction: str = "maximize"
) -> None:
    """Each trial's ``objective`` against its number (by state) and the best value so far.

    ``trials``: one row per trial with ``trial``, ``state`` and ``objective``.
    """
    require_rows(trials, "the optimization history", ("trial", "state", objective))
    values = trials[objective].astype(float)
    for state, label in (("COMPLETE", "complete"), ("PRUNED", "pruned (value when stopped)")):
        rows = (trials["state"] == state) & np.isfinite(values)
        style = (
            {"color": STATE_COLORS[state]}
            if state == "COMPLETE"
            else {"facecolors": "none", "edgecolors": STATE_COLORS[state]}
        )
        if rows.any():
            ax.scatter(
                trials.loc[rows, "trial"], values[rows], s=28, label=label, zorder=3, **style
            )
    failed = trials[(trials["state"] == "FAIL") | ~np.isfinite(values)]
    if len(failed):
        # Failed trials have no value: mark their numbers along the bottom edge.
        ax.scatter(
            failed["trial"],
            np.zeros(len(failed)),
            marker="x",
            color=STATE_COLORS["FAIL"],
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=3,
            label=f"failed ({len(failed)}; no value)",
        )
    best = best_so_far(trials, objective, direction)
    if best.notna().any():
        # Carried half a trial past the last one, so that a single trial still shows its line.
        last = best.index.max() + 0.5
        best = pd.concat([best, pd.Series([best.iloc[-1]], index=[last])])
        ax.step(
            best.index,
            best.to_numpy(),
            where="post",
            color=BEST,
            linewidth=2,
            label="best so far",
            zorder=2,
        )
    numbers = trials["trial"].astype(float)
    ax.set_xlim(numbers.min() - 0.6, numbers.max() + 0.6)  # failed trials count too
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if "accuracy" in objective:
        ax.yaxis.set_major_formatter(percent_formatter())
    # Beside the axes: inside, it would cover trials whatever the corner.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_importances(importances: pd.DataFrame, ax: Any) -> None:
    """Horizontal bars of each hyperparameter's importance (fraction of the objective's variance
    it explains, fANOVA), the most important on top.

    ``importances``: ``param`` and ``importance`` columns.
    """
    require_rows(importances, "the parameter importances", ("param", "importance"))
    ordered = importances.sort_values("importance")
    bars = ax.barh(ordered["param"], ordered["importance"], color=STATE_COLORS["COMPLETE"])
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in ordered["importance"]], padding=3, fontsize=8)
    ax.set_xlabel("importance (share of the objective's variance, fANOVA)")
    ax.set_xlim(0, min(1.0, float(ordered["importance"].max()) * 1.25 + 0.02))
    ax.xaxis.set_major_formatter(percent_formatter(decimals=0))
    ax.grid(axis="y", visible=False)


def optimization_history_figure(trials: pd.DataFrame, objective: str, direction: str):
    """The optimization history on its own figure."""
    figure, ax = new_figure(7.5, 4)
    plot_optimization_history(trials, ax, objective, direction)
    ax.set_title("optimization history")
    return figure


def importances_figure(importances: pd.DataFrame):
    """The parameter importances on their own figure."""
    figure, ax = new_figure(6.5, 0.9 + 0.45 * max(len(importances), 2))
    plot_importances(importances, ax)
    ax.set_title("parameter importances")
    return figure
