"""A study's results read back from the tracking store, as plain pandas DataFrames.

Everything MLflow-specific goes through tracking's readers
(:mod:`research.experiment.tracking.results`); this module only reshapes what they return, so every
figure can be drawn (and tested) from DataFrames alone. Logged params are read back through the
field table (:mod:`research.experiment.config.fields`), the search space from the study's
``search_space.json``.

``trials`` has one row per finished trial run: ``trial`` (the Optuna trial number), ``run_id``,
``state`` (``COMPLETE``, ``PRUNED`` or ``FAIL``), the searched parameters under their own names
(``hidden_size``, ``learning_rate``, ...), the last logged ``val/accuracy``, ``val/loss`` and
``train/loss``, ``epochs_run``, ``epochs`` (asked for), ``wall_seconds``, ``n_params``,
``error``, ``raw_inputs`` and ``dataset`` (the ``dataset`` param as logged: a name, ``mnist`` for
runs logged before the field existed). ``curves`` is long: one row per trial run and epoch, with
``run_id``, ``trial``, ``state``, ``epoch`` (counted from 1, as the training command prints
``epoch 1/8``: MLflow's step plus one), ``train/loss``, ``val/loss`` and ``val/accuracy``.
Rows are keyed by ``run_id``: two runs can carry the same trial number when studies kept in
different Optuna storages log to one MLflow experiment.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from research.data import DEFAULT_DATASET
from research.engine.mlp import count_params
from research.experiment.config.fields import FIELDS, ConfigError, layers_param_count
from research.experiment.tracking import results as tracking
from research.experiment.tracking.runs import TAG_ERROR, TAG_STATE, TAG_TRIAL

CURVE_METRICS = ("train/loss", "val/loss", "val/accuracy")


@dataclass(frozen=True)
class SearchDimension:
    """One searched hyperparameter, as the study recorded its search space."""

    name: str
    kind: str  # "int", "float" or "categorical"
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass
class StudyResults:
    """What the report needs of one study, read from the tracking store."""

    record: tracking.StudyRecord
    objective: str
    direction: str
    search: list[SearchDimension]
    trials: pd.DataFrame
    curves: pd.DataFrame
    parent_params: dict[str, str]
    parent_metrics: dict[str, float]
    parent_tags: dict[str, str]
    skipped_running: list[int] = field(default_factory=list)
    repeated_trials: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def best(self) -> pd.Series | None:
        """The best COMPLETE trial's row (by the study's objective and direction), or None."""
        complete = self.trials[self.trials["state"] == "COMPLETE"]
        complete = complete[np.isfinite(complete[self.objective].astype(float))]
        if complete.empty:
            return None
        values = complete[self.objective].astype(float)
        index = values.idxmax() if self.direction == "maximize" else values.idxmin()
        return complete.loc[index]

    @property
    def dataset(self) -> str:
        """The dataset the study trained on, as its best trial (else its first) logged it; a
        study has one (the field cannot be searched). ``mnist`` when no run says otherwise."""
        best = self.best
        if best is not None and isinstance(best.get("dataset"), str):
            return str(best["dataset"])
        if "dataset" in self.trials.columns and len(self.trials):
            return str(self.trials["dataset"].iloc[0])
        return DEFAULT_DATASET


def search_dimensions(space: Iterable[Mapping[str, Any]]) -> list[SearchDimension]:
    """The search space from the study's record of it: one ``{"name", "type", "low", "high",
    "log", "step"}`` or ``{"name", "type", "choices"}`` mapping per searched field (the study
    file's own keys), in the study file's order."""
    return [
        SearchDimension(
            entry["name"],
            entry["type"],
            log=bool(entry.get("log", False)),
            choices=tuple(entry.get("choices", ())),
        )
        for entry in space
    ]


def _typed(values: pd.Series, name: str) -> pd.Series:
    """MLflow keeps params as text; give them back their type through the field table (text
    it cannot read, or a field it no longer has, stays text)."""
    field = FIELDS.get(name)
    if field is None:
        return values

    def parse(text: Any) -> Any:
        if not isinstance(text, str):
            return np.nan
        try:
            return field.parse(text)
        except ConfigError:
            return text

    return values.map(parse)


def n_params_of(sizes_text: str) -> int:
    """Weights and biases of an MLP with the logged ``sizes`` (``"[784, 30, 10]"``)."""
    return count_params(ast.literal_eval(sizes_text))


def n_params_of_run(sizes_text: Any, layers_text: Any) -> Any:
    """The trained values of a logged run's network: of its ``layers`` param when it is a
    network of layers (counted from the layers' shapes; its ``sizes`` are then not its
    network), else of the MLP of its ``sizes``; ``pd.NA`` when neither can be read."""
    if isinstance(layers_text, str) and layers_text:
        try:
            return layers_param_count(layers_text)
        except ValueError:  # a value this version cannot read (ConfigError, LayersError)
            return pd.NA
    return n_params_of(sizes_text) if isinstance(sizes_text, str) else pd.NA


def trials_frame(runs: pd.DataFrame, search: list[SearchDimension]) -> pd.DataFrame:
    """One row per trial run (see the module docstring) from ``mlflow.search_runs`` output."""
    by_name = {dimension.name: dimension for dimension in search}
    columns = ["trial", "run_id", "state", *by_name, *CURVE_METRICS]
    columns += ["epochs_run", "epochs", "wall_seconds", "n_params", "error", "raw_inputs"]
    columns += ["dataset"]
    if runs.empty:
        return pd.DataFrame(columns=columns)

    def column(name: str, default: Any = np.nan) -> pd.Series:
        return runs[name] if name in runs.columns else pd.Series(default, index=runs.index)

    frame = pd.DataFrame(
        {
            "trial": pd.to_numeric(column(f"tags.{TAG_TRIAL}")).astype(int),
            "run_id": runs["run_id"],
            "state": column(f"tags.{TAG_STATE}", "RUNNING").fillna("RUNNING"),
        }
    )
    for name in by_name:
        frame[name] = _typed(column(f"params.{name}", None), name)
    for metric in CURVE_METRICS:
        frame[metric] = pd.to_numeric(column(f"metrics.{metric}"), errors="coerce")
    frame["epochs"] = pd.to_numeric(column("params.epochs"), errors="coerce").astype("Int64")
    frame["wall_seconds"] = pd.to_numeric(column("metrics.wall_seconds"), errors="coerce")
    frame["n_params"] = pd.Series(
        [
            n_params_of_run(sizes, layers)
            for sizes, layers in zip(column("params.sizes", None), column("params.layers", None))
        ],
        index=runs.index,
    )
    frame["error"] = column(f"tags.{TAG_ERROR}", "").fillna("")
    # The preprocessing the trial trained with: its test evaluation must use the same.
    raw = _typed(column("params.raw_inputs", None), "raw_inputs")
    frame["raw_inputs"] = raw.map(lambda value: value is True)
    # As logged, not through the field table: a name a later version added stays as it is, for
    # the report to say it does not know it.
    frame["dataset"] = column("params.dataset", None).map(
        lambda text: text if isinstance(text, str) and text else DEFAULT_DATASET
    )
    frame["epochs_run"] = 0
    return frame[[c for c in columns if c in frame.columns]]


def curves_frame(histories: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics (long format, see the module docstring) from tracking's histories."""
    columns = ["run_id", "trial", "state", "epoch", *CURVE_METRICS]
    if histories.empty:
        return pd.DataFrame(columns=columns)
    wide = histories.pivot_table(index=["run_id", "step"], columns="key", values="value")
    wide = wide.reset_index().rename(columns={"step": "epoch"})
    wide["epoch"] = wide["epoch"].astype(int) + 1  # MLflow's steps count from 0, epochs from 1
    for metric in CURVE_METRICS:
        if metric not in wide.columns:
            wide[metric] = np.nan
    wide = wide.merge(trials[["run_id", "trial", "state"]], on="run_id")
    return wide[columns].sort_values(["trial", "run_id", "epoch"], ignore_index=True)


def load_study_results(name: str | None, tracking_uri: str | None = None) -> StudyResults:
    """Reads a study (the most recent one if ``name`` is None) from the tracking store.

    Trials still RUNNING are left out and listed in ``skipped_running``. Raises
    ``TrackingError`` (naming the studies that exist) for an unknown study.
    """
    record = tracking.find_study(name, tracking_uri)
    parent, runs = tracking.study_runs(record, tracking_uri)
    row = parent.iloc[0]
    parent_params = _prefixed(row, "params.")
    parent_metrics = {k: float(v) for k, v in _prefixed(row, "metrics.").items()}
    parent_tags = _prefixed(row, "tags.")
    search = search_dimensions(tracking.search_space(record, tracking_uri))

    trials = trials_frame(runs, search)
    running = trials["state"] == "RUNNING"
    skipped = sorted(int(number) for number in trials.loc[running, "trial"])
    trials = trials[~running].sort_values(["trial", "run_id"], ignore_index=True)
    counts = trials["trial"].value_counts()
    repeated = sorted(int(number) for number in counts[counts > 1].index)

    histories = tracking.metric_histories(list(trials["run_id"]), list(CURVE_METRICS), tracking_uri)
    curves = curves_frame(histories, trials)
    epochs_run = curves.groupby("run_id")["epoch"].max()
    trials["epochs_run"] = trials["run_id"].map(epochs_run).fillna(0).astype(int)
    return StudyResults(
        record=record,
        objective=parent_params.get("objective", "val/accuracy"),
        direction=parent_params.get("direction", "maximize"),
        search=search,
        trials=trials,
        curves=curves,
        parent_params=parent_params,
        parent_metrics=parent_metrics,
        parent_tags=parent_tags,
        skipped_running=skipped,
        repeated_trials=repeated,
    )


def _prefixed(row: pd.Series, prefix: str) -> dict[str, Any]:
    return {
        key.removeprefix(prefix): value
        for key, value in row.items()
        if isinstance(key, str) and key.startswith(prefix) and not _missing(value)
    }


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
