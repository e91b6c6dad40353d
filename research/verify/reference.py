"""An independent JAX reference for the MLP of :mod:`research.engine.mlp`, differentiated by
autodiff.

The forward pass and the three losses are written again from their definitions in ``jax.numpy``
(nothing is shared with :mod:`research.engine.mlp` but the ``MLPSpec`` dataclass) and the
gradients come from :func:`jax.value_and_grad`, so the handwritten backprop can be checked
against them. For a batch of B rows, targets ``y`` (B, k) and output logits ``z`` (B, k):

- ``mse``:           (1/B) Σ_b ½ Σ_k (out(z)_bk − y_bk)²   for any output nonlinearity ``out``
- ``cross_entropy``: −(1/B) Σ_b Σ_k y_bk log softmax(z)_bk  (max-shifted log-sum-exp)
- ``bce``:           −(1/B) Σ_b Σ_k [y log σ(z) + (1−y) log σ(−z)]  (from logits, log-sigmoid)

plus (l2/2) Σ_layers ‖W‖² over the weights (not the biases).

This is the only module of the project that imports JAX at import time. Importing it enables
64-bit mode (``jax_enable_x64``) process-wide, so float64 parameters are computed in float64;
float32 parameters stay float32. Results come back as numpy arrays / Python floats in the dtype of
the parameters.

Jitted functions are cached per (activation, output, loss) triple of the spec; ``l2`` is passed as
a traced argument, so specs that differ only in ``l2`` share one compilation, and XLA recompiles
only when the layer shapes, batch size or dtype change. They are compiled with XLA's backend
optimization level 0, which cuts the compile time that dominates these small computations, and
dropped after 256 compilations (see ``_MAX_COMPILED``), so a long process cannot run out of
memory mappings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.engine.mlp import MLPSpec

jax.config.update("jax_enable_x64", True)

Params = list[dict[str, np.ndarray]]
JaxParams = list[dict[str, jax.Array]]

__all__ = ["forward", "loss", "loss_and_grads", "objective"]


# --- nonlinearities ---------------------------------------------------------------------------


def _sigmoid(z: jax.Array) -> jax.Array:
    """σ(z) = exp(−softplus(−z)); finite value and derivative for any |z|."""
    return jnp.exp(-jnp.logaddexp(0.0, -z))


def _relu(z: jax.Array) -> jax.Array:
    """max(z, 0) with derivative 0 at z = 0 (``jnp.maximum`` would give ½ there)."""
    return jnp.where(z > 0, z, 0.0)


def _hidden(z: jax.Array, activation: str) -> jax.Array:
    if activation == "sigmoid":
        return _sigmoid(z)
    if activation == "tanh":
        return jnp.tanh(z)
    if activation == "relu":
        return _relu(z)
    raise ValueError(f"unknown activation {activation!r}")


def _log_softmax(z: jax.Array) -> jax.Array:
    """Row-wise log softmax of (B, k) logits.

    ``jax.nn.log_softmax`` subtracts the row max first, so the result is accurate to a few ulp
    even for logits ~1e3 (``z − logsumexp(z)`` would lose ~eps·max|z| absolute).
    """
    return jax.nn.log_softmax(z, axis=1)


def _output(z: jax.Array, output: str) -> jax.Array:
    if output == "sigmoid":
        return _sigmoid(z)
    if output == "softmax":
        return jnp.exp(_log_softmax(z))
    if output == "identity":
        return z
    raise ValueError(f"unknown output {output!r}")


# --- the model --------------------------------------------------------------------------------


def _logits(
    params: JaxParams, x: jax.Array, activation: str, masks: Sequence[jax.Array] | None = None
) -> jax.Array:
    """Output-layer pre-activations (B, n_out) for inputs x (B, n_in). ``masks``: one array per
    layer, multiplied into what that layer reads (inverted dropout: 0 or 1/keep)."""
    h = x
    for i, layer in enumerate(params):
        if masks is not None:
            h = h * masks[i]
        z = h @ layer["W"] + layer["b"]
        if i == len(params) - 1:
            return z
        h = _hidden(z, activation)
    raise ValueError("a network needs at least one layer")


def _data_loss(z: jax.Array, y: jax.Array, output: str, loss_name: str) -> jax.Array:
    """Batch-mean loss (0-d) from logits z (B, k) and targets y (B, k), without the l2 term."""
    batch = z.shape[0]
    if loss_name == "cross_entropy":
        return -jnp.sum(y * _log_softmax(z)) / batch
    if loss_name == "bce":
        return -jnp.sum(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z)) / batch
    if loss_name == "mse":
        residual = _output(z, output) - y
        return 0.5 * jnp.sum(residual**2) / batch
    raise ValueError(f"unknown loss {loss_name!r}")


def _objective(
    params: JaxParams,
    x: jax.Array,
    y: jax.Array,
    l2: jax.Array | float,
    *,
    activation: str,
    output: str,
    loss_name: str,
    masks: Sequence[jax.Array] | None = None,
) -> jax.Array:
    dtype = params[0]["W"].dtype
    x = jnp.asarray(x, dtype=dtype)
    y = jnp.asarray(y, dtype=dtype)
    data = _data_loss(_logits(params, x, activation, masks), y, output, loss_name)
    penalty = 0.5 * l2 * sum(jnp.sum(layer["W"] ** 2) for layer in params)
    return data + penalty


def objective(
    params: JaxParams | Params,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    spec: MLPSpec,
    masks: Sequence[jax.typing.ArrayLike] | None = None,
) -> jax.Array:
    """The full loss (data loss + l2 penalty) as a differentiable JAX scalar.

    Use this with :func:`jax.grad` / :func:`jax.jit` (``spec`` is not an array: close over it or
    mark it static). Args as in :func:`loss`, without the shape checks, and ``masks``: dropout
    masks, one array per layer (all of them; ones for none); returns a 0-d array in the dtype of
    ``params[0]["W"]``. E.g. ``jax.grad(objective)(params, x, y, spec)``.
    """
    return _objective(
        params,
        x,
        y,
        spec.l2,
        activation=spec.activation,
        output=spec.output,
        loss_name=spec.loss,
        masks=masks,
    )


def max_norm(params: JaxParams, radius: float) -> JaxParams:
    """Max-norm in JAX (optax has no per-unit one): every column of a hidden layer's W, the
    weights into one hidden unit, rescaled to norm ``radius`` if it is longer. The output layer
    and the biases are unchanged."""
    projected = []
    for i, layer in enumerate(params):
        W = layer["W"]
        if i < len(params) - 1:
            norm = jnp.linalg.norm(W, axis=0, keepdims=True)
            W = jnp.where(norm > radius, W * (radius / norm), W)
        projected.append({"W": W, "b": layer["b"]})
    return projected


# These graphs are tiny and each is run only a few times (a test, a gradient check), so XLA's
# compile time dominates; skipping LLVM's optimizations cuts it. Results are unchanged up to the
# rounding of a few ulp that any change of evaluation order brings.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class _Compiled(NamedTuple):
    forward: Callable[..., jax.Array]
    loss: Callable[..., jax.Array]
    value_and_grad: Callable[..., tuple[jax.Array, JaxParams]]
    value_and_grad_masked: Callable[..., tuple[jax.Array, JaxParams]]


@functools.cache
def _compiled(activation: str, output: str, loss_name: str) -> _Compiled:
    """Jitted forward / loss / value-and-grad for one kind of network (any shapes, any l2)."""

    def fwd(params: JaxParams, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, dtype=params[0]["W"].dtype)
        return _output(_logits(params, x, activation), output)

    obj = functools.partial(_objective, activation=activation, output=output, loss_name=loss_name)
    jit = functools.partial(jax.jit, compiler_options=_COMPILER_OPTIONS)

    def masked(params: JaxParams, x: jax.Array, y: jax.Array, l2: float, masks: list) -> jax.Array:
        return obj(params, x, y, l2, masks=masks)

    return _Compiled(
        forward=jit(fwd),
        loss=jit(obj),
        value_and_grad=jit(jax.value_and_grad(obj)),
        value_and_grad_masked=jit(jax.value_and_grad(masked)),
    )


# XLA:CPU keeps ~70 memory mappings alive per compiled executable and Linux allows 65530 per
# process (vm.max_map_count), so a process that compiled ~900 shapes would die with a segfault
# inside the compiler. Past this many compilations every cached function is dropped (which frees
# its executables) and recompiled on demand.
_MAX_COMPILED = 256
_compiled_keys: set[tuple[object, ...]] = set()


def _for_spec(spec: MLPSpec, kind: str, jparams: JaxParams, x: np.ndarray) -> Callable[..., object]:
    """The jitted ``kind`` function (forward / loss / value_and_grad) for this spec."""
    key = (spec.activation, spec.output, spec.loss, kind, x.shape, x.dtype.str)
    key += tuple(layer["W"].shape for layer in jparams)
    if key not in _compiled_keys:
        if len(_compiled_keys) >= _MAX_COMPILED:
            _compiled.cache_clear()
            _compiled_keys.clear()
        _compiled_keys.add(key)
    return getattr(_compiled(spec.activation, spec.output, spec.loss), kind)


def _prepare(
    params: Params, x: np.ndarray, y: np.ndarray | None, spec: MLPSpec
) -> tuple[JaxParams, np.ndarray, np.ndarray | None]:
    """Checks shapes against the spec and casts x, y to the parameters' dtype."""
    if len(params) != spec.n_layers:
        raise ValueError(
            f"params has {len(params)} layers, spec.sizes={spec.sizes} needs {spec.n_layers}"
        )
    dtype = np.asarray(params[0]["W"]).dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters must be float32 or float64, got {dtype}")
    jparams: JaxParams = []
    for i, (layer, n_in, n_out) in enumerate(zip(params, spec.sizes[:-1], spec.sizes[1:])):
        W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
        if W.shape != (n_in, n_out) or b.shape != (n_out,):
            raise ValueError(
                f"layer {i}: W{W.shape} b{b.shape} do not match spec ({n_in}, {n_out})"
            )
        if W.dtype != dtype or b.dtype != dtype:
            raise ValueError(f"layer {i}: W is {W.dtype}, b is {b.dtype}; expected {dtype}")
        jparams.append({"W": jnp.asarray(W), "b": jnp.asarray(b)})
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2 or x.shape[1] != spec.sizes[0]:
        raise ValueError(f"x has shape {x.shape}, expected (B, {spec.sizes[0]})")
    if y is not None:
        y = np.asarray(y, dtype=dtype)
        if y.shape != (x.shape[0], spec.sizes[-1]):
            raise ValueError(f"y has shape {y.shape}, expected ({x.shape[0]}, {spec.sizes[-1]})")
    return jparams, x, y


