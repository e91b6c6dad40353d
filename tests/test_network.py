"""The network as a stack of layers: the MLP written as layers is today's MLP exactly, the
``layers`` text is read (or refused with one line naming the token), the contract's optional
parts are honoured, and the fast path is chosen by what the optimizer's update is."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import EXACT, assert_close, make_targets
from hypothesis import given, settings
from hypothesis import strategies as st

from research.engine import mlp, network, optim
from research.engine.blas import gemm_update
from research.engine.inplace import InPlaceTrainingStep
from research.engine.layers.base import out_shape
from research.engine.layers.dense import Dense
from research.engine.layers.parse import LayersError, build_network, tokenize


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 12), min_size=0, max_size=3),
    activation=st.sampled_from(mlp.ACTIVATIONS),
    output_loss=st.sampled_from(
        [("softmax", "cross_entropy"), ("sigmoid", "bce"), ("identity", "mse"), ("sigmoid", "mse")]
    ),
    input_dropout=st.sampled_from([0.0, 0.2]),
    dropout=st.sampled_from([0.0, 0.5]),
    l2=st.sampled_from([0.0, 1e-2]),
    init=st.sampled_from(mlp.INIT_SCHEMES),
    rows=st.integers(1, 5),
)
def test_the_mlp_as_layers_is_the_mlp_exactly(
    hidden, activation, output_loss, input_dropout, dropout, l2, init, rows
):
    """Same initial weights and dropout masks (the same bits, from the same generator), the same
    loss, and the same gradients: bit for bit without dropout; with it, the stack multiplies by
    the mask before σ'(z) where the MLP multiplies after, so the last bit may differ."""
    output, loss = output_loss
    spec = mlp.MLPSpec((6, *hidden, 4), activation, output, loss, l2)
    stack = network.mlp_network(spec, input_dropout, dropout, init)
    params = network.init_params(stack, 7)
    assert_close(
        network.to_mlp_params(stack, params),
        mlp.init_params(spec, 7, scheme=init),
        EXACT,
        "initial weights",
    )
    masks = network.draw_masks(stack, np.random.default_rng(3), rows, np.float64)
    mlp_masks = mlp.dropout_masks(
        np.random.default_rng(3), rows, spec.sizes, input_dropout, dropout, np.float64
    )
    drawn = [m for m, layer in zip(masks, stack.layers) if "mask" in getattr(layer, "needs", ())]
    assert len(drawn) == sum(m is not None for m in mlp_masks)
    for ours, theirs in zip(drawn, [m for m in mlp_masks if m is not None]):
        assert_close(ours, theirs, EXACT, "masks")
    rng = np.random.default_rng(4)
    x = rng.random((rows, 6))
    y = make_targets(rng, rows, 4, output, loss)
    value, grads, _ = network.loss_and_grads(stack, params, x, y, masks=masks)
    expected_value, expected = mlp.loss_and_grads(
        network.to_mlp_params(stack, params), x, y, spec, mlp_masks
    )
    assert value == expected_value
    same = EXACT if not (input_dropout or dropout) else "same_operations"
    assert_close(network.to_mlp_params(stack, grads), expected, same, "gradients")
    assert network.loss(stack, params, x, y) == mlp.loss(
        network.to_mlp_params(stack, params), x, y, spec
    )


