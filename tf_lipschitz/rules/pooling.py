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
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tf_lipschitz import certify
from tf_lipschitz.rules.base import Constant, Linear, NodeContext, register_rule

__all__ = ["max_pool_constant"]


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


L = keras.layers
for _cls in (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D):
    register_rule(_cls, _max_pool)
for _cls in (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D):
    register_rule(_cls, _average_pool)
for _cls in (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D):
    register_rule(_cls, _global_average)
for _cls in (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D):
    register_rule(_cls, lambda layer, ctx: Constant(1.0, note="global max"))
