"""The training loop's fast path: one optimizer step computed in place, in preallocated buffers.

:class:`InPlaceTrainingStep` does exactly what ``mlp.loss_and_grads`` followed by
``optimizer.update`` does — same forward pass, same deltas, same update rule — but it owns its
parameters and optimizer state and overwrites them, and it keeps every intermediate array (the
gathered batch, each layer's activations and deltas, the gradients) in buffers allocated once.
``tests/test_inplace.py`` checks it against the pure functions in float64 over every activation,
output, loss, optimizer and several depths; the pure functions are in turn checked against JAX.

What it does differently (docs/performance.md has the measurements behind each choice):

- The batch is gathered from the shuffled row indices straight into a reused buffer
  (``np.take(..., out=)``): the rows land in cache, where both matrix products that read them
  find them, and no fresh 800 kB array is page-faulted in per step.
- Inputs may be uint8 images (``pixel_values``): the batch's rows are gathered as bytes into a
  reused uint8 buffer and turned into floats, so the training set is never held as floats (a
  quarter of the memory of float32, an eighth of float64's). The byte → value table comes in as
  data (the engine imports nothing outside itself); the step converts with the fastest of a few
  numpy calls that gives exactly that table for all 256 bytes, straight into the input buffer:
  for k/255, one division that casts as it goes; for raw inputs, a cast. (Converting in a
  private block that fits a core's cache and copying that over, as the step once did, made w1
  epochs 15% longer on the 2-vCPU Intel Xeon of docs/performance.md, 2026-12-06.)
- Bias add, activation and activation derivative run in place with ``out=`` (no temporaries); the
  hidden sigmoid is computed as 1/(1 + exp(−z)) in one branch (4 passes instead of ~8). It differs
  from ``mlp.sigmoid`` by an ulp or two and saturates to exactly 0 below z ≈ −88 (float32) /
  −709 (float64), where the true value is below the smallest normal number anyway.
- Plain SGD, where numpy's BLAS allows (:mod:`research.engine.blas`): backprop is linear in the
  output delta, so the learning rate is multiplied into that (B, k) array once and every gradient
  comes out already scaled; the weight update is then done by the gradient's own matrix product,
  W ← W − inputsᵀ·(rate·δ), as one BLAS call that accumulates into W. The weight gradients are
  never stored. Otherwise (other optimizers, or no such BLAS call) the step computes plain
  gradients and runs the optimizer's ``update_in_place``.
- Each layer's weights are updated right after their last use in the backward pass, while their
  gradient is still warm in cache.
- No delta is computed for the input layer (nothing needs ∂loss/∂x).

The loss is the same batch-mean loss ``loss_and_grads`` returns (from the output logits already
at hand, plus the l2 term on the parameters before the update).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from research.engine.blas import gemm_update
from research.engine.mlp import Masks, MLPSpec, Params, l2_penalty, output_delta
from research.engine.optim import Optimizer, max_norm_in_place


def _sigmoid_in_place(z: np.ndarray) -> None:
    """z ← 1/(1 + exp(−z)); exp may overflow to inf, which gives the right limit 0."""
    np.negative(z, out=z)
    with np.errstate(over="ignore"):
        np.exp(z, out=z)
    z += 1
    np.reciprocal(z, out=z)


def _relu_in_place(z: np.ndarray, mask: np.ndarray) -> None:
    """mask ← (z > 0), z ← z·mask: the relu and the derivative the backward pass reuses.

    One pass less than ``np.maximum(z, 0)`` followed by a mask in the backward pass. It differs
    from the relu of :mod:`research.engine.mlp` only in the sign of zeros (−0.0 for negative z)
    and at z = −inf (NaN instead of 0).
    """
    np.greater(z, 0, out=mask)
    z *= mask


#: ``convert(images, out)``: uint8 ``images`` (B, n) into ``out`` (B, n), a float buffer.
ByteConversion = Callable[[np.ndarray, np.ndarray], None]


def _cast(images: np.ndarray, out: np.ndarray) -> None:
    """out ← k: the raw bytes as floats (exact in any float dtype)."""
    np.copyto(out, images)


def _cast_then_divide(images: np.ndarray, out: np.ndarray) -> None:
    """out ← k, then out ← out/255 in out's dtype (two passes; float64's k/255)."""
    np.copyto(out, images)
    np.divide(out, out.dtype.type(255), out=out)


def _divide_in_float32(images: np.ndarray, out: np.ndarray) -> None:
    """out ← k/255 computed in float32, widened to out's dtype (one pass; float32's k/255: a w1
    epoch 6% faster than casting, then dividing, in the same process, 2026-12-06)."""
    np.divide(images, np.float32(255), out=out, dtype=np.float32)


def _look_up(values: np.ndarray) -> ByteConversion:
    """out ← values[k]: any table, but slow (an epoch of w1's gathers: 28–31 ms in float32, 121 ms
    in float64, against 9 and 14 ms for a division)."""

    def look_up(images: np.ndarray, out: np.ndarray) -> None:
        np.take(values, images, out=out)

    return look_up


def byte_conversion(values: np.ndarray) -> ByteConversion:
    """The fastest conversion of uint8 images to inputs that gives ``values`` (256,) for the
    bytes 0..255, bit for bit (the candidates are tried fastest first).

    Each candidate works element by element, so trying it on all 256 bytes proves it exact for
    every batch. The table itself is the fallback, for a table that no division or cast gives.
    """
    values = np.asarray(values)
    if values.shape != (256,) or values.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"pixel_values must be a (256,) float32 or float64 table, got {values.dtype} "
            f"{values.shape}"
        )
    probe = np.arange(256, dtype=np.uint8)
    for convert in (_cast, _divide_in_float32, _cast_then_divide):
        out = np.empty_like(values)
        convert(probe, out)
        if np.array_equal(out.view(np.uint8), values.view(np.uint8)):
            return convert
    return _look_up(values.copy())


class InPlaceTrainingStep:
    """A network's parameters and optimizer state, stepped in place.

    Args:
        spec: the network.
        params: starting parameters, one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer; they
            are copied (the caller's arrays are never written). Their dtype is the step's dtype.
        optimizer: the update rule; its ``init`` gives the starting state.
        batch_size: the largest batch :meth:`step` will be given.
        blas_update: for plain SGD, update the weights inside the gradient's matrix product
            (``research.engine.blas``) where numpy's BLAS allows; False computes the gradients
            and runs ``optimizer.update_in_place``, as for every other optimizer (the tests
            check both).
        max_norm: after every update, each hidden unit's incoming weight vector is projected
            onto the ball of this radius (``optim.max_norm``); 0 for none.
        pixel_values: the input value of each byte 0..255, (256,) in the step's dtype, for uint8
            inputs (``research.data.pixel_values`` makes it: k/255 or k); None refuses uint8
            inputs. With it, :meth:`step` takes uint8 images and converts each batch as it
            gathers it (:func:`byte_conversion`).

    Attributes:
        params: the current parameters (updated in place by every step; copy them to keep them).
        state: the current optimizer state.
    """

    def __init__(
        self,
        spec: MLPSpec,
        params: Params,
        optimizer: Optimizer,
        batch_size: int,
        blas_update: bool = True,
        max_norm: float = 0.0,
        pixel_values: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; give an integer >= 1")
        self.spec = spec
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.params: Params = [{"W": layer["W"].copy(), "b": layer["b"].copy()} for layer in params]
        self.dtype = self.params[0]["W"].dtype
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"parameters must be float32 or float64, got {self.dtype}")
        self.state = optimizer.init(self.params)
        widths = spec.sizes
        empty = np.empty
        self._x = empty((batch_size, widths[0]), self.dtype)
        # uint8 inputs: the gathered bytes (B, n_in) and how they become _x
        self._convert: ByteConversion | None = None
        self._bytes = empty((0, widths[0]), np.uint8)
        if pixel_values is not None:
            if np.asarray(pixel_values).dtype != self.dtype:
                raise ValueError(
                    f"pixel_values must be in the step's dtype {self.dtype}, got "
                    f"{np.asarray(pixel_values).dtype}"
                )
            self._convert = byte_conversion(pixel_values)
            self._bytes = empty((batch_size, widths[0]), np.uint8)
        self._y = empty((batch_size, widths[-1]), self.dtype)
        # _outputs[i]: the output of layer i (hidden activations; the last one holds the logits).
        self._outputs = [empty((batch_size, n), self.dtype) for n in widths[1:]]
        # _deltas[i]: ∂loss/∂(pre-activation of hidden layer i), for the hidden layers only.
        self._deltas = [empty((batch_size, n), self.dtype) for n in widths[1:-1]]
        # σ'(z) per hidden layer: a boolean mask for relu (made in the forward pass), values for
        # sigmoid and tanh.
        derivative_dtype = bool if spec.activation == "relu" else self.dtype
        self._derivatives = [empty((batch_size, n), derivative_dtype) for n in widths[1:-1]]
        # relu with dropout: mask · relu' per hidden layer, made in the forward pass (allocated
        # at the first masked step: steps without dropout never hold them).
        self._relu_masks: list[np.ndarray] = []
        self._ones = np.ones(batch_size, self.dtype)
        self.max_norm = max_norm
        self._norms = [empty(n, self.dtype) for n in widths[1:-1]]
        # Plain SGD folds its rate into the output delta and updates W inside one GEMM: chosen
        # by what the optimizer's update is (optim.Optimizer.plain_gradient_step), not its name.
        fused = optimizer.plain_gradient_step and blas_update
        self._gemm_update = gemm_update() if fused else None
        # Gradient buffers; the fused SGD update needs only the biases'.
        self.grads: Params = [
            {key: np.empty_like(value) for key, value in layer.items()}
            if self._gemm_update is None
            else {"b": np.empty_like(layer["b"])}
            for layer in self.params
        ]

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rows: np.ndarray | None = None,
        masks: Masks | None = None,
    ) -> float:
        """One optimizer step on a batch; returns the batch loss (before the step).

        Args:
            x: inputs (N, sizes[0]) in the step's dtype, or uint8 images (N, sizes[0]) when the
                step was given ``pixel_values``; y: targets (N, sizes[-1]) in the step's dtype.
            rows: which rows of x and y form the batch (B ≤ batch_size valid indices, e.g. a
                slice of a permutation); None for all of x and y.
            masks: dropout masks for the batch, one (B, width) array or None per layer, in the
                step's dtype (``mlp.Masks``).
        Returns:
            The batch's loss, as ``mlp.loss_and_grads`` returns it.
        Raises:
            ValueError: the batch is empty or larger than ``batch_size``, or x is neither in the
                step's dtype nor uint8 (with ``pixel_values``).
        """
        xb, yb = self._gather(x, y, rows)
        spec, params = self.spec, self.params
        masks = masks if masks is not None else (None,) * len(params)
        if masks[0] is not None:
            xb *= masks[0]  # (the gathered copy: x itself is never written)
        inputs, logits = self._forward(xb, masks)
        value, delta = output_delta(logits, yb, spec)
        total = float(value) + l2_penalty(params, spec.l2)
        rate = self.optimizer.rate_at(self.state)  # (a schedule's value at this step)
        if self._gemm_update is not None:
            delta *= self.dtype.type(rate)
        self._backward_and_update(inputs, delta, masks, rate)
        if self._gemm_update is None:
            self.optimizer.update_in_place(params, self.grads, self.state)
        else:
            self.state["count"] += 1  # the update was done above, inside the products
        if self.max_norm:
            max_norm_in_place(params, self.max_norm, self._norms)
        return total

    def _gather(
        self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The batch's inputs xb (B, sizes[0]) and targets yb (B, sizes[-1]), views of the
        step's buffers, gathered from x (N, sizes[0]) and y (N, sizes[-1]) at ``rows`` (all of
        them if None); uint8 images are converted as they are gathered."""
        n = len(x) if rows is None else len(rows)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a batch of {n} rows does not fit batch_size={self.batch_size}")
        xb, yb = self._x[:n], self._y[:n]
        if x.dtype == np.uint8 and self._convert is not None:
            self._convert_bytes(x, rows, xb)
        elif x.dtype != self.dtype:
            raise ValueError(self._refusal(x.dtype))
        elif rows is None:
            np.copyto(xb, x)
        else:
            # mode="raise" (the default) would gather into a temporary and copy it over.
            np.take(x, rows, axis=0, out=xb, mode="clip")
        if rows is None:
            np.copyto(yb, y)
        else:
            np.take(y, rows, axis=0, out=yb, mode="clip")
        return xb, yb

    def _forward(self, xb: np.ndarray, masks: Masks) -> tuple[list[np.ndarray], np.ndarray]:
        """The forward pass over the batch xb (B, sizes[0]), in the step's output buffers; keeps
        what the backward pass needs of σ' (relu: the mask z > 0, or mask · relu' with dropout;
        tanh and sigmoid with dropout: σ' itself, computed before the mask).

        Returns:
            inputs: what each layer i reads, (B, sizes[i]): xb, then each hidden layer's
                activations (after its dropout mask), which the backward pass reuses.
            logits: the output layer's pre-activations (B, sizes[-1]).
        """
        activation, n = self.spec.activation, len(xb)
        last = len(self.params) - 1
        inputs = [xb]
        for i, layer in enumerate(self.params):
            out = np.matmul(inputs[-1], layer["W"], out=self._outputs[i][:n])
            out += layer["b"]
            if i < last:
                mask = masks[i + 1]
                if activation == "relu" and mask is not None:
                    # relu and dropout as one product, z ← z·(mask·(z > 0)), the factor kept
                    # for the backward pass: the same values as z·(z > 0), then ·mask (every
                    # factor is 0, 1 or the mask's 1/keep, so no rounding differs)
                    derivative = self._derivatives[i][:n]
                    np.greater(out, 0, out=derivative)
                    out *= np.multiply(mask, derivative, out=self._relu_mask(i)[:n])
                elif activation == "relu":
                    _relu_in_place(out, self._derivatives[i][:n])
                else:
                    if activation == "tanh":
                        np.tanh(out, out=out)
                    else:
                        _sigmoid_in_place(out)
                    if mask is not None:
                        # σ' from the activation before the mask: kept now, used backward
                        self._derivative_of(out, self._derivatives[i][:n])
                        out *= mask
                inputs.append(out)
        return inputs, out

    def _backward_and_update(
        self,
        inputs: list[np.ndarray],
        delta: np.ndarray,
        masks: Masks,
        rate: float,
    ) -> None:
        """The backward pass from the output delta (B, sizes[-1]) (already times the rate for
        the fused SGD update), updating each layer once its weights have been used for the delta
        below it: fused SGD updates W and b here; otherwise ``self.grads`` is filled for the
        optimizer. ``inputs`` as :meth:`_forward` returns them."""
        spec, params, dtype = self.spec, self.params, self.dtype.type
        n = len(delta)
        for i in range(len(params) - 1, -1, -1):
            W, b, grad = params[i]["W"], params[i]["b"], self.grads[i]
            if i > 0:  # from the weights before their update
                below = np.matmul(delta, W.T, out=self._deltas[i - 1][:n])
            # Σ over the batch as a vector-matrix product: faster than np.sum on these small
            # arrays, which adds up over an epoch of the origin's network (docs/performance.md).
            np.matmul(self._ones[:n], delta, out=grad["b"])
            if self._gemm_update is not None:
                # SGD in one product: W ← (1 − rate·l2)·W − inputsᵀ·(rate·δ)
                self._gemm_update(W, inputs[i], delta, -1.0, 1.0 - rate * spec.l2)
                np.subtract(b, grad["b"], out=b)
            else:
                np.matmul(inputs[i].T, delta, out=grad["W"])
                if spec.l2:
                    grad["W"] += dtype(spec.l2) * W
            if i > 0:
                # ∂loss/∂(pre-activation of hidden layer i − 1), from the layer's output and mask
                derivative = self._derivatives[i - 1][:n]
                if masks[i] is not None and spec.activation == "relu":
                    below *= self._relu_masks[i - 1][:n]  # mask · relu', made forward
                else:
                    if masks[i] is None and spec.activation != "relu":
                        self._derivative_of(inputs[i], derivative)
                    below *= derivative  # (relu: the mask made in the forward pass)
                    if masks[i] is not None:
                        below *= masks[i]
                delta = below

    def _convert_bytes(self, images: np.ndarray, rows: np.ndarray | None, xb: np.ndarray) -> None:
        """xb (B, n_in) ← the inputs of uint8 ``images`` (N, n_in) at ``rows`` (all if None):
        the bytes gathered first (a quarter of float32's memory traffic), then converted."""
        if rows is not None:
            gathered = self._bytes[: len(rows)]
            np.take(images, rows, axis=0, out=gathered, mode="clip")
            images = gathered
        self._convert(images, xb)

    def _refusal(self, dtype: np.dtype) -> str:
        """Why inputs of ``dtype`` are refused."""
        if dtype == np.uint8:
            return (
                "uint8 inputs need pixel_values (how a byte becomes an input) given to "
                "InPlaceTrainingStep"
            )
        accepted = f"{self.dtype}" + (" or uint8" if self._convert is not None else "")
        return f"inputs must be {accepted}, got {dtype}"

    def _relu_mask(self, i: int) -> np.ndarray:
        """The buffer for mask · relu' of hidden layer i (all of them made at the first call)."""
        if not self._relu_masks:
            self._relu_masks = [np.empty_like(d, self.dtype) for d in self._derivatives]
        return self._relu_masks[i]

    def _derivative_of(self, a: np.ndarray, out: np.ndarray) -> None:
        """out ← σ'(z) from the activation a = σ(z), for tanh and sigmoid (as ``mlp`` does)."""
        if self.spec.activation == "tanh":
            np.multiply(a, a, out=out)
            np.subtract(1, out, out=out)
        else:  # sigmoid: a(1 − a)
            np.subtract(1, a, out=out)
            out *= a
