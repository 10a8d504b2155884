"""Autodiff power method, Lanczos and subspace iteration for the spectral norm of linear maps.

For a linear map ``h`` (a layer with its bias removed, or a chain of such layers), the gradient
of ``½‖h(v)‖²`` with respect to ``v`` is ``JᵀJ v``. Iterating on that product needs nothing but
``tf.GradientTape``, so the same code measures dense layers, convolutions of any stride, padding
and dilation, transposed convolutions, pooling, and whole chains of them, on the *real* input
shape of the layer in the model (Scaman & Virmaux, NeurIPS 2018, Algorithm 2).

All operators of a model are iterated together inside one compiled ``tf.function``. Each
operator stops on the relative residual of its top pair (Lanczos: its Ritz residual), which puts
a singular value within the asked relative tolerance of ``σ``; the result records the number of
operator products used and the relative residual ``‖JᵀJv − σ²v‖ / σ²``.

An iterative estimate converges **from below**: ``sigma`` is a lower bound on the true
operator norm up to floating point, never a certified upper bound. Certified bounds live in
:mod:`tf_lipschitz.certify`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tf_lipschitz.errors import InvalidArgumentError, LipschitzError
from tf_lipschitz.operators import LinearOperator, bind_adjoint

__all__ = [
    "SpectralResult",
    "SpectralSolver",
    "spectral_norm",
    "top_singular_triplets",
    "jtj_product",
]

METHODS = ("power", "lanczos")


@dataclasses.dataclass(frozen=True)
class SpectralResult:
    """Outcome of an iterative spectral-norm computation for one operator.

    Attributes:
        sigma: Estimated largest singular value (a lower bound up to floating point).
        vector: Unit right singular vector, shaped like one input example.
        products: Number of ``JᵀJ v`` products used.
        residual: Relative residual ``‖JᵀJv − σ²v‖ / σ²`` at ``vector``.
        converged: Whether the relative tolerance was met before the cap.
        method: ``"power"`` or ``"lanczos"``.
    """

    sigma: float
    vector: np.ndarray
    products: int
    residual: float
    converged: bool
    method: str

    def to_dict(self) -> dict:
        return {
            "sigma": self.sigma,
            "products": self.products,
            "residual": self.residual,
            "converged": self.converged,
            "method": self.method,
        }


MAX_TOL = 0.1


def compiled(fn: Callable, **options: Any) -> Callable:
    """``tf.function(fn, autograph=False, **options)`` that is traced once per model.

    The solvers, lower-bound searches and wrapper updates are traced anew for every model (or
    layer) they serve, as intended; TensorFlow counts those traces per Python function across
    models and warned "triggered tf.function retracing" from the fifth model in a process.
    """
    function = tf.function(fn, autograph=False, **options)
    function._omit_frequent_tracing_warning = True  # TensorFlow's own switch for that warning
    return function


def check_tol(tol: Any, name: str = "tol", default: float = 1e-6) -> float:
    """Validates a relative accuracy asked of a spectral solver.

    Args:
        tol: The value received.
        name: The argument's name, for the message.
        default: The argument's default, for the message.

    Returns:
        ``tol`` as a float.

    Raises:
        InvalidArgumentError: Unless ``0 < tol <= MAX_TOL`` (a larger tolerance lets an estimate
            stop far below the norm: ``tol=0.9`` gave 2.1 for 4.6).
    """
    try:
        value = float(tol)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= MAX_TOL:  # NaN and inf fail too
        raise InvalidArgumentError(
            f"{name} is the relative accuracy asked of the spectral solver and must lie in "
            f"(0, {MAX_TOL:g}]; received {name}={tol!r}. The default is {default:g}; 1e-4 is a "
            "fast, still accurate choice.")
    return value


def check_int(value: Any, name: str, *, minimum: int, maximum: int | None = None,
              hint: str = "") -> int:
    """Validates an integer argument (a count, a cap, a size).

    Args:
        value: The value received.
        name: The argument's name, for the message.
        minimum: Smallest accepted value.
        maximum: Largest accepted value (``None``: no limit).
        hint: What to do, appended to the message.

    Returns:
        ``value`` as an ``int`` (an integral float such as ``1e4`` is accepted).

    Raises:
        InvalidArgumentError: Unless ``value`` is an integer in ``[minimum, maximum]``.
    """
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if (integral and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum)):
        return int(value)
    accepted = (f"an integer >= {minimum}" if maximum is None
                else f"an integer in [{minimum}, {maximum}]")
    raise InvalidArgumentError(
        f"{name} must be {accepted}; received {name}={value!r}." + (f" {hint}" if hint else ""))


def as_shape(value: Any) -> tuple[int, ...] | None:
    """A shape given as a tuple, list, NumPy array or ``tf.TensorShape`` of positive integers
    (NumPy integers included), as a tuple of ``int``; ``None`` if it is not one."""
    if isinstance(value, tf.TensorShape):
        value = value.as_list() if value.rank is not None else None
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (tuple, list)):
        return None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
               for d in value):
        return None
    return tuple(int(d) for d in value)


def check_choice(value: Any, name: str, choices: Sequence[str], hint: str = "") -> str:
    """Validates an argument that takes one of a few strings.

    Args:
        value: The value received.
        name: The argument's name, for the message.
        choices: The accepted strings.
        hint: What to do, appended to the message.

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: Unless ``value`` is one of ``choices``.
    """
    if isinstance(value, str) and value in choices:
        return value
    raise InvalidArgumentError(
        f"{name} must be one of {', '.join(repr(c) for c in choices)}; received "
        f"{name}={value!r}." + (f" {hint}" if hint else ""))


def keyword_names(fn: Callable, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The public keyword arguments of ``fn``, minus ``exclude`` (those a caller sets itself)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind in kinds and name != "self" and not name.startswith("_")
                 and name not in exclude)


def check_keywords(given: Mapping[str, Any], accepted: Sequence[str], where: str) -> None:
    """Refuses keyword arguments that ``where`` would forward to a function without them.

    Args:
        given: The keyword arguments received.
        accepted: The names accepted (see :func:`keyword_names`).
        where: The public entry point, for the message (``"LipschitzEstimator.seqlip()"``).

    Raises:
        InvalidArgumentError: Naming each unknown keyword (with the closest accepted one) and
            the accepted keywords.

    Example:
        >>> try:
        ...     check_keywords({"topk": 3}, ("top_k",), "f()")
        ... except InvalidArgumentError as err:
        ...     print(err)
        f() received unknown keyword argument 'topk' (did you mean 'top_k'?); it accepts top_k.
    """
    unknown = [name for name in given if name not in accepted]
    if not unknown:
        return
    described = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), accepted, n=1)
        described.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise InvalidArgumentError(
        f"{where} received unknown keyword argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(described)}; it accepts {', '.join(accepted)}.")


def jtj_product(fn: Callable[[tf.Tensor], tf.Tensor], v: tf.Tensor,
                adjoint: Callable[[tf.Tensor], tf.Tensor] | None = None
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns ``(h(v), JᵀJ v)`` for a linear ``fn`` by one forward and one backward pass.

    ``v`` carries a leading batch axis; each example is treated independently, which is what
    every Keras layer does at inference. The backward pass is ``adjoint`` when given (the
    explicit transpose of ``fn``), otherwise autodiff: the gradient of ``½‖fn(v)‖²``.
    """
    if adjoint is not None:
        out = fn(v)
        return out, adjoint(out)
    with tf.GradientTape() as tape:
        tape.watch(v)
        out = fn(v)
        energy = 0.5 * tf.reduce_sum(tf.square(out))
    return out, tape.gradient(energy, v)


