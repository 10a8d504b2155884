"""Rules for layers that are affine in their input: Dense, EinsumDense and every convolution.

Each rule returns the layer's linear part with the bias removed, as the same Keras op the layer
itself calls (so strides, padding, dilation and groups are exactly the layer's), followed by the
layer's ``activation``. Its operator norm is then measured on the layer's real input shape.
Stride-1 convolutions (and depthwise ones with depth multiplier 1) also carry their explicit
transpose, which the spectral solver uses instead of an autodiff backward pass: a convolution
with the flipped kernel on the output padded by the complement of the forward padding, the
flipped kernel prepared once per solve (:class:`tf_lipschitz.operators.Adjoint`); 1.0-1.9x
faster per product on CPU.
The weights are read as the layer multiplies by them (rounded to its compute dtype: float16
under ``mixed_float16``) and cast to the dtype of the input, so the same function runs in float64
when :mod:`tf_lipschitz.certify` materialises a small operator exactly. Every rule also attaches a
certified bound (:mod:`tf_lipschitz.certify`) evaluated with the current weights.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from tf_lipschitz import certify
from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.operators import Adjoint
from tf_lipschitz.rules.activations import resolve_activation
from tf_lipschitz.rules.base import Linear, NodeContext, register_rule, weight_as_used

__all__: list[str] = []


def _activation(layer, ctx: NodeContext):
    """The layer's fused activation; Keras applies it on the last axis (``log_softmax`` needs
    that axis' size)."""
    shape = ctx.output_shapes[0] if ctx.output_shapes else ()
    size = int(shape[-1]) if shape and shape[-1] is not None else None
    return resolve_activation(getattr(layer, "activation", None), layer, size=size)


def _check_quantization(layer) -> None:
    """Refuses a layer quantized by ``model.quantize()`` (int8, int4, float8, GPTQ, AWQ).

    An integer ``kernel`` is read with a separate ``kernel_scale`` (a rule multiplying by
    ``kernel`` was off by that scale: 261.6 for an int8 Dense of norm 1393), and the inputs (and
    a float8 kernel) are rounded at run time, which makes the map discontinuous: a float8 Dense
    with kernel 1.07 was certified 1.0700011 while it moves 0 to 1 by 1.125.
    """
    mode = getattr(layer, "quantization_mode", None)
    if mode is None:
        return
    if mode == "float8" or getattr(layer, "inputs_quantizer", None) is not None:
        raise NotLipschitzError(
            layer,
            f"its {mode} quantization rounds the layer's inputs at run time, a discontinuous "
            "map. Bound the float model before `model.quantize()`.")
    raise UnsupportedLayerError(
        layer,
        f"Its kernel is {mode}-quantized (integers with a separate scale), which the Dense "
        "rules do not read. Bound the float model before `model.quantize()`.",
        suggest_rule=False)


def _dense(layer, ctx: NodeContext) -> Linear:
    _check_quantization(layer)
    return Linear(
        lambda x: ops.matmul(x, weight_as_used(layer, layer.kernel, x.dtype)),
        _activation(layer, ctx),
        certificate=certify.dense_certificate(layer, ctx.input_shape, ctx.output_shapes[0]),
    )


def _einsum_dense(layer, ctx: NodeContext) -> Linear:
    _check_quantization(layer)
    return Linear(
        lambda x: ops.einsum(layer.equation, x, weight_as_used(layer, layer.kernel, x.dtype)),
        _activation(layer, ctx),
        certificate=certify.einsum_certificate(layer, ctx.input_shape, ctx.output_shapes[0]),
    )


def _with_certificate(layer, ctx: NodeContext, fn) -> Linear:
    cert = certify.conv_certificate(layer, ctx.input_shape, ctx.output_shapes[0], fn)
    return Linear(fn, _activation(layer, ctx), certificate=cert)


