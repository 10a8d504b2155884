"""Rules for normalisation layers (at inference).

BatchNormalization, Rescaling, Normalization and ConvNeXt's LayerScale are affine per channel,
so they are :class:`~tf_lipschitz.rules.base.Linear` and fuse with a preceding convolution or
dense layer.
LayerNormalization and GroupNormalization are Lipschitz only thanks to ``epsilon``: their bound
``max|γ| / √ε`` is valid but usually huge, so a warning is issued.
RMSNormalization, ``x ↦ scale · x / √(mean(x²) + ε)``, is also Lipschitz only thanks to ``ε``;
its constant ``max|scale| / √ε`` is exact (attained at ``x = 0``), and a warning is issued too.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules.base import (
    Constant,
    Linear,
    NodeContext,
    broadcast_product_norm,
    certified_max,
    register_rule,
    weight_as_used,
    weight_values,
)

__all__: list[str] = []


def _channel_shape(ndim: int, axes) -> list[int]:
    """Broadcast shape of per-channel parameters for an input of rank ``ndim`` (with batch)."""
    axes = [a % ndim for a in (axes if isinstance(axes, (list, tuple)) else [axes])]
    return [-1 if i in axes else 1 for i in range(ndim)]


def _diagonal(fn, ctx: NodeContext) -> dict:
    """``Linear`` arguments of an elementwise scaling: it is diagonal and its own transpose,
    unless its factor broadcasts the input to a larger output."""
    same = tuple(ctx.output_shapes[0]) == tuple(ctx.input_shape)
    return {"adjoint": fn if same else None, "diagonal": same}


def _arithmetic_dtype(layer) -> str:
    """The dtype BatchNormalization, LayerNormalization and GroupNormalization compute in: they
    upcast half precision to float32 (float64 stays float64)."""
    return keras.backend.result_type(layer.compute_dtype, "float32")


def _batch_norm(layer, ctx: NodeContext) -> Linear:
    ndim = len(ctx.input_shape) + 1
    dtype = _arithmetic_dtype(layer)

    def read(variable):
        return weight_as_used(layer, variable, dtype, compute_dtype=dtype)

    def scale():  # as the layer computes it: rsqrt(var + ε) · γ in its arithmetic dtype
        s = ops.rsqrt(read(layer.moving_variance) + layer.epsilon)
        if layer.scale:
            s = s * read(layer.gamma)
        return s

    def fn(x):
        return x * ops.cast(ops.reshape(scale(), _channel_shape(ndim, layer.axis)), x.dtype)

    def norm():
        return float(np.max(np.abs(ops.convert_to_numpy(scale()))))

    def certificate():
        var = weight_values(layer, layer.moving_variance, compute_dtype=dtype)
        gamma = weight_values(layer, layer.gamma, compute_dtype=dtype) if layer.scale else 1.0
        return certified_max(layer, lambda eps: np.abs(gamma) / np.sqrt(var + eps),
                              layer.epsilon, dtype, [scale()], operations=4)

    return Linear(fn, norm=norm, certificate=certificate,
                  note="BN (inference): max|γ|/√(var+ε)", **_diagonal(fn, ctx))


def _channel_scale(layer, ctx: NodeContext, value, note: str) -> Linear:
    """``x ↦ x · c`` for a per-channel factor ``c`` (a variable is read at every call).

    The layer multiplies by ``c`` rounded to its compute dtype (``Rescaling(1/255)`` by the
    float32 number above ``1/255``); the certificate bounds that and the exact value.
    """

    out_shape = tuple(ctx.output_shapes[0])

    def fn(x):
        y = x * weight_as_used(layer, value, x.dtype)
        if tuple(y.shape[1:]) != out_shape:  # the offset broadcasts x further (copies it)
            y = ops.broadcast_to(y, (ops.shape(y)[0], *out_shape))
        return y

    def magnitude(values):  # a factor that broadcasts x copies each entry: ‖c‖₂ over its copies
        return broadcast_product_norm(np.abs(values), ctx.input_shape, ctx.output_shapes[0])

    def norm():
        return magnitude(weight_values(layer, value))

    def certificate():
        exact = weight_values(layer, value, compute_dtype="float64")
        return max(norm(), magnitude(exact))

    return Linear(fn, norm=norm, certificate=certificate, note=note, **_diagonal(fn, ctx))


def _rescaling(layer, ctx: NodeContext) -> Linear:
    return _channel_scale(layer, ctx, layer.scale, "rescaling")


def _normalization(layer, ctx: NodeContext) -> Linear:
    def std():  # as the layer computes it, in its compute dtype
        deviation = ops.sqrt(weight_as_used(layer, layer.variance, layer.compute_dtype))
        return ops.maximum(deviation, keras.backend.epsilon())

    def factor(dtype):  # the layer divides by std (or multiplies, inverted)
        value = ops.cast(std(), dtype)
        return value if layer.invert else 1.0 / value

    def fn(x):
        return x * factor(x.dtype)

    def norm():
        return float(np.max(np.abs(ops.convert_to_numpy(factor("float64")))))

    def certificate():
        var = weight_values(layer, layer.variance)

        def closed_form(eps):
            deviation = np.maximum(np.sqrt(var), eps)
            return deviation if layer.invert else 1.0 / deviation

        return certified_max(layer, closed_form, keras.backend.epsilon(), layer.compute_dtype,
                              [factor("float64"), factor(layer.compute_dtype)], operations=2)

    return Linear(fn, norm=norm, certificate=certificate, note="normalization",
                  **_diagonal(fn, ctx))


def _eps_normalization(layer, ctx: NodeContext) -> Constant:
    if getattr(layer, "rms_scaling", False):
        raise NotLipschitzError(
            layer,
            "with rms_scaling=True it multiplies the uncentred x by γ/√(var(x)+ε), var being "
            "the centred variance (Keras calls the flag deprecated): on a constant vector "
            "var(x) = 0 and the output x·γ/√ε grows without bound (secant ratios 51, 577 and "
            "5637 at 10, 100 and 1000 times a constant vector). Use rms_scaling=False.")
    gamma = 1.0
    dtype = _arithmetic_dtype(layer)
    if getattr(layer, "scale", False) and getattr(layer, "gamma", None) is not None:
        gamma = weight_values(layer, layer.gamma, compute_dtype=dtype)
    value = certified_max(layer, lambda eps: np.abs(gamma) / np.sqrt(eps), layer.epsilon,
                           dtype, [], operations=2)
    warnings.warn(
        f"Layer '{layer.name}' ({type(layer).__name__}) is Lipschitz only thanks to "
        f"epsilon={layer.epsilon:g}: its bound max|gamma|/sqrt(epsilon) = {value:.4g} is valid "
        "but usually far from tight.",
        stacklevel=2,
    )
    return Constant(value, note="max|γ|/√ε (loose)")


def _rms_normalization(layer, ctx: NodeContext) -> Constant:
    """``y = (x / s(x)) ⊙ scale`` with ``s(x) = √(mean(x²) + ε)`` over each group (``axis``).

    On one group of ``n`` entries the Jacobian of ``x ↦ x / s`` is
    ``(1/s)(I − x xᵀ / (n s²))``: ``1/s`` on the vectors orthogonal to ``x`` and
    ``ε / s³`` along ``x``, so its norm is ``1/s ≤ 1/√ε``; groups are disjoint, so the whole
    map has the same bound, with equality at ``x = 0`` (the Jacobian is ``I / √ε`` there).
    Keras multiplies by ``scale`` (shape: the sizes of ``axis``) with NumPy broadcasting, which
    aligns it with the *trailing* axes whatever ``axis`` is, and can even copy the input
    (axis 1 of a ``(3, 1)`` input gives a ``(3, 3)`` output); that product is a fixed linear
    map ``C`` of norm ``max_j ‖scale‖₂`` over the copies of each entry ``j`` (``max|scale|``
    without copies). So ``L = ‖C‖ / √ε`` exactly: ``‖C J‖ ≤ ‖C‖ ‖J‖``, with equality at 0.
    """
    ndim = len(ctx.input_shape) + 1
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if 0 in [a % ndim for a in axes]:
        raise UnsupportedLayerError(
            layer, f"It normalises over the batch axis (axis={layer.axis!r}), so the output of "
            "one example depends on the others; tf_lipschitz bounds per-example maps.",
            suggest_rule=False)
    epsilon = keras.backend.epsilon() if layer.epsilon is None else layer.epsilon
    if not epsilon > 0:
        raise NotLipschitzError(
            layer, f"with epsilon={layer.epsilon!r}, x / √mean(x²) has an unbounded derivative "
            "near 0 (it jumps at 0: x and −x map to opposite points at any small scale). Use "
            "epsilon > 0.")
    magnitude = np.abs(weight_values(layer, layer.scale))
    norm = broadcast_product_norm(magnitude, ctx.input_shape, ctx.output_shapes[0])
    value = certified_max(layer, lambda eps: norm / np.sqrt(eps), epsilon,
                           _arithmetic_dtype(layer), [], operations=2)
    warnings.warn(
        f"Layer '{layer.name}' (RMSNormalization) is Lipschitz only thanks to "
        f"epsilon={epsilon:g}: its constant max|scale|/sqrt(epsilon) = {value:.4g} is exact "
        "(attained at x = 0) but far above its slope max|scale|/rms(x) on inputs whose "
        "root mean square is much larger than sqrt(epsilon).",
        stacklevel=2,
    )
    return Constant(value, note="max|scale|/√ε (exact, at x = 0)")


def _unit_normalization(layer, ctx):
    raise NotLipschitzError(layer, "x/‖x‖ has an unbounded derivative near 0.")


def _layer_scale(layer, ctx: NodeContext) -> Linear:
    return _channel_scale(layer, ctx, layer.gamma, "layer scale: max|γ|")


try:  # ConvNeXt's learned per-channel scale; Keras does not export the class
    from keras.src.applications.convnext import LayerScale
except ImportError:  # pragma: no cover - other Keras layouts
    LayerScale = None

register_rule(keras.layers.BatchNormalization, _batch_norm)
register_rule(keras.layers.Rescaling, _rescaling)
register_rule(keras.layers.Normalization, _normalization)
register_rule(keras.layers.LayerNormalization, _eps_normalization)
register_rule(keras.layers.GroupNormalization, _eps_normalization)
register_rule(keras.layers.RMSNormalization, _rms_normalization)
register_rule(keras.layers.UnitNormalization, _unit_normalization)
if LayerScale is not None:
    register_rule(LayerScale, _layer_scale)
