"""The training loop: determinism, callbacks, batching, divergence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import assert_close

from research.experiment.config.fields import TrainConfig
from research.experiment.config.presets import PRESETS, preset
from research.experiment.training.train import DivergenceError, evaluate, train


def small_data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 784))
    labels = rng.integers(0, 10, n)
    x = centers[labels] + 0.5 * rng.normal(size=(n, 784))
    return x, labels


def test_training_is_deterministic_and_reports_every_epoch():
    x, labels = small_data()
    config = replace(PRESETS["default"], hidden_size=32, epochs=3, batch_size=50)
    seen = []
    first = train(
        config, x[:500], labels[:500], x[500:], labels[500:], on_epoch=lambda m, p: seen.append(m)
    )
    second = train(config, x[:500], labels[:500], x[500:], labels[500:])
    assert [m.epoch for m in seen] == [0, 1, 2]
    assert [m.val_loss for m in first.history] == [m.val_loss for m in second.history]
    assert np.array_equal(first.params[0]["W"], second.params[0]["W"])
    assert first.history[-1].val_accuracy > 0.9  # separable clusters: it must learn
    other = train(replace(config, seed=1), x[:500], labels[:500], x[500:], labels[500:])
    assert not np.array_equal(first.params[0]["W"], other.params[0]["W"])


#: The last step of each of 4 epochs of 10 steps: what learning_rate reports per epoch.
LAST_STEPS = (9, 19, 29, 39)


@pytest.mark.parametrize(
    ("schedule", "rates"),
    [
        ({}, [0.1, 0.1, 0.1, 0.1]),
        ({"schedule": "step", "decay_epochs": 1, "decay_rate": 0.5}, [0.1, 0.05, 0.025, 0.0125]),
        # a warm-up to step 10, then steps 9, 19, 29 of the decay: 0.1 · 0.1^⌊k/20⌋
        ({"schedule": "step", "decay_epochs": 2, "warmup_epochs": 1}, [0.09, 0.1, 0.1, 0.01]),
        ({"schedule": "cosine"}, [0.05 * (1 + np.cos(np.pi * k / 40)) for k in LAST_STEPS]),
        (
            {"schedule": "exponential", "decay_rate": 0.5},
            [0.1 * 0.5 ** (k / 100) for k in LAST_STEPS],
        ),
    ],
    ids=["constant", "step", "warmup-step", "cosine", "exponential"],
)
def test_the_learning_rate_follows_its_schedule_and_is_reported_per_epoch(schedule, rates):
    """The rate of each epoch's last step; the schedules count steps (10 per epoch here), and
    their fields epochs. The momentum ramp runs alongside (its own fields)."""
    x, labels = small_data()
    config = replace(
        PRESETS["default"], hidden_size=16, epochs=4, batch_size=50, learning_rate=0.1,
        momentum_epochs=2, final_momentum=0.95, **schedule,
    )  # fmt: skip
    result = train(config, x[:500], labels[:500], x[500:], labels[500:])
    reported = np.array([m.learning_rate for m in result.history])
    assert_close(reported, np.array(rates, dtype=float), "schedules", "learning rates")
    assert result.history[-1].val_accuracy > 0.5  # (it trains)


@pytest.mark.parametrize(("drop_last", "steps"), [(False, 5), (True, 4)])
def test_partial_batch_kept_or_dropped(drop_last, steps):
    x, labels = small_data(130)
    config = replace(
        PRESETS["default"], hidden_size=8, epochs=1, batch_size=32, drop_last=drop_last
    )
    calls = []
    train(config, x, labels, x[:10], labels[:10], on_step=lambda e, s, n: calls.append((s, n)))
    assert calls[-1] == (steps - 1, steps)


def test_float32_training_stays_float32():
    x, labels = small_data()
    config = replace(PRESETS["default"], hidden_size=16, epochs=1, dtype="float32")
    result = train(config, x[:500], labels[:500], x[500:], labels[500:])
    assert all(layer["W"].dtype == np.float32 for layer in result.params)


def test_divergence_names_epoch_and_step():
    x, labels = small_data()
    config = replace(
        PRESETS["default"],
        activation="relu",
        output="identity",
        loss="mse",
        hidden_size=32,
        optimizer="sgd",
        learning_rate=1e6,
        epochs=5,
        batch_size=50,
    )
    with pytest.raises(DivergenceError) as error:
        train(config, x[:500] * 100, labels[:500], x[500:], labels[500:])
    assert error.value.epoch == 0 and error.value.step >= 0
    # counted from 0 as numbers, from 1 in the message (as the commands print epochs)
    assert f"epoch {error.value.epoch + 1}, step {error.value.step + 1}" in str(error.value)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="cross_entropy"):
        TrainConfig(output="sigmoid", loss="cross_entropy")
    with pytest.raises(ValueError, match="preset"):
        preset("fancy")
    x, labels = small_data(100)
    with pytest.raises(ValueError, match="batch_size=128 is larger"):
        train(TrainConfig(), x, labels, x, labels)


def test_seed_preset_is_the_origin_configuration():
    config = PRESETS["origin"]
    spec = config.spec()
    assert spec.sizes == (784, 30, 10)
    assert (spec.activation, spec.output, spec.loss) == ("sigmoid", "sigmoid", "mse")
    assert (config.optimizer, config.learning_rate, config.batch_size, config.epochs) == (
        "sgd",
        0.01,
        256,
        200,
    )
    assert config.init == "normal" and config.drop_last


def test_evaluate_matches_hand_count():
    x, labels = small_data(200)
    config = replace(PRESETS["default"], hidden_size=8)
    params = train(replace(config, epochs=1, batch_size=20), x, labels, x, labels).params
    from research.engine.mlp import predict

    _, accuracy = evaluate(params, x, labels, config.spec(), chunk=64)
    assert accuracy == np.mean(predict(params, x, config.spec()) == labels)


@pytest.mark.slow
def test_default_preset_reaches_98_percent_in_10_epochs(mnist):
    config = PRESETS["default"]
    assert config.epochs <= 10
    result = train(
        config, mnist.train.x, mnist.train.labels, mnist.validation.x, mnist.validation.labels
    )
    assert result.history[-1].val_accuracy >= 0.98
