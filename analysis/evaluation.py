"""The best model on the test split: accuracy with its interval, confusions, per-class accuracy
and the mistakes it was surest of. Pure functions over arrays; nothing here trains.

Classes are named by ``class_names`` (the dataset's ``DatasetInfo.class_names``, in label order;
None means MNIST's digits "0" to "9"). The figures and tables say "digit" for MNIST only: for
any other dataset a test row is an "image" and its label a "class".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.style import (
    BEST,
    STATE_COLORS,
    new_figure,
    percent_formatter,
    require_rows,
    value_range,
)
from research.experiment.training.stats import wilson_interval as wilson_interval

N_CLASSES = 10
DIGITS = tuple(str(digit) for digit in range(N_CLASSES))
#: Class names longer than this are written at a slant under the confusion matrix.
SHORT_NAME = 3


def class_names_or_digits(class_names: Sequence[str] | None) -> tuple[str, ...]:
    """``class_names`` as a tuple of ``N_CLASSES`` names (the digits if None)."""
    names = DIGITS if class_names is None else tuple(str(name) for name in class_names)
    if len(names) != N_CLASSES:
        raise ValueError(f"need {N_CLASSES} class names, got {len(names)}: {list(names)}")
    return names


def words(class_names: Sequence[str] | None) -> tuple[str, str]:
    """What one test row is and what its label is called: ``("digit", "digit")`` for MNIST's
    digits, ``("image", "class")`` for any other classes."""
    digits = class_names_or_digits(class_names) == DIGITS
    return ("digit", "digit") if digits else ("image", "class")


@dataclass(frozen=True)
class TestEvaluation:
    """Counts of one evaluation of a model over ``n`` labelled rows."""

    n: int
    correct: int
    ci_low: float
    ci_high: float
    confusion: np.ndarray  # (10, 10) int: rows are true labels, columns predicted ones
    per_class: pd.DataFrame  # label, class, n, correct, accuracy, ci_low, ci_high

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def evaluate_outputs(
    outputs: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None
) -> TestEvaluation:
    """Counts for network outputs ``(N, 10)`` against integer ``labels`` ``(N,)``; the predicted
    label is the arg-max output. ``per_class`` names each label's class (``class_names``)."""
    names = class_names_or_digits(class_names)
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
    for label in range(N_CLASSES):
        n, correct = int(confusion[label].sum()), int(confusion[label, label])
        low, high = wilson_interval(correct, n) if n else (math.nan, math.nan)
        rows.append((label, names[label], n, correct, correct / n if n else math.nan, low, high))
    per_class = pd.DataFrame(
        rows, columns=["label", "class", "n", "correct", "accuracy", "ci_low", "ci_high"]
    )
    correct = int(np.trace(confusion))
    low, high = wilson_interval(correct, len(labels))
    return TestEvaluation(len(labels), correct, low, high, confusion, per_class)


