"""A run's network as an MLflow model that serves predictions: logging, registering, loading.

:func:`log_model` logs the network of a run (every ``train`` run; a study's parent run for its
refit best) as an MLflow model: MLflow's *models from code*, the file :mod:`.mlp_pyfunc` as the
model and the network's ``weights.npz`` as its ``weights`` artifact, read back with numpy and
predicted with the project's engine. Nothing is pickled. The model has a signature and an input
example, and pip requirements passed explicitly (MLflow infers none: no environment inference, no
extra load of the model to capture imports). :func:`register_champion` registers a study's refit
best under the study's name and points the alias ``champion`` at it; :func:`load_model` loads a
model by URI (``models:/<study>@champion``, ``models:/<model id>``). docs/models.md tells how to
serve and call one.

The contract, the same for every run (whatever its ``raw_inputs``):

- input: a float32 batch (B, 784), the images' pixels scaled to [0, 1] (pixel / 255), one image
  per row in the IDX files' row-major order; a ``raw_inputs`` network multiplies them by 255
  itself (``input_scale`` in the model config);
- output: ``class`` (B,) int64, the engine's ``predict``, and ``probabilities`` (B, 10) in the
  network's dtype, the engine's ``forward`` (the output layer's activations).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from research.experiment.tracking.stores import (
    TrackingError,
    mlflow_client,
    redact,
    resolve_tracking_uri,
    sqlalchemy_url,
    store_writes,
)

if TYPE_CHECKING:
    from research.engine.mlp import MLPSpec, Params
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
    "Alias 'champion': the latest refit. Inputs: float32 (B, 784) pixels scaled to [0, 1]; "
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


def pip_requirements() -> list[str]:
    """What the model imports besides the project (``research``, not on PyPI: serve it with
    ``--env-manager local`` from the project's environment), pinned to this environment."""
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_model(
    run: OpenRun,
    params: Params,
    config: TrainConfig,
    example_images: np.ndarray,
    step: int = 0,
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
    Raises:
        TrackingError: the store cannot be written (it names the store and the cause).
    """
    pyfunc = _import_pyfunc()
    import mlflow
    from mlflow.models import Model

    from research.data import dataset_info, to_inputs
    from research.experiment.tracking.weights import save_weights

    spec = config.spec()
    example = to_inputs(np.asarray(example_images[:EXAMPLE_ROWS]), raw=False)
    info = dataset_info(config.dataset)
    metadata = {
        "research.inputs": "float32 (B, 784): pixels scaled to [0, 1] (pixel / 255)",
        "research.outputs": "class (B,) int64; probabilities (B, 10): the output layer",
        "research.dataset": config.dataset,
        "research.class_names": list(info.class_names),
        "research.raw_inputs": bool(config.raw_inputs),
        "research.sizes": list(spec.sizes),
        "research.output": spec.output,
    }
    # MLflow announces each step at INFO ("Validating input example against model signature").
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    logged = None
    with store_writes(run.tracking_uri), tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(sqlalchemy_url(run.tracking_uri))  # Model.log's store
        # Created here so that the model lands in the run's experiment: Model.log would put it in
        # MLflow's active (else default) experiment when no run is active, as here.
        logged = run.client.create_logged_model(
            run.experiment_id,
            name=MODEL_NAME,
            source_run_id=run.run_id,
            params={**config.as_texts(), "sizes": str(list(spec.sizes))},
            model_type="mlp",
        )
        try:
            weights = Path(folder) / "weights.npz"
            save_weights(weights, params, spec)
            Model.log(
                None,  # artifact_path (deprecated): the model's name, below
                pyfunc,
                name=MODEL_NAME,
                run_id=run.run_id,
                model_id=logged.model_id,
                step=step,
                python_model=str(MODEL_CODE),
                artifacts={"weights": str(weights)},
                model_config={"input_scale": 255.0 if config.raw_inputs else 1.0},
                signature=model_signature(spec, params[0]["W"].dtype),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata=metadata,
            )
        except BaseException:
            run.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
    return f"models:/{logged.model_id}"


def register_champion(
    run: OpenRun, name: str, model_uri: str, tags: dict[str, Any] | None = None
) -> str:
    """Registers ``model_uri`` (logged on ``run``) as a new version of the registered model
    ``name`` (created if needed) and points its alias :data:`CHAMPION` at it; returns the
    version. TrackingError if the store cannot be written."""
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
            tags={key: str(value) for key, value in (tags or {}).items()},
            model_id=model_uri.removeprefix("models:/"),
            await_creation_for=0,
        )
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version)


def log_champion(
    run: OpenRun,
    study_name: str,
    params: Params,
    config: TrainConfig,
    example_images: np.ndarray,
    step: int,
    tags: dict[str, Any],
) -> str:
    """A study's refit best: :func:`log_model` on its parent ``run``, then
    :func:`register_champion` under the study's name; returns ``models:/<study>@champion
    (version N)`` for the summary."""
    uri = log_model(run, params, config, example_images, step)
    version = register_champion(run, study_name, uri, {"research.study": study_name, **tags})
    return f"models:/{study_name}@{CHAMPION} (version {version})"


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
