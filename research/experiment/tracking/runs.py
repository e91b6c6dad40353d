"""Writing runs to MLflow: one run lifecycle for ``train``, trials, studies and ``reproduce``.

Every MLflow run the commands make (a ``train`` run, a study's trial, a study's parent, a
``reproduce`` row or its parent, a benchmark) is a :class:`TrackedRun`, opened by
:func:`start_run` (or a study's :class:`~.study_runs.StudyTracker`) and closed inside
:func:`run_lifecycle`, the one place that decides how a run ends:

- the block returns: the run's pending outputs are saved (:meth:`TrackedRun.save_on_success`:
  loss curves, weights, the MLflow model), then it ends :attr:`RunEnd.COMPLETE`;
- training diverged: :attr:`RunEnd.FAIL` with ``research.error`` and the epoch and step;
- Ctrl-C or SIGTERM: :attr:`RunEnd.KILLED` with the reason;
- anything else (a crash, a tracking-store error): :attr:`RunEnd.FAIL` with the reason;

and the exception goes on to the caller. A block may end its run itself (a pruned trial, a trial
whose Optuna record must be written first): the lifecycle then leaves it as it is.

A training run logs :meth:`TrackedRun.log_config` (the fields of its
:class:`~research.experiment.config.fields.TrainConfig` under their own names, plus ``sizes``,
``n_train_rows`` and ``blas_kernels``) and :meth:`TrackedRun.log_epoch` after every epoch. Its
ending sets the tag ``research.state`` (``COMPLETE``, ``PRUNED`` or ``FAIL``; ``RUNNING`` while
it trains), ``research.error`` for a failure (a divergence reads ``training diverged at epoch E,
step S: ...``), and its description (MLflow's ``mlflow.note.content``, the one place the UI shows
it), e.g. ``PRUNED at epoch 2 of 8: val/accuracy 96.13%``.

Every run also carries MLflow's own tags for who and what made it: ``mlflow.user``,
``mlflow.source.name`` (``python -m research train``), ``mlflow.source.type`` (``LOCAL``) and
``mlflow.source.git.commit`` (the commit, as ``research.git_commit`` has it with ``-dirty`` for a
tree with changes); and ``weights.npz`` comes with ``weights.txt``, its arrays and how to load it.
Studies (a parent run, one child run per trial): :mod:`.study_runs`. Reading runs back:
:mod:`.results`.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from research.data import N_TRAIN, N_VALIDATION
from research.experiment.config.layers_field import LAYER_FILES, format_layer_files, layer_files
from research.experiment.tracking.inputs import dataset_inputs, duplicate_key
from research.experiment.tracking.stores import (
    TrackingError,
    get_or_create_experiment,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    store_error,
    store_lock,
    store_writes,
    unreachable_error,
)
from research.experiment.training.train import DivergenceError, interruption, signals_deferred

if TYPE_CHECKING:
    import numpy as np

    from research.engine.mlp import MLPSpec, Params
    from research.engine.network import NetParams, NetState, Network
    from research.experiment.config.fields import TrainConfig
    from research.experiment.training.train import EpochMetrics

TAG_ROLE = "research.role"
TAG_STUDY = "research.study"
TAG_TRIAL = "research.trial_number"
TAG_STATE = "research.state"  # COMPLETE, PRUNED, FAIL (RUNNING while it trains)
TAG_SEED = "research.seed"
TAG_COMMIT = "research.git_commit"
TAG_ERROR = "research.error"  # why a run failed; a divergence starts "training diverged"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests children under it
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the run's description in the UI
TAG_USER = "mlflow.user"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# Written by `train` before runs had one divergence tag; still read by read_run.
LEGACY_DIVERGED_TAG = "diverged"
#: A study's search space as data, on its parent run (a list of SearchParam.as_dict()).
SEARCH_SPACE = "study/search_space.json"


class RunEnd(enum.Enum):
    """How a run ended: its ``research.state`` tag and MLflow's status, one value for both."""

    COMPLETE = ("COMPLETE", "FINISHED")
    PRUNED = ("PRUNED", "FINISHED")
    FAIL = ("FAIL", "FAILED")  # a failure: divergence, a crash, a store that cannot be written
    KILLED = ("FAIL", "KILLED")  # Ctrl-C or SIGTERM: not a result

    def __init__(self, state: str, status: str) -> None:
        self.state = state  # research.state: COMPLETE, PRUNED, FAIL
        self.status = status  # MLflow's: FINISHED, FAILED, KILLED

    @classmethod
    def of_state(cls, state: str) -> RunEnd:
        """The ending of a trial that Optuna recorded as ``state`` (COMPLETE, PRUNED, FAIL)."""
        return {"COMPLETE": cls.COMPLETE, "PRUNED": cls.PRUNED}.get(state, cls.FAIL)


