"""The multilayer perceptron: its spec, numpy forward pass and handwritten backprop.

Pure functions over a parameter list ``[{"W": (n_in, n_out), "b": (n_out,)}, ...]``, one dict per
layer. Everything is vectorized over the batch (rows of ``x``), works at any depth, keeps the dtype
of the parameters (float32 in, float32 out) and stays finite for pre-activations up to |z| ~ 1e3.

The losses, for a batch of B rows, targets ``y`` and outputs ``a`` (k indexes the output units):

- ``mse``:           (1/B) Σ_b ½ Σ_k (a_bk − y_bk)²        (the origin program's update rule)
- ``cross_entropy``: −(1/B) Σ_b Σ_k y_bk log softmax(z)_bk  (from logits, log-sum-exp)
- ``bce``:           −(1/B) Σ_b Σ_k [y log a + (1−y) log(1−a)], a = sigmoid(z) (from logits)

plus (l2/2) Σ_layers ‖W‖² over the weights (not the biases).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from research.engine.keep_decisions import inverted_dropout_mask

Params = list[dict[str, np.ndarray]]

# The names each choice allows, declared once: the spec's annotations, its checks and the field
# table of training runs (research.experiment.config.fields) all read them from here.
Activation = Literal["sigmoid", "tanh", "relu"]
Output = Literal["sigmoid", "softmax", "identity"]
Loss = Literal["mse", "cross_entropy", "bce"]
InitScheme = Literal["normal", "xavier", "he"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
OUTPUTS: tuple[str, ...] = get_args(Output)
LOSSES: tuple[str, ...] = get_args(Loss)
INIT_SCHEMES: tuple[str, ...] = get_args(InitScheme)
# A loss computed from logits only makes sense with the output it was derived for.
LOSS_NEEDS_OUTPUT = {"cross_entropy": "softmax", "bce": "sigmoid"}


@dataclass(frozen=True)
class MLPSpec:
    """What the network is: layer widths, nonlinearities, loss and weight decay.

    Attributes:
        sizes: layer widths from input to output, e.g. ``(784, 30, 10)``; at least two.
        activation: hidden-layer nonlinearity, one of ``sigmoid``, ``tanh``, ``relu``.
        output: output-layer nonlinearity, one of ``sigmoid``, ``softmax``, ``identity``.
        loss: ``mse``, ``cross_entropy`` (needs ``softmax``) or ``bce`` (needs ``sigmoid``).
        l2: weight-decay coefficient ≥ 0; adds (l2/2) Σ ‖W‖² to the loss.
    """

    sizes: tuple[int, ...]
    activation: Activation
    output: Output
    loss: Loss
    l2: float = 0.0

    def __post_init__(self) -> None:
        try:
            sizes = tuple(self.sizes)
        except TypeError:
            raise ValueError(
                f"MLPSpec.sizes={self.sizes!r} is not a sequence; "
                "give layer widths from input to output, e.g. (784, 30, 10)"
            ) from None
        if len(sizes) < 2 or not all(
            isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1 for n in sizes
        ):
            raise ValueError(
                f"MLPSpec.sizes={self.sizes!r} is invalid; allowed: at least two positive "
                "integers (input width, ..., output width), e.g. (784, 30, 10)"
            )
        object.__setattr__(self, "sizes", tuple(int(n) for n in sizes))
        for field, value, allowed in (
            ("activation", self.activation, ACTIVATIONS),
            ("output", self.output, OUTPUTS),
            ("loss", self.loss, LOSSES),
        ):
            if value not in allowed:
                raise ValueError(
                    f"MLPSpec.{field}={value!r} is not allowed; choose one of {', '.join(allowed)}"
                )
        needed = LOSS_NEEDS_OUTPUT.get(self.loss)
        if needed is not None and self.output != needed:
            raise ValueError(
                f"MLPSpec.loss={self.loss!r} needs output={needed!r}, got output={self.output!r}; "
                f"use output={needed!r} or loss='mse'"
            )
        if (
            isinstance(self.l2, bool)
            or not isinstance(self.l2, int | float | np.floating | np.integer)
            or not np.isfinite(self.l2)
            or self.l2 < 0
        ):
            raise ValueError(f"MLPSpec.l2={self.l2!r} is not allowed; give a finite number >= 0")
        object.__setattr__(self, "l2", float(self.l2))

    @property
    def n_layers(self) -> int:
        """Number of weight layers (hidden layers + 1)."""
        return len(self.sizes) - 1

    @property
    def n_params(self) -> int:
        """Total count of weights and biases."""
        return count_params(self.sizes)


def count_params(sizes: Sequence[int]) -> int:
    """Weights and biases of an MLP with these layer widths: Σ (n_in + 1)·n_out."""
    return sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(sizes))


def init_params(
    spec: MLPSpec,
    seed: int | np.random.Generator = 0,
    dtype: np.dtype | type = np.float64,
    scheme: str = "normal",
) -> Params:
    """Draws initial parameters.

    Schemes: ``normal`` (the origin's standard normal for W and b), ``xavier`` (Glorot uniform,
    limit sqrt(6 / (n_in + n_out)), zero biases), ``he`` (normal with std sqrt(2 / n_in), zero
    biases). Returns one ``{"W": (n_in, n_out), "b": (n_out,)}`` dict per layer in ``dtype``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme {scheme!r} is not allowed; choose one of {INIT_SCHEMES}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params: Params = []
    for n_in, n_out in zip(spec.sizes[:-1], spec.sizes[1:]):
        if scheme == "normal":
            W = rng.standard_normal((n_in, n_out))
            b = rng.standard_normal(n_out)
        elif scheme == "xavier":
            limit = np.sqrt(6.0 / (n_in + n_out))
            W = rng.uniform(-limit, limit, size=(n_in, n_out))
            b = np.zeros(n_out)
        else:  # he
            W = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
            b = np.zeros(n_out)
        params.append({"W": W.astype(dtype), "b": b.astype(dtype)})
    return params


