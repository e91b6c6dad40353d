"""Optimizers written by hand in numpy, as pure updates over the parameter list.

Each optimizer is a pair of pure functions, in the style of optax:

    optimizer = adam(learning_rate=1e-3)
    state = optimizer.init(params)
    params, state = optimizer.update(params, grads, state)

``update`` returns new parameter and state lists and never modifies its arguments. The update
rules match optax's ``sgd`` (with and without momentum / Nesterov) and ``adam`` exactly, which is
how the tests check them against JAX.

Each optimizer also has ``update_in_place(params, grads, state)``: the same rule, each operation
evaluated as ``update`` evaluates it (so the results are identical to ``update``'s, bit for bit),
but writing into ``params`` and ``state`` (``grads`` are only read, but for plain SGD's, used as
scratch). It is what the training loop's fast path (:mod:`research.engine.inplace`) calls: no
fresh copy of any parameter or state array per step, and the whole rule applied block by block,
each block in cache from its first operation to its last (:mod:`research.engine.blocks`): one
pass over memory instead of one per operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from research.engine.blocks import BLOCKS
from research.engine.mlp import Params

OptimizerName = Literal["sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

State = Any
#: A hyperparameter as a function of the update's index (0 for the first update), as optax's
#: schedules are: the learning rate (and momentum's beta) may be a number or a schedule.
Schedule = Callable[[int], float]


@dataclass(frozen=True)
class Optimizer:
    """A named pair of pure functions: ``init(params) -> state`` and
    ``update(params, grads, state) -> (new_params, new_state)``."""

    name: str
    init: Callable[[Params], State]
    update: Callable[[Params, Params, State], tuple[Params, State]]
    # The same rule, overwriting params and state (and plain SGD's grads); returns None.
    update_in_place: Callable[[Params, Params, State], None]
    learning_rate: float | Schedule

    @property
    def plain_gradient_step(self) -> bool:
        """True when both updates are exactly p ← p − rate·g with ``rate_at(state)`` and a state
        of nothing but the step count: then a training step may fold the rate into the gradient
        and update the weights inside their gradient's matrix product
        (:mod:`research.engine.inplace`). What says so is a mark on the two functions
        :func:`sgd` makes, not the name: an optimizer that replaces either function (a wrapper
        that clips, decays or logs, keeping the name ``sgd``) is stepped by its own update."""
        return getattr(self.update, "plain_gradient_step", False) and getattr(
            self.update_in_place, "plain_gradient_step", False
        )

    def rate_at(self, state: State) -> float:
        """The learning rate the next update (from ``state``) uses."""
        return _value(self.learning_rate, state["count"])


def _value(hyperparameter: float | Schedule, count: int) -> float:
    return float(hyperparameter(count)) if callable(hyperparameter) else hyperparameter


def _check_rate(learning_rate: float | Schedule) -> None:
    if callable(learning_rate):
        return  # a schedule (a warm-up starts at 0): its base rate is checked where it is made
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, int | float | np.integer | np.floating)
        or not np.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise ValueError(
            f"learning_rate={learning_rate!r} is not allowed; give a finite number > 0"
        )


def _zeros_like(params: Params) -> Params:
    return [{key: np.zeros_like(value) for key, value in layer.items()} for layer in params]


def _groups(params: Params, *others: Params) -> list[tuple[np.ndarray, ...]]:
    """Each parameter array with its gradient and state arrays, for :meth:`Blocks.run`."""
    return [
        (p, *(other[i][key] for other in others))
        for i, layer in enumerate(params)
        for key, p in layer.items()
    ]


def sgd(learning_rate: float | Schedule) -> Optimizer:
    """Plain SGD, the origin's rule: p ← p − learning_rate · g."""
    _check_rate(learning_rate)

    def init(params: Params) -> State:
        return {"count": 0}

    def update(params: Params, grads: Params, state: State) -> tuple[Params, State]:
        rate = _value(learning_rate, state["count"])
        new = [
            {key: p - p.dtype.type(rate) * g[key] for key, p in layer.items()}
            for layer, g in zip(params, grads)
        ]
        return new, {"count": state["count"] + 1}

    def update_in_place(params: Params, grads: Params, state: State) -> None:
        rate = _value(learning_rate, state["count"])

        def kernel(p: np.ndarray, g: np.ndarray) -> None:
            step = np.multiply(g, p.dtype.type(rate), out=g)
            np.subtract(p, step, out=p)

        BLOCKS.run(kernel, _groups(params, grads))
        state["count"] += 1

    update.plain_gradient_step = True  # type: ignore[attr-defined]
    update_in_place.plain_gradient_step = True  # type: ignore[attr-defined]
    return Optimizer("sgd", init, update, update_in_place, learning_rate)


