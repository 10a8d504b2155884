"""Lower bounds and a statistical estimate of the Lipschitz constant.

For any ``x`` where ``f`` is differentiable and any unit ``v``, ``‖J_f(x) v‖ ≤ L(f)``, and for
any two points ``‖f(x') − f(x)‖ / ‖x' − x‖ ≤ L(f)`` (shared/ALGORITHMS.md §6).
:func:`lower_bound` maximises the first quantity and confirms it with the second:

1. screening: data points (if given) and random Gaussian points at radii spread over
   ``[¼, 64]`` times the data scale get one Jacobian norm each, by power iteration on
   ``J(x)ᵀJ(x)`` through forward-mode (JVP) and reverse-mode (VJP) products;
2. search from the best screened points: random jumps with self-adapting radii (needed for
   piecewise-linear networks, whose Jacobian is constant on each linear region so that its
   gradient in ``x`` is zero almost everywhere) and gradient steps on ``‖J(x) v‖²``
   (second-order autodiff: useful for smooth activations), each proposal scored by a
   warm-started power step;
3. the best point is re-measured with more power steps.

Where ``f`` is not differentiable autodiff still returns a "Jacobian", and its norm need not be
a lower bound: at a zero pre-activation ``celu`` passes gradient 1 through both of its branches
(derivative 2 for a function of slope 1), and a bias-free ``celu`` network scored 4.48 at
``x = 0`` against a certified upper bound of 3.31. Every norm that the search keeps (screened
points, the proposal each point moves to, the final measurement) is therefore confirmed by
secant ratios along its direction (:func:`_confirm`) and replaced by what they confirm when they
fall short of it.

Everything runs batched inside one ``tf.function``, with the search state and the norms in
float32 at least: a half-precision model is evaluated in its own dtype, and only its products
are half precision. Inside a ``tf.function`` TensorFlow's CPU forward-mode product of a max
pool that keeps its shape (stride 1, ``"same"``) comes out 0; :func:`_max_pool_jvp` computes
it for those pools instead. :func:`extreme_value_estimate` fits a generalised extreme-value
distribution to per-batch maxima of ``‖J(x)‖`` in the manner of CLEVER (Weng et al., ICLR 2018);
its result is an *estimate*, never a bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

try:  # private TensorFlow API for the max-pool JVP work-around; without it, TensorFlow's JVPs
    from tensorflow.python import pywrap_tfe
    from tensorflow.python.eager import forwardprop

    _JVP_HOOK_AVAILABLE = callable(getattr(pywrap_tfe, "TFE_Py_RegisterJVPFunction", None)) and \
        callable(getattr(forwardprop, "_jvp_dispatch", None))
except ImportError:  # pragma: no cover - another TensorFlow layout
    _JVP_HOOK_AVAILABLE = False

from tf_lipschitz.errors import (LipschitzError, LowerBoundError, LowerBoundUnavailableError,
                                 NonFiniteLowerBoundError, first_line)
from tf_lipschitz.graph import input_name
from tf_lipschitz.power import compiled, dtype_eps
from tf_lipschitz.progress import progress_bar
from tf_lipschitz.report import ExtremeValueEstimate, LowerBound

__all__ = [
    "extreme_value_estimate",
    "jacobian_norms",
    "lower_bound",
]

# Memory: a call of the search holds about _COPIES values (forward, tangents, cotangents and
# second-order terms) per activation entry per point; calls are kept near _MEMORY_BUDGET bytes.
_COPIES = 8
_MEMORY_BUDGET = 2 ** 31
# Random starting points: radius log-uniform in this range, relative to the data spread.
_START_RADII = (0.25, 64.0)
# Random proposals: radius multiplier log-uniform in [1 / _JUMP, _JUMP] times the trust radius.
_JUMP = 8.0
# Gradient proposals: step lengths relative to the trust radius.
_GRADIENT_STEPS = (0.25, 1.0, 4.0)
# Secant confirmation. The relative shortfall of the best secant ratio below a Jacobian norm
# that is put down to rounding and curvature is _SECANT_SLACK, or _HALF_SLACK machine epsilons
# of the model (8e-3 in float16). The steps are eps / slack times _SECANT_STEPS times
# ‖x‖ + √dim · spread (1.2e-4 and 1.2e-3 in float32, 0.125 and 1.25 in half precision): the
# rounding of the outputs, about eps · ‖f(x)‖, then stays near the slack times the rise.
_SECANT_SLACK = 1e-3
_HALF_SLACK = 8.0
_SECANT_STEPS = (1.0, 10.0)
# The returned value is rounded down by this many machine epsilons of the norms' dtype: the
# norm of a Jacobian-vector product is itself computed in floating point, and its rounding put
# exact constants' measurements above them (a Flatten measured 1.0000001, a 64-entry global
# average pooling 8 units in the last place above 1/8), so above exact certified upper bounds.
_ROUNDING_ULPS = 64


def _machine_eps(model, dtype) -> float:
    """The largest machine epsilon among ``dtype`` and a Keras model's layer compute dtypes."""
    dtypes = {tf.as_dtype(dtype)}
    stack = list(model.layers) if isinstance(model, keras.Model) else []
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        if getattr(layer, "compute_dtype", None):
            dtypes.add(tf.as_dtype(layer.compute_dtype))
    return max(dtype_eps(d) for d in dtypes)


def _state_dtype(dtype) -> tf.DType:
    """Dtype of the search state and the norms: float64 for float64 inputs, else float32."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def _per_example_norm(t: tf.Tensor) -> tf.Tensor:
    """Euclidean norm of each example, scaled by its largest entry first: the plain sum of
    squares underflows to 0 in float32 below about 1e-19 (and overflows above 1e19)."""
    flat = tf.reshape(t, [tf.shape(t)[0], -1])
    peak = tf.reduce_max(tf.abs(flat), axis=1)
    safe = tf.where(peak > 0, peak, tf.ones_like(peak))
    return peak * tf.sqrt(tf.reduce_sum(tf.square(flat / safe[:, None]), axis=1))


def _rescaled(t: tf.Tensor) -> tf.Tensor:
    """Each example divided by a power of two near its largest entry.

    The division is exact, so the products that a rescaled cotangent seeds round as the
    unscaled ones would, up to a power of two that normalisation removes; but ``JᵀJ v``, of size
    ``L²``, becomes ``Jᵀu`` with ``‖u‖`` about 1 (float16 products overflow from ``L ≈ 256``).
    """
    flat = tf.reshape(t, [tf.shape(t)[0], -1])
    peak = tf.reduce_max(tf.abs(flat), axis=1)
    usable = tf.logical_and(peak > 0, tf.math.is_finite(peak))
    exponent = tf.floor(tf.math.log(tf.where(usable, peak, tf.ones_like(peak))) / np.log(2.0))
    return t / _per_example(tf.pow(tf.constant(2.0, t.dtype), exponent), t)


def _normalize(v: tf.Tensor) -> tf.Tensor:
    """Each example divided by its norm (zero examples stay zero)."""
    return tf.math.divide_no_nan(v, _per_example(_per_example_norm(v), v))


def _per_example(r: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Reshapes per-example values ``r`` (leading axes of ``x``) to broadcast against ``x``."""
    ones = tf.ones([tf.rank(x) - tf.rank(r)], tf.int32)
    return tf.reshape(r, tf.concat([tf.shape(r), ones], 0))


