"""The training loop: seeded shuffling, mini-batches, an optimizer step, per-epoch metrics.

Training knows nothing of Optuna or MLflow: after each epoch it hands an :class:`EpochMetrics` to
an ``on_epoch`` callback, and the tracking and tuning layers hang off that callback.

Each step runs on :class:`~research.engine.inplace.InPlaceTrainingStep`, the in-place equivalent
of ``mlp.loss_and_grads`` followed by ``optimizer.update`` (tested to agree in float64). A network
of layers (``layers`` set) runs on :class:`~research.engine.stack_step.NetworkTrainingStep`, with
the same generators, checks and metrics (:mod:`.network_training` holds what differs); its
running statistics (batch norm's) come back in :attr:`TrainResult.state`.

Mini-batches: the rows are shuffled by a generator seeded from ``seed`` once per epoch; the last
partial batch is kept unless ``drop_last`` is set (the origin program dropped it, so the
``origin`` preset does too). ``train/loss`` is the mean of the batch losses over the epoch,
weighted by batch size (computed with the gradients, so it costs nothing extra; the parameters
move during the epoch, as in the origin's printout). ``val/loss`` and ``val/accuracy`` are
computed after the epoch with the final parameters of that epoch.

Inputs: float arrays, or uint8 images (N, 784) as ``research.data.Split.images`` holds them. The
training set is then never held as floats: each batch's rows are gathered as bytes and turned
into inputs by the step (``research.data.pixel_values``: k/255, or k with ``raw_inputs``), and the
validation rows chunk by chunk, so training on ``split.images`` gives exactly what training on
``split.x`` gives, in float32 and float64 alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.data import N_CLASSES, augment_rows, pixel_values, to_inputs
from research.engine.inplace import InPlaceTrainingStep
from research.engine.mlp import (
    Masks,
    MLPSpec,
    Params,
    data_loss,
    dropout_masks,
    forward_layers,
    init_params,
    l2_penalty,
)
from research.engine.network import NetParams, NetState, Network
from research.engine.network import init_params as init_network
from research.engine.optim import (
    Optimizer,
    Schedule,
    learning_rate_schedule,
    linear_ramp,
    make_optimizer,
)
from research.engine.stack_step import NetworkTrainingStep
from research.experiment.config.fields import TrainConfig
from research.experiment.training.divergence import (
    DivergenceError,
    check_not_exploded,
    finite_copy,
    loss_limit,
)
from research.experiment.training.interrupts import (  # noqa: F401 (they lived here first)
    Terminated,
    interruption,
    raise_pending_interrupt,
    signals_deferred,
    stop_on_sigterm,
)
from research.experiment.training.network_training import (
    check_network_fields,
    network_mask_drawer,
    network_metrics,
)


@dataclass(frozen=True)
class EpochMetrics:
    """What the loop reports after every epoch. ``epoch`` counts from 0, as MLflow steps and
    Optuna's ``trial.report`` steps do, so one number names an epoch everywhere."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    learning_rate: float = math.nan  # the rate of the epoch's last step (a schedule moves it)

    def as_metrics(self) -> dict[str, float]:
        """Metric names as logged and shown everywhere."""
        return {
            "train/loss": self.train_loss,
            "val/loss": self.val_loss,
            "val/accuracy": self.val_accuracy,
            "epoch_seconds": self.seconds,
            "learning_rate": self.learning_rate,
        }