def momentum(
    learning_rate: float | Schedule, beta: float | Schedule = 0.9, nesterov: bool = False
) -> Optimizer:
    """Heavy-ball momentum: v ← β v + g; p ← p − lr · v (Nesterov: p ← p − lr · (g + β v)).
    ``beta`` may be a schedule too (the dropout paper ramps it up), as optax's
    ``inject_hyperparams(sgd)`` allows."""
    _check_rate(learning_rate)
    first = _value(beta, 0)
    if not 0 <= first < 1:
        raise ValueError(f"beta={first!r} is not allowed; give a number in [0, 1)")

    def init(params: Params) -> State:
        return {"count": 0, "velocity": _zeros_like(params)}

    def update(params: Params, grads: Params, state: State) -> tuple[Params, State]:
        rate, b = _value(learning_rate, state["count"]), _value(beta, state["count"])
        new_params: Params = []
        new_state: Params = []
        for layer, g, v in zip(params, grads, state["velocity"]):
            new_layer, new_v = {}, {}
            for key, p in layer.items():
                dt = p.dtype.type
                velocity = dt(b) * v[key] + g[key]
                step = g[key] + dt(b) * velocity if nesterov else velocity
                new_layer[key] = p - dt(rate) * step
                new_v[key] = velocity
            new_params.append(new_layer)
            new_state.append(new_v)
        return new_params, {"count": state["count"] + 1, "velocity": new_state}

    def update_in_place(params: Params, grads: Params, state: State) -> None:
        rate, b = _value(learning_rate, state["count"]), _value(beta, state["count"])

        def kernel(p: np.ndarray, g: np.ndarray, v: np.ndarray, scratch: np.ndarray) -> None:
            dt = p.dtype.type
            velocity = np.multiply(v, dt(b), out=v)
            velocity += g
            step = velocity
            if nesterov:  # g + β·velocity
                step = np.add(g, np.multiply(velocity, dt(b), out=scratch), out=scratch)
            np.subtract(p, np.multiply(step, dt(rate), out=scratch), out=p)

        BLOCKS.run(kernel, _groups(params, grads, state["velocity"]), scratch=1)
        state["count"] += 1

    return Optimizer("momentum", init, update, update_in_place, learning_rate)


def adam(
    learning_rate: float | Schedule, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
) -> Optimizer:
    """Adam (Kingma & Ba) with bias correction; eps is added outside the square root, as optax."""
    _check_rate(learning_rate)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value!r} is not allowed; give a number in [0, 1)")

    def init(params: Params) -> State:
        return {"count": 0, "mu": _zeros_like(params), "nu": _zeros_like(params)}

    def update(params: Params, grads: Params, state: State) -> tuple[Params, State]:
        rate = _value(learning_rate, state["count"])
        count = state["count"] + 1
        new_params: Params = []
        new_mu: Params = []
        new_nu: Params = []
        for layer, g, m, v in zip(params, grads, state["mu"], state["nu"]):
            new_layer, layer_mu, layer_nu = {}, {}, {}
            for key, p in layer.items():
                dt = p.dtype.type
                mu = dt(beta1) * m[key] + dt(1 - beta1) * g[key]
                nu = dt(beta2) * v[key] + dt(1 - beta2) * (g[key] * g[key])
                mu_hat = mu / dt(1 - beta1**count)
                nu_hat = nu / dt(1 - beta2**count)
                new_layer[key] = p - dt(rate) * mu_hat / (np.sqrt(nu_hat) + dt(eps))
                layer_mu[key], layer_nu[key] = mu, nu
            new_params.append(new_layer)
            new_mu.append(layer_mu)
            new_nu.append(layer_nu)
        return new_params, {"count": count, "mu": new_mu, "nu": new_nu}

    def update_in_place(params: Params, grads: Params, state: State) -> None:
        rate = _value(learning_rate, state["count"])
        count = state["count"] + 1

        def kernel(
            p: np.ndarray,
            g: np.ndarray,
            m: np.ndarray,
            v: np.ndarray,
            term: np.ndarray,
            step: np.ndarray,
        ) -> None:
            # each operation as `update` evaluates it, in its order
            dt = p.dtype.type
            mu = np.multiply(m, dt(beta1), out=m)
            mu += np.multiply(g, dt(1 - beta1), out=term)
            nu = np.multiply(v, dt(beta2), out=v)
            nu += np.multiply(np.multiply(g, g, out=term), dt(1 - beta2), out=term)
            denominator = np.divide(nu, dt(1 - beta2**count), out=term)
            np.sqrt(denominator, out=denominator)
            denominator += dt(eps)
            np.multiply(np.divide(mu, dt(1 - beta1**count), out=step), dt(rate), out=step)
            np.subtract(p, np.divide(step, denominator, out=step), out=p)

        BLOCKS.run(kernel, _groups(params, grads, state["mu"], state["nu"]), scratch=2)
        state["count"] = count

    return Optimizer("adam", init, update, update_in_place, learning_rate)


# --- schedules: the learning rate (and momentum) as a function of the update's index ----------

