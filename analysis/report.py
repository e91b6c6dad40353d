"""``python -m research report``: one study turned into figures and a self-contained report.

Reads the tracking store (through :mod:`research.experiment.tracking.results`), the Optuna study
(for parameter importances only) and the test split (to evaluate the best model once); it never
trains. Writes into ``--out`` (default ``mlruns/reports/<study>/``): the figures as 150 dpi PNGs,
``report.md`` beside them, ``report.html`` with every figure embedded (opens offline) and
``report.json`` with the numbers; then logs them as artifacts under ``report/`` of the study's
parent run. :func:`log_study_figures` draws the search figures alone, for the study command.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import baselines, curves, evaluation, history, hyperparams
from analysis.comparison import comparison, refit_trial
from analysis.render import Report
from analysis.report_folder import (
    ReportError,
    check_out_dir,
    default_out_dir,
    is_folder_name,
    not_a_folder,
    write_report_folder,
)
from analysis.store import StudyResults, load_study_results
from analysis.style import light_style, save_png
from analysis.trial_axes import far_out_caption
from research.data.datasets import DATASETS, DatasetInfo, UnknownDataset, dataset_info
from research.experiment.config.fields import show
from research.experiment.studies.storage import default_storage_url
from research.experiment.tracking import results as tracking
from research.experiment.tracking.stores import redact, resolve_tracking_uri
from research.experiment.tracking.weights import WeightsError, read_weights

MISTAKES_SHOWN = 24


def build_report(
    study: str | None = None,
    *,
    tracking_uri: str | None = None,
    out: Path | None = None,
    storage: str | None = None,
    source_dir: str | None = None,
    data_dir: str | None = None,
    log_to_mlflow: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[Report, Path]:
    """Makes the report of ``study`` (the most recent study if None); returns it and its folder.

    Raises ``TrackingError`` (unknown study, unreadable store), ``ReportError``
    and ``research.data.DataError`` for user mistakes.
    """
    started = time.perf_counter()
    if study is not None and not is_folder_name(study):
        raise ReportError(f"{not_a_folder(study)}; pass the name of a study in the store")
    uri = resolve_tracking_uri(tracking_uri)
    results = load_study_results(study, uri)
    out = check_out_dir(Path(out) if out else default_out_dir(uri, results.name))
    report = Report(results, uri, dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    states = results.trials["state"].value_counts().to_dict()
    say(
        f"study {results.name!r}: {len(results.trials)} trial runs "
        f"({', '.join(f'{n} {s}' for s, n in sorted(states.items())) or 'none'}) "
        f"in {redact(uri)}"
    )
    _note_what_the_store_lacks(report, say)

    best = results.best
    with light_style():
        storage = storage or default_storage_url(uri)
        figures, report.importances, note = search_figures(results, storage)
        if note:
            _note(report, say, f"parameter importances: {note}")

        if best is None:
            _note(report, say, "no trial completed, so there is no best model to evaluate")
        else:
            test_figures = _evaluate_best(report, best, source_dir, data_dir, say)
            figures.update(test_figures)
        report.comparison = comparison(report, uri, say)
        write_report_folder(report, figures, out, started)
    if log_to_mlflow:
        tracking.log_artifacts(results.record.parent_run_id, out, "report", uri)
        say(f"logged to MLflow: run {results.record.parent_run_id}, artifacts report/")
    say(f"report written in {time.perf_counter() - started:.1f} s: {out / 'report.html'}")
    return report, out


def _note(report: Report, say: Callable[[str], None], text: str, prefix: str = "note") -> None:
    """Adds ``text`` to the report's notes and says it (``note: ...``, or ``warning: ...``)."""
    report.notes.append(text)
    say(f"{prefix}: " + report.notes[-1])


def _note_what_the_store_lacks(report: Report, say: Callable[[str], None]) -> None:
    """Notes on what the report leaves out: running trials, trial numbers logged more than once
    and the search space; ReportError if no trial has finished."""
    results = report.results
    if results.skipped_running:
        _note(
            report,
            say,
            f"{len(results.skipped_running)} trial(s) still running were left out: "
            + ", ".join(map(str, results.skipped_running))
            + " (if their worker died instead, running the study command again recovers them)",
        )
    if results.repeated_trials:
        _note(
            report,
            say,
            "trial numbers "
            + ", ".join(map(str, results.repeated_trials))
            + " each have several runs: studies kept in different Optuna storages log to this "
            "experiment; every run is shown, and the importances come from one storage only",
        )
    if results.trials.empty:
        raise ReportError(
            f"study {results.name!r} has no finished trial yet; run the study first "
            f"(or wait for its running trials)"
        )
    if not results.search:
        _note(
            report,
            say,
            "the study's search space is not in the store (no study/search_space.json or study "
            "file on its parent run), so validation accuracy against each hyperparameter is "
            "left out",
        )


