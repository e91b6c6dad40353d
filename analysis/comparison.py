"""The report's comparison: the origin's configuration (a train run of the unchanged preset), the
origin's network tuned (the ``origin_baseline`` study's best) and this study's best, side by side:
accuracy, epochs, wall time, size. Only results on the study's own dataset are compared. A row
the store does not hold names the configuration and how to get it, and nothing else: every
number of it is missing (``n/a`` in the report), not what the configuration would give.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis.render import Report, pct, title_of
from analysis.store import StudyResults, load_study_results
from research.data import DEFAULT_DATASET
from research.experiment.tracking import results as tracking
from research.experiment.tracking.stores import TrackingError

#: The origin's network tuned (experiments/origin_baseline.toml); studies logged before the
#: preset was renamed are called seed_baseline.
BASELINE_STUDIES = ("origin_baseline", "seed_baseline")
#: The comparison's columns; a row the store does not hold has only the first two.
COLUMNS = (
    "configuration",
    "source",
    "val/accuracy",
    "test_accuracy",
    "epochs",
    "wall_seconds",
    "n_params",
)


def refit_trial(results: StudyResults) -> str | None:
    """The trial the study's last final fit retrained (its best_weights.npz and test_accuracy).

    A later resume with --no-final may have found a better trial since. Stores written before
    the refit_trial tag have only best_trial, which every invocation moves.
    """
    tags = results.parent_tags
    return tags.get("refit_trial", tags.get("best_trial"))


def comparison(report: Report, uri: str, say: Callable[[str], None]) -> pd.DataFrame:
    """The origin's configuration beside the tuned best: accuracy, epochs, wall time, size."""
    results = report.results
    rows = [_origin_row(results.dataset, uri)]
    if results.name not in BASELINE_STUDIES:
        rows.append(_baseline_row(results.dataset, uri))
    test = report.test["accuracy"] if report.test else None
    rows.append(study_row(results, f"tuned best ({results.name})", test))
    frame = pd.DataFrame(rows).reindex(columns=list(COLUMNS))
    say(
        "comparison: "
        + "; ".join(f"{row['configuration']}: test {pct(row.get('test_accuracy'))}" for row in rows)
    )
    return frame


def _origin_row(dataset: str, uri: str) -> dict[str, Any]:
    """The origin preset's row: its latest train run on ``dataset`` that is the preset exactly,
    or how to make one."""
    from research.data import N_TRAIN
    from research.experiment.config.presets import PRESET_ALIASES, PRESETS

    origin_preset = PRESETS["origin"]
    # train runs of the origin preset, under its name or the one it had before ("seed"), in the
    # experiment the train command logs this dataset's runs to
    experiment = "train" if dataset == DEFAULT_DATASET else f"train_{dataset}"
    names = ["origin", *(old for old, new in PRESET_ALIASES.items() if new == "origin")]
    found = [tracking.find_runs(experiment, f"tags.preset = '{name}'", uri) for name in names]
    found = [frame for frame in found if not frame.empty]
    origin_runs = (
        pd.concat(found, ignore_index=True).sort_values("start_time", ascending=False)
        if found
        else pd.DataFrame()
    )
    command = "`python -m research train --preset origin --evaluate-test"
    command += "`" if dataset == DEFAULT_DATASET else f" --dataset {dataset}`"
    origin: dict[str, Any] = {
        "configuration": "origin preset: [784, 30, 10] sigmoid, mse, sgd",
        "source": f"not in this store; run {command}",
    }
    # Only a finished run of the preset exactly as the origin had it, on all training rows of
    # this study's dataset (its params read through the field table: a field it predates has
    # its default).
    matching = [
        run
        for _, run in origin_runs.iterrows()
        if run["status"] == "FINISHED"
        and run.get("params.n_train_rows") == str(N_TRAIN)
        and logged_dataset(run) == dataset
        and logged_config(run) == origin_preset
    ]
    if matching:
        run = matching[0]
        origin.update(
            source=f"train run {run['run_id'][:8]}",
            **{
                "val/accuracy": run.get("metrics.val/accuracy", math.nan),
                "test_accuracy": run.get("metrics.test_accuracy", math.nan),
                "epochs": int(run.get("params.epochs", origin_preset.epochs)),
                "wall_seconds": run.get("metrics.wall_seconds", math.nan),
                "n_params": origin_preset.spec().n_params,  # the run is of this preset exactly
            },
        )
    return origin


def _baseline_row(dataset: str, uri: str) -> dict[str, Any]:
    """The origin network tuned: the best of the first baseline study in the store, or why there
    is none for ``dataset``."""
    baseline = None
    for name in BASELINE_STUDIES:
        try:
            baseline = load_study_results(name, uri)
            break
        except TrackingError:
            continue
    label = "origin network, tuned (experiments/origin_baseline.toml)"
    if baseline is None:
        how = (
            "run `python -m research study experiments/origin_baseline.toml`"
            if dataset == DEFAULT_DATASET
            else f"experiments/origin_baseline.toml tunes it on MNIST, not {title_of(dataset)}"
        )
        return {"configuration": label, "source": f"not in this store; {how}"}
    if baseline.dataset != dataset:
        return {
            "configuration": label,
            "source": f"study {baseline.name} is of {title_of(baseline.dataset)}, "
            f"not {title_of(dataset)}",
        }
    return study_row(baseline, f"origin network, tuned ({baseline.name} best)", None)


def logged_dataset(run: pd.Series) -> str:
    """The dataset a train run logged (``mnist`` for runs logged before the field existed)."""
    name = run.get("params.dataset")
    return name if isinstance(name, str) and name else DEFAULT_DATASET


def logged_config(run: pd.Series) -> Any:
    """The TrainConfig a run's ``params.<field>`` columns give, or None if they give none. The
    dataset is left at its default: :func:`logged_dataset` checks it on its own."""
    from research.experiment.config.fields import FIELDS, TrainConfig

    params = {
        name: run[f"params.{name}"]
        for name in FIELDS
        if name != "dataset" and isinstance(run.get(f"params.{name}"), str)
    }
    try:
        return TrainConfig.from_params(params)[0] if params else None
    except ValueError:
        return None


def study_row(results: StudyResults, label: str, test_accuracy: float | None) -> dict[str, Any]:
    """A study's best trial as a row of the comparison (its test accuracy: ``test_accuracy``,
    else the one the study logged for its refit, when that refit is of the trial shown)."""
    best = results.best
    if best is None:
        return {"configuration": label, "source": f"study {results.name}: no completed trial"}
    if test_accuracy is None:
        # the study's logged test accuracy, if its final fit retrained the best trial shown
        refit_is_best = refit_trial(results) == str(int(best["trial"]))
        logged = results.parent_metrics.get("test_accuracy", math.nan)
        test_accuracy = logged if refit_is_best and not results.repeated_trials else math.nan
    return {
        "configuration": label,
        "source": f"study {results.name}, trial {int(best['trial'])}",
        "val/accuracy": float(best["val/accuracy"]),
        "test_accuracy": test_accuracy,
        "epochs": int(best["epochs_run"]),
        "wall_seconds": float(best["wall_seconds"]),
        "n_params": best["n_params"],
    }
