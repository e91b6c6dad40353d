"""The weights file format: a network's parameters and spec in one ``.npz``, never pickled.

Nothing here talks to MLflow: runs carry these files as artifacts (``weights.npz``,
``best_weights.npz``), each with a few lines of text beside it (:func:`describe_weights`), and
the report reads them back.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO

import numpy as np

from research.engine.mlp import MLPSpec, Params


class WeightsError(ValueError):
    """A weights file is not one :func:`save_weights` wrote for a valid network."""


def save_weights(path: Path, params: Params, spec: MLPSpec) -> None:
    """Writes params as ``.npz`` (``W0, b0, W1, b1, ...`` and the spec as JSON text).

    Written to a temporary file and renamed, so a crash never leaves a half-written file; its
    mode is that of any file the project writes (0644 under the usual umask 022).
    """
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


def describe_weights(params: Params, spec: MLPSpec, name: str = "weights.npz") -> str:
    """The text that goes beside a weights file ``name``: the network, its arrays' shapes and
    dtype, and how to load them (with this project, or with numpy alone)."""
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


def load_weights(path: Path) -> tuple[MLPSpec, Params]:
    """Reads a file written by :func:`save_weights`; never unpickles.

    Returns the spec and one ``{"W": (n_in, n_out), "b": (n_out,)}`` dict per layer. Raises
    WeightsError, naming the file and the array, for anything else: pickled (object) arrays, a
    missing or unreadable spec, missing or extra arrays, shapes that do not match the spec,
    arrays that are not float32/float64 of one dtype, or values that are not finite (NaN or
    infinite: such a network predicts nonsense, as class 0, without any error).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except (OSError, ValueError, EOFError) as error:  # not a zip, or an object (pickled) array
        raise WeightsError(f"{path}: not a weights file written by this project: {error}") from None
    try:
        fields = json.loads(str(arrays.pop("spec")))
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
    for name in expected:
        if arrays[name].dtype not in (np.float32, np.float64):
            raise WeightsError(
                f"{path}: {name} has dtype {arrays[name].dtype}; allowed: float32 or float64"
            )
    dtypes = sorted({str(array.dtype) for array in arrays.values()})
    if len(dtypes) > 1:
        raise WeightsError(
            f"{path}: the arrays mix dtypes {', '.join(dtypes)}; a network has one dtype"
        )
    for name in expected:  # in layer order: W0, b0, W1, ...
        finite = np.isfinite(arrays[name])
        if not finite.all():
            values = arrays[name][~finite]
            n_nan = int(np.isnan(values).sum())
            raise WeightsError(
                f"{path}: {name} holds {n_nan} NaN and {values.size - n_nan} infinite values "
                f"of {arrays[name].size}; a network's weights are finite (a run that diverged, "
                "or a file changed since it was written)"
            )
    params = [{"W": arrays[f"W{i}"], "b": arrays[f"b{i}"]} for i in range(spec.n_layers)]
    return spec, params
