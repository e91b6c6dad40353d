"""The one verifier every layer passes, built-in or a researcher's own: numpy against JAX.

:func:`verify_layer` runs a layer's numpy forward pass and handwritten backward on a random batch
and compares them with a JAX reference differentiated by autodiff (``jax.vjp``): the output, the
input's gradient and every parameter's gradient, for a random upstream gradient ``dy``. With
``jacobian=True`` it compares the whole-batch Jacobian ∂y/∂x instead of one vector-Jacobian
product: every example's output against every example's input, which is how a layer that couples
the batch (batch norm in training mode) is checked whole.

The reference is, in order: the one given; the built-in's independent JAX reference
(:mod:`research.verify.layer_refs`); else the layer's own forward run under ``jax.numpy``.

Inputs are drawn away from kinks: values within ``KINK_MARGIN`` of 0 (where ReLU's derivative
jumps) are pushed out, and continuous random values make max-pool ties a probability-zero event.
Parameters are the layer's ``init`` plus noise, so that a parameter at a special value (batch
norm's gamma = 1) cannot hide a wrong gradient. Tolerances come from the table in
:mod:`research.verify.compare`: ``gradients`` for the gradients, ``layer_forward`` for the output.

:func:`network_loss_and_grads` is the reference of a whole
:class:`~research.engine.network.Network`: the layers' references chained, the loss written
again in JAX, ``jax.value_and_grad``. :func:`gradcheck_network` is ``gradcheck --layers``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.engine.layers.base import Layer, Shape, decayed, describe, forward_extras, needs
from research.engine.network import (
    NetMasks,
    NetParams,
    NetState,
    Network,
    draw_masks,
    init_params,
    init_state,
)
from research.engine.network import loss_and_grads as numpy_loss_and_grads
from research.verify.compare import ArrayCheck, compare_arrays, tolerance
from research.verify.layer_refs import reference_for
from research.verify.reference import _data_loss

jax.config.update("jax_enable_x64", True)

#: Inputs closer than this to 0 are pushed out to it (ReLU's kink is at 0).
KINK_MARGIN = 0.05
#: Noise added to the layer's initial parameters (standard deviation).
PARAM_NOISE = 0.1

#: One XLA compilation per checked function, its backend (LLVM) optimizations skipped: they cost
#: more than they save on these small computations (as in research.verify.reference).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

#: ``sample(rng, shape, dtype)``: a batch of inputs for the check.
Sampler = Callable[[np.random.Generator, Shape, Any], np.ndarray]


def away_from_kinks(rng: np.random.Generator, shape: Shape, dtype: Any) -> np.ndarray:
    """Standard normal values with |x| ≥ KINK_MARGIN (those nearer 0 are pushed out)."""
    x = rng.standard_normal(shape)
    x = np.where(np.abs(x) < KINK_MARGIN, np.copysign(KINK_MARGIN, x) + x, x)
    return x.astype(dtype)


@dataclass(frozen=True)
class LayerVerdict:
    """What the verifier found: one :class:`ArrayCheck` per compared array."""

    layer: str
    in_shape: Shape
    dtype: str
    mode: str  # "training" or "evaluation"
    checks: tuple[ArrayCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[str]:
        """One line per array outside its tolerance."""
        return [check.describe() for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line: the layer, what was checked and whether it passed."""
        verdict = "passed" if self.passed else "FAILED"
        worst = max((c.max_rel_error for c in self.checks), default=0.0)
        return (
            f"{self.layer} on {self.in_shape} ({self.dtype}, {self.mode}): {verdict}, "
            f"{len(self.checks)} arrays, worst relative error {worst:.1e}"
        )


