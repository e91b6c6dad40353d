"""A run's network as an MLflow model that serves predictions: logging, registering, loading.

:func:`log_model` logs the network of a run (every ``train`` run; a study's parent run for its
refit best) as an MLflow model: MLflow's *models from code*, the file :mod:`.mlp_pyfunc` as the
model and the network's ``weights.npz`` as its ``weights`` artifact, read back with numpy and
predicted with the project's engine. Nothing is pickled. The model has a signature and an input
example, and pip requirements passed explicitly (MLflow infers none: no environment inference, no
extra load of the model to capture imports). :func:`publish_champion` registers a study's refit
best under the study's name and points the alias ``champion`` at it, only if it is the refit of
the study's best trial (checked under the store's lock when the alias moves);
:func:`.pending_models.fail_abandoned_models` closes models a killed process left PENDING;
:func:`load_model` loads a model by URI (``models:/<study>@champion``, ``models:/<model id>``).
docs/models.md tells how to serve and call one.

The contract, the same for every run (whatever its ``raw_inputs``):

- input: a float32 batch (B, 784), the images' pixels scaled to [0, 1] (pixel / 255), one image
  per row in the IDX files' row-major order; a ``raw_inputs`` network multiplies them by 255
  itself (``input_scale`` in the model config);
- output: ``class`` (B,) int64, the engine's ``predict``, and ``probabilities`` (B, 10) in the
  network's dtype, the engine's ``forward`` (the output layer's activations).

A network of layers (``layers`` set) is logged the same way, its weights file holding its layers
as written and its running statistics (:mod:`.weights`), and takes (B, 784) or images
(B, 1, 28, 28) alike: its signature names the outputs only, as MLflow's tensor schema fixes the
inputs' rank (the model checks their shape itself, with the same one-line refusals).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from research.experiment.tracking.pending_models import TAG_WRITER
from research.experiment.tracking.processes import process_identity
from research.experiment.tracking.stores import (
    TrackingError,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    sqlalchemy_url,
    store_lock,
    store_writes,
)

if TYPE_CHECKING:
    from research.engine.mlp import MLPSpec, Params
    from research.engine.network import NetParams, NetState, Network
    from research.experiment.config.fields import TrainConfig

#: The name of the LoggedModel on its run.
MODEL_NAME = "model"
#: The alias of a study's registered model that points at its current refit best.
CHAMPION = "champion"
#: The models-from-code file MLflow copies into every model and runs to load it.
MODEL_CODE = Path(__file__).with_name("mlp_pyfunc.py")
#: Rows of the input example stored with the model (and posted by its serving example).
EXAMPLE_ROWS = 2
#: A registered model's description, set when this project creates it.
REGISTERED_DESCRIPTION = (
    "The refit best of the study {name!r}: its best configuration retrained on train+validation. "
    "Alias 'champion': the refit of the study's best trial. "
    "Inputs: float32 (B, 784) pixels scaled to [0, 1]; "
    "outputs: class (B,) and probabilities (B, 10). See docs/models.md."
)


class OpenRun(Protocol):
    """The open run a model is logged to (a :class:`~.runs.TrackedRun`, named by its fields
    here, as :mod:`.runs` itself logs models through this module)."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str


def _import_pyfunc() -> Any:
    """``mlflow.pyfunc``, imported without the UserWarning MLflow's own agent types raise as it
    loads (``Any type hint is inferred as AnyType``: MLflow hides it with a global switch that a
    ``-W error`` run, as the tests are, turns into an exception)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*Any type hint is inferred as AnyType", category=UserWarning
        )
        import mlflow.models
        import mlflow.pyfunc

    return mlflow.pyfunc


def model_signature(spec: MLPSpec, dtype: Any) -> Any:
    """The MLflow signature: a float32 (B, n_in) input tensor; ``class`` (B,) int64 and
    ``probabilities`` (B, n_out) of ``dtype`` (the network's) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.sizes[0]))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.int64), (-1,), "class"),
                TensorSpec(np.dtype(dtype), (-1, spec.sizes[-1]), "probabilities"),
            ]
        ),
    )


