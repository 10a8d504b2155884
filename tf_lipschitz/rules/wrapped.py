"""Rules for Keras wrappers: ``TimeDistributed`` and ``SpectralNormalization``.

TimeDistributed applies the wrapped layer to every time step.

``TimeDistributed(f)`` maps ``(x_1, …, x_T)`` to ``(f(x_1), …, f(x_T))``. If ``f`` is
``L``-Lipschitz, ``Σ_t ‖f(x_t) − f(y_t)‖² ≤ L² Σ_t ‖x_t − y_t‖²``: the wrapper has the same
constant. If ``f`` is affine, the wrapper's linear part is block diagonal with ``T`` copies of
``f``'s, and has exactly the same operator norm, certificate and closed form. The wrapped
layer's own rule is therefore used, on the shape of one time step; the linear part the power
method measures (and fuses with neighbours) is the wrapper's, on the whole sequence.

Example:
    >>> import keras, tf_lipschitz as tfl
    >>> model = keras.Sequential([
    ...     keras.Input((5, 3)),
    ...     keras.layers.TimeDistributed(keras.layers.Dense(4, activation="relu")),
    ... ])
    >>> est = tfl.LipschitzEstimator(model, verbose=0)
    >>> dense = model.layers[0].layer.kernel.numpy()
    >>> import numpy as np
    >>> bool(np.isclose(est.autolip().upper, np.linalg.norm(dense, 2), rtol=1e-4))
    True

``SpectralNormalization(f)`` is ``f`` itself at inference: a training call divides ``f``'s
kernel by an estimate of its spectral norm and stores the result in the kernel, and every call
then returns ``f(x)``. Its rule is therefore ``f``'s own rule, on the same shapes: the linear
part (with its certificate, closed form and adjoint) stays fusable with its neighbours and the
activation is kept. The bound measures the operator the model computes, which is not 1 in
general: Keras normalises the kernel reshaped to a ``(−1, filters)`` matrix, by a power
iteration that advances one step per training call and estimates ``σ`` from below, and the
optimizer moves the kernel after that. For a convolution, the norm of the reshaped kernel is not
the convolution's operator norm (they differ by up to ``√(kh·kw)``), so a "spectrally
normalised" Conv2D can be far above 1.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from tf_lipschitz.errors import UnsupportedLayerError
from tf_lipschitz.rules.base import Constant, Linear, NodeContext, get_rule, register_rule

__all__: list[str] = []


def _per_step(fn, step_in: tuple[int, ...], steps: int, step_out: tuple[int, ...]):
    """``fn`` (on batches of one time step) applied to batches of ``steps`` time steps."""

    def mapped(x):
        y = fn(ops.reshape(x, (-1, *step_in)))
        return ops.reshape(y, (-1, steps, *step_out))

    return mapped


def wrapped_bound(wrapper, inner, ctx: NodeContext):
    """The bound of the layer ``inner`` that ``wrapper`` calls, by ``inner``'s own rule on
    ``ctx``; an error naming both when ``inner`` has no rule."""
    try:
        rule = get_rule(inner)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(
            wrapper, f"It wraps layer '{inner.name}' of class {type(inner).__name__}, which has "
            f"no Lipschitz rule of its own. Register one for {type(inner).__name__} "
            "(tfl.register_rule) and the wrapper uses it.", suggest_rule=False) from err
    return rule(inner, ctx)


def _time_distributed(layer, ctx: NodeContext):
    inner = layer.layer
    steps = ctx.input_shape[0]
    step_in, step_out = tuple(ctx.input_shape[1:]), tuple(ctx.output_shapes[0][1:])
    if steps is None or len(ctx.input_shapes) != 1:
        raise UnsupportedLayerError(
            layer, "TimeDistributed is analysed on a fixed number of time steps with one input: "
            "build the model with a concrete sequence length (keras.Input((T, ...))).",
            suggest_rule=False)
    if isinstance(inner, keras.Model):
        raise UnsupportedLayerError(
            layer, f"It wraps the model '{inner.name}' ({type(inner).__name__}); rules apply to "
            "layers. Wrap each layer of that model in its own TimeDistributed instead (the same "
            "function, applied step by step), then analyse the result.", suggest_rule=False)
    bound = wrapped_bound(layer, inner, dataclasses.replace(
        ctx, input_shapes=(step_in,), output_shapes=(step_out,)))
    note = f"TimeDistributed({type(inner).__name__})" + (f": {bound.note}" if bound.note else "")
    if isinstance(bound, Constant):
        return dataclasses.replace(bound, note=note)
    if isinstance(bound, Linear):
        # Same norm, certificate and closed form as one step (a block-diagonal operator with
        # identical blocks). The inner adjoint is dropped: autodiff transposes the reshapes.
        return dataclasses.replace(
            bound, fn=_per_step(bound.fn, step_in, steps, step_out), adjoint=None, note=note)
    raise UnsupportedLayerError(
        layer, f"It wraps layer '{inner.name}', which merges several inputs.", suggest_rule=False)


def _spectral_normalization(layer, ctx: NodeContext):
    inner = layer.layer
    bound = wrapped_bound(layer, inner, ctx)  # same input and output shapes as the wrapper
    note = f"SpectralNormalization({type(inner).__name__})" + (
        f": {bound.note}" if bound.note else "")
    if isinstance(bound, (Constant, Linear)):
        return dataclasses.replace(bound, note=note)
    raise UnsupportedLayerError(
        layer, f"It wraps layer '{inner.name}', which merges several inputs.", suggest_rule=False)


register_rule(keras.layers.TimeDistributed, _time_distributed)
register_rule(keras.layers.SpectralNormalization, _spectral_normalization)