def verify_layer(
    layer: Layer,
    in_shape: Shape,
    *,
    dtype: Any = np.float64,
    batch: int = 3,
    seed: int = 0,
    training: bool = True,
    jacobian: bool = False,
    reference: Callable[..., Any] | None = None,
    sample: Sampler = away_from_kinks,
    params: dict[str, np.ndarray] | None = None,
    contiguous: bool = True,
) -> LayerVerdict:
    """Checks ``layer``'s numpy forward and backward against JAX autodiff.

    Args:
        layer: any object following the layer contract (:mod:`research.engine.layers.base`).
        in_shape: one example's shape (no batch axis), e.g. ``(3, 9, 9)``.
        dtype: float64 (checked at 1e-10) or float32 (at the table's float32 tolerances).
        batch: examples B in the batch.
        training: the mode (batch statistics and a dropout mask, or running statistics).
        jacobian: compare the whole-batch Jacobian ∂y/∂x (B·out, B·in) instead of one
            vector-Jacobian product (then the parameters' gradients are not compared).
        reference: ``reference(params, x, **extras) -> y`` in JAX; default as the module says.
        sample: draws the inputs (default :func:`away_from_kinks`).
        params: the parameters to check at; default the layer's ``init`` plus noise.
        contiguous: False hands the layer x, dy and its parameters in non-contiguous memory
            (:func:`strided`), as slices and transposes of other arrays are.
    Returns:
        A :class:`LayerVerdict`: output, input gradient and each parameter gradient compared.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if params is None:
        params = noisy_params(layer, rng, in_shape, dtype)
    x = sample(rng, (batch, *in_shape), dtype)
    extras = draw_extras(layer, rng, x, dtype, training)
    if not contiguous:
        params, x = {k: strided(v) for k, v in params.items()}, strided(x)
    ref = _reference(layer, reference)
    # The reference sees the inputs as drawn, whatever the layer does to its own (a layer that
    # changes its inputs fails layer_suite's own check for that, not this one).
    x_drawn, params_drawn = x.copy(), {k: np.array(v) for k, v in params.items()}
    y, cache = layer.forward(params, x, np, **extras)
    y_ref = np.asarray(_run(ref, "forward", extras, params_drawn, x_drawn))
    checks = [_compare("output y", y, y_ref, "layer_forward", dtype)]
    drawn = (params_drawn, x_drawn)
    if jacobian:
        checks.append(_jacobian_check(layer, params, x, extras, cache, y, ref, dtype, drawn))
    else:
        checks += _vjp_checks(layer, params, extras, cache, y, ref, dtype, rng, contiguous, drawn)
    mode = "training" if training else "evaluation"
    return LayerVerdict(describe(layer), tuple(in_shape), dtype.name, mode, tuple(checks))


def noisy_params(
    layer: Layer, rng: np.random.Generator, in_shape: Shape, dtype: Any
) -> dict[str, np.ndarray]:
    """The layer's ``init`` plus noise (``PARAM_NOISE``), so that no parameter sits at a special
    value (batch norm's gamma = 1) that could hide a wrong gradient."""
    return {
        key: (np.asarray(value) + PARAM_NOISE * rng.standard_normal(np.shape(value))).astype(dtype)
        for key, value in layer.init(rng, tuple(in_shape), dtype).items()
    }


def strided(array: np.ndarray) -> np.ndarray:
    """The same values in non-contiguous memory: every other element of a wider buffer, whose
    rows are one element longer still (so that no single stride walks the array: reshaping it
    to one axis must copy, as it must for slices and transposes of other arrays)."""
    array = np.asarray(array)
    if array.ndim == 0:
        return array
    width = 2 * array.shape[-1] + (1 if array.ndim > 1 else 0)
    buffer = np.zeros((*array.shape[:-1], width), array.dtype)
    view = buffer[..., : 2 * array.shape[-1] : 2]
    view[...] = array
    return view


def draw_extras(
    layer: Layer, rng: np.random.Generator, x: np.ndarray, dtype: np.dtype, training: bool
) -> dict[str, Any]:
    """The forward pass's keyword arguments: mode, a randomized state, a drawn mask."""
    state = mask = None
    if "state" in needs(layer):
        state = {
            key: _randomized_state(key, value, rng, dtype)
            for key, value in layer.init_state(x.shape[1:], dtype).items()  # type: ignore[attr-defined]
        }
    if "mask" in needs(layer) and training:
        mask = layer.draw_mask(rng, x.shape, dtype)  # type: ignore[attr-defined]
    return forward_extras(layer, training, state, mask)


def _randomized_state(key: str, value: Any, rng: np.random.Generator, dtype: np.dtype) -> Any:
    """Running statistics away from their starting values: variances positive, in [0.5, 2]."""
    if isinstance(value, dict):
        return {k: _randomized_state(k, v, rng, dtype) for k, v in value.items()}
    shape = np.shape(value)
    if key.split(".")[-1] in ("var", "variance"):
        return rng.uniform(0.5, 2.0, shape).astype(dtype)
    return (0.3 * rng.standard_normal(shape)).astype(dtype)


def _reference(layer: Layer, given: Callable[..., Any] | None) -> Callable[..., Any]:
    """The JAX reference ``ref(params, x, **extras) -> y``, the same function object for equal
    layers (hashable ones), so that its compiled forms are reused (:func:`_jitted`)."""
    if given is not None:
        return given
    try:
        return _cached_reference(layer)
    except TypeError:  # an unhashable layer: a reference of its own, compiled anew
        return _cached_reference.__wrapped__(layer)


@functools.lru_cache(maxsize=256)
def _cached_reference(layer: Layer) -> Callable[..., Any]:
    builtin = reference_for(layer)
    if builtin is not None:
        return functools.partial(builtin, layer)

    def own_forward(params: Any, x: Any, **extras: Any) -> Any:
        return layer.forward(params, x, jnp, **extras)[0]

    return own_forward


def _run(ref: Callable[..., Any], kind: str, extras: dict[str, Any], *args: Any) -> Any:
    """``kind`` ("forward", "vjp" or "jacobian") of ``ref`` on ``args`` (numpy arrays as JAX's),
    compiled as one XLA computation: ~0.4 s for a new shape where JAX's op-by-op dispatch
    compiles every primitive (~2 s), and reused for the next draw of the same shapes. Run op by
    op when the function branches on values (a researcher's forward may), which tracing under
    jit cannot but autodiff can."""
    training = extras.get("training")
    arrays = {key: value for key, value in extras.items() if key != "training"}
    try:
        jitted, plain = _jitted(ref, kind, training)
    except TypeError:  # an unhashable reference
        jitted, plain = _jitted.__wrapped__(ref, kind, training)
    args = _to_jax((*args, arrays))
    try:
        return jitted(*args)
    except jax.errors.ConcretizationTypeError:
        return plain(*args)


@functools.lru_cache(maxsize=512)
def _jitted(
    ref: Callable[..., Any], kind: str, training: bool | None
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The compiled and the plain function of ``kind``; ``training`` is fixed (a Python branch
    of the layer), the state and mask are arguments."""

    def forward(p: Any, xx: Any, arrays: dict[str, Any]) -> Any:
        mode = {} if training is None else {"training": training}
        return ref(p, xx, **arrays, **mode)

    if kind == "forward":
        plain = forward
    elif kind == "vjp":

        def plain(p: Any, xx: Any, cotangent: Any, arrays: dict[str, Any]) -> Any:
            return jax.vjp(lambda p, xx: forward(p, xx, arrays), p, xx)[1](cotangent)

    else:
        plain = jax.jacrev(forward, argnums=1)
    return _jit(plain), plain


def _to_jax(tree: Any) -> Any:
    """numpy arrays (in dicts, tuples, lists) as JAX arrays; other leaves unchanged."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf, tree
    )


def _vjp_checks(
    layer: Layer,
    params: dict[str, np.ndarray],
    extras: dict[str, Any],
    cache: Any,
    y: np.ndarray,
    ref: Callable[..., Any],
    dtype: np.dtype,
    rng: np.random.Generator,
    contiguous: bool,
    drawn: tuple[dict[str, np.ndarray], np.ndarray],
) -> list[ArrayCheck]:
    """∂/∂x and ∂/∂params of ⟨dy, y⟩ for a random dy: numpy's backward against jax.vjp at the
    ``drawn`` parameters and inputs."""
    dy_drawn = rng.standard_normal(np.shape(y)).astype(dtype)
    dy = strided(dy_drawn) if not contiguous else dy_drawn.copy()
    dx, grads = layer.backward(params, cache, dy)
    grads_ref, dx_ref = _run(ref, "vjp", extras, *drawn, dy_drawn)
    # All are gradients of one number, ⟨dy, y⟩: a float32 atol scales with the largest of them
    # (as gradcheck's does), not each array's own. A gradient that is 0 in exact arithmetic (a
    # conv's bias in front of a batch norm) is rounding noise of the size of the terms it sums.
    scale = [{"dx": np.asarray(dx_ref)}, {key: np.asarray(v) for key, v in grads_ref.items()}]
    checks = [_compare("input gradient dx", dx, dx_ref, "gradients", dtype, scale)]
    if set(grads) != set(params):
        problem = f"gradient keys {sorted(grads)}, parameter keys {sorted(params)}"
        return [*checks, ArrayCheck("parameter gradients", (), np.inf, np.inf, problem=problem)]
    for key in sorted(params):
        row = _compare(f"gradient {key}", grads[key], grads_ref[key], "gradients", dtype, scale)
        checks.append(row)
    if hasattr(layer, "backward_params"):
        alone = layer.backward_params(params, cache, dy_drawn.copy())
        for key in sorted(params):
            row = _compare(
                f"backward_params {key}", alone[key], grads_ref[key], "gradients", dtype, scale
            )
            checks.append(row)
    return checks


def _jacobian_check(
    layer: Layer,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    extras: dict[str, Any],
    cache: Any,
    y: np.ndarray,
    ref: Callable[..., Any],
    dtype: np.dtype,
    drawn: tuple[dict[str, np.ndarray], np.ndarray],
) -> ArrayCheck:
    """The whole-batch Jacobian (y.size, x.size): numpy's backward of every one-hot dy against
    ``jax.jacrev`` of the reference."""
    rows = []
    for index in range(y.size):
        dy = np.zeros(y.size, dtype)
        dy[index] = 1
        dx, _ = layer.backward(params, cache, dy.reshape(y.shape))
        rows.append(np.asarray(dx).reshape(-1))
    ours = np.stack(rows)
    theirs = _run(ref, "jacobian", extras, *drawn)
    return _compare(
        "Jacobian dy/dx", ours, np.asarray(theirs).reshape(y.size, x.size), "gradients", dtype
    )


def _compile_once(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` compiled (op by op if it branches on values), not kept."""
    args = _to_jax(args)
    try:
        return _jit(function)(*args)
    except jax.errors.ConcretizationTypeError:
        return function(*args)


def _compare(
    name: str, actual: Any, expected: Any, kind: str, dtype: np.dtype, scale: Any = None
) -> ArrayCheck:
    """``actual`` against ``expected`` at the table's ``kind`` tolerance, a scaled atol scaled by
    the largest entry of ``scale`` (a tree; default ``expected`` alone); ``actual`` must also
    have the inputs' dtype (a layer keeps its input's dtype: float32 stays float32)."""
    tree = [{"a": np.asarray(expected)}] if scale is None else scale
    rtol, atol = tolerance(kind, dtype).for_tree(tree)
    actual = np.asarray(actual)
    row = compare_arrays(name, actual, np.asarray(expected), rtol, atol)
    if row.problem or actual.dtype == dtype:
        return row
    return replace(row, problem=f"dtype {actual.dtype}, the inputs' is {dtype} ({row.worst})")


# --- a whole network -------------------------------------------------------------------------


def reference_logits(
    network: Network,
    params: Any,
    x: Any,
    *,
    training: bool,
    state: NetState | None = None,
    masks: NetMasks | None = None,
) -> Any:
    """The network's logits in JAX: every layer's reference in turn."""
    for i, layer in enumerate(network.layers):
        extras = forward_extras(
            layer,
            training,
            None if state is None else _to_jax(state[i]),
            None if masks is None or not training else _to_jax(masks[i]),
        )
        x = _reference(layer, None)(params[i], x, **extras)
    return x


def network_loss_and_grads(
    network: Network,
    params: NetParams,
    x: np.ndarray,
    y: np.ndarray,
    *,
    state: NetState | None = None,
    masks: NetMasks | None = None,
    training: bool = True,
) -> tuple[float, NetParams]:
    """The loss (with the l2 term) and its gradients by JAX autodiff, as numpy."""
    dtype = next((np.asarray(v).dtype for p in params for v in p.values()), np.dtype(np.float64))
    jx = jnp.asarray(np.asarray(x, dtype).reshape(len(x), *network.in_shape))
    jy = jnp.asarray(np.asarray(y, dtype))

    def objective(p: Any) -> Any:
        logits = reference_logits(network, p, jx, training=training, state=state, masks=masks)
        value = _data_loss(logits, jy, network.output, network.loss)
        penalty = sum(
            jnp.sum(p[i][key] ** 2)
            for i, layer in enumerate(network.layers)
            for key in decayed(layer, params[i])
        )
        return value + 0.5 * network.l2 * penalty

    value, grads = _compile_once(jax.value_and_grad(objective), params)
    return float(value), [{k: np.asarray(v) for k, v in g.items()} for g in grads]


def check_network(
    network: Network,
    params: NetParams,
    x: np.ndarray,
    y: np.ndarray,
    *,
    state: NetState | None = None,
    masks: NetMasks | None = None,
    training: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[ArrayCheck]:
    """The network's loss and every gradient array: numpy's backprop against JAX's, one row
    per array (``layer 3 conv(20,5) W``), at the table's tolerances for the dtype (``loss`` for
    the loss, ``gradients`` for the gradients), or at ``rtol`` / ``atol`` for every row."""
    dtype = next((np.asarray(v).dtype for p in params for v in p.values()), np.dtype(np.float64))
    ours, grads, _ = numpy_loss_and_grads(
        network, params, x, y, state=state, masks=masks, training=training
    )
    theirs, grads_ref = network_loss_and_grads(
        network, params, x, y, state=state, masks=masks, training=training
    )
    loss_tol = tolerance("loss", dtype)
    loss_rtol, loss_atol = loss_tol.rtol, loss_tol.atol
    grad_rtol, grad_atol = tolerance("gradients", dtype).for_tree(grads_ref)
    if rtol is not None:
        loss_rtol = grad_rtol = rtol
    if atol is not None:
        loss_atol = grad_atol = atol
    rows = [compare_arrays("loss", np.array(ours), np.array(theirs), loss_rtol, loss_atol)]
    for i, (layer, g, g_ref) in enumerate(zip(network.layers, grads, grads_ref)):
        for key in sorted(g_ref):
            name = f"layer {i} {describe(layer)} {key}"
            if key not in g:
                rows.append(ArrayCheck(name, (), np.inf, np.inf, problem="no gradient"))
                continue
            rows.append(compare_arrays(name, g[key], g_ref[key], grad_rtol, grad_atol))
    return rows


def gradcheck_network(
    network: Network,
    dtype: Any,
    seed: int,
    x: np.ndarray,
    labels: np.ndarray,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[ArrayCheck]:
    """``python -m research gradcheck --layers ...``: :func:`check_network` at the network's
    initial parameters (``init_params(network, seed, dtype)``), in training mode (batch
    statistics from the starting state, dropout masks drawn from ``default_rng([seed, 1])``), on
    inputs x (B, 784) or (B, *in_shape) and labels (B,) as one-hot targets."""
    dtype = np.dtype(dtype)
    params = init_params(network, seed, dtype)
    state = init_state(network, dtype)
    rows = len(x)
    masks = draw_masks(network, np.random.default_rng([seed, 1]), rows, dtype)
    inputs = np.asarray(x, dtype).reshape(rows, *network.in_shape)
    targets = np.eye(network.n_outputs, dtype=dtype)[np.asarray(labels)]
    return check_network(
        network, params, inputs, targets, state=state, masks=masks, rtol=rtol, atol=atol
    )


def verify_all(cases: Sequence[tuple[Layer, Shape]], **options: Any) -> list[LayerVerdict]:
    """:func:`verify_layer` over (layer, in_shape) pairs with the same options."""
    return [verify_layer(layer, shape, **options) for layer, shape in cases]
