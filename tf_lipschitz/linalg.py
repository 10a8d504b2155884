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
(:mod:`tf_lipschitz.gridconv`).

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

try:  # LAPACK trsm, about 2.5x faster than TensorFlow's on CPU; optional
    from scipy.linalg import solve_triangular as _scipy_solve_triangular
except ImportError:  # pragma: no cover - scipy is not a dependency
    _scipy_solve_triangular = None

__all__ = ["top_eigenvalue", "lanczos_ritz", "banded_cholesky_succeeds", "banded_cholesky_flops"]

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


def _solve_lower(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``L⁻¹ B`` by forward substitution (LAPACK through SciPy if present, else TensorFlow)."""
    if _scipy_solve_triangular is not None:
        return _scipy_solve_triangular(lower, rhs, lower=True, check_finite=False)
    return tf.linalg.triangular_solve(tf.constant(lower), tf.constant(rhs), lower=True).numpy()


def banded_cholesky_flops(rows: int, block: int, bandwidth: int) -> float:
    """Floating-point operations of :func:`banded_cholesky_succeeds` (leading terms).

    Per block row: one ``m³/3`` factorisation, ``b`` triangular solves (``m³`` each) and
    ``b(b+1)/2`` block updates (``2m³`` each), for block side ``m``, where ``b`` is the
    bandwidth ``w`` except in the last ``w`` block rows, which have fewer rows below them.

    Example:
        >>> banded_cholesky_flops(rows=1, block=3, bandwidth=2)  # one dense 3×3 factorisation
        9.0
    """
    m3 = float(block) ** 3
    below = [min(bandwidth, rows - 1 - i) for i in range(rows)]
    return m3 * sum(1.0 / 3.0 + b + b * (b + 1) for b in below)


def banded_cholesky_succeeds(block: Callable[[int, int], np.ndarray], rows: int,
                             bandwidth: int) -> bool:
    """Whether a symmetric block-banded matrix passes a float64 block Cholesky factorisation.

    The matrix has ``rows × rows`` square blocks; block ``(r, c)`` is zero for
    ``|r − c| > bandwidth``. Blocks are requested from ``block(r, c)`` (``r ≥ c``, a fresh
    float64 array the factorisation may overwrite) only when the right-looking factorisation
    first touches them, and dropped once factorised, so at most ``(w+1)(w+2)/2`` blocks are in
    memory at a time. Success of the factorisation (no non-positive pivot) proves positive
    definiteness of the matrix up to the rounding error of the factorisation, which the caller
    covers with a shift (Rump's criterion); the blocked algorithm is a reordering of the
    Cholesky sums with substitution for the triangular solves, so the standard bound holds.

    Args:
        block: ``block(r, c) -> (m, m)`` float64 array, for ``0 ≤ c ≤ r < rows``.
        rows: Number of block rows.
        bandwidth: Block bandwidth ``w``.

    Returns:
        ``True`` if the factorisation runs to completion.
    """
    pending: dict[tuple[int, int], np.ndarray] = {}

    def take(r: int, c: int) -> np.ndarray:
        return pending.pop((r, c)) if (r, c) in pending else block(r, c)

    for i in range(rows):
        try:
            diag = np.linalg.cholesky(take(i, i))
        except np.linalg.LinAlgError:
            return False
        below = {}
        for k in range(1, bandwidth + 1):
            if i + k < rows:  # L_{i+k,i} = S_{i+k,i} L_ii⁻ᵀ
                below[k] = _solve_lower(diag, take(i + k, i).T).T
        for k, left in below.items():
            for l, right in below.items():
                if l <= k:
                    target = pending.get((i + k, i + l))
                    if target is None:
                        target = pending[(i + k, i + l)] = block(i + k, i + l)
                    target -= left @ right.T
    return True