@dataclass
class TrainResult:
    """The final parameters and the history. ``model`` is what the parameters belong to: the
    MLP's spec, or the network of layers (``layers`` set), whose running ``state`` (one dict per
    layer: batch norm's statistics; [] for the MLP) goes with them to evaluate and save them:
    ``evaluate(result.params, x, labels, result.model, state=result.state)``."""

    params: Params | NetParams
    history: list[EpochMetrics] = field(default_factory=list)
    state: NetState = field(default_factory=list)
    model: MLPSpec | Network | None = None
    #: With ``restore_best``: the epoch (from 0) whose parameters these are; else None (the last).
    best_epoch: int | None = None

    def record(self, metrics: EpochMetrics, params: Any, state: NetState, keep_best: bool) -> None:
        """Adds an epoch to the history and takes its parameters and state: every epoch's, or
        with ``keep_best`` only those of an epoch whose validation accuracy beats the best so
        far (the first of a tie), which ``best_epoch`` then names."""
        self.history.append(metrics)
        if keep_best:
            best = self.best_epoch
            if best is not None and metrics.val_accuracy <= self.history[best].val_accuracy:
                return
            self.best_epoch = metrics.epoch
        self.params, self.state = params, state

    @property
    def network(self) -> Network | None:
        """The network of layers, or None for the MLP."""
        return self.model if isinstance(self.model, Network) else None

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.history)


def evaluate(
    params: Params | NetParams,
    x: np.ndarray,
    labels: np.ndarray,
    spec: MLPSpec | Network,
    chunk: int | None = None,
    *,
    raw: bool | None = None,
    state: NetState | None = None,
) -> tuple[float, float]:
    """Loss (with the l2 term) and accuracy of ``params`` on x (N, 784), labels (N,).

    x: float inputs, or uint8 images converted chunk by chunk (``research.data.to_inputs``), in
    which case ``raw`` must say how a byte becomes an input (k/255, or k when True): there is no
    default, as a wrong guess would run silently at 255 times the scale. ``spec`` may be a
    network of layers, evaluated in evaluation mode with its running ``state``
    (:func:`~.network_training.network_metrics`); chunks of 10,000 rows for the MLP.
    """
    images = _check_inputs(x, "x")
    if images and raw is None:
        raise ValueError("evaluate on uint8 images needs raw= (True: inputs 0..255, False: k/255)")
    if isinstance(spec, Network):
        return network_metrics(spec, params, state, x, labels, raw=raw, chunk=chunk)
    chunk = chunk or 10_000
    dtype = params[0]["W"].dtype
    total_loss = 0.0
    correct = 0
    eye = np.eye(spec.sizes[-1], dtype=dtype)
    for start in range(0, len(x), chunk):
        if images:
            xb = to_inputs(x[start : start + chunk], bool(raw), dtype)
        else:
            xb = np.asarray(x[start : start + chunk], dtype=dtype)
        lb = labels[start : start + chunk]
        _, logits = forward_layers(params, xb, spec)
        total_loss += float(data_loss(logits, eye[lb], spec)) * len(xb)
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == lb))
    return total_loss / len(x) + l2_penalty(params, spec.l2), correct / len(x)


def _check_inputs(x: np.ndarray, name: str) -> bool:
    """True for uint8 images, False for float inputs; anything else is refused (integers other
    than uint8 would be taken for pixel values at the wrong scale, booleans and objects make no
    inputs)."""
    dtype = x.dtype if isinstance(x, np.ndarray) else np.asarray(x).dtype
    if dtype == np.uint8:
        return True
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name} must be uint8 images or float inputs, got {dtype}")
    return False


