"""Training from uint8 images: the step gathers each batch as bytes and converts it, and that must
be what training on the float inputs (``Split.x``) does, bit for bit.

- ``inplace.byte_conversion`` gives ``research.data.pixel_values`` for every byte (and falls back
  to the table when no division or cast does);
- an ``InPlaceTrainingStep`` fed uint8 images takes the same steps as one fed the float inputs,
  bit for bit, in float32 and float64, scaled and raw, with dropout, partial batches and
  ``rows=None``;
- ``train`` on ``split.images`` ends with the same parameters and history as on ``split.x``
  (float64 and float32; several configs, dropout, the origin preset with its raw 0..255 inputs),
  and never holds the training set as floats;
- inputs of other dtypes are refused with a clear message.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from helpers import EXACT, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from research.data import Split, pixel_values, to_inputs
from research.engine import mlp, optim
from research.engine.inplace import InPlaceTrainingStep, byte_conversion
from research.experiment.config.presets import PRESETS
from research.experiment.training.train import evaluate, train

DTYPES = (np.float32, np.float64)
ROWS = 3_000  # training rows for the train() comparisons; 1,000 validation rows


def float_inputs(images: np.ndarray, raw: bool, dtype) -> np.ndarray:
    """What the float path trains on: ``Split.x`` (float32), widened to ``dtype``."""
    split = Split(images, np.zeros(len(images), np.int64), raw=raw)
    return np.asarray(split.x, dtype)


# --- the conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_conversion_is_the_pixel_values_table_and_not_a_look_up(raw, dtype):
    values = pixel_values(raw, dtype)
    convert = byte_conversion(values)
    out = np.empty((2, 256), dtype)
    convert(np.arange(512).reshape(2, 256).astype(np.uint8), out)  # (and 2-D batches)
    assert_close(out[0], values, EXACT, "row 0")
    assert_close(out[1], values, EXACT, "row 1")
    # the table look-up is several times slower: each standard table has a division or cast,
    # in one pass (k/255 is rounded to float32, then widened, in both dtypes)
    assert convert.__name__ == ("_cast" if raw else "_divide_in_float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_conversion_of_a_real_split_is_split_x(mnist, dtype):
    images = mnist.train.images[:5_000]
    for raw in (False, True):
        out = np.empty(images.shape, dtype)
        byte_conversion(pixel_values(raw, dtype))(images, out)
        assert_close(out, float_inputs(images, raw, dtype), EXACT, "against Split.x")
        assert_close(out, to_inputs(images, raw, dtype), EXACT, "against to_inputs")


def test_byte_conversion_falls_back_to_the_table_and_refuses_bad_tables():
    values = np.sqrt(np.arange(256, dtype=np.float64))  # no division or cast gives this
    convert = byte_conversion(values)
    images = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
    out = np.empty(images.shape, np.float64)
    convert(images, out)
    assert_close(out, values[images], EXACT, "the table's values")
    with pytest.raises(ValueError, match=r"pixel_values must be a \(256,\) float32 or float64"):
        byte_conversion(np.arange(255, dtype=np.float32))
    with pytest.raises(ValueError, match="pixel_values must be a"):
        byte_conversion(np.arange(256))  # integers


# --- the step ---------------------------------------------------------------------------------

SPECS = {
    "relu": mlp.MLPSpec((784, 12, 10), "relu", "softmax", "cross_entropy", l2=1e-4),
    "origin": mlp.MLPSpec((784, 6, 10), "sigmoid", "sigmoid", "mse"),
    "tanh-2": mlp.MLPSpec((784, 8, 5, 10), "tanh", "softmax", "cross_entropy"),
}


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    raw=st.booleans(),
    spec_name=st.sampled_from(list(SPECS)),
    optimizer=st.sampled_from(["sgd", "momentum"]),
    batch_size=st.integers(1, 40),
    input_dropout=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**31),
)
def test_uint8_steps_are_the_float_steps_bit_for_bit(
    mnist, dtype, raw, spec_name, optimizer, batch_size, input_dropout, seed
):
    """Two steppers from the same start, one fed images, one the float inputs: the same loss
    and the same parameters after every step (full and short batches, and rows=None)."""
    spec = SPECS[spec_name]
    rng = np.random.default_rng(seed)
    start = rng.integers(0, len(mnist.train) - 200)
    images = mnist.train.images[start : start + 200]
    floats = float_inputs(images, raw, dtype)
    targets = np.eye(10, dtype=dtype)[mnist.train.labels[start : start + 200]]
    params = mlp.init_params(spec, rng, dtype=dtype, scheme="xavier")
    rate = 1e-4 if raw else 0.05  # raw inputs are 255 times larger

    def make(**options):
        update = optim.sgd(rate) if optimizer == "sgd" else optim.momentum(rate, beta=0.9)
        return InPlaceTrainingStep(spec, params, update, batch_size, **options)

    from_bytes = make(pixel_values=pixel_values(raw, dtype))
    from_floats = make()
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(6):
            n = batch_size if step % 3 else max(1, batch_size // 2)
            rows = rng.permutation(len(images))[:n]
            masks = mlp.dropout_masks(rng, n, spec.sizes, input_dropout, 0.0, dtype)
            if step == 4:  # the whole of x: no gather
                expected = from_floats.step(floats[rows], targets[rows], masks=masks)
                loss = from_bytes.step(images[rows], targets[rows], masks=masks)
            else:
                expected = from_floats.step(floats, targets, rows, masks)
                loss = from_bytes.step(images, targets, rows, masks)
            assert_close(np.float64(loss), np.float64(expected), EXACT, f"loss at step {step}")
            assert_close(from_bytes.params, from_floats.params, EXACT, f"after step {step}")
    assert all(layer["W"].dtype == dtype for layer in from_bytes.params)


def test_the_step_refuses_inputs_it_cannot_read():
    spec = SPECS["origin"]
    params = mlp.init_params(spec, 0, dtype=np.float64)
    x = np.zeros((4, 784), np.uint8)
    y = np.zeros((4, 10))
    plain = InPlaceTrainingStep(spec, params, optim.sgd(0.1), 4)
    with pytest.raises(ValueError, match="uint8 inputs need pixel_values"):
        plain.step(x, y)
    with pytest.raises(ValueError, match="inputs must be float64, got float32"):
        plain.step(x.astype(np.float32), y)
    with_table = InPlaceTrainingStep(
        spec, params, optim.sgd(0.1), 4, pixel_values=pixel_values(False, np.float64)
    )
    with pytest.raises(ValueError, match="inputs must be float64 or uint8, got int64"):
        with_table.step(x.astype(np.int64), y)
    with_table.step(x.astype(np.float64), y)  # floats still work beside the table
    with pytest.raises(ValueError, match="pixel_values must be in the step's dtype float64"):
        InPlaceTrainingStep(
            spec, params, optim.sgd(0.1), 4, pixel_values=pixel_values(False, np.float32)
        )


# --- train ------------------------------------------------------------------------------------

SMALL = {"epochs": 3, "seed": 3}
CONFIGS = {
    "default": replace(PRESETS["default"], hidden_size=32, batch_size=100, **SMALL),
    "dropout": replace(
        PRESETS["default"],
        hidden_sizes=(48, 24),
        batch_size=64,
        input_dropout=0.2,
        dropout=0.5,
        max_norm=2.0,
        **SMALL,
    ),
    "adam-cosine": replace(
        PRESETS["default"],
        hidden_size=16,
        activation="tanh",
        optimizer="adam",
        learning_rate=0.003,
        schedule="cosine",
        batch_size=128,
        **SMALL,
    ),
    "origin": replace(PRESETS["origin"], **SMALL),
    "origin-raw": replace(PRESETS["origin"], raw_inputs=True, **SMALL),
    "origin-raw-float32": replace(PRESETS["origin"], raw_inputs=True, dtype="float32", **SMALL),
    "default-float32": replace(PRESETS["default"], hidden_size=32, dtype="float32", **SMALL),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_on_images_is_train_on_the_float_inputs(mnist, name):
    """The same parameters after every epoch and the same history, exactly; validation on
    images for one run and on floats for the other."""
    config = CONFIGS[name]
    raw, dtype = config.raw_inputs, np.dtype(config.dtype)
    train_images, val_images = mnist.train.images[:ROWS], mnist.validation.images[:1_000]
    labels, val_labels = mnist.train.labels[:ROWS], mnist.validation.labels[:1_000]
    seen: dict[str, list[mlp.Params]] = {"bytes": [], "floats": []}

    def keep(kind):
        return lambda metrics, params: seen[kind].append(params)

    from_bytes = train(config, train_images, labels, val_images, val_labels, keep("bytes"))
    from_floats = train(
        config,
        float_inputs(train_images, raw, dtype),
        labels,
        float_inputs(val_images, raw, dtype),
        val_labels,
        keep("floats"),
    )
    assert len(seen["bytes"]) == len(seen["floats"]) == config.epochs
    for epoch, (a, b) in enumerate(zip(seen["bytes"], seen["floats"])):
        assert_close(a, b, EXACT, f"{name} after epoch {epoch}")
    assert_close(from_bytes.params, from_floats.params, EXACT, name)
    assert all(layer["W"].dtype == dtype for layer in from_bytes.params)
    for a, b in zip(from_bytes.history, from_floats.history, strict=True):
        assert (a.train_loss, a.val_loss, a.val_accuracy, a.learning_rate) == (
            b.train_loss,
            b.val_loss,
            b.val_accuracy,
            b.learning_rate,
        )
    # (the parameters moved: not two runs that are equal because nothing happened)
    assert not np.array_equal(seen["bytes"][0][0]["W"], seen["bytes"][-1][0]["W"])


def test_train_on_images_never_holds_the_training_set_as_floats(mnist):
    """tracemalloc's peak while training one float64 epoch on the 50,000 training images:
    the step's buffers, one-hot targets and one batch's evaluation, far below even a float32
    copy of the images (157 MB; float64, 314 MB)."""
    images, labels = mnist.train.images, mnist.train.labels
    config = replace(PRESETS["origin"], epochs=1)
    float32_copy = images.size * 4
    tracemalloc.start()
    try:
        train(config, images, labels, None, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * float32_copy, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("dtype", "where"),
    [(np.int64, "x_train"), (np.bool_, "x_train"), (np.uint16, "x_train"), (np.int32, "x_val")],
)
def test_train_refuses_inputs_neither_uint8_nor_float(mnist, dtype, where):
    config = replace(PRESETS["origin"], epochs=1)
    images, labels = mnist.train.images[:600], mnist.train.labels[:600]
    x_train = images.astype(dtype) if where == "x_train" else images
    x_val = images.astype(dtype) if where == "x_val" else images
    name = np.dtype(dtype).name
    with pytest.raises(
        ValueError, match=f"{where} must be uint8 images or float inputs, got {name}"
    ):
        train(config, x_train, labels, x_val, labels)


def test_evaluate_converts_images_and_needs_to_be_told_their_scale(mnist):
    spec = CONFIGS["origin"].spec()
    params = mlp.init_params(spec, 0, dtype=np.float64, scheme="normal")
    images, labels = mnist.validation.images[:2_500], mnist.validation.labels[:2_500]
    for raw in (False, True):
        floats = float_inputs(images, raw, np.float64)
        expected = evaluate(params, floats, labels, spec, chunk=1_000)
        assert evaluate(params, images, labels, spec, chunk=1_000, raw=raw) == expected
    with pytest.raises(ValueError, match="evaluate on uint8 images needs raw="):
        evaluate(params, images, labels, spec)
    with pytest.raises(ValueError, match="x must be uint8 images or float inputs, got int64"):
        evaluate(params, images.astype(np.int64), labels, spec)
