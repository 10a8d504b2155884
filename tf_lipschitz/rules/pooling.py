"""Rules for pooling layers.

- Max pooling is ``√m``-Lipschitz, ``m = Π_d ceil(k_d / s_d)`` the largest number of windows that
  share one input position: each output moves by at most the largest move of its window, so
  ``‖Δy‖² ≤ Σ_windows max_{i∈w} Δx_i² ≤ m ‖Δx‖²``. It is 1 only for non-overlapping windows; a
  3×3 stride-2 max-pool is 2.
- Average pooling is linear, and its operator is ``I_channels ⊗ A_1 ⊗ … ⊗ A_D`` with 1-D
  averaging matrices ``A_d`` (windows are boxes; with ``"same"`` padding TF divides by the number
  of non-padded entries, which also factors over axes): its norm ``Π_d ‖A_d‖₂`` is exact and
  cheap (:func:`tf_lipschitz.certify.average_pool_norm`).
- Global average pooling over ``n`` positions is linear with norm ``1/√n`` exactly; global max
  pooling is 1-Lipschitz.
- Adaptive pooling (AdaptiveAveragePooling1D/2D/3D, AdaptiveMaxPooling1D/2D/3D) pools box
  windows whose extent along axis ``d`` depends only on the output index along ``d``
  (:func:`adaptive_pool_windows`, Keras's own arithmetic). Average: the operator is
  ``I_channels ⊗ A_1 ⊗ … ⊗ A_D`` with 1-D averaging matrices, norm ``Π_d ‖A_d‖₂`` exactly. Max:
  ``√(Π_d c_d)``, ``c_d`` the largest number of axis-``d`` windows that share one index (the
  number of boxes containing a position is the product over axes, and its maximum the product
  of the maxima); the argument of max pooling above applies, and the bound is attained by a
  bump at a position in ``Π_d c_d`` boxes, so it is exact.
  Both rules check their windows against the layer on a random input and raise
  :class:`~tf_lipschitz.errors.UnsupportedLayerError` if they differ.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import ops

from tf_lipschitz import certify
from tf_lipschitz.errors import UnsupportedLayerError
from tf_lipschitz.rules.base import (Constant, Linear, NodeContext, float32_reference,
                                     register_rule)

__all__ = ["adaptive_pool_windows", "max_pool_constant"]


def max_pool_constant(pool_size, strides) -> float:
    """``√(Π ceil(k_d / s_d))`` for a max pooling with the given window sizes and strides."""
    pool_size = tuple(pool_size)
    strides = tuple(strides) if strides is not None else pool_size
    overlap = 1
    for k, s in zip(pool_size, strides):
        overlap *= math.ceil(k / s)
    return math.sqrt(overlap)


def _max_pool(layer, ctx: NodeContext) -> Constant:
    value = max_pool_constant(layer.pool_size, layer.strides)
    return Constant(value, note=f"max-pool √(Π⌈k/s⌉) = {value:.4g}")


def _average_pool(layer, ctx: NodeContext) -> Linear:
    # TensorFlow has no float64 AvgPool3D kernel on CPU: for the exact float64 dense route of
    # certify (a chain such as Conv3D → AveragePooling3D), the same map is applied as the
    # Kronecker product of the 1-D averaging matrices that give the closed-form norm.
    matrices = None
    if len(layer.pool_size) == 3:
        matrices = certify.average_pool_matrices(layer, ctx.input_shape)

    def fn(x):  # the op itself (not layer(x), which would cast float64 inputs to float32)
        if matrices is not None and keras.backend.standardize_dtype(x.dtype) == "float64":
            return certify.apply_box_average(x, matrices, layer.data_format == "channels_last")
        return ops.average_pool(x, layer.pool_size, layer.strides, layer.padding,
                                layer.data_format)

    value = certify.average_pool_norm(layer, ctx.input_shape)
    return Linear(fn, norm=lambda: value,
                  certificate=certify.average_pool_certificate(layer, ctx.input_shape),
                  note=f"average pooling ⊗_d A_d: {value:.4g}")


def _spatial_positions(layer, ctx: NodeContext) -> int:
    shape = ctx.input_shape
    if layer.data_format == "channels_first":
        return math.prod(shape[1:])
    return math.prod(shape[:-1])


def _global_average(layer, ctx: NodeContext) -> Linear:
    n = _spatial_positions(layer, ctx)
    value = 1.0 / math.sqrt(n)
    return Linear(lambda x: layer(x), norm=lambda: value, certificate=lambda: value,
                  note=f"global average: 1/√{n}")


def adaptive_pool_windows(n: int, m: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the ``m`` windows of Keras's adaptive pooling of an axis of ``n``.

    Keras 3 (TensorFlow backend) starts window ``i`` at ``⌊i·n/m⌋`` and ends it at
    ``⌈(i+1)·n/m⌉`` (both in float32, clipped to the axis), then pools it with one of two
    window sizes, ``k = ⌈n/m⌉`` or ``k + 1``: the larger when the window has that size, else
    ``k`` (the "two-pool gather" of ``keras/src/backend/tensorflow/nn.py``). The same
    arithmetic is reproduced here in float32.

    Args:
        n: Input size of the axis.
        m: Output size of the axis.

    Returns:
        One ``(start, size)`` per output index.

    Example:
        >>> adaptive_pool_windows(5, 3)
        [(0, 2), (1, 3), (3, 2)]
    """
    index, size, count = np.arange(m, dtype=np.float32), np.float32(n), np.float32(m)
    starts = np.floor(index * size / count).astype(np.int64)
    ends = np.ceil((index + 1) * size / count).astype(np.int64)
    starts, ends = np.minimum(starts, n - 1), np.minimum(ends, n)
    small = math.ceil(n / m)
    return [(int(s), small + 1 if e - s == small + 1 else small) for s, e in zip(starts, ends)]