def _on_state(f, in_dtype):
    """``f`` on points of the search state: cast to the model's input dtype first."""
    return lambda x: f(tf.cast(x, in_dtype))


def _attr_text(value) -> str:
    """A string attribute of an op as ``str`` (the JVP hook receives ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_max_index(x, ksize, strides, padding):
    """Flat index into ``x`` (NHWC) of the entry that each output of a max pool takes: the
    first maximum of its window in row-major order, the one ``MaxPoolGradGrad`` picks."""
    return tf.nn.max_pool_with_argmax(x, ksize, strides, padding, include_batch_in_index=True)[1]


def _first_max_index_3d(x, ksize, strides, padding):
    """:func:`_first_max_index` of an NDHWC max pool, as a 2D pool over ``(H, W)`` of each plane
    followed by one over ``D``: the first maximum in ``(d, h, w)`` order is the first plane
    that holds the window's maximum, at the first maximum of that plane."""
    shape = tf.shape(x)
    values, within = tf.nn.max_pool_with_argmax(
        tf.reshape(x, tf.concat([[shape[0] * shape[1]], shape[2:]], 0)),
        [1, *ksize[2:4], 1], [1, *strides[2:4], 1], padding, include_batch_in_index=True)
    inner = tf.shape(values)
    columns = tf.reshape(values, [shape[0], shape[1], inner[1] * inner[2], shape[4]])
    across = tf.nn.max_pool_with_argmax(columns, [1, ksize[1], 1, 1], [1, strides[1], 1, 1],
                                        padding, include_batch_in_index=True)[1]
    return tf.gather(tf.reshape(within, [-1]), across)


def _max_pool_jvp(op_name, attr_tuple, inputs, outputs, tangents):
    """The tangent of a max pool that keeps its shape, by gathering the input tangent at each
    window's first maximum; ``None`` (use TensorFlow's own JVP) for other pools.

    TensorFlow's CPU ``MaxPoolGradGrad`` and ``MaxPool3DGradGrad`` kernels, which compute the
    JVP of ``MaxPool`` and ``MaxPool3D``, reuse the buffer of their tangent input for their
    output when the two have as many elements (stride 1 with ``"same"`` padding, or a window
    of 1) and no other op holds it, as inside a ``tf.function``; they then zero the output
    before reading the tangent, so the product comes out 0 (overlapping pools scored a lower
    bound of 0 against a constant of √3). Pools whose output is smaller keep TensorFlow's JVP.
    """
    attrs = dict(zip(attr_tuple[::2], attr_tuple[1::2]))
    if op_name == "MaxPoolV2":
        ksize, strides = tf.get_static_value(inputs[1]), tf.get_static_value(inputs[2])
    else:
        ksize, strides = attrs.get("ksize"), attrs.get("strides")
    layout = "NDHWC" if op_name == "MaxPool3D" else "NHWC"
    padding = _attr_text(attrs.get("padding"))
    x, y, tangent = inputs[0], outputs[0], tangents[0]
    shrinks = x.shape.rank is not None and y.shape.rank is not None and any(
        a is not None and b is not None and a != b for a, b in zip(x.shape[1:-1], y.shape[1:-1]))
    if (shrinks or ksize is None or strides is None or tangent is None
            or padding not in ("SAME", "VALID")
            or _attr_text(attrs.get("data_format", layout)) != layout):
        return None
    ksize, strides = [int(k) for k in ksize], [int(s) for s in strides]
    first_max = _first_max_index_3d if op_name == "MaxPool3D" else _first_max_index
    index = first_max(x, ksize, strides, padding)
    return [tf.reshape(tf.gather(tf.reshape(tangent, [-1]), index), tf.shape(y))]


# Image resampling ops, linear in their image (input 0), and the attributes they take. Their
# JVP is the op applied to the tangent. TensorFlow's own differentiates their gradient, which
# has no gradient of its own (ResizeNearestNeighborGrad, ResizeBicubicGrad,
# ScaleAndTranslateGrad: a raw LookupError from lower_bound on a Resizing layer), or comes out
# None and was read as zero (ResizeBilinear: a lower bound of 0 through a bilinear Resizing).
_RESAMPLING_ATTRS = {
    "ResizeBilinear": ("align_corners", "half_pixel_centers"),
    "ResizeNearestNeighbor": ("align_corners", "half_pixel_centers"),
    "ResizeBicubic": ("align_corners", "half_pixel_centers"),
    "ResizeArea": ("align_corners",),
    "ScaleAndTranslate": ("kernel_type", "antialias"),
}


def _resampling_jvp(op_name, attr_tuple, inputs, tangents):
    """The tangent of an image resampling op (:data:`_RESAMPLING_ATTRS`): the op itself applied
    to the image's tangent, its other inputs (sizes, scales) unchanged."""
    if tangents[0] is None:
        return None
    attrs = dict(zip(attr_tuple[::2], attr_tuple[1::2]))
    kwargs = {name: _attr_text(attrs[name]) if name == "kernel_type" else attrs[name]
              for name in _RESAMPLING_ATTRS[op_name] if name in attrs}
    op = getattr(tf.raw_ops, op_name)
    names = ("size", "scale", "translation")[:len(inputs) - 1]
    out = op(images=tangents[0], **dict(zip(names, inputs[1:])), **kwargs)
    return [out]


def _dispatch_jvp(op_name, attr_tuple, inputs, outputs, tangents, use_batch=False):
    """TensorFlow's per-op JVP, except :func:`_max_pool_jvp` for max pools that keep shape and
    :func:`_resampling_jvp` for image resampling."""
    if op_name in ("MaxPool", "MaxPoolV2", "MaxPool3D") and not use_batch:
        out = _max_pool_jvp(op_name, attr_tuple, inputs, outputs, tangents)
        if out is not None:
            return out
    if op_name in _RESAMPLING_ATTRS and not use_batch:
        out = _resampling_jvp(op_name, attr_tuple, inputs, tangents)
        if out is not None:
            return out
    return forwardprop._jvp_dispatch(op_name, attr_tuple, inputs, outputs, tangents, use_batch)


_JVP_HOOK_LOCK = threading.Lock()
_JVP_HOOK_USERS = [0]


