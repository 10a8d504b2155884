"""Certified upper bounds on the operator norms of linear layers.

A power or Lanczos iteration converges to a layer's spectral norm **from below**, so an AutoLip
product built on it is an estimate. This module computes numbers that are provably ``>=`` the
true operator norm of a layer's linear part on its real input shape, and tight:

- **Dense matrices** (Dense, EinsumDense blocks, small fused chains materialised as a matrix):
  the top eigenvalue of the Gram matrix ``WᵀW`` in float64, either exactly (``eigvalsh``) or
  verified: a batched Lanczos run proposes ``τ`` just above the top singular value and a float64
  Cholesky factorisation of ``τ²I − WᵀW`` proves ``σ_max ≤ τ``. The Gram iteration of Delattre
  et al. (ICML 2023) is available as ``method="gram"``.
- **Convolutions** of any stride, dilation, padding and groups, depthwise, separable and
  transposed: a zero-padded convolution is the restriction of a circular convolution on a grid
  large enough to cover the padding, and a strided convolution is a stride-1 convolution of the
  polyphase components of its input. The circular operator is block-diagonalised by the DFT of
  the polyphase kernel, so its norm is the largest singular value over a batch of small
  ``c_out × (c_in · Π strides)`` matrices, one per frequency, certified as above. Small
  operators are materialised and bounded exactly instead (tighter: no boundary effect), and
  stride-1 convolutions on small grids whose FFT bound shows a boundary effect get an exact
  block-banded Cholesky certificate (:mod:`tf_lipschitz.gridconv`).
- **Average pooling**: a Kronecker product of one-dimensional averaging matrices, whose norms
  are computed exactly.

Floating point: every bound is computed in float64 from the weights as the layer multiplies by
them (rounded to its compute dtype, float16 under ``mixed_float16``, then converted exactly:
:func:`~tf_lipschitz.rules.base.weight_values`) and multiplied by ``1 + margin``,
``margin = max(1e-6, 16·(m+n)·min(m,n)·u)`` for an ``m × n`` matrix, ``u = 2⁻⁵³``. The
worst-case rounding errors of the Gram product (``≤ m·u·‖W‖_F²``), of the Cholesky test (Rump's
criterion, ``≤ (r+1)·r·u·τ²``), of the eigen-solver and of the DFT are all below it, as is the
float32 rounding (a few units of ``6e-8``) of derived per-channel scales such as
BatchNormalization's ``γ/√(var+ε)``.
See ``docs/certified.md`` for the arguments.

Example:
    >>> import numpy as np
    >>> w = np.diag([3.0, 1.0])
    >>> bound = max_singular_value(w[None])
    >>> 3.0 <= bound <= 3.0 * (1 + 1e-5)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import string
import types
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_lipschitz.gridconv import small_grid_bound
from tf_lipschitz.linalg import cholesky_in_place, lanczos_ritz, top_eigenvalue
from tf_lipschitz.errors import InvalidArgumentError, LipschitzError
from tf_lipschitz.operators import LinearOperator, basis_blocks, compose
from tf_lipschitz.power import check_choice, check_int, check_tol
from tf_lipschitz.rules.base import weight_values

__all__ = [
    "SAFETY_MARGIN",
    "LayerCertificate",
    "ConvSpec",
    "safety_margin",
    "max_singular_value",
    "gram_iteration",
    "dense_certificate",
    "einsum_certificate",
    "conv_certificate",
    "average_pool_certificate",
    "average_pool_norm",
    "average_pool_matrices",
    "fused_certificate",
    "fold_diagonals",
]

SAFETY_MARGIN = 1e-6
"""Smallest relative margin added to every certificate (see :func:`safety_margin`)."""

DENSE_LIMIT = 1 << 23
"""Largest ``n_in · n_out`` of an operator materialised for an exact dense bound."""

DENSE_SIDE_LIMIT = 2048
"""Largest ``min(n_in, n_out)`` of an operator materialised for an exact dense bound."""

CHAIN_DENSE_FACTOR = 4
"""A fused chain whose layers' certificates would otherwise be multiplied is materialised up
to ``CHAIN_DENSE_FACTOR · DENSE_LIMIT`` entries (256 MB in float64) for its exact norm."""

CHAIN_GRAM_LIMIT = 1 << 31
"""Beyond that, a chain with at most :data:`CHAIN_GRAM_SIDE` inputs and ``n_in · n_out`` up
to this limit is bounded through its ``n_in × n_in`` Gram matrix, built by ``n_in`` products
``JᵀJ e_j`` in float64 (the cost of ``n_in`` forward and backward passes of the chain)."""

CHAIN_GRAM_SIDE = 4096
"""Largest number of inputs of a chain bounded through its Gram matrix (134 MB in float64:
a CIFAR image, or a 64×64 grey one)."""

GRAM_SIDE_LIMIT = 8192
"""Largest Gram matrix side formed for a dense matrix; beyond it a loose closed form is used."""

EXACT_EIG_LIMIT = 64
"""Gram matrices up to this side get an exact ``eigvalsh``; larger ones the Cholesky test."""

_CHUNK_BYTES = 48 << 20
_U = np.finfo(np.float64).eps / 2
_TAU = 2.0 * math.pi


def safety_margin(rows: int, cols: int) -> float:
    """Relative margin that covers float64 rounding for an ``rows × cols`` matrix.

    ``max(1e-6, 16 · (rows + cols) · min(rows, cols) · u)`` with ``u = 2⁻⁵³``: it dominates the
    worst-case error bounds of forming the Gram matrix, of the Cholesky test and of the
    symmetric eigen-solver (each ``O(n² u)`` relative to ``σ_max²``), with room to spare.

    Args:
        rows: Rows of the matrix.
        cols: Columns of the matrix.

    Returns:
        The relative margin.

    Example:
        >>> safety_margin(512, 512)
        1e-06
    """
    return max(SAFETY_MARGIN, 16.0 * (rows + cols) * min(rows, cols) * _U)


# ----------------------------------------------------------------------------------------------
# Batches of matrices
# ----------------------------------------------------------------------------------------------


def _gram(a: np.ndarray) -> np.ndarray:
    """Gram matrices on the smaller side of a batch ``(B, m, n)``."""
    if a.shape[0] == 1 and not np.iscomplexobj(a):  # one real matrix (a dense kernel): NumPy
        m = a[0]                                     # computes ``mᵀm`` as a symmetric rank-k
        return (m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T)[None]  # update, half the flops
    if a.shape[-2] >= a.shape[-1]:
        return np.matmul(np.conj(np.swapaxes(a, -1, -2)), a)
    return np.matmul(a, np.conj(np.swapaxes(a, -1, -2)))


def _lanczos_ritz(h: np.ndarray, steps: int = 32, seed: int = 0) -> np.ndarray:
    """Largest Ritz value of each Hermitian matrix of a batch after ``steps`` Lanczos steps.

    A Ritz value is a Rayleigh quotient, hence never above the top eigenvalue (up to rounding).
    It is only used to *propose* a bound, which the Cholesky test then proves.
    """
    start = np.random.default_rng(seed).standard_normal(h.shape[:-1]).astype(h.dtype)
    return lanczos_ritz(lambda q: np.matmul(h, q[..., None])[..., 0], start, steps)


def _cholesky_fails(shifted: np.ndarray) -> np.ndarray:
    """Which matrices of a Hermitian batch fail a float64 Cholesky factorisation.

    A real batch of matrices of side 128 or more is factorised in place (``shifted`` is
    overwritten: callers pass a fresh array); complex ones go through NumPy's copying routine.
    """
    if shifted.shape[-1] < 128:  # one batched call, matrix by matrix only if one fails
        try:
            np.linalg.cholesky(shifted)
            return np.zeros(shifted.shape[0], bool)
        except np.linalg.LinAlgError:
            pass
    if np.isrealobj(shifted):
        shifted = np.ascontiguousarray(shifted, dtype=np.float64)
        return np.array([not cholesky_in_place(matrix) for matrix in shifted], bool)
    failed = np.zeros(shifted.shape[0], bool)
    for b in range(shifted.shape[0]):
        try:
            np.linalg.cholesky(shifted[b])
        except np.linalg.LinAlgError:
            failed[b] = True
    return failed


def _max_eigenvalue(symbols: Callable[[np.ndarray], np.ndarray], count: int, chunk: int,
                    side: int, rtol: float, margin: float,
                    priority: np.ndarray | None = None) -> float:
    """Certified bound on the largest eigenvalue over ``count`` Hermitian PSD matrices.

    ``symbols(indices)`` returns the matrices ``(len, side, side)`` with those indices; they are
    generated ``chunk`` at a time, in decreasing order of ``priority`` (a cheap proxy such as
    the trace), so that large batches never sit in memory at once.

    Small matrices get an exact ``eigvalsh``. Larger ones are tested against a level ``τ²``: a
    long Lanczos run on the first matrices proposes ``τ² = λ_ritz (1 + rtol)²`` (a Ritz value
    never exceeds the top eigenvalue), and a float64 Cholesky factorisation of
    ``τ²(1 − margin) I − H`` proves ``λ_max(H) ≤ τ²`` (Rump, BIT 2006: success of the
    floating-point factorisation with that shift implies positive definiteness). A matrix that
    fails gets an exact ``eigvalsh`` and raises the level for the next chunks. Every level is at
    most ``(1 + rtol)²`` times a true eigenvalue, so the result is tight.
    """
    order = np.arange(count) if priority is None else np.argsort(-priority, kind="stable")
    if count <= 4:  # a failed test costs one eigvalsh only: propose tightly
        rtol = min(rtol, 1e-5)
    best, level = 0.0, 0.0
    for start in range(0, count, chunk):
        indices = np.sort(order[start:start + chunk])  # generation order within a chunk
        h = symbols(indices)
        if side <= EXACT_EIG_LIMIT:
            best = max(best, top_eigenvalue(h))
            continue
        if level == 0.0:
            lead = h if priority is None else h[np.argsort(-priority[indices])[:4]]
            level = float(np.max(_lanczos_ritz(lead[:4], steps=64))) * (1.0 + rtol) ** 2
            if level == 0.0:  # λ_max ≤ trace for PSD matrices
                level = float(np.max(np.real(np.trace(h, axis1=-2, axis2=-1))))
        shifted = np.negative(h)  # level (1 − margin) I − H, built without an identity matrix
        shifted[..., np.arange(side), np.arange(side)] += level * (1.0 - margin)
        failed = _cholesky_fails(shifted)
        best = max(best, level)
        if failed.any():
            exact = top_eigenvalue(h[failed])
            best = max(best, exact)
            level = max(level, exact * (1.0 + rtol) ** 2)
    return best


def _top_eigenvalue_bound(h: np.ndarray, rtol: float, margin: float) -> float:
    """:func:`_max_eigenvalue` of an in-memory batch of Gram matrices."""
    trace = np.real(np.trace(h, axis1=-2, axis2=-1))
    return _max_eigenvalue(lambda idx: h[idx], h.shape[0], h.shape[0], h.shape[-1], rtol, margin,
                           trace)


def _frobenius(g: tf.Tensor) -> tf.Tensor:
    """Frobenius norms of a batch, computed without underflow or overflow."""
    big = tf.reduce_max(tf.abs(g), axis=[-2, -1])
    safe = tf.where(big > 0, big, tf.ones_like(big))
    ratio = tf.abs(g / tf.cast(safe, g.dtype)[:, None, None])
    return big * tf.sqrt(tf.reduce_sum(tf.square(ratio), axis=[-2, -1]))


def _gram_step(g: tf.Tensor, log_scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``G ← (G/‖G‖_F)ᴴ (G/‖G‖_F)``, the scale kept in log space (Delattre et al., Alg. 1)."""
    fro = _frobenius(g)
    safe = tf.where(fro > 0, fro, tf.ones_like(fro))
    g = g / tf.cast(safe, g.dtype)[:, None, None]
    return tf.matmul(g, g, adjoint_a=True), 2.0 * (log_scale + tf.math.log(safe))