def _adaptive_geometry(layer, ctx: NodeContext):
    """``(channels_last, spatial sizes, windows per axis, random check input)``."""
    channels_last = layer.data_format == "channels_last"
    spatial = [int(n) for n in (ctx.input_shape[:-1] if channels_last else ctx.input_shape[1:])]
    windows = [adaptive_pool_windows(n, int(m)) for n, m in zip(spatial, layer.output_size)]
    x = np.random.default_rng(0).standard_normal((2, *ctx.input_shape)).astype("float32")
    return channels_last, spatial, windows, x


def _check_adaptive(layer, ctx: NodeContext, expected: np.ndarray, x: np.ndarray,
                    what: str) -> None:
    """Raises unless ``layer(x)`` is ``expected`` (the windows' pooling of ``x``)."""
    got = np.asarray(float32_reference(layer)(x), np.float64)
    if got.shape == expected.shape and np.allclose(got, expected, rtol=1e-5, atol=1e-5):
        return
    raise UnsupportedLayerError(
        layer,
        f"Its output on a random input of shape {tuple(ctx.input_shape)} is not the {what} "
        "over the windows of Keras 3's adaptive pooling (tf_lipschitz.rules.pooling."
        "adaptive_pool_windows): this Keras version pools other windows, and no bound is given "
        "rather than a wrong one.")


def _adaptive_average(layer, ctx: NodeContext) -> Linear:
    channels_last, spatial, windows, x = _adaptive_geometry(layer, ctx)
    matrices = []
    for n, axis in zip(spatial, windows):
        matrix = np.zeros((len(axis), n))
        for row, (start, size) in enumerate(axis):
            matrix[row, start:start + size] = 1.0 / size
        matrices.append(matrix)
    expected = np.asarray(certify.apply_box_average(x.astype(np.float64), matrices, channels_last))
    _check_adaptive(layer, ctx, expected, x, "average")
    value = certify.box_average_norm(matrices)

    def fn(x):  # one einsum, in x's dtype (float64 included)
        return certify.apply_box_average(x, matrices, channels_last)

    return Linear(fn, norm=lambda: value, certificate=certify.box_average_certificate(matrices),
                  note=f"adaptive average pooling ⊗_d A_d: {value:.4g}")


def _window_max(x: np.ndarray, windows: Sequence[list[tuple[int, int]]],
                channels_last: bool) -> np.ndarray:
    """Max of a batch over the boxes ``windows[0] × windows[1] × …`` (one axis at a time)."""
    for d, axis in enumerate(windows):
        a = d + (1 if channels_last else 2)
        x = np.stack([np.max(np.take(x, range(s, s + k), axis=a), axis=a) for s, k in axis],
                     axis=a)
    return x


def _adaptive_max(layer, ctx: NodeContext) -> Constant:
    channels_last, spatial, windows, x = _adaptive_geometry(layer, ctx)
    _check_adaptive(layer, ctx, _window_max(x, windows, channels_last), x, "maximum")
    overlap = 1
    for n, axis in zip(spatial, windows):
        counts = np.zeros(n, np.int64)
        for start, size in axis:
            counts[start:start + size] += 1
        overlap *= int(np.max(counts))
    value = math.sqrt(overlap)
    return Constant(value, note=f"adaptive max-pool √(Π_d overlap_d) = √{overlap}")


L = keras.layers
for _cls in (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D):
    register_rule(_cls, _max_pool)
for _cls in (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D):
    register_rule(_cls, _average_pool)
for _cls in (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D):
    register_rule(_cls, _global_average)
for _cls in (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D):
    register_rule(_cls, lambda layer, ctx: Constant(1.0, note="global max"))
for _cls in (L.AdaptiveAveragePooling1D, L.AdaptiveAveragePooling2D, L.AdaptiveAveragePooling3D):
    register_rule(_cls, _adaptive_average)
for _cls in (L.AdaptiveMaxPooling1D, L.AdaptiveMaxPooling2D, L.AdaptiveMaxPooling3D):
    register_rule(_cls, _adaptive_max)
