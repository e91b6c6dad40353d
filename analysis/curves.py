"""Loss curves of every trial of a study on one figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.style import (
    ACCURACY_CMAP,
    BEST,
    LOG_RATIO,
    plain_log_axis,
    require_rows,
    value_range,
)

LOSSES = ("train/loss", "val/loss")


def final_accuracy(curves: pd.DataFrame) -> pd.Series:
    """Each run's last logged validation accuracy (indexed by ``run_id``)."""
    ordered = curves.sort_values(["run_id", "epoch"])
    return ordered.groupby("run_id")["val/accuracy"].last()


def accuracy_norm(curves: pd.DataFrame):
    """The color scale of final validation accuracy shared by every panel of a figure.

    It spans the 5th percentile to the best of the completed trials (of all when none
    completed), so that one far-off trial does not squeeze all the others into one color, and a
    trial pruned after an epoch or two does not set it; trials below it take the lowest color.
    """
    from matplotlib.colors import Normalize

    finals = final_accuracy(_completed_or_all(curves)).to_numpy(dtype=float)
    finals = finals[np.isfinite(finals)]
    if finals.size == 0:
        return Normalize(0.0, 1.0, clip=True)
    low, high = float(np.percentile(finals, 5)), float(finals.max())
    if high - low < 1e-6:
        low, high = low - 0.005, high + 0.005
    return Normalize(low, high, clip=True)


def _completed_or_all(curves: pd.DataFrame) -> pd.DataFrame:
    complete = curves[curves["state"] == "COMPLETE"]
    return complete if len(complete) else curves


def loss_axis(curves: pd.DataFrame, metrics: tuple[str, ...] = LOSSES) -> tuple[str, float, float]:
    """The y scale (``"log"`` or ``"linear"``) and limits of the loss panels, one for all of
    ``metrics``, set by the completed trials' values (by every trial's when none completed): log
    when those are all positive and span more than ``LOG_RATIO``. A pruned or failed trial
    outside that range runs off the axes rather than flatten the others."""
    basis = _completed_or_all(curves)
    columns = [metric for metric in metrics if metric in basis.columns]
    values = basis[columns].to_numpy(dtype=float).ravel() if columns else np.array([])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "linear", 0.0, 1.0
    log = bool(values.min() > 0 and values.max() / values.min() > LOG_RATIO)
    low, high = value_range(values, log=log, pad=0.05) or (0.0, 1.0)
    return ("log" if log else "linear"), low, high


def plot_loss_curves(
    curves: pd.DataFrame,
    ax: Any,
    metric: str = "val/loss",
    best_run: str | None = None,
    norm: Any = None,
    legend: bool = True,
    axis: tuple[str, float, float] | None = None,
) -> Any:
    """One line per trial run of ``metric`` against epoch, colored by the run's final
    validation accuracy; pruned and failed trials are faint and end where they stopped (a cross
    marks the end); the best run is drawn thick in the best-trial color. The y scale and range
    are ``axis`` (as :func:`loss_axis` gives; by default :func:`loss_axis` of ``metric``).

    ``curves``: long frame with ``run_id``, ``trial``, ``state``, ``epoch`` (counted from 1, as
    the training command prints them), ``val/accuracy`` and ``metric`` (one row per run and
    epoch). Returns the ScalarMappable of the color scale (for a colorbar).
    """
    import matplotlib as mpl

    require_rows(curves, f"the {metric} curves", ("run_id", "trial", "state", "epoch", metric))
    if (curves["epoch"] < 1).any():
        raise ValueError(
            f"cannot draw the {metric} curves: epochs count from 1 (epoch "
            f"{int(curves['epoch'].min())} found)"
        )
    norm = norm or accuracy_norm(curves)
    cmap = mpl.colormaps[ACCURACY_CMAP]
    finals = final_accuracy(curves)
    best_label = None
    for run_id, rows in curves.sort_values(["trial", "run_id", "epoch"]).groupby(
        "run_id", sort=False
    ):
        rows = rows[np.isfinite(rows[metric].astype(float))]
        if rows.empty:
            continue
        state = rows["state"].iloc[0]
        x, y = rows["epoch"].to_numpy(), rows[metric].to_numpy(dtype=float)
        if run_id == best_run:
            ax.plot(x, y, color=BEST, linewidth=2.6, zorder=4)  # on top of all others
            best_label = int(rows["trial"].iloc[0])
            continue
        color = cmap(norm(finals.get(run_id, np.nan)))
        if state == "COMPLETE":
            ax.plot(x, y, color=color, linewidth=1.2, alpha=0.9, zorder=2)
        else:
            ax.plot(x, y, color=color, linewidth=0.9, alpha=0.35, linestyle="--", zorder=1)
            ax.plot(x[-1], y[-1], marker="x", color=color, alpha=0.6, markersize=4, zorder=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (mean over rows)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    scale, low, high = axis or loss_axis(curves, (metric,))
    if scale == "log":
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    ax.set_ylim(low, high)
    values = curves[metric].to_numpy(dtype=float)
    off = curves.loc[np.isfinite(values) & ((values > high) | (values < low)), "run_id"].nunique()
    if off:
        # Said on the panel: a trial drawn off it must not simply vanish.
        ax.text(
            0.99,
            0.98,
            f"{off} trial{'s' if off > 1 else ''} partly off this range",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="#555555",
        )
    if legend:
        ax.legend(handles=_legend_handles(best_label), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return mpl.cm.ScalarMappable(norm=norm, cmap=cmap)


def _legend_handles(best_trial: int | None) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="#555555", linewidth=1.2, label="complete"),
        Line2D(
            [],
            [],
            color="#555555",
            linewidth=0.9,
            alpha=0.5,
            linestyle="--",
            marker="x",
            markersize=4,
            label="pruned / failed (ends where it stopped)",
        ),
    ]
    if best_trial is not None:
        handles.append(
            Line2D([], [], color=BEST, linewidth=2.6, label=f"best (trial {best_trial})")
        )
    return handles


def loss_curves_figure(curves: pd.DataFrame, best_run: str | None):
    """``train/loss`` and ``val/loss`` side by side on one y axis (the same scale and range,
    set by the completed trials: :func:`loss_axis`) with one shared accuracy colorbar."""
    from analysis.style import new_figure, percent_formatter

    figure, axes = new_figure(11, 4.2, ncols=2, sharex=True, sharey=True)
    norm = accuracy_norm(curves)
    axis = loss_axis(curves, LOSSES)
    for ax, metric in zip(axes, LOSSES):
        mappable = plot_loss_curves(curves, ax, metric, best_run, norm, legend=False, axis=axis)
        ax.set_title(metric)
    # One legend for both panels, below them, where it cannot cover a curve.
    best = curves.loc[curves["run_id"] == best_run, "trial"]
    handles = _legend_handles(int(best.iloc[0]) if len(best) else None)
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    axes[0].set_ylabel("loss (mean over rows)")
    axes[1].set_ylabel("")
    axes[1].tick_params(labelleft=True)  # shared, but each panel keeps its numbers
    low = mappable.norm.vmin
    below = bool((final_accuracy(curves) < low - 1e-12).any())
    colorbar = figure.colorbar(
        mappable,
        ax=axes,
        shrink=0.9,
        format=percent_formatter(),
        extend="min" if below else "neither",
    )
    colorbar.set_label("final val/accuracy")
    return figure
