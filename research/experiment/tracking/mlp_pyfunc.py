"""The MLflow model of a trained network, as code (MLflow's *models from code*): no pickle.

MLflow copies this file into every logged model (``mlp_pyfunc.py`` beside ``MLmodel``) and runs
it, as a top-level module of its own, when the model is loaded: the last lines hand it the model
object (:func:`mlflow.models.set_model`). Imported as part of the package instead, it defines
:func:`mlp_model` and imports nothing heavy (``import research`` stays light).

The network is the model's ``weights`` artifact, the run's ``weights.npz``, read with numpy and
never unpickled (:func:`research.experiment.tracking.weights.load_weights`), and predictions are
the project's engine (:mod:`research.engine.mlp`): the model needs the ``research`` package
importable where it is loaded or served (``--env-manager local`` from the project's environment).

Inputs: a float32 batch (B, 784) of pixels scaled to [0, 1] (pixel / 255), whatever the run
trained on: a run with ``raw_inputs`` (the origin's 0..255 pixels) has ``input_scale`` 255 in its
model config and the model multiplies by it, in float32, which gives back the byte values the
network trained on exactly. Outputs: ``class``, (B,) the engine's ``predict``, and
``probabilities``, (B, 10) its ``forward`` in the weights' dtype (class probabilities for a
softmax output; per-class sigmoid scores, which need not sum to 1, for the origin's sigmoid
output). At most :data:`MAX_ROWS` rows per call. Logged by :mod:`.models`; see docs/models.md.

A network of layers (its weights file names its layers as written, and holds its running
statistics: :func:`research.experiment.tracking.weights.read_weights` rebuilds it) takes a batch
(B, 784) or images (B, 1, 28, 28), either reshaped to the network's input shape, and predicts in
evaluation mode (running statistics, no dropout) with :mod:`research.engine.stack_step`. Its
signature has no input schema (one tensor spec fixes the rank), so the model itself refuses
other shapes, and takes float64 pixels too (converted to float32, as the schema would).
"""

# (no ``from __future__ import annotations``: MLflow reads predict's type hint as an object)
from typing import Any

#: The most rows one ``predict`` call (one request to a served model) takes; more are refused
#: (HTTP 400 when served) before the model allocates anything the size of the batch. (MLflow's
#: scoring server has no request size limit: it parses the whole request before this check.)
MAX_ROWS = 10_000
#: One image as a network of layers' model takes it besides a row of pixels: (C, H, W).
IMAGE_SHAPE = (1, 28, 28)


def _check_rows(model_input: Any) -> None:
    """At most MAX_ROWS rows, checked before anything the size of the batch is made."""
    from mlflow.exceptions import MlflowException

    shape = getattr(model_input, "shape", None)  # an array or a frame, not copied
    rows = shape[0] if shape else len(model_input) if isinstance(model_input, list) else 1
    if rows > MAX_ROWS:
        raise MlflowException.invalid_parameter_value(
            f"{rows:,} rows in one request: the model takes at most "
            f"{MAX_ROWS:,} per request (each row needs memory for every layer's "
            "outputs); send them in batches"
        )


def _check_range(x: Any) -> None:
    """Finite pixels scaled to [0, 1]."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    finite = np.isfinite(x)
    if not finite.all():
        missing = int(np.isnan(x).sum())
        raise MlflowException.invalid_parameter_value(
            f"{missing} inputs are NaN (null or NaN in the request) and "
            f"{int((~finite).sum()) - missing} infinite: the model takes finite pixels scaled "
            "to [0, 1]"
        )
    if x.size and not (x.min() >= 0 and x.max() <= 1):
        raise MlflowException.invalid_parameter_value(
            f"inputs range from {x.min():g} to {x.max():g}: the model takes pixels "
            "scaled to [0, 1] (pixel / 255), whatever scale the network trained on"
        )


def mlp_model() -> Any:
    """A new MLflow ``PythonModel`` of this project's networks (its ``load_context`` reads the
    ``weights`` artifact and the model config's ``input_scale``)."""
    from pathlib import Path

    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModel

    from research.engine.mlp import forward, predict
    from research.experiment.tracking.weights import read_weights

    class MLPModel(PythonModel):
        """One network of this project: its ``weights`` artifact, predicted with the engine."""

        def load_context(self, context):
            self.saved = read_weights(Path(context.artifacts["weights"]))
            self.spec, self.params = self.saved.spec, self.saved.params
            config = context.model_config or {}
            self.input_scale = np.float32(config.get("input_scale", 1.0))

        # np.ndarray: a type hint MLflow derives no signature from and checks nothing against
        # (no hint is a UserWarning); the signature logged with the model is the contract.
        def predict(self, context, model_input: np.ndarray, params=None):
            """``{"class": (B,) int64, "probabilities": (B, 10)}`` for a (B, 784) batch of
            pixels in [0, 1]: the class is the engine's ``predict`` (argmax of the logits:
            saturated sigmoid outputs can tie where the logits do not), the probabilities its
            ``forward``."""
            _check_rows(model_input)
            x = np.asarray(model_input, dtype=np.float32)
            if self.saved.network is not None:
                return self._predict_network(x)
            n_inputs = self.spec.sizes[0]
            if x.ndim != 2 or x.shape[1] != n_inputs:
                raise MlflowException.invalid_parameter_value(
                    f"inputs of shape {x.shape}: the model takes a batch (B, {n_inputs}) of "
                    "pixels scaled to [0, 1], one image per row"
                )
            _check_range(x)
            if self.input_scale != 1:
                x = x * self.input_scale  # float32: k/255 * 255 gives back k exactly
            return {
                "class": predict(self.params, x, self.spec),
                "probabilities": forward(self.params, x, self.spec),
            }

        def _predict_network(self, x):
            """A network of layers: (B, 784) or (B, 1, 28, 28), reshaped to its input shape."""
            in_shape = self.saved.in_shape
            n_inputs = int(np.prod(in_shape))
            images = in_shape if len(in_shape) == 3 else IMAGE_SHAPE
            if int(np.prod(images)) != n_inputs:
                images = (n_inputs,)
            if x.ndim < 2 or x.shape[1:] not in ((n_inputs,), images):
                raise MlflowException.invalid_parameter_value(
                    f"inputs of shape {x.shape}: the model takes a batch (B, {n_inputs}) of "
                    f"pixels scaled to [0, 1], one image per row, or images (B, "
                    f"{', '.join(map(str, images))})"
                )
            _check_range(x)
            x = x.reshape(len(x), *in_shape)
            if self.input_scale != 1:
                x = x * self.input_scale  # float32: k/255 * 255 gives back k exactly
            classes, probabilities = self.saved.classes_and_outputs(x)
            return {"class": classes, "probabilities": probabilities}

    return MLPModel()


if not __package__:  # run by MLflow as the model's code (a module of its own, in no package)
    from mlflow.models import set_model

    set_model(mlp_model())
