"""Figures of a single training run (study-level figures live in ``analysis/``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from research.experiment.train import EpochMetrics


def plot_loss_curves(history: Sequence[EpochMetrics], ax) -> None:
    """Train and validation loss per epoch on ``ax``, validation accuracy on a twin axis."""
    epochs = [m.epoch for m in history]
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
