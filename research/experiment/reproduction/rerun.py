"""Rerun: train a logged run again from its params and seed, and compare it epoch by epoch.

A run (a study's trial or a ``train`` run) logged every field of its
:class:`~research.experiment.config.fields.TrainConfig` as an MLflow param;
:func:`rerun` reads them back through the field table, trains on the same rows with the same
BLAS threads, and compares ``train/loss``, ``val/loss`` and ``val/accuracy`` at every epoch for
exact equality. A pruned
trial is retrained for the epochs it ran; a run that diverged must diverge again at the same
step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from research.data import N_TRAIN
from research.experiment.config.fields import FIELDS, ConfigError, Field, TrainConfig
from research.experiment.config.resources import check_memory
from research.experiment.tracking.results import LoggedRun, check_store_exists, read_run
from research.experiment.tracking.stores import resolve_tracking_uri
from research.experiment.training.train import DivergenceError, EpochMetrics, train

METRICS = ("train/loss", "val/loss", "val/accuracy")
#: The params a run logs beside the training fields that a rerun reads, checked as fields are.
RUN_FIELDS = {
    field.name: field
    for field in (
        Field("n_train_rows", int, None, "the training rows the run used", ge=1, le=N_TRAIN),
        Field("blas_threads", int, None, "the BLAS threads the run used", ge=1, le=4096),
    )
}


class RerunError(Exception):
    """The run cannot be rerun (it is not a training run); the message says why."""


@dataclass
class Rerun:
    """A logged run and its rerun, side by side."""

    logged: LoggedRun
    config: TrainConfig
    n_rows: int
    history: list[EpochMetrics] = field(default_factory=list)
    error: str | None = None  # the rerun's divergence, if any

    def rows(self) -> list[tuple[int, list[tuple[float | None, float, bool]]]]:
        """Per rerun epoch: (epoch, [(logged value or None, rerun value, identical)] per metric)."""
        table = []
        for metrics in self.history:
            new = metrics.as_metrics()
            cells = []
            for key in METRICS:
                old = dict(self.logged.histories[key]).get(metrics.epoch)
                cells.append((old, new[key], old is not None and old == new[key]))
            table.append((metrics.epoch, cells))
        return table

    @property
    def logged_epochs(self) -> int:
        return len(self.logged.histories["val/loss"])

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
            table allows (checked as study files are), or it does not fit in memory here.
        DataError: the data cannot be loaded.
    """
    from threadpoolctl import threadpool_limits

    from research.data import load_named
    from research.engine.blas_kernels import loaded_kernels

    check_store_exists(resolve_tracking_uri(tracking_uri))
    logged = read_run(run_id, METRICS, tracking_uri)
    params = logged.params
    if not any(name in params for name in FIELDS):  # a study's parent, a bench run
        raise RerunError(f"run {run_id} lacks the params {', '.join(FIELDS)}; cannot rerun it")
    # Every param read back is checked as the study files' values are: a hand-edited or
    # corrupted store gives one line naming the run and the param.
    try:
        config, missing = TrainConfig.from_params(params)
        n_rows = RUN_FIELDS["n_train_rows"].parse(params.get("n_train_rows", str(N_TRAIN)))
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
        raise RerunError(f"run {run_id} cannot be rerun: its params give {error}") from None
    if logged.state == "PRUNED" and logged.histories["val/loss"]:
        # the pruner stopped the trial: retrain only the epochs it ran
        config = dataclasses.replace(config, epochs=len(logged.histories["val/loss"]))
    try:
        check_memory(config, n_rows)
    except ConfigError as error:
        raise RerunError(f"run {run_id} cannot be rerun here: {error}") from None
    data = load_named(config.dataset, source_dir, data_dir, raw=config.raw_inputs)
    result = Rerun(logged, config, n_rows)
    say(f"rerunning {run_id} ({n_rows} training rows, {config.epochs} epochs)")
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
    with threadpool_limits(limits=threads):
        try:
            train(
                config,
                data.train.images[:n_rows],  # (uint8: floats per batch)
                data.train.labels[:n_rows],
                data.validation.x,
                data.validation.labels,
                on_epoch=lambda metrics, _: result.history.append(metrics),
            )
        except DivergenceError as diverged:
            result.error = str(diverged)
    return result