def test_layers_text_reads_the_nielsen_network():
    net = build_network(
        "conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100)",
        n_classes=10,
        output="softmax",
        loss="cross_entropy",
    )
    assert net.in_shape == (1, 28, 28)
    assert net.shapes[-1] == (10,)
    assert net.describe() == (
        "conv(20,5) relu maxpool(2) conv(40,5) relu maxpool(2) dense(100) relu dense(10)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo(3)", "unknown layer 'foo'; allowed: dense(units), conv("),
        ("dense", "dense needs units: dense(units)"),
        ("dense(3.5)", "dense's units=3.5 must be a whole number >= 1"),
        ("dense(0)", "dense's units=0 must be a whole number >= 1"),
        ("dense(3", "dense( is not closed"),
        ("dense(3))", "a ')' closes nothing"),
        ("dense(a)", "dense's argument 'a' is not a number; write dense(units)"),
        ("dense(3, 4)", "dense takes at most 1 numbers: dense(units)"),
        ("dense(size=3)", "dense has no argument 'size'"),
        ("res", "res needs its layers"),
        ("", "it names no layer"),
    ],
)
def test_a_bad_layers_value_is_one_line_naming_the_token(text, message):
    with pytest.raises(LayersError) as error:
        build_network(text, n_classes=10, output="softmax", loss="cross_entropy")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_activations_follow_conv_and_dense_unless_the_text_places_them():
    def layers(text: str, **options) -> str:
        return build_network(
            text,
            n_classes=10,
            output="softmax",
            loss="cross_entropy",
            activation="tanh",
            **options,
        ).describe()

    assert layers("dense(8) dense(4)") == "dense(8) tanh dense(4) tanh dense(10)"
    assert layers("dense(8) relu dense(4)") == "dense(8) relu dense(4) dense(10)"
    assert layers("dense(8) dropout", dropout=0.5) == "dense(8) tanh dropout(0.5) dense(10)"
    assert layers("dense(8)", input_dropout=0.2) == "dropout(0.2) dense(8) tanh dense(10)"
    # a residual block's activation follows the sum (ResNet's relu(x + f(x))), not f's last layer
    assert layers("dense(8) res(dense(8) layernorm dense(8))") == (
        "dense(8) tanh res(dense(8) layernorm tanh dense(8)) tanh dense(10)"
    )
    assert [t.text for t in tokenize("conv(8, 3, pad = 1) dropout(0.25)")] == [
        "conv(filters=8,kernel=3,pad=1)",
        "dropout(0.25)",
    ]


def test_a_layer_without_out_shape_is_run_once_to_find_it():
    class Square:  # the contract's three methods only
        def init(self, rng, in_shape, dtype):
            return {}

        def forward(self, params, x, xp):
            return (x * x).reshape(x.shape[0], -1)[:, :3], x

        def backward(self, params, cache, dy):
            raise AssertionError("not called")

    assert out_shape(Square(), (2, 5)) == (3,)
    net = network.Network((Square(), Dense(2)), (2, 5))
    assert net.shapes == ((2, 5), (3,), (2,))


def test_the_fast_path_is_chosen_by_the_update_not_the_name():
    """A wrapper that keeps the name ``sgd`` but changes the update (here: clipping) must be
    stepped by its own update; plain SGD keeps the fused GEMM update."""
    spec = mlp.MLPSpec((5, 4, 3), "relu", "softmax", "cross_entropy")
    params = mlp.init_params(spec, 0, scheme="he")
    plain = optim.sgd(0.1)
    assert plain.plain_gradient_step

    def clipped_update_in_place(p, g, state):
        for layer in g:
            for value in layer.values():
                np.clip(value, -1e-3, 1e-3, out=value)
        plain.update_in_place(p, g, state)

    def clipped_update(p, g, state):
        return plain.update(
            p, [{k: np.clip(v, -1e-3, 1e-3) for k, v in layer.items()} for layer in g], state
        )

    wrapped = dataclasses.replace(
        plain, update=clipped_update, update_in_place=clipped_update_in_place
    )
    assert wrapped.name == "sgd" and not wrapped.plain_gradient_step
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 5)), np.eye(3)[rng.integers(0, 3, 8)]
    stepper = InPlaceTrainingStep(spec, params, wrapped, 8)
    stepper.step(x, y)
    _, grads = mlp.loss_and_grads(params, x, y, spec)
    expected, _ = clipped_update(params, grads, {"count": 0})
    assert_close(stepper.params, expected, "same_operations", "clipped sgd step")
    fused = InPlaceTrainingStep(spec, params, plain, 8)
    assert (fused._gemm_update is None) == (gemm_update() is None)
