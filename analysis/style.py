"""One look for every figure of a report: a light style, fixed colors, 150 dpi PNGs.

Colors mean the same thing in every figure: a trial's state has one color, the best trial is
always drawn in ``BEST`` with a star, and validation accuracy always maps through ``ACCURACY_CMAP``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DPI = 150

STATE_COLORS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#8c8c8c",
    "FAIL": "#d62728",
}
BEST = "#ff7f0e"
ACCURACY_CMAP = "viridis"

RC = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.edgecolor": "#444444",
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "font.family": "DejaVu Sans",
}


class EmptyDataError(ValueError):
    """A figure was asked for data that holds nothing to draw; the message says what is missing."""


def require_rows(frame: Any, what: str, columns: tuple[str, ...] = ()) -> None:
    """Raises EmptyDataError if ``frame`` has no rows or lacks ``columns``."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise EmptyDataError(f"cannot draw {what}: the data has no column(s) {missing}")
    if len(frame) == 0:
        raise EmptyDataError(f"cannot draw {what}: there are no rows to draw")


@contextlib.contextmanager
def light_style() -> Iterator[None]:
    """The report's matplotlib settings, only inside the ``with`` block."""
    import matplotlib

    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float, **subplots: Any):
    """A bare ``Figure`` (no pyplot state, no GUI) with ``constrained`` layout and its axes."""
    from matplotlib.figure import Figure

    with light_style():
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.subplots(**subplots)
    return figure, axes


def save_png(figure: Any, path: Path) -> Path:
    """Writes ``figure`` as a 150 dpi PNG, through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        light_style(),
        tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle,
    ):
        tmp = Path(handle.name)
        figure.savefig(handle, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def percent_formatter(decimals: int | None = None):
    """Tick labels such as ``97.5%`` for axes holding fractions."""
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=decimals)


def plain_log_axis(axis: Any) -> None:
    """A log-scaled axis (``ax.xaxis`` or ``ax.yaxis``) labelled at 1, 2 and 5 times powers of
    ten in plain numbers (``0.05``, ``200``) rather than ``5×10⁻²``, without crowded minor
    labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


# --- what sets an axis's range --------------------------------------------------------------------

#: Values spanning more than this ratio (all positive) go on a log axis.
LOG_RATIO = 10.0


def value_range(values: Any, log: bool = False, pad: float = 0.08) -> tuple[float, float] | None:
    """Axis limits that hold every finite value of ``values`` with a margin of ``pad`` of their
    span (a ratio on a log axis); None if there is none. One value gets a span of its own: 1%
    of it (or 0.01 at zero). Non-negative values never get a negative lower limit."""
    import numpy as np

    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    if log:
        ratio = max(high / low, 1.02) ** pad
        return low / ratio, high * ratio
    span = high - low
    if span <= 1e-12 * max(abs(high), 1.0):
        span = 0.01 * abs(high) or 0.01
        low, high = low - span / 2, high + span / 2
    margin = pad * span
    bottom = low - margin
    if bottom < 0 <= low:
        bottom = 0.0
    return bottom, high + margin


def epochs_text(epochs: Any) -> str:
    """``after 2 epochs`` or ``after 1–3 epochs`` for the epochs some trials ran (1-based
    counts); "" when none are known."""
    import numpy as np

    known = np.asarray(epochs, dtype=float)
    known = known[np.isfinite(known) & (known > 0)]
    if known.size == 0:
        return ""
    low, high = int(known.min()), int(known.max())
    plural = "" if high == 1 else "s"
    return f"after {low} epoch{plural}" if low == high else f"after {low}–{high} epochs"