def _unit(v: tf.Tensor) -> tf.Tensor:
    norm = tf.norm(tf.reshape(v, [-1]))
    return v / tf.maximum(norm, tf.cast(1e-30, v.dtype))


def _dot(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(a * b)


def _product(fn, v, adjoint, first, i):
    """``JᵀJ v`` for the loops: ``first`` (the product at the start, already computed by
    :func:`prepare_operator` with the forward pass that measured the scale) at step ``i = 0``."""
    if first is None:
        return jtj_product(fn, v, adjoint)[1]
    return tf.cond(i > 0, lambda: jtj_product(fn, v, adjoint)[1], lambda: first)


def power_loop(fn, v0, tol, max_products, adjoint=None, first=None):
    """Plain power iteration on ``JᵀJ`` from ``v0`` (shape ``(1, *input_shape)``).

    Stops, as :func:`lanczos_loop` does, when the relative residual ``‖JᵀJv − θv‖ / θ`` of the
    Rayleigh quotient ``θ = vᵀJᵀJv`` is at most ``tol(2 − tol)``: some singular value is then
    within ``tol · √θ`` of ``√θ``, and the returned iterate (one step further) has a Rayleigh
    quotient at least ``θ``. The residual costs no product (it uses the one the step computes).
    The change of ``θ`` between iterations is no accuracy: on a clustered spectrum ``θ`` creeps
    up by far less than its distance to the top (a stop on a change of ``1e-6`` reported
    ``1 − 1.1e-4`` as converged for singular values 1, 0.99999, 0.9999, …). Tolerances below
    ``8 ε`` of the dtype are raised to it: the residual is computed in the working precision,
    and at converged float32 vectors of convolutions up to 64×64×32 it was 1–2.3 ``ε``.

    Args:
        fn: The linear map (batch axis first).
        v0: Start vector, shape ``(1, *input_shape)``.
        tol: Relative accuracy asked of ``σ`` (scalar tensor).
        max_products: Cap on ``JᵀJ`` products (scalar tensor).
        adjoint: Explicit transpose of ``fn`` (see :func:`jtj_product`), or ``None``.
        first: ``JᵀJ v₀`` for the unit ``v₀`` when already computed (:func:`prepare_operator`),
            used as the first product; it counts as one.

    Returns:
        ``(last iterate, products used, converged)``.
    """
    dtype = v0.dtype
    tiny = tf.cast(1e-30, dtype)
    tol = tf.maximum(tf.cast(tol, tf.float64), 8.0 * float(np.finfo(dtype.as_numpy_dtype).eps))
    tol = tf.cast(tol * (2.0 - tol), dtype)

    def cond(i, v, done, bad):
        return tf.logical_and(i < max_products, tf.logical_not(done))

    def body(i, v, done, bad):
        g = _product(fn, v, adjoint, first, i)
        s2 = _dot(v, g)
        gnorm = tf.norm(tf.reshape(g, [-1]))
        v_new = tf.where(gnorm > tiny, g / tf.maximum(gnorm, tiny), v)
        resid = tf.norm(tf.reshape(g - s2 * v, [-1])) / tf.maximum(s2, tiny)
        bad = tf.logical_not(tf.math.is_finite(gnorm))
        return i + 1, v_new, tf.logical_or(resid <= tol, bad), bad

    i, v, done, bad = tf.while_loop(
        cond, body, (tf.constant(0), _unit(v0), tf.constant(False), tf.constant(False)))
    return _nan_if(bad, v), i, tf.logical_and(done, tf.logical_not(bad))


def _nan_if(bad: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """``v``, or NaN everywhere when an iteration met a non-finite product: the caller's σ is
    then NaN (and :meth:`SpectralSolver.run` names the operator), never a value computed from a
    truncated iteration."""
    return tf.where(bad, tf.fill(tf.shape(v), tf.constant(np.nan, v.dtype)), v)


def _set_row(matrix: tf.Tensor, index: tf.Tensor, row: tf.Tensor, xla: bool) -> tf.Tensor:
    """``matrix`` with row ``index`` replaced (a copy).

    On CPU, ``tensor_scatter_nd_update`` of a row of a large Krylov basis costs about as much as
    a convolution product; ``InplaceUpdate`` copies the buffer at memory speed and writes the
    row. XLA has no kernel for it but compiles the scatter to an in-place update.
    """
    if xla:
        return tf.tensor_scatter_nd_update(matrix, [[index]], row[None])
    return tf.raw_ops.InplaceUpdate(x=matrix, i=tf.reshape(index, [1]), v=row[None])


def lanczos_loop(fn, v0, tol, max_products, krylov_dim, keep=None, xla=False, adjoint=None,
                 first=None):
    """Thick-restart Lanczos on ``JᵀJ`` with full re-orthogonalisation.

    Each cycle extends an orthonormal basis to ``krylov_dim`` vectors with ``JᵀJ`` products,
    forms the projected matrix ``T = Qᵀ JᵀJ Q`` (its entries come straight from the
    re-orthogonalisation coefficients), and restarts from its ``keep`` largest Ritz vectors plus
    the last residual direction (Wu & Simon's thick restart). Keeping several Ritz vectors
    matters when the top singular values are clustered, as in convolutions: a restart from the
    top Ritz vector alone throws away the component of the true top vector that the others
    carry, and can stop on the second singular value. After every product it tests the relative
    Ritz residual ``ρ = β_j |y_j| / θ`` of the top pair, and stops when some singular value is
    then provably within ``tol · σ`` of ``σ = √θ`` (``ρ ≤ tol(2 − tol)``). ``max_products`` is a
    hard cap: a cycle stops where the budget ends.

    Gap-based (quadratic) error estimates stop much earlier on the clustered spectra of
    convolutions but are not safe: the gap between Ritz values overestimates the true gap
    while a cluster is unresolved, and on a synthetic spectrum with 30 singular values within
    6e-4 such a stop returned a value 2.7e-4 low for ``tol=1e-4`` (see the test
    ``test_clustered_spectrum_is_not_stopped_early``).

    Args:
        fn: The linear map (batch axis first).
        v0: Start vector, shape ``(1, *input_shape)``.
        tol: Relative accuracy asked of ``σ`` (scalar tensor).
        max_products: Cap on ``JᵀJ`` products (scalar tensor), never exceeded.
        krylov_dim: Basis size ``m`` (Python int, ``>= 2``).
        keep: Ritz vectors kept at a restart (Python int, ``1 <= keep < m``; default ``m // 2``).
        xla: Build for XLA compilation (``jit_compile=True``, or a Keras train step that may be
            compiled).
        adjoint: Explicit transpose of ``fn`` (see :func:`jtj_product`), or ``None``.
        first: ``JᵀJ v₀`` for the unit ``v₀`` when already computed (:func:`prepare_operator`),
            used as the first product; it counts as one.

    Returns:
        ``(top Ritz vector, products used, converged)``.
    """
    dtype = v0.dtype
    shape = tf.shape(v0)
    n = tf.size(v0)
    m = int(krylov_dim)
    k = max(1, min(m - 1, m // 2 if keep is None else int(keep)))
    tiny = tf.cast(1e-30, dtype)
    eps = float(np.finfo(dtype.as_numpy_dtype).eps)
    # A residual below the working precision is not attainable: the couplings of kept Ritz
    # vectors carry rounding noise of order eps, so stop there instead of stalling.
    tol = tf.maximum(tf.cast(tol, tf.float64), tf.constant(eps, tf.float64))
    # A relative residual ρ on θ = σ² puts a singular value σ' within ρ/(1 + √(1 − ρ)) · σ
    # of σ = √θ (|σ'² − σ²| ≤ ρσ² and σ' ≥ σ√(1 − ρ)); ρ = tol(2 − tol) makes that exactly tol.
    tol = tol * (2.0 - tol)
    breakdown = tf.cast(100 * eps, dtype)

    def ritz(tri):
        """Eigen-decomposition of the projected matrix held in ``tri``."""
        # ``tri`` holds columns as rows: tri[j, i] = q_iᵀ JᵀJ q_j for i <= j, tri[j, j+1] = β_j;
        # rows not reached yet are zero. After a restart the kept Ritz values sit on the
        # diagonal of the first rows; their couplings to the residual direction come from the
        # next column's coefficients.
        upper = tf.linalg.band_part(tf.transpose(tri[:, :m]), 0, -1)  # (m, m), i <= j
        sym = upper + tf.transpose(upper) - tf.linalg.diag(tf.linalg.diag_part(upper))
        return tf.linalg.eigh(sym)

    def cycle(start, basis, tri, budget):
        """Extends the basis from row ``start`` towards ``m`` rows with at most ``budget``
        products, testing convergence after every product; returns the last row reached and the
        Ritz data."""
        end = tf.minimum(m, start + budget)

        def step(j, basis, tri, scale, converged, bad):
            qj = basis[j]
            # Row 0 is filled only in the first cycle (later ones start at row k >= 1).
            w = tf.reshape(_product(fn, tf.reshape(qj, shape), adjoint, first, j), [-1])
            # A product that is not finite (inf/NaN weights, or constants whose product
            # overflows in the autodiff graph) ends the iteration as a breakdown; the final
            # residual is then not finite and SpectralSolver.run names the operator.
            finite = tf.math.is_finite(tf.norm(w))
            w = tf.cond(finite, lambda: w, lambda: tf.zeros_like(w))
            scale = tf.maximum(scale, tf.norm(w))
            # Full re-orthogonalisation; the coefficients are the entries Q_iᵀ JᵀJ q_j of the
            # projected matrix (rows beyond j are still zero). A local pass first removes the
            # two large Lanczos components, along q_j and q_{j-1}; one pass (two GEMVs) over
            # the basis then removes the rest and cancels little, so a second basis pass
            # (memory-bound: about half a product on large inputs) is rarely needed. Further
            # passes still run while the previous one cancelled much (Kahan-Parlett/DGKS):
            # float32 dot products over millions of entries are off by ~1e-7 of the vector's
            # norm, which matters when a pass leaves only a small fraction of it (starts that
            # are almost an eigenvector, the first step after a restart). Without XLA the
            # passes read only the rows filled so far (a leading slice): about a quarter less
            # traffic on average over a restart cycle.
            filled = basis if xla else basis[:j + 1]

            def project(w, h):
                h2 = tf.linalg.matvec(filled, w)
                w = w - tf.matmul(h2[None], filled)[0]
                return w, h + (h2 if xla else tf.pad(h2, [[0, m - j]]))

            rows = tf.stack([tf.maximum(j - 1, 0), j])
            local = tf.gather(basis, rows)
            c = tf.linalg.matvec(local, w) * tf.stack(
                [tf.cast(j > 0, dtype), tf.ones([], dtype)])
            w = w - tf.matmul(c[None], local)[0]
            h = tf.tensor_scatter_nd_add(tf.zeros([m + 1], dtype), rows[:, None], c)
            norm_in = tf.norm(w)
            w, h = project(w, h)
            for _ in range(2):
                norm_prev, norm_in = norm_in, tf.norm(w)
                w, h = tf.cond(norm_in < 0.7071 * norm_prev, lambda w=w, h=h: project(w, h),
                               lambda w=w, h=h: (w, h))
            beta = tf.norm(w)
            # Breakdown: the Krylov space is invariant (up to rounding). A rounding-noise vector
            # would break orthogonality, so the basis stops growing.
            broken = beta <= breakdown * scale
            beta = tf.where(broken, tf.zeros_like(beta), beta)
            q_next = tf.where(broken, tf.zeros_like(w), w / tf.maximum(beta, tiny))
            basis = _set_row(basis, j + 1, q_next, xla)
            column = tf.tensor_scatter_nd_update(h, [[j + 1]], beta[None])  # rows 0..m
            tri = tf.tensor_scatter_nd_update(tri, [[j]], tf.cast(column, tf.float64)[None])
            # Ritz residual β_j |y_j| / θ of the top pair of the leading (j+1)-block: a small
            # eigh per product, negligible against the product itself.
            evals, evecs = ritz(tri)
            resid = tf.abs(tf.cast(beta, tf.float64) * evecs[j, -1]) / tf.maximum(
                tf.abs(evals[-1]), 1e-300)
            bad = tf.logical_not(finite)
            return j + 1, basis, tri, scale, tf.logical_or(resid <= tol, bad), bad

        j, basis, tri, _, converged, bad = tf.while_loop(
            lambda j, basis, tri, scale, converged, bad: tf.logical_and(
                j < end, tf.logical_not(converged)),
            step, (start, basis, tri, tf.zeros([], dtype), tf.constant(False),
                   tf.constant(False)))
        evals, evecs = ritz(tri)
        return j, basis, evals, evecs, converged, bad

    def body(i, start, basis, tri, done, bad):
        j, basis, evals, evecs, converged, bad = cycle(start, basis, tri, max_products - i)
        # Thick restart: the top k Ritz vectors, then the residual direction q_{m+1}. (When the
        # loop ends, converged or at the cap, only the first row, the top Ritz vector, is used.)
        top = evecs[:, ::-1][:, :k]  # (m, k), largest first
        ritz_vectors = tf.linalg.matmul(tf.cast(top, dtype), basis[:m], transpose_a=True)
        new_basis = tf.concat(
            [ritz_vectors, basis[m:m + 1], tf.zeros(tf.stack([m - k, n]), dtype)], 0)
        diag = tf.concat([evals[::-1][:k], tf.zeros([m + 1 - k], tf.float64)], 0)
        new_tri = tf.linalg.diag(diag)[:m, :]  # (m, m + 1): kept Ritz values on the diagonal
        return i + (j - start), tf.constant(k), new_basis, new_tri, converged, bad

    q = tf.reshape(_unit(v0), [-1])
    basis0 = tf.concat([q[None], tf.zeros(tf.stack([m, n]), dtype)], 0)
    tri0 = tf.zeros([m, m + 1], tf.float64)

    def cond(i, start, basis, tri, done, bad):
        return tf.logical_and(i < max_products, tf.logical_not(done))

    i, _, basis, _, done, bad = tf.while_loop(
        cond, body, (tf.constant(0), tf.constant(0), basis0, tri0, tf.constant(False),
                     tf.constant(False)))
    return tf.reshape(_nan_if(bad, basis[0]), shape), i, tf.logical_and(done, tf.logical_not(bad))


# Unit roundoff of the half-precision dtypes: their operators are iterated in float32, and
# their products carry that rounding.
HALF_ROUNDING = {tf.float16: 2.0 ** -10, tf.bfloat16: 2.0 ** -7}


def dtype_eps(dtype) -> float:
    """Machine epsilon of a floating-point dtype (0 for other dtypes)."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        return 0.0
    return HALF_ROUNDING.get(dtype) or float(np.finfo(dtype.as_numpy_dtype).eps)


def example_norms(t: tf.Tensor) -> tf.Tensor:
    """Euclidean norm of each example of the batch ``t`` (first axis), free of overflow.

    Each example is divided by a power of two near its largest entry before its squares are
    summed: the plain sum of squares underflows to 0 in float32 below about ``1e-19``, overflows
    above about ``1e19``, and in float16 above 256. The division is exact, so the norm is
    bitwise the plain one wherever that neither overflows nor underflows. Half-precision
    examples are summed in float32. An example of zeros has norm 0; one with inf/NaN entries a
    norm that is not finite.

    Args:
        t: A batch, shape ``(batch, ...)``.

    Returns:
        The norms, shape ``(batch,)``, in the dtype of ``t``.

    Example:
        >>> import tensorflow as tf
        >>> [float(n) for n in example_norms(tf.constant([[3e25, 4e25], [0.0, 0.0]])) / 1e25]
        [5.0, 0.0]
    """
    given = t.dtype
    flat = tf.reshape(tf.cast(t, tf.float32) if given in HALF_ROUNDING else t,
                      [tf.shape(t)[0], -1])
    peak = tf.reduce_max(tf.abs(flat), axis=1)
    usable = tf.logical_and(peak > 0, tf.math.is_finite(peak))
    exponent = tf.floor(tf.math.log(tf.where(usable, peak, tf.ones_like(peak))) / np.log(2.0))
    unit = tf.pow(tf.constant(2.0, flat.dtype), exponent)
    norms = unit * tf.sqrt(tf.reduce_sum(tf.square(flat / unit[:, None]), axis=1))
    return tf.cast(norms, given)


def _retyped(fn, adjoint, fn_in, fn_out, dtype):
    """``fn`` (taking ``fn_in``, returning ``fn_out``) and ``adjoint`` as maps of ``dtype``:
    inputs cast to what each side takes, outputs cast to ``dtype``."""

    def cast_fn(x):
        return tf.cast(fn(tf.cast(x, fn_in)), dtype)

    def cast_adjoint(y):
        return tf.cast(adjoint(tf.cast(y, fn_out)), dtype)

    return cast_fn, (None if adjoint is None else cast_adjoint)


def _consistency_slack(dtype) -> float:
    """Relative disagreement allowed between ``vᵀJᵀJv`` and ``‖Jv‖²`` for a ``dtype`` operator:
    1 %, or the rounding of half-precision products (16 units)."""
    return max(1e-2, 16 * HALF_ROUNDING.get(tf.as_dtype(dtype), 0.0))


@dataclasses.dataclass(frozen=True)
class PreparedOperator:
    """A linear map ready for the iterations (see :func:`prepare_operator`).

    Attributes:
        fn: The map divided by ``scale``, on inputs of the iteration dtype (float32 for a
            half-precision operator, else the operator's own).
        adjoint: Its transpose, likewise, or ``None``.
        start: The start vector in the iteration dtype, as given (not normalised).
        scale: The power of two ``s`` (float64 scalar tensor); multiply norms of ``fn`` by it.
        start_norm: ``‖fn(v₀)‖`` of the scaled map at the unit start (float64; 0 when that is
            zero or not finite).
        first: ``JᵀJ v₀`` of ``fn`` at the unit start, when asked for, else ``None``.
        dtype: The operator's own dtype.
    """

    fn: Callable[[tf.Tensor], tf.Tensor]
    adjoint: Callable[[tf.Tensor], tf.Tensor] | None
    start: tf.Tensor
    scale: tf.Tensor
    start_norm: tf.Tensor
    first: tf.Tensor | None
    dtype: tf.DType

    @property
    def slack(self) -> float:
        """Relative disagreement allowed between ``vᵀJᵀJv`` and ``‖Jv‖²``
        (:func:`_consistency_slack`)."""
        return _consistency_slack(self.dtype)

    @property
    def rounding(self) -> float:
        """Unit roundoff of a half-precision operator's products, 0 for other dtypes."""
        return HALF_ROUNDING.get(self.dtype, 0.0)


def prepare_operator(fn, adjoint, v0, *, first_product: bool = False) -> PreparedOperator:
    """Widens and scales a linear map for the iterations, from the start vector ``v0``.

    Every iteration (the solver's power method and Lanczos, the block iteration of
    :func:`top_singular_triplets`, the tracked vectors of
    :func:`tf_lipschitz.constraints.track_top_vector`) runs on what this returns:

    - **Widened.** A float16 or bfloat16 operator (mixed precision) is applied in its dtype but
      iterated in float32: float16 norms overflow at 256, and the half-precision rounding
      (``1e-3``, ``8e-3``) is far above any useful tolerance.
    - **Scaled.** ``JᵀJ`` squares the operator's size: in float32 a norm above about ``1e18``
      overflows in the products and one below about ``1e-18`` underflows into denormals, and
      either returns a wrong value silently (an operator ``x ↦ 10¹⁸·xW`` came out at 0.68 of
      its norm, ``10¹²·`` at half of it or 0). The map is therefore divided by
      ``s = 2^⌊log₂ ‖fn(v₀)‖⌋`` for the unit start ``v₀``, so that the scaled norm is at least
      about 1 and at most ``1/|⟨v₀, v_top⟩|``. The division is exact (a power of two): it
      changes no rounding wherever the unscaled map stays in range.
      ``s`` is 1 when ``fn(v₀)`` is zero or not finite (inf/NaN weights: the iteration's result
      is then not finite either, and the caller names the operator).

    The forward pass that measures the scale is also the first product's: with
    ``first_product`` the product ``JᵀJ v₀`` is completed from it (one backward pass), and the
    loops take it as their first product instead of computing it again.

    Args:
        fn: The linear map (batch axis first), in the dtype of ``v0``.
        adjoint: Its explicit transpose (bound, see :func:`tf_lipschitz.operators.bind_adjoint`),
            or ``None``.
        v0: Start vector, shape ``(1, *input_shape)``, of the operator's dtype.
        first_product: Also compute the first product (``PreparedOperator.first``).

    Returns:
        A :class:`PreparedOperator`.
    """
    given = v0.dtype
    if given in HALF_ROUNDING:
        fn, adjoint = _retyped(fn, adjoint, given, given, tf.float32)
        v0 = tf.cast(v0, tf.float32)
    dtype = v0.dtype
    unit = _unit(v0)
    tape = tf.GradientTape() if first_product and adjoint is None else None
    with tape if tape is not None else contextlib.nullcontext():
        if tape is not None:
            tape.watch(unit)
        out = fn(unit)
        if out.dtype != dtype:
            # A map that computes in another dtype than its input (mixed precision: a Flatten
            # called as layer(x) casts float32 inputs to float16) is iterated in its input's.
            fn, adjoint = _retyped(fn, adjoint, dtype, out.dtype, dtype)
            out = tf.cast(out, dtype)
    size = example_norms(tf.cast(out, tf.float64))[0]
    usable = tf.logical_and(tf.math.is_finite(size), size > 0.0)
    exponent = tf.where(usable, tf.floor(tf.math.log(size) / np.log(2.0)), 0.0)
    # Keep 1/s and s representable in the iteration's dtype.
    limit = float(np.floor(np.log2(float(dtype.max)))) - 1.0
    exponent = tf.clip_by_value(exponent, -limit, limit)
    inverse = tf.cast(tf.pow(tf.constant(2.0, tf.float64), -exponent), dtype)

    def scaled_fn(x):
        y = fn(x)  # may compute in another dtype than its input (mixed precision)
        return y * tf.cast(inverse, y.dtype)

    def scaled_adjoint(y):
        g = adjoint(y)
        return g * tf.cast(inverse, g.dtype)

    first = None
    if first_product:
        # What jtj_product(scaled_fn, unit, scaled_adjoint) computes, from the same forward pass.
        if tape is None:
            first = scaled_adjoint(out * tf.cast(inverse, out.dtype))
        else:
            with tape:
                energy = 0.5 * tf.reduce_sum(tf.square(out * tf.cast(inverse, out.dtype)))
            first = tape.gradient(energy, unit)
    scale = tf.pow(tf.constant(2.0, tf.float64), exponent)
    return PreparedOperator(
        fn=scaled_fn, adjoint=None if adjoint is None else scaled_adjoint, start=v0,
        scale=scale, start_norm=tf.where(usable, size / scale, 0.0), first=first, dtype=given)


def _finish(fn, v, adjoint=None, slack=1e-2):
    """Returns ``(sigma, relative residual)`` at ``v``, normalised first: whatever the solver
    returned, ``σ = ‖fn(v)‖ / ‖v‖`` is then a true lower bound on the operator norm.

    The residual is NaN when the product disagrees with the forward pass
    (``vᵀJᵀJv ≠ ‖Jv‖²`` by more than ``slack``, relative): TensorFlow may fold a chain's
    constants ``c · c`` into one that underflows or overflows in the backward pass, and the
    iteration's values are then meaningless even if finite. :meth:`SpectralSolver.run` raises on it.
    """
    v = _unit(v)
    out, g = jtj_product(fn, v, adjoint)
    s2 = _dot(v, g)
    sigma = tf.norm(tf.reshape(out, [-1]))
    resid = tf.norm(tf.reshape(g - s2 * v, [-1])) / tf.maximum(s2, tf.cast(1e-30, v.dtype))
    agree = tf.abs(s2 - sigma * sigma) <= slack * sigma * sigma
    return sigma, tf.where(agree, resid, tf.constant(np.nan, resid.dtype))


class SpectralSolver:
    """Compiled spectral-norm solver for a fixed list of linear operators.

    The operators are traced once into a single ``tf.function``; later calls reuse the graph
    and read the operators' current weights, so a callback can re-run it every epoch cheaply
    and warm-start from the previous singular vectors.

    Args:
        operators: Linear operators, each with its per-example ``input_shape``.
        method: ``"lanczos"`` (default; restarted Lanczos, far fewer products) or ``"power"``.
        krylov_dim: Krylov basis size per Lanczos restart.
        jit_compile: Passed to ``tf.function`` (XLA), useful on GPU.
        start_noise: Relative weight of a random vector blended into warm and supplied starts
            (0 uses them exactly). A Krylov iteration never leaves the invariant subspace of
            its start: a warm vector that is still a singular vector after the weights changed,
            or a structured start missing some channels, would otherwise stop on a value below
            the norm with a small residual.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> from tf_lipschitz.operators import LinearOperator
        >>> w = keras.ops.convert_to_tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> op = LinearOperator(lambda x: keras.ops.matmul(x, w), (2,), name="diag")
        >>> res = SpectralSolver([op]).run(tol=1e-8)[0]
        >>> round(res.sigma, 4)
        3.0
    """

    def __init__(
        self,
        operators: Sequence[LinearOperator],
        *,
        method: str = "lanczos",
        krylov_dim: int = 16,
        jit_compile: bool = False,
        start_noise: float = 0.02,
    ):
        self.method = check_choice(method, "method", METHODS)
        self.krylov_dim = check_int(krylov_dim, "krylov_dim", minimum=2)
        self.operators = list(operators)
        self.jit_compile = jit_compile
        self.start_noise = float(start_noise)
        self._last: list[np.ndarray] | None = None
        self._fn = compiled(self._solve_all, jit_compile=jit_compile, reduce_retracing=True)

    def _solve_all(self, inits, tol, max_products):
        outs = []
        for op, v0 in zip(self.operators, inits):
            # The adjoint is prepared once, outside the loops; the first product comes with the
            # forward pass that measures the scale.
            prep = prepare_operator(op.fn, bind_adjoint(op.adjoint, v0.dtype), v0,
                                    first_product=True)
            # max_products caps every product, the final evaluation below included.
            budget = max_products - 1
            if self.method == "power":
                v, products, done = power_loop(prep.fn, prep.start, tol, budget, prep.adjoint,
                                               first=prep.first)
            else:
                m = int(min(self.krylov_dim, max(2, op.size)))
                v, products, done = lanczos_loop(prep.fn, prep.start, tol, budget, m,
                                                 xla=self.jit_compile, adjoint=prep.adjoint,
                                                 first=prep.first)
            sigma, resid = _finish(prep.fn, v, prep.adjoint, slack=prep.slack)
            # Both iterations only raise σ above the start's ‖h(v₀)‖ (v₀ spans their first
            # space); a value below it comes from products inconsistent with the forward pass.
            low = (1.0 - max(1e-3, 16 * prep.rounding)) * prep.start_norm
            resid = tf.where(tf.cast(sigma, tf.float64) < low,
                             tf.constant(np.nan, resid.dtype), resid)
            outs.append((tf.cast(sigma, tf.float64) * prep.scale, tf.cast(v, prep.dtype),
                         products + 1, resid, done))
        return outs

    def _blend(self, vectors, seed):
        """Given starts plus a random vector of relative weight ``start_noise``.

        A Krylov iteration never leaves the invariant subspace its start lies in: a warm vector
        that is still an exact singular vector after the weights changed (a diagonal entry that
        grew), or a structured start with no component in some channels, stops at once on a
        value below the norm, with a small residual. The random part gives every direction a
        component, as a random start does.
        """
        if self.start_noise <= 0:
            return vectors
        out = []
        for k, v in enumerate(vectors):
            r = self.random_vector(k, seed + 1)
            work = np.float64 if r.dtype == np.float64 else np.float32  # half: norms overflow
            v, noise = np.asarray(v, work), r.astype(work, copy=False)
            norm = float(np.linalg.norm(v))
            if not (np.isfinite(norm) and norm > 0):
                out.append(r)
                continue
            blended = v / work(norm) + noise * work(
                self.start_noise / float(np.linalg.norm(noise)))
            out.append(blended.astype(r.dtype, copy=False))
        return out

    def _start_arrays(self, init: Any) -> list[np.ndarray]:
        """``init`` as one ``(1, *input_shape)`` array per operator, or an error naming it."""
        try:
            items = list(init)
        except TypeError:
            items = None
        shapes = ", ".join(str(tuple(op.input_shape)) for op in self.operators)
        if items is None or len(items) != len(self.operators):
            received = (f"{len(items)} array{'s' if len(items) != 1 else ''}"
                        if items is not None else f"init={init!r}")
            raise InvalidArgumentError(
                f"init must be 'warm', None or a list of {len(self.operators)} arrays, one per "
                f"linear operator (input shapes {shapes}); received {received}.")
        arrays = []
        for k, (v, op) in enumerate(zip(items, self.operators)):
            v = np.asarray(v, op.dtype)
            if v.size != op.size:
                raise InvalidArgumentError(
                    f"init[{k}] has shape {v.shape}, but operator '{op.name}' takes inputs of "
                    f"shape {tuple(op.input_shape)}; pass one array shaped like each operator's "
                    "input, or init=None.")
            arrays.append(np.reshape(v, (1, *op.input_shape)))
        return arrays

    @property
    def has_warm_start(self) -> bool:
        """Whether a previous run left vectors for ``init="warm"``."""
        return self._last is not None

    def random_vector(self, k: int, seed: int = 0) -> np.ndarray:
        """A random Gaussian starting vector for operator ``k`` (batch axis of size 1), drawn
        in its dtype (float32 for half precision) from a generator seeded by ``(seed, k)``, so
        that each operator's vector is drawn only when it is needed."""
        op = self.operators[k]
        dtype = np.float64 if np.dtype(op.dtype) == np.float64 else np.float32
        rng = np.random.default_rng([seed, k])
        return rng.standard_normal((1, *op.input_shape), dtype=dtype).astype(op.dtype, copy=False)

    def initial_vectors(self, seed: int = 0) -> list[np.ndarray]:
        """Random Gaussian starting vectors, one per operator (batch axis of size 1)."""
        return [self.random_vector(k, seed) for k in range(len(self.operators))]

    def run(
        self,
        *,
        tol: float = 1e-6,
        max_products: int = 2000,
        init: Sequence[np.ndarray] | str | None = "warm",
        seed: int = 0,
    ) -> list[SpectralResult]:
        """Estimates the spectral norm of every operator.

        Args:
            tol: Relative accuracy of ``σ`` with respect to the nearest singular value, from
                the residual of the top pair (both methods). Values below the dtype's machine
                epsilon (power: 8 ε) are raised to it.
            max_products: Cap on ``JᵀJ v`` products per operator, the final evaluation at the
                returned vector included (``SpectralResult.products`` never exceeds it).
            init: ``"warm"`` to start from the previous run's vectors (random the first time),
                ``None`` for random vectors, or a list of arrays shaped like each input.
            seed: Seed of the random starting vectors.

        Returns:
            One :class:`SpectralResult` per operator, in order.
        """
        tol = check_tol(tol)
        max_products = check_int(max_products, "max_products", minimum=1)
        if isinstance(init, str) and init != "warm":
            raise InvalidArgumentError(
                f"init must be 'warm', None or a list of arrays (one per operator); received "
                f"init={init!r}.")
        if not self.operators:
            return []
        if isinstance(init, str):
            inits = (self._blend(self._last, seed) if self._last is not None
                     else self.initial_vectors(seed))
        elif init is None:
            inits = self.initial_vectors(seed)
        else:
            inits = self._blend(self._start_arrays(init), seed)
        inits = [tf.convert_to_tensor(v) for v in inits]
        outs = self._fn(inits, tf.constant(tol, tf.float64), tf.constant(int(max_products)))
        results = []
        for op, (sigma, v, products, resid, done) in zip(self.operators, outs):
            if not (np.isfinite(float(sigma)) and np.isfinite(float(resid))):
                raise LipschitzError(
                    f"The spectral solver ({self.method}) on operator '{op.name}' met {op.dtype} "
                    f"products that are not finite or disagree with its forward pass (σ = "
                    f"{float(sigma):.6g}). Check the layer's weights and constants for inf/NaN. "
                    "Very large or small constants (beyond about 1e±18 in float32: the backward "
                    "pass multiplies by them twice) overflow or underflow the products: fold "
                    "them into the weights"
                    + (", or build the model in float64." if op.dtype != "float64" else "."))
            results.append(
                SpectralResult(
                    sigma=float(sigma),
                    vector=v.numpy()[0],
                    products=int(products),
                    residual=float(resid),
                    converged=bool(done),
                    method=self.method,
                )
            )
        self._last = [r.vector[None] for r in results]
        return results


def spectral_norm(
    fn: Callable[[tf.Tensor], tf.Tensor],
    input_shape: Sequence[int],
    *,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_products: int = 2000,
    init: np.ndarray | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> SpectralResult:
    """Estimates the largest singular value of one linear map.

    Args:
        fn: Linear function of a batched input ``(batch, *input_shape)``.
        input_shape: Shape of one input example.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative accuracy of ``σ`` (see :meth:`SpectralSolver.run`).
        max_products: Cap on ``JᵀJ v`` products.
        init: Optional starting vector shaped like one example.
        seed: Seed of the random start.
        dtype: Floating dtype of the iteration.

    Returns:
        A :class:`SpectralResult`.

    Example:
        >>> import tensorflow as tf
        >>> res = spectral_norm(lambda x: 2.0 * x, (5,))
        >>> round(res.sigma, 5)
        2.0
    """
    tol = check_tol(tol)
    op = LinearOperator(fn, tuple(input_shape), dtype=dtype)
    solver = SpectralSolver([op], method=method)
    return solver.run(tol=tol, max_products=max_products,
                      init=None if init is None else [init], seed=seed)[0]


@dataclasses.dataclass(frozen=True)
class SingularTriplets:
    """Top-k singular triplets ``(s, U, V)`` of a linear operator, ``J ≈ Σ s_i u_i v_iᵀ``.

    Attributes:
        s: Singular values, descending, shape ``(k,)``.
        u: Left singular vectors, shape ``(k, *output_shape)``.
        v: Right singular vectors, shape ``(k, *input_shape)``.
        products: Operator products (``JᵀJ`` applications counted per vector).
        residual: Largest relative residual among the k pairs.
        converged: Whether the Ritz values settled to ``tol`` before ``max_iter`` iterations.
    """

    s: np.ndarray
    u: np.ndarray
    v: np.ndarray
    products: int
    residual: float
    converged: bool = True


def top_singular_triplets(
    op: LinearOperator,
    k: int,
    *,
    tol: float = 1e-5,
    max_iter: int = 300,
    oversample: int = 8,
    seed: int = 0,
) -> SingularTriplets:
    """Top-``k`` singular triplets by block subspace iteration with Rayleigh–Ritz.

    The whole block is pushed through the operator as one batch, so each iteration costs one
    batched forward and backward pass. The operator is prepared as for the solvers
    (:func:`prepare_operator`: half precision iterated in float32, divided by a power of two
    near its size). The iteration stops when the top-``k`` Ritz values change
    by less than ``tol`` (relative); ``converged`` says whether that happened before
    ``max_iter`` iterations. Ritz values approach the singular values from below.

    Args:
        op: The linear operator.
        k: Number of triplets (clipped to the operator's input size).
        tol: Relative tolerance on the Ritz values (raised to a 16th of the rounding of a
            half-precision operator's products, and to 8 units of the iteration's dtype,
            about 1e-6 in float32).
        max_iter: Cap on block iterations.
        oversample: Extra block columns that speed up convergence of the k-th value.
        seed: Seed of the random start.

    Returns:
        A :class:`SingularTriplets`.
    """
    tol = check_tol(tol, default=1e-5)
    k = min(check_int(k, "k", minimum=1), op.size)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    b = min(op.size, k + check_int(oversample, "oversample", minimum=0))
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal((b, op.size)).astype(op.dtype)
    shape = tuple(op.input_shape)

    @tf.function(reduce_retracing=True, autograph=False)
    def solve(v0, tol, max_iter):
        # Widened to float32 if half precision, divided by a power of two near its size.
        prep = prepare_operator(op.fn, bind_adjoint(op.adjoint, v0.dtype),
                                tf.reshape(v0[:1], (1, *shape)))
        fn, adjoint = prep.fn, prep.adjoint
        v0 = tf.cast(v0, prep.start.dtype)
        # Below a 16th of the rounding of half-precision products the Ritz values only
        # fluctuate: a float16 Dense or Conv2D then ran to max_iter (3311 products for k=3)
        # instead of stopping within 2e-4 of its singular values (363-440 products). Likewise
        # below 8 units of the iteration's own dtype: at tol=1e-8 float32 blocks ran all
        # 300 iterations (3612 products) for the accuracy, about 1e-6, that tol=1e-6 reaches.
        floor = max(prep.rounding / 16, 8 * float(np.finfo(v0.dtype.as_numpy_dtype).eps))
        tol = tf.cast(tf.maximum(tol, floor), v0.dtype)

        def apply(vb):
            _, g = jtj_product(fn, tf.reshape(vb, (b, *shape)), adjoint)
            return tf.reshape(g, (b, -1))

        def rayleigh_ritz(vb):
            q, _ = tf.linalg.qr(tf.transpose(vb))  # (n, b)
            aq = apply(tf.transpose(q))  # (b, n)
            h = tf.matmul(aq, q)  # (b, b)
            h = 0.5 * (h + tf.transpose(h))
            # Products that are not finite (inf/NaN weights) give NaN values, not an eigh error.
            finite = tf.reduce_all(tf.math.is_finite(h))
            evals, evecs = tf.linalg.eigh(tf.where(finite, h, tf.zeros_like(h)))
            evals = tf.where(finite, evals, tf.constant(np.nan, evals.dtype))
            evals = tf.reverse(evals, [0])
            evecs = tf.reverse(evecs, [1])
            return tf.transpose(tf.matmul(q, evecs)), evals, tf.matmul(tf.transpose(evecs), aq)

        def cond(i, vb, ev, done):
            return tf.logical_and(i < max_iter, tf.logical_not(done))

        def body(i, vb, ev, done):
            v_new, ev_new, av = rayleigh_ritz(vb)
            rel = tf.reduce_max(tf.abs(ev_new[:k] - ev[:k]) / tf.maximum(tf.abs(ev_new[:k]), 1e-30))
            return i + 1, av, ev_new, tf.logical_or(rel <= tol,
                                                    tf.logical_not(tf.math.is_finite(ev_new[0])))

        i, vb, _, done = tf.while_loop(
            cond, body, (tf.constant(0), v0, -tf.ones([b], v0.dtype), tf.constant(False))
        )
        v_fin, ev, av = rayleigh_ritz(vb)
        out = fn(tf.reshape(v_fin, (b, *shape)))
        return i, v_fin, ev, av, out, prep.scale, done

    i, v_fin, ev, av, out, scale, done = solve(tf.convert_to_tensor(v0), tf.constant(tol, tf.float64),
                                         tf.constant(max_iter))
    # Everything below is of the scaled operator; only the singular values are scaled back.
    ev = np.maximum(ev.numpy()[:k].astype(np.float64), 0.0)
    s = np.sqrt(ev)
    v_np = v_fin.numpy()[:k]
    av_np = av.numpy()[:k]
    resid = np.linalg.norm(av_np - ev[:, None] * v_np, axis=1) / np.maximum(ev, 1e-30)
    out_np = out.numpy()[:k].reshape(k, -1)
    u = out_np / np.maximum(s, 1e-30)[:, None]
    # ‖J v_i‖² = v_iᵀJᵀJv_i: a product folded out of range by TensorFlow shows as disagreement.
    forward = np.sum(np.square(out_np.astype(np.float64)), axis=1)
    top = max(float(np.max(forward, initial=0.0)), float(np.max(ev, initial=0.0)))
    agree = np.all(np.abs(forward - ev)
                   <= _consistency_slack(op.dtype) * np.maximum(forward, ev) + 1e-4 * top)
    s = s * float(scale)
    if not (agree and np.all(np.isfinite(s)) and np.all(np.isfinite(resid))):
        raise LipschitzError(
            f"The subspace iteration on operator '{op.name}' met {op.dtype} products that are "
            "not finite or disagree with its forward pass. Check the layer's weights and "
            "constants for inf/NaN, or fold very large or small constants into the weights.")
    return SingularTriplets(
        s=s,
        u=u.reshape((k, *out.shape[1:])),
        v=v_np.reshape((k, *shape)),
        products=int(i + 1) * b,
        residual=float(np.max(resid)) if k else 0.0,
        converged=bool(done),
    )
