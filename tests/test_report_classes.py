"""The report names each dataset's classes and places its result against the dataset's published
baselines: the figures' labels and titles, the per-class and baselines tables, the above / within
/ below rule, and which dataset a run trained on (runs logged before the ``dataset`` param are
MNIST; a name this version does not know is one error line). Figures and tables are drawn from
hand-made data with Fashion-MNIST's class names, so no Fashion-MNIST study is needed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import study_results
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import evaluation
from analysis.baselines import against_baselines, baselines_table, place
from analysis.comparison import logged_config, logged_dataset
from analysis.render import Report, sections, write_markdown
from analysis.report import ReportError, best_dataset, evaluation_summary
from analysis.store import StudyResults, trials_frame
from analysis.style import new_figure
from research.data import DATASETS

FASHION = DATASETS["fashion_mnist"]
MNIST = DATASETS["mnist"]


def fashion_outputs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of a model right about three times in four, with every label present."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    outputs = rng.random((n, 10)) * 0.5
    outputs[np.arange(n), labels] += rng.random(n) * 0.9
    return outputs, labels


def all_text(figure) -> list[str]:
    """Every piece of text a figure draws: titles, labels, tick labels, cell counts, legends."""
    from matplotlib.text import Text

    return [text.get_text() for text in figure.findobj(Text) if text.get_text()]


# --- the figures name the classes ----------------------------------------------------------------


def test_the_confusion_matrix_is_labelled_with_the_class_names():
    confusion = np.diag(np.full(10, 100))
    confusion[4, 6] = 12  # coats taken for shirts
    _, ax = new_figure(6.6, 6)
    evaluation.plot_confusion_matrix(confusion, ax, FASHION.class_names)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(FASHION.class_names)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(FASHION.class_names)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    # Long names are slanted so that they do not run into each other; the rows stay level.
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {40}
    assert {t.get_rotation() for t in ax.get_yticklabels()} == {0}
    # MNIST's digits, as before: upright, and the axes say "digit".
    _, ax = new_figure(5.6, 5)
    evaluation.plot_confusion_matrix(confusion, ax)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(d) for d in range(10)]
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {0}
    assert ax.get_xlabel() == "predicted digit"
    with pytest.raises(ValueError, match="need 10 class names, got 2"):
        evaluation.plot_confusion_matrix(confusion, ax, ["cat", "dog"])


def test_per_class_accuracy_names_each_class_in_the_data_and_the_figure():
    outputs, labels = fashion_outputs()
    result = evaluation.evaluate_outputs(outputs, labels, FASHION.class_names)
    frame = result.per_class
    assert frame["label"].tolist() == list(range(10))
    assert frame["class"].tolist() == list(FASHION.class_names)
    predicted = outputs.argmax(axis=1)
    coats = labels == FASHION.class_names.index("Coat")
    row = frame[frame["class"] == "Coat"].iloc[0]
    assert row["n"] == coats.sum() and row["correct"] == (predicted[coats] == labels[coats]).sum()
    _, ax = new_figure(8, 4.4)
    evaluation.plot_per_class_accuracy(frame, ax, result.accuracy)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(FASHION.class_names)
    (points,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert list(points.get_ydata()) == pytest.approx(frame["accuracy"].tolist())
    assert ax.get_xlabel() == "true class"
    # Without names, the digits (and evaluate_outputs' default) as before.
    digits = evaluation.evaluate_outputs(outputs, labels).per_class
    assert digits["class"].tolist() == [str(d) for d in range(10)]


def test_misclassified_images_are_titled_with_both_class_names():
    _, axes = new_figure(6.4, 2, nrows=1, ncols=4, squeeze=False)
    images = np.random.default_rng(0).random((2, 784))
    coat, shirt, bag = (FASHION.class_names.index(name) for name in ("Coat", "Shirt", "Bag"))
    evaluation.plot_misclassified(
        images, [coat, bag], [shirt, coat], [0.98, 0.5], axes, "p", FASHION.class_names
    )
    assert axes[0, 0].get_title() == "true: Coat\npredicted: Shirt\np = 0.9800"
    assert axes[0, 1].get_title() == "true: Bag\npredicted: Coat\np = 0.5000"
    assert evaluation.mistake_title("4", "9") == "true 4 → 9"
    with pytest.raises(ValueError, match="cannot draw misclassified images: the model made no"):
        evaluation.plot_misclassified(images[:0], [], [], [], axes, "p", FASHION.class_names)


def test_no_figure_of_another_dataset_says_digit():
    outputs, labels = fashion_outputs()
    result = evaluation.evaluate_outputs(outputs, labels, FASHION.class_names)
    images = np.random.default_rng(1).random((len(labels), 784))
    figures = evaluation.evaluation_figures(
        result, images, outputs, labels, "p", 24, FASHION.class_names, FASHION.title
    )
    assert set(figures) == {"confusion_matrix.png", "per_class_accuracy.png", "misclassified.png"}
    for name, figure in figures.items():
        texts = all_text(figure)
        assert not [text for text in texts if "digit" in text.lower()], name
        assert any(text.startswith("Fashion-MNIST: ") for text in texts), name
    assert "Fashion-MNIST: confusion matrix (400 test images)" in all_text(
        figures["confusion_matrix.png"]
    )
    # Wide enough for the slanted names: wider than MNIST's figures.
    mnist = evaluation.evaluation_figures(result, images, outputs, labels, "p", 24)
    for name, figure in figures.items():
        assert figure.get_figwidth() > mnist[name].get_figwidth(), name
    assert "the 24 test digits misclassified with the highest output for the wrong digit" in (
        all_text(mnist["misclassified.png"])
    )


# --- above, within or below a published baseline -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 20_000))
def test_a_baseline_is_within_exactly_when_it_lies_in_the_wilson_interval(data, n):
    correct = data.draw(st.integers(0, n))
    baseline = data.draw(st.floats(0, 100, allow_nan=False))
    low, high = evaluation.wilson_interval(correct, n)
    (row,) = against_baselines(correct, n, [("someone's MLP", baseline)])
    assert row == {
        "baseline": "someone's MLP",
        "accuracy_percent": baseline,
        "place": place(baseline, low, high),
    }
    expected = "above" if baseline < 100 * low else "below" if baseline > 100 * high else "within"
    assert row["place"] == expected
    # A baseline equal to our own accuracy is always within; one at 0% is never above us unless
    # we got nothing right, and one at 100% never below unless we got everything right.
    (same,) = against_baselines(correct, n, [("ours", 100 * correct / n)])
    assert same["place"] == "within"
    assert place(0.0, low, high) == ("within" if correct == 0 else "above")
    assert place(100.0, low, high) == ("within" if correct == n else "below")


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 20_000))
def test_more_correct_answers_never_move_a_result_down_against_a_baseline(data, n):
    fewer = data.draw(st.integers(0, n - 1)) if n > 1 else 0
    more = data.draw(st.integers(fewer, n))
    baseline = data.draw(st.floats(0, 100, allow_nan=False))
    order = {"below": 0, "within": 1, "above": 2}
    (worse,), (better,) = (against_baselines(k, n, [("b", baseline)]) for k in (fewer, more))
    assert order[worse["place"]] <= order[better["place"]]


def test_the_ends_of_the_interval_count_as_within():
    assert place(98.0, 0.98, 0.99) == "within"
    assert place(99.0, 0.98, 0.99) == "within"
    assert place(97.99, 0.98, 0.99) == "above"
    assert place(99.01, 0.98, 0.99) == "below"
    with pytest.raises(ValueError, match="not an interval"):
        place(50.0, 0.6, 0.4)


def test_the_baselines_table_of_fashion_mnist():
    # 8,850 of 10,000: 88.50%, 95% interval 87.86% to 89.11%.
    rows = against_baselines(8_850, 10_000, FASHION.baselines)
    low, high = evaluation.wilson_interval(8_850, 10_000)
    assert (round(100 * low, 2), round(100 * high, 2)) == (87.86, 89.11)
    table = baselines_table(rows, 0.885, low, high)
    columns = ["baseline", "its test accuracy", "ours (95% interval)", "ours is"]
    assert list(table.columns) == columns
    assert table.values.tolist() == [
        ["scikit-learn MLPClassifier, best of the dataset's benchmark", "87.7%",
         "88.50% (87.86% to 89.11%)", "above"],
        ["MLP 256-128-100, submitted to the dataset's benchmark", "88.33%",
         "88.50% (87.86% to 89.11%)", "within"],
        ["2 conv + pooling, submitted to the dataset's benchmark", "91.6%",
         "88.50% (87.86% to 89.11%)", "below"],
        ["2 conv, under 100K parameters, submitted", "92.5%",
         "88.50% (87.86% to 89.11%)", "below"],
        ["2 conv + pooling + batch norm, submitted", "93.4%",
         "88.50% (87.86% to 89.11%)", "below"],
    ]  # fmt: skip
    # 8,900 (88.37% to 89.60%): above both MLPs; 8,600 (85.31% to 86.67%): below all;
    # 9,300 (92.48% to 93.48%): above the first CNN, within the other two.
    places = [row["place"] for row in against_baselines(8_900, 10_000, FASHION.baselines)]
    assert places == ["above", "above", "below", "below", "below"]
    places = [row["place"] for row in against_baselines(8_600, 10_000, FASHION.baselines)]
    assert places == ["below"] * 5
    places = [row["place"] for row in against_baselines(9_300, 10_000, FASHION.baselines)]
    assert places == ["above", "above", "above", "within", "within"]
    assert baselines_table([], 0.88, low, high).empty


# --- the report's text ---------------------------------------------------------------------------


def results_of(dataset: str | None) -> StudyResults:
    """A study of one complete trial, which logged ``dataset`` (no param if None)."""
    runs = pd.DataFrame(
        {
            "run_id": ["run0"],
            "tags.research.trial_number": ["0"],
            "tags.research.state": ["COMPLETE"],
            "params.sizes": ["[784, 30, 10]"],
            "metrics.val/accuracy": [0.87],
            "metrics.wall_seconds": [3.5],
            **({"params.dataset": [dataset]} if dataset is not None else {}),
        }
    )
    trials = trials_frame(runs, [])
    trials["epochs_run"] = 2
    return study_results(trials, "fashion_mlp")


def fashion_report(tmp_path) -> tuple[Report, str]:
    """A report of a Fashion-MNIST study with its test evaluation, as the report fills it; and
    its Markdown."""
    outputs, labels = fashion_outputs(10_000)
    result = evaluation.evaluate_outputs(outputs, labels, FASHION.class_names)
    report = Report(results_of("fashion_mnist"), "sqlite:///x/mlflow.db", "2026-12-01 10:00")
    source = "the best configuration retrained on train+validation (the study's final fit)"
    report.test = evaluation_summary(result, FASHION, source)
    report.figures = {"confusion_matrix.png": "Fashion-MNIST test confusion matrix."}
    write_markdown(report, tmp_path / "report.md")
    return report, (tmp_path / "report.md").read_text()


def test_the_report_names_the_dataset_its_classes_and_where_it_stands(tmp_path):
    report, markdown = fashion_report(tmp_path)
    test = report.test
    by_title = {section["title"]: section for section in sections(report)}
    assert by_title["Overview"]["paragraphs"][0] == "Dataset: Fashion-MNIST."
    tested = by_title["Best model on the test split"]
    assert tested["paragraphs"][0].startswith("Evaluated once on the Fashion-MNIST test split:")
    assert tested["figures"] == ["confusion_matrix.png"]  # only the figures drawn
    (per_class,) = tested["tables"]
    assert list(per_class.columns[:3]) == ["label", "class", "test rows"]
    assert per_class["class"].tolist() == list(FASHION.class_names)
    against = by_title["Against published Fashion-MNIST results"]
    (table,) = against["tables"]
    assert table["baseline"].tolist() == [name for name, _ in FASHION.baselines]
    assert table["ours is"].tolist() == [row["place"] for row in test["baselines"]]
    # This model is right 3 times in 4: below the published MLPs and CNNs.
    assert test["accuracy"] < 0.8 and table["ours is"].tolist() == ["below"] * 5
    ours = f"{100 * test['accuracy']:.2f}% ({100 * test['ci_low']:.2f}% to "
    assert table["ours (95% interval)"].iloc[0].startswith(ours)
    assert "| 0 | T-shirt/top | 1000 |" in markdown
    assert "| MLP 256-128-100, submitted to the dataset's benchmark | 88.33% |" in markdown
    assert "digit" not in markdown.lower()


def test_an_mnist_report_keeps_its_digits_and_its_baseline(tmp_path):
    outputs, labels = fashion_outputs(10_000, seed=3)
    outputs[np.arange(10_000), labels] += 0.3  # about 98%
    result = evaluation.evaluate_outputs(outputs, labels, MNIST.class_names)
    report = Report(results_of(None), "sqlite:///x/mlflow.db", "2026-12-01 10:00")
    report.test = evaluation_summary(result, MNIST, "trial 0's weights")
    by_title = {section["title"]: section for section in sections(report)}
    assert by_title["Overview"]["paragraphs"][0] == "Dataset: MNIST."
    (per_class,) = by_title["Best model on the test split"]["tables"]
    assert per_class["digit"].tolist() == [str(d) for d in range(10)]
    (table,) = by_title["Against published MNIST results"]["tables"]
    assert table["baseline"].tolist() == ["Simard et al. (2003), MLP with 800 hidden units"]


# --- which dataset a run trained on --------------------------------------------------------------


def test_runs_logged_before_the_dataset_param_trained_on_mnist():
    assert results_of(None).trials["dataset"].tolist() == ["mnist"]
    assert results_of(None).dataset == "mnist"
    assert results_of("fashion_mnist").dataset == "fashion_mnist"
    assert best_dataset(results_of(None).best) is MNIST
    assert best_dataset(results_of("fashion_mnist").best) is FASHION


def test_a_dataset_of_a_later_version_is_one_error_line():
    best = results_of("cifar10").best
    assert best["dataset"] == "cifar10"  # read as logged, not through the field table
    with pytest.raises(ReportError) as caught:
        best_dataset(best)
    message = str(caught.value)
    assert message == (
        'trial 0 (run run0) trained on dataset "cifar10", which this version does not know (it '
        "knows mnist, fashion_mnist); report the study with the version that trained it"
    )
    assert "\n" not in message
    odd = results_of("cifar\n10").best
    with pytest.raises(ReportError) as caught:
        best_dataset(odd)
    assert "\n" not in str(caught.value)


def test_the_comparison_takes_origin_runs_of_the_study_dataset_only():
    from research.experiment.config.presets import PRESETS

    origin = PRESETS["origin"]
    params = {f"params.{name}": text for name, text in origin.as_texts().items()}
    params.pop("params.dataset", None)
    before = pd.Series(params)  # a run logged before the dataset param: MNIST
    assert logged_dataset(before) == "mnist"
    assert logged_config(before) == origin
    fashion = pd.Series({**params, "params.dataset": "fashion_mnist"})
    assert logged_dataset(fashion) == "fashion_mnist"
    assert logged_config(fashion) == origin  # the same configuration, on another dataset


def test_an_unknown_dataset_through_the_report_command(tmp_path):
    """A study whose best trial logged a dataset this version does not know: the report command
    says so in one line and writes nothing."""
    from test_study import run_cli, sqlite_uri

    from research.experiment.tracking.runs import RunEnd
    from research.experiment.tracking.study_runs import StudyTracker

    uri = sqlite_uri(tmp_path)
    tracker = StudyTracker.open("later", uri)
    run = tracker.start_trial_run("later", 0)
    run.log_params({"dataset": "cifar10", "sizes": [3072, 30, 10], "epochs": 1})
    run.log_metrics({"val/accuracy": 0.41, "val/loss": 1.7, "train/loss": 1.6}, step=0)
    run.end(RunEnd.COMPLETE)
    out_dir = tmp_path / "report"
    code, out, err = run_cli(
        ["report", "later", "--tracking-uri", uri, "--no-log", "--out", str(out_dir)]
    )
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert line == (
        f'error: trial 0 (run {run.run_id}) trained on dataset "cifar10", which this version does '
        "not know (it knows mnist, fashion_mnist); report the study with the version that "
        "trained it"
    )
    assert not out_dir.exists()