def _adjoint_padding(layer) -> list[tuple[int, int]] | None:
    """Zero padding of the output, per axis (batch included), that turns a convolution with
    the flipped kernel into the transpose of a stride-1 convolution; ``None`` if strided.

    Forward: ``y[n] = Σ_t K[t] x[n + t·d - L]`` (``x`` zero outside the input). Its transpose
    is ``x̂[m] = Σ_t Kᵀ[t] y[m - t·d + L]``, a correlation with the flipped kernel once ``y``
    is padded by ``(span - L, span - R)``, where ``span = (k - 1)·d`` and ``(L, R)`` is the
    forward padding (TF's "same" puts the odd pixel on the right).
    """
    if any(s != 1 for s in layer.strides):
        return None
    pads = []
    for k, d in zip(layer.kernel_size, layer.dilation_rate):
        span = (k - 1) * d
        left = {"valid": 0, "same": span // 2, "causal": span}[layer.padding]
        right = span - left if layer.padding == "same" else 0
        pads.append((span - left, span - right))
    if layer.data_format == "channels_first":
        return [(0, 0), (0, 0), *pads]
    return [(0, 0), *pads, (0, 0)]


def _flip(kernel, spatial: int):
    return ops.flip(kernel, axis=tuple(range(spatial)))


def _conv(layer, ctx: NodeContext) -> Linear:
    padding = layer.padding
    causal = None
    if padding == "causal":  # Conv1D pads on the left itself, then runs a valid convolution
        causal, padding = layer._compute_causal_padding(), "valid"

    def fn(x):
        if causal is not None:
            x = ops.pad(x, causal)
        return ops.conv(
            x, weight_as_used(layer, layer.kernel, x.dtype), strides=list(layer.strides),
            padding=padding, dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )

    pads = _adjoint_padding(layer) if layer.groups == 1 else None

    def prepare(dtype):  # once per solve: the flipped, channel-swapped kernel
        kernel = weight_as_used(layer, layer.kernel, dtype)
        return ops.swapaxes(_flip(kernel, len(layer.kernel_size)), -1, -2)

    def apply(y, kernel):
        return ops.conv(ops.pad(y, pads), kernel, strides=1, padding="valid",
                        dilation_rate=layer.dilation_rate, data_format=layer.data_format)

    bound = _with_certificate(layer, ctx, fn)
    if pads is None:
        return bound
    return dataclasses.replace(bound, adjoint=Adjoint(apply, prepare))


def _depthwise_conv(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.depthwise_conv(
            x, weight_as_used(layer, layer.kernel, x.dtype), strides=layer.strides,
            padding=layer.padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    pads = _adjoint_padding(layer) if layer.depth_multiplier == 1 else None

    def prepare(dtype):  # one channel per group: the transposed kernel is the flipped kernel
        return _flip(weight_as_used(layer, layer.kernel, dtype), len(layer.kernel_size))

    def apply(y, kernel):
        return ops.depthwise_conv(
            ops.pad(y, pads), kernel, strides=1, padding="valid",
            dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )

    bound = _with_certificate(layer, ctx, fn)
    if pads is None:
        return bound
    return dataclasses.replace(bound, adjoint=Adjoint(apply, prepare))


def _separable_conv(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.separable_conv(
            x, weight_as_used(layer, layer.depthwise_kernel, x.dtype),
            weight_as_used(layer, layer.pointwise_kernel, x.dtype), strides=layer.strides,
            padding=layer.padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    return _with_certificate(layer, ctx, fn)


def _conv_transpose(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.conv_transpose(
            x, weight_as_used(layer, layer.kernel, x.dtype), strides=list(layer.strides),
            padding=layer.padding, output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )

    return _with_certificate(layer, ctx, fn)


L = keras.layers
register_rule(L.Dense, _dense)
register_rule(L.EinsumDense, _einsum_dense)
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D):
    register_rule(_cls, _conv)
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register_rule(_cls, _depthwise_conv)
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register_rule(_cls, _separable_conv)
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_rule(_cls, _conv_transpose)