def train_epoch(
    stepper: InPlaceTrainingStep | NetworkTrainingStep,
    x: np.ndarray,
    targets: np.ndarray,
    order: np.ndarray,
    n_batches: int,
    epoch: int = 0,
    on_step: Callable[[int, int, int], None] | None = None,
    batch_losses: list[float] | None = None,
    draw_masks: Callable[[int], Masks] | None = None,
) -> float:
    """The steps of one epoch: batches of ``stepper.batch_size`` rows taken from ``order``.

    Args:
        stepper: parameters and optimizer state, stepped in place.
        x: inputs (N, n_in) in the stepper's dtype, or uint8 images if the stepper was given
            ``pixel_values``; targets (N, n_out) in the stepper's dtype.
        order: the epoch's row order (a permutation of N); batch ``step`` is its slice
            ``[step·B, (step+1)·B)``, so the last one may be short.
        n_batches: how many batches to take.
        epoch, on_step: for the progress callback and error messages.
        batch_losses: if given, each batch's loss is appended to it.
        draw_masks: fresh dropout masks for a batch of that many rows (None: no dropout).
    Returns:
        The mean batch loss, weighted by batch size.
    Raises:
        DivergenceError: a batch loss is not finite.
    """
    batch_size = stepper.batch_size
    loss_sum = 0.0
    rows_seen = 0
    for step in range(n_batches):
        index = order[step * batch_size : (step + 1) * batch_size]
        masks = None if draw_masks is None else draw_masks(len(index))
        batch_loss = stepper.step(x, targets, index, masks)
        if not np.isfinite(batch_loss):
            raise DivergenceError(epoch, step, f"the batch loss is {batch_loss}")
        loss_sum += batch_loss * len(index)
        rows_seen += len(index)
        if batch_losses is not None:
            batch_losses.append(float(batch_loss))
        if on_step is not None:
            on_step(epoch, step, n_batches)
    return loss_sum / rows_seen


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end training after that epoch: :func:`train` then
    returns its result so far (parameters, running state and history of the epochs done)."""


def train(
    config: TrainConfig,
    x_train: np.ndarray,
    labels_train: np.ndarray,
    x_val: np.ndarray | None,
    labels_val: np.ndarray | None,
    on_epoch: Callable[[EpochMetrics, Params], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    params: Params | NetParams | None = None,
    restore_best: bool = False,
) -> TrainResult:
    """Trains the network of ``config`` and returns the final parameters and the history.

    Args:
        x_train: (N, 784) float inputs, or uint8 images (``Split.images``), which are never
            converted as a whole: each batch becomes floats as it is gathered, by
            ``pixel_values(config.raw_inputs, config.dtype)``; labels_train: (N,) integer classes.
        x_val, labels_val: the validation split, same layout (uint8 or floats, independently of
            x_train); None for a final fit on all non-test data (validation metrics then NaN).
        on_epoch: called after every epoch with its metrics and the current parameters; it may
            raise to stop training (the Optuna layer prunes this way), or raise
            :class:`StopTraining` to end it there and get the result so far (a time budget).
        on_step: called after every optimizer step with (epoch, step, steps_per_epoch), both
            counted from 0.
        params: starting parameters; default ``init_params(spec, seed, dtype, init)``, or for a
            network of layers (``config.network()``) its ``init_params`` from the same generator
            (its running state then starts from ``init_state``).
        restore_best: return the parameters and state of the epoch of best validation
            accuracy (the first of a tie; ``result.best_epoch``), not the last one's.
    Raises:
        DivergenceError: a batch loss is not finite, an epoch's mean loss has exploded
            (:func:`loss_limit`), or at the end of an epoch a parameter is not finite.
        ValueError: inputs neither uint8 nor floats, a batch larger than the training set, or
            restore_best without x_val.
        ConfigError: a field a network of layers cannot honour (max_norm).
    """
    model: MLPSpec | Network = config.network() or config.spec()
    dtype = np.dtype(config.dtype)
    images = _check_training_inputs(config, x_train, x_val, restore_best)
    # Expanded once, before the epochs; validation rows are never augmented.
    x_train, labels_train = augment_rows(config.augment, x_train, labels_train)
    n_rows = len(x_train)
    init_rng, shuffle_rng, dropout_rng = _generators(config.seed)
    params = _initial_params(config, model, init_rng) if params is None else params
    n_batches = n_rows // config.batch_size if config.drop_last else -(-n_rows // config.batch_size)
    optimizer, rate = _optimizer(config, n_batches)
    stepper = _stepper(config, model, params, optimizer, images)
    state = getattr(stepper, "net_state", [])
    x_train = x_train if images else np.asarray(x_train, dtype=dtype)
    targets = np.eye(N_CLASSES, dtype=dtype)[labels_train]
    result = TrainResult(params=params, state=state, model=model)
    limit = _explosion_limit(config, model, params, x_train, labels_train, state)
    draw = _mask_drawer(config, model, dropout_rng)
    # A diverging run overflows on its way to inf/nan; that is detected and reported below as a
    # DivergenceError, so numpy's floating-point warnings would only repeat it noisily.
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(config.epochs):
            started = time.perf_counter()
            order = shuffle_rng.permutation(n_rows)
            batch_losses: list[float] = []
            train_loss = train_epoch(
                stepper, x_train, targets, order, n_batches, epoch, on_step, batch_losses, draw
            )
            check_not_exploded(batch_losses, limit, epoch, n_batches)
            params, state, metrics = _epoch_end(
                stepper, config, model, (x_val, labels_val), (epoch, n_batches, started),
                train_loss, rate((epoch + 1) * n_batches - 1),
            )  # fmt: skip
            raise_pending_interrupt()
            result.record(metrics, params, state, restore_best)
            if on_epoch is not None:
                try:
                    on_epoch(metrics, params)
                except StopTraining:
                    break
    return result


def _generators(seed: int) -> tuple[np.random.Generator, ...]:
    """One generator per use, all from the seed: init, shuffles, dropout masks. (Children of a
    SeedSequence depend on their index only: adding the third left the first two unchanged.)"""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))


def _epoch_end(
    stepper: Any,
    config: TrainConfig,
    model: MLPSpec | Network,
    validation: tuple[np.ndarray | None, np.ndarray | None],
    where: tuple[int, int, float],
    train_loss: float,
    learning_rate: float,
) -> tuple[Any, Any, EpochMetrics]:
    """After an epoch's steps: copies of the parameters and running state (checked finite) and
    the epoch's metrics. ``where``: the epoch, the batches per epoch and when the epoch began
    (``time.perf_counter``)."""
    epoch, n_batches, started = where
    params = finite_copy(stepper.params, epoch, n_batches)
    state = finite_copy(getattr(stepper, "net_state", []), epoch, n_batches)
    val_loss, val_accuracy = _validation_metrics(params, *validation, model, config, state)
    metrics = EpochMetrics(
        epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - started,
        learning_rate=learning_rate,
    )  # fmt: skip
    return params, state, metrics


def _initial_params(
    config: TrainConfig, model: MLPSpec | Network, rng: np.random.Generator
) -> Params | NetParams:
    """The starting parameters, drawn from the run's init generator in the run's dtype: a
    network of layers' ``init_params``, or the MLP's with the run's ``init`` scheme."""
    dtype = np.dtype(config.dtype)
    if isinstance(model, Network):
        return init_network(model, rng, dtype)
    return init_params(model, rng, dtype=dtype, scheme=config.init)


