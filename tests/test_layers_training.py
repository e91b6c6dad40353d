"""A network of layers (``layers`` set) trained, evaluated, saved and served like the MLP.

The training loop runs it on :class:`research.engine.stack_step.NetworkTrainingStep`: it learns
on real MNIST rows, reproducibly; a stack of dense layers follows the MLP's trajectory; batch
norm's running statistics come back with the parameters, are saved with them in the weights file
and used by the MLflow model, which takes (B, 784) rows and (B, 1, 28, 28) images alike.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import EXACT, assert_close

from research.data import to_inputs
from research.engine import network as net
from research.engine.stack_step import NetworkTrainingStep, outputs, predict
from research.experiment.config.fields import ConfigError, TrainConfig
from research.experiment.tracking.weights import (
    WeightsError,
    describe_weights,
    load_weights,
    read_weights,
    save_weights,
)
from research.experiment.training.train import DivergenceError, TrainResult, evaluate, train

CONV_NET = "conv(4,5) maxpool(2) dense(16)"
NORM_NET = "dense(32) batchnorm dense(16) layernorm"
NETWORKS = [pytest.param(CONV_NET, id="conv"), pytest.param(NORM_NET, id="norms")]
N_TRAIN, N_VAL = 400, 200


def rows(mnist) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A few hundred real MNIST rows: uint8 training images and labels, validation alike."""
    return (
        mnist.train.images[:N_TRAIN],
        mnist.train.labels[:N_TRAIN],
        mnist.validation.images[:N_VAL],
        mnist.validation.labels[:N_VAL],
    )


def layers_config(layers: str, dtype: str = "float64", **fields) -> TrainConfig:
    values = {"epochs": 2, "batch_size": 50, "learning_rate": 0.05, **fields}
    return TrainConfig(layers=layers, dtype=dtype, **values)


def trajectory(result: TrainResult) -> list[dict]:
    """What a run gives, as a tree: each epoch's losses and accuracy, params, running state."""
    history = [
        {"values": np.array([m.train_loss, m.val_loss, m.val_accuracy])} for m in result.history
    ]
    return history + [p for p in result.params if p] + [s for s in result.state if s]


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layers", NETWORKS)
def test_a_network_of_layers_learns_real_digits_reproducibly(mnist, layers, dtype):
    x, labels, x_val, labels_val = rows(mnist)
    config = layers_config(layers, dtype)
    seen = []
    first = train(config, x, labels, x_val, labels_val, on_epoch=lambda m, p: seen.append(p))
    network = config.network()
    assert first.network == network and first.model == network
    assert [m.epoch for m in first.history] == [0, 1]
    # the loss goes down, and it learns: chance is 10%
    initial, _ = evaluate(
        net.init_params(network, np.random.default_rng(0), np.dtype(dtype)),
        x_val, labels_val, network, raw=False, state=net.init_state(network, np.dtype(dtype)),
    )  # fmt: skip
    assert first.history[-1].val_loss < min(initial, first.history[0].val_loss)
    assert first.history[-1].val_accuracy > 0.6
    # every array in the run's dtype; the callback got each epoch's parameters, copies
    dtypes = {v.dtype for tree in (first.params, first.state) for p in tree for v in p.values()}
    assert dtypes == {np.dtype(dtype)}
    assert_close(seen[-1], first.params, EXACT, "the last epoch's params")
    # batch norm's running statistics moved from their start, and evaluation uses them
    stateful = [i for i, s in enumerate(first.state) if s]
    assert stateful == [i for i, layer in enumerate(network.layers) if "state" in net.needs(layer)]
    for i in stateful:
        assert not np.allclose(first.state[i]["mean"], 0)
    assert evaluate(first.params, x_val, labels_val, network, raw=False, state=first.state) == (
        first.history[-1].val_loss,
        first.history[-1].val_accuracy,
    )
    # the same seed gives the same bits; another seed another network
    again = train(config, x, labels, x_val, labels_val)
    assert_close(trajectory(again), trajectory(first), EXACT, "a second run")
    other = train(replace(config, seed=1), x, labels, x_val, labels_val)
    assert not np.array_equal(other.history[-1].val_loss, first.history[-1].val_loss)


