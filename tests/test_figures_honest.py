"""Figures that do not mislead, checked on the data behind each figure: what sets each axis's range
(the completed trials), where pruned trials go (apart from the values they cannot be compared
with), one importance method named in the title, epochs counted from 1, points with intervals
for the per-class accuracy, and n/a for a comparison row the store does not hold. Small
hand-made and generated DataFrames; no training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import study_results
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.container import BarContainer, ErrorbarContainer

from analysis import curves, evaluation, history, hyperparams
from analysis.render import Report, comparison_table, sections
from analysis.store import SearchDimension, curves_frame
from analysis.style import new_figure, value_range
from analysis.trial_axes import FAR_OUT, STRIP, far_out, worse_fence

LOSSES = ("train/loss", "val/loss")
LEARNING_RATE = SearchDimension("learning_rate", "float", log=True)
PRUNED_LABEL = "(grey strip; value not comparable)"


def panels(figure) -> list:
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]


def in_strip(ax, collection) -> bool:
    """Whether ``collection`` is drawn in the strip below the value range of ``ax`` (x in data,
    y in axes coordinates, in the strip's middle) rather than on the value axis."""
    offsets = collection.get_offsets()
    return collection.get_offset_transform() is ax.get_xaxis_transform() and bool(
        (offsets[:, 1] == STRIP / 2).all()
    )


def value_area(ax) -> tuple[float, float]:
    """The value range of ``ax``: its y limits without the strip below them, if it has one."""
    low, high = ax.get_ylim()
    return (low + STRIP * (high - low), high) if ax.patches else (low, high)


def on_value_axis(ax) -> list:
    """The collections of points drawn on the value axis (legend-only entries left out)."""
    return [
        c
        for c in ax.collections
        if c.get_offset_transform() is ax.transData and len(c.get_offsets())
    ]


# --- loss curves: one scale for both panels, set by the completed trials --------------------------


def curves_of(runs: list[tuple[str, list[float], list[float]]]) -> pd.DataFrame:
    """One run per ``(state, train losses, val losses)``, epochs from 1 as the store gives."""
    rows = []
    for number, (state, train, val) in enumerate(runs):
        for epoch, (t, v) in enumerate(zip(train, val), start=1):
            rows.append((f"run{number}", number, state, epoch, t, v, 0.9 + 0.001 * number))
    return pd.DataFrame(
        rows, columns=["run_id", "trial", "state", "epoch", *LOSSES, "val/accuracy"]
    )


def test_both_loss_panels_share_one_scale_though_only_train_loss_spans_a_decade():
    """The user's study: train loss from 0.5 down to 0.01 (log by itself), validation loss
    between 0.06 and 0.09 (linear by itself), and a pruned trial at 40 flattening the rest."""
    frame = curves_of(
        [
            ("COMPLETE", [0.5, 0.1, 0.03, 0.01], [0.09, 0.065, 0.07, 0.08]),  # val loss rises
            ("COMPLETE", [0.6, 0.2, 0.08, 0.04], [0.09, 0.075, 0.07, 0.068]),
            ("PRUNED", [40.0, 35.0], [38.0, 36.0]),
        ]
    )
    figure = curves.loss_curves_figure(frame, best_run="run0")
    train, val = panels(figure)
    assert (train.get_title(), val.get_title()) == LOSSES
    assert train.get_yscale() == val.get_yscale() == "log"
    assert train.get_ylim() == val.get_ylim()
    low, high = train.get_ylim()
    assert low < 0.01 and 0.6 < high < 1.0  # the completed trials, not the pruned one at 40
    # The pruned trial does not vanish without a word.
    for ax in (train, val):
        assert [text.get_text() for text in ax.texts] == ["1 trial partly off this range"]
    # One panel alone would take the scale of its own completed values: not both the same.
    _, ax = new_figure(4, 3)
    curves.plot_loss_curves(frame, ax, "val/loss")
    assert ax.get_yscale() == "linear" and ax.get_ylim()[1] < 0.1


@settings(max_examples=25, deadline=None)
@given(
    complete=st.lists(
        st.lists(st.floats(1e-3, 3.0), min_size=2, max_size=6), min_size=1, max_size=4
    ),
    outliers=st.lists(st.floats(10.0, 1e6), min_size=1, max_size=3),
)
def test_the_loss_range_is_the_completed_trials(complete, outliers):
    runs = [("COMPLETE", losses, [v * 1.2 for v in losses[::-1]]) for losses in complete]
    runs += [(state, [value], [value]) for state, value in zip(("PRUNED", "FAIL") * 2, outliers)]
    frame = curves_of(runs)
    figure = curves.loss_curves_figure(frame, best_run="run0")
    train, val = panels(figure)
    assert train.get_yscale() == val.get_yscale()
    assert train.get_ylim() == val.get_ylim()
    done = frame[frame["state"] == "COMPLETE"]
    scale, low, high = curves.loss_axis(done)
    assert train.get_yscale() == scale
    assert train.get_ylim() == pytest.approx((low, high))
    values = done[list(LOSSES)].to_numpy().ravel()
    assert low <= values.min() and values.max() <= high
    assert min(outliers) > high  # the pruned and failed trials run off the panel
    n = len(outliers)
    said = f"{n} trial{'s' if n > 1 else ''} partly off this range"
    assert [text.get_text() for text in train.texts] == [said]
    assert scale == ("log" if values.max() / values.min() > 10 else "linear")
    # Epochs count from 1 in every line drawn, crosses included.
    for ax in (train, val):
        assert min(line.get_xdata()[0] for line in ax.get_lines()) == 1


def test_epochs_count_from_1_from_the_store_to_the_figure():
    histories = pd.DataFrame(
        [("a", key, step, 1.0 / (step + 1)) for key in LOSSES for step in range(3)],
        columns=["run_id", "key", "step", "value"],
    )
    trials = pd.DataFrame({"run_id": ["a"], "trial": [0], "state": ["COMPLETE"]})
    frame = curves_frame(histories, trials)
    assert frame["epoch"].tolist() == [1, 2, 3]  # MLflow's steps 0..2, as "epoch 1/3".."3/3"
    figure = curves.loss_curves_figure(frame, best_run="a")
    for ax in panels(figure):
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [1, 2, 3]
    with pytest.raises(ValueError, match="epochs count from 1"):
        curves.plot_loss_curves(frame.assign(epoch=frame["epoch"] - 1), new_figure(4, 3)[1])


# --- validation accuracy against a parameter, and the history: pruned trials apart --------------


def trials_of(complete: list[float], pruned: list[float]) -> pd.DataFrame:
    """Completed trials (8 epochs) with the accuracies ``complete``, pruned ones (after 1 or 2
    epochs) with ``pruned``, and one failed trial; learning rates from 0.01 up."""
    states = ["COMPLETE"] * len(complete) + ["PRUNED"] * len(pruned) + ["FAIL"]
    n = len(states)
    return pd.DataFrame(
        {
            "run_id": [f"run{i}" for i in range(n)],
            "trial": range(n),
            "state": states,
            "learning_rate": [0.01 * 1.3**i for i in range(n)],
            "val/accuracy": [*complete, *pruned, np.nan],
            "epochs_run": [8] * len(complete) + [1 + i % 2 for i in range(len(pruned))] + [1],
        }
    )


accuracies = st.floats(0.5, 1.0)


@settings(max_examples=30, deadline=None)
@given(
    complete=st.lists(st.floats(0.95, 0.99), min_size=1, max_size=8),
    pruned=st.lists(accuracies, min_size=1, max_size=6),
)
def test_pruned_trials_are_marked_apart_and_leave_the_range_to_the_completed(complete, pruned):
    trials = trials_of(complete, pruned)
    is_pruned = trials["state"] == "PRUNED"
    shown = np.asarray(complete)[~far_out(complete)]
    expected = value_range(shown)

    _, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(trials, ax, LEARNING_RATE, best_run="run0")
    _, history_ax = new_figure(6, 4)
    history.plot_optimization_history(trials, history_ax)
    for axes, x in ((ax, trials["learning_rate"]), (history_ax, trials["trial"])):
        assert value_area(axes) == pytest.approx(expected)
        low, high = value_area(axes)
        # On the value axis: the completed trials' values (but the far-out ones) and nothing
        # else; no tick in the strip.
        drawn = np.concatenate([c.get_offsets()[:, 1] for c in on_value_axis(axes)])
        assert set(drawn) <= set(shown)
        assert sorted(on_value_axis(axes)[0].get_offsets()[:, 1]) == sorted(shown)
        assert all(low - 1e-12 <= tick <= high + 1e-12 for tick in axes.get_yticks())
        # The pruned trials in the strip, at their parameter (or number), labelled
        # with how long they ran.
        (apart,) = [
            c for c in axes.collections if in_strip(axes, c) and PRUNED_LABEL in c.get_label()
        ]
        assert sorted(apart.get_offsets()[:, 0]) == pytest.approx(sorted(x[is_pruned]))
        label = apart.get_label()
        assert label.startswith("pruned after 1 epoch" if len(pruned) == 1 else "pruned after 1–2")
        labels = axes.get_legend_handles_labels()[1]
        assert "complete (8 epochs)" in labels


def test_the_users_study_keeps_its_cluster_readable():
    """A pruned trial at 85% after 2 epochs no longer sets the range of a 97.5-98.2% cluster."""
    trials = trials_of([0.975, 0.978, 0.980, 0.982], [0.85, 0.97])
    figure = hyperparams.metric_vs_params_figure(trials, [LEARNING_RATE], "val/accuracy", "run3")
    (ax,) = panels(figure)
    low, high = value_area(ax)
    assert 0.97 < low < 0.975 and 0.982 < high < 0.985
    figure = history.optimization_history_figure(trials, "val/accuracy", "maximize")
    low, high = value_area(figure.axes[0])
    assert 0.97 < low < 0.975 and 0.982 < high < 0.985


#: The default study's completed trials measured on 2026-12-06: ten at 97.7-98.2%, and trial 2 at
#: 94.29%, which set a 94-98.2% range and squeezed the ten into its top tenth.
CLUSTER = [0.9768, 0.9814, 0.9429, 0.9769, 0.9812, 0.9774, 0.979, 0.9785, 0.9805, 0.9813, 0.9799]


def far_marks(ax):
    return [c for c in ax.collections if c.get_label().startswith("complete, far")]


def test_one_far_out_trial_no_longer_flattens_the_cluster():
    trials = trials_of(CLUSTER, [0.9, 0.95])
    (ax,) = panels(hyperparams.metric_vs_params_figure(trials, [LEARNING_RATE], "val/accuracy"))
    history_ax = panels(history.optimization_history_figure(trials, "val/accuracy", "maximize"))[0]
    for axes, x in ((ax, trials["learning_rate"][2]), (history_ax, 2)):
        low, high = value_area(axes)
        assert 0.975 < low < 0.9768 and 0.9814 < high < 0.983
        (marks,) = far_marks(axes)
        assert marks.get_offsets()[:, 0].tolist() == [pytest.approx(x)]
        assert marks.get_label() == "complete, far below the rest\n(value written)"
        assert [text.get_text() for text in axes.texts] == ["94.29%"]
    # the best so far is drawn from trial 0, within the range
    (step,) = history_ax.get_lines()
    assert np.nanmin(step.get_ydata()) == 0.9768
    # With fewer than 5 completed trials no quartile is trusted: 94.29% sets the range.
    trials = trials_of(CLUSTER[:4], [0.9])
    (ax,) = panels(hyperparams.metric_vs_params_figure(trials, [LEARNING_RATE], "val/accuracy"))
    assert value_area(ax)[0] < 0.9429 and not far_marks(ax) and not ax.texts


@settings(max_examples=40, deadline=None)
@given(
    complete=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=14),
    direction=st.sampled_from(["maximize", "minimize"]),
)
def test_every_completed_trial_is_on_the_value_axis_or_written_at_its_worse_edge(
    complete, direction
):
    objective = "val/accuracy" if direction == "maximize" else "val/loss"
    trials = trials_of(complete, [0.5]).rename(columns={"val/accuracy": objective})
    _, ax = new_figure(6, 4)
    history.plot_optimization_history(trials, ax, objective, direction)
    far = far_out(complete, direction)
    (shown,) = on_value_axis(ax)
    assert sorted(shown.get_offsets()[:, 1]) == sorted(np.asarray(complete)[~far])
    low, high = value_area(ax)
    assert low <= min(np.asarray(complete)[~far]) and max(np.asarray(complete)[~far]) <= high
    best = max(complete) if direction == "maximize" else min(complete)
    assert best in np.asarray(complete)[~far]  # the best trial is never the one moved aside
    if far.any():
        fence = worse_fence(complete, direction)
        beyond = np.asarray(complete)[far]
        assert (beyond < fence).all() if direction == "maximize" else (beyond > fence).all()
        (marks,) = far_marks(ax)
        assert sorted(marks.get_offsets()[:, 0]) == sorted(trials["trial"][: len(complete)][far])
        assert len(ax.texts) == far.sum()
        # far out by Tukey's far fence, computed here from the quartiles
        low, high = np.percentile(complete, [25, 75])
        spread = FAR_OUT * (high - low)
        fence = low - spread if direction == "maximize" else high + spread
        assert fence == pytest.approx(worse_fence(complete, direction))
    else:
        assert not far_marks(ax) and not ax.texts