@contextlib.contextmanager
def _exact_max_pool_jvps():
    """Within the block, forward-mode products of shape-keeping max pools are exact
    (:func:`_max_pool_jvp`); every other op keeps TensorFlow's JVP, so graphs without such a
    pool are unchanged. The hook is TensorFlow's process-wide JVP function, installed while
    any block is open (in any thread: other threads' forward-mode products traced meanwhile get
    it too, with the same values) and restored to TensorFlow's own when the last one closes.
    Where TensorFlow does not expose it, the block does nothing."""
    if not _JVP_HOOK_AVAILABLE:  # pragma: no cover - another TensorFlow layout
        yield
        return
    with _JVP_HOOK_LOCK:
        if _JVP_HOOK_USERS[0] == 0:
            pywrap_tfe.TFE_Py_RegisterJVPFunction(_dispatch_jvp)
        _JVP_HOOK_USERS[0] += 1
    try:
        yield
    finally:
        with _JVP_HOOK_LOCK:
            _JVP_HOOK_USERS[0] -= 1
            if _JVP_HOOK_USERS[0] == 0:
                pywrap_tfe.TFE_Py_RegisterJVPFunction(forwardprop._jvp_dispatch)


def _jvp(f, x, v):
    """``(f(x), J v)``, the product in the dtype of ``x`` (max pools: :func:`_max_pool_jvp`).

    Forward mode where TensorFlow has it; a model it cannot push tangents through (Keras'
    recurrent layers: their loop carries a ``variant`` tensor list) gets the product from two
    reverse passes instead (:func:`_jvp_by_reverse`).
    """
    try:
        with _exact_max_pool_jvps(), tf.autodiff.ForwardAccumulator(x, v) as acc:
            y = f(x)
        jv = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    except (TypeError, ValueError, NotImplementedError, LookupError):
        y, jv = _jvp_by_reverse(f, x, v)
    return y, tf.cast(jv, x.dtype)