# --- public API -------------------------------------------------------------------------------


def forward(params: Params, x: np.ndarray, spec: MLPSpec) -> np.ndarray:
    """Network outputs for a batch.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer, float32 or float64.
        x: inputs (B, sizes[0]); cast to the parameters' dtype.
        spec: the network.
    Returns:
        (B, sizes[-1]) numpy array of output-layer activations, in the parameters' dtype.
    """
    jparams, x, _ = _prepare(params, x, None, spec)
    return np.array(_for_spec(spec, "forward", jparams, x)(jparams, x))


def loss(params: Params, x: np.ndarray, y: np.ndarray, spec: MLPSpec) -> float:
    """The full objective (data loss + l2 penalty) on a batch.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer, float32 or float64.
        x: inputs (B, sizes[0]); y: targets (B, sizes[-1]); both cast to the parameters' dtype.
        spec: the network.
    Returns:
        The loss as a Python float (computed in the parameters' dtype).
    """
    jparams, x, y = _prepare(params, x, y, spec)
    return float(_for_spec(spec, "loss", jparams, x)(jparams, x, y, spec.l2))


def loss_and_grads(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    spec: MLPSpec,
    masks: Sequence[np.ndarray | None] | None = None,
) -> tuple[float, Params]:
    """The loss and its gradient for every parameter array, by ``jax.value_and_grad``.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer, float32 or float64.
        x: inputs (B, sizes[0]); y: targets (B, sizes[-1]); both cast to the parameters' dtype.
        spec: the network.
        masks: dropout masks, one (B, width) array (or None) per layer, for what it reads.
    Returns:
        ``(loss, grads)``: the loss as a Python float and a list of ``{"W": (n_in, n_out),
        "b": (n_out,)}`` numpy arrays (fresh, writable) in the parameters' dtype.
    """
    jparams, x, y = _prepare(params, x, y, spec)
    if masks is None:
        value, grads = _for_spec(spec, "value_and_grad", jparams, x)(jparams, x, y, spec.l2)
    else:
        if len(masks) != spec.n_layers:
            raise ValueError(f"masks has {len(masks)} entries, one per layer needed")
        full = [
            jnp.ones((x.shape[0], width), x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
            for mask, width in zip(masks, spec.sizes[:-1])
        ]
        compiled = _for_spec(spec, "value_and_grad_masked", jparams, x)
        value, grads = compiled(jparams, x, y, spec.l2, full)
    return float(value), [{"W": np.array(g["W"]), "b": np.array(g["b"])} for g in grads]


# --- the benchmark's JAX contender ------------------------------------------------------------


def _fast_hidden(z: jax.Array, activation: str) -> jax.Array:
    """The idiomatic jax.nn nonlinearities (what a JAX user would write), not the checked ones."""
    if activation == "sigmoid":
        return jax.nn.sigmoid(z)
    if activation == "tanh":
        return jnp.tanh(z)
    return jax.nn.relu(z)


def sgd_epoch(spec: MLPSpec, learning_rate: float) -> Callable[..., tuple[JaxParams, jax.Array]]:
    """One epoch of plain SGD as a single XLA program, for the benchmark (``research.bench``).

    The network and loss are those of ``spec`` (l2 included), written with ``jax.nn``'s usual
    nonlinearities; the gradient comes from ``jax.value_and_grad`` and the batches are a
    ``lax.scan``, so the whole epoch (gathering each batch's rows included) runs without returning
    to Python. It is compiled with XLA's default optimizations (the checking functions above skip
    them) and donates the parameters, so XLA may update them in place.

    Returns:
        ``epoch(params, x, y, batches) -> (params, losses)`` where params is a list of
        ``{"W", "b"}`` JAX arrays, x (N, n_in) and y (N, n_out) device arrays, batches (S, B) int32
        row indices and losses (S,) the batch losses before each step.
    """

    def objective(params: JaxParams, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x
        for layer in params[:-1]:
            h = _fast_hidden(h @ layer["W"] + layer["b"], spec.activation)
        z = h @ params[-1]["W"] + params[-1]["b"]
        if spec.loss == "mse" and spec.output == "sigmoid":
            data = 0.5 * jnp.sum((jax.nn.sigmoid(z) - y) ** 2) / z.shape[0]
        else:
            data = _data_loss(z, y, spec.output, spec.loss)
        if not spec.l2:
            return data
        return data + 0.5 * spec.l2 * sum(jnp.sum(layer["W"] ** 2) for layer in params)

    value_and_grad = jax.value_and_grad(objective)

    def epoch(
        params: JaxParams, x: jax.Array, y: jax.Array, batches: jax.Array
    ) -> tuple[JaxParams, jax.Array]:
        def step(params: JaxParams, rows: jax.Array) -> tuple[JaxParams, jax.Array]:
            value, grads = value_and_grad(params, x[rows], y[rows])
            params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
            return params, value

        return jax.lax.scan(step, params, batches)

    return jax.jit(epoch, donate_argnums=0)


def versions() -> dict[str, str]:
    """JAX's version and the device it computes on."""
    return {"jax": jax.__version__, "jax_device": str(jax.devices()[0])}
