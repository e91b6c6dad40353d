"""When training has diverged: a non-finite loss or parameter, or a loss that exploded while
staying finite (:class:`DivergenceError`, raised by the training loop and reported by every
command as one line)."""

from __future__ import annotations

import math

import numpy as np

from research.data import N_CLASSES
from research.engine.mlp import Params


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter. ``epoch`` and ``step`` count from 0
    (the epochs finished before it, as MLflow's steps); the message counts from 1, as the
    commands print epochs ("epoch 1/8")."""

    def __init__(self, epoch: int, step: int, what: str):
        self.epoch, self.step, self.what = epoch, step, what
        super().__init__(
            f"training diverged at epoch {epoch + 1}, step {step + 1}: {what}; try a smaller "
            "learning_rate"
        )


#: A loss this many times its value at initialization (or at chance) over a quarter epoch exploded.
EXPLOSION_FACTOR = 10.0


def loss_limit(initial_loss: float, n_classes: int = N_CLASSES) -> float:
    """The mean batch loss (over an epoch's last quarter) above which a run has diverged though
    it stays finite.

    A learning rate far too large can drive cross-entropy to 1e15 and leave the weights finite:
    every epoch completes at chance accuracy. No run that learns averages, over a quarter epoch, ten
    times its loss at initialization or ten times the cross-entropy of a uniform guess (log 10),
    whichever is larger; the latter keeps a lucky low first batch from setting a limit a run can
    touch. A mean over many batches, not one: a single spike that recovers is not divergence.
    """
    return EXPLOSION_FACTOR * max(float(initial_loss), math.log(n_classes))


def check_not_exploded(batch_losses: list[float], limit: float, epoch: int, n_batches: int) -> None:
    """Raises :class:`DivergenceError` if the epoch's batch losses average above ``limit`` over
    its last quarter.

    Judged on the epoch's last quarter: a high learning rate often spikes to 20 times chance in
    its first steps and recovers within ten, which would set the mean of an epoch of few batches
    (measured: Adam at 0.1, 8 batches of 256).
    """
    recent = float(np.mean(batch_losses[-max(1, len(batch_losses) // 4) :]))
    if recent > limit:
        raise DivergenceError(
            epoch,
            n_batches - 1,
            f"the loss exploded: {recent:.4g} over the epoch's last quarter, above "
            f"{limit:.4g} (ten times its loss at initialization or at chance)",
        )


def finite_copy(params: list[dict[str, np.ndarray]], epoch: int, n_batches: int) -> Params:
    """A copy of ``params`` (or a network's running state): callers keep each epoch's, as the
    stepper keeps overwriting its own; raises :class:`DivergenceError` if any array is not
    finite."""
    copied = [{key: value.copy() for key, value in layer.items()} for layer in params]
    for i, layer in enumerate(copied):
        for key, value in layer.items():
            if not np.all(np.isfinite(value)):
                raise DivergenceError(epoch, n_batches - 1, f"layer {i} {key} is not finite")
    return copied
