"""Float64 NumPy linear algebra behind the certificates: Lanczos proposals, Cholesky tests.

A certificate in :mod:`tf_lipschitz.certify` is proven, not estimated: a Lanczos run (whose Ritz
values can only *underestimate* a top eigenvalue) proposes a level ``τ²``, and a float64
Cholesky factorisation of ``τ²I − H`` proves ``λ_max(H) ≤ τ²``. By Rump's criterion (BIT 2006),
if the floating-point factorisation of ``A − cI`` runs to completion with a shift ``c`` above
the worst-case rounding error of the factorisation (``O(n²u)·‖A‖`` for ``n × n``, any summation
order, blocked algorithms included), then ``A`` is positive definite.

This module holds the two pieces that do not depend on where ``H`` comes from: a matrix-free
Lanczos iteration (:func:`lanczos_ritz`) and the Cholesky test of a block-banded matrix that is
never stored whole (:func:`banded_cholesky_succeeds`), used for convolutions on small grids
(:mod:`tf_lipschitz.gridconv`). With SciPy installed, the test calls LAPACK and BLAS (``potrf``,
``trsm``, ``syrk``, ``gemm``) on the blocks' own memory; without it, NumPy and TensorFlow.

Example:
    >>> import numpy as np
    >>> h = np.diag([4.0, 1.0, 0.5])
    >>> bool(banded_cholesky_succeeds(lambda r, c: 4.01 * np.eye(1) * (r == c) - h[r:r+1, c:c+1],
    ...                               rows=3, bandwidth=0))
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

try:  # LAPACK and BLAS called in place (factorisation, solves, updates); optional
    from scipy.linalg import blas as _blas, lapack as _lapack
except ImportError:  # pragma: no cover - scipy is not a dependency
    _blas = _lapack = None

__all__ = ["top_eigenvalue", "lanczos_ritz", "cholesky_in_place", "banded_cholesky_succeeds",
           "banded_cholesky_flops"]

_BREAKDOWN = 1e-10
"""Lanczos breakdown: a residual below this fraction of ``‖H‖`` (estimated) ends the basis."""


def top_eigenvalue(h: np.ndarray) -> float:
    """Exact largest eigenvalue over a batch of Hermitian matrices ``(..., n, n)`` (``eigvalsh``).

    The reference the certificates fall back on when a matrix is small enough, or when a
    Cholesky test fails and the level must be raised to a true eigenvalue.

    Example:
        >>> top_eigenvalue(np.stack([np.diag([1.0, 3.0]), np.diag([2.0, 0.5])]))
        3.0
    """
    return float(np.max(np.linalg.eigvalsh(h)[..., -1]))


def lanczos_ritz(matvec: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
                 steps: int) -> np.ndarray:
    """Largest Ritz value of positive semi-definite operators after ``steps`` Lanczos steps.

    Full re-orthogonalisation (twice) in the dtype of ``start``. A Ritz value is a Rayleigh
    quotient, hence never above the top eigenvalue (up to rounding): it is only used to
    *propose* a bound, which a Cholesky test then proves. When the Krylov space of an operator
    becomes invariant (``β`` at rounding level: repeated eigenvalues, a null space, fewer
    distinct eigenvalues than steps), its basis stops growing; normalising the rounding noise
    instead would add a direction that is not orthogonal to the basis and Ritz values far above
    the spectrum. The padded steps add zero rows and columns to the projected matrix, harmless
    for positive semi-definite operators.

    Args:
        matvec: ``matvec(q) -> H q`` for a batch ``q`` of shape ``(batch, n)``.
        start: Starting vectors ``(batch, n)`` (normalised here).
        steps: Lanczos steps (capped at ``n``).

    Returns:
        The largest Ritz value of each operator, shape ``(batch,)``.
    """
    batch, n = start.shape
    k = min(steps, n)
    q = start / np.linalg.norm(start, axis=-1, keepdims=True)
    basis = np.zeros((batch, k, n), start.dtype)
    alpha = np.zeros((batch, k))
    beta = np.zeros((batch, k))
    scale = np.zeros(batch)
    for j in range(k):
        basis[:, j] = q
        w = matvec(q)
        scale = np.maximum(scale, np.linalg.norm(w, axis=-1))
        alpha[:, j] = np.real(np.sum(np.conj(q) * w, axis=-1))
        active = basis[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice
            coeff = np.matmul(np.conj(active), w[..., None])
            w = w - np.matmul(np.swapaxes(active, -1, -2), coeff)[..., 0]
        norm = np.linalg.norm(w, axis=-1)
        alive = norm > _BREAKDOWN * np.maximum(scale, 1e-300)  # else: invariant, stop growing
        beta[:, j] = np.where(alive, norm, 0.0)
        q = np.where(alive[:, None], w / np.maximum(norm, 1e-300)[:, None], 0.0)
    tri = np.zeros((batch, k, k))
    idx = np.arange(k)
    tri[:, idx, idx] = alpha
    tri[:, idx[:-1], idx[1:]] = beta[:, :-1]
    tri[:, idx[1:], idx[:-1]] = beta[:, :-1]
    return np.linalg.eigvalsh(tri)[:, -1]


def _copy_back_unless_in_place(dst: np.ndarray, out_fortran: np.ndarray) -> None:
    """Make sure a SciPy LAPACK/BLAS result, computed on ``dst.T``, lands in ``dst``.

    The wrappers work in place on an aligned Fortran-ordered float64 array when asked to
    overwrite it; when one returns a fresh array instead (an unaligned buffer), it is copied
    back, never silently dropped.
    """
    if not np.may_share_memory(dst, out_fortran):
        dst[...] = out_fortran.T


def cholesky_in_place(a: np.ndarray) -> bool:
    """Overwrite the lower triangle of a C-ordered float64 symmetric ``a`` by its Cholesky factor.

    Only that lower triangle is read. A NaN or infinite pivot counts as a failure (OpenBLAS'
    ``potrf`` lets NaN through). With SciPy, LAPACK's ``potrf`` works on the array's own
    memory (``a.T`` is the same buffer in Fortran order, whose upper triangle is ``a``'s lower
    one) and leaves the strict upper triangle as it was; without it, NumPy's factorisation
    replaces the whole array.

    Args:
        a: A C-contiguous float64 ``(n, n)`` array, overwritten.

    Returns:
        ``False`` at a non-positive, NaN or infinite pivot (the matrix is not numerically
        positive definite).

    Example:
        >>> a = np.array([[4.0, 2.0], [2.0, 5.0]])
        >>> cholesky_in_place(a), float(a[1, 1])  # L = [[2, 0], [1, 2]]
        (True, 2.0)
    """
    if _lapack is not None:
        out, info = _lapack.dpotrf(a.T, lower=0, clean=0, overwrite_a=1)
        _copy_back_unless_in_place(a, out)
        if info != 0:
            return False
    else:
        try:
            a[...] = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            return False
    return bool(np.all(np.isfinite(np.diagonal(a))))


def _solve_in_place(lower: np.ndarray, rhs: np.ndarray) -> None:
    """``rhs ← rhs L⁻ᵀ`` for the factor in the lower triangle of ``lower`` (C order)."""
    if _blas is not None:  # L Xᵀ = rhsᵀ on the buffers in Fortran order: no copies
        out = _blas.dtrsm(1.0, lower.T, rhs.T, side=0, lower=0, trans_a=1, overwrite_b=1)
        _copy_back_unless_in_place(rhs, out)
        return
    tri = tf.constant(np.tril(lower))
    rhs[...] = tf.linalg.triangular_solve(tri, tf.constant(rhs.T), lower=True).numpy().T


def _subtract_product(target: np.ndarray, left: np.ndarray, right: np.ndarray,
                      symmetric: bool) -> None:
    """``target ← target − left rightᵀ``; with ``symmetric`` (``right`` is ``left``, a
    diagonal block) only the lower triangle, which is all the factorisation reads."""
    if _blas is None:
        target -= left @ right.T
    elif symmetric:  # a symmetric rank-m update of the lower triangle: half the flops
        out = _blas.dsyrk(-1.0, left.T, beta=1.0, c=target.T, trans=1, lower=0, overwrite_c=1)
        _copy_back_unless_in_place(target, out)
    else:
        out = _blas.dgemm(-1.0, right.T, left.T, beta=1.0, c=target.T, trans_a=1, overwrite_c=1)
        _copy_back_unless_in_place(target, out)


def banded_cholesky_flops(rows: int, block: int, bandwidth: int) -> float:
    """Floating-point operations of :func:`banded_cholesky_succeeds` (leading terms).

    Per block row: one ``m³/3`` factorisation, ``b`` triangular solves (``m³`` each) and
    ``b(b+1)/2`` block updates (``2m³`` each), for block side ``m``, where ``b`` is the
    bandwidth ``w`` except in the last ``w`` block rows, which have fewer rows below them. This
    is the limit's yardstick: with SciPy the ``b`` updates of diagonal blocks are symmetric
    (``syrk``, ``m³`` each), so the work done is about a quarter smaller for ``w = 2``.

    Example:
        >>> banded_cholesky_flops(rows=1, block=3, bandwidth=2)  # one dense 3×3 factorisation
        9.0
    """
    m3 = float(block) ** 3
    below = [min(bandwidth, rows - 1 - i) for i in range(rows)]
    return m3 * sum(1.0 / 3.0 + b + b * (b + 1) for b in below)


def banded_cholesky_succeeds(block: Callable[[int, int], np.ndarray], rows: int,
                             bandwidth: int, *, fresh: bool = False) -> bool:
    """Whether a symmetric block-banded matrix passes a float64 block Cholesky factorisation.

    The matrix has ``rows × rows`` square blocks; block ``(r, c)`` is zero for
    ``|r − c| > bandwidth``. Blocks are requested from ``block(r, c)`` (``r ≥ c``) only when
    the right-looking factorisation first touches them, and dropped once factorised, so at most
    ``(w+1)(w+2)/2`` blocks are in memory at a time. The factorisation works in place on a
    private copy of each block, or, with ``fresh=True``, on the arrays ``block`` returns (then
    each call must return a new array that nothing else holds: not a view of a matrix the
    caller keeps, not a cached block). A NaN or infinite entry fails. Success of the
    factorisation (no non-positive pivot) proves positive definiteness of the matrix up to the
    rounding error of the factorisation, which the caller covers with a shift (Rump's
    criterion); the blocked algorithm is a reordering of the Cholesky sums with substitution for
    the triangular solves, so the standard bound holds.

    Args:
        block: ``block(r, c) -> (m, m)`` array, for ``0 ≤ c ≤ r < rows``.
        rows: Number of block rows.
        bandwidth: Block bandwidth ``w``.
        fresh: ``block`` returns a new array at every call, which the factorisation may
            overwrite (saves one copy per block; C-ordered float64 ones are used as they are).

    Returns:
        ``True`` if the factorisation runs to completion.
    """
    pending: dict[tuple[int, int], np.ndarray] = {}

    def fetch(r: int, c: int) -> np.ndarray:  # a private C-ordered float64 array
        given = block(r, c)
        out = np.ascontiguousarray(given, dtype=np.float64)
        if out is given and not (fresh and out.flags.writeable):
            out = out.copy()
        return out

    def take(r: int, c: int) -> np.ndarray:
        out = pending.pop((r, c), None)
        return fetch(r, c) if out is None else out

    for i in range(rows):
        diag = take(i, i)
        if not cholesky_in_place(diag):
            return False
        # block rows j = i+1 … i+w below: L_{j,i} = S_{j,i} L_ii⁻ᵀ
        below = [take(j, i) for j in range(i + 1, min(i + bandwidth, rows - 1) + 1)]
        for part in below:
            _solve_in_place(diag, part)
        for k, left in enumerate(below):  # S_{j,j'} −= L_{j,i} L_{j',i}ᵀ for i < j' ≤ j
            for l, right in enumerate(below[:k + 1]):
                key = (i + 1 + k, i + 1 + l)
                if key not in pending:
                    pending[key] = fetch(*key)
                _subtract_product(pending[key], left, right, symmetric=l == k)
    return True
