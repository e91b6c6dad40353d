"""The report's building blocks on hand-made data: every plot function, the evaluation counts, the
reading of MLflow's run frames and the Markdown tables. No MLflow, no Optuna, no training."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from analysis import curves, evaluation, history, hyperparams
from analysis.render import markdown_table
from analysis.store import SearchDimension, curves_frame, search_dimensions, trials_frame
from analysis.style import BEST, EmptyDataError, new_figure, save_png
from analysis.trial_axes import STRIP


def hand_made_curves() -> pd.DataFrame:
    """Trial 0 complete (3 epochs), trial 1 pruned after 2, trial 2 complete and best; epochs
    count from 1, as the store gives them."""
    rows = []
    for trial, state, losses, accuracies in (
        (0, "COMPLETE", [1.0, 0.5, 0.3], [0.80, 0.85, 0.88]),
        (1, "PRUNED", [2.0, 1.9], [0.30, 0.32]),
        (2, "COMPLETE", [0.9, 0.2, 0.04], [0.85, 0.93, 0.97]),
    ):
        for epoch, (loss, accuracy) in enumerate(zip(losses, accuracies), start=1):
            rows.append((f"run{trial}", trial, state, epoch, loss, loss * 1.1, accuracy))
    return pd.DataFrame(rows, columns=["run_id", "trial", "state", "epoch", "train/loss",
                                       "val/loss", "val/accuracy"])  # fmt: skip


def hand_made_trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["run0", "run1", "run2", "run3"],
            "trial": [0, 1, 2, 3],
            "state": ["COMPLETE", "PRUNED", "COMPLETE", "FAIL"],
            "hidden_size": [64, 128, 512, 1024],
            "learning_rate": [0.01, 0.1, 0.05, 0.5],
            "batch_size": [64, 256, 128, 64],
            "val/accuracy": [0.88, 0.32, 0.97, np.nan],
        }
    )


SEARCH = [
    SearchDimension("hidden_size", "int", log=True),
    SearchDimension("learning_rate", "float", log=True),
    SearchDimension("batch_size", "categorical", choices=(64, 128, 256)),
]


# --- loss curves ----------------------------------------------------------------------------------


def test_loss_curves_draw_each_trial_once_and_the_best_on_top():
    _figure, ax = new_figure(5, 4)
    mappable = curves.plot_loss_curves(hand_made_curves(), ax, "val/loss", best_run="run2")
    lines = ax.get_lines()
    # trial 0: a line; trial 1 (pruned): a faint dashed line and a cross where it stopped;
    # trial 2 (best): one thick line in the best-trial color, drawn last.
    assert len(lines) == 4
    complete, pruned, cross, best = lines
    assert complete.get_linestyle() == "-" and list(complete.get_xdata()) == [1, 2, 3]
    assert pruned.get_linestyle() == "--" and pruned.get_alpha() < 0.5
    assert list(cross.get_xdata()) == [2] and cross.get_marker() == "x"
    assert best.get_color() == BEST and best.get_linewidth() > complete.get_linewidth()
    assert best.get_zorder() > complete.get_zorder()
    assert ax.get_yscale() == "log"  # the completed trials: 1.1 down to 0.044, a ratio of 25
    # Colors come from the completed trials' final validation accuracy, from its 5th percentile
    # (so that one far-off trial does not squeeze the others into one color) to the best.
    assert mappable.norm.vmin == pytest.approx(np.percentile([0.88, 0.97], 5))
    assert mappable.norm.vmax == pytest.approx(0.97)
    assert [text.get_text() for text in ax.get_legend().get_texts()][-1] == "best (trial 2)"


def test_loss_curves_stay_linear_when_the_range_is_narrow():
    frame = hand_made_curves()
    frame = frame[frame["trial"] == 0]
    _figure, ax = new_figure(5, 4)
    curves.plot_loss_curves(frame, ax, "train/loss")
    assert ax.get_yscale() == "linear"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (hand_made_curves().iloc[0:0], "cannot draw the val/loss curves: there are no rows"),
        (hand_made_curves().drop(columns="state"), "the data has no column(s) ['state']"),
    ],
)
def test_loss_curves_of_nothing_is_a_clear_error(frame, message):
    _figure, ax = new_figure(5, 4)
    with pytest.raises(EmptyDataError, match=re.escape(message)):
        curves.plot_loss_curves(frame, ax, "val/loss")


def test_the_loss_curves_figure_has_two_panels_and_one_colorbar(tmp_path):
    figure = curves.loss_curves_figure(hand_made_curves(), best_run="run2")
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["train/loss", "val/loss"]
    assert len(figure.axes) == 3
    assert save_png(figure, tmp_path / "curves.png").stat().st_size > 10_000


# --- the objective against each hyperparameter ---------------------------------------------------


def test_objective_against_a_log_parameter():
    _figure, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(hand_made_trials(), ax, SEARCH[1], best_run="run2")
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "learning_rate (log scale)"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["pruned\n(grey strip; value not comparable)", "complete",
                      "best (trial 2)", "1 failed (not shown)"]  # fmt: skip
    pruned, complete, best, _ = ax.collections
    # The pruned trial at its learning rate, in the strip: its 0.32 is not drawn.
    assert pruned.get_offsets().tolist() == [[0.1, STRIP / 2]]
    assert sorted(complete.get_offsets()[:, 0]) == [0.01, 0.05]
    assert best.get_offsets().tolist() == [[0.05, 0.97]]


def test_objective_against_a_categorical_parameter_keeps_the_declared_order():
    figure, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(hand_made_trials(), ax, SEARCH[2])
    figure.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]
    complete = ax.collections[1].get_offsets()
    # Trial 0 (batch 64) near position 0, trial 2 (batch 128) near 1: jittered by < 0.15.
    assert abs(complete[0, 0] - 0) < 0.15 and abs(complete[1, 0] - 1) < 0.15


def test_the_parameters_figure_has_one_panel_per_searched_parameter():
    figure = hyperparams.metric_vs_params_figure(hand_made_trials(), SEARCH, "val/accuracy", "run2")
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in visible] == [
        "hidden_size (log scale)", "learning_rate (log scale)", "batch_size"
    ]  # fmt: skip
    with pytest.raises(EmptyDataError, match="nothing was searched"):
        hyperparams.metric_vs_params_figure(hand_made_trials(), [], "val/accuracy", None)


def test_objective_against_a_parameter_of_an_empty_frame():
    _figure, ax = new_figure(4, 3)
    with pytest.raises(EmptyDataError, match="val/accuracy against hidden_size: there are no rows"):
        hyperparams.plot_metric_vs_param(hand_made_trials().iloc[0:0], ax, SEARCH[0])


# --- the optimization history and the importances ------------------------------------------------


def test_best_so_far_carries_over_trials_that_did_not_complete():
    trials = hand_made_trials()
    assert history.best_so_far(trials, "val/accuracy", "maximize").tolist() == [
        0.88, 0.88, 0.97, 0.97
    ]  # fmt: skip
    trials["val/loss"] = [0.5, 0.1, 0.7, np.nan]  # trial 1 was pruned: its 0.1 is no result
    assert history.best_so_far(trials, "val/loss", "minimize").tolist() == [0.5, 0.5, 0.5, 0.5]


def test_the_optimization_history_marks_every_trial():
    _figure, ax = new_figure(6, 4)
    history.plot_optimization_history(hand_made_trials(), ax)
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["complete", "pruned\n(grey strip; value not comparable)",
                      "failed (1; no value)", "best so far"]  # fmt: skip
    failed = ax.collections[2].get_offsets()
    assert failed[:, 0].tolist() == [3]
    low, high = ax.get_xlim()
    assert low < 0 and high > 3  # the failed trial 3 is inside the axes
    (step,) = ax.get_lines()
    assert step.get_ydata()[-1] == 0.97


def test_importances_show_their_leave_one_out_range():
    """Whiskers span exactly [low, high], the shares with one trial left out at a time, even
    where that range does not hold the share of all the trials."""
    from matplotlib.container import ErrorbarContainer

    frame = pd.DataFrame(
        {
            "param": ["batch_size", "learning_rate"],
            "importance": [0.2, 0.8],
            "low": [0.25, 0.5],
            "high": [0.4, 0.9],
        }
    )
    _, ax = new_figure(4, 3)
    history.plot_importances(frame, ax)
    (whiskers,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = sorted(
        (tuple(sorted(seg[:, 0])) for seg in whiskers.lines[2][0].get_segments()),
        key=lambda seg: seg[0],
    )
    assert segments == [pytest.approx((0.25, 0.4)), pytest.approx((0.5, 0.9))]
    assert ax.get_xlim()[1] >= 0.9


def test_importances_are_sorted_bars():
    frame = pd.DataFrame({"param": ["batch_size", "learning_rate"], "importance": [0.2, 0.8]})
    _figure, ax = new_figure(5, 3)
    history.plot_importances(frame, ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["batch_size", "learning_rate"]
    assert [p.get_width() for p in ax.patches] == [0.2, 0.8]
    assert ax.get_xlabel() == "importance (share of the objective's variance, fANOVA, seed 0)"
    figure = history.importances_figure(frame)
    assert figure.axes[0].get_title() == "parameter importances (fANOVA, seed 0)"
    with pytest.raises(EmptyDataError, match="parameter importances: there are no rows"):
        history.plot_importances(frame.iloc[0:0], ax)


# --- evaluation on the test split ----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 300),
)
def test_evaluation_counts_are_consistent(data, n):
    outputs = data.draw(hnp.arrays(np.float64, (n, 10), elements=st.floats(0, 1, width=32)))
    labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 9)))
    result = evaluation.evaluate_outputs(outputs, labels)
    predicted = outputs.argmax(axis=1)
    assert result.confusion.sum() == n
    assert result.correct == int((predicted == labels).sum()) == np.trace(result.confusion)
    assert result.per_class["n"].tolist() == np.bincount(labels, minlength=10).tolist()
    seen = result.per_class[result.per_class["n"] > 0]
    weighted = (seen["accuracy"] * seen["n"]).sum() / n
    assert_close(weighted, result.accuracy, "closed_form", "the weighted per-class accuracy")
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert 0 <= result.ci_low and result.ci_high <= 1


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (9_826, 10_000), (7, 7), (1, 3)])
def test_the_wilson_interval_matches_its_formula(correct, n):
    z = 1.959963984540054
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    interval = np.array(evaluation.wilson_interval(correct, n))
    assert_close(interval, np.array([centre - half, centre + half]), "closed_form", "the interval")


def test_evaluation_rejects_outputs_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"outputs must be \(N, 10\)"):
        evaluation.evaluate_outputs(np.zeros((3, 9)), np.zeros(3))
    with pytest.raises(ValueError, match=r"outputs must be \(N, 10\)"):
        evaluation.evaluate_outputs(np.zeros((0, 10)), np.zeros(0))


def test_the_most_confident_mistakes_come_first():
    outputs = np.full((5, 10), 0.01)
    labels = np.array([0, 1, 2, 3, 4])
    outputs[0, 0] = 0.9  # right
    outputs[1, 7] = 0.6  # wrong, 0.6 sure
    outputs[2, 5] = 0.95  # wrong, 0.95 sure
    outputs[3, 3] = 0.5  # right
    outputs[4, 1] = 0.6  # wrong, 0.6 sure: ties keep the index order
    assert evaluation.most_confident_mistakes(outputs, labels, 10).tolist() == [2, 1, 4]
    assert evaluation.most_confident_mistakes(outputs, labels, 1).tolist() == [2]


def test_the_confusion_matrix_writes_every_non_zero_count():
    confusion = np.diag(np.full(10, 100))
    confusion[3, 5] = 7
    _figure, ax = new_figure(5, 5)
    evaluation.plot_confusion_matrix(confusion, ax)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["100"] * 10 + ["7"])
    with pytest.raises(ValueError, match="cannot draw the confusion matrix"):
        evaluation.plot_confusion_matrix(np.zeros((10, 10)), ax)


def test_per_class_accuracy_points_with_their_intervals():
    outputs = np.eye(10)[[0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]]
    labels = np.array([0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    result = evaluation.evaluate_outputs(outputs, labels)
    _figure, ax = new_figure(6, 3)
    evaluation.plot_per_class_accuracy(result.per_class, ax, result.accuracy)
    assert not ax.patches  # points, not bars
    (points,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert list(points.get_ydata()) == pytest.approx([0.5, 1, 0.5, 1, 1, 1, 1, 1, 1, 1])
    texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "overall 83.33%" in texts


def test_the_misclassified_grid_hides_spare_panels():
    _figure, axes = new_figure(6, 3, nrows=2, ncols=4, squeeze=False)
    images = np.random.default_rng(0).random((5, 784))
    evaluation.plot_misclassified(images, [1] * 5, [7] * 5, [0.9] * 5, axes)
    assert sum(ax.get_visible() for ax in axes.flat) == 5
    assert axes[0, 0].get_title() == "true 1 → 7\np = 0.9000"
    with pytest.raises(ValueError, match="the model made no mistakes"):
        evaluation.plot_misclassified(images[:0], [], [], [], axes)


# --- reading MLflow's frames, and the tables -----------------------------------------------------


def test_the_search_space_is_read_back_as_data():
    """The study logs its search space as data (SearchParam.as_dict, or the study file's own
    [search] tables for studies logged before); the report reads it in the study's order."""
    from research.experiment.config.search_space import SearchParam

    logged = [
        SearchParam("hidden_size", "int", low=64, high=1024, log=True).as_dict(),
        SearchParam("learning_rate", "float", low=0.01, high=0.5, log=True).as_dict(),
        SearchParam("l2", "categorical", choices=(0.0, 1e-05, 0.0001)).as_dict(),
        # a field the table may not know (a study logged by another version) is kept
        {"name": "dropout", "type": "float", "low": 0.0, "high": 0.5},
    ]
    assert search_dimensions(logged) == [
        SearchDimension("hidden_size", "int", log=True),
        SearchDimension("learning_rate", "float", log=True),
        SearchDimension("l2", "categorical", choices=(0.0, 1e-05, 0.0001)),
        SearchDimension("dropout", "float"),
    ]


