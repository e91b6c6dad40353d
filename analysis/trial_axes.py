"""The value axis of the per-trial figures (the optimization history, a metric against each
hyperparameter): what sets its range, and where the trials it does not hold are drawn.

- The completed trials set the range, except the ones *far out* on the worse side (Tukey's far
  fence: more than :data:`FAR_OUT` interquartile ranges beyond the quartile, among at least
  :data:`FENCE_MIN_TRIALS` completed trials). One 94% trial would otherwise stretch a 97.7-98.2%
  cluster into the top tenth of the panel; it is drawn instead as a triangle at the worse edge,
  its value written beside it.
- Trials with no value comparable with a finished one (pruned after an epoch or two, failed) go
  in a grey strip below the value range, which has no ticks: a marker there reads as no value,
  never as the lowest gridline's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.style import STATE_COLORS, epochs_text, percent_formatter, value_range

#: Tukey's far-out fence, in interquartile ranges beyond the quartile on the worse side.
FAR_OUT = 3.0
#: Below this many completed trials no quartile is trusted: every one sets the range.
FENCE_MIN_TRIALS = 5
#: The share of the axes' height of the strip for trials without a comparable value.
STRIP = 0.1
STRIP_COLOR = "#f0f0f0"


def worse_fence(values: Any, direction: str = "maximize") -> float | None:
    """The value beyond which a completed trial is far out on the worse side of ``values``
    (below ``Q1 - 3 IQR`` when maximizing, above ``Q3 + 3 IQR`` when minimizing); None with
    fewer than :data:`FENCE_MIN_TRIALS` finite values or no spread between the quartiles."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size < FENCE_MIN_TRIALS:
        return None
    low, high = np.percentile(finite, [25, 75])
    spread = float(high - low)
    if spread <= 0:
        return None
    return float(low - FAR_OUT * spread if direction == "maximize" else high + FAR_OUT * spread)


def far_out(values: Any, direction: str = "maximize") -> np.ndarray:
    """A mask over ``values``: True where a finite value is beyond :func:`worse_fence`."""
    values = np.asarray(values, dtype=float)
    fence = worse_fence(values, direction)
    if fence is None:
        return np.zeros(values.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        beyond = values < fence if direction == "maximize" else values > fence
    return beyond & np.isfinite(values)


def set_value_axis(ax: Any, values: Any, strip: bool, accuracy: bool) -> tuple[float, float] | None:
    """Sets the value axis of ``ax`` to hold ``values`` (the completed trials' values that are
    not far out) and, if ``strip``, a grey strip of :data:`STRIP` of the height below them, with
    no ticks in it. ``accuracy``: ticks as percentages. Returns the value range (low, high),
    or None if ``values`` holds no finite value (the axis is left as it is)."""
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if accuracy:
        ax.yaxis.set_major_formatter(percent_formatter())
    if strip:
        ax.add_patch(
            Rectangle((0, 0), 1, STRIP, transform=ax.transAxes, facecolor=STRIP_COLOR, zorder=0.6)
        )
    limits = value_range(values)
    if limits is None:
        return None
    low, high = limits
    if not strip:
        ax.set_ylim(low, high)
        return limits
    ax.set_ylim(low - STRIP / (1 - STRIP) * (high - low), high)
    ticks = MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
    # ticks only on the value range: the strip holds no value
    ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    return limits


def far_out_caption(direction: str = "maximize") -> str:
    """What a figure's caption says of its far-out trials (to follow "set the range")."""
    below = direction == "maximize"
    return (
        f" (but any far {'below' if below else 'above'} the rest, more than {FAR_OUT:g} "
        f"interquartile ranges {'under the lower' if below else 'over the upper'} quartile, "
        f"drawn as a triangle at the {'bottom' if below else 'top'} of the range with its "
        "value written)"
    )


def mark_in_strip(ax: Any, x: Any, **style: Any) -> Any:
    """Markers at data positions ``x`` in the strip below the value range of ``ax`` (see
    :func:`set_value_axis`), for trials that have no value comparable with the others."""
    return ax.scatter(
        x, np.full(len(x), STRIP / 2), transform=ax.get_xaxis_transform(), clip_on=False, **style
    )


def pruned_label(trials: Any) -> str:
    """The legend entry of pruned trials drawn in the strip: a trial stopped after an epoch or
    two has no value comparable with a finished one."""
    stopped = epochs_text(trials["epochs_run"]) if "epochs_run" in trials.columns else ""
    return f"pruned{' ' + stopped if stopped else ''}\n(grey strip; value not comparable)"


def mark_far_out(ax: Any, x: Any, values: Any, direction: str, strip: bool, accuracy: bool) -> Any:
    """Completed trials far out on the worse side (positions ``x``, values ``values``), as
    triangles just inside the worse edge of the value range, each with its value written."""
    x, values = np.asarray(x, dtype=float), np.asarray(values, dtype=float)
    below = direction == "maximize"
    edge = (STRIP if strip else 0.0) + 0.03 if below else 0.97
    marks = ax.scatter(
        x,
        np.full(len(x), edge),
        transform=ax.get_xaxis_transform(),
        marker="v" if below else "^",
        s=34,
        color=STATE_COLORS["COMPLETE"],
        clip_on=False,
        zorder=3,
        label=f"complete, far {'below' if below else 'above'} the rest\n(value written)",
    )
    for position, value in zip(x, values, strict=True):
        ax.annotate(
            f"{100 * value:.2f}%" if accuracy else f"{value:.4g}",
            (position, edge),
            xycoords=ax.get_xaxis_transform(),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
            color=STATE_COLORS["COMPLETE"],
        )
    return marks