def network_signature(network: Network, dtype: Any) -> Any:
    """A network of layers' MLflow signature: the outputs of :func:`model_signature`, no input
    schema (one tensor spec cannot take both (B, 784) and (B, 1, 28, 28))."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.int64), (-1,), "class"),
                TensorSpec(np.dtype(dtype), (-1, network.n_outputs), "probabilities"),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """What the model imports besides the project (``research``, not on PyPI: serve it with
    ``--env-manager local`` from the project's environment), pinned to this environment."""
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_model(
    run: OpenRun,
    params: Params | NetParams,
    config: TrainConfig,
    example_images: np.ndarray,
    step: int = 0,
    tags: dict[str, str] | None = None,
    state: NetState | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Logs the network ``params`` of ``config`` as the MLflow model of ``run``; returns its URI
    (``models:/<model id>``).

    Args:
        run: the run the model comes from.
        params: the trained network; config: its training fields (spec, dataset, raw_inputs),
            which become the model's params, as the run's.
        example_images: uint8 images (N, 784) of the dataset; the first :data:`EXAMPLE_ROWS`
            become the input example (scaled to [0, 1], as every input of the model).
        step: the run's step the model belongs to (its metrics at that step are linked to it).
        tags: the LoggedModel's tags (besides :data:`TAG_WRITER`, this process).
        state: a network of layers' running statistics (``TrainResult.state``).
        metrics: the model's own metrics, logged on ``run`` at ``step`` and linked to the model.
            None links what ``run`` logged at ``step`` (a train run's last epoch) instead. A
            study's parent run passes them: at its step it also logs the study's figures
            (best_value, a trial's validation figure), which are not the model's.
    Raises:
        TrackingError: the store cannot be written (it names the store and the cause).
    """
    pyfunc = _import_pyfunc()
    import mlflow
    from mlflow.models import Model

    from research.data import to_inputs
    from research.engine.stack_step import params_dtype
    from research.experiment.tracking.weights import save_weights

    spec, network = config.spec(), config.network()
    example = to_inputs(np.asarray(example_images[:EXAMPLE_ROWS]), raw=False)
    metadata, described = model_metadata(config, spec, network)
    # MLflow announces each step at INFO ("Validating input example against model signature").
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    with store_writes(run.tracking_uri), tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(sqlalchemy_url(run.tracking_uri))  # Model.log's store
        logged = _create_logged_model(run, config, described, network is not None, tags)
        try:
            weights = Path(folder) / "weights.npz"
            save_weights(weights, params, spec if network is None else network, state)
            Model.log(
                None,  # artifact_path (deprecated): the model's name, below
                pyfunc,
                name=MODEL_NAME,
                # (Model.log would link every metric the run has at `step`: see _link_run)
                run_id=run.run_id if metrics is None else None,
                model_id=logged.model_id,
                step=step,
                python_model=str(MODEL_CODE),
                artifacts={"weights": str(weights)},
                model_config={"input_scale": 255.0 if config.raw_inputs else 1.0},
                signature=model_signature(spec, params[0]["W"].dtype)
                if network is None
                else network_signature(network, params_dtype(params)),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata=metadata,
            )
            if metrics is not None:
                _link_run(run, logged.model_id, step, metrics)
        except BaseException:
            run.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
    return f"models:/{logged.model_id}"


def _create_logged_model(
    run: OpenRun, config: TrainConfig, described: dict[str, str], layers: bool, tags: Any
) -> Any:
    """The empty, PENDING LoggedModel of ``run`` that :func:`log_model` fills: created here so
    that it lands in the run's experiment (``Model.log`` would put it in MLflow's active, else
    default, experiment when no run is active, as here)."""
    return run.client.create_logged_model(
        run.experiment_id,
        name=MODEL_NAME,
        source_run_id=run.run_id,
        params={**config.as_texts(), **described},
        model_type="layers" if layers else "mlp",
        tags={**(tags or {}), TAG_WRITER: process_identity()},  # (pending_models.py)
    )


def _link_run(run: OpenRun, model_id: str, step: int, metrics: dict[str, float]) -> None:
    """Makes ``model_id`` an output of ``run`` at ``step``, with ``metrics`` as its own (what
    ``Model.log(run_id=...)`` does, but with these metrics instead of every metric the run has
    at that step; the MLmodel file then names no run, the LoggedModel its source run)."""
    from mlflow.entities import LoggedModelOutput, Metric

    run.client.log_outputs(run.run_id, [LoggedModelOutput(model_id, step=step)])
    now = int(time.time() * 1000)
    run.client.log_batch(
        run.run_id,
        metrics=[
            Metric(key, float(value), now, step, model_id=model_id)
            for key, value in metrics.items()
        ],
    )


def model_metadata(
    config: TrainConfig, spec: MLPSpec, network: Network | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The model's metadata (inputs, outputs, dataset and its class names, the network) and the
    LoggedModel's params naming the network (the MLP's sizes, or the layers as written)."""
    from research.data import dataset_info

    metadata = {
        "research.inputs": "float32 (B, 784): pixels scaled to [0, 1] (pixel / 255)",
        "research.outputs": "class (B,) int64; probabilities (B, 10): the output layer",
        "research.dataset": config.dataset,
        "research.class_names": list(dataset_info(config.dataset).class_names),
        "research.raw_inputs": bool(config.raw_inputs),
        "research.sizes": list(spec.sizes),
        "research.output": spec.output,
    }
    described = {"sizes": str(list(spec.sizes))}
    if network is not None:
        described = network_metadata(network, metadata)
    return metadata, described


def network_metadata(network: Network, metadata: dict[str, Any]) -> dict[str, str]:
    """A network of layers' model: its inputs and layers in ``metadata`` (in place of the MLP's
    sizes); returns the LoggedModel's param naming the network, as written."""
    metadata.pop("research.sizes")
    metadata["research.inputs"] = (
        "float32 (B, 784) or (B, 1, 28, 28): pixels scaled to [0, 1] (pixel / 255)"
    )
    metadata["research.layers"] = network.describe()
    metadata["research.in_shape"] = list(network.in_shape)
    metadata["research.output"] = network.output
    return {"network": network.describe()}


def load_model(model_uri: str, tracking_uri: str | None = None) -> Any:
    """The MLflow pyfunc model at ``model_uri`` (``models:/<study>@champion``, ``models:/<id>``,
    ``runs:/...``) in the store ``tracking_uri`` (default: as for every command). Its
    ``predict(x)`` takes float32 (B, 784) pixels in [0, 1] and returns ``{"class",
    "probabilities"}``."""
    pyfunc = _import_pyfunc()
    uri = resolve_tracking_uri(tracking_uri)
    mlflow_client(uri)  # (sets MLflow's tracking URI)
    try:
        return pyfunc.load_model(model_uri)
    except Exception as error:  # no such model or alias, an unreadable artifact: one line
        text = str(error).strip()
        raise TrackingError(
            f"cannot load the MLflow model {model_uri} from {redact(uri)}: "
            f"{text.splitlines()[0] if text else repr(error)}"
        ) from None


# --- a study's champion: the refit of its best trial -------------------------------------------

#: Tags of a champion's model version (and of a refit's LoggedModel): what it is the refit of.
TAG_REFIT_TRIAL = "refit_trial"
TAG_VALUE = "research.trial_value"  # the refit trial's objective value, exactly (repr)
TAG_OBJECTIVE = "research.objective"
TAG_DIRECTION = "research.direction"
TAG_SETTINGS = "research.refit_settings"  # a digest of the refit's training config and rows
#: How often a publisher re-reads the alias after moving it (a server has no lock: another
#: publisher may move it in between; each re-read repairs it toward the best refit).
ALIAS_ATTEMPTS = 5


@dataclass(frozen=True)
class Refit:
    """What a refit is the refit of: trial ``trial`` of objective ``value`` (to ``direction``),
    retrained with ``settings`` (:func:`refit_settings`: equal settings, equal weights)."""

    trial: int
    value: float
    direction: str
    objective: str
    settings: str

    def tags(self) -> dict[str, str]:
        return {
            TAG_REFIT_TRIAL: str(self.trial),
            TAG_VALUE: repr(float(self.value)),
            TAG_OBJECTIVE: self.objective,
            TAG_DIRECTION: self.direction,
            TAG_SETTINGS: self.settings,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Refit | None:
        """The refit a version's tags describe; None for a version registered before refits
        were tagged (or tags edited by hand)."""
        try:
            return cls(
                int(tags[TAG_REFIT_TRIAL]),
                float(tags[TAG_VALUE]),
                tags[TAG_DIRECTION],
                tags[TAG_OBJECTIVE],
                tags[TAG_SETTINGS],
            )
        except (KeyError, ValueError):
            return None

    def rank(self) -> float:
        """Larger is better, whichever the direction."""
        return self.value if self.direction == "maximize" else -self.value


def refit_settings(config: TrainConfig, rows: str) -> str:
    """A digest of what a refit trains: its training fields and its rows (``train[0:60000]``)."""
    text = json.dumps([config.as_texts(), rows], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Champion:
    """The version ``models:/<study>@champion`` points at; ``refit`` is None when it cannot be
    compared (no tags, or registered by another parent run: an earlier study of that name)."""

    version: str
    refit: Refit | None


def current_champion(run: OpenRun, name: str) -> Champion | None:
    """The champion of the study ``name`` whose parent run is ``run``; None if there is none."""
    from mlflow.exceptions import MlflowException

    with store_writes(run.tracking_uri):
        try:
            version = run.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as error:  # no such registered model, or no alias yet
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
    refit = Refit.from_tags(version.tags) if version.run_id == run.run_id else None
    return Champion(str(version.version), refit)


@dataclass(frozen=True)
class Publication:
    """What :func:`publish_champion` did: ``outcome`` is ``champion`` (``version`` is ours and
    the alias points at it), ``kept`` (the champion, ``version``, already is this very refit:
    nothing logged) or ``superseded`` (the trial is no longer the best: the model is logged on
    the run, ``model_uri``, but the alias is not moved; ``version`` is the champion, if any)."""

    outcome: str
    version: str | None
    model_uri: str | None = None


def publish_champion(
    run: OpenRun,
    name: str,
    refit: Refit,
    log: Callable[[dict[str, str], bool], str],
    still_best: Callable[[], bool],
    with_champion: Callable[[], None],
    tags: dict[str, Any],
) -> Publication:
    """Logs a study's refit (``log(model tags, champion)`` returns its ``models:/`` URI;
    ``champion`` says whether it is to become the champion), registers it
    under ``name`` and moves the alias :data:`CHAMPION` to it, only if it is the refit of the
    study's best trial and at least as good as the champion; ``with_champion()`` writes what
    goes with it on the parent run, before the alias moves (a store that fails in between leaves
    the alias on the old champion, and the next command refits again).

    All of it under :func:`~.stores.store_lock` (a file lock for SQLite, an advisory lock for
    PostgreSQL), so that the last command to finish cannot move the alias back: ``still_best()``
    asks the study right then. A tracking server has no lock: the alias is set, read back and
    repaired toward the best tagged refit (:func:`settle_alias`)."""
    with store_lock(run.tracking_uri):
        current = current_champion(run, name)
        if current is not None and current.refit == refit:
            return Publication("kept", current.version)
        theirs = current.refit if current is not None else None
        beaten = (
            theirs is not None
            and theirs.direction == refit.direction
            and theirs.rank() > refit.rank()
        )
        if not still_best() or beaten:  # (asked first: the study says which trial is best)
            uri = log(refit.tags(), False)
            return Publication("superseded", current.version if current else None, uri)
        uri = log(refit.tags(), True)
        with_champion()
        version = _register(run, name, uri, {"research.study": name, **tags, **refit.tags()})
        holder = settle_alias(run.client, name, run.run_id, version, run.tracking_uri)
    if holder != version:  # (a server, where another publisher's better refit came in between)
        return Publication("superseded", holder, uri)
    return Publication("champion", version, uri)


def _register(run: OpenRun, name: str, model_uri: str, tags: dict[str, Any]) -> str:
    """A new version of the registered model ``name`` (created if needed) for ``model_uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = run.client
    with store_writes(run.tracking_uri):
        # (the SQL registry looks the source's LoggedModel up in MLflow's global store)
        mlflow.set_tracking_uri(sqlalchemy_url(run.tracking_uri))
        try:
            description = REGISTERED_DESCRIPTION.format(name=name)
            client.create_registered_model(name, description=description)
        except MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise  # (another process may have created it since: that is fine)
        version = client.create_model_version(
            name,
            source=model_uri,
            run_id=run.run_id,
            tags={key: str(value) for key, value in tags.items()},
            model_id=model_uri.removeprefix("models:/"),
            await_creation_for=0,
        )
        _link_version(client, model_uri.removeprefix("models:/"), name, str(version.version))
    return str(version.version)


def _link_version(client: Any, model_id: str, name: str, version: str) -> None:
    """Names the registered version on the LoggedModel (its tag ``mlflow.modelVersions``), as
    ``mlflow.register_model`` does and ``create_model_version`` does not: the UI's model page
    reads it, and says "Not registered" (offering to register a duplicate) without it."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": version}
    if entry not in linked:
        client.set_logged_model_tags(
            model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])}
        )


def settle_alias(client: Any, name: str, run_id: str, ours: str, tracking_uri: str) -> str:
    """Points the alias at the best tagged refit of the study (``run_id``'s versions: best
    objective, then the latest version), ``ours`` included, and reads it back until it stays
    there; returns the version it points at. Under a lock this sets it once; on a server a
    publisher that moved it in between is repaired by whichever reads last."""
    from mlflow.exceptions import MlflowException

    holder = None
    with store_writes(tracking_uri):
        for _ in range(ALIAS_ATTEMPTS):
            found = client.search_model_versions(f"name = '{name}'")
            ranked = [
                ((refit.rank(), int(v.version)), str(v.version))
                for v in found
                if v.run_id == run_id and (refit := Refit.from_tags(v.tags)) is not None
            ]
            best = max(ranked)[1] if ranked else ours
            try:
                holder = str(client.get_model_version_by_alias(name, CHAMPION).version)
            except MlflowException:
                holder = None
            if holder == best:
                break
            client.set_registered_model_alias(name, CHAMPION, best)
    return holder or ours