@dataclass
class Outputs:
    """What a training run saves when it succeeds (:meth:`TrackedRun.save_on_success`)."""

    history: Sequence[EpochMetrics]
    title: str
    params: Params | NetParams | None = None
    #: The MLP's spec, or a network of layers (``TrainResult.model``) with its ``state``.
    spec: MLPSpec | Network | None = None
    #: Given with ``params``: the run's network is also logged as an MLflow model, with these
    #: test images as its input example (:func:`~.models.log_model`).
    config: TrainConfig | None = None
    model_images: np.ndarray | None = None
    #: A network of layers' running statistics (``TrainResult.state``); None for the MLP.
    state: NetState | None = None


@dataclass
class TrackedRun:
    """An open MLflow run: log its definition, epochs as they come, artifacts and its ending.

    Every run the commands make is one of these, a trial's, a study's parent or a paper's
    parent alike; :func:`run_lifecycle` ends it."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str
    #: The epochs it was to train (from :meth:`log_config`) and the last it logged: its
    #: description says how far it got.
    planned_epochs: int | None = None
    last_epoch: EpochMetrics | None = None
    #: How it ended, once it has (None while it is open).
    ended: RunEnd | None = None
    #: What :func:`run_lifecycle` saves before it ends the run COMPLETE.
    pending: Outputs | None = None
    #: The MLflow model logged with the outputs (``models:/m-...``), once it is.
    model_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id, params=[Param(key, str(value)) for key, value in params.items()]
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Logs metrics at ``step`` in one batch (one transaction).

        Synchronous on purpose: MLflow's asynchronous logging flushes its queue on a timer, which
        made a trial's bookkeeping slower (docs/tracking.md).
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id,
                metrics=[
                    Metric(key, float(value), timestamp, step) for key, value in metrics.items()
                ],
            )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copies ``path`` into the run's artifacts; TrackingError (naming where) if it cannot
        be written, e.g. a full disk or an unwritable store."""
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as error:
            # A tracking server gone (an MlflowException, or requests' ConnectionError, an
            # OSError) is no full disk: the line names the server and says it is unreachable.
            if (down := unreachable_error(self.tracking_uri, error)) is not None:
                raise down from None
            if not isinstance(error, OSError):
                raise
            where = self.client.get_run(self.run_id).info.artifact_uri
            raise TrackingError(
                f"cannot save the artifact {Path(path).name} to {where}"
                f"{'/' + artifact_path if artifact_path else ''}: "
                f"{error.strerror or error} ({error.filename or path}); free space or make it "
                "writable, or choose another store with --tracking-uri"
            ) from None

    def log_json(self, artifact: str, data: Any) -> None:
        """Writes ``data`` as JSON to the artifact path ``artifact`` (``folder/name.json``)."""
        import json

        folder, _, name = artifact.rpartition("/")
        with tempfile.TemporaryDirectory() as temporary:
            path = Path(temporary) / name
            path.write_text(json.dumps(data, indent=2) + "\n")
            self.log_artifact(path, folder or None)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
            )

    # --- a training run, the same for `train` and a study's trials ----------------------------

    def log_config(
        self, config: TrainConfig, n_train_rows: int, validation: bool = True, **extra: Any
    ) -> None:
        """What the run trains: every field under its own name, the layer ``sizes``,
        ``n_train_rows``, the OpenBLAS kernels and ``extra`` params (one transaction); and its
        data as MLflow dataset inputs: the first ``n_train_rows`` rows of the official training
        set, and the validation rows unless ``validation`` is False."""
        from mlflow.entities import Param, RunTag

        from research.engine.blas_kernels import loaded_kernels

        files = layer_files(config)
        params = {
            **config.as_texts(),  # the text TrainConfig.from_params reads back
            # the MLP's layer widths, or the network of layers as it was built
            **(
                {"network": config.describe_network()}
                if config.layers
                else {"sizes": list(config.spec().sizes)}
            ),
            # the files of the user layers it uses, with their SHA-256 (rerun checks them)
            **({LAYER_FILES: format_layer_files(files)} if files else {}),
            "n_train_rows": n_train_rows,
            "blas_kernels": loaded_kernels(),
            **extra,
        }
        self.planned_epochs = config.epochs
        tags = {TAG_SEED: config.seed, TAG_COMMIT: git_commit(), TAG_STATE: "RUNNING"}
        with store_writes(self.tracking_uri):
            self.client.log_batch(
                self.run_id,
                params=[Param(key, str(value)) for key, value in params.items()],
                tags=[RunTag(key, str(value)) for key, value in tags.items()],
            )
        for path in files:  # the user layers' code itself, beside the run
            self.log_artifact(Path(path), LAYER_FILES)
        splits = {"training": (0, n_train_rows)}
        if validation:
            splits["validation"] = (N_TRAIN, N_TRAIN + N_VALIDATION)
        self.log_data(
            config.dataset, {k: (f"train[{a}:{b}]", b - a) for k, (a, b) in splits.items()}
        )

    def log_data(self, dataset: str, splits: dict[str, tuple[str, int]]) -> None:
        """Logs the run's data as MLflow dataset inputs (the UI's Dataset column), one per
        ``context: (rows, number of rows)``, e.g. ``"training": ("train[0:50000]", 50000)``."""
        inputs = dataset_inputs(dataset, splits)
        # MLflow creates an experiment's dataset record check-then-insert: workers logging the
        # same data at once would race on its unique key. The store's lock orders them; a
        # server (no lock here) that lost the race has the record now, so a second try links it.
        with store_writes(self.tracking_uri), store_lock(self.tracking_uri):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as error:
                if not duplicate_key(error):
                    raise
                self.client.log_inputs(self.run_id, datasets=inputs)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """One epoch's metrics, at its step (the epoch, from 0)."""
        self.log_metrics(metrics.as_metrics(), step=metrics.epoch)
        self.last_epoch = metrics

    def save_on_success(self, outputs: Outputs) -> None:
        """What to save if the run succeeds: :func:`run_lifecycle` saves it (with
        :meth:`save_outputs`) when its block returns, then ends the run COMPLETE."""
        self.pending = outputs

    def save_outputs(
        self,
        history: Sequence[EpochMetrics],
        title: str,
        params: Params | NetParams | None = None,
        spec: MLPSpec | Network | None = None,
        state: NetState | None = None,
    ) -> None:
        """The artifacts of a training: ``loss_curves.png`` (if an epoch ended) and, given
        params, ``weights.npz`` with ``weights.txt`` (a network of layers: ``spec`` is its
        Network, saved with its running ``state``). TrackingError (naming the file) if they
        cannot be written. A caller that must act between saving and ending (a trial tells
        Optuna in between) calls this itself; others use :meth:`save_on_success`."""
        from research.experiment.training.figures import save_loss_curves

        try:
            with tempfile.TemporaryDirectory() as folder:
                if history:
                    curves = Path(folder) / "loss_curves.png"
                    self.log_artifact(save_loss_curves(history, curves, title=title))
        except OSError as error:
            raise TrackingError(
                f"cannot write {error.filename or 'a temporary file'}: {error.strerror or error}; "
                "free some space (or lift the limit), then run the same command again"
            ) from None
        if params is not None and spec is not None:
            self.log_weights(params, spec, state=state)

    def log_weights(
        self,
        params: Params | NetParams,
        spec: MLPSpec | Network,
        name: str = "weights.npz",
        state: NetState | None = None,
    ) -> None:
        """Logs the network as ``name`` (:func:`~.weights.save_weights`, with a network of
        layers' ``state``) and, beside it, the same name in ``.txt``: its arrays' shapes and how
        to load it. TrackingError (naming the file) if they cannot be written."""
        from research.experiment.tracking.weights import describe_weights, save_weights

        try:
            with tempfile.TemporaryDirectory() as folder:
                weights = Path(folder) / name
                save_weights(weights, params, spec, state)
                about = weights.with_suffix(".txt")
                about.write_text(describe_weights(params, spec, name, state))
                self.log_artifact(weights)
                self.log_artifact(about)
        except OSError as error:
            raise TrackingError(
                f"cannot write {error.filename or 'a temporary file'}: {error.strerror or error}; "
                "free some space (or lift the limit), then run the same command again"
            ) from None

    def end(self, end: RunEnd, error: str | None = None, **tags: Any) -> None:
        """Ends the run: ``research.state``, the ``research.error`` if any, its description
        (:meth:`describe`), other tags, then MLflow's status. Marked ended first: a store that
        fails here is not written to again by :func:`run_lifecycle`."""
        self.ended = end
        note = self.describe(end.state, error)
        tags = {
            TAG_STATE: end.state,
            **({TAG_ERROR: error} if error is not None else {}),
            **({TAG_NOTE: note} if note else {}),
            **tags,
        }
        self.set_tags(tags)
        with store_writes(self.tracking_uri):
            self.client.set_terminated(self.run_id, end.status)

    def describe(self, state: str, error: str | None = None) -> str | None:
        """How the run ended, in a line: ``COMPLETE: val/accuracy 97.91% after 8 epochs``,
        ``PRUNED at epoch 2 of 8: val/accuracy 96.13%``, ``FAIL: <reason>``; None for a run
        that logged no epoch and gives no reason (a study's parent)."""
        if error:
            return f"{state}: {error}"
        last = self.last_epoch
        if last is None:
            return None
        done = last.epoch + 1
        of = f" of {self.planned_epochs}" if self.planned_epochs not in (None, done) else ""
        accuracy = last.val_accuracy
        score = f"val/accuracy {100 * accuracy:.2f}%" if math.isfinite(accuracy) else ""
        if state == "PRUNED":
            return f"PRUNED at epoch {done}{of}" + (f": {score}" if score else "")
        return f"{state}{': ' + score if score else ''} after {done}{of} epochs"

    def diverged(self, error: DivergenceError) -> None:
        """Ends a run whose training diverged: FAIL, with the epoch and step."""
        end, reason, where = ending_of(error)
        self.end(end, reason, **where)

    @property
    def ui_hint(self) -> str:
        """Where a user finds this run (the store's password, if any, shown as ``***``)."""
        return (
            f"python -m research ui --tracking-uri {redact(self.tracking_uri)}  "
            f"(experiment id {self.experiment_id}, run id {self.run_id})"
        )


