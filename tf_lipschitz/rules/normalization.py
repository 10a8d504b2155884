"""Rules for normalisation layers (at inference).

BatchNormalization, Rescaling, Normalization and ConvNeXt's LayerScale are affine per channel,
so they are :class:`~tf_lipschitz.rules.base.Linear` and fuse with a preceding convolution or
dense layer.
LayerNormalization and GroupNormalization are Lipschitz only thanks to ``epsilon``: their bound
``max|γ| / √ε`` is valid but usually huge, so a warning is issued.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras import ops

from tf_lipschitz.errors import NotLipschitzError
from tf_lipschitz.rules.base import Constant, Linear, NodeContext, register_rule

__all__: list[str] = []


def _channel_shape(ndim: int, axes) -> list[int]:
    """Broadcast shape of per-channel parameters for an input of rank ``ndim`` (with batch)."""
    axes = [a % ndim for a in (axes if isinstance(axes, (list, tuple)) else [axes])]
    return [-1 if i in axes else 1 for i in range(ndim)]


def _diagonal(fn, ctx: NodeContext):
    """An elementwise scaling is its own transpose, unless its factor broadcasts the input to
    a larger output."""
    same = tuple(ctx.output_shapes[0]) == tuple(ctx.input_shape)
    return fn if same else None


def _batch_norm(layer, ctx: NodeContext) -> Linear:
    ndim = len(ctx.input_shape) + 1

    def scale():
        var = ops.cast(layer.moving_variance, "float32")
        s = ops.rsqrt(var + layer.epsilon)
        if layer.scale:
            s = s * ops.cast(layer.gamma, "float32")
        return s

    def fn(x):
        return x * ops.cast(ops.reshape(scale(), _channel_shape(ndim, layer.axis)), x.dtype)

    def norm():
        return float(np.max(np.abs(ops.convert_to_numpy(scale()))))

    return Linear(fn, norm=norm, certificate=norm, note="BN (inference): max|γ|/√(var+ε)",
                  adjoint=_diagonal(fn, ctx))


def _rescaling(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return x * ops.cast(layer.scale, x.dtype)

    def norm():
        return float(np.max(np.abs(np.asarray(layer.scale, dtype="float64"))))

    return Linear(fn, norm=norm, certificate=norm, note="rescaling", adjoint=_diagonal(fn, ctx))


def _normalization(layer, ctx: NodeContext) -> Linear:
    def factor():
        std = ops.maximum(ops.sqrt(ops.cast(layer.variance, "float32")), keras.backend.epsilon())
        return std if layer.invert else 1.0 / std

    def fn(x):
        return x * ops.cast(factor(), x.dtype)

    def norm():
        return float(np.max(np.abs(ops.convert_to_numpy(factor()))))

    return Linear(fn, norm=norm, certificate=norm, note="normalization",
                  adjoint=_diagonal(fn, ctx))


def _eps_normalization(layer, ctx: NodeContext) -> Constant:
    gamma = 1.0
    if getattr(layer, "scale", False) and getattr(layer, "gamma", None) is not None:
        gamma = float(np.max(np.abs(ops.convert_to_numpy(layer.gamma))))
    value = gamma / math.sqrt(layer.epsilon)
    warnings.warn(
        f"Layer '{layer.name}' ({type(layer).__name__}) is Lipschitz only thanks to "
        f"epsilon={layer.epsilon:g}: its bound max|gamma|/sqrt(epsilon) = {value:.4g} is valid "
        "but usually far from tight.",
        stacklevel=2,
    )
    return Constant(value, note="max|γ|/√ε (loose)")


def _unit_normalization(layer, ctx):
    raise NotLipschitzError(layer, "x/‖x‖ has an unbounded derivative near 0.")


def _layer_scale(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return x * ops.cast(layer.gamma, x.dtype)

    def norm():
        return float(np.max(np.abs(np.asarray(ops.convert_to_numpy(layer.gamma), "float64"))))

    return Linear(fn, norm=norm, certificate=norm, note="layer scale: max|γ|",
                  adjoint=_diagonal(fn, ctx))


try:  # ConvNeXt's learned per-channel scale; Keras does not export the class
    from keras.src.applications.convnext import LayerScale
except ImportError:  # pragma: no cover - other Keras layouts
    LayerScale = None

register_rule(keras.layers.BatchNormalization, _batch_norm)
register_rule(keras.layers.Rescaling, _rescaling)
register_rule(keras.layers.Normalization, _normalization)
register_rule(keras.layers.LayerNormalization, _eps_normalization)
register_rule(keras.layers.GroupNormalization, _eps_normalization)
register_rule(keras.layers.UnitNormalization, _unit_normalization)
if LayerScale is not None:
    register_rule(LayerScale, _layer_scale)

DIAGONAL_LAYERS: tuple[type, ...] = (
    keras.layers.BatchNormalization, keras.layers.Rescaling, keras.layers.Normalization,
) + ((LayerScale,) if LayerScale is not None else ())
"""Layers whose rule above is a per-channel diagonal map (folded into fused certificates)."""