def test_a_study_of_pruned_trials_only_still_draws_them_apart():
    trials = trials_of([], [0.6, 0.7])
    _, ax = new_figure(4, 3)
    hyperparams.plot_metric_vs_param(trials, ax, LEARNING_RATE)
    assert on_value_axis(ax) == []
    assert any(in_strip(ax, c) for c in ax.collections)
    _, ax = new_figure(6, 4)
    history.plot_optimization_history(trials, ax)
    assert on_value_axis(ax) == [] and not ax.get_lines()  # no best so far


# --- importances: one method, named --------------------------------------------------------------


def test_the_importances_name_their_one_method():
    frame = pd.DataFrame({"param": ["batch_size", "learning_rate"], "importance": [0.39, 0.11]})
    figure = history.importances_figure(frame)
    (ax,) = figure.axes
    assert ax.get_title() == "parameter importances (fANOVA, seed 0)"
    assert "fANOVA, seed 0" in ax.get_xlabel()
    caveat = history.importances_caveat(20)  # the caption says why Optuna's default differs
    assert "PED-ANOVA" in caveat and "about 2 of the 20 here" in caveat


def test_the_report_and_the_study_figures_compute_importances_by_that_method(tmp_path):
    """``_importances`` (the report's and log_study_figures' one source) gives Optuna's fANOVA
    with the named seed, not Optuna's default evaluator."""
    import optuna

    from analysis.report import _importances
    from research.experiment.studies.storage import open_storage

    journal = tmp_path / "optuna.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="s", storage=open_storage(str(journal)), direction="maximize"
    )
    rng = np.random.default_rng(0)
    for _ in range(12):
        trial = study.ask()
        lr = trial.suggest_float("learning_rate", 1e-3, 1.0, log=True)
        batch = trial.suggest_categorical("batch_size", [64, 128, 256])
        study.tell(trial, 0.9 + 0.05 * math.log10(lr) / 3 + 1e-4 * batch + rng.normal(0, 0.003))
    trials = pd.DataFrame({"run_id": ["a", "b"], "trial": [0, 1], "state": ["COMPLETE"] * 2})
    frame, note = _importances(study_results(trials, "s"), str(journal))
    assert note == ""
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=history.IMPORTANCES_SEED)
    expected = optuna.importance.get_param_importances(study, evaluator=evaluator)
    assert dict(zip(frame["param"], frame["importance"])) == pytest.approx(expected)