def test_trial_runs_become_a_typed_frame():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "tags.research.trial_number": ["0", "1", "2"],
            "tags.research.state": ["COMPLETE", "FAIL", None],
            "tags.research.error": [None, "training diverged", None],
            "params.hidden_size": ["64", "128", "30"],
            "params.l2": ["0.0", "1e-05", "0.0"],
            "params.epochs": ["3", "3", "3"],
            "params.raw_inputs": ["False", "True", None],
            "params.sizes": ["[784, 64, 10]", "[784, 128, 10]", "[784, 30, 10]"],
            "metrics.val/accuracy": [0.9, np.nan, np.nan],
            "metrics.wall_seconds": [1.5, np.nan, np.nan],
        }
    )
    search = [
        SearchDimension("hidden_size", "int"),
        SearchDimension("l2", "categorical", choices=(0.0, 1e-05)),
    ]
    frame = trials_frame(runs, search)
    assert frame["trial"].tolist() == [0, 1, 2]
    assert frame["state"].tolist() == ["COMPLETE", "FAIL", "RUNNING"]
    assert frame["hidden_size"].tolist() == [64, 128, 30]
    assert frame["l2"].tolist() == [0.0, 1e-05, 0.0] and isinstance(frame["l2"][1], float)
    assert frame["n_params"].tolist() == [50_890, 101_770, 23_860]
    assert frame["error"].tolist() == ["", "training diverged", ""]
    assert frame["raw_inputs"].tolist() == [False, True, False]
    assert trials_frame(runs.iloc[0:0], search).empty