@pytest.mark.parametrize("layers", NETWORKS)
def test_training_on_images_is_training_on_their_float_inputs(mnist, layers):
    """uint8 rows are converted batch by batch with the table the float inputs come from."""
    x, labels, x_val, labels_val = rows(mnist)
    config = layers_config(layers, "float64", epochs=1)
    on_images = train(config, x, labels, x_val, labels_val)
    floats = to_inputs(x, raw=False, dtype=np.float64)
    on_floats = train(config, floats, labels, to_inputs(x_val, dtype=np.float64), labels_val)
    assert_close(trajectory(on_floats), trajectory(on_images), EXACT, "trained on floats")


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ("", {"optimizer": "sgd"}),
        ("", {"optimizer": "momentum", "l2": 1e-3}),
        ("", {"optimizer": "adam", "learning_rate": 0.005}),
        (" dropout", {"dropout": 0.5, "input_dropout": 0.2}),
    ],
    ids=["sgd", "momentum-l2", "adam", "dropout"],
)
def test_a_dense_stack_follows_the_mlp_trajectory(mnist, extra, fields):
    """``dense(30)`` is the MLP of hidden_sizes [30]: the same initial draws, masks, shuffles and
    updates, computed by the layers' own forward and backward passes: the MLP's fast path does
    the same operations in another order (tolerance ``same_operations``, float64)."""
    x, labels, x_val, labels_val = rows(mnist)
    values = {"dtype": "float64", "epochs": 2, "batch_size": 50, **fields}
    mlp = train(TrainConfig(hidden_sizes=(30,), **values), x, labels, x_val, labels_val)
    stack = train(TrainConfig(layers="dense(30)" + extra, **values), x, labels, x_val, labels_val)
    assert stack.network is not None and mlp.network is None and mlp.state == []
    assert_close(trajectory(stack), trajectory(mlp), "same_operations", "the dense stack")


def test_max_norm_is_refused_with_layers_naming_both_fields(mnist):
    """Refused where the config is made, and by train() for a config that got past that."""
    x, labels, x_val, labels_val = rows(mnist)
    refusal = r"max_norm = 3.*layers = 'dense\(30\)'.*max_norm = 0"
    with pytest.raises(ConfigError, match=refusal):
        layers_config("dense(30)", max_norm=3.0)
    config = layers_config("dense(30)")
    object.__setattr__(config, "max_norm", 3.0)  # past TrainConfig's own check
    with pytest.raises(ConfigError, match=refusal):
        train(config, x, labels, x_val, labels_val)


def test_a_network_that_diverges_is_stopped(mnist):
    x, labels, x_val, labels_val = rows(mnist)
    config = layers_config("dense(32) relu", optimizer="sgd", learning_rate=1e4)
    with pytest.raises(DivergenceError, match="training diverged at epoch 1"):
        train(config, x, labels, x_val, labels_val)


def test_the_step_refuses_what_it_cannot_take():
    network = layers_config(NORM_NET).network()
    params = net.init_params(network, 0)
    from research.engine.optim import sgd

    with pytest.raises(ValueError, match=r"max_norm=2\.0 applies to the MLP's hidden units only"):
        NetworkTrainingStep(network, params, sgd(0.1), 8, max_norm=2.0)
    step = NetworkTrainingStep(network, params, sgd(0.1), 8)
    y = np.eye(10)[np.arange(8) % 10]
    with pytest.raises(ValueError, match="inputs must be float64, got float32"):
        step.step(np.zeros((8, 784), np.float32), y)
    with pytest.raises(ValueError, match="inputs must be float64, got uint8"):
        step.step(np.zeros((8, 784), np.uint8), y)
    with pytest.raises(ValueError, match="a batch of 9 rows does not fit batch_size=8"):
        step.step(np.zeros((9, 784)), np.eye(10)[np.arange(9)])
    assert step.params[0]["W"] is not params[0]["W"]  # (a copy: the caller's are never written)
    # (B, 1, 28, 28) and (B, 784) are the same rows
    x = np.random.default_rng(0).random((8, 784))
    flat, images = (NetworkTrainingStep(network, params, sgd(0.1), 8) for _ in range(2))
    assert flat.step(x, y) == images.step(x.reshape(8, 1, 28, 28), y)
    assert_close(images.params, flat.params, EXACT, "params")


# --- weights and state ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(mnist) -> tuple[TrainConfig, TrainResult]:
    """A small float32 network with batch norm and dropout, trained for two epochs (16 steps:
    a running average of momentum 0.5 has caught up with the batches' statistics)."""
    layers = "conv(4,5) batchnorm(0.5) maxpool(2) dense(16) dropout"
    config = layers_config(layers, "float32", dropout=0.2)
    x, labels, x_val, labels_val = rows(mnist)
    return config, train(config, x, labels, x_val, labels_val)


def test_weights_and_running_statistics_round_trip(trained, mnist, tmp_path):
    _, result = trained
    path = tmp_path / "weights.npz"
    save_weights(path, result.params, result.network, result.state)
    saved = read_weights(path)
    assert saved.network.describe() == result.network.describe()
    assert saved.network.shapes == result.network.shapes and saved.spec is None
    assert_close(saved.params, result.params, EXACT, "params read back")
    assert_close(saved.state, result.state, EXACT, "state read back")
    with np.load(path, allow_pickle=False) as arrays:
        names = set(arrays.files)
    assert "network" in names and any(name.startswith("state.") for name in names)
    text = describe_weights(result.params, result.network, "weights.npz", result.state)
    assert result.network.describe() in text and "(running statistics)" in text
    with pytest.raises(WeightsError, match="holds a network of layers; read it with read_weights"):
        load_weights(path)
    # predictions in evaluation mode, with the running statistics
    x = to_inputs(mnist.test.images[:100], dtype=np.float32)
    assert_close(saved.outputs(x), outputs(result.network, result.params, result.state, x), EXACT)


