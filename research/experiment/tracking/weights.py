"""The weights file format: a network's parameters and spec in one ``.npz``, never pickled.

Nothing here talks to MLflow: runs carry these files as artifacts (``weights.npz``,
``best_weights.npz``), each with a few lines of text beside it (:func:`describe_weights`), and
the report reads them back.

Two layouts, told apart by the text array that describes the network:

- the MLP (``spec``: its sizes, activation, output, loss, l2 as JSON): ``W0, b0, W1, b1, ...``,
  read by :func:`load_weights`, as every file written before layers existed;
- a network of layers (``network``: its layers as written, e.g. ``conv(20,5) relu maxpool(2)``,
  the classes, one example's input shape, output, loss and l2 as JSON): ``param.<i>.<key>`` for
  layer i's parameters (``param.0.W``, ``param.3.gamma``) and ``state.<i>.<key>`` for its running
  statistics (``state.3.mean``, batch norm's). The network is rebuilt from that text
  (``research.engine.layers.parse.build_network``), so the file alone gives the predictions.

:func:`read_weights` reads either into a :class:`SavedNetwork`, which predicts.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from research.engine.layers.base import describe, needs
from research.engine.layers.parse import build_network
from research.engine.mlp import MLPSpec, Params, forward, predict
from research.engine.mlp import _output as output_values
from research.engine.network import NetParams, NetState, Network, init_params, init_state
from research.engine.stack_step import evaluation_logits, outputs, params_dtype
from research.engine.stack_step import predict as predict_network

#: The text array of each layout: the MLP's spec, or a network of layers'.
SPEC, NETWORK = "spec", "network"


class WeightsError(ValueError):
    """A weights file is not one :func:`save_weights` wrote for a valid network."""


def save_weights(
    path: Path,
    params: Params | NetParams,
    spec: MLPSpec | Network,
    state: NetState | None = None,
) -> None:
    """Writes params as ``.npz`` (``W0, b0, W1, b1, ...`` and the spec as JSON text); for a
    network of layers (``spec`` a :class:`~research.engine.network.Network`), its parameters and
    running ``state`` (required when a layer keeps one) under ``param.*`` and ``state.*``.

    Written to a temporary file and renamed, so a crash never leaves a half-written file; its
    mode is that of any file the project writes (0644 under the usual umask 022).

    Raises:
        ValueError: params that are not the network's (the MLP's layout for a network of layers
            or the reverse), a stateful network without its state, or a network whose layers as
            written do not rebuild it (a layer of one's own, outside the ``layers`` syntax).
    """
    if isinstance(spec, Network):
        _write(path, network_arrays(params, spec, state))
        return
    _check_mlp_layout(params, spec)
    arrays = {}
    for i, layer in enumerate(params):
        arrays[f"W{i}"] = layer["W"]
        arrays[f"b{i}"] = layer["b"]
    arrays["spec"] = np.array(
        json.dumps(
            {
                "sizes": list(spec.sizes),
                "activation": spec.activation,
                "output": spec.output,
                "loss": spec.loss,
                "l2": spec.l2,
            }
        )
    )
    _write(path, arrays)


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as ``.npz`` at ``path``, through a temporary file renamed into place."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, handle = _new_file(path)
        with handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException as error:  # Ctrl-C included: no temporary file left behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk: name the file (zipfile's errors do not)
            raise OSError(error.errno, error.strerror or str(error), str(path)) from None
        raise


def _check_mlp_layout(params: Params | NetParams, spec: MLPSpec) -> None:
    """Refuses parameters that are not one ``{"W", "b"}`` per layer of ``spec`` (a network of
    layers' parameters, given with the MLP's spec by mistake)."""
    if len(params) != spec.n_layers or any(set(layer) != {"W", "b"} for layer in params):
        raise ValueError(
            f"these parameters are not those of the MLP {list(spec.sizes)} (a W and a b per "
            "layer): a network of layers is saved with its Network (config.network()) and state"
        )


def network_fields(network: Network) -> dict[str, Any]:
    """What rebuilds ``network`` (:func:`rebuild_network`): its hidden layers as written (each
    layer's ``describe()``), the classes of its output layer, one example's shape, output, loss
    and l2."""
    return {
        "layers": " ".join(describe(layer) for layer in network.layers[:-1]),
        "n_classes": network.n_outputs,
        "in_shape": list(network.in_shape),
        "output": network.output,
        "loss": network.loss,
        "l2": network.l2,
    }


def rebuild_network(fields: dict[str, Any]) -> Network:
    """The network :func:`network_fields` describes: ``build_network`` of its layers, which
    appends the dense output layer. Raises ValueError (a ``LayersError``) if it cannot be
    built."""
    in_shape = tuple(int(n) for n in fields["in_shape"])
    return build_network(
        str(fields["layers"]),
        n_classes=int(fields["n_classes"]),
        output=str(fields["output"]),
        loss=str(fields["loss"]),
        l2=float(fields["l2"]),
        image_shape=in_shape,
    )


def network_arrays(
    params: NetParams, network: Network, state: NetState | None
) -> dict[str, np.ndarray]:
    """The arrays of a network of layers' file: ``param.<i>.<key>``, ``state.<i>.<key>`` and
    ``network`` (:func:`network_fields` as JSON). Raises ValueError as :func:`save_weights`."""
    fields = network_fields(network)
    try:
        rebuilt = rebuild_network(fields)
    except ValueError:
        rebuilt = None
    if rebuilt is None or (rebuilt.describe(), rebuilt.shapes) != (
        network.describe(),
        network.shapes,
    ):
        raise ValueError(
            f"the network {network.describe()!r} cannot be saved: its layers as written "
            f"({fields['layers']!r}) do not rebuild it (a layer outside the layers syntax?)"
        )
    if len(params) != len(network.layers) or (state is not None and len(state) != len(params)):
        raise ValueError(
            f"{len(params)} parameter dicts (and {len(state or [])} state dicts) for the "
            f"{len(network.layers)} layers of {network.describe()!r}"
        )
    if state is None:
        if any("state" in needs(layer) for layer in network.layers):
            raise ValueError(
                f"{network.describe()!r} keeps running statistics: save them with it (state=)"
            )
        state = [{} for _ in network.layers]
    arrays = {
        f"param.{i}.{key}": np.asarray(v) for i, p in enumerate(params) for key, v in p.items()
    }
    arrays.update(
        {f"state.{i}.{key}": np.asarray(v) for i, s in enumerate(state) for key, v in s.items()}
    )
    arrays[NETWORK] = np.array(json.dumps(fields))
    return arrays


def _new_file(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file beside ``path``, open for writing, with the mode any file the
    project writes has (``0666`` less the umask, as ``open`` gives: 0644 usually). Not
    ``tempfile``'s private 0600, which MLflow's local artifact store would keep, alone among
    a run's artifacts."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(descriptor, "wb")
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def describe_weights(
    params: Params | NetParams,
    spec: MLPSpec | Network,
    name: str = "weights.npz",
    state: NetState | None = None,
) -> str:
    """The text that goes beside a weights file ``name``: the network, its arrays' shapes and
    dtype, and how to load them (with this project, or with numpy alone)."""
    if isinstance(spec, Network):
        return _describe_network(params, spec, name, state)
    sizes = " -> ".join(str(size) for size in spec.sizes)
    dtype = params[0]["W"].dtype if params else "float32"
    rows = []
    for i, layer in enumerate(params):
        rows.append(f"  W{i}  {tuple(layer['W'].shape)!s:<14}layer {i + 1}: inputs x outputs")
        rows.append(f"  b{i}  {tuple(layer['b'].shape)!s:<14}layer {i + 1}: biases")
    return "\n".join(
        [
            f"{name}: the network's parameters as numpy arrays ({dtype}); nothing is pickled.",
            "",
            f"network: {sizes} ({spec.activation} hidden layers, {spec.output} output, "
            f"{spec.loss} loss, l2 {spec.l2})",
            "arrays:",
            *rows,
            "  spec  the network above as JSON text",
            "",
            "load it with this project:",
            "  from research.experiment.tracking.weights import load_weights",
            f'  spec, params = load_weights("{name}")  # params[i]["W"], params[i]["b"]',
            "or with numpy alone:",
            f'  arrays = numpy.load("{name}", allow_pickle=False)  # arrays["W0"], ...',
            "",
        ]
    )


def _describe_network(
    params: NetParams, network: Network, name: str, state: NetState | None
) -> str:
    """:func:`describe_weights` of a network of layers."""
    rows = []
    for i, layer in enumerate(network.layers):
        for kind, arrays in (("param", params[i]), ("state", state[i] if state else {})):
            for key, value in arrays.items():
                what = describe(layer) + (" (running statistics)" if kind == "state" else "")
                shape = str(tuple(np.shape(value)))
                rows.append(f"  {f'{kind}.{i}.{key}':<16}{shape:<14}layer {i}: {what}")
    return "\n".join(
        [
            f"{name}: the network's parameters and running statistics as numpy arrays "
            f"({params_dtype(params)}); nothing is pickled.",
            "",
            f"network: {network.describe()} on inputs {network.in_shape} ({network.output} "
            f"output, {network.loss} loss, l2 {network.l2})",
            "arrays:",
            *rows,
            "  network         the network above as JSON text (its layers as written)",
            "",
            "load it with this project:",
            "  from research.experiment.tracking.weights import read_weights",
            f'  saved = read_weights("{name}")  # saved.network, saved.params, saved.state',
            "  saved.predict(x)  # x: (B, 784) or (B, *in_shape), as the network trained on",
            "or with numpy alone:",
            f'  arrays = numpy.load("{name}", allow_pickle=False)  # arrays["param.0.W"], ...',
            "",
        ]
    )


@dataclass(frozen=True)
class SavedNetwork:
    """A weights file's network: the MLP (``spec``) or a network of layers (``network``, with
    its running ``state``), and its parameters. Predicts as the engine does, in evaluation
    mode (running statistics, no dropout)."""

    params: Params | NetParams
    spec: MLPSpec | None = None
    network: Network | None = None
    state: NetState = field(default_factory=list)

    @property
    def dtype(self) -> np.dtype:
        return params_dtype(self.params)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One example's shape: (784,) for the MLP, the network's ``in_shape`` otherwise."""
        return self.network.in_shape if self.network is not None else (self.spec.sizes[0],)

    @property
    def output(self) -> str:
        return self.network.output if self.network is not None else self.spec.output

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The output layer's activations (B, k) for inputs x (B, 784) (a network of layers:
        or (B, *in_shape)), in the weights' dtype: ``mlp.forward`` for the MLP."""
        if self.network is None:
            return forward(self.params, x, self.spec)
        return outputs(self.network, self.params, self.state, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class per row (B,) int64: the argmax of the logits, as ``mlp.predict``."""
        if self.network is None:
            return predict(self.params, x, self.spec)
        return predict_network(self.network, self.params, self.state, x)

    def classes_and_outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` and :meth:`outputs` of x; a network of layers runs once for both."""
        if self.network is None:
            return self.predict(x), self.outputs(x)
        logits = evaluation_logits(self.network, self.params, self.state, x)
        return np.argmax(logits, axis=1), output_values(logits, self.network.output)

    def describe(self) -> dict[str, Any]:
        """The network, as the report shows it."""
        if self.network is None:
            spec = self.spec
            return {"sizes": list(spec.sizes), "activation": spec.activation,
                    "output": spec.output, "loss": spec.loss}  # fmt: skip
        network = self.network
        return {"layers": network.describe(), "in_shape": list(network.in_shape),
                "output": network.output, "loss": network.loss}  # fmt: skip


def load_weights(path: Path) -> tuple[MLPSpec, Params]:
    """Reads an MLP's file written by :func:`save_weights`; never unpickles.

    Returns the spec and one ``{"W": (n_in, n_out), "b": (n_out,)}`` dict per layer. Raises
    WeightsError, naming the file and the array, for anything else: pickled (object) arrays, a
    missing or unreadable spec, missing or extra arrays, shapes that do not match the spec,
    arrays that are not float32/float64 of one dtype, or values that are not finite (NaN or
    infinite: such a network predicts nonsense, as class 0, without any error); a network of
    layers' file is :func:`read_weights`'s.
    """
    arrays = _arrays(path)
    if NETWORK in arrays and SPEC not in arrays:
        raise WeightsError(f"{path}: holds a network of layers; read it with read_weights")
    return _read_mlp(path, arrays)


def read_weights(path: Path) -> SavedNetwork:
    """Reads any file written by :func:`save_weights`, the MLP's or a network of layers' (its
    network rebuilt from the layers as written); never unpickles. Raises WeightsError as
    :func:`load_weights` does, and for a network that cannot be rebuilt, arrays other than its
    layers' parameters and state, or running statistics that are not finite."""
    arrays = _arrays(path)
    if NETWORK in arrays and SPEC not in arrays:
        return _read_network(path, arrays)
    spec, params = _read_mlp(path, arrays)
    return SavedNetwork(params, spec=spec)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except (OSError, ValueError, EOFError) as error:  # not a zip, or an object (pickled) array
        raise WeightsError(f"{path}: not a weights file written by this project: {error}") from None


def _read_mlp(path: Path, arrays: dict[str, np.ndarray]) -> tuple[MLPSpec, Params]:
    try:
        fields = json.loads(str(arrays.pop(SPEC)))
        spec = MLPSpec(
            sizes=tuple(fields["sizes"]),
            activation=fields["activation"],
            output=fields["output"],
            loss=fields["loss"],
            l2=fields["l2"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: no valid network spec in the file ({error!r})") from None
    expected = {}
    for i, (n_in, n_out) in enumerate(zip(spec.sizes[:-1], spec.sizes[1:])):
        expected[f"W{i}"], expected[f"b{i}"] = (n_in, n_out), (n_out,)
    if set(arrays) != set(expected):
        raise WeightsError(
            f"{path}: arrays {sorted(arrays)} do not match the spec {spec.sizes}, which needs "
            f"{sorted(expected)}"
        )
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise WeightsError(
                f"{path}: {name} has shape {arrays[name].shape}, but the spec {spec.sizes} "
                f"needs {shape}"
            )
    _check_values(path, arrays, list(expected))  # in layer order: W0, b0, W1, ...
    params = [{"W": arrays[f"W{i}"], "b": arrays[f"b{i}"]} for i in range(spec.n_layers)]
    return spec, params


def _read_network(path: Path, arrays: dict[str, np.ndarray]) -> SavedNetwork:
    try:
        network = rebuild_network(json.loads(str(arrays.pop(NETWORK))))
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: no valid network in the file ({error})") from None
    # the arrays' names and shapes, from the layers themselves (float64 placeholders)
    placeholders = {
        "param": init_params(network, np.random.default_rng(0)),
        "state": init_state(network),
    }
    expected = {
        f"{kind}.{i}.{key}": np.shape(value)
        for kind, layers in placeholders.items()
        for i, layer in enumerate(layers)
        for key, value in layer.items()
    }
    if set(arrays) != set(expected):
        raise WeightsError(
            f"{path}: arrays {sorted(arrays)} do not match the network "
            f"{network.describe()!r}, which needs {sorted(expected)}"
        )
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise WeightsError(
                f"{path}: {name} has shape {arrays[name].shape}, but the network "
                f"{network.describe()!r} needs {shape}"
            )
    _check_values(path, arrays, list(expected))
    params, state = (
        [{key: arrays[f"{kind}.{i}.{key}"] for key in layer} for i, layer in enumerate(layers)]
        for kind, layers in placeholders.items()
    )
    return SavedNetwork(params, network=network, state=state)


def _check_values(path: Path, arrays: dict[str, np.ndarray], names: list[str]) -> None:
    """Raises WeightsError for arrays ``names`` that are not float32/float64, for arrays of
    more than one dtype, and for values that are not finite (naming the first such array)."""
    for name in names:
        if arrays[name].dtype not in (np.float32, np.float64):
            raise WeightsError(
                f"{path}: {name} has dtype {arrays[name].dtype}; allowed: float32 or float64"
            )
    dtypes = sorted({str(array.dtype) for array in arrays.values()})
    if len(dtypes) > 1:
        raise WeightsError(
            f"{path}: the arrays mix dtypes {', '.join(dtypes)}; a network has one dtype"
        )
    for name in names:
        finite = np.isfinite(arrays[name])
        if not finite.all():
            values = arrays[name][~finite]
            n_nan = int(np.isnan(values).sum())
            raise WeightsError(
                f"{path}: {name} holds {n_nan} NaN and {values.size - n_nan} infinite values "
                f"of {arrays[name].size}; a network's weights are finite (a run that diverged, "
                "or a file changed since it was written)"
            )