def test_metric_histories_become_long_curves():
    histories = pd.DataFrame(
        [("a", "val/loss", 0, 1.0), ("a", "val/loss", 1, 0.5), ("a", "train/loss", 0, 2.0)],
        columns=["run_id", "key", "step", "value"],
    )
    trials = pd.DataFrame({"run_id": ["a"], "trial": [4], "state": ["PRUNED"]})
    frame = curves_frame(histories, trials)
    assert frame["epoch"].tolist() == [1, 2]  # MLflow's steps 0 and 1: epochs 1 and 2
    assert frame["val/loss"].tolist() == [1.0, 0.5]
    assert frame["train/loss"].iloc[0] == 2.0 and math.isnan(frame["train/loss"].iloc[1])
    assert frame["trial"].tolist() == [4, 4] and frame["state"].tolist() == ["PRUNED"] * 2
    assert curves_frame(histories.iloc[0:0], trials).empty


def test_markdown_tables_escape_pipes():
    frame = pd.DataFrame({"a": [1, 2.5], "b": ["x|y", None]})
    assert markdown_table(frame) == "| a | b |\n| --- | --- |\n| 1 | x\\|y |\n| 2.5 |  |"


# --- what the review found: minimize, odd categorical values, repeated trial numbers, --out ------


def results_with(trials: pd.DataFrame, objective: str, direction: str):
    from analysis.store import StudyResults
    from research.experiment.tracking.results import StudyRecord

    return StudyResults(
        record=StudyRecord("s", "1", "parent", 0),
        objective=objective,
        direction=direction,
        search=SEARCH,
        trials=trials,
        curves=pd.DataFrame(),
        parent_params={},
        parent_metrics={},
        parent_tags={},
    )