# --- per-class accuracy: points with their Wilson intervals --------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_per_class_accuracy_is_points_with_their_intervals(data):
    n = data.draw(st.lists(st.integers(1, 2_000), min_size=10, max_size=10))
    correct = [data.draw(st.integers(0, k)) for k in n]
    rows = []
    for label, (k, c) in enumerate(zip(n, correct)):
        low, high = evaluation.wilson_interval(c, k)
        rows.append((label, str(label), k, c, c / k, low, high))
    frame = pd.DataFrame(
        rows, columns=["label", "class", "n", "correct", "accuracy", "ci_low", "ci_high"]
    )
    overall = sum(correct) / sum(n)
    _, ax = new_figure(7, 3.8)
    evaluation.plot_per_class_accuracy(frame, ax, overall, (overall - 0.01, overall + 0.01))
    # No bars, whose length a cut-off axis would distort: one errorbar of points.
    (container,) = ax.containers
    assert isinstance(container, ErrorbarContainer)
    points, _caps, (whiskers,) = container.lines
    assert list(points.get_ydata()) == pytest.approx(frame["accuracy"].tolist())
    segments = whiskers.get_segments()
    assert [segment[0][1] for segment in segments] == pytest.approx(frame["ci_low"].tolist())
    assert [segment[1][1] for segment in segments] == pytest.approx(frame["ci_high"].tolist())
    low, high = ax.get_ylim()
    assert low <= frame["ci_low"].min() and frame["ci_high"].max() <= high
    assert low >= 0