ScheduleName = Literal["constant", "step", "exponential", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


def learning_rate_schedule(
    base: float,
    name: str,
    *,
    total_steps: int,
    decay_steps: int = 1,
    decay_rate: float = 1.0,
    warmup_steps: int = 0,
) -> Schedule:
    """The rate of update k (from 0), as optax's schedules give it.

    ``constant``: ``base``. ``step``: ``base · decay_rate^⌊k / decay_steps⌋`` (optax's
    ``exponential_decay(staircase=True)``). ``exponential``: ``base ·
    decay_rate^(k / decay_steps)``.
    ``cosine``: from ``base`` to 0 along half a cosine over the steps after the warm-up
    (``cosine_decay_schedule``). A warm-up of ``warmup_steps`` first rises linearly from 0 to
    ``base``, then the schedule starts over from its own step 0 (``join_schedules``).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    _check_rate(base)
    decay_length = max(1, total_steps - warmup_steps)

    def after_warmup(k: int) -> float:
        if name == "step":
            return base * decay_rate ** (k // decay_steps)
        if name == "exponential":
            return base * decay_rate ** (k / decay_steps)
        if name == "cosine":
            return base * 0.5 * (1 + math.cos(math.pi * min(k, decay_length) / decay_length))
        return base

    def schedule(k: int) -> float:
        if k < warmup_steps:
            return base * k / warmup_steps
        return after_warmup(k - warmup_steps)

    return schedule


def linear_ramp(start: float, end: float, steps: int) -> Schedule:
    """From ``start`` at update 0 to ``end`` at update ``steps``, then ``end`` (optax's
    ``linear_schedule``): the dropout paper's momentum ramp."""

    def ramp(k: int) -> float:
        return start + (end - start) * min(k, steps) / steps if steps else end

    return ramp


# --- max-norm (Srivastava et al., 2014) ------------------------------------------------------


def max_norm(params: Params, radius: float) -> Params:
    """Projects each hidden unit's incoming weight vector (a column of a hidden layer's W, shape
    (n_in,)) onto the ball of radius ``radius``; the output layer and the biases are left as
    they are. Applied after every update. Returns new parameters (0 = off: the same values)."""
    if radius == 0:
        return params
    projected: Params = []
    for i, layer in enumerate(params):
        W = layer["W"]
        if i < len(params) - 1:
            norms = np.sqrt(np.sum(W * W, axis=0))
            W = W * np.minimum(1, W.dtype.type(radius) / np.maximum(norms, np.finfo(W.dtype).tiny))
        projected.append({"W": W, "b": layer["b"]})
    return projected


def units_at_max_norm(params: Params, radius: float, rtol: float = 1e-5) -> float:
    """The fraction of hidden units whose incoming weight vector (a column of a hidden layer's
    W, shape (n_in,)) lies on the max-norm ball's surface, its norm within ``rtol`` of
    ``radius``: the units the constraint holds back. Read right after an update (and its
    projection), it says whether max-norm binds at all; 0.0 when ``radius`` is 0 (off)."""
    if radius == 0:
        return 0.0
    at_radius = total = 0
    for layer in params[:-1]:
        W = np.asarray(layer["W"], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->j", W, W))
        at_radius += int(np.count_nonzero(norms >= radius * (1 - rtol)))
        total += norms.size
    return at_radius / total if total else 0.0


#: :func:`max_norm_in_place` scales the columns over the radius one by one while they are at
#: most this share of a layer's columns, else the whole of W in one pass (a factor of 1 leaves a
#: weight as it is, so both give the same bits). A (1024, 1024) float32 W, 2-vCPU Intel Xeon:
#: ~9 µs per column against 300–370 µs for the pass; w3's bench steps had 0–9 columns over 1.5.
COLUMN_BY_COLUMN_SHARE = 1 / 32


def max_norm_in_place(params: Params, radius: float, scratch: list[np.ndarray]) -> None:
    """:func:`max_norm`, overwriting ``params``; ``scratch`` holds one (n_out,) array per hidden
    layer, in the parameters' dtype."""
    if radius == 0:
        return
    for layer, norms in zip(params[:-1], scratch):
        W = layer["W"]
        dtype = W.dtype.type
        np.einsum("ij,ij->j", W, W, out=norms)
        np.sqrt(norms, out=norms)
        np.maximum(norms, np.finfo(W.dtype).tiny, out=norms)
        np.divide(dtype(radius), norms, out=norms)
        np.minimum(norms, 1, out=norms)
        # Only the columns whose factor is not exactly 1 change. (Written so that a NaN factor,
        # from a diverged W, still scales as it always did.)
        over = np.flatnonzero(~(norms >= 1))
        if len(over) <= COLUMN_BY_COLUMN_SHARE * len(norms):
            for column in over:
                np.multiply(W[:, column], norms[column], out=W[:, column])
        else:
            W *= norms


def make_optimizer(name: str, learning_rate: float | Schedule, **options: Any) -> Optimizer:
    """Builds an optimizer by name (``sgd``, ``momentum``, ``adam``)."""
    if name == "sgd":
        return sgd(learning_rate)
    if name == "momentum":
        return momentum(learning_rate, **options)
    if name == "adam":
        return adam(learning_rate, **options)
    raise ValueError(f"optimizer {name!r} is not allowed; choose one of {', '.join(OPTIMIZERS)}")