# --- nonlinearities ---------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow: exp is only taken of −|z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log σ(z) = −softplus(−z), computed stably."""
    return np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log softmax of (B, k) logits by log-sum-exp."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _hidden(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return sigmoid(z)
    if activation == "tanh":
        return np.tanh(z)
    return np.maximum(z, 0)


def _hidden_derivative(a: np.ndarray, activation: str) -> np.ndarray:
    """dσ/dz expressed through the activation a = σ(z), so z need not be kept."""
    if activation == "sigmoid":
        return a * (1 - a)
    if activation == "tanh":
        return 1 - a * a
    return (a > 0).astype(a.dtype)


def _output(z: np.ndarray, output: str) -> np.ndarray:
    if output == "sigmoid":
        return sigmoid(z)
    if output == "softmax":
        return np.exp(_log_softmax(z))
    return z


# --- forward and backward ---------------------------------------------------------------------


#: Dropout masks: one per layer, for what that layer reads (the inputs, then each hidden layer's
#: activations): (B, width) arrays of 0 and 1/keep ("inverted" dropout: the kept units are scaled
#: up at training time, so evaluation uses no mask and no scaling), or None for no dropout there.
Masks = Sequence["np.ndarray | None"]


def dropout_masks(
    rng: np.random.Generator,
    rows: int,
    sizes: Sequence[int],
    input_dropout: float,
    dropout: float,
    dtype: np.dtype | type = np.float32,
) -> list[np.ndarray | None]:
    """Fresh inverted-dropout masks for one batch: one per layer, for what it reads.

    Args:
        rng: the run's dropout generator (each call draws new masks from it).
        rows: the batch's rows B; sizes: the network's layer sizes (inputs first).
        input_dropout: the fraction of inputs dropped; dropout: of each hidden layer's units.
    Returns:
        One (B, sizes[i]) array of 0 and 1/(1 − rate) per layer (None where the rate is 0), in
        ``dtype``: each unit is kept with probability 1 − rate, independently.
    """
    rates = [input_dropout, *[dropout] * (len(sizes) - 2)]
    masks: list[np.ndarray | None] = []
    for width, rate in zip(sizes[:-1], rates):
        if rate == 0:
            masks.append(None)
            continue
        masks.append(inverted_dropout_mask(rng, (rows, width), rate, dtype))
    return masks


