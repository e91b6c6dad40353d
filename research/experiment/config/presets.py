"""Presets, and configuring a run from one: ``configure`` puts the values a user gave (the
flags of a command line) over a preset's, with the notes and warnings a user gets (a deprecated
preset name, a warm-up as long as the training). The field table itself: :mod:`.fields`."""

from __future__ import annotations

import warnings
from typing import Any

from research.experiment.config.fields import (
    FIELDS,
    MLP_FIELDS,
    TrainConfig,
    layers_conflict,
    with_values,
)


def configure(base: TrainConfig, **given: Any) -> TrainConfig:
    """``base`` with the values a user ``given`` together (a command line's flags) in place of
    its own. The network comes from one spelling: a non-empty ``hidden_sizes`` given replaces
    base's hidden_size and n_hidden_layers, and a given hidden_size or n_hidden_layers replaces
    base's hidden_sizes; given together, the two must agree (ConfigError otherwise). A
    non-empty ``layers`` given replaces base's MLP, an MLP field given replaces base's
    ``layers``; an MLP field given beside a non-empty ``layers`` is a ConfigError, even at its
    default (it would not be used). A warm-up as long as the training is allowed, with a
    :class:`LongWarmup` warning."""
    if "layers" in given and FIELDS["layers"].check(given["layers"]):
        for name in (name for name in MLP_FIELDS if name in given):
            raise layers_conflict(name, given[name], given["layers"])
    config = with_values(base, given)
    note = long_warmup(config)
    if note:
        warnings.warn(note, LongWarmup, stacklevel=2)
    return config


class LongWarmup(UserWarning):
    """A warm-up that lasts the whole training: allowed, but the learning rate never gets to its
    value; the command line shows it as one ``warning:`` line."""


def long_warmup(config: TrainConfig) -> str:
    """Why ``config``'s warm-up is suspect (``warmup_epochs`` >= ``epochs``: the learning rate
    rises from 0 through the whole run), or "" if it is not."""
    warmup, epochs = config.warmup_epochs, config.epochs
    if not warmup or warmup < epochs:
        return ""
    rate = f"learning_rate = {config.learning_rate:g}"
    reached = (
        f"only nears {rate}"
        if warmup == epochs
        else f"only reaches about {epochs / warmup:.0%} of {rate}"
    )
    schedule = (
        "" if config.schedule == "constant" else f"; the {config.schedule} schedule never starts"
    )
    return (
        f"warmup_epochs = {warmup} is not shorter than epochs = {epochs}: the learning rate rises "
        f"from 0 through the whole run and {reached} at its last step{schedule}; shorten the "
        "warm-up or train longer"
    )


# --- the presets ------------------------------------------------------------------------------

PRESETS: dict[str, TrainConfig] = {
    # The origin program: [784, 30, 10], sigmoid everywhere, squared error, plain SGD at 0.01,
    # batch 256 with the remainder dropped, 200 epochs, standard-normal init. Inputs are scaled to
    # [0, 1] unless raw_inputs is set (the origin fed raw 0..255 pixels).
    "origin": TrainConfig(
        hidden_size=30,
        activation="sigmoid",
        output="sigmoid",
        loss="mse",
        init="normal",
        optimizer="sgd",
        learning_rate=0.01,
        nesterov=False,
        batch_size=256,
        epochs=200,
        drop_last=True,
        dtype="float64",
    ),
    # A modern default: ReLU, softmax cross-entropy, Nesterov momentum, He init.
    "default": TrainConfig(),
}
#: Old preset names still accepted, with a note: "seed" now means only random seeds.
PRESET_ALIASES = {"seed": "origin"}


class DeprecatedName(FutureWarning):
    """A name that still works but has a new one; the command line shows it as one note."""


def preset_name(name: Any, stacklevel: int = 2) -> Any:
    """``name`` with a deprecated alias replaced by its preset's name (warning
    :class:`DeprecatedName` when it is one, attributed ``stacklevel`` frames up); anything else
    is returned unchanged."""
    if isinstance(name, str) and name in PRESET_ALIASES:
        new = PRESET_ALIASES[name]
        warnings.warn(
            f'the preset "{name}" is now called "{new}"; "{name}" still works but is deprecated',
            DeprecatedName,
            stacklevel=stacklevel,
        )
        return new
    return name


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset with some fields replaced; unknown presets raise ValueError."""
    name = preset_name(name, stacklevel=3)
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return configure(PRESETS[name], **overrides)