def _check_training_inputs(
    config: TrainConfig, x_train: np.ndarray, x_val: np.ndarray | None, restore_best: bool
) -> bool:
    """True if x_train (N, 784) holds uint8 images, False for floats; refuses other inputs
    (x_val's too), a batch larger than the training set, what a network cannot honour and
    restoring the best validation epoch without validation rows."""
    if restore_best and x_val is None:
        raise ValueError("restore_best needs validation rows (x_val) to choose the epoch by")
    check_network_fields(config)
    images = _check_inputs(x_train, "x_train")
    if x_val is not None:
        _check_inputs(x_val, "x_val")
    if config.batch_size > len(x_train):
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {len(x_train)} training rows"
        )
    return images


def _stepper(
    config: TrainConfig,
    spec: MLPSpec | Network,
    params: Params | NetParams,
    optimizer: Optimizer,
    images: bool,
) -> InPlaceTrainingStep | NetworkTrainingStep:
    """The fast path: loss_and_grads + optimizer.update computed in place, on a copy of
    ``params`` (tests/test_inplace.py); a network of layers steps through its own layers. uint8
    images stay bytes: the stepper converts each batch it gathers (by the same table as Split.x,
    so the trajectory is the one training on the floats gives)."""
    pixels = pixel_values(config.raw_inputs, np.dtype(config.dtype)) if images else None
    if isinstance(spec, Network):
        return NetworkTrainingStep(spec, params, optimizer, config.batch_size, pixel_values=pixels)
    return InPlaceTrainingStep(
        spec, params, optimizer, config.batch_size, max_norm=config.max_norm, pixel_values=pixels
    )