def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> TrackedRun:
    """Opens a new run in ``experiment`` (created if needed) and returns it."""
    uri = resolve_tracking_uri(tracking_uri)
    tags = tags or {}
    tags = {**source_tags(tags.get("command", "")), **tags}
    try:
        with store_lock(uri):
            client = mlflow_client(uri)
            experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    except TrackingError:
        raise
    except Exception as error:  # MLflow raises many kinds; the user needs the URI and the cause.
        raise store_error(uri, error) from None
    return TrackedRun(client, run.info.run_id, experiment_id, uri)


def ending_of(error: BaseException) -> tuple[RunEnd, str, dict[str, Any]]:
    """How an exception ends a run: its :class:`RunEnd`, the reason, and extra tags."""
    if isinstance(error, DivergenceError):
        where = {"research.diverged_epoch": error.epoch, "research.diverged_step": error.step}
        return RunEnd.FAIL, str(error), where
    if isinstance(error, KeyboardInterrupt):
        return RunEnd.KILLED, interruption(error), {}
    if isinstance(error, TrackingError):
        return RunEnd.FAIL, str(error), {}
    return RunEnd.FAIL, repr(error), {}


@contextlib.contextmanager
def run_lifecycle(run: TrackedRun | None) -> Iterator[TrackedRun | None]:
    """The one lifecycle of an MLflow run (see the module's docstring); None (no tracking)
    passes through. Closing is done with Ctrl-C and SIGTERM held back, so that it is not cut
    in half, and is best effort once the block failed: the block's exception is the one raised,
    not a second one from a store that is gone."""
    if run is None:
        yield None
        return
    try:
        yield run
        if run.ended is None and run.pending is not None:
            outputs, run.pending = run.pending, None
            _save(run, outputs)
    except BaseException as error:
        if run.ended is None:
            end, reason, tags = ending_of(error)
            with signals_deferred(), contextlib.suppress(Exception):
                run.end(end, reason, **tags)
        raise
    if run.ended is None:
        with signals_deferred():
            run.end(RunEnd.COMPLETE)


