"""2-D convolution (NCHW) as a layer, forward beside backward.

``y[b, f, h, w] = bias[f] + Σ_{c,i,j} W[f, c, i, j] · xpad[b, c, h·s + i, w·s + j]`` (a
cross-correlation, as in every deep-learning library), ``xpad`` the input zero-padded by ``pad`` on
each side of H and W, ``s`` the stride. Output size per axis: ``(H + 2·pad − k) // s + 1``.

Two forward passes compute the same values:

- numpy (training): im2col + one matrix product (BLAS), the bias included as a column of ones.
  The windows are copied out of a strided view (:func:`numpy.lib.stride_tricks.as_strided`) in
  one of two orders, whichever gives longer contiguous runs: channels-last rows
  ``(b, ho, wo) × (i, j, c)`` when the input is channels-last in memory or has many channels,
  else kernel-major rows ``(c, i, j) × (b, ho, wo)`` (a 1-channel image: runs as long as the
  output width). The output is computed as (B·Ho·Wo, filters), i.e. laid out channels-last in
  memory, and returned as a transposed view with the NCHW shape: what PyTorch calls the
  ``channels_last`` memory format. Elementwise layers and the poolings keep that layout, so the
  next convolution reads its input without a transposing copy; a reshape that needs NCHW order
  (a dense layer's flatten) copies, and gets it right, because the view is NCHW.
- ``xp`` generic (``jax.numpy``; numpy too, for the tests): the k·k shifted slices stacked and
  contracted with the weights by ``einsum``.

The backward pass (numpy) reuses the forward's im2col matrix: [∂W | ∂bias] = dyᵀ·cols, one
product. ∂x, when asked for (:meth:`Conv2D.backward`; the first layer of a network is asked for
``backward_params`` only), is a transposed convolution unrolled along the height, with additions
of contiguous blocks in place of col2im's k·k scattered ones (:func:`_input_gradient`).

Everything stays in the parameters' dtype (float32 stays float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from research.engine.layers.base import ArrayNamespace, LayerParams, Shape

INIT_SCHEMES = ("normal", "xavier", "he")


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Windows along one axis of ``size`` values padded by ``pad``: (size + 2·pad − k) // s + 1."""
    return (size + 2 * pad - kernel) // stride + 1


