"""Loss curves of every trial of a study on one figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.style import ACCURACY_CMAP, BEST, plain_log_axis, require_rows


def final_accuracy(curves: pd.DataFrame) -> pd.Series:
    """Each run's last logged validation accuracy (indexed by ``run_id``)."""
    ordered = curves.sort_values(["run_id", "epoch"])
    return ordered.groupby("run_id")["val/accuracy"].last()


def accuracy_norm(curves: pd.DataFrame):
    """The color scale of final validation accuracy shared by every panel of a figure.

    It spans the 5th percentile to the best, so that one far-off trial does not squeeze all the
    others into one color; trials below it take the lowest color.
    """
    from matplotlib.colors import Normalize

    finals = final_accuracy(curves).to_numpy(dtype=float)
    finals = finals[np.isfinite(finals)]
    if finals.size == 0:
        return Normalize(0.0, 1.0, clip=True)
    low, high = float(np.percentile(finals, 5)), float(finals.max())
    if high - low < 1e-6:
        low, high = low - 0.005, high + 0.005
    return Normalize(low, high, clip=True)


def plot_loss_curves(
    curves: pd.DataFrame,
    ax: Any,
    metric: str = "val/loss",
    best_run: str | None = None,
    norm: Any = None,
    legend: bool = True,
) -> Any:
    """One line per trial run of ``metric`` against epoch, colored by the run's final
    validation accuracy; pruned and failed trials are faint and end where they stopped (a cross
    marks the end); the best run is drawn thick in the best-trial color.

    ``curves``: long frame with ``run_id``, ``trial``, ``state``, ``epoch``, ``val/accuracy``
    and ``metric`` (one row per run and epoch). Returns the ScalarMappable of the color scale
    (for a colorbar).
    """
    import matplotlib as mpl

    require_rows(curves, f"the {metric} curves", ("run_id", "trial", "state", "epoch", metric))
    norm = norm or accuracy_norm(curves)
    cmap = mpl.colormaps[ACCURACY_CMAP]
    finals = final_accuracy(curves)
    positive = True
    best_label = None
    for run_id, rows in curves.sort_values(["trial", "run_id", "epoch"]).groupby(
        "run_id", sort=False
    ):
        rows = rows[np.isfinite(rows[metric].astype(float))]
        if rows.empty:
            continue
        positive &= bool((rows[metric] > 0).all())
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
    values = curves[metric].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if positive and values.size and values.max() / max(values.min(), 1e-300) > 20:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
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
    """``train/loss`` and ``val/loss`` side by side with one shared accuracy colorbar."""
    from analysis.style import new_figure, percent_formatter

    figure, axes = new_figure(11, 4.2, ncols=2, sharex=True)
    norm = accuracy_norm(curves)
    for ax, metric in zip(axes, ("train/loss", "val/loss")):
        mappable = plot_loss_curves(curves, ax, metric, best_run, norm, legend=False)
        ax.set_title(metric)
    # One legend for both panels, below them, where it cannot cover a curve.
    best = curves.loc[curves["run_id"] == best_run, "trial"]
    handles = _legend_handles(int(best.iloc[0]) if len(best) else None)
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
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
