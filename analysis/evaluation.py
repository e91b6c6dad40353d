"""The best model on the test split: accuracy with its interval, confusions, per-class accuracy
and the mistakes it was surest of. Pure functions over arrays; nothing here trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.style import BEST, STATE_COLORS, new_figure, percent_formatter, require_rows

N_CLASSES = 10


@dataclass(frozen=True)
class TestEvaluation:
    """Counts of one evaluation of a model over ``n`` labelled rows."""

    n: int
    correct: int
    ci_low: float
    ci_high: float
    confusion: np.ndarray  # (10, 10) int: rows are true digits, columns predicted ones
    per_class: pd.DataFrame  # digit, n, correct, accuracy, ci_low, ci_high

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (good near 0 and 1, unlike the
    normal approximation), through ``scipy.stats.binomtest``."""
    from scipy.stats import binomtest

    interval = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def evaluate_outputs(outputs: np.ndarray, labels: np.ndarray) -> TestEvaluation:
    """Counts for network outputs ``(N, 10)`` against integer ``labels`` ``(N,)``; the predicted
    digit is the arg-max output."""
    outputs = np.asarray(outputs)
    labels = np.asarray(labels).astype(np.int64)
    if outputs.ndim != 2 or outputs.shape != (len(labels), N_CLASSES) or len(labels) == 0:
        raise ValueError(
            f"outputs must be (N, {N_CLASSES}) for N = len(labels) >= 1; got {outputs.shape} "
            f"and {labels.shape}"
        )
    predicted = outputs.argmax(axis=1)
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = []
    for digit in range(N_CLASSES):
        n, correct = int(confusion[digit].sum()), int(confusion[digit, digit])
        low, high = wilson_interval(correct, n) if n else (math.nan, math.nan)
        rows.append((digit, n, correct, correct / n if n else math.nan, low, high))
    per_class = pd.DataFrame(
        rows, columns=["digit", "n", "correct", "accuracy", "ci_low", "ci_high"]
    )
    correct = int(np.trace(confusion))
    low, high = wilson_interval(correct, len(labels))
    return TestEvaluation(len(labels), correct, low, high, confusion, per_class)


def most_confident_mistakes(outputs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` misclassified rows, the highest output for the wrong digit
    first (ties broken by index, so the choice is reproducible)."""
    predicted = outputs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = outputs[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))
    return wrong[order[:count]]


def plot_confusion_matrix(confusion: np.ndarray, ax: Any) -> None:
    """The 10x10 counts (rows: true digit, columns: predicted), each cell written out; the color
    is the share of the true digit's rows on a power scale, so that mistakes of a few rows are
    visible beside a diagonal of about a thousand."""
    from matplotlib.colors import PowerNorm

    confusion = np.asarray(confusion)
    if confusion.shape != (N_CLASSES, N_CLASSES) or confusion.sum() == 0:
        raise ValueError(
            f"cannot draw the confusion matrix: it is {confusion.shape} with "
            f"{int(confusion.sum())} rows counted"
        )
    totals = confusion.sum(axis=1, keepdims=True)
    share = confusion / np.maximum(totals, 1)
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.3, vmin=0, vmax=1))
    for true in range(N_CLASSES):
        for predicted in range(N_CLASSES):
            count = int(confusion[true, predicted])
            if count == 0:
                continue
            dark = share[true, predicted] > 0.35
            ax.text(
                predicted,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "#222222",
            )
    ax.set_xticks(range(N_CLASSES))
    ax.set_yticks(range(N_CLASSES))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.grid(False)
    ax.tick_params(length=0)
    return image


def plot_per_class_accuracy(per_class: pd.DataFrame, ax: Any, overall: float | None = None) -> None:
    """Accuracy per true digit with its 95% Wilson interval, and the overall accuracy as a line.

    ``per_class``: ``digit``, ``accuracy``, ``ci_low``, ``ci_high`` columns.
    """
    require_rows(per_class, "the per-class accuracy", ("digit", "accuracy", "ci_low", "ci_high"))
    accuracy = per_class["accuracy"].to_numpy(dtype=float)
    errors = np.vstack([accuracy - per_class["ci_low"], per_class["ci_high"] - accuracy])
    ax.bar(
        per_class["digit"],
        accuracy,
        color=STATE_COLORS["COMPLETE"],
        width=0.7,
        yerr=errors,
        capsize=3,
        ecolor="#333333",
        label="per class (95% CI)",
    )
    if overall is not None:
        ax.axhline(
            overall, color=BEST, linewidth=1.5, linestyle="--", label=f"overall {overall:.2%}"
        )
    low = float(np.nanmin(per_class["ci_low"]))
    ax.set_ylim(max(0.0, low - (1 - low) * 0.25 - 0.005), 1.0)
    ax.set_xticks(per_class["digit"])
    ax.set_xlabel("true digit")
    ax.set_ylabel("test accuracy")
    ax.yaxis.set_major_formatter(percent_formatter())
    ax.grid(axis="x", visible=False)
    # Beside the axes: inside, it would hide bars or whiskers whatever the corner.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_misclassified(
    images: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    axes: np.ndarray,
    score_name: str = "p",
) -> None:
    """One digit per axis in ``axes`` (2-D array), titled with its true and predicted labels and
    the output for the predicted digit; spare axes are hidden. ``images``: ``(k, 784)``."""
    flat = list(np.ravel(axes))
    if len(images) == 0:
        raise ValueError("cannot draw misclassified digits: the model made no mistakes")
    for ax, image, t, p, c in zip(flat, images, true, predicted, confidence):
        ax.imshow(np.asarray(image, dtype=float).reshape(28, 28), cmap="gray_r")
        # Four decimals: the surest mistakes all round to 1.00.
        ax.set_title(f"true {t} → {p}\n{score_name} = {c:.4f}", fontsize=8)
        ax.set_axis_off()
    for ax in flat[len(images) :]:
        ax.set_visible(False)


def evaluation_figures(
    evaluation: TestEvaluation,
    images: np.ndarray,
    outputs: np.ndarray,
    labels: np.ndarray,
    score_name: str,
    count: int = 24,
) -> dict[str, Any]:
    """The confusion matrix, the per-class accuracy and the grid of the ``count`` most confident
    mistakes, as figures keyed by file name."""
    figure, ax = new_figure(5.6, 5)
    image = plot_confusion_matrix(evaluation.confusion, ax)
    ax.set_title(f"confusion matrix ({evaluation.n:,} test digits)")
    figure.colorbar(image, ax=ax, shrink=0.8, format=percent_formatter()).set_label(
        "share of the true digit's rows"
    )
    figures = {"confusion_matrix.png": figure}

    figure, ax = new_figure(7, 3.8)
    plot_per_class_accuracy(evaluation.per_class, ax, evaluation.accuracy)
    ax.set_title("test accuracy per digit")
    figures["per_class_accuracy.png"] = figure

    mistakes = most_confident_mistakes(outputs, labels, count)
    if len(mistakes):
        columns = 8
        rows = math.ceil(len(mistakes) / columns)
        figure, axes = new_figure(
            1.3 * columns, 1.6 * rows + 0.4, nrows=rows, ncols=columns, squeeze=False
        )
        predicted = outputs.argmax(axis=1)
        plot_misclassified(
            images[mistakes],
            labels[mistakes],
            predicted[mistakes],
            outputs[mistakes, predicted[mistakes]],
            axes,
            score_name,
        )
        figure.suptitle(
            f"the {len(mistakes)} test digits misclassified with the highest output "
            "for the wrong digit",
            fontsize=10,
        )
        figures["misclassified.png"] = figure
    return figures
