"""Figures of a single training run (study-level figures live in ``analysis/``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from research.experiment.training.train import EpochMetrics


def plot_loss_curves(history: Sequence[EpochMetrics], ax) -> None:
    """Train and validation loss per epoch on ``ax``, validation accuracy on a twin axis;
    epochs counted from 1, as the command line and the report count them."""
    from matplotlib.ticker import MaxNLocator

    epochs = [m.epoch + 1 for m in history]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(epochs, [m.train_loss for m in history], label="train/loss", color="tab:blue")
    ax.plot(epochs, [m.val_loss for m in history], label="val/loss", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (batch mean)")
    ax.grid(alpha=0.3)
    accuracy_ax = ax.twinx()
    accuracy_ax.plot(
        epochs,
        [100 * m.val_accuracy for m in history],
        label="val/accuracy",
        color="tab:green",
        linestyle="--",
    )
    accuracy_ax.set_ylabel("validation accuracy (%)")
    lines = ax.get_lines() + accuracy_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", frameon=False)


def save_loss_curves(history: Sequence[EpochMetrics], path: Path, title: str = "") -> Path:
    """Writes the loss-curve figure as a 150 dpi PNG and returns its path.

    Drawn on a bare ``Figure`` with fixed margins rather than through pyplot with a layout
    engine, which is faster, and this runs once per trial.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    plot_loss_curves(history, ax)
    if title:
        ax.set_title(title)
    figure.subplots_adjust(left=0.1, right=0.88, bottom=0.13, top=0.92)
    figure.savefig(path, dpi=150)
    return path


def save_rows_figure(
    histories: Sequence[tuple[str, Sequence[EpochMetrics]]], path: Path, title: str = ""
) -> Path:
    """Training loss per epoch of several runs (a reproduced table's rows) on one log axis, and
    the learning rate under it; writes a 150 dpi PNG and returns its path."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5.5))
    loss_ax, rate_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for i, (name, history) in enumerate(histories):
        epochs = [m.epoch + 1 for m in history]  # the tables count epochs from 1
        style = ("-", "--", ":", "-.")[i % 4]  # rows that coincide stay visible
        (line,) = loss_ax.plot(epochs, [m.train_loss for m in history], label=name, linestyle=style)
        rate_ax.plot(
            epochs, [m.learning_rate for m in history], color=line.get_color(), linestyle=style
        )
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("train/loss (epoch mean, with dropout)")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend(frameon=False, fontsize="small")
    rate_ax.set_ylabel("learning_rate")
    rate_ax.set_xlabel("epochs trained")
    rate_ax.grid(alpha=0.3)
    if title:
        loss_ax.set_title(title, fontsize="medium")
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.93, hspace=0.08)
    figure.savefig(path, dpi=150)
    return path
