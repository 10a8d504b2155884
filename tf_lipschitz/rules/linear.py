"""Rules for layers that are affine in their input: Dense, EinsumDense and every convolution.

Each rule returns the layer's linear part with the bias removed, as the same Keras op the layer
itself calls (so strides, padding, dilation and groups are exactly the layer's), followed by the
layer's ``activation``. Its operator norm is then measured on the layer's real input shape.
"""

from __future__ import annotations

import keras
from keras import ops

from tf_lipschitz.rules.activations import resolve_activation
from tf_lipschitz.rules.base import Linear, NodeContext, register_rule

__all__: list[str] = []


def _activation(layer):
    return resolve_activation(getattr(layer, "activation", None), layer)


def _dense(layer, ctx: NodeContext) -> Linear:
    return Linear(lambda x: ops.matmul(x, layer.kernel), _activation(layer))


def _einsum_dense(layer, ctx: NodeContext) -> Linear:
    return Linear(lambda x: ops.einsum(layer.equation, x, layer.kernel), _activation(layer))


def _conv(layer, ctx: NodeContext) -> Linear:
    return Linear(lambda x: layer.convolution_op(x, layer.kernel), _activation(layer))


def _depthwise_conv(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.depthwise_conv(
            x, layer.kernel, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )

    return Linear(fn, _activation(layer))


def _separable_conv(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.separable_conv(
            x, layer.depthwise_kernel, layer.pointwise_kernel, strides=layer.strides,
            padding=layer.padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    return Linear(fn, _activation(layer))


def _conv_transpose(layer, ctx: NodeContext) -> Linear:
    def fn(x):
        return ops.conv_transpose(
            x, layer.kernel, strides=list(layer.strides), padding=layer.padding,
            output_padding=layer.output_padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    return Linear(fn, _activation(layer))


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