def _validation_metrics(
    params: Params | NetParams,
    x_val: np.ndarray | None,
    labels_val: np.ndarray | None,
    spec: MLPSpec | Network,
    config: TrainConfig,
    state: NetState,
) -> tuple[float, float]:
    """Loss and accuracy of ``params`` (and a network's running ``state``) on x_val (N, 784),
    labels_val (N,); NaN for both when there is no validation split (a final fit)."""
    if x_val is None or labels_val is None:
        return float("nan"), float("nan")
    return evaluate(params, x_val, labels_val, spec, raw=config.raw_inputs, state=state)


def _optimizer(config: TrainConfig, n_batches: int) -> tuple[Optimizer, Schedule]:
    """The optimizer of ``config`` with its own fields, and the learning rate at each optimizer
    step (what the epoch's metrics report; a constant rate is handed to the optimizer as a
    number). Schedules count optimizer steps; their fields count epochs, of ``n_batches``
    steps."""
    rate = learning_rate_schedule(
        config.learning_rate,
        config.schedule,
        total_steps=config.epochs * n_batches,
        decay_steps=config.decay_epochs * n_batches,
        decay_rate=config.decay_rate,
        warmup_steps=config.warmup_epochs * n_batches,
    )
    beta = (
        linear_ramp(config.momentum, config.final_momentum, config.momentum_epochs * n_batches)
        if config.momentum_epochs
        else config.momentum
    )
    options = {
        "sgd": {},
        "momentum": {"beta": beta, "nesterov": config.nesterov},
        "adam": {},
    }[config.optimizer]
    constant = config.schedule == "constant" and not config.warmup_epochs
    optimizer = make_optimizer(
        config.optimizer, config.learning_rate if constant else rate, **options
    )
    return optimizer, rate


def _explosion_limit(
    config: TrainConfig,
    spec: MLPSpec | Network,
    params: Params | NetParams,
    x_train: np.ndarray,
    labels_train: np.ndarray,
    state: NetState,
) -> float:
    """:func:`loss_limit` of the loss at initialization (evaluation mode, a network's starting
    ``state``), on one batch's worth of rows: the first ``batch_size`` rows of x_train (N, 784)
    and labels_train (N,). One forward pass, no random numbers drawn: the trajectory is
    unchanged."""
    initial_loss, _ = evaluate(
        params,
        x_train[: config.batch_size],
        labels_train[: config.batch_size],
        spec,
        raw=config.raw_inputs,
        state=state,
    )
    return loss_limit(initial_loss)


def _mask_drawer(
    config: TrainConfig, spec: MLPSpec | Network, rng: np.random.Generator
) -> Callable[[int], Masks] | None:
    """Draws a batch's dropout masks from ``rng``: for ``rows`` rows, one (rows, width) array in
    the run's dtype or None per layer of ``spec`` (``mlp.dropout_masks``; a network's
    ``draw_masks``); None if ``config`` has no dropout (a network: no layer takes a mask)."""
    if isinstance(spec, Network):
        return network_mask_drawer(spec, rng, np.dtype(config.dtype))
    if not (config.input_dropout or config.dropout):
        return None
    sizes, dtype = spec.sizes, np.dtype(config.dtype)

    def draw(rows: int) -> Masks:
        return dropout_masks(rng, rows, sizes, config.input_dropout, config.dropout, dtype)

    return draw