@dataclass(frozen=True)
class Conv2D:
    """2-D convolution: x (B, C, H, W) → y (B, filters, Ho, Wo), NCHW.

    Parameters ``W`` (filters, C, kernel, kernel) and ``b`` (filters,). ``init``: He normal (std
    √(2/fan_in), fan_in = C·k², zero bias; ``he``), Glorot uniform (fan_in = C·k², fan_out =
    filters·k², zero bias; ``xavier``) or the origin's standard normal W and b (``normal``);
    W is drawn before b. The l2 penalty applies to W only (``decayed``).
    """

    filters: int
    kernel: int
    stride: int = 1
    pad: int = 0
    init_scheme: str = "he"
    decayed = ("W",)

    def __post_init__(self) -> None:
        for name, least in (("filters", 1), ("kernel", 1), ("stride", 1), ("pad", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(
                    f"conv's {name}={value!r} is not allowed; give a whole number >= {least}"
                )
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(
                f"init {self.init_scheme!r} is not allowed; choose one of {', '.join(INIT_SCHEMES)}"
            )

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        channels, k = in_shape[0], self.kernel
        shape = (self.filters, channels, k, k)
        fan_in, fan_out = channels * k * k, self.filters * k * k
        if self.init_scheme == "normal":
            W = rng.standard_normal(shape)
            b = rng.standard_normal(self.filters)
        elif self.init_scheme == "xavier":
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            W = rng.uniform(-limit, limit, size=shape)
            b = np.zeros(self.filters)
        else:
            W = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            b = np.zeros(self.filters)
        return {"W": W.astype(dtype), "b": b.astype(dtype)}

    def out_shape(self, in_shape: Shape) -> Shape:
        _, height, width = in_shape
        k, s, p = self.kernel, self.stride, self.pad
        return (self.filters, output_size(height, k, s, p), output_size(width, k, s, p))

    def check(self, in_shape: Shape) -> str | None:
        """Why inputs of ``in_shape`` (one example) cannot be convolved, or None."""
        if len(in_shape) != 3:
            return (
                f"takes images (channels, height, width), got inputs of shape {tuple(in_shape)}; "
                "put it before any dense or flatten layer"
            )
        _, height, width = in_shape
        if self.kernel > min(height, width) + 2 * self.pad:
            return (
                f"kernel {self.kernel} is larger than its {height}x{width} input "
                f"(padded by {self.pad}); use a smaller kernel, more padding, or fewer pooling "
                "layers before it"
            )
        return None

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        """y (B, filters, Ho, Wo) from x (B, C, H, W); under numpy the cache serves backward."""
        if xp is np:
            return conv_forward_numpy(x, params["W"], params["b"], self.stride, self.pad)
        y = conv_forward_generic(x, params["W"], params["b"], self.stride, self.pad, xp)
        return y, None

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        """∂loss/∂x (B, C, H, W) and {"W", "b"} from dy = ∂loss/∂y (B, filters, Ho, Wo)."""
        rows = _dy_rows(dy)
        grads = _param_grads(cache, rows)
        return _input_gradient(rows, params["W"], cache, self.stride, self.pad), grads

    def backward_params(self, params: LayerParams, cache: Any, dy: np.ndarray) -> LayerParams:
        """{"W", "b"} only: no ∂loss/∂x (the first layer's; saves the transposed convolution)."""
        return _param_grads(cache, _dy_rows(dy))

    def describe(self) -> str:
        args = [self.filters, self.kernel]
        if self.stride != 1 or self.pad != 0:
            args.append(self.stride)
        if self.pad != 0:
            args.append(self.pad)
        return f"conv({','.join(str(a) for a in args)})"


# --- the xp-generic forward pass -----------------------------------------------------------------


def conv_forward_generic(x: Any, W: Any, b: Any, stride: int, pad: int, xp: ArrayNamespace) -> Any:
    """The convolution with operations numpy and jax.numpy share: x (B, C, H, W) zero-padded, its
    k·k shifted (strided) slices stacked (B, C, k·k, Ho, Wo) and contracted with W (F, C, k, k)."""
    filters, channels, k, _ = W.shape
    if pad:
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = output_size(height, k, stride, 0), output_size(width, k, stride, 0)
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    patches = xp.stack(
        [
            x[:, :, i : i + span_h : stride, j : j + span_w : stride]
            for i in range(k)
            for j in range(k)
        ],
        axis=2,
    )
    y = xp.einsum("bcthw,fct->bfhw", patches, W.reshape(filters, channels, k * k))
    return y + b.reshape(1, filters, 1, 1)


# --- the numpy forward pass ----------------------------------------------------------------------


class ConvCache(NamedTuple):
    """What the numpy backward pass needs: the im2col matrix and how it is laid out."""

    # channels-last rows (B·Ho·Wo, k·k·C + 1), columns (i, j, c) then a column of ones; or
    # kernel-major (C·k·k + 1, B·Ho·Wo), rows (c, i, j) then a row of ones (the bias's input)
    cols: np.ndarray
    channels_last: bool  # which of the two
    in_shape: tuple[int, int, int, int]  # x's (B, C, H, W)
    out_hw: tuple[int, int]  # (Ho, Wo)
    kernel: int


def conv_forward_numpy(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray,
    stride: int,
    pad: int,
    channels_last: bool | None = None,
) -> tuple[np.ndarray, ConvCache]:
    """im2col + one product, the bias included (a column of ones in the im2col matrix).

    Returns y (B, F, Ho, Wo), a view of a (B·Ho·Wo, F) array (channels-last memory), and the
    cache of :meth:`Conv2D.backward`. ``channels_last`` picks the im2col order (default: the one
    with the longer contiguous runs; the tests run both).
    """
    batch, channels, height, width = x.shape
    filters, _, k, _ = W.shape
    out_h, out_w = output_size(height, k, stride, pad), output_size(width, k, stride, pad)
    if channels_last is None:
        channels_last = _is_channels_last(x) or out_w < k * channels
    if channels_last:
        cols = _im2col_channels_last(x, k, stride, pad, out_h, out_w)
        weights = W.transpose(0, 2, 3, 1).reshape(filters, -1)  # (F, k·k·C), (i, j, c)
        y = cols @ np.concatenate([weights, b[:, None]], axis=1).T
    else:
        cols = _im2col_kernel_major(x, k, stride, pad, out_h, out_w)
        weights = W.reshape(filters, -1)  # (F, C·k·k), (c, i, j)
        y = cols.T @ np.concatenate([weights, b[:, None]], axis=1).T
    cache = ConvCache(cols, channels_last, (batch, channels, height, width), (out_h, out_w), k)
    return y.reshape(batch, out_h, out_w, filters).transpose(0, 3, 1, 2), cache


def _is_channels_last(x: np.ndarray) -> bool:
    """True when x (B, C, H, W) has its channels adjacent in memory (C > 1)."""
    return x.shape[1] > 1 and x.strides[1] == x.itemsize


def _channels_last_padded(x: np.ndarray, pad: int) -> np.ndarray:
    """x (B, C, H, W) as a C-contiguous (B, H + 2·pad, W + 2·pad, C) array (x's own memory when
    it is that already)."""
    nhwc = x.transpose(0, 2, 3, 1)
    if not pad:
        return np.ascontiguousarray(nhwc)
    batch, height, width, channels = nhwc.shape
    out = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels), x.dtype)
    out[:, pad : pad + height, pad : pad + width] = nhwc
    return out