def _jvp_by_reverse(f, x, v):
    """``(f(x), J v)`` by reverse mode twice: ``u ↦ Jᵀu`` is linear, and its own transpose,
    the gradient with respect to ``u`` along ``v``, is ``J v``."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = f(x)
        u = tf.zeros_like(y)
        outer.watch(u)
        jtu = inner.gradient(y, x, output_gradients=u,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jv = outer.gradient(jtu, u, output_gradients=tf.cast(v, jtu.dtype),
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, jv


def _jtj(f, x, v):
    """``(‖J v‖, JᵀJ v)`` per example at the points ``x``, the latter up to a power of two
    (:func:`_rescaled`)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, jv = _jvp(f, x, v)
    jv = tf.stop_gradient(jv)
    cotangent = tf.cast(_rescaled(jv), y.dtype)
    return _per_example_norm(jv), tape.gradient(
        y, x, output_gradients=cotangent, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _power(f, x, v, iters):
    def body(k, v):
        _, g = _jtj(f, x, v)
        return k + 1, _normalize(g)

    _, v = tf.while_loop(lambda k, v: k < iters, body, (tf.constant(0), v))
    _, jv = _jvp(f, x, v)
    return _per_example_norm(jv), v


def _slack(eps: float) -> float:
    """Relative shortfall of a secant below a Jacobian norm that still confirms it."""
    return max(_SECANT_SLACK, _HALF_SLACK * eps)


def _secant(f, x, v, spread, eps, in_dtype):
    """The largest secant ratio ``‖f(x') − f(x)‖ / ‖x' − x‖`` over ``x' = x ± h v``, and the
    slack (:func:`_slack`) of the precision it was measured in.

    Two steps ``h`` (``_SECANT_STEPS``) relative to ``‖x‖ + √dim · spread``, proportional to
    the model's machine epsilon (``eps``, or that of the output dtype when larger: a callable
    may compute in a lower precision than its inputs): the smaller resolves small linear
    regions, the larger keeps the rounding of ``f`` small against the rise. Both sides are
    tried, so that a point on the border of a linear region is measured on its far side. The
    displacement is taken between the points as the model sees them (cast to ``in_dtype``), so
    each ratio is a true secant of the model up to the rounding of its outputs. Ratios that are
    not finite (outputs overflowing) are left out; a point with none finite gets NaN.
    """
    dtype = x.dtype
    x0 = tf.cast(tf.cast(x, in_dtype), dtype)  # x as the model sees it
    y0 = f(x0)
    eps = max(eps, dtype_eps(y0.dtype))
    dim = tf.cast(tf.size(x[0]), dtype)
    scale = _per_example_norm(x) + tf.sqrt(dim) * spread
    relative = [s * eps / _slack(eps) * sign for s in _SECANT_STEPS for sign in (1.0, -1.0)]
    n = len(relative)
    h = tf.constant(relative, dtype)[:, None] * scale[None]
    points = tf.cast(tf.cast(x[None] + _per_example(h, x[None]) * v[None], in_dtype), dtype)
    batch = tf.shape(x)[0]
    y = f(tf.reshape(points, tf.concat([[n * batch], tf.shape(x)[1:]], 0)))
    y = tf.reshape(tf.cast(y, dtype), [n, batch, -1])
    rise = _per_example_norm(tf.reshape(y - tf.reshape(tf.cast(y0, dtype), [1, batch, -1]),
                                        [n * batch, -1]))
    run = _per_example_norm(tf.reshape(points - x0[None], [n * batch, -1]))
    ratios = tf.reshape(tf.math.divide_no_nan(rise, run), [n, batch])
    best = tf.reduce_max(tf.where(tf.math.is_finite(ratios), ratios, -tf.ones_like(ratios)), 0)
    return tf.where(best >= 0, best, tf.constant(np.nan, dtype)), _slack(eps)


def _confirm(f, x, v, s, spread, eps, in_dtype):
    """``(value, secant)``: the Jacobian norms ``s`` at ``x`` along ``v``, as far as secants
    confirm them.

    ``s`` stays when the secant ratio of :func:`_secant` is at least ``1 − slack`` of it (the
    shortfall put down to rounding and curvature; ``slack`` is ``1e-3``, or ``8 eps`` in half
    precision); otherwise the value is the secant ratio, a lower bound at any point, also where
    ``f`` is not differentiable. A point without a finite secant ratio gets NaN.
    """
    secant, slack = _secant(f, x, v, spread, eps, in_dtype)
    finite = tf.math.is_finite(secant)
    confirmed = tf.logical_and(finite, secant >= (1.0 - slack) * s)
    return tf.where(confirmed, s, secant), secant


def _measure(f, x, v, iters, spread, eps, in_dtype):
    """``(value, v, secant)``: ``iters`` power steps at ``x`` from ``v``, then :func:`_confirm`."""
    f = _on_state(f, in_dtype)
    s, v = _power(f, x, v, iters)
    value, secant = _confirm(f, x, v, s, spread, eps, in_dtype)
    return value, v, secant


def jacobian_norms(f: Callable, x, *, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Spectral norms of the Jacobian of ``f`` at each example of the batch ``x``.

    Power iteration on ``J(x)ᵀJ(x)`` (forward- and reverse-mode products), all examples at once,
    in float32 at least. Each value is ``‖J(x) v‖`` for a unit ``v``, confirmed by secant ratios
    along ``v`` (one-sided on both sides, two step sizes); where they fall more than ``1e-3``
    short of it, as at a point where ``f`` is not differentiable, the value is the best secant
    ratio instead. Either way it is a lower bound on the Lipschitz constant of ``f`` (a kept
    norm is confirmed to within that ``1e-3`` where ``f`` is not differentiable), and it
    approaches ``‖J(x)‖₂`` from below where ``f`` is differentiable. A half-precision model's
    values carry its own rounding (about ``1e-3`` in float16).

    Args:
        f: A Keras model or a batched callable.
        x: A batch of inputs ``(n, ...)``, in the model's input dtype; for a model with several
            inputs, a list of batches (one per input) or a dict keyed by input name.
        iters: Power iterations.
        seed: Seed of the random starting directions.

    Returns:
        A ``(n,)`` array of Jacobian norms.

    Raises:
        LowerBoundError: ``f`` is not callable, or ``x`` does not match a multi-input model.

    Example:
        >>> import numpy as np, keras
        >>> from tf_lipschitz.lower import jacobian_norms
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
        >>> s = jacobian_norms(model, np.zeros((4, 3), "float32"))
        >>> bool(np.allclose(s, np.linalg.norm(model.layers[0].kernel.numpy(), 2), rtol=1e-4))
        True
    """
    layout = None
    if isinstance(f, keras.Model) and len(f.inputs) != 1:
        parts = ([x.get(n) for n in input_names(f)] if isinstance(x, dict) and len(x) == len(
            f.inputs) else x)
        shapes = [np.shape(p)[1:] for p in parts] if isinstance(parts, (list, tuple)) else None
        layout = input_layout(f, shapes)
        x = layout.join(x, f.inputs[0].dtype)
    fn = _as_model_fn(f, layout)
    x = tf.convert_to_tensor(x)
    state = _state_dtype(x.dtype)
    spread = float(np.std(x.numpy().astype("float64"))) or 1.0
    x_state = tf.cast(x, state)
    v = _normalize(tf.random.stateless_normal(tf.shape(x), [seed, 1], dtype=state))
    s, _, _ = _MEASURE(fn, x_state, v, tf.constant(iters), tf.constant(spread, state),
                       _machine_eps(f, x.dtype), x.dtype)
    return s.numpy()


def _search(f, x, v, sigma, steps, proposals, power_iters, learning_rate, key, spread, eps,
            in_dtype):
    """Batched hill climbing on ``‖J(x)‖`` with self-adapting trust radii.

    Each step, every point ``x_i`` gets ``proposals`` Gaussian perturbations of radius
    ``σ_i · m`` (``m`` log-uniform in ``[1/8, 8]``, per coordinate) and, when
    ``learning_rate > 0``, three steps of length ``σ_i · {¼, 1, 4} · learning_rate · √dim`` along
    the gradient of ``‖J(x) v‖²`` (zero for piecewise-linear networks). Every proposal is scored
    by one warm-started power step, ``‖J(x') v'‖`` with ``v' ∝ J(x')ᵀJ(x') v``; the best one is
    confirmed by secants (:func:`_confirm`) and replaces ``x_i`` when its confirmed value is not
    worse (moves across the flat regions of ReLU networks are allowed); ``σ_i`` becomes 1.2
    times the radius that improved the value by more than 0.1 %, else shrinks by 0.9. The best
    point of each trajectory is kept and re-measured with ``4 · power_iters`` power steps.
    """
    given = f
    f = _on_state(f, in_dtype)
    dtype = x.dtype
    batch = tf.shape(x)[0]
    dim = tf.cast(tf.size(x[0]), dtype)
    log_jump = tf.math.log(tf.constant(_JUMP, dtype))
    grad_steps = tf.constant(_GRADIENT_STEPS, dtype)
    max_sigma = 1e3 * spread
    s, v = _power(f, x, v, power_iters)
    s, _ = _confirm(f, x, v, s, spread, eps, in_dtype)

    def body(t, x, v, s, sigma, best_x, best_v, best_s):
        key_t = tf.random.experimental.stateless_fold_in(key, t)
        shape = tf.concat([[proposals], tf.shape(x)], 0)
        eps_t = tf.random.stateless_normal(shape, key_t, dtype=dtype)
        key_m = tf.random.experimental.stateless_fold_in(key_t, 1)
        radius = sigma[None] * tf.exp(
            tf.random.stateless_uniform([proposals, batch], key_m, -log_jump, log_jump, dtype))
        cands = x[None] + _per_example(radius, eps_t) * eps_t
        if learning_rate > 0:  # Python constant: the gradient branch is traced only if used
            with tf.GradientTape() as tape:
                tape.watch(x)
                _, jv = _jvp(f, x, v)
            # gradient of ‖J v‖², up to a power of two per example (see _rescaled)
            grad = tape.gradient(jv, x, output_gradients=tf.stop_gradient(_rescaled(jv)),
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
            grad_radius = grad_steps[:, None] * sigma[None]
            length = grad_radius * tf.cast(learning_rate, dtype) * tf.sqrt(dim)
            cands = tf.concat(
                [cands, x[None] + _per_example(length, cands[:len(_GRADIENT_STEPS)])
                 * _normalize(grad)[None]], 0)
            radius = tf.concat([radius, grad_radius], 0)
        n = tf.shape(cands)[0]
        flat = tf.reshape(cands, tf.concat([[n * batch], tf.shape(x)[1:]], 0))
        v_flat = tf.reshape(tf.repeat(v[None], n, axis=0), tf.shape(flat))
        values, v_new = _power(f, flat, v_flat, 1)
        values = tf.reshape(tf.where(tf.math.is_finite(values), values, tf.zeros_like(values)),
                            [n, batch])
        pick = tf.stack([tf.argmax(values, axis=0, output_type=tf.int32), tf.range(batch)], 1)
        x_new = tf.gather_nd(cands, pick)
        v_new = tf.gather_nd(tf.reshape(v_new, tf.shape(cands)), pick)
        s_new, _ = _confirm(f, x_new, v_new, tf.gather_nd(values, pick), spread, eps, in_dtype)
        s_new = tf.where(tf.math.is_finite(s_new), s_new, tf.zeros_like(s_new))
        accept = s_new >= s
        improved = s_new > s * 1.001
        x = tf.where(_per_example(accept, x), x_new, x)
        v = tf.where(_per_example(accept, v), v_new, v)
        s = tf.where(accept, s_new, s)
        sigma = tf.where(improved, 1.2 * tf.gather_nd(radius, pick), 0.9 * sigma)
        sigma = tf.clip_by_value(sigma, max_sigma * 1e-9, max_sigma)
        better = s > best_s
        best_x = tf.where(_per_example(better, x), x, best_x)
        best_v = tf.where(_per_example(better, v), v, best_v)
        return t + 1, x, v, s, sigma, best_x, best_v, tf.maximum(s, best_s)

    _, _, _, _, _, x, v, _ = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), x, v, s, sigma, x, v, s))
    s, v, secant = _measure(given, x, v, 4 * power_iters, spread, eps, in_dtype)
    return x, v, s, secant


_MODEL_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Compiled once per process; the model callable is part of the cache key, so each model's
# graph is traced once and reused by later calls (the callback calls these every epoch).
_SEARCH = compiled(_search, reduce_retracing=True)
_MEASURE = compiled(_measure, reduce_retracing=True)
_POWER = compiled(lambda f, x, v, iters, in_dtype: _power(_on_state(f, in_dtype), x, v, iters),
                  reduce_retracing=True)


def _model_name(model) -> str:
    return getattr(model, "name", None) or getattr(model, "__name__", None) or repr(model)


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """How the inputs of a multi-input model are laid out in one flat vector.

    The Lipschitz constant of a model with several inputs is taken with respect to all of them
    at once, ``‖(δx_1, …, δx_k)‖₂`` (AutoLip's convention). Lower bounds therefore search over
    the concatenation of the flattened inputs, in the order of ``model.inputs``.

    Attributes:
        names: Names of the model's inputs in order (the keys of a model built on a dict).
        shapes: Per-example shape of each input.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each input."""
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    def join(self, x, dtype) -> np.ndarray:
        """A batch of inputs (a list/tuple in input order, or a dict by name) as ``(n, Σ sizes)``.

        Raises:
            LowerBoundError: Wrong number of inputs, unknown names, mismatched shapes or batch
                sizes.
        """
        if isinstance(x, dict):
            unknown = sorted(set(x) - set(self.names))
            missing = [n for n in self.names if n not in x]
            if unknown or missing:
                raise LowerBoundError(
                    f"x is a dict of inputs; expected the keys {list(self.names)}, received "
                    f"{sorted(x)} (missing {missing}, unknown {unknown}).")
            x = [x[n] for n in self.names]
        if not isinstance(x, (list, tuple)) or len(x) != len(self.names):
            raise LowerBoundError(
                f"The model has {len(self.names)} inputs ({', '.join(self.names)}): pass x as a "
                "list with one batch per input, in that order, or as a dict keyed by input name. "
                f"Received: {type(x).__name__}"
                + (f" of length {len(x)}." if isinstance(x, (list, tuple)) else "."))
        parts = []
        for name, shape, part in zip(self.names, self.shapes, x):
            part = np.asarray(part, dtype=dtype)
            if part.shape == shape:
                part = part[None]
            if tuple(part.shape[1:]) != shape:
                raise LowerBoundError(
                    f"Input '{name}' expects batches of shape (n, {', '.join(map(str, shape))}); "
                    f"received shape {part.shape}.")
            parts.append(part.reshape(len(part), -1))
        if len({len(p) for p in parts}) != 1:
            raise LowerBoundError(
                "The inputs' batches differ in size: "
                + ", ".join(f"'{n}' has {len(p)}" for n, p in zip(self.names, parts)) + ".")
        return np.concatenate(parts, axis=1)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """One example's flat vector ``(Σ sizes,)`` as a list of per-input arrays."""
        cuts = np.cumsum(self.sizes)[:-1]
        return [p.reshape(s) for p, s in zip(np.split(np.asarray(flat), cuts), self.shapes)]


def input_layout(model, input_shape=None) -> InputLayout | None:
    """The :class:`InputLayout` of a multi-input Keras model, ``None`` for a single input.

    Args:
        model: A Keras model or a callable.
        input_shape: Per-example shapes, one per input (``None``: the model's own, which must
            then be fully known).

    Raises:
        LowerBoundError: Shapes that are missing or do not match the inputs, or inputs of
            different or non-float dtypes.
    """
    if not isinstance(model, keras.Model) or len(model.inputs) == 1:
        return None
    inputs = model.inputs
    names = input_names(model)
    dtypes = {tf.as_dtype(t.dtype) for t in inputs}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating:
        raise LowerBoundError(
            f"Model '{model.name}' has inputs of dtypes "
            + ", ".join(f"'{t.name}': {tf.as_dtype(t.dtype).name}" for t in inputs)
            + "; lower bounds search over all inputs at once and need one float dtype for all. "
            "Cast the inputs to one float dtype, e.g. in a wrapper model whose float inputs are "
            "cast to the original dtypes before calling this one.")
    if input_shape is None:
        shapes = [tuple(t.shape[1:]) for t in inputs]
        if any(d is None for s in shapes for d in s):
            raise LowerBoundError(
                f"Model '{model.name}' has inputs of unknown shape "
                f"{[tuple(t.shape) for t in inputs]}: pass input_shape, one per-example shape "
                "per input.")
    else:
        shapes = [tuple(int(d) for d in s) for s in input_shape] if (
            isinstance(input_shape, (list, tuple))
            and all(isinstance(s, (list, tuple)) for s in input_shape)) else None
        if shapes is None or len(shapes) != len(inputs):
            raise LowerBoundError(
                f"Model '{model.name}' has {len(inputs)} inputs ({', '.join(names)}): "
                "input_shape must be a list of per-example shapes, one per input. Received: "
                f"input_shape={input_shape!r}.")
    return InputLayout(names, tuple(shapes))


def _input_structure(model):
    """The structure a functional ``model`` was built with (``model.input``), ``None`` if it
    has none (a subclassed or unbuilt model)."""
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def input_names(model) -> tuple[str, ...]:
    """Names of the inputs of ``model``, in the order of ``model.inputs``: the keys of a model
    built on a dict of inputs (``keras.Model({"a": a, "b": b}, ...)``, called with such dicts),
    otherwise the names of their InputLayers (``input_layer_1``, as in reports)."""
    names = {id(t): input_name(t) for t in model.inputs}
    structure = _input_structure(model)
    if isinstance(structure, dict):
        names.update({id(t): str(k) for k, t in structure.items()})
    return tuple(names[id(t)] for t in model.inputs)


def _as_model_fn(model, layout: InputLayout | None = None) -> Callable:
    """A batched callable for ``model``, cached so that compiled functions are traced once.

    A multi-input model (``layout`` given) becomes a function of the concatenation of its
    flattened inputs; outputs of a multi-output model are flattened and concatenated.
    """
    if isinstance(model, keras.Model):
        if len(model.inputs) != 1 and layout is None:
            layout = input_layout(model)
        structure = _input_structure(model)
        # A model built on a dict of inputs refuses lists when its keys are not in sorted order
        # (and warns otherwise): it is called with its own structure, filled in input order.
        packed = isinstance(structure, dict) or (
            layout is not None and isinstance(structure, (list, tuple)))
        cache = _MODEL_FNS.setdefault(model, {})
        key = None if layout is None else layout.shapes
        if key in cache:
            return cache[key]

        def fn(x):
            if layout is not None:
                parts = tf.split(x, layout.sizes, axis=1)
                x = [tf.reshape(p, (-1, *s)) for p, s in zip(parts, layout.shapes)]
            if packed:
                x = keras.tree.pack_sequence_as(structure, x if layout is not None else [x])
            out = model(x, training=False)
            if isinstance(out, (list, tuple, dict)):
                flat = tf.nest.flatten(out)
                out = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in flat], axis=1)
            return out

        cache[key] = fn
        return fn
    if callable(model):
        return model
    raise LowerBoundError(f"Expected a keras.Model or a batched callable, received {model!r}.")


def _starts(x, input_shape, n_random, dtype, rng) -> tuple[np.ndarray, float]:
    """Data points and ``n_random`` Gaussian points at log-uniform radii around the data mean.

    Returns the points and the data spread (1 without data) that sets the search's length scale.
    """
    parts = []
    if x is not None:
        x = np.asarray(x, dtype=dtype)
        size = int(np.prod(input_shape, dtype=np.int64))
        if x.size == 0 or x.size % size or (x.shape != tuple(input_shape)
                                            and int(np.prod(x.shape[1:])) != size):
            raise LowerBoundError(
                f"x must be a batch of inputs of shape (n, {', '.join(map(str, input_shape))}) "
                f"(or one input); received an array of shape {x.shape}.")
        parts.append(x.reshape((-1, *input_shape)))
    spread = (float(np.std(parts[0])) if parts else 1.0) or 1.0
    if n_random > 0:
        mean = float(np.mean(parts[0])) if parts else 0.0
        low, high = np.log(_START_RADII[0]), np.log(_START_RADII[1])
        radii = np.exp(rng.uniform(low, high, n_random)).reshape((-1,) + (1,) * len(input_shape))
        parts.append(
            (mean + spread * radii * rng.standard_normal((n_random, *input_shape))).astype(dtype)
        )
    if not parts:
        raise LowerBoundError("lower_bound needs data points `x` or `n_random` > 0 random "
                              "starting points; received x=None and n_random=0.")
    return np.concatenate(parts, axis=0), spread


def _flat_problem(model, input_shape, x, dtype):
    """``(f, layout, input_shape, x)`` of a search: for a model with several inputs, ``f`` on
    their flat concatenation (:class:`InputLayout`), its flat shape and ``x`` joined likewise."""
    layout = input_layout(model, input_shape)
    f = _as_model_fn(model, layout)
    if layout is not None:
        input_shape = (sum(layout.sizes),)
        x = None if x is None else layout.join(x, dtype)
    return f, layout, input_shape, x


def _activation_size(model) -> int:
    """Entries of the outputs of every layer of a Keras model, per example (0 if unknown)."""
    if not isinstance(model, keras.Model):
        return 0
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _activation_size(layer)
            continue
        try:
            outputs = keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):  # a layer called several times, or never
            continue
        for out in outputs:
            dims = tuple(out.shape[1:])
            if all(isinstance(d, int) for d in dims):
                total += int(np.prod(dims, dtype=np.int64))
    return total


def _points_per_call(model, batch_size: int, dtype: tf.DType) -> int:
    """``batch_size``, lowered so that one call holds about :data:`_MEMORY_BUDGET` bytes."""
    per_point = _activation_size(model) * _COPIES * dtype.size
    return max(1, min(batch_size, _MEMORY_BUDGET // per_point)) if per_point else batch_size


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def lower_bound(
    model,
    input_shape: tuple[int, ...],
    x=None,
    *,
    n_random: int = 256,
    population: int = 32,
    steps: int = 25,
    proposals: int = 8,
    power_iters: int = 5,
    learning_rate: float = 1.0,
    noise: float = 0.5,
    batch_size: int = 512,
    seed: int = 0,
    verbose: int = 0,
    dtype: str = "float32",
) -> LowerBound:
    """Maximises ``‖J_f(x)‖₂`` over inputs; the result is a proven lower bound on ``L(f)``.

    ``L(f) ≥ ‖J_f(x) v‖`` for every point ``x`` where ``f`` is differentiable and every unit
    ``v`` (shared/ALGORITHMS.md §6). The Jacobian of a ReLU network is constant on each linear
    region, so its gradient with respect to ``x`` is zero almost everywhere and plain gradient
    ascent does not move; the largest norms are often far from the data (on ReLU networks, the
    Jacobian far out along a ray is that of the bias-free network). The search therefore:

    1. *screens* the data points and ``n_random`` Gaussian points around the data mean, with
       radii log-uniform in ``[¼, 64]`` times the data spread (1 without data), by ``power_iters``
       power steps on ``J(x)ᵀJ(x)`` each (forward- and reverse-mode products);
    2. *climbs* from the ``population`` best of them for ``steps`` steps: each step proposes
       ``proposals`` random jumps of self-adapting radius (which crosses linear regions) plus
       three gradient steps on ``‖J(x) v‖²`` (second-order autodiff, useful for smooth
       activations; ``learning_rate=0`` skips them), scores each by a warm-started power step,
       and moves each point to its best proposal when that is not worse;
    3. re-measures the best point of each trajectory with ``4 · power_iters`` power steps.

    Autodiff returns a "Jacobian" also where ``f`` is not differentiable (a data point with a
    zero pre-activation, a max-pooling tie), and its norm is then not always a lower bound
    (``celu`` at 0 has autodiff derivative 2 and slope 1). Every norm that the search keeps (the
    screened points, the proposal each point moves to, the final measurement) is therefore
    checked against secant ratios ``‖f(x') − f(x)‖ / ‖x' − x‖`` for ``x' = x ± h v`` at two
    steps ``h`` (``1.2e-4`` and ``1.2e-3`` of ``‖x‖ + √dim · spread`` in float32). When the
    best ratio falls more than ``1e-3`` short of the norm, the norm is replaced by that ratio,
    which is a lower bound at any point. Each check costs 5 forward passes per point (not
    counted in ``evaluations``); on ordinary models the norms pass it and the values are
    unchanged. The ``1e-3`` is the resolution of float32 secants at these steps: where ``f`` is
    not differentiable, a kept norm can exceed the constant by up to that much (``a·celu(x) +
    x`` at its kink: value ``1 + 2a``, secant and constant ``1 + a``, for ``a = 9e-4``); the
    returned ``secant`` does not, and :meth:`LipschitzEstimator.estimate` checks SeqLip against
    it.

    Everything is batched inside one ``tf.function``, with the search state and the norms in
    float32 (float64 for float64 inputs). The returned value is ``‖J_f(x) v‖`` at the returned
    point and unit direction (or the confirmed secant ratio there), never an extrapolation,
    rounded down by 64 machine epsilons of that dtype (``7.6e-6`` relative in float32): the
    norm is computed in floating point, and unrounded it came out above exact constants (a
    Flatten layer measured ``1.0000001``). On
    20 random small MLPs (ReLU, tanh, ELU, GELU; 2-9 inputs; two seeds each), the default found
    at least the largest Jacobian norm of as many random points as its budget buys, at each of
    the scales 1 and 3, in all 40 runs.

    A half-precision model (``mixed_float16``, ``mixed_bfloat16``) is evaluated in its own
    dtype, and its lower bound is one of the model as computed: it carries the model's own
    rounding (about ``1e-3`` relative in float16, ``8e-3`` in bfloat16), the search maximises
    over it, and the value can exceed the constant of the exact-arithmetic network by that
    much. Half-precision outputs cannot resolve short secants: the steps are ``0.125`` and
    ``1.25`` of ``‖x‖ + √dim · spread`` and the allowed shortfall is 8 machine epsilons
    (``8e-3`` in float16, ``6e-2`` in bfloat16), so that only gross autodiff errors are
    caught there. Points where the outputs overflow (float16 above 65504) have no confirmed
    value and are skipped.

    Args:
        model: A Keras model, or a batched callable.
        input_shape: Shape of one example; for a model with several inputs, a list of
            per-example shapes, one per input. The constant is then that of the map of all
            inputs at once (:class:`InputLayout`), and the returned point and direction are
            lists with one array per input.
        x: Optional data points ``(n, *input_shape)``: screened as starting points, and their
            mean and spread centre and scale the random points and the jumps. For a model with
            several inputs, a list of batches (one per input) or a dict keyed by input name.
        n_random: Random starting points screened (in addition to ``x``).
        population: Number of best-screened points that the search refines.
        steps: Search steps; 0 only screens.
        proposals: Random proposals per point and step.
        power_iters: Power steps per screened point (and 4× for the final measurement).
        learning_rate: Gradient step relative to the trust radius times ``√dim``; 0 skips the
            second-order gradient (it is zero anyway on piecewise-linear networks).
        noise: Initial trust radius per coordinate, relative to the data spread.
        batch_size: Largest number of points passed through the model at once. It is
            lowered on large models so that a call holds about 2 GiB of activations (ResNet50
            at 96×96: 9 points; the default took more than 20 GB there).
        seed: Random seed; equal seeds give equal results.
        verbose: 1 shows a progress bar over the search batches.
        dtype: The model's input dtype (points are cast to it before each call).

    Returns:
        A :class:`~tf_lipschitz.report.LowerBound`; ``evaluations`` counts Jacobian-vector
        products (forward or reverse mode; one second-order gradient counts as two), and
        ``secant`` is the best secant ratio at the returned point.

    Raises:
        LowerBoundError: Invalid arguments, no starting points, or inputs that do not match
            the model's.
        NonFiniteLowerBoundError: No searched point gave a finite, confirmed norm.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> from tf_lipschitz.lower import lower_bound
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, "relu"),
        ...                           keras.layers.Dense(2)])
        >>> lb = lower_bound(model, (3,))
        >>> lb.value <= tfl.LipschitzEstimator(model, verbose=0).autolip().upper
        True
    """
    if (steps < 0 or power_iters < 1 or batch_size < 1 or population < 1 or proposals < 1
            or n_random < 0 or learning_rate < 0 or noise <= 0):
        raise LowerBoundError(
            "Expected steps >= 0, power_iters >= 1, batch_size >= 1, population >= 1, "
            "proposals >= 1, n_random >= 0, learning_rate >= 0 and noise > 0; received "
            f"steps={steps}, power_iters={power_iters}, batch_size={batch_size}, "
            f"population={population}, proposals={proposals}, n_random={n_random}, "
            f"learning_rate={learning_rate}, noise={noise}."
        )
    f, layout, input_shape, x = _flat_problem(model, input_shape, x, dtype)
    in_dtype = tf.as_dtype(dtype)
    state = _state_dtype(in_dtype)
    eps = _machine_eps(model, in_dtype)
    rng = np.random.default_rng(seed)
    starts, spread = _starts(x, tuple(input_shape), n_random, state.as_numpy_dtype, rng)
    spread_t = tf.constant(spread, state)
    batch_size = _points_per_call(model, batch_size, state)

    with _autodiff_errors(model):
        best, keep = _screen_and_search(
            f, starts, spread, spread_t, eps, in_dtype, state, batch_size, seed, power_iters,
            population, proposals, steps, learning_rate, noise, verbose)
    return _finish(model, best, starts, keep, layout, state, power_iters, steps, proposals,
                   learning_rate)


@contextlib.contextmanager
def _autodiff_errors(model):
    """Turns TensorFlow's failures to differentiate a model into a
    :class:`~tf_lipschitz.errors.LowerBoundUnavailableError`.

    The search differentiates the model in reverse mode, forward mode and to second order.
    TensorFlow lacks some of these: ``ResizeArea`` has no gradient, ``ScaleAndTranslateGrad``
    rejects float64 images, and a layer may fail when traced inside the search's
    ``tf.function`` (Keras 3.15's ``Resizing(pad_to_aspect_ratio=True)`` in channels_first).
    """
    try:
        yield
    except LipschitzError:
        raise
    except (LookupError, TypeError, AssertionError, NotImplementedError) as exc:
        raise LowerBoundUnavailableError(
            f"lower_bound of '{_model_name(model)}': TensorFlow could not differentiate the "
            f"model ({type(exc).__name__}: {first_line(exc)}). The search needs its gradients, "
            "forward-mode products and second derivatives; upper bounds do not. Replace the "
            "op that has none (a Resizing(interpolation='area') by 'bilinear', for example), "
            "or bound the model from above only.") from exc


def _screen_and_search(f, starts, spread, spread_t, eps, in_dtype, state, batch_size, seed,
                       power_iters, population, proposals, steps, learning_rate, noise, verbose):
    """Steps 1-2 of :func:`lower_bound`: ``(best, keep)``, ``best`` the best point's
    ``(value, x, v, secant)`` and ``keep`` the indices of the screened starts searched from."""
    # 1. screening
    scores, directions = [], []
    for c, part in enumerate(_chunks(len(starts), batch_size)):
        xb = tf.convert_to_tensor(starts[part])
        v0 = _normalize(tf.random.stateless_normal(tf.shape(xb), [seed, c], dtype=state))
        sb, vb, _ = _MEASURE(f, xb, v0, tf.constant(power_iters), spread_t, eps, in_dtype)
        scores.append(np.nan_to_num(sb.numpy(), nan=-1.0, posinf=-1.0))
        directions.append(vb.numpy())
    scores, directions = np.concatenate(scores), np.concatenate(directions)
    keep = np.argsort(-scores, kind="stable")[:population]

    # 2-3. search from the best screened points
    per_point = proposals + (len(_GRADIENT_STEPS) if learning_rate > 0 else 0)
    chunks = _chunks(len(keep), max(1, batch_size // per_point))
    bar = progress_bar(len(chunks), unit_name="batch", label="lower bound", verbose=verbose,
                       stateful_metrics=["lower"])
    best = (-1.0, None, None, None)
    rounded_down = 1.0 - _ROUNDING_ULPS * dtype_eps(state)  # see _ROUNDING_ULPS
    for c, part in enumerate(chunks):
        xb = tf.convert_to_tensor(starts[keep[part]])
        xs, vs, ss, secants = _SEARCH(
            f, xb, tf.convert_to_tensor(directions[keep[part]]),
            tf.fill([tf.shape(xb)[0]], tf.constant(noise * spread, state)),
            tf.constant(steps), proposals, tf.constant(power_iters), float(learning_rate),
            tf.constant([seed, c]), spread_t, eps, in_dtype,
        )
        ss = np.nan_to_num(ss.numpy(), nan=-1.0, posinf=-1.0)
        k = int(np.argmax(ss))
        if ss[k] > best[0]:
            best = (float(ss[k]), xs.numpy()[k], vs.numpy()[k], float(secants.numpy()[k]))
        if bar is not None:
            bar.update(c + 1, values=[("lower", best[0] * rounded_down)])
    return best, keep


def _finish(model, best, starts, keep, layout, state, power_iters, steps, proposals,
            learning_rate) -> LowerBound:
    """Step 3 of :func:`lower_bound`: the best point's value, rounded down, as a result."""
    value, x_best, v_best, secant = best
    if value < 0:
        raise NonFiniteLowerBoundError(
            f"lower_bound of '{_model_name(model)}': neither the Jacobian norm nor the secant "
            f"ratio was finite at any of the {len(starts)} starting points or the points "
            "searched from them. Check the weights for inf/NaN; if the outputs overflow far "
            "from the data (half precision overflows at 65504), pass data points `x` and a "
            "smaller `noise`, or `n_random=0` to search near the data only."
        )
    value *= 1.0 - _ROUNDING_ULPS * dtype_eps(state)
    per_point = proposals + (len(_GRADIENT_STEPS) if learning_rate > 0 else 0)
    gradient = 2 if learning_rate > 0 else 0
    evaluations = (len(starts) * (2 * power_iters + 1)
                   + len(keep) * (2 * power_iters + 1 + 8 * power_iters + 1
                                  + steps * (3 * per_point + gradient)))
    if layout is not None:
        x_best, v_best = layout.split(x_best), layout.split(v_best)
    return LowerBound(value=value, x=x_best, direction=v_best, secant=secant,
                      evaluations=evaluations, starts=len(starts))


def extreme_value_estimate(
    model,
    input_shape: tuple[int, ...],
    x=None,
    *,
    batches: int = 50,
    batch_size: int = 32,
    radius: float = 1.0,
    power_iters: int = 20,
    fit_steps: int = 800,
    seed: int = 0,
    verbose: int = 0,
    dtype: str = "float32",
) -> ExtremeValueEstimate:
    """A CLEVER-style estimate of ``L(f)``: a GEV fit to per-batch maxima of ``‖J_f(x)‖``.

    Points are drawn uniformly in balls of ``radius`` (relative to the data scale) around the
    data points, or from a standard Gaussian without data. The fit uses
    ``tfp.distributions.GeneralizedExtremeValue`` by maximum likelihood. The value is the right
    end of the fitted support when it is bounded (concentration ``ξ < 0``), else the fitted
    location, and never less than ``sample_max``, the largest sampled Jacobian norm (an
    estimate of a maximum cannot be below an observed value). The result is a statistical
    **estimate**: it can fall below the true constant, and it is not a bound either way.

    Args:
        model: Keras model or batched callable.
        input_shape: Shape of one example (a list of shapes for a model with several inputs,
            as in :func:`lower_bound`).
        x: Optional data points around which to sample (a list or dict of batches for a model
            with several inputs).
        batches: Number of batch maxima to fit.
        batch_size: Samples per batch.
        radius: Sampling radius relative to the data's spread.
        power_iters: Power iterations per sample.
        fit_steps: Adam steps of the likelihood fit.
        seed: Random seed.
        verbose: 1 shows a progress bar.
        dtype: Input dtype.

    Returns:
        An :class:`~tf_lipschitz.report.ExtremeValueEstimate` with ``value >= sample_max``.

    Example:
        >>> import keras
        >>> from tf_lipschitz.lower import extreme_value_estimate
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, "tanh"),
        ...                           keras.layers.Dense(2)])
        >>> ev = extreme_value_estimate(model, (3,), batches=20, batch_size=16)
        >>> ev.value >= ev.sample_max
        True
    """
    import tensorflow_probability as tfp  # heavy import, only needed here

    if batches < 3 or batch_size < 1:
        raise LowerBoundError(
            f"Need batches >= 3 and batch_size >= 1; received batches={batches}, "
            f"batch_size={batch_size}."
        )
    f, _, input_shape, x = _flat_problem(model, input_shape, x, dtype)
    in_dtype = tf.as_dtype(dtype)
    state = _state_dtype(in_dtype)
    rng = np.random.default_rng(seed)
    shape = tuple(input_shape)
    dim = int(np.prod(shape))
    data = None if x is None else np.asarray(x, dtype=dtype).reshape((-1, *shape))
    spread = float(np.std(data)) if data is not None else 1.0
    maxima = []
    bar = progress_bar(batches, unit_name="batch", label="extreme values", verbose=verbose)
    for b in range(batches):
        if data is not None:
            centers = data[rng.integers(0, len(data), batch_size)]
            direction = rng.standard_normal((batch_size, dim))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            r = radius * spread * np.sqrt(dim) * rng.random(batch_size) ** (1.0 / dim)
            pts = centers + (direction * r[:, None]).reshape((batch_size, *shape))
        else:
            pts = rng.standard_normal((batch_size, *shape))
        pts = tf.convert_to_tensor(pts.astype(state.as_numpy_dtype))
        v0 = _normalize(tf.random.stateless_normal(tf.shape(pts), [seed, b], dtype=state))
        s, _ = _POWER(f, pts, v0, tf.constant(power_iters), in_dtype)
        maxima.append(float(np.max(s.numpy())))
        if bar is not None:
            bar.update(b + 1)
    sample = np.asarray(maxima, dtype="float64")
    mu0, sd0 = float(sample.mean()), float(sample.std() + 1e-12)
    z = tf.constant((sample - mu0) / sd0)
    loc = tf.Variable(0.0, dtype=tf.float64)
    log_scale = tf.Variable(np.log(0.8), dtype=tf.float64)
    conc = tf.Variable(-0.1, dtype=tf.float64)
    opt = keras.optimizers.Adam(learning_rate=0.02)

    @tf.function(autograph=False)
    def fit_step():
        with tf.GradientTape() as tape:
            dist = tfp.distributions.GeneralizedExtremeValue(
                loc=loc, scale=tf.exp(log_scale), concentration=conc
            )
            nll = -tf.reduce_mean(dist.log_prob(z))
            # log_prob is -inf outside the support; keep the optimiser out of there
            nll = tf.where(tf.math.is_finite(nll), nll, tf.constant(1e6, tf.float64))
        grads = tape.gradient(nll, [loc, log_scale, conc])
        grads = [tf.where(tf.math.is_finite(g), g, tf.zeros_like(g)) for g in grads]
        opt.apply_gradients(zip(grads, [loc, log_scale, conc]))
        return nll

    for _ in range(fit_steps):
        fit_step()
    loc_v = mu0 + sd0 * float(loc.numpy())
    scale_v = sd0 * float(np.exp(log_scale.numpy()))
    conc_v = float(conc.numpy())
    # TFP's GEV with concentration ξ < 0 has support bounded above at loc - scale / ξ.
    value = loc_v - scale_v / conc_v if conc_v < 0 else loc_v
    # A maximum below an observed value is wrong by construction (the fit can put its right
    # end, or its location when the support is unbounded, below the largest sample).
    value = max(value, float(sample.max()))
    return ExtremeValueEstimate(
        value=float(value), loc=loc_v, scale=scale_v, concentration=conc_v,
        sample_max=float(sample.max()), batches=batches, batch_size=batch_size,
    )
