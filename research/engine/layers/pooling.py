"""2-D max- and average-pooling (NCHW) as layers, forward beside backward.

A window is ``kernel`` × ``kernel`` values, windows start every ``stride`` values (they overlap
when stride < kernel) and only whole windows count: the output is ((H − k) // s + 1,
(W − k) // s + 1) per channel (values past the last window get no gradient).

Both poolings are separable, and computed that way, in any layout the input has in memory: first
along the width for every input row ((B, C, H, Wo), k strided slices), then along the height
((B, C, Ho, Wo), k strided slices): 2·k slice operations instead of k², with no copy of the input.
When kernel == stride and k divides H and W, the slices are those of the reshape (B, C, H/k, k,
W/k, k), and the backward pass writes each input value once, into an uninitialized array; where
windows do not overlap it writes rather than adds; where they do, it adds into zeros.

Max-pooling's gradient goes to one element per window: the first maximal one in row-major window
order (the first row holding the window's maximum, the first column of that row holding it). The
numpy pass keeps, per row and window, the position of that row's first maximum, and per window
the first row reaching the maximum; strict ``>`` comparisons make ties go to the earlier element.
JAX's ``lax.reduce_window`` max differentiates the same way in what was tried (ties in 2×2 and
overlapping 3×3 windows, float32 and float64: the gradient lands on the first maximal element),
and the xp-generic forward pass selects with ``where(v > best, v, best)``, whose autodiff routes
ties to the earlier element as well. (Of a window holding both 0.0 and -0.0, either zero may be
the output.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from research.engine.layers.base import ArrayNamespace, LayerParams, Shape


def _check(kernel: int, stride: int, in_shape: Shape) -> str | None:
    if len(in_shape) != 3:
        return (
            f"takes images (channels, height, width), got inputs of shape {tuple(in_shape)}; "
            "put it before any dense or flatten layer"
        )
    _, height, width = in_shape
    if kernel > min(height, width):
        return (
            f"kernel {kernel} is larger than its {height}x{width} input; use a smaller kernel "
            "or fewer layers that shrink the image before it"
        )
    return None


def _validate(name: str, kernel: Any, stride: Any) -> None:
    for what, value in (("kernel", kernel), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}'s {what}={value!r} is not allowed; give a whole number >= 1")


def _out_shape(kernel: int, stride: int, in_shape: Shape) -> Shape:
    channels, height, width = in_shape
    return (channels, (height - kernel) // stride + 1, (width - kernel) // stride + 1)


def _describe(name: str, kernel: int, stride: int) -> str:
    return f"{name}({kernel})" if stride == kernel else f"{name}({kernel},{stride})"


@dataclass(frozen=True)
class _Pooling:
    """What max- and average-pooling share: kernel and stride (default: the kernel), no
    parameters, the floored output shape, the refusal of a kernel larger than the input, and
    how the layer is written (``name``)."""

    kernel: int
    stride: int | None = None
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.stride is None:
            object.__setattr__(self, "stride", self.kernel)
        _validate(self.name, self.kernel, self.stride)

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return {}

    def out_shape(self, in_shape: Shape) -> Shape:
        return _out_shape(self.kernel, self._stride, in_shape)

    def check(self, in_shape: Shape) -> str | None:
        return _check(self.kernel, self._stride, in_shape)

    def describe(self) -> str:
        return _describe(self.name, self.kernel, self._stride)

    @property
    def _stride(self) -> int:
        return int(self.stride)  # type: ignore[arg-type]  # set in __post_init__


@dataclass(frozen=True)
class MaxPool2D(_Pooling):
    """Max over each kernel × kernel window: x (B, C, H, W) → (B, C, Ho, Wo).

    ``stride`` defaults to ``kernel``. The gradient of a window goes to its first maximal element
    in row-major order (see the module's docstring).
    """

    name: ClassVar[str] = "maxpool"

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        if xp is np:
            return max_pool_numpy(x, self.kernel, self._stride)
        return pool_generic(x, self.kernel, self._stride, "max", xp), None

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        return max_pool_backward(cache, dy), {}


@dataclass(frozen=True)
class AvgPool2D(_Pooling):
    """Mean over each kernel × kernel window: x (B, C, H, W) → (B, C, Ho, Wo); ``stride``
    defaults to ``kernel``. Each window value receives dy / kernel²."""

    name: ClassVar[str] = "avgpool"

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        y = pool_generic(x, self.kernel, self._stride, "avg", xp)
        return y, _layout(x) if xp is np else None

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        return avg_pool_backward(cache, dy, self.kernel, self._stride), {}


# --- shared: slices, layouts ---------------------------------------------------------------------


class Layout(NamedTuple):
    """An input's shape (B, C, H, W), dtype and whether its channels are adjacent in memory."""

    shape: tuple[int, int, int, int]
    dtype: Any
    channels_last: bool


def _layout(x: np.ndarray) -> Layout:
    channels_last = x.shape[1] > 1 and x.strides[1] == x.itemsize
    return Layout(tuple(x.shape), x.dtype, channels_last)  # type: ignore[arg-type]


def _empty(
    shape: tuple[int, ...], dtype: Any, channels_last: bool, zeroed: bool = True
) -> np.ndarray:
    """A (B, C, H, W) array (zeros, or uninitialized), channels-last in memory or NCHW."""
    batch, channels, height, width = shape
    make = np.zeros if zeroed else np.empty
    if channels_last:
        return make((batch, height, width, channels), dtype).transpose(0, 3, 1, 2)
    return make(shape, dtype)


def _as_layout(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """x (B, C, H, W), copied into channels-last memory or NCHW memory when it is in the other:
    elementwise operations on operands of mixed layouts run in slow, strided loops."""
    if x.shape[1] == 1 or (x.strides[1] == x.itemsize) == channels_last:
        return x
    if channels_last:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _window_slices(size: int, kernel: int, stride: int) -> list[slice]:
    """Along an axis of ``size``: slice t picks element t of every whole window."""
    count = (size - kernel) // stride + 1
    span = stride * (count - 1) + 1
    return [slice(t, t + span, stride) for t in range(kernel)]


def _rows(x: Any, t: slice) -> Any:
    return x[:, :, t]


def _cols(x: Any, t: slice) -> Any:
    return x[:, :, :, t]


def pool_generic(x: Any, kernel: int, stride: int, kind: str, xp: ArrayNamespace) -> Any:
    """Max (first maximum wins, also under autodiff) or mean pooling with operations numpy and
    jax.numpy share: along the width, then along the height."""
    for pick, size in ((_cols, x.shape[3]), (_rows, x.shape[2])):
        parts = [pick(x, t) for t in _window_slices(size, kernel, stride)]
        reduced = parts[0]
        for part in parts[1:]:
            reduced = xp.where(part > reduced, part, reduced) if kind == "max" else reduced + part
        x = reduced
    return x if kind == "max" else x / (kernel * kernel)


# --- max-pooling, numpy --------------------------------------------------------------------------


class MaxPoolCache(NamedTuple):
    """Per input row and window, the column of the row's first maximum (B, C, H, Wo); per window,
    the first row reaching the maximum (B, C, Ho, Wo); int8 positions within the window, or
    booleans (position 1) for a kernel of 2."""

    first_col: np.ndarray
    first_row: np.ndarray
    layout: Layout
    kernel: int
    stride: int


def _first_max(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The elementwise maximum of ``parts`` and the index of the first part that reaches it."""
    if len(parts) == 2:  # a kernel of 2: the position is one comparison
        later = parts[1] > parts[0]
        return np.maximum(parts[0], parts[1]), later
    best = parts[0].copy()
    position = np.zeros(best.shape, np.int8)
    for t, part in enumerate(parts[1:], start=1):
        greater = part > best
        np.copyto(position, np.int8(t), where=greater)
        np.maximum(best, part, out=best)
    return best, position


def max_pool_numpy(x: np.ndarray, kernel: int, stride: int) -> tuple[np.ndarray, MaxPoolCache]:
    """y (B, C, Ho, Wo) and the positions of every window's first maximum."""
    row_max, first_col = _first_max(
        [_cols(x, t) for t in _window_slices(x.shape[3], kernel, stride)]
    )
    y, first_row = _first_max(
        [_rows(row_max, t) for t in _window_slices(x.shape[2], kernel, stride)]
    )
    return y, MaxPoolCache(first_col, first_row, _layout(x), kernel, stride)


def _tiles(size: int, kernel: int, stride: int) -> bool:
    """True when the windows cover an axis of ``size`` exactly once (kernel == stride | size)."""
    return kernel == stride and size % kernel == 0


def _route(
    grad: np.ndarray, position: np.ndarray, out: np.ndarray, axis: int, k: int, s: int
) -> None:
    """Along ``axis`` (2: rows, 3: columns) of ``out``, adds ``grad`` to the element of each
    window ``position`` names (writes it, when windows do not overlap)."""
    pick = _rows if axis == 2 else _cols
    for t, where in enumerate(_window_slices(out.shape[axis], k, s)):
        if position.dtype == bool:
            chosen = position if t == 1 else ~position
        else:
            chosen = position == t
        if s >= k:  # windows do not overlap: each element receives from one window at most
            np.multiply(grad, chosen, out=pick(out, where))
        else:
            pick(out, where)[...] += grad * chosen


def max_pool_backward(cache: MaxPoolCache, dy: np.ndarray) -> np.ndarray:
    """∂loss/∂x (B, C, H, W), laid out in memory as the input was, from dy (B, C, Ho, Wo)."""
    layout, k, s = cache.layout, cache.kernel, cache.stride
    batch, channels, height, width = layout.shape
    out_w = cache.first_col.shape[3]
    dy = _as_layout(dy, layout.channels_last)
    # zeros where a value may be in no window or in several; when the windows tile an axis,
    # every value along it is written once
    tiled_h, tiled_w = _tiles(height, k, s), _tiles(width, k, s)
    row_grad = _empty((batch, channels, height, out_w), dy.dtype, layout.channels_last, not tiled_h)
    _route(dy, cache.first_row, row_grad, 2, k, s)
    grad = _empty(layout.shape, dy.dtype, layout.channels_last, not (tiled_h and tiled_w))
    _route(row_grad, cache.first_col, grad, 3, k, s)
    return grad


# --- average pooling, numpy ----------------------------------------------------------------------


def avg_pool_backward(layout: Layout, dy: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """∂loss/∂x (B, C, H, W): every window value receives its window's dy / kernel²."""
    batch, channels, height, width = layout.shape
    out_w = (width - kernel) // stride + 1
    row_grad = _empty((batch, channels, height, out_w), dy.dtype, layout.channels_last)
    share = _as_layout(dy, layout.channels_last) / (kernel * kernel)
    for t in _window_slices(height, kernel, stride):
        row_grad[:, :, t] += share
    grad = _empty(layout.shape, dy.dtype, layout.channels_last)
    for t in _window_slices(width, kernel, stride):
        grad[:, :, :, t] += row_grad
    return grad