def most_confident_mistakes(outputs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` misclassified rows, the highest output for the wrong class
    first (ties broken by index, so the choice is reproducible)."""
    predicted = outputs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = outputs[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))
    return wrong[order[:count]]


def plot_confusion_matrix(
    confusion: np.ndarray, ax: Any, class_names: Sequence[str] | None = None
) -> Any:
    """The 10x10 counts (rows: true class, columns: predicted), each cell written out, the axes
    labelled with ``class_names`` (slanted along x when they are words); the color is the share
    of the true class's rows on a power scale, so that mistakes of a few rows are visible beside
    a diagonal of about a thousand. Returns the image (for a color bar)."""
    from matplotlib.colors import PowerNorm

    names = class_names_or_digits(class_names)
    _, kind = words(names)
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
    if max(map(len, names)) > SHORT_NAME:
        ax.set_xticks(range(N_CLASSES), names, rotation=40, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(N_CLASSES), names)
    ax.set_yticks(range(N_CLASSES), names)
    ax.set_xlabel(f"predicted {kind}")
    ax.set_ylabel(f"true {kind}")
    ax.grid(False)
    ax.tick_params(length=0)
    return image


def plot_per_class_accuracy(
    per_class: pd.DataFrame,
    ax: Any,
    overall: float | None = None,
    overall_interval: tuple[float, float] | None = None,
) -> None:
    """Accuracy per true class as a point with its 95% Wilson interval, and the overall accuracy
    as a dashed line (its interval shaded, if given). Points, not bars: the axis spans the
    intervals, not zero to one, and a bar cut off above zero would make a class 1% worse look
    half as good.

    ``per_class``: ``class`` (its name, the tick label), ``accuracy``, ``ci_low``, ``ci_high``
    columns, one row per class in label order (as :func:`evaluate_outputs` gives).
    """
    require_rows(per_class, "the per-class accuracy", ("class", "accuracy", "ci_low", "ci_high"))
    names = [str(name) for name in per_class["class"]]
    accuracy = per_class["accuracy"].to_numpy(dtype=float)
    low = per_class["ci_low"].to_numpy(dtype=float)
    high = per_class["ci_high"].to_numpy(dtype=float)
    positions = np.arange(len(names))
    if overall_interval is not None:
        ax.axhspan(*overall_interval, color=BEST, alpha=0.12, linewidth=0, zorder=1)
    if overall is not None:
        ax.axhline(
            overall,
            color=BEST,
            linewidth=1.5,
            linestyle="--",
            label=f"overall {overall:.2%}"
            + (" (95% CI shaded)" if overall_interval is not None else ""),
            zorder=2,
        )
    ax.errorbar(
        positions,
        accuracy,
        yerr=np.vstack([accuracy - low, high - accuracy]),
        fmt="o",
        markersize=5,
        color=STATE_COLORS["COMPLETE"],
        ecolor="#333333",
        elinewidth=1.2,
        capsize=3,
        label="per class (95% Wilson interval)",
        zorder=3,
    )
    shown = [*low, *high, *([overall] if overall is not None else [])]
    limits = value_range(shown, pad=0.1)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_xlim(-0.6, len(names) - 0.4)
    if max(map(len, names)) > SHORT_NAME:
        ax.set_xticks(positions, names, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(positions, names)
    ax.set_xlabel("true digit" if tuple(names) == DIGITS else "true class")
    ax.set_ylabel("test accuracy (axis not from 0)")
    ax.yaxis.set_major_formatter(percent_formatter())
    ax.grid(axis="x", visible=False)
    # Beside the axes: inside, it would hide points or whiskers whatever the corner.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_misclassified(
    images: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    axes: np.ndarray,
    score_name: str = "p",
    class_names: Sequence[str] | None = None,
) -> None:
    """One image per axis in ``axes`` (2-D array), titled with its true and predicted classes
    (integer labels, named through ``class_names``) and the output for the predicted class;
    spare axes are hidden. ``images``: ``(k, 784)``."""
    names = class_names_or_digits(class_names)
    item, _ = words(names)
    flat = list(np.ravel(axes))
    if len(images) == 0:
        raise ValueError(f"cannot draw misclassified {item}s: the model made no mistakes")
    for ax, image, t, p, c in zip(flat, images, true, predicted, confidence):
        ax.imshow(np.asarray(image, dtype=float).reshape(28, 28), cmap="gray_r")
        # Four decimals: the surest mistakes all round to 1.00.
        title = mistake_title(names[int(t)], names[int(p)])
        ax.set_title(f"{title}\n{score_name} = {c:.4f}", fontsize=8)
        ax.set_axis_off()
    for ax in flat[len(images) :]:
        ax.set_visible(False)


def mistake_title(true: str, predicted: str) -> str:
    """``true 4 → 9`` for short names; ``true: Coat`` over ``predicted: Shirt`` for words."""
    if max(len(true), len(predicted)) <= SHORT_NAME:
        return f"true {true} → {predicted}"
    return f"true: {true}\npredicted: {predicted}"


def evaluation_figures(
    evaluation: TestEvaluation,
    images: np.ndarray,
    outputs: np.ndarray,
    labels: np.ndarray,
    score_name: str,
    count: int = 24,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """The confusion matrix, the per-class accuracy and the grid of the ``count`` most confident
    mistakes, as figures keyed by file name; classes named by ``class_names``, titles prefixed
    with ``title`` (the dataset's name) if given. Figures with class names as words are wider,
    so the names stay readable."""
    names = class_names_or_digits(class_names)
    item, kind = words(names)
    long_names = max(map(len, names)) > SHORT_NAME
    prefix = f"{title}: " if title else ""
    figure, ax = new_figure(6.6 if long_names else 5.6, 6.0 if long_names else 5)
    image = plot_confusion_matrix(evaluation.confusion, ax, names)
    ax.set_title(f"{prefix}confusion matrix ({evaluation.n:,} test {item}s)")
    figure.colorbar(image, ax=ax, shrink=0.8, format=percent_formatter()).set_label(
        f"share of the true {kind}'s rows"
    )
    figures = {"confusion_matrix.png": figure}

    figure, ax = new_figure(8 if long_names else 7, 4.4 if long_names else 3.8)
    plot_per_class_accuracy(
        evaluation.per_class, ax, evaluation.accuracy, (evaluation.ci_low, evaluation.ci_high)
    )
    ax.set_title(f"{prefix}test accuracy per {kind}")
    figures["per_class_accuracy.png"] = figure

    mistakes = most_confident_mistakes(outputs, labels, count)
    if len(mistakes):
        columns = 8
        rows = math.ceil(len(mistakes) / columns)
        # Two title lines of class names need a wider panel and more height than a digit's one.
        width, height = (1.6, 1.85) if long_names else (1.3, 1.6)
        figure, axes = new_figure(
            width * columns, height * rows + 0.4, nrows=rows, ncols=columns, squeeze=False
        )
        predicted = outputs.argmax(axis=1)
        plot_misclassified(
            images[mistakes],
            labels[mistakes],
            predicted[mistakes],
            outputs[mistakes, predicted[mistakes]],
            axes,
            score_name,
            names,
        )
        figure.suptitle(
            f"{prefix}the {len(mistakes)} test {item}s misclassified with the highest output "
            f"for the wrong {kind}",
            fontsize=10,
        )
        figures["misclassified.png"] = figure
    return figures