@tf.function(reduce_retracing=True, autograph=False)
def _gram_iteration_tf(g: tf.Tensor, iterations: tf.Tensor) -> tf.Tensor:
    log_scale = tf.zeros(tf.shape(g)[:1], _frobenius(g).dtype)
    g, log_scale = _gram_step(g, log_scale)  # (B, m, n) -> (B, n, n)
    g, log_scale, _ = tf.while_loop(
        lambda g, s, i: i < iterations,
        lambda g, s, i: (*_gram_step(g, s), i + 1),
        (g, log_scale, tf.constant(1)),
    )
    fro = _frobenius(g)
    power = tf.cast(2.0, fro.dtype) ** tf.cast(iterations, fro.dtype)
    safe = tf.where(fro > 0, fro, tf.ones_like(fro))
    bound = tf.exp((tf.math.log(safe) + log_scale) / power)
    return tf.where(fro > 0, bound, tf.zeros_like(bound))


def _matrix_batch(matrices: Any, *, allow_single: bool) -> np.ndarray:
    """``matrices`` as an array ``(B, m, n)`` (one matrix ``(m, n)`` too if ``allow_single``)."""
    try:
        a = np.asarray(matrices)
    except (TypeError, ValueError):  # ragged nested lists
        a = None
    if a is not None and a.ndim == 2 and allow_single:
        a = a[None]
    if a is None or a.ndim != 3 or not np.issubdtype(a.dtype, np.number):
        received = f"shape {a.shape}, dtype {a.dtype}" if a is not None else repr(matrices)
        raise InvalidArgumentError(
            "matrices must be a numeric array of shape (B, m, n), a batch of matrices"
            + (" (or one matrix (m, n))" if allow_single else "") + f"; received {received}.")
    return a


def gram_iteration(matrices: Any, iterations: int = 8) -> np.ndarray:
    """Gram iteration (Delattre et al., ICML 2023): certified bounds on each ``σ_max``.

    With ``G₀ = W`` and ``G_{t+1} = G_tᴴ G_t``, ``σ_max(W) ≤ ‖G_t‖_F^{1/2^t}``; the ratio to
    ``σ_max`` is at most ``rank^{1/2^{t+1}}`` and falls super-linearly. Every iterate is divided
    by its Frobenius norm and the scale kept in log space, so large or tiny weights neither
    overflow nor underflow. Runs in float64/complex128 inside a compiled ``tf.function``.

    Args:
        matrices: Batch ``(B, m, n)`` of real or complex matrices.
        iterations: Number of Gram squarings ``t``.

    Returns:
        Array ``(B,)`` of upper bounds (before the rounding margin of :func:`safety_margin`).

    Example:
        >>> import numpy as np
        >>> w = np.random.default_rng(0).standard_normal((1, 20, 10))
        >>> exact = np.linalg.norm(w[0], 2)
        >>> bool(exact <= gram_iteration(w, 6)[0] <= exact * 1.001)
        True

        After about 10 squarings the bound meets ``σ_max`` to the last bit and can round a unit
        below it; :func:`max_singular_value` adds the margin that makes it a certificate.
    """
    a = _matrix_batch(matrices, allow_single=False)
    iterations = check_int(iterations, "iterations", minimum=0)
    dtype = np.complex128 if np.iscomplexobj(a) else np.float64
    if a.shape[-2] < a.shape[-1]:
        a = np.swapaxes(a, -1, -2)
    g = tf.constant(a.astype(dtype))
    if iterations == 0:
        return _frobenius(g).numpy()
    return _gram_iteration_tf(g, tf.constant(int(iterations))).numpy()


def _binary_scale(a: np.ndarray) -> float:
    """The power of two just above ``max|a|`` (dividing by it is exact), or 0 for zeros.

    Raises:
        InvalidArgumentError: On NaN or inf (no bound exists).
    """
    big = float(np.max(np.abs(a)))  # NaN if any entry is NaN
    if not math.isfinite(big):
        raise InvalidArgumentError(
            "The weights contain NaN or inf: no operator-norm bound exists. Check the layer's "
            "weights (a diverged training step) before certifying.")
    return 0.0 if big == 0.0 else 2.0 ** math.frexp(big)[1]


def max_singular_value(matrices: Any, *, method: str = "auto", rtol: float = 1e-4,
                       iterations: int = 10) -> float:
    """Certified upper bound on the largest singular value over a batch of matrices.

    Args:
        matrices: Array ``(B, m, n)`` (or one ``(m, n)`` matrix), real or complex; computed in
            float64/complex128.
        method: ``"auto"`` (exact ``eigvalsh`` of small Gram matrices, Lanczos-proposed bound
            verified by Cholesky for larger ones), ``"exact"`` (``eigvalsh`` always) or
            ``"gram"`` (Gram iteration with ``iterations`` squarings).
        rtol: For ``"auto"``: the proposed bound exceeds the Lanczos value by this relative
            amount, so the result is within ``(1 + rtol)(1 + margin)`` of the true maximum.
        iterations: Gram squarings for ``method="gram"``.

    Returns:
        A float ``>= max_b σ_max(matrices[b])``, margin included.

    Raises:
        InvalidArgumentError: On an unknown ``method``, an ``rtol`` outside ``(0, 0.1]`` or an
            array that is not a batch of matrices.
        InvalidArgumentError: On a non-finite matrix (no bound exists).

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).standard_normal((4, 30, 20))
        >>> exact = max(np.linalg.norm(m, 2) for m in a)
        >>> bool(exact <= max_singular_value(a) <= exact * 1.001)
        True
    """
    a = _matrix_batch(matrices, allow_single=True)
    check_choice(method, "method", ("auto", "exact", "gram"))
    if method == "auto":
        rtol = check_tol(rtol, "rtol", default=1e-4)
    if method == "gram":
        iterations = check_int(iterations, "iterations", minimum=0)
    if a.size == 0:
        return 0.0
    given = a
    a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64, copy=False)
    scale = _binary_scale(a)
    if scale == 0.0:
        return 0.0
    if a is given:  # the caller's array: a scaled copy
        a = a / scale
    else:  # this function's float64 copy: scaled in place
        a /= scale
    m, n = a.shape[-2:]
    margin = safety_margin(m, n)
    if method == "gram":
        return float(np.max(gram_iteration(a, iterations))) * (1.0 + margin) * scale
    if min(m, n) > GRAM_SIDE_LIMIT:
        return _loose_matrix_bound(a) * (1.0 + margin) * scale
    h = _gram(a)
    if method == "exact":
        lam = max(top_eigenvalue(h), 0.0)
    else:
        lam = _top_eigenvalue_bound(h, rtol, margin)
    return math.sqrt(lam) * (1.0 + margin) * scale


def _loose_matrix_bound(a: np.ndarray) -> float:
    """``min(√(‖W‖₁‖W‖_∞), ‖W‖_F)``: certified, for matrices too large for a Gram matrix."""
    warnings.warn(
        f"Matrices of shape {a.shape[-2:]} are too large for an exact certificate (Gram side "
        f"> {GRAM_SIDE_LIMIT}); using the looser bound min(sqrt(|W|_1 |W|_inf), |W|_F).",
        stacklevel=3,
    )
    mag = np.abs(a)
    schur = np.sqrt(mag.sum(axis=-2).max(axis=-1) * mag.sum(axis=-1).max(axis=-1))
    fro = np.sqrt(np.sum(mag * mag, axis=(-2, -1)))
    return float(np.max(np.minimum(schur, fro)))