def search_figures(
    results: StudyResults, storage: str
) -> tuple[dict[str, tuple[Any, str]], pd.DataFrame | None, str]:
    """The figures of how the search went, with their captions: loss curves, validation
    accuracy against each searched parameter, the optimization history and the importances.
    Returns them, the importances (or None) and why there are none ("" if there are)."""
    best = results.best
    best_run = None if best is None else str(best["run_id"])
    figures: dict[str, tuple[Any, str]] = {}
    if not results.curves.empty:
        figures["loss_curves.png"] = (
            curves.loss_curves_figure(results.curves, best_run),
            "train/loss and val/loss per epoch (counted from 1) of every trial, on one y axis "
            "whose scale and range the completed trials set (a pruned or failed trial outside "
            "it runs off the panel, which counts them), colored by the trial's final "
            "validation accuracy; pruned and failed trials dashed and faint, ending where they "
            "stopped; the best trial thick.",
        )
    if results.search:
        figures["val_accuracy_vs_params.png"] = (
            hyperparams.metric_vs_params_figure(
                results.trials, results.search, "val/accuracy", best_run
            ),
            "Final validation accuracy of each completed trial against each searched "
            "hyperparameter (log axes where the search was log); the completed trials set the "
            f"range{far_out_caption()}. Pruned trials are marked apart, as hollow circles in the "
            "grey strip below the range at their value of the hyperparameter: their accuracy "
            "after an epoch or two is not comparable with a finished trial's, so it is not "
            "drawn.",
        )
    figures["optimization_history.png"] = (
        history.optimization_history_figure(results.trials, results.objective, results.direction),
        f"{results.objective} of each completed trial in the order they ran, and the best so "
        "far; the completed trials set the range"
        f"{far_out_caption(results.direction)}. Pruned trials are marked apart, as hollow "
        "circles in the grey strip below the range (their value when stopped is not "
        "comparable, so it is not drawn), failed ones as crosses there.",
    )
    importances, note = _importances(results, storage)
    n_complete = int((results.trials["state"] == "COMPLETE").sum())
    if importances is not None:
        figures["param_importances.png"] = (
            history.importances_figure(importances, history.IMPORTANCES_METHOD),
            "How much of the variance of the objective each hyperparameter explains, by "
            f"fANOVA (Optuna's FanovaImportanceEvaluator, seed {history.IMPORTANCES_SEED}, "
            "over the completed trials)"
            + (
                f"; the whiskers span the shares with each of the {n_complete} completed "
                "trials left out in turn (how far one trial moves the ranking). "
                if "low" in importances
                else ". "
            )
            + history.importances_caveat(n_complete),
        )
    return figures, importances, note


def log_study_figures(
    study: str, tracking_uri: str | None = None, storage: str | None = None
) -> list[str]:
    """Draws the study's search figures (:func:`search_figures`: the report's own, the
    importances by the same method) and logs them under ``figures/`` of its parent run, as the
    study command does at its end. Returns their names; none while no trial has finished."""
    uri = resolve_tracking_uri(tracking_uri)
    results = load_study_results(study, uri)
    if results.trials.empty:
        return []
    with light_style(), tempfile.TemporaryDirectory() as folder:
        figures, _, _ = search_figures(results, storage or default_storage_url(uri))
        for name, (figure, _) in figures.items():
            save_png(figure, Path(folder) / name)
        tracking.log_artifacts(results.record.parent_run_id, Path(folder), "figures", uri)
    return sorted(figures)


def _importances(results: StudyResults, storage: str) -> tuple[pd.DataFrame | None, str]:
    """The study's importances from the Optuna storage ``storage`` by the report's one method
    (fANOVA, :data:`analysis.history.IMPORTANCES_METHOD`), or None and the reason there are
    none."""
    import warnings

    import optuna

    from research.experiment.studies.storage import StudyError, open_storage

    complete = results.trials[results.trials["state"] == "COMPLETE"]
    if len(complete) < 2:
        return None, f"need at least 2 completed trials, the study has {len(complete)}"
    # Only the storage the user gave, or the default beside the tracking store: never one a
    # run's tag names (anyone who can write a tag could point the report at any database).
    url = storage
    recorded = results.parent_tags.get("optuna.storage")
    hint = (
        f" (the study recorded {recorded}: pass it as --storage if that is where it lives)"
        if recorded and recorded != redact(url)
        else ""
    )
    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if ("://" not in url or url.startswith("sqlite:///")) and not Path(local).is_file():
        # Opening a journal that is not there would create an empty one.
        return None, f"the Optuna storage {local} does not exist; pass --storage{hint}"
    try:
        study = optuna.load_study(study_name=results.name, storage=open_storage(url))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            importances = _fanova(study)
            spread = _leave_one_out(study)
    except StudyError as error:
        return None, str(error)
    except (KeyError, ValueError, RuntimeError) as error:
        # KeyError: no such study in that storage; ValueError/RuntimeError: too little variety.
        return None, f"Optuna could not compute them from {redact(url)}: {error}{hint}"
    frame = pd.DataFrame(list(importances.items()), columns=["param", "importance"])
    if frame.empty:
        return None, "Optuna found no parameter that varied among the completed trials"
    if spread:
        frame["low"] = [min(s.get(p, 0.0) for s in spread) for p in frame["param"]]
        frame["high"] = [max(s.get(p, 0.0) for s in spread) for p in frame["param"]]
    return frame, ""