def test_the_best_trial_follows_the_direction_and_ignores_pruned_trials():
    trials = hand_made_trials()
    trials["val/loss"] = [0.5, 0.1, 0.3, np.nan]  # trial 1 is pruned: not a result
    assert results_with(trials, "val/accuracy", "maximize").best["trial"] == 2
    assert results_with(trials, "val/loss", "minimize").best["trial"] == 2
    trials["val/loss"] = [0.2, 0.1, 0.3, np.nan]
    assert results_with(trials, "val/loss", "minimize").best["trial"] == 0
    trials["state"] = "PRUNED"
    assert results_with(trials, "val/loss", "minimize").best is None


def test_boolean_choices_and_choices_the_parent_run_does_not_list():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "tags.research.trial_number": ["0", "1", "2"],
            "tags.research.state": ["COMPLETE"] * 3,
            "params.nesterov": ["True", "False", "True"],
            "params.batch_size": ["64", "128", "512"],  # 512: added when the study resumed
            "metrics.val/accuracy": [0.9, 0.8, 0.95],
        }
    )
    search = [
        SearchDimension("nesterov", "categorical", choices=(True, False)),
        SearchDimension("batch_size", "categorical", choices=(64, 128)),
    ]
    frame = trials_frame(runs, search)
    assert frame["nesterov"].tolist() == [True, False, True]
    _, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(frame, ax, search[0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["True", "False"]
    _, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(frame, ax, search[1], best_run="c")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "512"]
    (complete, best) = ax.collections
    assert len(complete.get_offsets()) == 3 and best.get_offsets()[0, 1] == 0.95


def test_two_runs_with_one_trial_number_stay_two_curves():
    """Studies in two Optuna storages can log to one MLflow experiment: both have a trial 0."""
    frame = hand_made_curves()
    twin = frame[frame["trial"] == 0].assign(run_id="other0", **{"val/loss": 9.0})
    frame = pd.concat([frame, twin], ignore_index=True)
    _, ax = new_figure(5, 4)
    curves.plot_loss_curves(frame, ax, "val/loss", best_run="run0")
    lines = ax.get_lines()
    assert len(lines) == 5  # run0, other0, run1 and its cross, run2
    thick = [line for line in lines if line.get_color() == BEST]
    assert len(thick) == 1 and thick[0].get_ydata()[0] == pytest.approx(1.1)
    assert max(len(line.get_xdata()) for line in lines) == 3  # no run joined to another


def test_the_output_folder_is_checked_before_any_work(tmp_path):
    from analysis.report import ReportError, check_out_dir

    assert check_out_dir(tmp_path / "new" / "report") == (tmp_path / "new" / "report")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text("{}")
    (earlier / "loss_curves.png").write_bytes(b"")
    assert check_out_dir(earlier) == earlier  # an earlier report is replaced whole

    papers = tmp_path / "paper"
    papers.mkdir()
    (papers / "thesis.tex").write_text("years of work")
    with pytest.raises(ReportError, match=r"holds files that are not a report \(thesis.tex\)"):
        check_out_dir(papers)
    assert (papers / "thesis.tex").read_text() == "years of work"

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ReportError, match="is a file; pass a folder"):
        check_out_dir(tmp_path / "a_file")
    with pytest.raises(ReportError, match="is not a folder the report can replace"):
        check_out_dir(Path("/"))
    with pytest.raises(ReportError, match="cannot write the report folder /proc/report"):
        check_out_dir(Path("/proc/report"))