# ----------------------------------------------------------------------------------------------
# Layer certificates
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCertificate:
    """A certified operator-norm bound of one layer's linear part, read from current weights.

    Calling the object returns the bound. Rules attach it as ``Linear(certificate=...)``;
    :func:`fused_certificate` also calls :meth:`scaled` to fold per-channel scalings of
    neighbouring BatchNormalization/Rescaling layers into the weights, which is tighter than
    multiplying the two norms.

    Attributes:
        structured: ``structured(in_scale, out_scale) -> float``: the bound from the layer's
            structure (kernel SVD, polyphase FFT), with optional per-channel scales (``None``
            for none) applied to the input and output channels.
        fn: The layer's linear part; it must compute in the dtype of its input so that the
            exact dense route can run it in float64.
        input_shape: Per-example input shape.
        output_shape: Per-example output shape.
        channel_axis: Per-example axis of the channels (``-1`` or ``0``), for scale folding;
            ``None`` if folding is not supported.
        method: Short description shown in docs and errors.
        spec: For convolutions, ``spec(in_scale, out_scale) -> ConvSpec`` of the scaled layer
            (used by :mod:`tf_lipschitz.starts` to build a starting vector); else ``None``.
        matrix: For maps ``x ↦ x W`` on the last axis (Dense), ``matrix() -> W`` in float64;
            else ``None``.
    """

    structured: Callable[[Any, Any], float]
    fn: Callable[[Any], Any] | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    channel_axis: int | None = -1
    method: str = ""
    spec: Callable[[Any, Any], "ConvSpec"] | None = None
    matrix: Callable[[], np.ndarray] | None = None

    def __call__(self) -> float:
        return self.scaled()

    def scaled(self, in_scale: np.ndarray | None = None,
               out_scale: np.ndarray | None = None) -> float:
        """The certificate of ``diag(out_scale) ∘ layer ∘ diag(in_scale)`` (channel scales).

        Small operators are materialised in float64 and bounded exactly (no boundary effect);
        larger ones use the structured bound.
        """
        if self.fn is not None and _small(self.input_shape, self.output_shape):
            fn = _scaled_fn(self.fn, in_scale, out_scale, self.channel_axis)
            exact = _dense_exact(fn, self.input_shape, self.output_shape)
            if exact is not None:
                return exact
        return float(self.structured(in_scale, out_scale))


def _small(input_shape, output_shape) -> bool:
    n_in, n_out = math.prod(input_shape), math.prod(output_shape)
    return n_in * n_out <= DENSE_LIMIT and min(n_in, n_out) <= DENSE_SIDE_LIMIT


def _chain_route(input_shape, output_shape) -> str | None:
    """How a fused chain may be bounded exactly rather than by a product of its layers'
    certificates: ``"matrix"`` (materialised, :data:`CHAIN_DENSE_FACTOR`), ``"gram"`` (its
    Gram matrix from products, :data:`CHAIN_GRAM_LIMIT`) or ``None``."""
    n_in, n_out = math.prod(input_shape), math.prod(output_shape)
    if n_in * n_out <= CHAIN_DENSE_FACTOR * DENSE_LIMIT and min(n_in, n_out) <= DENSE_SIDE_LIMIT:
        return "matrix"
    if n_in <= CHAIN_GRAM_SIDE and n_in * n_out <= CHAIN_GRAM_LIMIT:
        return "gram"
    return None


def _channel_broadcast(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(scale, shape)


def _scaled_fn(fn, in_scale, out_scale, axis):
    if in_scale is None and out_scale is None:
        return fn

    def scaled(x):
        if in_scale is not None:
            x = x * tf.constant(_channel_broadcast(in_scale, len(x.shape) - 1, axis), x.dtype)
        y = fn(x)
        if out_scale is not None:
            y = y * tf.constant(_channel_broadcast(out_scale, len(y.shape) - 1, axis), y.dtype)
        return y

    return scaled


class _Float64Unavailable(Exception):
    """A linear map could not be evaluated in float64, so the exact dense route does not apply.

    The message says why (shown in the warning of :func:`fused_certificate`).
    """


# What a map that runs in float32 but not in float64 raises: a float32 constant or variable
# mixed into a float64 op (InvalidArgumentError when run eagerly, TypeError or ValueError while
# tracing) or an op without a float64 kernel (NotFoundError: AvgPool3D on CPU; Unimplemented).
_FLOAT64_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
                   tf.errors.UnimplementedError, TypeError, ValueError)


@contextlib.contextmanager
def _no_autocast(layers):
    """Lets data-movement layers called as ``layer(x)`` (Flatten, Reshape...) keep float64.

    Keras casts floating inputs to a layer's compute dtype (float32); the exact dense route
    needs the whole chain in float64. :func:`_float64_matrix` checks the result, so a layer that
    still computes in float32, or fails in float64, only disables the dense route.
    """
    layers = list(layers)
    for layer in layers:  # TimeDistributed(Flatten()) calls its inner layer as layer(x) too
        if isinstance(layer, keras.layers.Wrapper):
            layers.append(layer.layer)
    saved = [(layer, layer.autocast) for layer in layers if isinstance(layer, keras.layers.Layer)]
    try:
        for layer, _ in saved:
            layer.autocast = False
        yield
    finally:
        for layer, value in saved:
            layer.autocast = value


def _runs_in_float32(fn, input_shape) -> bool:
    try:
        fn(tf.zeros((1, *input_shape), tf.float32))
    except Exception:  # noqa: BLE001 - only asks whether the failure is float64-specific
        return False
    return True


def _error_summary(err: Exception) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())
    return f"{type(err).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"


def _float64_matrix(fn, input_shape, output_shape, layers=()) -> np.ndarray:
    """The dense float64 matrix ``(n_out, n_in)`` of a small linear map.

    The matrix is built from the smaller side: ``fn`` on the input basis, or its adjoint (one
    reverse-mode product) on the output basis. On one-hot vectors every entry is a single
    weight (or a float64 product of weights), so the matrix is exact. ``layers`` (those that
    ``fn`` calls as ``layer(x)``) run without Keras' float32 input cast.

    Raises:
        _Float64Unavailable: ``fn`` returns float32, or fails in float64 (a float32 weight or
            constant in a float64 op, an op without a float64 kernel) although it runs in
            float32. A failure that also happens in float32 is re-raised as is.
    """
    input_shape, output_shape = tuple(input_shape), tuple(output_shape)
    try:
        with _no_autocast(layers):
            matrix = _materialise(fn, input_shape, output_shape)
    except _FLOAT64_ERRORS as err:
        if not _runs_in_float32(fn, input_shape):
            raise  # not a float64 limitation: a genuine error of the rule or the layer
        raise _Float64Unavailable(f"it fails in float64 ({_error_summary(err)})") from err
    return matrix


def _check_float64(dtype) -> None:
    name = keras.backend.standardize_dtype(dtype)
    if name != "float64":
        raise _Float64Unavailable(f"it computes in {name} when given float64 inputs")


