"""How the search went: the optimization history and the parameter importances."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.style import (
    BEST,
    STATE_COLORS,
    epochs_text,
    mark_along_bottom,
    new_figure,
    percent_formatter,
    pruned_label,
    require_rows,
    value_range,
)

#: The one way the report and the study's own figures measure parameter importances: Optuna's
#: ``FanovaImportanceEvaluator`` with this seed, over the completed trials; named in the
#: figure's title and axis. Optuna 5's default evaluator (PED-ANOVA) asks another question and
#: can rank the parameters differently: :func:`importances_caveat` says how, in the caption.
IMPORTANCES_SEED = 0
IMPORTANCES_METHOD = f"fANOVA, seed {IMPORTANCES_SEED}"


def importances_caveat(n_complete: int) -> str:
    """Why Optuna's default importances may disagree with the report's, for a study of
    ``n_complete`` completed trials (a sentence of the figure's caption)."""
    top = max(1, round(n_complete / 10))
    return (
        "fANOVA fits a random forest to the completed trials and splits the variance of the "
        "objective over the whole search space between the hyperparameters. Optuna 5's default "
        "evaluator, PED-ANOVA (what optuna.importance.get_param_importances and "
        "plot_param_importances use when given none; Optuna 4's default was fANOVA), asks "
        f"instead which values the top 10% of the completed trials share (about {top} of the "
        f"{n_complete} here), so the two can rank the hyperparameters very differently; with a "
        "few dozen trials neither ranking is precise."
    )


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
    """Each completed trial's ``objective`` against its number, and the best value so far.

    Only completed trials are drawn on the ``objective`` axis and set its range: a pruned
    trial's value after an epoch or two is not comparable with a finished trial's, so pruned
    trials are hollow grey circles along the bottom edge, and failed ones crosses there.
    ``trials``: one row per trial with ``trial``, ``state`` and ``objective`` (and
    ``epochs_run``, if known, for the legend).
    """
    require_rows(trials, "the optimization history", ("trial", "state", objective))
    values = trials[objective].astype(float)
    complete = (trials["state"] == "COMPLETE") & np.isfinite(values)
    if complete.any():
        ran = trials[complete]
        ran = epochs_text(ran["epochs_run"]) if "epochs_run" in ran.columns else ""
        ax.scatter(
            trials.loc[complete, "trial"],
            values[complete],
            s=28,
            color=STATE_COLORS["COMPLETE"],
            label=f"complete ({ran.removeprefix('after ')})" if ran else "complete",
            zorder=3,
        )
    pruned = trials["state"] == "PRUNED"
    if pruned.any():
        mark_along_bottom(
            ax,
            trials.loc[pruned, "trial"],
            s=28,
            facecolors="none",
            edgecolors=STATE_COLORS["PRUNED"],
            label=pruned_label(trials[pruned]),
            zorder=3,
        )
    failed = trials[~(complete | pruned)]
    if len(failed):
        # Failed trials have no value: mark their numbers along the bottom edge.
        mark_along_bottom(
            ax,
            failed["trial"],
            marker="x",
            color=STATE_COLORS["FAIL"],
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
    limits = value_range(values[complete])
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if "accuracy" in objective:
        ax.yaxis.set_major_formatter(percent_formatter())
    # Beside the axes: inside, it would cover trials whatever the corner.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_importances(importances: pd.DataFrame, ax: Any, method: str = IMPORTANCES_METHOD) -> None:
    """Horizontal bars of each hyperparameter's importance (fraction of the objective's variance
    it explains, as ``method`` measured it), the most important on top.

    ``importances``: ``param`` and ``importance`` columns; with ``low`` and ``high`` (the
    shares' range with each completed trial left out in turn), whiskers span them.
    """
    require_rows(importances, "the parameter importances", ("param", "importance"))
    ordered = importances.sort_values("importance")
    bars = ax.barh(ordered["param"], ordered["importance"], color=STATE_COLORS["COMPLETE"])
    right = float(ordered["importance"].max())
    if {"low", "high"} <= set(ordered):
        # The range itself, [low, high], which need not hold the share of all the trials.
        middle, half = (
            (ordered["low"] + ordered["high"]) / 2,
            (ordered["high"] - ordered["low"]) / 2,
        )
        ax.errorbar(
            middle, ordered["param"], xerr=half, fmt="none", ecolor="0.25", capsize=3,
            linewidth=1, label="leave-one-out range",
        )  # fmt: skip
        right = max(right, float(ordered["high"].max()))
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in ordered["importance"]], padding=3, fontsize=8)
    ax.set_xlabel(f"importance (share of the objective's variance, {method})")
    ax.set_xlim(0, min(1.0, right * 1.25 + 0.02))
    ax.xaxis.set_major_formatter(percent_formatter(decimals=0))
    ax.grid(axis="y", visible=False)


def optimization_history_figure(trials: pd.DataFrame, objective: str, direction: str):
    """The optimization history on its own figure."""
    figure, ax = new_figure(7.5, 4)
    plot_optimization_history(trials, ax, objective, direction)
    ax.set_title("optimization history")
    return figure


def importances_figure(importances: pd.DataFrame, method: str = IMPORTANCES_METHOD):
    """The parameter importances on their own figure, titled with the ``method`` that measured
    them."""
    figure, ax = new_figure(6.5, 0.9 + 0.45 * max(len(importances), 2))
    plot_importances(importances, ax, method)
    ax.set_title(f"parameter importances ({method})")
    return figure
