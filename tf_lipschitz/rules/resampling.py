"""Rules for layers that resample images: Resizing, CenterCrop and RandomCrop (at inference).

These layers act on every channel alike and treat the two spatial axes independently: every
TensorFlow resize kernel (``bilinear``, ``nearest``, ``bicubic``, ``area``, ``lanczos3``,
``lanczos5``, with or without ``antialias``) computes its interpolation weights per axis, and
the crops and pads that ``crop_to_aspect_ratio``, ``pad_to_aspect_ratio`` and CenterCrop apply
first are per-axis windows. So the layer is affine, ``y = (R_h ⊗ R_w ⊗ I_c) x + b``, with
``R_d = S_d W_d``: ``W_d`` keeps a window of the axis (rows of the identity for a crop, zero
rows for padding, whose fill value goes into ``b``) and ``S_d`` is the 1-D resize matrix. The
singular values of a Kronecker product are the products of its factors', so the operator norm
is ``‖R_h‖₂ · ‖R_w‖₂`` exactly (:func:`tf_lipschitz.certify.box_average_norm`).

Where the matrices come from:

- ``S_d`` is the resize op itself (``tf.image.resize``, as Keras calls it) applied in float64 to
  the ``n`` unit vectors of one axis (the other axis of size 1). TensorFlow computes its weights
  in float32 (bicubic from a 1024-entry table), so these are the weights the model multiplies
  by, not a textbook kernel that would differ from them (bicubic's exact Keys weights differ
  by up to ``6e-4``). :func:`axis_matrix` reads them off any such op; the graph reader
  (:mod:`tf_lipschitz.tfgraph`) uses it and :func:`separable_mismatch` for the resize ops of
  an exported model;
- ``W_d`` follows Keras's own arithmetic: the float32 aspect-ratio crop and pad of its
  TensorFlow ``resize``, the float64 crop of ``smart_resize`` (CenterCrop and RandomCrop on
  images smaller than the target), the center crop of CenterCrop.

The certificate is the closed form times ``1 + 1e-6``
(:func:`tf_lipschitz.certify.box_average_certificate`): it covers the float64 SVDs of the small
factors and the float32 rounding of the weights read off the op (at most one unit, ``6e-8``
relative, per entry: bilinear's ``1 − λ``). Like every rule, the bound is of the map in exact
arithmetic with those weights; the rounding of the layer's own float32 sums is not counted.

Before a rule returns, it applies ``R_h ⊗ R_w ⊗ I_c`` to a random input in float64 and compares
it with the layer's own ``layer(x) − layer(0)`` (in float32: a half-precision layer is checked
through a float32 copy). If they differ by more than float32 rounding (a subclass that changes
``transform_images``, a Keras version that resamples differently, integer outputs), the rule
raises :class:`~tf_lipschitz.errors.UnsupportedLayerError` instead of returning a number.

RandomCrop crops at random only when ``training=True``. At inference (``training=False``,
how tf_lipschitz calls every layer) Keras 3.15 returns its input unchanged, whatever its size
and despite its docstring (which promises a center crop and resize): the rule gives the
identity, norm 1. On such a model ``model.predict`` sees images of the input's size, not the
``(height, width)`` of the layer's declared output shape; the analysis follows
``predict``. Should a Keras version resample at inference, the rule bounds the center crop and
bilinear resize of ``smart_resize`` instead, after the same check.

Example:
    >>> import keras, tf_lipschitz as tfl
    >>> model = keras.Sequential([keras.Input((4, 6, 3)), keras.layers.Resizing(8, 12)])
    >>> report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    >>> round(report.upper, 4), report.certified
    (2.0, True)
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_lipschitz import certify
from tf_lipschitz.errors import UnsupportedLayerError
from tf_lipschitz.rules.base import Linear, NodeContext, float32_reference, register_rule

__all__ = ["axis_matrix", "resize_matrix", "separable_mismatch", "window_matrix"]

_CHECK_RTOL = 1e-4
"""Tolerance of the check against the layer, relative to ``max|x| · Π_d ‖R_d‖_∞``: float32
sums of ``k`` products are within ``k · 6e-8`` of that scale (``k`` in the hundreds for a strong
antialiased downsampling), while a window off by one pixel moves the output by a whole weight."""


def axis_matrix(resample: Callable[[tf.Tensor], tf.Tensor], n: int, axis: int = 0) -> np.ndarray:
    """The matrix of an image resampling op along one spatial axis, read off the op itself.

    ``resample`` is the op on a batch of ``n`` float64 images in NHWC layout, one channel, of
    size ``n`` along ``axis`` (0 for the height, 1 for the width) and 1 along the other spatial
    axis, which it must keep as it is (size 1 to 1). Image ``j`` is the unit vector ``e_j``, so
    column ``j`` of the result is the op applied to ``e_j``: the weights the op multiplies by,
    as it computes them (TensorFlow's resize kernels compute them in float32 and return float32
    even on float64 images: each output entry of ``e_j`` is one weight times 1, exact).

    Args:
        resample: The op, ``(n, *spatial, 1) -> (n, *spatial_out, 1)``.
        n: Input size of the axis.
        axis: The spatial axis (0 or 1).

    Returns:
        A float64 array of shape ``(m, n)``, ``m`` the output size of the axis.

    Example:
        >>> import tensorflow as tf
        >>> axis_matrix(lambda b: tf.image.resize(b, (1, 3), method="nearest"), 2, axis=1)
        array([[1., 0.],
               [0., 1.],
               [0., 1.]])
    """
    spatial = (n, 1) if axis == 0 else (1, n)
    basis = tf.reshape(tf.eye(n, dtype=tf.float64), (n, *spatial, 1))
    return np.asarray(resample(basis), np.float64).reshape(n, -1).T.copy()


@functools.lru_cache(maxsize=64)
def _cached_resize_matrix(n: int, m: int, interpolation: str, antialias: bool) -> np.ndarray:
    matrix = axis_matrix(
        lambda basis: tf.image.resize(basis, (m, 1), method=interpolation, antialias=antialias),
        n)
    matrix.setflags(write=False)
    return matrix


def resize_matrix(n: int, m: int, interpolation: str = "bilinear",
                  antialias: bool = False) -> np.ndarray:
    """The ``m × n`` matrix of TensorFlow's resize of one axis from ``n`` to ``m`` entries.

    ``tf.image.resize`` (what Keras's ``Resizing`` calls) computes its weights per axis, so
    resizing an ``(H, W)`` image is ``S_H ⊗ S_W``. Column ``j`` is the op applied to the unit
    vector ``e_j`` (float64 input, the other axis of size 1): the weights the op multiplies by.

    Args:
        n: Input size of the axis.
        m: Output size of the axis.
        interpolation: A ``tf.image.resize`` method (``"bilinear"``, ``"nearest"``,
            ``"bicubic"``, ``"area"``, ``"lanczos3"``, ``"lanczos5"``...).
        antialias: The op's ``antialias`` flag.

    Returns:
        A read-only float64 array of shape ``(m, n)``.

    Example:
        >>> resize_matrix(2, 4)  # bilinear, half-pixel centers
        array([[1.  , 0.  ],
               [0.75, 0.25],
               [0.25, 0.75],
               [0.  , 1.  ]])
    """
    return _cached_resize_matrix(int(n), int(m), str(interpolation), bool(antialias))


def window_matrix(n: int, start: int, length: int) -> np.ndarray:
    """The ``length × n`` matrix that keeps entries ``start … start + length − 1`` of an axis.

    A crop has ``0 <= start`` and ``start + length <= n``; a pad starts before the axis
    (``start < 0``) or ends after it, and its rows outside ``[0, n)`` are zero.

    Example:
        >>> window_matrix(2, -1, 4)  # one zero row padded on each side
        array([[0., 0.],
               [1., 0.],
               [0., 1.],
               [0., 0.]])
    """
    rows = np.arange(length) + start
    matrix = np.zeros((length, n))
    inside = (rows >= 0) & (rows < n)
    matrix[np.arange(length)[inside], rows[inside]] = 1.0
    return matrix


def _spatial(layer, shape: Sequence[int]) -> tuple[bool, tuple[int, int]]:
    channels_last = layer.data_format == "channels_last"
    h, w = (shape[0], shape[1]) if channels_last else (shape[1], shape[2])
    return channels_last, (int(h), int(w))


def _aspect_windows(h: int, w: int, th: int, tw: int, *, pad: bool, float32: bool):
    """``(start, length)`` per axis of Keras's crop (or pad) to the target aspect ratio.

    ``float32``: the arithmetic of the TensorFlow backend's ``resize`` (float32 quotients);
    otherwise that of ``smart_resize`` on static shapes (Python floats). Both truncate.
    """
    real = np.float32 if float32 else float
    height = int(real(w * th) / real(tw))
    width = int(real(h * tw) / real(th))
    if pad:  # centred in a canvas of max(size, target-ratio size), same margin on both sides
        top, left = (max(h, height) - h) // 2, (max(w, width) - w) // 2
        return (-top, h + 2 * top), (-left, w + 2 * left)
    height, width = max(min(h, height), 1), max(min(w, width), 1)
    return ((h - height) // 2, height), ((w - width) // 2, width)


def _resampling(spatial: tuple[int, int], windows, target: tuple[int, int],
                interpolation: str | None, antialias: bool = False) -> list[np.ndarray]:
    """``R_d = S_d W_d`` per axis; ``interpolation=None`` for a crop without resize."""
    matrices = []
    for n, (start, length), m in zip(spatial, windows, target):
        matrix = window_matrix(n, start, length)
        if interpolation is not None:
            matrix = resize_matrix(length, m, interpolation, antialias) @ matrix
        matrices.append(matrix)
    return matrices


def separable_mismatch(got, x: np.ndarray, matrices: Sequence[np.ndarray],
                       channels_last: bool = True) -> str | None:
    """Why ``got`` is not ``(R_h ⊗ R_w ⊗ I) x``, or ``None`` when it is (to rounding).

    The check of every rule that reads per-axis matrices off an op: ``got`` is the op's linear
    part on the batch ``x`` (or the exception that computing it raised), and the tolerance is
    float32 rounding, relative to ``max|x| · Π_d ‖R_d‖_∞`` (:data:`_CHECK_RTOL`).

    Args:
        got: The op's output on ``x`` minus its output on zeros, or an exception.
        x: A float64 batch (random, so that no entry of a wrong matrix goes unseen).
        matrices: The ``R_d``, one per spatial axis.
        channels_last: Layout of ``x``.

    Returns:
        ``None`` if they agree, else the reason, for the error message.

    Example:
        >>> x = np.ones((1, 2, 1, 1))
        >>> separable_mismatch(x, x, [np.eye(2), np.eye(1)]) is None
        True
        >>> separable_mismatch(2 * x, x, [np.eye(2), np.eye(1)])
        'on a random input its output differs from that map by 1 (tolerance 0.0001)'
    """
    if isinstance(got, Exception):
        return f"calling it failed ({type(got).__name__}: {got})"
    got = np.asarray(got, np.float64)
    expected = np.asarray(certify.apply_box_average(np.asarray(x, np.float64), matrices,
                                                    channels_last))
    if got.shape != expected.shape:
        return f"it returned shape {got.shape[1:]}, not {expected.shape[1:]}"
    scale = float(np.max(np.abs(x))) * float(np.prod([np.max(np.sum(np.abs(m), axis=1))
                                                      for m in matrices if m.size] or [0.0]))
    error = float(np.max(np.abs(got - expected), initial=0.0))
    if error <= _CHECK_RTOL * scale:
        return None
    return (f"on a random input its output differs from that map by {error:.3g} "
            f"(tolerance {_CHECK_RTOL * scale:.3g})")


def _check(layer, ctx: NodeContext, matrices: Sequence[np.ndarray], channels_last: bool,
           description: str) -> None:
    """Raises unless ``(R_h ⊗ R_w ⊗ I) x`` is the layer's ``layer(x) − layer(0)``."""
    reference = float32_reference(layer)
    dtype = "float64" if reference.compute_dtype == "float64" else "float32"
    x = np.random.default_rng(0).standard_normal((2, *ctx.input_shape)).astype(dtype)
    try:
        got = (np.asarray(reference(x, training=False), np.float64)
               - np.asarray(reference(np.zeros_like(x), training=False), np.float64))
    except Exception as err:  # noqa: BLE001 - reported as the reason for the refusal
        got = err
    reason = separable_mismatch(got, x, matrices, channels_last)
    if reason is None:
        return
    raise UnsupportedLayerError(
        layer,
        f"The rule models it as {description}, a separable linear map R_h ⊗ R_w ⊗ I on input "
        f"shape {tuple(ctx.input_shape)}, but {reason}: this configuration or Keras version "
        "does not resample as expected, and no bound is given rather than a wrong one. If the "
        "layer is affine in its input, register `tfl.rules.affine()` for its class (a measured "
        "estimate); else remove it from the analysed model.")


def _separable(layer, ctx: NodeContext, matrices: list[np.ndarray], channels_last: bool,
               description: str) -> Linear:
    """The checked ``Linear`` bound of ``R_h ⊗ R_w ⊗ I_c``: closed form ``‖R_h‖‖R_w‖``."""
    _check(layer, ctx, matrices, channels_last, description)
    value = certify.box_average_norm(matrices)

    def fn(x):  # in x's dtype, float64 included (certify's dense route)
        return certify.apply_box_average(x, matrices, channels_last)

    return Linear(fn, norm=lambda: value, certificate=certify.box_average_certificate(matrices),
                  note=f"{description}: ‖R_h‖‖R_w‖ = {value:.4g}")


def _smart_resize(layer, ctx: NodeContext, channels_last: bool, spatial: tuple[int, int],
                  what: str) -> Linear:
    """``keras.utils.smart_resize`` (bilinear): center crop to the target ratio, then resize."""
    target = (int(layer.height), int(layer.width))
    windows = _aspect_windows(*spatial, *target, pad=False, float32=False)
    matrices = _resampling(spatial, windows, target, "bilinear")
    return _separable(layer, ctx, matrices, channels_last,
                      f"{what}: center crop to {target[0]}:{target[1]} and bilinear resize "
                      f"{spatial} → {target}")


def _resizing(layer, ctx: NodeContext) -> Linear:
    channels_last, spatial = _spatial(layer, ctx.input_shape)
    target = (int(layer.height), int(layer.width))
    options = []
    if layer.crop_to_aspect_ratio or layer.pad_to_aspect_ratio:
        pad = bool(layer.pad_to_aspect_ratio)
        windows = _aspect_windows(*spatial, *target, pad=pad, float32=True)
        options.append("pad" if pad else "crop")
    else:
        windows = [(0, n) for n in spatial]
    if layer.antialias:
        options.append("antialias")
    matrices = _resampling(spatial, windows, target, layer.interpolation, layer.antialias)
    extra = f" ({', '.join(options)})" if options else ""
    return _separable(layer, ctx, matrices, channels_last,
                      f"{layer.interpolation} resize {spatial} → {target}{extra}")


def _center_crop(layer, ctx: NodeContext) -> Linear:
    channels_last, spatial = _spatial(layer, ctx.input_shape)
    target = (int(layer.height), int(layer.width))
    if all(n >= t for n, t in zip(spatial, target)):
        windows = [((n - t) // 2, t) for n, t in zip(spatial, target)]
        return _separable(layer, ctx, _resampling(spatial, windows, target, None),
                          channels_last, f"center crop {spatial} → {target}")
    return _smart_resize(layer, ctx, channels_last, spatial, "CenterCrop of a smaller image")


def _random_crop(layer, ctx: NodeContext) -> Linear:
    channels_last, spatial = _spatial(layer, ctx.input_shape)
    if tuple(ctx.output_shapes[0]) == tuple(ctx.input_shape):
        identity = [np.eye(n) for n in spatial]
        _check(layer, ctx, identity, channels_last, "the identity at inference")
        return Linear(lambda x: x, norm=lambda: 1.0, certificate=lambda: 1.0, diagonal=True,
                      note="RandomCrop at inference: identity (Keras crops only in training)")
    return _smart_resize(layer, ctx, channels_last, spatial, "RandomCrop at inference")


L = keras.layers
register_rule(L.Resizing, _resizing)
register_rule(L.CenterCrop, _center_crop)
register_rule(L.RandomCrop, _random_crop)