def _materialise(fn, input_shape, output_shape) -> np.ndarray:
    n_in, n_out = math.prod(input_shape), math.prod(output_shape)
    batch = max(1, _CHUNK_BYTES // (8 * max(n_in, n_out)))
    if n_in > n_out:
        try:
            return _materialise_rows(fn, input_shape, n_in, n_out, batch)
        except _FLOAT64_ERRORS:
            # Some ops have a float64 forward kernel but no float64 gradient (a grouped
            # Conv2D's Conv2DBackpropInput on CPU): build the columns instead.
            pass
    matrix = LinearOperator(fn, input_shape, dtype="float64").to_dense(batch_size=batch)
    _check_float64(matrix.dtype)
    return matrix


def _materialise_rows(fn, input_shape, n_in, n_out, batch) -> np.ndarray:
    """The matrix row block by row block, by reverse-mode products on the output basis."""
    rows = []
    for _, basis in basis_blocks(n_out, batch):
        count = len(basis)
        x = tf.zeros((count, *input_shape), tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
            _check_float64(y.dtype)
            energy = tf.reduce_sum(y * tf.constant(basis.reshape(y.shape), tf.float64))
        rows.append(np.asarray(tape.gradient(energy, x)).reshape(count, n_in))
    return np.concatenate(rows)


def _float64_gram_bound(fn, input_shape, output_shape, layers=()) -> float:
    """Certified ``σ_max`` of a linear map with few inputs, from its Gram matrix ``JᵀJ``.

    Column block by column block, ``JᵀJ E`` for one-hot ``E`` (one forward and one backward
    pass in float64), without forming ``J`` (``n_out`` may be large); then the certified top
    eigenvalue of the symmetrised Gram matrix (:func:`_top_eigenvalue_bound`) with the
    rounding margin of an ``n_out × n_in`` matrix (:func:`safety_margin`), which covers the
    sums of the products as it covers those of a Gram product.

    Raises:
        _Float64Unavailable: As :func:`_float64_matrix`.
    """
    input_shape = tuple(input_shape)
    n_in, n_out = math.prod(input_shape), math.prod(output_shape)
    batch = max(1, _CHUNK_BYTES // (8 * n_out))
    gram = np.empty((n_in, n_in))
    try:
        with _no_autocast(layers):
            for start, basis in basis_blocks(n_in, batch):
                count = len(basis)
                x = tf.constant(basis.reshape(count, *input_shape))
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = fn(x)
                    _check_float64(y.dtype)
                    energy = 0.5 * tf.reduce_sum(tf.square(y))
                gram[start:start + count] = np.asarray(tape.gradient(energy, x)).reshape(count,
                                                                                         n_in)
    except _FLOAT64_ERRORS as err:
        if not _runs_in_float32(fn, input_shape):
            raise
        raise _Float64Unavailable(f"it fails in float64 ({_error_summary(err)})") from err
    gram = 0.5 * (gram + gram.T)
    scale = _binary_scale(gram)
    if scale == 0.0:
        return 0.0
    margin = safety_margin(n_out, n_in)
    lam = _top_eigenvalue_bound((gram / scale)[None], 1e-4, margin)
    return math.sqrt(lam * scale) * (1.0 + margin)


def _dense_exact(fn, input_shape, output_shape) -> float | None:
    """Exact float64 dense bound of a small operator, or ``None`` if ``fn`` cannot run in
    float64 (see :func:`_float64_matrix`)."""
    try:
        matrix = _float64_matrix(fn, input_shape, output_shape)
    except _Float64Unavailable:
        return None
    return max_singular_value(matrix[None], method="exact")


def _scale_axis(kernel: np.ndarray, scale, axis: int) -> np.ndarray:
    if scale is None:
        return kernel
    return kernel * _channel_broadcast(np.asarray(scale, np.float64), kernel.ndim, axis)


def dense_certificate(layer, input_shape: Sequence[int],
                      output_shape: Sequence[int]) -> LayerCertificate:
    """Certificate of a Dense layer: ``σ_max`` of its kernel (exact for any input rank).

    A Dense layer maps the last axis; on an input ``(..., d_in)`` its linear part is
    ``I ⊗ W``, whose norm is ``‖W‖₂``.

    Args:
        layer: A ``keras.layers.Dense``.
        input_shape: Per-example input shape.
        output_shape: Per-example output shape.

    Returns:
        A :class:`LayerCertificate`.
    """

    return matrix_certificate(lambda: weight_values(layer, layer.kernel), input_shape,
                              output_shape)


def matrix_certificate(read: Callable[[], np.ndarray], input_shape: Sequence[int],
                       output_shape: Sequence[int]) -> LayerCertificate:
    """Certificate of ``x ↦ x W`` on the last axis, ``W = read()`` (float64, ``(d_in, d_out)``):
    ``σ_max(W)``, verified (:func:`max_singular_value`), channel scales folded into ``W``'s
    rows and columns. A Dense layer, or a graph's ``MatMul`` by a constant."""

    def structured(in_scale, out_scale):
        w = _scale_axis(_scale_axis(read(), in_scale, 0), out_scale, 1)
        return max_singular_value(w[None])

    return LayerCertificate(structured, None, tuple(input_shape), tuple(output_shape), -1,
                            "kernel SVD", matrix=read)


def _einsum_blocks(equation: str, x_ndim: int, x_shape: Sequence[int], kernel: np.ndarray):
    """Splits an EinsumDense into ``√(summed size) · max_s ‖M_s‖`` (see einsum_certificate)."""
    lhs, out = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    spare = [c for c in string.ascii_letters if c not in equation]
    if "..." in x_spec:
        n_ell = x_ndim - (len(x_spec) - 3)
        fill = "".join(spare[:n_ell])
        x_spec, out = x_spec.replace("...", fill), out.replace("...", fill)
    if "..." in k_spec or len(set(x_spec)) != len(x_spec) or len(set(k_spec)) != len(k_spec):
        raise LipschitzError(
            f"EinsumDense equation {equation!r} (an ellipsis in the kernel or a repeated index) "
            "has no certificate; run without certified=True for an estimate.")
    sizes = dict(zip(x_spec, x_shape))
    sizes.update(zip(k_spec, kernel.shape))
    batch = x_spec[0]
    if batch in k_spec or batch not in out:
        raise LipschitzError(
            f"EinsumDense equation {equation!r} mixes batch examples (its first input index "
            "is in the kernel or not in the output), so no per-example certificate exists.")
    k_only = [i for i, c in enumerate(k_spec) if c not in x_spec and c not in out]
    if k_only:
        kernel = kernel.sum(axis=tuple(k_only))
        k_spec = "".join(c for c in k_spec if c in x_spec or c in out)
    shared = [c for c in k_spec if c in x_spec and c in out]
    contracted = [c for c in k_spec if c in x_spec and c not in out]
    produced = [c for c in k_spec if c not in x_spec]
    summed = [c for c in x_spec if c not in k_spec and c not in out]
    order = [k_spec.index(c) for c in shared + produced + contracted]
    blocks = np.transpose(kernel, order).reshape(
        math.prod(sizes[c] for c in shared), math.prod(sizes[c] for c in produced),
        math.prod(sizes[c] for c in contracted))
    return math.sqrt(math.prod(sizes[c] for c in summed)), blocks


def einsum_certificate(layer, input_shape: Sequence[int],
                       output_shape: Sequence[int]) -> LayerCertificate:
    """Certificate of an EinsumDense layer, exact from the structure of its equation.

    Input axes not in the kernel are either kept (an identity factor) or summed (a factor
    ``√size``); axes shared by input, kernel and output index independent blocks; the rest
    contract a kernel block ``M_s``. The norm is ``√(summed size) · max_s ‖M_s‖₂``.

    Args:
        layer: A ``keras.layers.EinsumDense``.
        input_shape: Per-example input shape.
        output_shape: Per-example output shape.

    Returns:
        A :class:`LayerCertificate`.
    """
    x_shape = (1, *input_shape)

    def structured(in_scale, out_scale):
        factor, blocks = _einsum_blocks(layer.equation, len(x_shape), x_shape,
                                        weight_values(layer, layer.kernel))
        return factor * max_singular_value(blocks)

    return LayerCertificate(structured, None, tuple(input_shape), tuple(output_shape), None,
                            "einsum blocks SVD")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution's linear part in canonical form, for the polyphase-FFT certificate.

    The operator maps ``groups · in_per_group`` input channels on a grid ``spatial`` to
    ``groups · out_per_group`` output channels; group ``g`` reads input channels
    ``[g·a, (g+1)·a)`` and writes output channels ``[g·b, (g+1)·b)``.

    Attributes:
        kernel: ``(k_1, …, k_D, groups, a, b)`` float64 taps.
        strides: Stride per spatial axis.
        dilation: Dilation per spatial axis.
        spatial: Spatial input size per axis.
        pointwise: For separable convolutions, the ``(groups·b, c_out)`` pointwise matrix
            applied after the depthwise part; ``None`` otherwise.
        offset: Left zero padding per spatial axis (output ``i`` reads inputs from
            ``s·i − offset``); it does not change the norm, only where a singular vector's
            polyphase components sit (:mod:`tf_lipschitz.starts`).
        adjoint: The layer is the adjoint of this convolution (a transposed convolution).
    """

    kernel: np.ndarray
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    spatial: tuple[int, ...]
    pointwise: np.ndarray | None = None
    offset: tuple[int, ...] | None = None
    adjoint: bool = False

    @property
    def rank(self) -> int:
        return len(self.strides)

    def grid(self) -> tuple[int, ...]:
        """Circular grid per axis, on the polyphase (input / stride) scale.

        ``M = ⌈N/s⌉ + ⌈(K−1)/s⌉`` with ``K = d(k−1)+1`` covers the zero padding for every left
        padding ``0 ≤ p ≤ K−1`` (valid, same, causal and the adjoints of transposed
        convolutions); an axis whose polyphase kernel has a single tap has a constant symbol
        and needs one frequency.
        """
        out = []
        for k, s, d, n in zip(self.kernel.shape[: self.rank], self.strides, self.dilation,
                              self.spatial):
            extent = d * (k - 1) + 1
            single = (extent - 1) // s == 0
            out.append(1 if single else -(-n // s) + -(-(extent - 1) // s))
        return tuple(out)

    def polyphase(self) -> np.ndarray:
        """Kernel ``(Q_1, …, Q_D, groups, b, S·a)`` of the stride-1 conv on polyphase inputs.

        Tap ``j`` reads input ``s·i + j·d``: phase ``r = j·d mod s`` at shift ``q = ⌊j·d/s⌋``.
        (A left padding ``p`` relabels phases and shifts one of them, a unitary change of the
        per-frequency matrices that leaves their singular values unchanged, so ``p = 0``.)
        """
        rank = self.rank
        taps = self.kernel.shape[:rank]
        groups, a, b = self.kernel.shape[rank:]
        qs = [((k - 1) * d) // s + 1 for k, s, d in zip(taps, self.strides, self.dilation)]
        phases = math.prod(self.strides)
        out = np.zeros((*qs, groups, b, phases, a))
        for j in np.ndindex(*taps):
            offsets = [jj * d for jj, d in zip(j, self.dilation)]
            q = tuple(o // s for o, s in zip(offsets, self.strides))
            r = int(np.ravel_multi_index([o % s for o, s in zip(offsets, self.strides)],
                                         self.strides))
            out[q + (slice(None), slice(None), r, slice(None))] = np.swapaxes(
                self.kernel[j], -1, -2)
        return out.reshape(*qs, groups, b, phases * a)

    def taps(self) -> tuple[np.ndarray, np.ndarray]:
        """Polyphase taps ``(Q, groups, rows, cols)`` and their integer shifts ``(Q, D)``.

        For separable convolutions the pointwise matrix is applied to every tap, giving one
        ``c_out × (c_in · S)`` matrix per shift (``groups = 1``).
        """
        poly = self.polyphase()
        qs = poly.shape[: self.rank]
        shifts = np.stack(np.meshgrid(*[np.arange(q) for q in qs], indexing="ij"),
                          axis=-1).reshape(-1, self.rank)
        flat = poly.reshape(len(shifts), *poly.shape[self.rank:])
        if self.pointwise is not None:  # (c_out × groups·b) @ blockdiag_g(b × S·a)
            groups, b = flat.shape[1:3]
            pw = self.pointwise.T.reshape(-1, groups, b)
            flat = np.einsum("ogb,qgbc->qogc", pw, flat).reshape(len(shifts), 1,
                                                                  pw.shape[0], -1)
        keep = np.any(flat != 0, axis=(1, 2, 3))  # shifts without taps (stride > kernel)
        if not keep.any():
            keep[0] = True
        return flat[keep], shifts[keep]


def _frequencies(grid: tuple[int, ...]) -> np.ndarray:
    """Angles ``(F, D)`` of a half grid: ``θ`` and ``−θ`` give conjugate symbols."""
    axes = [np.arange(m) for m in grid]
    halved = [i for i, m in enumerate(grid) if m > 1]
    if halved:
        last = halved[-1]
        axes[last] = np.arange(grid[last] // 2 + 1)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(grid))
    return _TAU * mesh / np.asarray(grid, np.float64)


class _Symbols:
    """Hermitian symbols ``Ĥ(θ)`` (Gram of ``Â(θ)`` on its smaller side), per frequency.

    With taps ``A_q`` at shifts ``q``, ``Â(θ) = Σ_q A_q e^{iθ·q}`` and
    ``Â(θ)ᴴÂ(θ) = Σ_δ R_δ e^{iθ·δ}`` with ``R_δ = Σ_{q'−q=δ} A_qᵀ A_{q'}`` (the kernel's
    autocorrelation): ``R`` is computed once, after which each frequency costs ``#δ · r²``
    instead of a Gram product. Falls back to per-frequency Gram products when ``R`` would not
    fit in memory.
    """

    def __init__(self, taps: np.ndarray, shifts: np.ndarray):
        rows, cols = taps.shape[-2:]
        self.groups = taps.shape[1]
        self.rows_side = rows < cols
        self.side = min(rows, cols)
        self.taps, self.shifts = taps, shifts
        if self.rows_side:  # Â Âᴴ = Σ A_q A_{q'}ᵀ e^{iθ(q−q')}
            taps = np.swapaxes(taps, -1, -2)
            shifts = -shifts
        deltas = (shifts[None, :, :] - shifts[:, None, :]).reshape(-1, shifts.shape[1])
        self.deltas, index = np.unique(deltas, axis=0, return_inverse=True)
        index = index.reshape(len(shifts), len(shifts))
        # tr R_δ = Σ_{q'−q=δ} ⟨A_q, A_{q'}⟩_F, per group: the trace of every symbol, cheaply
        inner = np.einsum("qgij,pgij->qpg", taps, taps)
        self.traces = np.zeros((len(self.deltas), self.groups))
        np.add.at(self.traces, index, inner)
        self.auto = None
        if len(self.deltas) * self.groups * self.side ** 2 * 8 <= 4 * _CHUNK_BYTES:
            auto = np.zeros((len(self.deltas), self.groups, self.side, self.side))
            for q in range(len(shifts)):  # R_δ += A_qᵀ A_{q'} for q' − q = δ
                products = np.matmul(np.swapaxes(taps[q], -1, -2), taps)
                for p in range(len(shifts)):
                    auto[index[q, p]] += products[p]
            self.auto = auto.reshape(len(self.deltas), -1)

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        """Matrices ``(F · groups, side, side)`` for frequencies ``theta`` ``(F, D)``."""
        if self.auto is not None:  # two real products: Σ_δ R_δ (cos θ·δ + i sin θ·δ)
            angle = theta @ self.deltas.T
            h = np.empty((len(theta), self.auto.shape[1]), np.complex128)
            h.real = np.cos(angle) @ self.auto
            h.imag = np.sin(angle) @ self.auto
        else:
            a = np.tensordot(np.exp(1j * (theta @ self.shifts.T)), self.taps, axes=1)
            h = _gram(a.reshape(-1, *self.taps.shape[-2:]))
        return h.reshape(-1, self.side, self.side)

    def trace(self, theta: np.ndarray) -> np.ndarray:
        """``tr Ĥ(θ) = ‖Â(θ)‖_F²`` per frequency and group, ``(F · groups,)``."""
        angle = theta @ self.deltas.T
        return (np.cos(angle) @ self.traces).reshape(-1)


def _conv_bound(spec: ConvSpec, rtol: float) -> float:
    """Max over the grid's frequencies of the polyphase symbol's top singular value."""
    taps, shifts = spec.taps()
    big = float(np.max(np.abs(taps))) if taps.size else 0.0
    if big == 0.0:
        return 0.0
    scale = 2.0 ** math.frexp(big)[1]  # exact rescaling: no overflow or underflow in Gram
    symbols = _Symbols(taps / scale, shifts)
    thetas = _frequencies(spec.grid())
    per_freq = symbols.groups * max(symbols.side ** 2, taps.shape[-1] * taps.shape[-2])
    chunk = max(1, _CHUNK_BYTES // (16 * per_freq))
    groups = symbols.groups

    def matrices(indices):  # flat index = frequency · groups + group
        freqs = np.unique(indices // groups)
        h = symbols(thetas[freqs])
        pos = np.searchsorted(freqs, indices // groups) * groups + indices % groups
        return h if np.array_equal(pos, np.arange(len(h))) else h[pos]

    margin = safety_margin(*taps.shape[-2:])
    lam = _max_eigenvalue(matrices, len(thetas) * groups, chunk * groups, symbols.side, rtol,
                          margin, symbols.trace(thetas))
    return math.sqrt(lam) * (1.0 + margin) * scale


def _conv_spec(layer, input_shape, output_shape, in_scale=None, out_scale=None) -> ConvSpec:
    """The canonical :class:`ConvSpec` of a Keras convolution layer call."""
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    spatial_in = tuple(input_shape[:-1] if channels_last else input_shape[1:])
    spatial_out = tuple(output_shape[:-1] if channels_last else output_shape[1:])
    strides = tuple(int(s) for s in layer.strides)
    dilation = tuple(int(d) for d in layer.dilation_rate)
    kind = _conv_kind(layer)
    offset = _left_padding(layer, spatial_in, spatial_out, strides, dilation)
    if kind == "separable":
        kernel = weight_values(layer, layer.depthwise_kernel)
        pointwise = weight_values(layer, layer.pointwise_kernel)
    else:
        kernel, pointwise = weight_values(layer, layer.kernel), None
    return conv_spec(kind, kernel, strides, dilation, spatial_in, spatial_out, offset,
                     groups=int(getattr(layer, "groups", 1) or 1), pointwise=pointwise,
                     in_scale=in_scale, out_scale=out_scale)


def conv_spec(kind: str, kernel: np.ndarray, strides: Sequence[int], dilation: Sequence[int],
              spatial_in: Sequence[int], spatial_out: Sequence[int],
              offset: Sequence[int] | None, *, groups: int = 1,
              pointwise: np.ndarray | None = None, in_scale=None, out_scale=None) -> ConvSpec:
    """The canonical :class:`ConvSpec` of a convolution given by its parts.

    Args:
        kind: ``"conv"``, ``"depthwise"``, ``"transpose"`` or ``"separable"``.
        kernel: Float64 kernel in Keras' layout for that kind: ``(k…, in/groups, out)``,
            ``(k…, in, multiplier)``, ``(k…, filters, in)``, or the separable layer's depthwise
            kernel (with ``pointwise`` its ``(1…, in·multiplier, out)`` kernel).
        strides: Per spatial axis.
        dilation: Per spatial axis.
        spatial_in: Spatial input size per axis.
        spatial_out: Spatial output size per axis.
        offset: Left zero padding per spatial axis (ignored for ``"transpose"``).
        groups: Groups of a ``"conv"``.
        pointwise: See ``kernel``.
        in_scale: Per-input-channel scale folded into the kernel, or ``None``.
        out_scale: Per-output-channel scale folded into the kernel, or ``None``.
    """
    strides, dilation = tuple(strides), tuple(dilation)
    spatial_in, spatial_out = tuple(spatial_in), tuple(spatial_out)
    rank = len(strides)
    offset = None if offset is None else tuple(offset)
    if kind == "separable":
        dw = _scale_axis(kernel, in_scale, rank)  # (k..., c_in, m)
        pw = pointwise.reshape(-1, pointwise.shape[-1])
        pw = _scale_axis(pw, out_scale, 1)
        return ConvSpec(dw[..., :, None, :], strides, dilation, spatial_in, pointwise=pw,
                        offset=offset)  # groups = c_in, a = 1, b = m
    w = kernel
    if kind == "depthwise":  # (k..., c_in, m): output channel c·m + j; groups = c_in, a = 1
        w = w[..., :, None, :]
        groups, b = w.shape[rank], w.shape[-1]
    elif kind == "transpose":
        # conv_transpose is the adjoint of the forward convolution with the same kernel
        # (k..., filters, c_in) on the transposed layer's output grid: forward input channels
        # are the layer's outputs (``out_scale``), forward outputs its inputs (``in_scale``).
        in_scale, out_scale = out_scale, in_scale
        w, groups, b = w[..., None, :, :], 1, w.shape[-1]
        spatial_in = spatial_out
    else:  # (k..., a, groups·b): group g reads inputs [g·a, (g+1)·a), writes [g·b, (g+1)·b)
        b = w.shape[-1] // groups
        w = np.moveaxis(w.reshape(*w.shape[:rank], w.shape[rank], groups, b), rank + 1, rank)
    a = w.shape[rank + 1]
    if in_scale is not None:
        w = w * np.reshape(np.asarray(in_scale, np.float64), (groups, a, 1))
    if out_scale is not None:
        w = w * np.reshape(np.asarray(out_scale, np.float64), (groups, 1, b))
    if kind == "transpose":
        return ConvSpec(w, strides, dilation, spatial_in, adjoint=True)
    return ConvSpec(w, strides, dilation, spatial_in, offset=offset)


def _same_left_padding(n: int, n_out: int, stride: int, extent: int) -> int:
    """Left padding of TF's ``"same"`` (half the total, rounded down; the rest on the right)."""
    return max((n_out - 1) * stride + extent - n, 0) // 2


def _left_padding(layer, spatial_in, spatial_out, strides, dilation) -> tuple[int, ...]:
    """Left zero padding per axis of a (non-transposed) convolution call, TF conventions."""
    taps = getattr(layer, "kernel_size", None) or (1,) * len(strides)
    extents = [d * (int(k) - 1) + 1 for k, d in zip(taps, dilation)]
    return left_padding(layer.padding, spatial_in, spatial_out, strides, extents)


def left_padding(padding: str, spatial_in: Sequence[int], spatial_out: Sequence[int],
                 strides: Sequence[int], extents: Sequence[int]) -> tuple[int, ...]:
    """Left zero padding per axis of a convolution with ``padding`` ``"same"``, ``"causal"``
    or ``"valid"`` (any case: a Keras layer's or a graph op's), TF conventions; ``extents``
    are the dilated kernel sizes ``d·(k − 1) + 1``."""
    out = []
    for n, n_out, s, extent in zip(spatial_in, spatial_out, strides, extents):
        if padding.lower() == "same":
            out.append(_same_left_padding(n, n_out, s, extent))
        elif padding.lower() == "causal":
            out.append(extent - 1)
        else:
            out.append(0)
    return tuple(out)


def _conv_kind(layer) -> str:
    L = keras.layers
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        return "transpose"
    return "conv"


def conv_certificate(layer, input_shape: Sequence[int], output_shape: Sequence[int],
                     fn: Callable | None = None, *, rtol: float = 1e-3,
                     dense: bool = True, small_grid: bool = True) -> LayerCertificate:
    """Certificate of a convolution: exact when small, polyphase FFT otherwise.

    Covers ``Conv1D/2D/3D`` (any stride, dilation, padding, groups), ``DepthwiseConv1D/2D``,
    ``SeparableConv1D/2D`` and ``Conv1D/2D/3DTranspose``. The structured bound is
    ``max_θ σ_max(Â(θ))`` over the circular grid of :meth:`ConvSpec.grid`, where ``Â(θ)`` is
    the DFT of the polyphase kernel: an upper bound for the zero-padded operator, tight up to
    boundary effects that vanish as the spatial size grows.

    Args:
        layer: The Keras convolution layer.
        input_shape: Per-example input shape of the call.
        output_shape: Per-example output shape of the call.
        fn: The layer's linear part computing in its input dtype (enables the exact dense
            route for small operators).
        rtol: Relative slack of the verified per-frequency bounds.
        dense: Allow the exact dense route for small operators.
        small_grid: Allow the exact block-banded route of :mod:`tf_lipschitz.gridconv` for
            stride-1 convolutions whose FFT bound shows a boundary effect (small grids).

    Returns:
        A :class:`LayerCertificate`.
    """
    input_shape, output_shape = tuple(input_shape), tuple(output_shape)
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"

    def spec(in_scale, out_scale):
        return _conv_spec(layer, input_shape, output_shape, in_scale, out_scale)

    return spec_certificate(spec, input_shape, output_shape, channels_last, fn, rtol=rtol,
                            dense=dense, small_grid=small_grid)


def _spec_bound(conv: ConvSpec, grid_out: Sequence[int], rtol: float = 1e-3,
                small_grid: bool = True) -> float:
    """The polyphase-FFT bound of ``conv``, or the small-grid route's when it applies and is
    tighter (:func:`~tf_lipschitz.gridconv.small_grid_bound`)."""
    bound = _conv_bound(conv, rtol)
    exact = small_grid_bound(conv, grid_out, rtol, safety_margin, bound) if small_grid else None
    return bound if exact is None else exact


def spec_certificate(spec: Callable[[Any, Any], ConvSpec], input_shape: Sequence[int],
                     output_shape: Sequence[int], channels_last: bool = True,
                     fn: Callable | None = None, *, rtol: float = 1e-3, dense: bool = True,
                     small_grid: bool = True,
                     grid_out: Sequence[int] | None = None) -> LayerCertificate:
    """:func:`conv_certificate` of a convolution given by ``spec(in_scale, out_scale)``
    (:func:`conv_spec`), for convolutions that are not Keras layers (graph ops).

    ``grid_out`` is the spatial output size of one image, when the operator's shapes carry a
    batch axis (a graph convolution on the ``B`` images of a ``SpaceToBatchND``, ``I_B ⊗ A``,
    whose norm is that of ``A``); by default it is read from ``output_shape``."""
    input_shape, output_shape = tuple(input_shape), tuple(output_shape)
    spatial_out = tuple(grid_out) if grid_out is not None else (
        output_shape[:-1] if channels_last else output_shape[1:])

    def structured(in_scale, out_scale):
        return _spec_bound(spec(in_scale, out_scale), spatial_out, rtol, small_grid)

    return LayerCertificate(structured, fn if dense else None, input_shape, output_shape,
                            -1 if channels_last else 0, "polyphase FFT", spec)


# ----------------------------------------------------------------------------------------------
# Average pooling
# ----------------------------------------------------------------------------------------------


def _average_matrix(n: int, pool: int, stride: int, padding: str) -> np.ndarray:
    """The 1-D average-pooling matrix (TF semantics: padded entries are not counted)."""
    if padding == "same":
        n_out = -(-n // stride)
        left = _same_left_padding(n, n_out, stride, pool)
    else:
        n_out = (n - pool) // stride + 1
        left = 0
    mat = np.zeros((max(n_out, 0), n))
    for i in range(max(n_out, 0)):
        lo, hi = max(i * stride - left, 0), min(i * stride - left + pool, n)
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


def box_average_matrices(spatial: Sequence[int], pool_size: Sequence[int],
                         strides: Sequence[int], padding: str) -> list[np.ndarray]:
    """The 1-D averaging matrices ``A_d`` (``N_out,d × N_d``) of an average pooling with box
    windows ``pool_size`` on the grid ``spatial`` (TF semantics: with ``"same"`` padding, in
    any case, padded entries are not counted).

    Args:
        spatial: The grid, one size per spatial axis.
        pool_size: Window size per spatial axis.
        strides: Stride per spatial axis.
        padding: ``"valid"`` or ``"same"`` (a Keras layer's or a graph op's spelling).

    Returns:
        One float64 matrix per spatial axis.
    """
    return [_average_matrix(int(n), int(k), int(s), padding.lower())
            for n, k, s in zip(spatial, pool_size, strides)]


def box_average_norm(matrices: Sequence[np.ndarray]) -> float:
    """``Π_d ‖A_d‖₂``: the exact norm of ``I ⊗ A_1 ⊗ … ⊗ A_D`` (float64 rounding aside)."""
    value = 1.0
    for mat in matrices:
        value *= float(np.linalg.norm(mat, 2)) if mat.size else 0.0
    return value


def apply_box_average(x, matrices: Sequence[np.ndarray], channels_last: bool = True):
    """``(I_channels ⊗ A_1 ⊗ … ⊗ A_D) x`` for a batch ``x`` (batch, then channels and spatial
    axes) as one einsum over the spatial axes, in ``x``'s dtype: the average pooling of
    :func:`box_average_matrices`, for dtypes without a pooling kernel (no float64
    ``AvgPool3D`` on CPU)."""
    letters = "defghijk"[:len(matrices)]
    outs = "pqrstuvw"[:len(matrices)]
    spatial_in, spatial_out = "".join(letters), "".join(outs)
    factors = ",".join(o + i for o, i in zip(outs, letters))
    if channels_last:
        equation = f"b{spatial_in}c,{factors}->b{spatial_out}c"
    else:
        equation = f"bc{spatial_in},{factors}->bc{spatial_out}"
    return keras.ops.einsum(equation, x, *[keras.ops.convert_to_tensor(m, x.dtype)
                                          for m in matrices])


def average_pool_matrices(layer, input_shape: Sequence[int]) -> list[np.ndarray]:
    """The 1-D averaging matrices ``A_d`` (``N_out,d × N_d``) of an average-pooling layer.

    The layer's linear map is ``I_channels ⊗ A_1 ⊗ … ⊗ A_D`` on ``input_shape`` (TF semantics:
    with ``"same"`` padding, padded entries are not counted).

    Args:
        layer: A ``keras.layers.AveragePooling1D/2D/3D``.
        input_shape: Per-example input shape.

    Returns:
        One float64 matrix per spatial axis.
    """
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    spatial = input_shape[:-1] if channels_last else input_shape[1:]
    strides = layer.strides if layer.strides is not None else layer.pool_size
    return box_average_matrices(spatial, layer.pool_size, strides, layer.padding)


def average_pool_norm(layer, input_shape: Sequence[int]) -> float:
    """Exact operator norm of an average-pooling layer on ``input_shape``.

    Average pooling acts on every channel alike and its weights factor over the spatial axes
    (windows are boxes and the count of non-padded entries is a product), so the operator is
    ``I_channels ⊗ A_1 ⊗ … ⊗ A_D`` with 1-D averaging matrices ``A_d``
    (:func:`average_pool_matrices`) and its norm is ``Π_d ‖A_d‖₂``.

    Args:
        layer: A ``keras.layers.AveragePooling1D/2D/3D``.
        input_shape: Per-example input shape.

    Returns:
        The norm (a float; exact up to float64 rounding).
    """
    return box_average_norm(average_pool_matrices(layer, input_shape))


def box_average_certificate(matrices: Sequence[np.ndarray]) -> Callable[[], float]:
    """Certified bound of ``I ⊗ A_1 ⊗ … ⊗ A_D``: :func:`box_average_norm` plus a margin for
    the rounding of the per-axis SVDs."""
    value = box_average_norm(matrices) * (1.0 + SAFETY_MARGIN)
    return lambda: value


def average_pool_certificate(layer, input_shape: Sequence[int]) -> Callable[[], float]:
    """Certified bound of an average-pooling layer: :func:`average_pool_norm` plus margin."""
    return box_average_certificate(average_pool_matrices(layer, input_shape))


# ----------------------------------------------------------------------------------------------
# Fused chains
# ----------------------------------------------------------------------------------------------


def _diagonal_scale(bound, node) -> np.ndarray | None:
    """The elementwise scale of a diagonal layer (BatchNormalization, Dropout...), or None."""
    if not getattr(bound, "diagonal", False):
        return None
    ones = tf.ones((1, *node.input_shapes[0]), tf.float64)
    try:
        diag = np.asarray(bound.fn(ones), np.float64)[0]
    except (tf.errors.OpError, TypeError, ValueError):  # no float64 kernel (FusedBatchNorm)
        return None
    return diag if diag.shape == tuple(node.input_shapes[0]) else None


_GRAPH_RESHAPES = frozenset({"Reshape", "ExpandDims", "Squeeze"})


def _is_reshape(node) -> bool:
    """Whether a member only reshapes (row-major, an isometry), by its type: Keras' Reshape
    layer or channels-last Flatten, a graph's Reshape, ExpandDims or Squeeze op."""
    op = node.operation
    if type(op).__module__ == "tf_lipschitz.tfgraph":
        return type(op).__name__ in _GRAPH_RESHAPES
    return isinstance(op, keras.layers.Reshape) or (
        isinstance(op, keras.layers.Flatten)
        and getattr(op, "data_format", "channels_last") == "channels_last")


def _moves_positions(node) -> bool:
    """Whether a member only moves entries between positions, leaving each in its channel
    (last axis), padding with zeros or cropping: a graph's ``SpaceToBatchND`` or
    ``BatchToSpaceND`` whose blocks leave the last axis alone (a dilated convolution's), or a
    ``Pad`` of the spatial axes."""
    return getattr(node.operation, "block_move", None) is not None


def _keeps_channels(node) -> bool:
    """Whether a member is a reshape (:func:`_is_reshape`) that keeps the last axis, so that
    entry ``k`` of its input stays in channel ``k mod C``, or moves positions only
    (:func:`_moves_positions`)."""
    if _moves_positions(node):
        return True
    shape_in, shape_out = tuple(node.input_shapes[0]), tuple(node.output_shapes[0])
    return (_is_reshape(node) and bool(shape_in) and bool(shape_out)
            and shape_in[-1] == shape_out[-1] and math.prod(shape_in) == math.prod(shape_out))


def _per_channel(diag: np.ndarray, axis: int) -> np.ndarray | None:
    """The per-channel vector of a diagonal that is constant over the other axes."""
    moved = np.moveaxis(diag, axis, -1).reshape(-1, diag.shape[axis])
    return moved[0] if np.all(moved == moved[:1]) else None


def _pointwise_matrix(members: Sequence[tuple[Any, Any]],
                      diags: Sequence[np.ndarray | None] | None = None) -> np.ndarray | None:
    """The per-position matrix of a chain of pointwise maps, or ``None``.

    A chain made only of 1×1 stride-1 convolutions (channels last, any groups), Dense layers,
    per-channel scalings (BatchNormalization, Rescaling...) and reshapes that keep the channel
    axis applies one ``C_in × C_out`` matrix ``M`` at every position (``x ↦ x M``): its
    operator norm is ``‖M‖₂``, whatever the grid. MobileNetV2's projection convolution followed
    by the next block's expansion (a linear bottleneck) is such a chain, too large to
    materialise: it was certified by the product of the two norms, 14–36 % above. ``diags``:
    the members' :func:`_diagonal_scale` s when already evaluated.
    """
    if diags is None:
        diags = [_diagonal_scale(b, n) for b, n in members]
    total = None
    rows = None  # scalings before the first matrix: they scale its rows
    kernels = 0
    tail = False  # a reshape moved the channel axis: only reshapes may follow (‖R M‖ = ‖M‖)
    for (bound, node), diag in zip(members, diags):
        # before the first map, or keeping the channels: transparent (a zero padding or a crop
        # around the maps, as SpaceToBatchND and BatchToSpaceND, can only lower the norm)
        if _is_reshape(node) or _moves_positions(node):
            tail = tail or (total is not None and not _keeps_channels(node))
            continue
        if tail:
            return None
        cert = bound.certificate
        if isinstance(cert, LayerCertificate) and cert.matrix is not None:
            matrix = np.asarray(cert.matrix(), np.float64)
            kernels += 1
        elif isinstance(cert, LayerCertificate) and cert.spec is not None:
            spec = cert.spec(None, None)
            rank = spec.rank
            if (cert.channel_axis != -1 or spec.adjoint or spec.pointwise is not None
                    or any(k != 1 for k in spec.kernel.shape[:rank])
                    or any(s != 1 for s in spec.strides)):
                return None
            taps = spec.kernel.reshape(spec.kernel.shape[rank:])  # (groups, a, b)
            groups, a, b = taps.shape
            matrix = np.zeros((groups * a, groups * b))
            for g in range(groups):
                matrix[g * a:(g + 1) * a, g * b:(g + 1) * b] = taps[g]
            kernels += 1
        else:
            if diag is None:
                return None
            channel = _per_channel(diag, -1)
            if channel is None:
                return None
            # a scaling multiplies columns (rows, before any matrix): an n × n diagonal
            # product was 8·10¹¹ flops after VGG16's fc1 (a graph's BiasAdd, scale 1)
            if total is None:
                rows = channel if rows is None else rows * channel
            elif total.shape[1] != channel.shape[0]:
                return None
            else:
                total = total * channel
            continue
        if rows is not None:
            if rows.shape[0] != matrix.shape[0]:
                return None
            matrix, rows = rows[:, None] * matrix, None
        if total is not None and total.shape[1] != matrix.shape[0]:
            return None
        total = matrix if total is None else total @ matrix
    return total if kernels else None


def _block_geometry(node, op_type: str) -> tuple | None:
    """``(blocks, pads)`` of a graph's ``SpaceToBatchND`` / ``BatchToSpaceND`` member."""
    op = node.operation
    if type(op).__module__ != "tf_lipschitz.tfgraph" or type(op).__name__ != op_type:
        return None
    return getattr(op, "block_move", None)


def _undo_space_to_batch(members: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """``members`` with each ``SpaceToBatchND → convolution → BatchToSpaceND`` replaced by the
    dilated convolution it computes, on the original grid.

    TensorFlow computes a dilated convolution (rate ``d``) as a VALID convolution on the
    ``d^D`` sub-grids of the input padded by ``(p₀, p₁)``, interleaved back and cropped by
    ``(c₀, c₁)``: output ``j`` reads inputs ``j + c₀ − p₀ − d·o + d·t`` (``o`` the inner
    convolution's own left padding, ``t`` its taps), a convolution of dilation ``d`` and left
    padding ``p₀ − c₀ + d·o`` on the original grid, certified as the Keras layer is. Bounding
    the inner convolution on the padded sub-grids instead counts the padding as inputs: 3 % above
    on 9×9, far more for large rates on small grids.
    """
    out = list(members)
    i = 0
    while i < len(out) - 2:
        merged = _dilated_triple(out, i)
        if merged is None:
            i += 1
            continue
        start, stop, replacement = merged
        out[start:stop] = [replacement]
        i = start + 1
    return out


def _dilated_triple(out: Sequence[tuple[Any, Any]], i: int) -> tuple[int, int, Any] | None:
    """For a ``SpaceToBatchND`` at ``out[i]`` that starts a dilated convolution (see
    :func:`_undo_space_to_batch`): ``(start, stop, member)``, the member that replaces
    ``out[start:stop]``; ``None`` for anything else."""
    head = _block_geometry(out[i][1], "SpaceToBatchND")
    if head is None:
        return None
    start = i  # a zero padding before the blocks (a causal Conv1D's) adds to theirs
    pad = _block_geometry(out[i - 1][1], "Pad") if i > 0 else None
    if pad is not None and len(pad[1]) == len(head[1]):
        start = i - 1
        head = (head[0], tuple((a + c, b + d) for (a, b), (c, d) in zip(pad[1], head[1])))
    # a Conv1D's ExpandDims after the blocks and Squeeze before them back
    j = i + 2 if _is_reshape(out[i + 1][1]) and _keeps_channels(out[i + 1][1]) else i + 1
    k = j + 2 if j + 2 < len(out) and _is_reshape(out[j + 1][1]) \
        and _keeps_channels(out[j + 1][1]) else j + 1
    if k >= len(out):
        return None
    tail = _block_geometry(out[k][1], "BatchToSpaceND")
    bound, node = out[j]
    cert = bound.certificate
    if (tail is None or head[0] != tail[0] or not isinstance(cert, LayerCertificate)
            or cert.spec is None or cert.channel_axis != -1):
        return None
    merged = _dilated_certificate(cert, head, tail, out[start][1].input_shapes[0],
                                  out[k][1].output_shapes[0])
    if merged is None:
        return None
    node = types.SimpleNamespace(name=node.name, operation=node.operation,
                                 input_shapes=(merged.input_shape,),
                                 output_shapes=(merged.output_shape,))
    return start, k + 1, (dataclasses.replace(bound, certificate=merged), node)


def _dilated_certificate(cert: LayerCertificate, head: tuple, tail: tuple,
                         shape_in: Sequence[int], shape_out: Sequence[int]
                         ) -> LayerCertificate | None:
    """The certificate of ``SpaceToBatchND → cert's convolution → BatchToSpaceND`` as one
    dilated convolution from ``shape_in`` to ``shape_out`` (see :func:`_undo_space_to_batch`),
    or ``None`` when the inner convolution is not a stride-1, undilated one whose spatial axes
    are the blocked ones (plus unit axes of a unit kernel, as a Conv1D's ExpandDims adds)."""
    blocks = head[0]
    spec = cert.spec(None, None)
    rank = spec.rank
    shape_in, shape_out = tuple(shape_in), tuple(shape_out)
    if (spec.adjoint or spec.pointwise is not None or spec.offset is None
            or any(v != 1 for v in (*spec.strides, *spec.dilation))
            or len(shape_in) != len(blocks) + 1 or len(shape_out) != len(blocks) + 1):
        return None
    unit = [a for a in range(rank) if spec.spatial[a] == 1 and spec.kernel.shape[a] == 1]
    unit = unit[:rank - len(blocks)]
    if len(unit) != rank - len(blocks):
        return None
    blocked = [a for a in range(rank) if a not in unit]
    dilation, offset, spatial, grid_out = [1] * rank, list(spec.offset), [1] * rank, [1] * rank
    for axis, d, pad, crop, n_in, n_out in zip(blocked, blocks, head[1], tail[1],
                                               shape_in[:-1], shape_out[:-1]):
        dilation[axis], spatial[axis], grid_out[axis] = d, n_in, n_out
        offset[axis] = pad[0] - crop[0] + d * spec.offset[axis]
        if not 0 <= offset[axis] <= d * (spec.kernel.shape[axis] - 1):
            return None
    inner = cert.spec

    def dilated(in_scale, out_scale):
        return dataclasses.replace(inner(in_scale, out_scale), dilation=tuple(dilation),
                                   spatial=tuple(spatial), offset=tuple(offset))

    def structured(in_scale, out_scale):
        return _spec_bound(dilated(in_scale, out_scale), grid_out)

    return LayerCertificate(structured, None, shape_in, shape_out, -1,
                            "polyphase FFT (dilated)", dilated)


def _conv_then_pointwise(members: Sequence[tuple[Any, Any]],
                         diags: Sequence[np.ndarray | None]) -> float | None:
    """Bound of a convolution followed by a chain of pointwise maps, as one operator, or
    ``None``.

    A depthwise convolution followed by a 1×1 convolution (a SeparableConv2D exported to a
    graph, or a convolution followed by a 1×1 one without activation between) is the
    convolution whose taps are each multiplied by the pointwise matrix: a separable
    :class:`ConvSpec`, certified as the Keras SeparableConv2D is. The product of the two norms
    was up to 30 % above it. Before the convolution only per-channel scalings (folded into it)
    and moves that keep the channels may come; after it, a chain that
    :func:`_pointwise_matrix` reads, whose reshapes keep the channels. ``diags``: the members'
    :func:`_diagonal_scale` s.
    """
    at = next((i for i, (b, _) in enumerate(members)
               if isinstance(b.certificate, LayerCertificate) and b.certificate.spec is not None),
              None)
    if at is None or at == len(members) - 1:
        return None
    cert, node = members[at][0].certificate, members[at][1]
    if cert.channel_axis != -1:
        return None
    in_scale = None
    for (_, head), diag in zip(members[:at], diags):
        if _keeps_channels(head):
            continue
        channel = None if diag is None else _per_channel(diag, -1)
        if channel is None:
            return None
        in_scale = channel if in_scale is None else in_scale * channel
    tail = members[at + 1:]
    if any(_is_reshape(n) and not _keeps_channels(n) for _, n in tail):
        return None
    matrix = _pointwise_matrix(tail, diags[at + 1:])
    if matrix is None:
        return None
    spec = cert.spec(in_scale, None)
    if spec.adjoint:
        return None
    groups, b = spec.kernel.shape[spec.rank], spec.kernel.shape[-1]
    if matrix.shape[0] != (groups * b if spec.pointwise is None else spec.pointwise.shape[1]):
        return None
    pointwise = matrix if spec.pointwise is None else spec.pointwise @ matrix
    combined = dataclasses.replace(spec, pointwise=pointwise)
    return _spec_bound(combined, tuple(node.output_shapes[0])[-1 - spec.rank:-1])


def fold_diagonals(members: Sequence[tuple[Any, Any]],
                   diags: Sequence[np.ndarray | None] | None = None):
    """Folds per-channel diagonal layers of a fused chain into their neighbours' weights.

    Every member whose certificate supports channel scales (``channel_axis`` not ``None``)
    absorbs the adjacent runs of per-channel diagonal layers (BatchNormalization, Rescaling,
    Normalization, LayerScale) on both sides.

    Args:
        members: ``(Linear bound, graph node)`` pairs of the chain, in order.
        diags: The members' per-entry diagonal scales when already evaluated (``None`` for a
            member that is not a diagonal scaling); evaluated here otherwise.

    Returns:
        ``(folds, used)``: ``(member index, input scale, output scale)`` per absorbing member
        (scales ``None`` when nothing was folded on that side), and per member whether it is
        accounted for by a fold.
    """
    if diags is None:
        diags = [_diagonal_scale(b, n) for b, n in members]
    used = [False] * len(members)
    folds = []
    for i, (bound, node) in enumerate(members):
        cert = bound.certificate
        if not isinstance(cert, LayerCertificate) or cert.channel_axis is None:
            continue
        scales = []  # input side (layers before), then output side (layers after)
        for step in (-1, 1):
            vec, j, passed = None, i + step, []
            while 0 <= j < len(members) and not used[j]:
                if diags[j] is None:
                    # a reshape that keeps the last axis (a graph's ExpandDims/Squeeze around
                    # a Conv1D) keeps every entry's channel: scales fold across it
                    if cert.channel_axis == -1 and _keeps_channels(members[j][1]):
                        passed.append(j)
                        j += step
                        continue
                    break
                ch = _per_channel(diags[j], cert.channel_axis)
                if ch is None:
                    break
                vec = ch if vec is None else vec * ch
                for k in (*passed, j):  # the reshapes passed are isometries: factor 1
                    used[k] = True
                passed = []
                j += step
            scales.append(vec)
        folds.append((i, scales[0], scales[1]))
        used[i] = True
    return folds, used


def _chain_exact(members: Sequence[tuple[Any, Any]], input_shape: tuple[int, ...],
                 output_shape: tuple[int, ...]) -> float:
    """Exact float64 bound of a fused chain: materialised from its smaller side, or, beyond
    :data:`CHAIN_DENSE_FACTOR` times the dense limit, from its Gram matrix
    (:func:`_float64_gram_bound`).

    Raises:
        _Float64Unavailable: A member does not compute in float64 (see
            :func:`_float64_matrix`).
    """
    ops_ = [LinearOperator(b.fn, tuple(n.input_shapes[0]), name=n.name, dtype="float64")
            for b, n in members]
    fn, layers = compose(ops_).fn, [n.operation for _, n in members]
    if _chain_route(input_shape, output_shape) == "gram":
        return _float64_gram_bound(fn, input_shape, output_shape, layers)
    matrix = _float64_matrix(fn, input_shape, output_shape, layers)
    return max_singular_value(matrix[None], method="exact")


def _chain_exact_or_why(members, shapes) -> tuple[float | None, "_Float64Unavailable | None"]:
    """``(_chain_exact(...), None)``, or ``(None, the reason)`` when the chain does not
    compute in float64."""
    try:
        return _chain_exact(members, *shapes), None
    except _Float64Unavailable as err:
        return None, err


def fused_certificate(members: Sequence[tuple[Any, Any]]) -> float | None:
    """Certified bound on the norm of a fused chain of affine layers.

    A single layer with a closed-form norm (average pooling, isometries, products with
    constants) keeps its closed form: it is exact already. Other small chains are materialised
    in float64 and bounded exactly (a chain of closed forms, such as a graph's batch
    normalisation ``Mul`` then ``Add``, by the smaller of that bound and their product, which
    is exact without the dense route's rounding margin). Otherwise, or when a member cannot
    compute in float64 (a user layer adding a float32 variable, an op without a float64
    kernel): a graph's
    ``SpaceToBatchND → conv → BatchToSpaceND`` becomes the dilated convolution it computes
    (:func:`_undo_space_to_batch`); a chain of pointwise maps is bounded by its per-position
    matrix (:func:`_pointwise_matrix`); otherwise per-channel diagonal layers
    (BatchNormalization, Rescaling, Normalization) are folded into the adjacent layer's weights
    (``‖diag(γ/σ) ∘ conv‖`` instead of ``max|γ/σ| · ‖conv‖``) and the remaining factors are
    multiplied (``‖AB‖ ≤ ‖A‖‖B‖``), or, when smaller, a convolution followed by pointwise maps
    is bounded as one separable operator (:func:`_conv_then_pointwise`). When that would
    multiply two factors or more (a Resizing then a convolution: 22-56 % above the chain's
    norm), or a member has no certificate, a chain whose smaller side is at most
    :data:`DENSE_SIDE_LIMIT` is still materialised, up to :data:`CHAIN_DENSE_FACTOR` times
    the dense limit, and bounded exactly; beyond that a chain with few inputs is bounded
    through its Gram matrix (:data:`CHAIN_GRAM_SIDE`, :data:`CHAIN_GRAM_LIMIT`).

    Args:
        members: ``(Linear bound, graph node)`` pairs of the chain, in order.

    Returns:
        The certified bound, or ``None`` if some member has no certificate (with a warning
        when the dense route was skipped because the chain does not compute in float64).
    """
    first, last = members[0][1], members[-1][1]
    closed = None  # every member in closed form: the product, exact for one scaling and offsets
    if all(b.norm is not None and b.certificate is not None for b, _ in members):
        closed = math.prod(float(b.certificate()) for b, _ in members)
        if len(members) == 1:
            return closed
    shapes = (tuple(first.input_shapes[0]), tuple(last.output_shapes[0]))
    skipped = None
    if _small(*shapes):
        exact, skipped = _chain_exact_or_why(members, shapes)
        if exact is not None:
            return exact if closed is None else min(exact, closed)
    chain, members = members, _undo_space_to_batch(members)
    diags = [_diagonal_scale(b, n) for b, n in members]  # evaluated once for the routes below
    pointwise = _pointwise_matrix(members, diags)
    if pointwise is not None:  # the same matrix at every position: its norm
        return max_singular_value(pointwise[None])
    combined = _conv_then_pointwise(members, diags)
    folds, used = fold_diagonals(members, diags)
    missing = next((n for (b, n), u in zip(members, used) if not u and b.certificate is None),
                   None)
    # The chain itself, materialised up to a few times the dense limit, when the alternative
    # is a product of two factors or more (a Resizing then a convolution: 22-56 % above the
    # chain's norm; a convolution between a zero padding and a crop, 1 · ‖conv‖ · 1: 4.6 %)
    # or a member has no certificate.
    whole = skipped is None and _chain_route(*shapes) is not None
    if missing is None:
        factors = [members[i][0].certificate.scaled(a, b) for i, a, b in folds]
        factors += [float(b.certificate()) for (b, _), u in zip(members, used) if not u]
        bound = math.prod(factors) if combined is None else min(math.prod(factors), combined)
    else:
        factors, bound = [], combined
    if whole and (missing is not None or (len(factors) >= 2 and any(f != 1.0 for f in factors))):
        exact, skipped = _chain_exact_or_why(chain, shapes)
        if exact is not None:
            return exact if bound is None else min(exact, bound)
    if bound is None and skipped is not None:
        warnings.warn(
            f"Certified mode: '{'+'.join(n.name for _, n in members)}' was not "
            f"materialised in float64 for an exact bound because {skipped}, and "
            f"'{missing.name}' has no certificate of its own, so this factor stays an "
            "estimate (the report is not certified). A layer of your own can be made "
            "to compute in the dtype of its input (`ops.cast(w, x.dtype)`, or "
            "`ops.add(y, self.b)` instead of `y + self.b`); a TensorFlow op without a "
            "float64 kernel (FusedBatchNormV3 on CPU) cannot be certified this way.",
            stacklevel=2,
        )
    return bound
