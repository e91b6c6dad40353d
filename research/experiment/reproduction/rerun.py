"""Rerun: train a logged run again from its params and seed, and compare it epoch by epoch.

A run (a study's trial, a ``train`` run or a ``reproduce`` row) logged every field of its
:class:`~research.experiment.config.fields.TrainConfig` as an MLflow param; :func:`rerun` reads
them back through the field table, trains on the same rows with the same BLAS threads, and
compares ``train/loss``, ``val/loss`` and ``val/accuracy`` at every epoch for exact equality.

The same rows are the first ``n_train_rows`` of the official training set: 60,000 images, the
last 10,000 of them the validation split. A trial or a ``train`` run validated on those 10,000,
so it trained on at most the 50,000 before them. A ``reproduce`` row (tag ``research.role`` =
``row``) trained on what :func:`~.reproduce.splits` gave it: with the validation split if it
logged validation metrics (``--holdout``), else on up to all 60,000, its validation metrics NaN
by design (NaN on both sides is no mismatch; nor is a metric the run never logged). A run that
stopped early (a trial its pruner stopped, a row its time budget stopped) is retrained for the
epochs it ran, on the schedule of all the epochs it planned; a run that diverged must diverge
again at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from research.data import N_TRAIN, N_VALIDATION
from research.experiment.config.fields import FIELDS, ConfigError, Field, TrainConfig
from research.experiment.config.layers_field import LAYER_FILES, changed_layer_files
from research.experiment.config.resources import check_memory
from research.experiment.reproduction.reproduce import splits
from research.experiment.tracking.results import LoggedRun, check_store_exists, read_run
from research.experiment.tracking.runs import TAG_ROLE
from research.experiment.tracking.stores import resolve_tracking_uri
from research.experiment.training.train import DivergenceError, EpochMetrics, train

METRICS = ("train/loss", "val/loss", "val/accuracy")
VALIDATION_METRICS = ("val/loss", "val/accuracy")  # NaN in a run without a validation split
#: What a ``reproduce`` row logs at its end: the epochs it trained (fewer than its ``epochs``
#: when its time budget stopped it).
EPOCHS_TRAINED = "epochs_trained"
N_OFFICIAL = N_TRAIN + N_VALIDATION  # the official training set: train, then validation


def _rows_field(limit: int, why: str) -> Field:
    return Field(
        "n_train_rows", int, None, "the training rows the run used", ge=1, le=limit,
        allowed_text=f"an integer from 1 to {limit} ({why})",
    )  # fmt: skip


#: The params a run logs beside the training fields that a rerun reads, checked as fields are.
RUN_FIELDS = {
    "n_train_rows": _rows_field(
        N_TRAIN,
        f"a run with a validation split trains on at most the {N_TRAIN:,} training images "
        "before it",
    ),
    "blas_threads": Field(
        "blas_threads", int, None, "the BLAS threads the run used", ge=1, le=4096
    ),
}
#: ``n_train_rows`` of a ``reproduce`` row without a validation split.
ROW_TRAIN_ROWS = _rows_field(
    N_OFFICIAL,
    f"a row without a validation split trains on at most the {N_OFFICIAL:,} training images",
)


class RerunError(Exception):
    """The run cannot be rerun (it is not a training run); the message says why."""


class _Stop(Exception):
    """Raised from the epoch callback once the rerun has trained the epochs the run ran."""


@dataclass
class Rerun:
    """A logged run and its rerun, side by side."""

    logged: LoggedRun
    config: TrainConfig
    n_rows: int
    #: Whether it trains with the validation split (a reproduce row may have had none).
    validation: bool
    #: The epochs it trains: ``config.epochs``, or fewer when the run stopped early.
    epochs: int
    history: list[EpochMetrics] = field(default_factory=list)
    error: str | None = None  # the rerun's divergence, if any

    def rows(self) -> list[tuple[int, list[tuple[float | None, float, bool]]]]:
        """Per rerun epoch: (epoch, [(logged value or None, rerun value, identical)] per metric).

        NaN on both sides is identical (a row without a validation split logs NaN validation
        metrics); a metric the run never logged is shown as None and not compared."""
        table = []
        for metrics in self.history:
            new = metrics.as_metrics()
            cells = []
            for key in METRICS:
                old = dict(self.logged.histories[key]).get(metrics.epoch)
                if old is None:
                    same = not self.logged.histories[key]
                else:
                    same = old == new[key] or (math.isnan(old) and math.isnan(new[key]))
                cells.append((old, new[key], same))
            table.append((metrics.epoch, cells))
        return table

    @property
    def uncompared(self) -> dict[str, str]:
        """The metrics that had no value to compare, and why: ``not logged``, or ``NaN, no
        validation split`` (NaN on both sides at every epoch, by design). Empty without a
        rerun epoch (a run that diverged in its first)."""
        why: dict[str, str] = {}
        if not self.history:
            return why
        for key in METRICS:
            logged = [value for _, value in self.logged.histories[key]]
            rerun = [metrics.as_metrics()[key] for metrics in self.history]
            if not logged:
                why[key] = "not logged"
            elif all(math.isnan(value) for value in logged + rerun):
                why[key] = "NaN" + ("" if self.validation else ", no validation split")
        return why

    @property
    def logged_epochs(self) -> int:
        return max(len(self.logged.histories[key]) for key in METRICS)

    @property
    def mismatches(self) -> int:
        """Values that differ, plus one for a different epoch count, one for another ending."""
        differ = sum(not same for _, cells in self.rows() for _, _, same in cells)
        return (
            differ
            + (self.logged_epochs != len(self.history))
            + (self.error != self.logged.divergence)
        )


def kernels_note(logged: str | None, current: str) -> str | None:
    """What ``rerun`` says when the run's BLAS kernels may differ from this process's.

    The kernels order the sums of every matrix product, so other kernels give other last bits.
    """
    from research.engine.blas_kernels import UNKNOWN, VARIABLE

    if logged is None:
        return (
            "note: the run did not record its OpenBLAS kernels (it was logged before runs did); "
            f"this process runs {current}. If the run was trained with other kernels, expect "
            "differences in the last bits: on AMD Zen 4, runs logged before the project chose "
            f"the Zen kernels used SkylakeX ({VARIABLE}=SkylakeX python -m research rerun ...)"
        )
    if logged in (current, UNKNOWN) or current == UNKNOWN:
        return None
    return (
        f"note: the run used OpenBLAS's {logged} kernels and this process runs {current}: the "
        "sums round differently, so expect differences in the last bits; on a CPU that "
        f"supports them, {VARIABLE}={logged} python -m research rerun ... uses the run's kernels"
    )


def rerun(
    run_id: str,
    tracking_uri: str | None = None,
    source_dir: str | None = None,
    data_dir: str | None = None,
    say: Callable[[str], None] = print,
) -> Rerun:
    """Retrains run ``run_id`` and returns both sides.

    Raises:
        TrackingError: no such run, or the store cannot be read.
        RerunError: the run is not a training run, a param it logged is not a value the field
            table allows (checked as study files are; a row's ``epochs_trained`` too), or it
            does not fit in memory here.
        DataError: the data cannot be loaded.
    """
    from threadpoolctl import threadpool_limits

    from research.data import load_named
    from research.engine.blas_kernels import loaded_kernels

    check_store_exists(resolve_tracking_uri(tracking_uri))
    logged = read_run(run_id, (*METRICS, EPOCHS_TRAINED), tracking_uri)
    if not any(name in logged.params for name in FIELDS):  # a study's parent, a bench run
        raise RerunError(f"run {run_id} lacks the params {', '.join(FIELDS)}; cannot rerun it")
    changed = changed_layer_files(logged.params.get(LAYER_FILES, ""))
    if changed:
        raise RerunError(
            f"run {run_id} cannot be rerun: its user layer file {'; '.join(changed)}; restore "
            f"the run's copy (its artifacts {LAYER_FILES}/) to rerun it"
        )
    result, missing, threads, stopped = _read_back(logged)
    config, n_rows = result.config, result.n_rows
    try:
        check_memory(config, n_rows)
    except ConfigError as error:
        raise RerunError(f"run {run_id} cannot be rerun here: {error}") from None
    data = splits(
        load_named(config.dataset, source_dir, data_dir, raw=config.raw_inputs),
        holdout=result.validation,
        subset=n_rows,
    )
    split = "" if result.validation else ", no validation split"
    say(f"rerunning {run_id} ({n_rows} training rows{split}, {result.epochs} epochs)")
    if stopped:
        say(
            f"the run stopped after {result.epochs} of its {config.epochs} epochs ({stopped}): "
            "the rerun stops there too, on the schedule of all of them"
        )
    if missing:
        defaults = {name: FIELDS[name].default for name in missing}
        shown = [f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in defaults.items()]
        say(
            f"note: the run did not log {', '.join(missing)} (it predates them): using their "
            f"defaults {', '.join(shown)}"
        )
    note = kernels_note(logged.params.get("blas_kernels"), loaded_kernels())
    if note:
        say(note)

    def epoch_done(metrics: EpochMetrics, _: object) -> None:
        result.history.append(metrics)
        if len(result.history) == result.epochs < config.epochs:
            raise _Stop

    with threadpool_limits(limits=threads):
        try:
            train(config, data.x_train, data.labels_train, data.x_val, data.labels_val, epoch_done)
        except _Stop:
            pass
        except DivergenceError as diverged:
            result.error = str(diverged)
    return result


def _read_back(logged: LoggedRun) -> tuple[Rerun, list[str], int | None, str]:
    """The rerun of ``logged`` before it trains, from the params read back through the field
    table (each checked as the study files' values are: a hand-edited or corrupted store gives
    one line naming the run and the param); the fields it did not log, its BLAS threads (None:
    no limit), and why it stopped early ("" if it did not)."""
    params = logged.params
    row = logged.tags.get(TAG_ROLE) == "row"
    # A row trained with the validation split if it logged validation metrics (a row that
    # logged no epoch has none to compare: up to all 60,000 rows are then allowed).
    validation = not row or any(
        not math.isnan(value) for key in VALIDATION_METRICS for _, value in logged.histories[key]
    )
    try:
        config, missing = TrainConfig.from_params(params)
        rows_field = RUN_FIELDS["n_train_rows"] if validation else ROW_TRAIN_ROWS
        n_rows = rows_field.parse(params.get("n_train_rows", str(N_TRAIN)))
        threads = (
            RUN_FIELDS["blas_threads"].parse(params["blas_threads"])
            if "blas_threads" in params
            else None
        )
        if config.batch_size > n_rows:
            raise ConfigError(
                "batch_size",
                f"larger than the run's n_train_rows = {n_rows}",
                value=config.batch_size,
                allowed=f"at most {n_rows}",
            )
    except ValueError as error:  # ConfigError, or a combination TrainConfig does not allow
        raise RerunError(f"run {logged.run_id} cannot be rerun: its params give {error}") from None
    epochs, stopped = _epochs_run(logged, config, row)
    return Rerun(logged, config, n_rows, validation, epochs), missing, threads, stopped


def _epochs_run(logged: LoggedRun, config: TrainConfig, row: bool) -> tuple[int, str]:
    """The epochs to retrain and why they are fewer than ``config.epochs`` ("" if they are
    not): a pruned trial ran the epochs it logged, a complete row its ``epochs_trained`` (or,
    without it, the epochs it logged)."""
    ran = max(len(logged.histories[key]) for key in METRICS)
    if logged.state == "PRUNED" and 0 < ran < config.epochs:
        return ran, "pruned"
    trained = logged.histories.get(EPOCHS_TRAINED)
    if row and logged.state == "COMPLETE" and trained:
        value = trained[-1][1]
        if not (math.isfinite(value) and value == int(value) and 1 <= value <= config.epochs):
            raise RerunError(
                f"run {logged.run_id} cannot be rerun: its metric {EPOCHS_TRAINED} = {value!r} is "
                f"not an integer from 1 to its epochs = {config.epochs}"
            )
        if value < config.epochs:
            return int(value), "its time budget"
    elif row and logged.state == "COMPLETE" and 0 < ran < config.epochs:
        return ran, "its time budget"
    return config.epochs, ""