def _im2col_channels_last(
    x: np.ndarray, k: int, stride: int, pad: int, out_h: int, out_w: int
) -> np.ndarray:
    """(B·Ho·Wo, k·k·C + 1): row (b, ho, wo) holds window (ho, wo) of example b in (i, j, c)
    order, then a 1.

    One copy of a strided view: for a kernel row i, the window's k·C values are contiguous in
    channels-last memory, so the copy moves runs of k·C values.
    """
    xh = _channels_last_padded(x, pad)
    batch, padded_h, padded_w, channels = xh.shape
    # the strides of C-contiguous memory, written out: numpy may report any stride for an axis
    # of length 1 (C = 1), and as_strided would follow it out of the array
    item = xh.itemsize
    row = padded_w * channels * item
    windows = as_strided(
        xh,
        shape=(batch, out_h, out_w, k, k * channels),
        strides=(padded_h * row, stride * row, stride * channels * item, row, item),
        writeable=False,
    )
    size = k * k * channels
    cols = np.empty((batch * out_h * out_w, size + 1), x.dtype)
    cols[:, size] = 1
    np.copyto(cols[:, :size].reshape(windows.shape, copy=False), windows)
    return cols


def _im2col_kernel_major(
    x: np.ndarray, k: int, stride: int, pad: int, out_h: int, out_w: int
) -> np.ndarray:
    """(C·k·k + 1, B·Ho·Wo): row (c, i, j) holds x[b, c, ho·s + i, wo·s + j] over (b, ho, wo);
    the last row is ones.

    k·k copies of strided slices, each moving runs of Wo values (x in NCHW memory).
    """
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    batch, channels = x.shape[:2]
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    size = channels * k * k
    cols = np.empty((size + 1, batch * out_h * out_w), x.dtype)
    cols[size] = 1
    body = cols[:size].reshape(channels, k, k, batch, out_h, out_w)
    for i in range(k):
        for j in range(k):
            window = x[:, :, i : i + span_h : stride, j : j + span_w : stride]
            body[:, i, j] = window.transpose(1, 0, 2, 3)
    return cols