def _save(run: TrackedRun, outputs: Outputs) -> None:
    run.save_outputs(outputs.history, outputs.title, outputs.params, outputs.spec, outputs.state)
    if outputs.config is not None and outputs.params is not None:
        from research.experiment.tracking.models import log_model

        last = outputs.history[-1].epoch if outputs.history else 0
        images, state = outputs.model_images, outputs.state
        run.model_uri = log_model(run, outputs.params, outputs.config, images, last, state=state)


def log_benchmark(
    params: dict[str, str],
    metrics: dict[str, float],
    files: dict[str, str],
    experiment: str = "benchmarks",
    tracking_uri: str | None = None,
) -> TrackedRun:
    """Logs one benchmark run (``python -m research bench``) and closes it.

    Args:
        params: machine, library versions, thread counts, settings.
        metrics: flat ``name -> value`` (logged at step 0).
        files: artifact file name -> text content (e.g. the table and the JSON results).
    Returns:
        The finished run (for its id and UI hint).
    """
    run = start_run(
        experiment, run_name="bench", tags={"command": "bench"}, tracking_uri=tracking_uri
    )
    with run_lifecycle(run):
        run.log_params(params)
        run.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory() as folder:
            for name, text in files.items():
                path = Path(folder) / name
                path.write_text(text)
                run.log_artifact(path)
    return run


# --- who and what made a run --------------------------------------------------------------------


@functools.cache  # once per process: every trial run is tagged with it
def git_commit() -> str:
    """The commit of the code (with ``-dirty`` when the tree has changes), or ``unknown``."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own tags for who and what makes a run (the UI's User, Source and Version
    columns): the user, ``python -m research <command>`` as a local source, the git commit
    (without ``-dirty``: :data:`TAG_COMMIT` keeps that)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container), and no $USER
        user = "unknown"
    tags = {
        TAG_USER: user,
        TAG_SOURCE_NAME: f"python -m research {command}".strip(),
        TAG_SOURCE_TYPE: "LOCAL",
    }
    commit = git_commit().removesuffix("-dirty")
    if commit != "unknown":
        tags[TAG_GIT_COMMIT] = commit
    return tags