def test_the_users_per_class_figure_no_longer_starts_at_95_percent():
    """Classes at 97.56% and 99.38% of about 1,000 rows: on bars from 95% one looks half as good
    as the other; as points, the axis spans their intervals and nothing is a bar's length."""
    counts = [(980, 974), (1135, 1128), (1032, 1015), (1010, 996), (982, 958)]
    counts += [(892, 880), (958, 945), (1028, 1012), (974, 951), (1009, 990)]
    rows = []
    for label, (k, c) in enumerate(counts):
        rows.append((label, str(label), c / k, *evaluation.wilson_interval(c, k)))
    frame = pd.DataFrame(rows, columns=["label", "class", "accuracy", "ci_low", "ci_high"])
    _, ax = new_figure(7, 3.8)
    evaluation.plot_per_class_accuracy(frame, ax, 0.9835)
    assert not ax.patches and not [c for c in ax.containers if isinstance(c, BarContainer)]
    assert ax.get_ylabel() == "test accuracy (axis not from 0)"


# --- the comparison: a row not in the store is n/a throughout ------------------------------------


def test_a_comparison_row_not_in_the_store_is_na_throughout():
    frame = pd.DataFrame(
        [
            {"configuration": "origin preset", "source": "not in this store; run it"},
            {"configuration": "origin network, tuned", "source": "not in this store; run it"},
            {
                "configuration": "tuned best (s)",
                "source": "study s, trial 1",
                "val/accuracy": 0.9817,
                "test_accuracy": 0.9835,
                "epochs": 8,
                "wall_seconds": 8.3,
                "n_params": 670_990,
            },
        ]
    )
    table = comparison_table(frame)
    numbers = ["val/accuracy", "test_accuracy", "epochs", "wall (s)", "parameters"]
    for row in (0, 1):
        assert table.loc[row, numbers].tolist() == ["n/a"] * 5
    assert table.loc[2, numbers].tolist() == ["98.17%", "98.35%", "8", "8.3", "670,990"]


