"""How the search went: the optimization history and the parameter importances."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.style import (
    BEST,
    STATE_COLORS,
    epochs_text,
    new_figure,
    percent_formatter,
    require_rows,
)
from analysis.trial_axes import (
    far_out,
    mark_far_out,
    mark_in_strip,
    pruned_label,
    set_value_axis,
    worse_fence,
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

    Only completed trials are drawn on the ``objective`` axis and set its range (far-out ones
    at its edge, their value written: :mod:`analysis.trial_axes`): a pruned trial's value after
    an epoch or two is not comparable with a finished trial's, so pruned trials are hollow grey
    circles in a grey strip below the range, and failed ones crosses there.
    ``trials``: one row per trial with ``trial``, ``state`` and ``objective`` (and
    ``epochs_run``, if known, for the legend).
    """
    require_rows(trials, "the optimization history", ("trial", "state", objective))
    values = trials[objective].astype(float)
    complete = (trials["state"] == "COMPLETE") & np.isfinite(values)
    far = complete & far_out(values.where(complete), direction)
    pruned = trials["state"] == "PRUNED"
    failed = trials[~(complete | pruned)]
    strip = bool(pruned.any() or len(failed))
    accuracy = "accuracy" in objective
    _draw_history_trials(trials, ax, values, complete & ~far, pruned, failed)
    if far.any():
        mark_far_out(ax, trials.loc[far, "trial"], values[far], direction, strip, accuracy)
    best = best_so_far(trials, objective, direction)
    fence = worse_fence(values[complete], direction)
    if fence is not None:  # a best so far that is far out is drawn from where it is not
        best = best.where(best >= fence if direction == "maximize" else best <= fence)
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
    set_value_axis(ax, values[complete & ~far], strip, accuracy)
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.xaxis.get_major_locator().set_params(integer=True)
    # Beside the axes: inside, it would cover trials whatever the corner.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_history_trials(
    trials: pd.DataFrame,
    ax: Any,
    values: pd.Series,
    shown: pd.Series,
    pruned: pd.Series,
    failed: pd.DataFrame,
) -> None:
    """The completed trials in ``shown`` on the value axis; pruned and ``failed`` ones in the
    strip below it, at their numbers."""
    if shown.any():
        ran = trials[shown]
        ran = epochs_text(ran["epochs_run"]) if "epochs_run" in ran.columns else ""
        ax.scatter(
            trials.loc[shown, "trial"],
            values[shown],
            s=28,
            color=STATE_COLORS["COMPLETE"],
            label=f"complete ({ran.removeprefix('after ')})" if ran else "complete",
            zorder=3,
        )
    if pruned.any():
        mark_in_strip(
            ax,
            trials.loc[pruned, "trial"],
            s=28,
            facecolors="none",
            edgecolors=STATE_COLORS["PRUNED"],
            label=pruned_label(trials[pruned]),
            zorder=3,
        )
    if len(failed):
        # Failed trials have no value: mark their numbers in the strip.
        mark_in_strip(
            ax,
            failed["trial"],
            marker="x",
            color=STATE_COLORS["FAIL"],
            zorder=3,
            label=f"failed ({len(failed)}; no value)",
        )


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