def _fanova(study: Any) -> dict[str, float]:
    import optuna

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=history.IMPORTANCES_SEED)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _leave_one_out(study: Any) -> list[dict[str, float]]:
    """The importances again with each completed trial left out in turn (in-memory copies of
    the study): how far one trial moves each share. Empty below 3 completed trials."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:  # (2 left: the fewest fANOVA takes)
        return []
    spread = []
    for left_out in complete:
        copy = optuna.create_study(directions=study.directions)
        copy.add_trials([t for t in complete if t.number != left_out.number])
        try:
            spread.append(_fanova(copy))
        except (ValueError, RuntimeError):  # too little variety without it
            continue
    return spread


def evaluation_summary(result: Any, info: Any, source: str) -> dict[str, Any]:
    """What the report keeps of a test evaluation (``evaluation.evaluate_outputs``'s result) on
    dataset ``info``: counts, accuracy with its interval, the confusion matrix, per class, and
    where it stands against the dataset's published baselines."""
    return {
        "dataset": info.name,
        "source": source,
        "n": result.n,
        "correct": result.correct,
        "accuracy": result.accuracy,
        "ci_low": result.ci_low,
        "ci_high": result.ci_high,
        "confusion_matrix": result.confusion.tolist(),
        "per_class": result.per_class.to_dict(orient="records"),
        "baselines": baselines.against_baselines(result.correct, result.n, info.baselines),
    }


def _evaluate_best(
    report: Report, best: pd.Series, source_dir: str | None, data_dir: str | None, say: Callable
) -> dict[str, tuple[Any, str]]:
    """Evaluates the best model once on the test split of the dataset it trained on; fills
    ``report.test``."""
    from research.data import load_named

    results = report.results
    info = best_dataset(best)
    with tempfile.TemporaryDirectory() as folder:
        found = _best_weights(report, best, Path(folder), say)
        if found is None:
            return {}
        weights, source, artifact, refitted = found
        try:
            saved = read_weights(weights)  # the MLP, or a network of layers with its state
        except WeightsError as error:
            reason = str(error).removeprefix(f"{weights}: ")
            message = f"cannot evaluate {source}: the artifact {artifact}: {reason}"
            raise ReportError(message) from None
    data = load_named(info.name, source_dir, data_dir, raw=bool(best["raw_inputs"]))
    x_test = data.test.x.astype(saved.dtype, copy=False)
    item, _ = evaluation.words(info.class_names)
    say(f"evaluating {source} once on the {len(x_test):,} {info.title} test {item}s")
    # mlp.forward for the MLP; a network of layers in evaluation mode (running statistics)
    outputs = np.asarray(saved.outputs(x_test), dtype=np.float64)
    labels = data.test.labels
    result = evaluation.evaluate_outputs(outputs, labels, info.class_names)
    logged = results.parent_metrics.get("test_accuracy") if refitted else None
    report.test = {
        **evaluation_summary(result, info, source),
        "logged_test_accuracy": logged,
        "spec": saved.describe(),
    }
    say(
        f"test accuracy {result.accuracy:.2%} (95% CI {result.ci_low:.2%} to "
        f"{result.ci_high:.2%}, {result.n - result.correct} mistakes)"
    )
    if logged is not None and not math.isclose(logged, result.accuracy, abs_tol=0.5 / result.n):
        _note(
            report,
            say,
            f"the study logged test_accuracy {logged:.4%} but this evaluation gives "
            f"{result.accuracy:.4%}: the data or the code changed since",
            prefix="warning",
        )
    if report.test["baselines"]:
        say(
            f"against published {info.title} results: ours is "
            + "; ".join(
                f"{row['place']} {row['baseline']} ({row['accuracy_percent']:g}%)"
                for row in report.test["baselines"]
            )
        )
    score = "p" if saved.output == "softmax" else "output"
    return _test_figures(result, data.test.x, labels, outputs, score, info)


def _best_weights(
    report: Report, best: pd.Series, folder: Path, say: Callable
) -> tuple[Path, str, str, bool] | None:
    """The best model's weights file, downloaded into ``folder``: the study's final fit if it
    retrained the best trial, else the trial's own (with a note saying why). Returns it with
    what it is (for the report), the artifact it came from (for errors) and whether it is the
    final fit; None (with a note) if neither run has weights."""
    results, uri = report.results, report.tracking_uri
    weights = None
    refit = refit_trial(results)
    best_trial = str(int(best["trial"]))
    if refit is None:
        pass  # no final fit (--no-final): the trial's own weights, below
    elif results.repeated_trials:
        _note(
            report,
            say,
            f"with trial numbers repeated (above), the final fit of trial {refit} "
            "cannot be matched to a run, so the test evaluation uses the best trial's own "
            "weights",
        )
    elif refit == best_trial:
        weights = tracking.download_artifact(
            results.record.parent_run_id, "best_weights.npz", folder, uri
        )
        if weights is None:
            _note_missing_refit(report, best_trial, say)
    else:
        _note(
            report,
            say,
            f"the study's final fit retrained trial {refit}, not the best trial "
            f"{best_trial} shown here, so the test evaluation uses the best trial's own "
            "weights; run the study command again (without --no-final) to refit it",
        )
    if weights is not None:
        source = "the best configuration retrained on train+validation (the study's final fit)"
        artifact = f"best_weights.npz of the study's parent run {results.record.parent_run_id}"
        return weights, source, artifact, True
    weights = tracking.download_artifact(best["run_id"], "weights.npz", folder, uri)
    if weights is None:
        _note(
            report,
            say,
            f"no weights were found on the parent run or on trial {int(best['trial'])}, "
            "so there is no test evaluation",
        )
        return None
    source = f"trial {int(best['trial'])}'s weights (trained on the training split only)"
    return weights, source, f"weights.npz of run {best['run_id']}", False


def _note_missing_refit(report: Report, trial: str, say: Callable) -> None:
    """The warning that the final fit of ``trial``, the best, has no weights file to evaluate,
    so the report falls back to the trial's own weights (and what the study logged instead)."""
    results = report.results
    logged = results.parent_metrics.get("test_accuracy")
    tested = f" (the study logged its test_accuracy, {logged:.2%})" if logged is not None else ""
    _note(
        report,
        say,
        f"the study's parent run {results.record.parent_run_id} has no best_weights.npz, the "
        f"final fit of trial {trial}{tested}, so the test evaluation uses trial {trial}'s own "
        "weights, trained on the training split only; its accuracy is not the final fit's "
        "(the file was deleted, or the final fit did not finish: run the study command again "
        "to refit)",
        prefix="warning",
    )


def _test_figures(
    result: evaluation.TestEvaluation,
    images: np.ndarray,
    labels: np.ndarray,
    outputs: np.ndarray,
    score: str,
    info: DatasetInfo,
) -> dict[str, tuple[Any, str]]:
    """The test evaluation's figures with their captions: the confusion matrix, accuracy per
    class and the worst mistakes, from ``evaluation.evaluate_outputs``'s ``result``, the test
    images (N, 784), labels (N,) and the model's outputs (N, n_classes), whose values are
    called ``score``."""
    item, kind = evaluation.words(info.class_names)
    figures = evaluation.evaluation_figures(
        result, images, outputs, labels, score, MISTAKES_SHOWN, info.class_names, info.title
    )
    captions = {
        "confusion_matrix.png": f"{info.title} test confusion matrix of the best model: counts, "
        f"colored by the share of the true {kind}'s rows.",
        "per_class_accuracy.png": f"{info.title} test accuracy per {kind}, a point with its 95% "
        "Wilson interval; the dashed line is the overall accuracy, its interval shaded. The "
        "axis spans the intervals, not 0 to 100%.",
        "misclassified.png": f"The {MISTAKES_SHOWN} {info.title} test {item}s the best model got "
        f"wrong with the highest output for the wrong {kind}.",
    }
    return {name: (figure, captions[name]) for name, figure in figures.items()}


def best_dataset(best: pd.Series) -> DatasetInfo:
    """The description of the dataset the best trial trained on (its ``dataset`` param; runs
    logged before the field existed trained on MNIST); ReportError for a name this version does
    not know (a later version's dataset)."""
    name = best.get("dataset")
    name = name if isinstance(name, str) and name else "mnist"
    try:
        return dataset_info(name)
    except UnknownDataset:
        raise ReportError(
            f"trial {int(best['trial'])} (run {best['run_id']}) trained on dataset {show(name)}, "
            f"which this version does not know (it knows {', '.join(DATASETS)}); report the "
            "study with the version that trained it"
        ) from None