def test_the_comparison_of_an_empty_store_holds_no_made_up_numbers(tmp_path):
    """No origin train run and no origin_baseline study: their rows are the configuration and
    how to get it; nothing else, not the preset's 23,860 parameters or 200 epochs."""
    from test_study import sqlite_uri

    from analysis.comparison import COLUMNS, comparison
    from research.experiment.tracking.study_runs import StudyTracker

    uri = sqlite_uri(tmp_path)
    StudyTracker.open("s", uri)
    trials = pd.DataFrame(
        {
            "run_id": ["a"],
            "trial": [0],
            "state": ["COMPLETE"],
            "val/accuracy": [0.98],
            "epochs_run": [3],
            "wall_seconds": [4.0],
            "n_params": [50_890],
        }
    )
    report = Report(study_results(trials, "s"), uri, "2026-12-01 10:00")
    frame = comparison(report, uri, lambda _: None)
    assert list(frame.columns) == list(COLUMNS)
    origin, tuned_origin, best = (row for _, row in frame.iterrows())
    for row in (origin, tuned_origin):
        assert row["source"].startswith("not in this store")
        assert row[list(COLUMNS[2:])].isna().all(), row
    assert best["n_params"] == 50_890 and best["epochs"] == 3
    report.comparison = frame
    (section,) = [s for s in sections(report) if s["title"].startswith("The origin's")]
    (table,) = section["tables"]
    assert (table.iloc[:2].drop(columns=["configuration", "source"]) == "n/a").all().all()
    assert "23,860" not in table.to_string()


def test_the_report_names_the_method_and_how_a_divergence_counts_its_epochs(tmp_path):
    import json

    from analysis.render import write_json

    trials = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "trial": [0, 1],
            "state": ["COMPLETE", "FAIL"],
            "val/accuracy": [0.98, np.nan],
            "epochs_run": [3, 1],
            "wall_seconds": [4.0, 0.5],
            "error": ["", "training diverged at epoch 1, step 13: the batch loss is inf"],
        }
    )
    report = Report(study_results(trials, "s"), "sqlite:///x/mlflow.db", "2026-12-01 10:00")
    report.importances = pd.DataFrame({"param": ["learning_rate"], "importance": [1.0]})
    write_json(report, tmp_path / "report.json")
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["importances_method"] == "fANOVA, seed 0"
    overview = sections(report)[0]["paragraphs"]
    assert not any("count from 0" in text for text in overview)  # epochs count from 1 everywhere


def test_a_runs_loss_curves_count_epochs_from_1_as_the_cli_and_report_do():
    """The per-run loss_curves.png artifact: epoch 1 is the first epoch trained (the CLI's
    table and the report count from 1; MLflow's steps from 0), on whole-number ticks."""
    from research.experiment.training.figures import plot_loss_curves
    from research.experiment.training.train import EpochMetrics

    history = [
        EpochMetrics(e, 1.0 / (e + 1), 1.2 / (e + 1), val_accuracy=0.9, seconds=1.0)
        for e in range(3)
    ]
    figure, ax = new_figure(4, 3)
    plot_loss_curves(history, ax)
    for line in ax.get_lines():
        assert list(line.get_xdata()) == [1, 2, 3]
    figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