def forward_layers(
    params: Params, x: np.ndarray, spec: MLPSpec, masks: Masks | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Returns what every layer reads [x, h1, ..., h_L-1] (after its dropout mask, if any) and
    the output logits (B, n_out)."""
    _, inputs, logits = _forward(params, x, spec, masks)
    return inputs, logits


def _forward(
    params: Params, x: np.ndarray, spec: MLPSpec, masks: Masks | None
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(activations [x, h1, ...] before the masks, what each layer reads after them, logits)."""
    activations, inputs = [x], [x if masks is None or masks[0] is None else x * masks[0]]
    for i, layer in enumerate(params[:-1], start=1):
        h = _hidden(inputs[-1] @ layer["W"] + layer["b"], spec.activation)
        activations.append(h)
        inputs.append(h if masks is None or masks[i] is None else h * masks[i])
    logits = inputs[-1] @ params[-1]["W"] + params[-1]["b"]
    return activations, inputs, logits


def forward(params: Params, x: np.ndarray, spec: MLPSpec) -> np.ndarray:
    """Network outputs for a batch.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer.
        x: inputs (B, sizes[0]).
    Returns:
        (B, sizes[-1]): output-layer activations (probabilities for softmax/sigmoid outputs).
    """
    _, logits = forward_layers(params, np.asarray(x, dtype=params[0]["W"].dtype), spec)
    return _output(logits, spec.output)


def _check_shapes(params: Params, x: np.ndarray, y: np.ndarray, spec: MLPSpec) -> None:
    if len(params) != spec.n_layers:
        raise ValueError(
            f"params has {len(params)} layers, spec.sizes={spec.sizes} needs {spec.n_layers}"
        )
    for i, (layer, n_in, n_out) in enumerate(zip(params, spec.sizes[:-1], spec.sizes[1:])):
        if layer["W"].shape != (n_in, n_out) or layer["b"].shape != (n_out,):
            raise ValueError(
                f"layer {i}: W{layer['W'].shape} b{layer['b'].shape} do not match "
                f"spec ({n_in}, {n_out})"
            )
    if x.ndim != 2 or x.shape[1] != spec.sizes[0]:
        raise ValueError(f"x has shape {x.shape}, expected (B, {spec.sizes[0]})")
    if y.shape != (x.shape[0], spec.sizes[-1]):
        raise ValueError(f"y has shape {y.shape}, expected ({x.shape[0]}, {spec.sizes[-1]})")


def data_loss(logits: np.ndarray, y: np.ndarray, spec: MLPSpec) -> np.ndarray:
    """Batch-mean loss (without the l2 term) from output logits (B, k); a 0-d array."""
    batch = logits.shape[0]
    if spec.loss == "cross_entropy":
        return -np.sum(y * _log_softmax(logits)) / batch
    if spec.loss == "bce":
        # log(1 − σ(z)) = log σ(−z): both terms from logits, so no log(0).
        return -np.sum(y * _log_sigmoid(logits) + (1 - y) * _log_sigmoid(-logits)) / batch
    residual = _output(logits, spec.output) - y
    return 0.5 * np.sum(residual * residual) / batch


def l2_penalty(params: Params, l2: float) -> float:
    """(l2/2) Σ_layers ‖W‖²."""
    if l2 == 0:
        return 0.0
    return 0.5 * l2 * sum(float(np.sum(layer["W"] * layer["W"])) for layer in params)


def loss(params: Params, x: np.ndarray, y: np.ndarray, spec: MLPSpec) -> float:
    """The full objective (data loss + l2 penalty) on a batch x (B, n_in), y (B, n_out)."""
    dtype = params[0]["W"].dtype
    x = np.asarray(x, dtype=dtype)
    y = np.asarray(y, dtype=dtype)
    _check_shapes(params, x, y, spec)
    _, logits = forward_layers(params, x, spec)
    return float(data_loss(logits, y, spec)) + l2_penalty(params, spec.l2)


def loss_and_grads(
    params: Params, x: np.ndarray, y: np.ndarray, spec: MLPSpec, masks: Masks | None = None
) -> tuple[float, Params]:
    """The handwritten backward pass: loss and its gradient for every parameter array.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer, float32 or float64.
        x: inputs (B, sizes[0]); cast to the parameters' dtype.
        y: targets (B, sizes[-1]): one-hot for cross_entropy/bce, any real values for mse.
        spec: the network.
        masks: dropout masks (see :data:`Masks`), one per layer, in the parameters' dtype;
            None for none. The gradient is that of the loss with these masks held fixed.
    Returns:
        ``(loss, grads)``: the scalar loss (a Python float) and gradients in the structure and
        dtype of ``params``.
    """
    dtype = params[0]["W"].dtype
    x = np.asarray(x, dtype=dtype)
    y = np.asarray(y, dtype=dtype)
    _check_shapes(params, x, y, spec)
    _check_masks(masks, x, spec)
    activations, inputs, logits = _forward(params, x, spec, masks)
    value, delta = output_delta(logits, y, spec)

    grads: Params = [{} for _ in params]
    for i in range(len(params) - 1, -1, -1):
        W = params[i]["W"]
        grads[i]["W"] = inputs[i].T @ delta
        grads[i]["b"] = delta.sum(axis=0)
        if spec.l2:
            grads[i]["W"] += dtype.type(spec.l2) * W
        if i > 0:
            # inputs[i] = σ(z)·m: ∂loss/∂z = (δ Wᵀ) · m · σ'(z), σ' from the unmasked σ(z)
            delta = (delta @ W.T) * _hidden_derivative(activations[i], spec.activation)
            if masks is not None and masks[i] is not None:
                delta *= masks[i]

    total = float(value) + l2_penalty(params, spec.l2)
    return total, grads


def _check_masks(masks: Masks | None, x: np.ndarray, spec: MLPSpec) -> None:
    if masks is None:
        return
    if len(masks) != spec.n_layers:
        raise ValueError(f"masks has {len(masks)} entries, one per layer ({spec.n_layers}) needed")
    for i, (mask, width) in enumerate(zip(masks, spec.sizes[:-1])):
        if mask is not None and mask.shape != (x.shape[0], width):
            raise ValueError(f"mask {i} has shape {mask.shape}, expected ({x.shape[0]}, {width})")


def output_delta(logits: np.ndarray, y: np.ndarray, spec: MLPSpec) -> tuple[np.ndarray, np.ndarray]:
    """The batch-mean data loss and ∂loss/∂logits from the output logits.

    Args:
        logits: output-layer pre-activations (B, k); y: targets (B, k), same dtype.
    Returns:
        ``(value, delta)``: the data loss (a 0-d array, without the l2 term) and delta (B, k),
        already divided by the batch size B.
    """
    batch = logits.shape[0]
    if spec.loss == "cross_entropy":
        log_probs = _log_softmax(logits)
        value = -np.sum(y * log_probs) / batch
        # d/dz of −Σ y log softmax(z) is softmax(z)·Σy − y (Σy = 1 for one-hot rows).
        delta = (np.exp(log_probs) * y.sum(axis=1, keepdims=True) - y) / batch
    elif spec.loss == "bce":
        value = -np.sum(y * _log_sigmoid(logits) + (1 - y) * _log_sigmoid(-logits)) / batch
        delta = (sigmoid(logits) - y) / batch
    else:  # mse, through whatever output nonlinearity
        out = _output(logits, spec.output)
        residual = out - y
        value = 0.5 * np.sum(residual * residual) / batch
        if spec.output == "sigmoid":
            delta = residual * out * (1 - out) / batch
        elif spec.output == "softmax":
            # Softmax Jacobian-vector product: s ⊙ (r − Σ_k s_k r_k).
            delta = out * (residual - np.sum(out * residual, axis=1, keepdims=True)) / batch
        else:
            delta = residual / batch
    return value, delta


def predict(params: Params, x: np.ndarray, spec: MLPSpec) -> np.ndarray:
    """Predicted class per row: argmax of the outputs, (B,) int64."""
    _, logits = forward_layers(params, np.asarray(x, dtype=params[0]["W"].dtype), spec)
    # All output nonlinearities are monotone per unit; softmax preserves the row's argmax.
    return np.argmax(logits, axis=1)