# --- the numpy backward pass -------------------------------------------------------------------


def _dy_rows(dy: np.ndarray) -> np.ndarray:
    """dy (B, F, Ho, Wo) as (B·Ho·Wo, F) rows: free when dy is channels-last in memory."""
    return dy.transpose(0, 2, 3, 1).reshape(-1, dy.shape[1])


def _param_grads(cache: ConvCache, rows: np.ndarray) -> LayerParams:
    """{"W": (F, C, k, k), "b": (F,)} from dy's rows (B·Ho·Wo, F) and the im2col matrix: one
    product, whose last column (the ones') is Σ dy, the bias's gradient."""
    filters, channels, k = rows.shape[1], cache.in_shape[1], cache.kernel
    if cache.channels_last:
        grad = rows.T @ cache.cols  # (F, k·k·C + 1), columns (i, j, c), 1
        grad_W = grad[:, :-1].reshape(filters, k, k, channels).transpose(0, 3, 1, 2)
    else:
        grad = (cache.cols @ rows).T  # (F, C·k·k + 1), columns (c, i, j), 1
        grad_W = grad[:, :-1].reshape(filters, channels, k, k)
    return {"W": np.ascontiguousarray(grad_W), "b": np.ascontiguousarray(grad[:, -1])}


def _input_gradient(
    rows: np.ndarray, W: np.ndarray, cache: ConvCache, stride: int, pad: int
) -> np.ndarray:
    """∂loss/∂x (B, C, H, W), channels-last in memory, from dy's rows (B·Ho·Wo, F).

    A transposed convolution, unrolled along the height only:
    ∂x_pad[b, h, wo·s + j, c] += R[b, h, wo, (j, c)], R[b, h, wo, (j, c)] = Σ_{i,f}
    dy[b, ho, wo, f]·W[f, c, i, j] over h = ho·s + i. dy is placed, dilated by s, into a buffer P
    (B, Hp + k − 1, Wo, F) padded by k − 1 rows above, P's k-row windows are copied into
    (B·Hp·Wo, k·F), and one product with the height-flipped kernel (k·F, k·C) gives R. For one
    output column wo, R's (j, c) values are k·C contiguous values and so are their places in
    channels-last ∂x: Wo additions of (B, Hp, k·C) blocks place them all. (col2im of
    dcols = dy·W, the textbook way, moved runs of C values in its k·k additions: 1.2-1.9x
    slower here, though its product is a third smaller.)
    """
    batch, channels, height, width = cache.in_shape
    out_h, out_w = cache.out_hw
    filters, _, k, _ = W.shape
    padded_h, padded_w = height + 2 * pad, width + 2 * pad
    buffer = np.zeros((batch, padded_h + k - 1, out_w, filters), rows.dtype)
    span_h = stride * (out_h - 1) + 1
    buffer[:, k - 1 : k - 1 + span_h : stride] = rows.reshape(batch, out_h, out_w, filters)
    item = buffer.itemsize
    row = out_w * filters * item  # one row of the C-contiguous buffer
    windows = as_strided(
        buffer,
        shape=(batch, padded_h, out_w, k, filters),
        strides=((padded_h + k - 1) * row, row, filters * item, row, item),
        writeable=False,
    ).reshape(batch * padded_h * out_w, k * filters)
    # flipped[(i', f), (j, c)] = W[f, c, k − 1 − i', j]
    flipped = W[:, :, ::-1, :].transpose(2, 0, 3, 1).reshape(k * filters, k * channels)
    blocks = (windows @ flipped).reshape(batch, padded_h, out_w, k * channels)
    grad = np.zeros((batch, padded_h, padded_w * channels), rows.dtype)
    for wo in range(out_w):
        start = wo * stride * channels
        grad[:, :, start : start + k * channels] += blocks[:, :, wo]
    grad = grad.reshape(batch, padded_h, padded_w, channels)
    return grad[:, pad : pad + height, pad : pad + width].transpose(0, 3, 1, 2)