def test_a_broken_network_file_is_refused_naming_the_array(trained, tmp_path):
    _, result = trained
    path = tmp_path / "weights.npz"
    save_weights(path, result.params, result.network, result.state)
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    (state_name,) = [name for name in arrays if name.endswith(".mean")]
    described = str(arrays["network"])
    broken = {
        "no state": {k: v for k, v in arrays.items() if k != state_name},
        "NaN state": {**arrays, state_name: np.full_like(arrays[state_name], np.nan)},
        "other layers": {**arrays, "network": np.array(described.replace("16", "17"))},
        "unknown layer": {**arrays, "network": np.array(described.replace("dense", "x"))},
    }
    messages = {
        "no state": "do not match the network",
        "NaN state": f"{state_name} holds {arrays[state_name].size} NaN",
        "other layers": "has shape",
        "unknown layer": "no valid network in the file",
    }
    for what, contents in broken.items():
        bad = tmp_path / f"{what}.npz"
        np.savez(bad, **contents)
        with pytest.raises(WeightsError, match=messages[what]):
            read_weights(bad)


def test_what_cannot_be_saved_is_refused_before_a_file_is_written(trained, tmp_path):
    config, result = trained
    path = tmp_path / "weights.npz"
    with pytest.raises(ValueError, match="keeps running statistics: save them with it"):
        save_weights(path, result.params, result.network)
    with pytest.raises(ValueError, match="not those of the MLP"):
        save_weights(path, result.params, config.spec())

    class Own:  # a layer of one's own, outside the layers syntax
        def init(self, rng, in_shape, dtype):
            return {}

        def out_shape(self, in_shape):
            return in_shape

        def forward(self, params, x, xp):
            return x, None

        def backward(self, params, cache, dy):
            return dy, {}

    own = net.Network((Own(), *result.network.layers), result.network.in_shape)
    with pytest.raises(ValueError, match="cannot be saved: its layers as written"):
        save_weights(path, [{}, *result.params], own, [{}, *result.state])
    assert not path.exists() and not list(tmp_path.iterdir())


# --- the MLflow model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_mlflow_model_of_a_network_predicts_what_the_engine_does(trained, mnist, tmp_path):
    """A tracked run's outputs (weights.npz with the state, and the MLflow model), read back from
    a real store: the model takes rows (B, 784) and images (B, 1, 28, 28) of pixels in [0, 1]."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from research.experiment.tracking.models import load_model
    from research.experiment.tracking.runs import Outputs, run_lifecycle, start_run

    config, result = trained
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = start_run("layers", tracking_uri=uri)
    with run_lifecycle(run):
        run.log_config(config, N_TRAIN)
        outputs_ = Outputs(
            result.history, "layers", result.params, result.model, config,
            mnist.test.images, state=result.state,
        )  # fmt: skip
        run.save_on_success(outputs_)
    client = MlflowClient(tracking_uri=uri)
    weights = Path(client.download_artifacts(run.run_id, "weights.npz", str(tmp_path)))
    saved = read_weights(weights)
    assert_close(saved.state, result.state, EXACT, "the run's state")

    model = load_model(run.model_uri, uri)
    images = mnist.test.images[:300]
    x = to_inputs(images)  # float32 pixels in [0, 1]
    engine = predict(result.network, result.params, result.state, x)
    rows_out = model.predict(x)
    image_out = model.predict(x.reshape(-1, 1, 28, 28))
    assert rows_out["class"].dtype == np.int64 and rows_out["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(rows_out["class"], engine)
    np.testing.assert_array_equal(image_out["class"], engine)
    expected = outputs(result.network, result.params, result.state, x)
    np.testing.assert_array_equal(rows_out["probabilities"], expected)
    np.testing.assert_array_equal(image_out["probabilities"], expected)
    # the running statistics are the trained ones (the starting ones give other outputs)
    start = net.init_state(result.network, np.float32)
    assert not np.array_equal(outputs(result.network, result.params, start, x), expected)
    metadata = model.metadata.metadata
    assert metadata["research.layers"] == result.network.describe()
    with pytest.raises(MlflowException, match=r"shape \(3, 28, 28\): the model takes a batch"):
        model.predict(x[:3].reshape(3, 28, 28))
    with pytest.raises(MlflowException, match="range from 0 to 255"):
        model.predict(images[:3].astype(np.float32))
