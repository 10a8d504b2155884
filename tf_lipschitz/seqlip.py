"""SeqLip: sequential Lipschitz bounds for chains ``linear → activation → … → linear``.

Scaman & Virmaux (NeurIPS 2018), Section 5. For ``f = M_K ∘ σ ∘ M_{K−1} ∘ … ∘ σ ∘ M_1`` with
activation derivatives in a box ``[lo, hi]`` (``lo ≥ 0``) and SVDs ``M_i = U_i Σ_i V_iᵀ``, the
Jacobian is ``M_K D_{K−1} M_{K−1} … D_1 M_1`` with diagonal ``D_i`` whose entries lie in
``[lo, hi]``. Splitting every inner ``Σ_i = Σ_i^{1/2} Σ_i^{1/2}`` gives

``L(f) ≤ Π_{i=1}^{K−1} max_{d ∈ [lo, hi]^{n_i}} ‖ Σ̃_{i+1} V_{i+1}ᵀ diag(d) U_i Σ̃_i ‖₂``,

with ``Σ̃_1 = Σ_1``, ``Σ̃_K = Σ_K`` and ``Σ̃_i = Σ_i^{1/2}`` for inner layers, so that ``d = hi``
telescopes back to AutoLip. Each factor is the *inner max over activation patterns*
(:func:`pattern_max`): the norm is convex in ``d``, so the max sits at a vertex
``d ∈ {lo, hi}^n``. It is computed

- ``"exact"``: by enumerating the ``2^n`` vertices (``n`` up to about 20–25), in blocks on the
  device, with certified pruning; a certified value;
- ``"greedy"``: by single flips from ``d = hi`` kept while the norm grows (the paper's greedy
  SeqLip); it can stop below the max, so it is an **estimate**;
- ``"certified"``: by the polynomial bounds ``‖ |A| |B| ‖₂`` and ``‖A‖ ‖B‖`` (minimum of the
  candidates), certified but looser.

Large operators (convolutions) keep their top-``E`` singular triplets (the paper used
``E = 200``). The dropped part is either ignored (an estimate, as in the paper) or bounded by
``σ_{E+1}`` and added back through a 2×2 block-norm bound (``remainder=True``, the default).

The split ``Σ_i = Σ_i^{1/2} Σ_i^{1/2}`` is one choice among many: any exponent
``Σ_i = Σ_i^{e_i} Σ_i^{1−e_i}`` (``e_i ∈ [0, 1]``, the ``e_i`` part going to the factor on the
output side of layer ``i``) telescopes back to AutoLip and gives a valid bound, and every choice
of exponents bounds the same constant. ``split="optimize"`` searches the exponents of the inner
layers (coordinate descent over a small grid, started at the paper's ``1/2``) and keeps the
smallest product; it never returns more than the paper's split.

On Functional graphs, SeqLip runs on every maximal chain of fused linear groups joined by
elementwise activations; AutoLip propagates across everything else (merges, pooling, links
whose activation has negative slopes or is not elementwise).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from tf_lipschitz.autolip import (AutoLip, Group, Segment, evaluate_rules,
                                  group_activations)
from tf_lipschitz.errors import InvalidArgumentError
from tf_lipschitz.graph import ModelGraph
from tf_lipschitz.operators import LinearOperator, basis_blocks, bind_adjoint
from tf_lipschitz.power import (SpectralResult, check_choice, check_int, check_tol,
                                 dtype_eps, prepare_operator, top_singular_triplets)
from tf_lipschitz.progress import progress_bar
from tf_lipschitz.report import CERTIFIED, ESTIMATE, LayerRow, LipschitzReport
from tf_lipschitz.rules import Activation, Constant, LayerBound
from tf_lipschitz.rules.base import check_slopes

__all__ = [
    "PatternMax",
    "pattern_max",
    "Spectrum",
    "operator_spectrum",
    "Link",
    "Chain",
    "find_chains",
    "SeqLip",
    "check_options",
    "spectrum_route",
]

MODES = ("auto", "exact", "greedy", "certified")
SPLITS = ("sqrt", "optimize")
LARGE_OPERATORS = ("subspace", "autolip")  # see SeqLip.run's large_operators
SPLIT_GRID = (0.25, 0.375, 0.5, 0.625, 0.75)  # exponents tried by split="optimize"
EXACT_WIDTH_LIMIT = 30
_BLOCK_BITS = 13  # 2^13 vertices evaluated per compiled call in exact enumeration
_PRUNE = 1.0 - 1e-9  # keep a vertex unless its upper bound is clearly below the incumbent


def _check_bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgumentError(f"{name} must be True or False; received {name}={value!r}.")


_OPTION_CHECKS = {
    "top_k": lambda v: check_int(v, "top_k", minimum=1),
    "max_exact_width": lambda v: check_int(
        v, "max_exact_width", minimum=0, maximum=EXACT_WIDTH_LIMIT,
        hint="Exact enumeration visits 2^max_exact_width patterns; wider links use "
             "mode='greedy' or 'certified'."),
    "remainder": lambda v: _check_bool(v, "remainder"),
    "dense_limit": lambda v: check_int(v, "dense_limit", minimum=0),
    "max_sweeps": lambda v: check_int(v, "max_sweeps", minimum=1),
    "split": lambda v: check_choice(v, "split", SPLITS),
    "subspace_tol": lambda v: check_tol(v, "subspace_tol", default=1e-5),
    "subspace_max_iter": lambda v: check_int(v, "subspace_max_iter", minimum=1),
    "large_operators": lambda v: check_choice(
        v, "large_operators", LARGE_OPERATORS,
        hint="'subspace' decomposes every operator (the paper's SeqLip; up to half an hour "
             "per large convolution), 'autolip' keeps the AutoLip factor of the operators "
             "that would need the block subspace iteration."),
}


def check_options(mode: str = "auto", **options) -> None:
    """Validates the ``mode`` and the options given to :meth:`SeqLip.run`.

    Options that are not given keep their (valid) defaults; names that are not options are left
    to the caller (:func:`~tf_lipschitz.power.check_keywords`).

    Raises:
        InvalidArgumentError: Naming the first argument at fault and what it accepts.

    Example:
        >>> try:
        ...     check_options("auto", top_k=0)
        ... except ValueError as err:
        ...     print(err)
        top_k must be an integer >= 1; received top_k=0.
    """
    check_choice(mode, "mode", MODES)
    for name, value in options.items():
        if name in _OPTION_CHECKS:
            _OPTION_CHECKS[name](value)


# --------------------------------------------------------------------------------------------
# The inner max over activation patterns: max_{d ∈ [lo, hi]^n} ‖left · diag(d) · right‖₂
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatternMax:
    """Result of the inner max ``max_{d ∈ [lo, hi]^n} ‖A diag(d) B‖₂``.

    Attributes:
        value: The max (``"exact"``), the value at the pattern found (``"greedy"``: an estimate,
            never above the max) or an upper bound on the max (``"certified"``).
        mode: ``"exact"``, ``"greedy"``, ``"certified"``, ``"product"`` (``lo == hi``: one
            vertex, ``|lo| ‖AB‖``) or ``"diagonal"`` (one side an elementwise scaling: closed
            form, see :func:`_diagonal_pair`).
        certified: Whether ``value`` is a proven upper bound on the max (given exact ``A, B``).
        pattern: The maximising slopes ``d`` (``None`` for ``"certified"``).
        width: ``n``, the number of activations.
        evaluated: Patterns whose norm was computed exactly (``"exact"``) or candidate flips
            evaluated (``"greedy"``).
    """

    value: float
    mode: str
    certified: bool
    pattern: np.ndarray | None
    width: int
    evaluated: int = 0


def _norm2(m: np.ndarray) -> float:
    """Spectral norm of a dense matrix through the Gram matrix of its smaller side."""
    if m.size == 0:
        return 0.0
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(math.sqrt(max(float(np.linalg.eigvalsh(g)[-1]), 0.0)))


def _reduce(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``c_j, e_j`` with ``‖left diag(d) right‖ = ‖Σ_j d_j c_j e_jᵀ‖`` and ``p ≤ q``.

    ``left = U_a S_a W_aᵀ`` and ``right = U_b S_b W_bᵀ`` give
    ``‖left D right‖ = ‖S_a W_aᵀ D U_b S_b‖`` (orthonormal factors drop out), so the norm of an
    ``m × q`` matrix becomes the norm of a ``p × q`` one with ``p, q ≤ n`` (numerical ranks).
    """
    _, sa, wat = np.linalg.svd(left, full_matrices=False)
    ub, sb, _ = np.linalg.svd(right, full_matrices=False)
    n = left.shape[1]
    eps = np.finfo(np.float64).eps * n
    ka = sa > (sa[0] * eps if sa.size else 0.0)
    kb = sb > (sb[0] * eps if sb.size else 0.0)
    c = wat[ka].T * sa[ka]  # (n, p)
    e = ub[:, kb] * sb[kb]  # (n, q)
    if c.shape[1] > e.shape[1]:
        c, e = e, c  # ‖X‖ = ‖Xᵀ‖
    return c, e


def _pattern_norms(c: np.ndarray, e: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``‖cᵀ diag(d_s) e‖`` for a batch of patterns ``d`` of shape ``(S, n)``."""
    x = np.einsum("np,sn,nq->spq", c, d, e)
    return np.linalg.svd(x, compute_uv=False)[:, 0]


def _alternate(c, e, lo, hi, starts: np.ndarray, max_iter: int = 100):
    """Alternating maximisation from several starting patterns (an incumbent for ``exact``).

    Given the top singular pair ``(u, v)`` of ``X(d)``, ``uᵀX(d')v = Σ_j d'_j (c_j·u)(e_j·v)``
    is maximised by ``d'_j = hi`` where the product is positive and ``lo`` where it is
    negative; then ``‖X(d')‖ ≥ uᵀX(d')v ≥ ‖X(d)‖``. Each start climbs to a fixed point.
    """
    d = starts.copy()
    for _ in range(max_iter):
        x = np.einsum("np,sn,nq->spq", c, d, e)
        u, _, vt = np.linalg.svd(x)
        w = (u[:, :, 0] @ c.T) * (vt[:, 0, :] @ e.T)  # (S, n): (c_j·u)(e_j·v)
        d_new = np.where(w > 0, hi, np.where(w < 0, lo, d))
        if np.array_equal(d_new, d):
            break
        d = d_new
    values = _pattern_norms(c, e, d)
    k = int(np.argmax(values))
    return float(values[k]), d[k]


def _bits(index, width: int, lo: float, hi: float) -> np.ndarray:
    """Pattern(s) of ``width`` slopes: ``hi`` where bit ``k`` of ``index`` is set, else ``lo``."""
    r = np.asarray(index, dtype=np.int64)[..., None]
    mask = (r >> np.arange(width, dtype=np.int64)) & 1
    return np.where(mask == 1, hi, lo).astype(np.float64)


@tf.function(reduce_retracing=True, autograph=False)
def _exact_block(d_hi, k_hi, x_lo, x_lo32, d_lo, g_hh, g_lh, f_lo, inc2, delta, tau, g_q, g_p,
                 g_norm):
    """Exact max of ``‖X(d)‖²`` over the ``2^{n_lo}`` patterns sharing the high bits ``d_hi``.

    With ``X(d) = Σ_j d_j c_j e_jᵀ = X_hi + X_lo`` (``X_lo`` from a table over the low bits)
    and ``H = XXᵀ``, the patterns are filtered by upper bounds on ``λ_max(H) = ‖X‖²``:
    ``tr H = dᵀ G d`` (a quadratic form, ``G = (CCᵀ) ∘ (EEᵀ)``, in float64), then ``‖H‖_F`` and
    ``‖H²‖_F ≥ λ_max(H)²`` (in float32). Only the survivors get an exact float64 eigenvalue.
    A pattern is pruned only if its bound, minus a margin covering rounding, is below the
    incumbent ``inc2`` times ``1 − 1e-4``, so the max found is exact up to floating point.

    Margins (all norms Frobenius, ``X32`` and ``H32`` the float32 ``X`` and ``H``):

    - ``tau`` bounds the float64 error of ``tr H`` (see :func:`_rounding_margins`), so
      ``‖X‖_F² ≤ F² = tr H + tau`` for each pattern;
    - ``delta`` bounds ``‖X32 − X‖_F``; with ``X32X32ᵀ − XXᵀ = (X32 − X)X32ᵀ + X(X32 − X)ᵀ``
      and the float32 product error ``γ_q ‖X32‖_F²``,
      ``‖H32 − H‖_F ≤ E = delta (2F + delta) + g_q (F + delta)²``;
    - ``‖H‖_F ≥ λ``, so ``‖H32‖_F > inc2 − E`` when ``λ > inc2``;
    - ``H32² − H² = H32(H32 − H) + (H32 − H)H`` and ``‖H‖_F ≤ F²``, so the float32 ``H32 H32``
      is within ``b = E (2F² + E) + g_p (F² + E)²`` of ``H²``, and ``‖H²‖_F ≥ λ² > inc2²``;
    - ``g_norm`` covers the float32 norms and the rounding of the thresholds.

    When a margin reaches the incumbent (entries of the table much larger than the result,
    e.g. slopes ``lo ≈ hi``) the threshold is negative and the pattern is kept.
    """
    loose = inc2 * (1.0 - 1e-4)
    trace = (tf.tensordot(d_hi, tf.linalg.matvec(g_hh, d_hi), 1)
             + 2.0 * tf.linalg.matvec(d_lo, tf.linalg.matvec(g_lh, d_hi)) + f_lo)
    f2 = tf.maximum(trace + tau, 0.0)
    f = tf.sqrt(f2)
    err_h = delta * (2.0 * f + delta) + g_q * tf.square(f + delta)
    x_hi = tf.tensordot(d_hi, k_hi, 1)
    x32 = x_lo32 + tf.cast(x_hi, tf.float32)
    h = tf.matmul(x32, x32, transpose_b=True)
    thr_h = tf.cast((loose - err_h) * (1.0 - g_norm), tf.float32)
    keep = tf.logical_and(trace > inc2 * _PRUNE - tau, tf.norm(h, axis=[1, 2]) > thr_h)
    idx = tf.where(keep)[:, 0]
    h = tf.gather(h, idx)
    f2, err_h = tf.gather(f2, idx), tf.gather(err_h, idx)
    b = err_h * (2.0 * f2 + err_h) + g_p * tf.square(f2 + err_h)
    thr_h2 = tf.cast((tf.square(loose) - b) * (1.0 - g_norm), tf.float32)
    idx = tf.gather(idx, tf.where(tf.norm(tf.matmul(h, h), axis=[1, 2]) > thr_h2)[:, 0])
    x = tf.gather(x_lo, idx) + x_hi
    lam = tf.linalg.eigvalsh(tf.matmul(x, x, transpose_b=True))[:, -1]
    # A sentinel in front: k = 0 means that nothing survived.
    lam = tf.concat([tf.constant([-1.0], lam.dtype), lam], 0)
    k = tf.argmax(lam, output_type=tf.int32)
    return lam[k], tf.gather(tf.concat([tf.constant([-1], tf.int64), idx], 0), k), tf.size(idx)


def _rounding_margins(c: np.ndarray, e: np.ndarray, lo: float,
                      hi: float) -> dict[str, np.float64]:
    """Rounding constants of :func:`_exact_block` for the (scaled) rows ``c_j, e_j``.

    With ``s = max(|lo|, |hi|)``, ``a_j = ‖c_j‖ ‖e_j‖`` and ``A = s Σ_j a_j`` (a bound on
    ``‖X(d)‖_F`` for every pattern), ``u`` the float32 and ``u₆₄`` the float64 unit roundoff:

    - every entry of ``X(d)`` is a sum of terms bounded by the entries of ``M = s |C|ᵀ|E|``;
      its float64 table parts carry at most ``(n + 1) u₆₄ M``, and rounding both parts to
      float32 and adding them ``3u M`` more, so ``‖X32 − X‖_F ≤ delta = 1.01 (3u +
      (n + 1) u₆₄) ‖M‖_F``;
    - ``|G_jk| ≤ a_j a_k``; forming ``G`` costs ``(p + q + 1) u₆₄ a_j a_k`` and evaluating the
      quadratic form ``(2n + 3) u₆₄ Σ |d_j G_jk d_k|``, so ``tau = 1.01 (2n + p + q + 4) u₆₄ A²``;
    - a float32 product with inner dimension ``k`` errs by at most ``γ_k |A||B|``, Frobenius
      ``γ_k ‖A‖_F ‖B‖_F``: ``g_q, g_p = 1.01 (k u + 2 u_in)`` with ``u_in`` the rounding of
      the inputs (TensorFloat-32 on GPUs, else 0);
    - ``g_norm = 1.01 (p² + 4) u`` covers a float32 Frobenius norm of a ``p × p`` matrix and
      the rounding of a threshold to float32.
    """
    n, p = c.shape
    q = e.shape[1]
    u = float(np.finfo(np.float32).eps) / 2
    u64 = float(np.finfo(np.float64).eps) / 2
    s = max(abs(lo), abs(hi))
    big_a = s * float(np.sum(np.linalg.norm(c, axis=1) * np.linalg.norm(e, axis=1)))
    tf32 = (tf.config.experimental.tensor_float_32_execution_enabled()
            and bool(tf.config.list_physical_devices("GPU")))
    u_in = 2.0 ** -11 if tf32 else 0.0
    m_abs = s * float(np.linalg.norm(np.abs(c).T @ np.abs(e)))
    return {k: np.float64(v) for k, v in [
        ("delta", 1.01 * (3 * u + (n + 1) * u64) * m_abs),
        ("tau", 1.01 * (2 * n + p + q + 4) * u64 * big_a ** 2),
        ("g_q", 1.01 * (q * u + 2 * u_in)),
        ("g_p", 1.01 * (p * u + 2 * u_in)),
        ("g_norm", 1.01 * (p * p + 4) * u),
    ]}


def _exact_search(c, e, lo, hi, *, verbose=0, label="pattern search"):
    n, p = c.shape
    q = e.shape[1]
    if p == 0 or q == 0:
        return 0.0, np.full(n, hi), 0
    rng = np.random.default_rng(0)
    starts = np.concatenate([
        np.full((1, n), hi), np.full((1, n), lo),
        np.where(rng.random((62, n)) < 0.5, lo, hi),
    ])
    incumbent, best_d = _alternate(c, e, lo, hi, starts)
    scale = incumbent if incumbent > 0 else 1.0
    c = c / math.sqrt(scale)
    e = e / math.sqrt(scale)
    n_lo = min(n, _BLOCK_BITS)
    n_hi = n - n_lo
    lo_, hi_ = np.arange(n_lo), np.arange(n_lo, n)
    d_lo = _bits(np.arange(2 ** n_lo), n_lo, lo, hi)
    outer = np.einsum("np,nq->npq", c, e)  # c_j e_jᵀ
    gram = (c @ c.T) * (e @ e.T)  # tr H = ‖X‖_F² = dᵀ G d
    args = dict(
        k_hi=outer[hi_], x_lo=np.einsum("ln,npq->lpq", d_lo, outer[lo_]), d_lo=d_lo,
        g_hh=gram[np.ix_(hi_, hi_)], g_lh=gram[np.ix_(lo_, hi_)],
        f_lo=np.einsum("ln,nm,lm->l", d_lo, gram[np.ix_(lo_, lo_)], d_lo),
    )
    args["x_lo32"] = args["x_lo"].astype(np.float32)
    args.update(_rounding_margins(c, e, lo, hi))
    args = {k: tf.constant(v) for k, v in args.items()}
    inc2 = (incumbent / scale) ** 2
    evaluated = 0
    n_blocks = 2 ** n_hi
    bar = progress_bar(n_blocks, unit_name="block", label=label,
                       verbose=verbose if n_blocks >= 64 else 0)
    if bar is not None:
        print(f"tf_lipschitz: {label}: 2^{n} = {2 ** n} patterns in {n_blocks} blocks", flush=True)
    for b in range(n_blocks):
        d_hi = _bits(b, n_hi, lo, hi)
        value, arg, count = _exact_block(tf.constant(d_hi), inc2=tf.constant(inc2, tf.float64),
                                         **args)
        evaluated += int(count)
        if int(arg) >= 0 and float(value) > inc2:
            inc2 = float(value)
            best_d = np.concatenate([d_lo[int(arg)], d_hi])
        if bar is not None:
            bar.update(b + 1)
    return math.sqrt(max(inc2, 0.0)) * scale, best_d, evaluated


@tf.function(reduce_retracing=True, autograph=False, jit_compile=True)
def _greedy_sweep(c, e, d, x, v, sigma, lo, hi, n, max_iter, tol):
    """One sweep of single flips over coordinates ``0..n-1``, each kept if the norm grows.

    The norm of a candidate ``X + δ c_j e_jᵀ`` comes from power iteration warm-started at the
    current top right singular vector ``v``; ``‖X'v‖`` is a lower bound on ``‖X'‖``, so every
    accepted flip is a real increase. Arrays may be zero-padded beyond ``n`` (and in the
    columns), which changes no norm and lets one XLA compilation serve many shapes.
    """
    tiny = tf.constant(1e-300, x.dtype)

    def candidate_norm(x, cj, ej, delta, v0):
        def body(k, v, s, s_prev):
            w = tf.linalg.matvec(x, v) + delta * cj * tf.reduce_sum(ej * v)
            g = tf.linalg.matvec(x, w, transpose_a=True) + delta * ej * tf.reduce_sum(cj * w)
            return k + 1, g / tf.maximum(tf.norm(g), tiny), tf.norm(w), s

        def cond(k, v, s, s_prev):
            return tf.logical_and(k < max_iter, tf.abs(s - s_prev) > tol * s)

        _, v, s, _ = tf.while_loop(
            cond, body, (tf.constant(0), v0, tf.constant(0.0, x.dtype), tf.constant(-1.0, x.dtype))
        )
        return s, v

    def step(j, d, x, v, sigma, changes):
        dj = d[j]
        delta = tf.where(tf.equal(dj, hi), lo - hi, hi - lo)
        s, v_new = candidate_norm(x, c[j], e[j], delta, v)
        accept = s > sigma * (1.0 + 1e-9)
        x = tf.where(accept, x + delta * tf.tensordot(c[j], e[j], 0), x)
        d = tf.where(accept, tf.tensor_scatter_nd_update(d, [[j]], [dj + delta]), d)
        return (j + 1, d, x, tf.where(accept, v_new, v), tf.where(accept, s, sigma),
                changes + tf.cast(accept, tf.int32))

    _, d, x, v, sigma, changes = tf.while_loop(
        lambda j, *_: j < n, step, (tf.constant(0), d, x, v, sigma, tf.constant(0))
    )
    return d, x, changes


def _bucket(k: int) -> int:
    """Padded size: a power of two up to 256, then a multiple of 128."""
    return max(8, 1 << (k - 1).bit_length()) if k <= 256 else -(-k // 128) * 128


def _greedy_search(c, e, lo, hi, *, max_sweeps=10, verbose=0, label="greedy"):
    n, p = c.shape
    q = e.shape[1]
    if p == 0 or q == 0:
        return 0.0, np.full(n, hi), 0
    cp = np.zeros((_bucket(n), _bucket(p)))
    ep = np.zeros((_bucket(n), _bucket(q)))
    cp[:n, :p], ep[:n, :q] = c, e
    d = np.full(len(cp), hi)
    x = cp.T @ (d[:, None] * ep)
    start_value = _norm2(x)
    consts = [tf.constant(cp), tf.constant(ep)]
    lo_t, hi_t = tf.constant(lo, tf.float64), tf.constant(hi, tf.float64)
    evaluated = 0
    bar = progress_bar(max_sweeps, unit_name="sweep", label=label,
                       verbose=verbose if n >= 256 else 0, stateful_metrics=["norm", "flips"])
    if bar is not None:
        print(f"tf_lipschitz: {label}: greedy flips over {n} activations", flush=True)
    for sweep in range(max_sweeps):
        _, sv, vt = np.linalg.svd(x)
        d_t, x_t, changes = _greedy_sweep(
            *consts, tf.constant(d), tf.constant(x), tf.constant(vt[0]), tf.constant(sv[0]),
            lo_t, hi_t, tf.constant(n), tf.constant(100), tf.constant(1e-7, tf.float64),
        )
        d, x = d_t.numpy(), x_t.numpy()
        evaluated += n
        if bar is not None:  # a sweep without flips ends the search: its line is the last
            bar.update(sweep + 1, values=[("norm", _norm2(x)), ("flips", int(changes))],
                       finalize=int(changes) == 0 or sweep + 1 == max_sweeps)
        if int(changes) == 0:
            break
    d = d[:n]
    value = _norm2(c.T @ (d[:, None] * e))
    if value < start_value:  # cannot happen with converged norms; keep the start then
        return start_value, np.full(n, hi), evaluated
    return value, d, evaluated


def _certified_bound(left: np.ndarray, right: np.ndarray, lo: float, hi: float) -> float:
    """Certified polynomial bound on ``max_{d∈[lo,hi]^n} ‖A diag(d) B‖``.

    ``A diag(d) B = lo·AB + (hi − lo)·A diag(s) B`` with ``s ∈ [0, 1]^n``, and
    ``|A diag(s) B| ≤ |A||B|`` entrywise, so the max is at most
    ``|lo|‖AB‖ + (hi − lo) min(‖|A||B|‖, ‖A‖‖B‖)`` and at most
    ``max(|lo|, |hi|) min(‖|A||B|‖, ‖A‖‖B‖)``.
    """
    poly = min(_norm2(np.abs(left) @ np.abs(right)), _norm2(left) * _norm2(right))
    return min(max(abs(lo), abs(hi)) * poly, abs(lo) * _norm2(left @ right) + (hi - lo) * poly)


def pattern_max(
    left,
    right,
    slopes: tuple[float, float] = (0.0, 1.0),
    *,
    mode: str = "exact",
    max_sweeps: int = 10,
    verbose: int = 0,
    label: str = "pattern search",
) -> PatternMax:
    """The inner max of SeqLip: ``max_{d ∈ [lo, hi]^n} ‖left · diag(d) · right‖₂``.

    ``d`` holds the derivatives of ``n`` elementwise activations (ReLU: ``[0, 1]``, leaky ReLU
    with slope α: ``[α, 1]``, sigmoid: ``[0, 1/4]``). The norm is convex in ``d``, so the max is
    reached at a vertex ``d ∈ {lo, hi}^n``. Computing it is NP-hard in general (Scaman &
    Virmaux 2018, Theorem 2).

    - ``"exact"`` enumerates the ``2^n`` vertices (``n ≤ 30``; seconds for ``n = 20``): the
      problem is first reduced to ``p × q`` matrices with ``p, q ≤ n`` (the orthonormal factors
      of SVDs of ``left`` and ``right`` drop out of the norm), then blocks of ``2^13`` vertices
      are evaluated in one compiled call, pruned by certified upper bounds (Frobenius and Gram)
      against an incumbent from alternating maximisation; survivors get an exact eigenvalue.
    - ``"greedy"`` starts at ``d = hi`` and sweeps the coordinates, keeping each single flip
      that increases the norm, until a sweep changes nothing (or ``max_sweeps``): the value at
      the final vertex, an **estimate** (never above the exact max).
    - ``"certified"``: ``min(‖|A||B|‖, ‖A‖‖B‖)``-type polynomial bound, a certified upper
      bound on the max.

    Args:
        left: ``A``, shape ``(m, n)``.
        right: ``B``, shape ``(n, q)``.
        slopes: ``(lo, hi)``, the range of the activation derivatives.
        mode: ``"exact"``, ``"greedy"`` or ``"certified"``.
        max_sweeps: Cap on greedy sweeps.
        verbose: 1 shows progress on long searches.
        label: Name shown in the progress output.

    Returns:
        A :class:`PatternMax`.

    Example:
        >>> import numpy as np
        >>> w1 = np.array([[1.0, 0.0], [1.0, 1.0]]); w2 = np.array([[1.0, -1.0]])
        >>> round(pattern_max(w2, w1).value, 6)  # max over s of ‖w2 diag(s) w1‖
        1.414214
    """
    a = np.asarray(left, dtype=np.float64)
    b = np.asarray(right, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise InvalidArgumentError(
            f"pattern_max expects left (m, n) and right (n, q); received shapes {a.shape} and "
            f"{b.shape}."
        )
    lo, hi = check_slopes(slopes)
    n = a.shape[1]
    if lo == hi:
        return PatternMax(abs(lo) * _norm2(a @ b), "product", True, np.full(n, lo), n, 1)
    if mode == "certified":
        return PatternMax(_certified_bound(a, b, lo, hi), "certified", True, None, n)
    check_choice(mode, "mode", ("exact", "greedy", "certified"))
    if mode == "exact" and n > EXACT_WIDTH_LIMIT:
        raise InvalidArgumentError(
            f"mode='exact' over {n} activations means 2^{n} patterns (limit "
            f"{EXACT_WIDTH_LIMIT}); use mode='greedy' (an estimate) or mode='certified'."
        )
    c, e = _reduce(a, b)
    if mode == "exact":
        value, d, count = _exact_search(c, e, lo, hi, verbose=verbose, label=label)
        return PatternMax(value, "exact", True, d, n, count)
    value, d, count = _greedy_search(c, e, lo, hi, max_sweeps=max_sweeps, verbose=verbose,
                                     label=label)
    return PatternMax(value, "greedy", False, d, n, count)


# --------------------------------------------------------------------------------------------
# Singular value decompositions of the chain's operators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """(Part of) the SVD ``M = U diag(s) Vᵀ`` of a linear operator on flattened tensors.

    Attributes:
        s: Singular values, descending, shape ``(r,)``.
        u: Left singular vectors as columns, ``(out_size, r)``.
        v: Right singular vectors as columns, ``(in_size, r)``.
        rest: ``σ_{r+1}``, the norm of what the decomposition leaves out (0 if complete).
        exact: ``True`` for a dense SVD (certified up to floating point), ``False`` for
            iterative triplets (estimates: they converge from below).
        method: ``"svd"``, ``"diagonal"`` (an elementwise scaling, exact), ``"gram"`` (the
            eigendecomposition of the Gram matrix on the smaller side, :data:`GRAM_SIDE`) or
            ``"subspace"``.
        products: Operator products used (iterative triplets).
        residual: Largest relative residual of the iterative triplets.
        diagonal: The whole diagonal when the operator is an elementwise scaling (see
            :func:`diagonal_spectrum`), whatever the triplets kept.
    """

    s: np.ndarray
    u: np.ndarray
    v: np.ndarray
    rest: float
    exact: bool
    method: str
    products: int = 0
    residual: float | None = None
    diagonal: np.ndarray | None = None


def _diagonal_of(op: LinearOperator) -> np.ndarray | None:
    """The diagonal of an elementwise scaling operator, or ``None`` if ``op`` is not one.

    ``op(1)`` is the diagonal of a diagonal map; two random vectors check that ``op`` multiplies
    by it, entry by entry (a user rule registered for a diagonal layer class need not be
    diagonal).
    """
    shape, dtype = (1, *op.input_shape), tf.as_dtype(op.dtype)
    diag = op.fn(tf.ones(shape, dtype))
    if tuple(diag.shape) != shape or diag.dtype != dtype:
        return None
    for seed in ([5, 7], [11, 3]):  # entry by entry, to a few roundings: a coupling shows
        probe = tf.random.stateless_normal(shape, seed=seed, dtype=dtype)
        expected = np.asarray(diag * probe, np.float64)
        gap = np.abs(np.asarray(op.fn(probe), np.float64) - expected)
        if not np.all(gap <= 8 * dtype_eps(dtype) * np.abs(expected)):
            return None
    diag = np.asarray(diag, np.float64).reshape(-1)
    return diag if np.all(np.isfinite(diag)) else None


def diagonal_spectrum(diag: np.ndarray, top_k: int | None = None) -> Spectrum:
    """The exact SVD of ``diag(d)``: singular values ``|d_i|`` in decreasing order, right
    vectors the unit basis vectors, left ones the same with the signs of ``d_i``.

    A BatchNormalization that neither follows nor precedes a linear layer directly (at the
    start of a chain, ``BatchNormalization → ReLU → Conv2D``) is its own linear group, with
    every per-channel scale repeated over the whole grid: a subspace iteration for its top
    triplets meets a spectrum of huge multiplicities (18 s without settling on a 26×26×16
    map), while this is exact and immediate.

    Truncation to ``top_k`` breaks ties by position (the first entries in flattened order): a
    scale repeated over a grid keeps one corner of it. With ``remainder=True`` (the default)
    SeqLip adds the dropped part back through ``rest``; with ``remainder=False`` it ignores it,
    an estimate that can then be far below the truth.

    Args:
        diag: The diagonal (flattened).
        top_k: Triplets kept (``None``: all); ``rest`` is then the next singular value.

    Example:
        >>> spec = diagonal_spectrum(np.array([0.5, -2.0, 1.0]), top_k=2)
        >>> spec.s.tolist(), spec.rest, spec.u[:, 0].tolist()
        ([2.0, 1.0], 0.5, [0.0, -1.0, 0.0])
    """
    diag = np.asarray(diag, np.float64).reshape(-1)
    n = len(diag)
    order = np.argsort(-np.abs(diag), kind="stable")
    keep = n if top_k is None else min(n, int(top_k))
    idx, cols = order[:keep], np.arange(keep)
    v = np.zeros((n, keep))
    v[idx, cols] = 1.0
    u = np.zeros((n, keep))
    u[idx, cols] = np.where(diag[idx] < 0, -1.0, 1.0)
    rest = float(abs(diag[order[keep]])) if keep < n else 0.0
    return Spectrum(np.abs(diag[idx]), u, v, rest, True, "diagonal", diagonal=diag)


DENSE_LIMIT = 2 ** 25
"""Default ``dense_limit``: most matrix entries materialised for a dense SVD (268 MB in float64)."""

DENSE_SVD_FLOPS = 2 ** 34
"""Largest ``entries × smaller side`` (about the flops of a dense SVD) taken by the dense route:
a thin 10816×784 convolution (6.6·10⁹, 0.9 s) is decomposed exactly, a square 4096×4096 map
(6.9·10¹⁰) goes to the subspace iteration."""


GRAM_SIDE = 4096
"""Largest smaller side of an operator, beyond the dense route, decomposed through its Gram
matrix (``JᵀJ`` or ``JJᵀ`` from that many products, then one symmetric eigendecomposition)
instead of the block subspace iteration: on a CIFAR CNN whose first convolution has 3072 inputs
and second (stride 2) 4096 outputs, SeqLip takes 32.7 s this way and 168.7 s by the iteration
(2 cores, top_k=200; ``python benchmarks/seqlip.py --only cifar_cnn`` runs both)."""

_GRAM_CHUNK_BYTES = 48 << 20


def _gram_spectrum(op: LinearOperator, out_size: int, top_k: int) -> Spectrum:
    """The top ``top_k`` singular triplets of ``op`` from the eigendecomposition of its Gram
    matrix on its smaller side (``n`` products ``JᵀJ e_j``, or ``J Jᵀ e_i`` on the output side:
    a reverse then a forward pass), in float64 after the products; the other vectors by one
    application of ``J`` (or ``Jᵀ``) to them, divided by ``σ``. ``rest`` is the next singular
    value. The products run on the solver's preparation (:func:`~tf_lipschitz.power.
    prepare_operator`: half precision applied in its dtype, iterated in float32, the map
    divided by a power of two). An estimate: the products round in the operator's dtype."""
    n_in = op.size
    side = min(n_in, out_size)
    start = np.random.default_rng(0).standard_normal((1, *op.input_shape)).astype(op.dtype)
    prep = prepare_operator(op.fn, bind_adjoint(op.adjoint, tf.as_dtype(op.dtype)),
                            tf.constant(start))
    dtype = prep.start.dtype
    out_shape = tuple(prep.fn(prep.start).shape[1:])
    batch = max(1, _GRAM_CHUNK_BYTES // (4 * max(n_in, out_size)))

    def adjoint(y):  # Jᵀ y for a batch of flattened output vectors, flattened
        y = tf.reshape(y, (-1, *out_shape))
        if prep.adjoint is not None:
            x = prep.adjoint(y)
        else:
            zeros = tf.zeros((y.shape[0], *op.input_shape), dtype)
            with tf.GradientTape() as tape:
                tape.watch(zeros)
                out = prep.fn(zeros)
            x = tape.gradient(out, zeros, output_gradients=tf.cast(y, out.dtype))
        return tf.reshape(tf.cast(x, dtype), (y.shape[0], -1))

    def forward(x):  # J x for a batch of flattened input vectors, flattened
        y = prep.fn(tf.reshape(x, (-1, *op.input_shape)))
        return tf.reshape(tf.cast(y, dtype), (x.shape[0], -1))

    gram = np.empty((side, side))
    for first, basis in basis_blocks(side, batch, dtype.as_numpy_dtype):
        e = tf.constant(basis)
        block = adjoint(forward(e)) if side == n_in else forward(adjoint(e))
        gram[first:first + len(basis)] = np.asarray(block, np.float64)
    lam, vecs = np.linalg.eigh(0.5 * (gram + gram.T))  # ascending
    lam, vecs = lam[::-1], vecs[:, ::-1]
    keep = min(top_k, side)
    s_all = np.sqrt(np.maximum(lam, 0.0))
    s, small = s_all[:keep], vecs[:, :keep]
    alive = s > 0
    apply = forward if side == n_in else adjoint  # V → J V, or U → Jᵀ U
    other = np.asarray(apply(tf.constant(small.T.astype(dtype.as_numpy_dtype))), np.float64).T
    other = np.where(alive, other / np.where(alive, s, 1.0), 0.0)
    u, v = (other, small) if side == n_in else (small, other)
    scale = float(prep.scale)
    rest = float(s_all[keep]) * scale if keep < side else 0.0
    return Spectrum(s * scale, u, v, rest, False, "gram",
                    side * (1 if side == n_in else 2) + keep)


def dense_route(out_size: int, in_size: int, dense_limit: int) -> bool:
    """Whether an ``out_size × in_size`` operator is materialised for an exact dense SVD: at
    most ``dense_limit`` entries and a decomposition of at most :data:`DENSE_SVD_FLOPS`."""
    entries = out_size * in_size
    return entries <= dense_limit and entries * min(out_size, in_size) <= DENSE_SVD_FLOPS


def spectrum_route(out_size: int, in_size: int, dense_limit: int) -> str:
    """How :func:`operator_spectrum` decomposes an ``out_size × in_size`` operator.

    ``"svd"`` (dense, :func:`dense_route`), ``"gram"`` (smaller side at most
    :data:`GRAM_SIDE`) or ``"subspace"``: the block subspace iteration for the top
    ``top_k + 1`` triplets, ``top_k + 9`` operator products per iteration for up to
    ``subspace_max_iter`` iterations: at 34 ms per product, up to 35 minutes for one
    224×224 VGG16 convolution.

    Example:
        >>> spectrum_route(10, 20, DENSE_LIMIT), spectrum_route(10 ** 5, 10 ** 5, DENSE_LIMIT)
        ('svd', 'subspace')
    """
    if dense_route(out_size, in_size, dense_limit):
        return "svd"
    return "gram" if min(out_size, in_size) <= GRAM_SIDE else "subspace"


def operator_spectrum(
    op: LinearOperator,
    out_size: int,
    *,
    top_k: int = 200,
    dense_limit: int = DENSE_LIMIT,
    tol: float = 1e-5,
    max_iter: int = 300,
) -> Spectrum:
    """Singular triplets of an operator: all of them by dense SVD when small, else the top ``k``
    (from the Gram matrix on the smaller side when it is at most :data:`GRAM_SIDE`, else by
    block subspace iteration).

    Args:
        op: The operator, on its real input shape.
        out_size: Number of output entries per example.
        top_k: Triplets kept by the iterative path (one more is computed to bound the rest).
        dense_limit: Largest ``out_size × in_size`` materialised for a dense SVD (see
            :func:`dense_route`).
        tol: Relative tolerance of the block subspace iteration.
        max_iter: Cap on block iterations.

    Returns:
        A :class:`Spectrum`.
    """
    tol = check_tol(tol, default=1e-5)
    top_k = check_int(top_k, "top_k", minimum=1)
    route = spectrum_route(out_size, op.size, dense_limit)
    if route == "svd":
        m = tf.constant(op.to_dense().astype(np.float64))
        s, u, v = tf.linalg.svd(m, full_matrices=False)  # m = u diag(s) vᵀ
        return Spectrum(s.numpy(), u.numpy(), v.numpy(), 0.0, True, "svd")
    if route == "gram":
        return _gram_spectrum(op, out_size, top_k)
    k = int(min(top_k + 1, op.size, out_size))
    trip = top_singular_triplets(op, k, tol=tol, max_iter=max_iter)
    if not trip.converged:
        warnings.warn(
            f"SeqLip: the top {k} singular triplets of operator '{op.name}' did not settle to "
            f"subspace_tol={tol:g} (or the rounding floor of the iteration's dtype) within "
            f"subspace_max_iter={max_iter} block iterations "
            f"(largest relative residual {trip.residual:.2g}). Its singular values, which "
            "approach from below, and the remainder bound may be low: raise "
            "subspace_max_iter or subspace_tol.", RuntimeWarning, stacklevel=2)
    s = trip.s.astype(np.float64)
    u = trip.u.reshape(len(s), -1).T.astype(np.float64)
    v = trip.v.reshape(len(s), -1).T.astype(np.float64)
    complete = k >= min(op.size, out_size)
    keep = len(s) if complete else len(s) - 1
    rest = 0.0 if complete else float(s[-1])
    return Spectrum(s[:keep], u[:, :keep], v[:, :keep], rest, False, "subspace",
                    trip.products, trip.residual)


# --------------------------------------------------------------------------------------------
# Chains in the graph
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Link:
    """The elementwise activations between two consecutive linear groups of a chain.

    Attributes:
        nodes: Activation-only nodes between the groups (an activation inside the first
            group's last layer, ``Dense(activation="relu")``, has no node of its own).
        activations: The activations, in order.
        slopes: ``(lo, hi)``: range of the derivative of their composition.
        certified: Whether all their constants are certified.
    """

    nodes: tuple[int, ...]
    activations: tuple[Activation, ...]
    slopes: tuple[float, float]
    certified: bool


@dataclasses.dataclass(frozen=True)
class Chain:
    """Linear groups ``g_1 → σ → g_2 → … → g_K`` handled by SeqLip (``K ≥ 2``).

    Attributes:
        groups: The fused linear groups, in order.
        links: ``K − 1`` links between them.
    """

    groups: tuple[Group, ...]
    links: tuple[Link, ...]

    @property
    def nodes(self) -> tuple[int, ...]:
        out: list[int] = []
        for k, g in enumerate(self.groups):
            out.extend(sorted(g.nodes + g.inner))
            if k < len(self.links):
                out.extend(self.links[k].nodes)
        return tuple(out)


def _compose_slopes(acts: Sequence[Activation]) -> tuple[float, float] | None:
    lo, hi = 1.0, 1.0
    for act in acts:
        if act.slope_range is None or act.slope_range[0] < 0:
            return None
        lo, hi = lo * act.slope_range[0], hi * act.slope_range[1]
    return lo, hi


def find_chains(graph: ModelGraph, bounds: dict[int, LayerBound],
                groups: Sequence[Group]) -> tuple[list[Chain], list[str]]:
    """Maximal chains of linear groups joined by elementwise activations.

    Two groups are linked when the first one's output goes only (through activation layers
    that feed nothing else) into the second one, and the composed activation derivative lies
    in ``[lo, hi]`` with ``lo ≥ 0``. Links whose activation has negative slopes (GELU, SiLU)
    or is not elementwise (softmax) are left to AutoLip.

    Returns:
        The chains with at least two groups, and one note per link left to AutoLip.
    """
    first = {g.nodes[0]: g for g in groups}
    outputs = set(graph.outputs)
    following: dict[Group, tuple[Group, Link]] = {}
    notes: list[str] = []

    def name(g):
        return "+".join(graph.nodes[i].name for i in g.nodes)

    for g in groups:
        node = g.nodes[-1]
        acts = group_activations(g, bounds)  # a group's inner activations act after it
        certified = all(a.certified for a in acts)
        link_nodes: list[int] = []
        while node not in outputs and len(graph.nodes[node].consumers) == 1:
            nxt = graph.nodes[node].consumers[0]
            bound = bounds.get(nxt)
            if not (isinstance(bound, Constant) and bound.activation is not None):
                break
            acts.append(bound.activation)
            certified &= bound.certified and bound.activation.certified
            link_nodes.append(nxt)
            node = nxt
        if node in outputs or len(graph.nodes[node].consumers) != 1:
            continue
        target = first.get(graph.nodes[node].consumers[0])
        if target is None or target.parent != node:
            continue
        slopes = _compose_slopes(acts)
        if slopes is None:
            desc = ", ".join(f"{a.name} {a.slope_range}" for a in acts)
            notes.append(
                f"'{name(g)}' → '{name(target)}': activation {desc} has negative slopes or is not "
                "elementwise; AutoLip used across this link."
            )
            continue
        following[g] = (target, Link(tuple(link_nodes), tuple(acts), slopes, certified))

    targets = {t for t, _ in following.values()}
    chains = []
    for g in groups:
        if g in targets or g not in following:
            continue
        members, links = [g], []
        while members[-1] in following:
            nxt, link = following[members[-1]]
            members.append(nxt)
            links.append(link)
        chains.append(Chain(tuple(members), tuple(links)))
    return chains, notes


# --------------------------------------------------------------------------------------------
# SeqLip on a model graph
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pair:
    value: float
    certified: bool
    certificate: float | None
    mode: str
    width: int
    evaluated: int
    truncated: bool
    dropped: float  # largest σ_{E+1} / σ_1 left out of the two decompositions
    note: str
    capped: bool = False  # the remainder of the truncation lifted the factor to AutoLip's
    outcome: str = ""  # shown after the mode: "= AutoLip factor", "reaches its certificate"


def _diagonal_pair(left: Spectrum, right: Spectrum, slopes: tuple[float, float], t_left,
                   t_right) -> PatternMax:
    """The inner max of a pair whose one side is an elementwise scaling, in closed form.

    With ``A = diag(w)`` (the scaling after the activations; ``B`` the side before), every
    ``d ∈ [lo, hi]^n`` gives ``‖diag(w) diag(d) B‖ = ‖diag(d) diag(w) B‖ ≤ m ‖diag(w) B‖``
    (``m = max(|lo|, |hi|)``, ``‖diag(d)‖ ≤ m``), with equality at ``d = ±m``: the max is
    ``m ‖diag(w) B‖``; likewise ``m ‖A diag(w)‖`` for a scaling before them (its left
    singular vectors' signs are an orthogonal diagonal, which drops out of the norm). Every
    triplet of the other side enters (``top_k`` does not truncate it); when that side is
    iterative, its remainder ``B_⊥`` (norm at most ``rest``) enters as a column block:
    ``‖[X, Y]‖² ≤ ‖X‖² + ‖Y‖²``.
    """
    m = max(abs(slopes[0]), abs(slopes[1]))
    n = len(left.diagonal if left.diagonal is not None else right.diagonal)
    pattern = np.full(n, slopes[1] if abs(slopes[1]) >= abs(slopes[0]) else slopes[0])
    if left.diagonal is not None and right.diagonal is not None:
        value = float(np.max(t_right(np.abs(right.diagonal)) * t_left(np.abs(left.diagonal))))
    elif right.diagonal is not None:
        w = t_right(np.abs(right.diagonal))
        core = _norm2(w[:, None] * (left.u * t_left(left.s)))
        value = math.hypot(core, float(np.max(w)) * float(t_left(left.rest)))
    else:
        w = t_left(np.abs(left.diagonal))
        core = _norm2((right.v * t_right(right.s)).T * w[None, :])
        value = math.hypot(core, float(np.max(w)) * float(t_right(right.rest)))
    return PatternMax(m * value, "diagonal", True, pattern, n)


def _block_norm(f11: float, f12: float, f21: float, f22: float) -> float:
    """``‖[[f11, f12], [f21, f22]]‖₂``: bounds a 2×2 block matrix by its blocks' norms."""
    return float(np.linalg.norm(np.array([[f11, f12], [f21, f22]]), 2))


class SeqLip:
    """SeqLip on a model graph: SeqLip on every chain, AutoLip across the rest.

    Built on an :class:`~tf_lipschitz.autolip.AutoLip` (its fused groups, operators, rules and
    propagation are reused). Use it through :meth:`tf_lipschitz.LipschitzEstimator.seqlip`.

    Args:
        autolip: The AutoLip engine of the model.
    """

    def __init__(self, autolip: AutoLip):
        self.autolip = autolip
        self.graph = autolip.graph
        self.bounds = evaluate_rules(self.graph)
        self.chains, self.fallbacks = find_chains(self.graph, self.bounds, autolip.groups)

    def _group_name(self, group: Group) -> str:
        return "+".join(self.graph.nodes[i].name for i in group.nodes)

    def _out_size(self, group: Group) -> int:
        return int(np.prod(self.graph.nodes[group.nodes[-1]].output_shapes[0]))

    def _diagonal(self, group: Group, op: LinearOperator) -> np.ndarray | None:
        """The diagonal of a group of per-channel scalings (:func:`_diagonal_of`), else None."""
        if all(self.bounds[i].diagonal for i in group.nodes):
            return _diagonal_of(op)
        return None

    def _needs_subspace(self, group: Group, dense_limit: int) -> bool:
        """Whether the group's spectrum would come from the block subspace iteration."""
        op = self.autolip.operator(group, self.bounds)
        return (spectrum_route(self._out_size(group), op.size, dense_limit) == "subspace"
                and self._diagonal(group, op) is None)

    def _cut_large(self, dense_limit: int) -> tuple[list[Chain], list[Group]]:
        """The chains cut at every group that would need the block subspace iteration.

        A chain ``C_2 ∘ σ_2 ∘ M ∘ σ_1 ∘ C_1`` cut at the operator ``M`` is bounded by
        ``L(C_2) · L(σ_2) · ‖M‖ · L(σ_1) · L(C_1)``, since ``L(f ∘ g) ≤ L(f) L(g)``: SeqLip on
        the parts ``C_1, C_2`` that keep a pair, AutoLip on the rest (``M``, the activations,
        a lone group). Every pair factor is capped by its AutoLip factor and these telescope,
        so the result is at most AutoLip's.

        Returns:
            The chains (parts of at least two groups) and the groups cut out.
        """
        chains, large = [], []
        for chain in self.chains:
            cuts = [k for k, g in enumerate(chain.groups) if self._needs_subspace(g, dense_limit)]
            large += [chain.groups[k] for k in cuts]
            ends = [-1, *cuts, len(chain.groups)]
            for a, b in zip(ends, ends[1:]):  # groups a+1 … b-1 and the links between them
                if b - a > 2:
                    chains.append(Chain(chain.groups[a + 1:b], chain.links[a + 1:b - 1]))
        return chains, large

    def _spectrum(self, group: Group, top_k, dense_limit, tol, max_iter) -> Spectrum:
        op = self.autolip.operator(group, self.bounds)
        out_size = self._out_size(group)
        diag = self._diagonal(group, op)
        if diag is not None:  # BatchNormalization → ReLU at a chain start...
            # The scales were computed in the model's precision (γ·rsqrt(var + ε) is up to
            # ~2 units below its exact value in float32); widened so that they bound it.
            diag = diag * (1.0 + 8 * dtype_eps(op.dtype))
            # Its pairs read the whole diagonal (_diagonal_pair); the triplets kept only
            # serve the report, so top_k of them suffice (n × n unit vectors would not)
            return diagonal_spectrum(diag, top_k)
        return operator_spectrum(op, out_size, top_k=top_k, dense_limit=dense_limit,
                                 tol=tol, max_iter=max_iter)

    def _pair(self, k: int, chain: Chain, spectra: list[Spectrum], *, mode, top_k,
              max_exact_width, remainder, max_sweeps, verbose,
              exponents: tuple[float, float] = (0.5, 0.5)) -> _Pair:
        """Factor ``k`` of a chain: between groups ``k`` and ``k + 1``.

        ``exponents`` are ``(e_k, e_{k+1})``: the factor holds ``Σ_k^{e_k}`` on its right and
        ``Σ_{k+1}^{1 − e_{k+1}}`` on its left (the first layer's ``e`` is 1, the last one's 0).
        """
        left, right = spectra[k], spectra[k + 1]
        link = chain.links[k]
        lo, hi = link.slopes
        n = left.u.shape[0]
        last = len(chain.groups) - 1
        e_left = 1.0 if k == 0 else float(exponents[0])  # Σ̃_1 = Σ_1
        e_right = 0.0 if k + 1 == last else float(exponents[1])  # Σ̃_K = Σ_K

        def t_left(x):
            return np.power(x, e_left)

        def t_right(x):
            return np.power(x, 1.0 - e_right)
        names = f"'{self._group_name(chain.groups[k])}' → '{self._group_name(chain.groups[k + 1])}'"
        if mode == "auto":
            choice = "exact" if n <= max_exact_width else "greedy"
        elif mode == "exact" and n > max_exact_width:
            raise InvalidArgumentError(
                f"SeqLip pair {names} has {n} activations: exact enumeration of 2^{n} patterns "
                f"exceeds max_exact_width={max_exact_width}. Use mode='auto' (exact where "
                "possible, greedy elsewhere), 'greedy' or 'certified', or raise max_exact_width "
                f"(at most {EXACT_WIDTH_LIMIT})."
            )
        else:
            choice = mode
        # Exact enumeration reduces to n × n matrices anyway: keep every triplet there.
        keep_l = len(left.s) if choice == "exact" else min(len(left.s), top_k)
        keep_r = len(right.s) if choice == "exact" else min(len(right.s), top_k)
        rho_l = max(left.rest, float(left.s[keep_l]) if keep_l < len(left.s) else 0.0)
        rho_r = max(right.rest, float(right.s[keep_r]) if keep_r < len(right.s) else 0.0)
        if left.diagonal is not None or right.diagonal is not None:
            # No pattern to search: one norm through every triplet of the other side, exact
            # (always flagged certified, so the matrices a, b of a certificate are not needed)
            inner = _diagonal_pair(left, right, (lo, hi), t_left, t_right)
            rho_l = rho_r = 0.0
            a = b = None
        else:
            b = left.u[:, :keep_l] * t_left(left.s[:keep_l])  # U_k Σ̃_k, (n, r_k)
            a = (right.v[:, :keep_r] * t_right(right.s[:keep_r])).T  # Σ̃_{k+1} V_{k+1}ᵀ, (r, n)
            inner = pattern_max(a, b, (lo, hi), mode=choice, max_sweeps=max_sweeps,
                                verbose=verbose, label=f"SeqLip {names}")
        m = max(abs(lo), abs(hi))
        s1_l = float(left.s[0]) if len(left.s) else 0.0
        s1_r = float(right.s[0]) if len(right.s) else 0.0
        autolip_factor = m * float(t_right(s1_r)) * float(t_left(s1_l))
        tails = (m * float(t_right(s1_r)) * float(t_left(rho_l)),
                 m * float(t_right(rho_r)) * float(t_left(s1_l)),
                 m * float(t_right(rho_r)) * float(t_left(rho_l)))
        truncated = rho_l > 0 or rho_r > 0
        capped = False
        if truncated and remainder:
            value = min(_block_norm(inner.value, *tails), autolip_factor)
            capped = value == autolip_factor and inner.value < autolip_factor * (1 - 1e-6)
        else:
            value = min(inner.value, autolip_factor)
        exact_svd = left.exact and right.exact
        certificate = None
        if exact_svd and link.certified:
            cert = inner.value if inner.certified else _certified_bound(a, b, lo, hi)
            certificate = min(_block_norm(cert, *tails) if truncated else cert, autolip_factor)
        certified = (inner.certified and exact_svd and link.certified
                     and (remainder or not truncated))
        outcome = ""
        if not certified and certificate is not None and value >= certificate:
            # A greedy (or truncated) value that reaches its certificate is proven: the
            # certificate is an upper bound, and the value is at least that (both are often
            # AutoLip's factor, which caps them).
            value, certified = certificate, True
            outcome = "reaches its certificate"
        if value >= autolip_factor * (1 - 1e-12):
            outcome = "= AutoLip factor"  # the search gained nothing: say so in the table
        parts = [f"{'+'.join(a.name for a in link.activations) or 'identity'} slopes "
                 f"[{lo:.4g}, {hi:.4g}], {n} activations"]
        if inner.mode == "exact":
            parts.append(f"{inner.evaluated} of 2^{n} patterns evaluated exactly")
        if inner.mode == "diagonal":
            parts.append("a per-channel scaling on one side: m·‖scaled side‖, exact")
        if truncated:
            how = "added back" if remainder else "ignored (estimate)"
            parts.append(f"top {keep_l}/{keep_r} singular triplets, remainder σ {rho_l:.3g}/"
                         f"{rho_r:.3g} {how}")
        if not exact_svd:
            parts.append("iterative singular triplets (estimates)")
        if (e_left, e_right) != (1.0 if k == 0 else 0.5, 0.0 if k + 1 == last else 0.5):
            parts.append(f"split Σ^{e_left:g} | Σ^{1 - e_right:g}")
        dropped = max(rho_l / s1_l if s1_l > 0 else 0.0, rho_r / s1_r if s1_r > 0 else 0.0)
        if capped:
            parts.append("the remainder lifts it to the AutoLip factor: raise top_k")
        return _Pair(value, certified, certificate, inner.mode, n, inner.evaluated, truncated,
                     dropped, "; ".join(parts), capped, outcome)

    def _chain_pairs(self, chain: Chain, spectra: list[Spectrum], split: str, verbose: int,
                     **options) -> tuple[list[_Pair], list[float]]:
        """The pair factors of one chain and the split exponents ``e_i`` they use.

        With ``split="optimize"`` the exponents are searched by coordinate descent. Exact
        enumeration is too slow to run for every candidate, so exact (and auto) pairs are
        searched with the greedy inner max as a proxy; the product is then computed in the
        requested mode at the exponents found and at the paper's, and the smaller one is kept.
        """
        last = len(chain.groups) - 1
        paper = [1.0] + [0.5] * (last - 1) + [0.0]
        cache: dict[tuple, _Pair] = {}

        def factor(k: int, exps: Sequence[float], opts: dict) -> _Pair:
            key = (k, exps[k], exps[k + 1], opts["mode"])
            if key not in cache:
                cache[key] = self._pair(k, chain, spectra, exponents=key[1:3], verbose=verbose,
                                        **opts)
            return cache[key]

        def product(exps, opts):
            return math.prod(factor(k, exps, opts).value for k in range(last))

        if split != "optimize" or last < 2:
            return [factor(k, paper, options) for k in range(last)], paper
        proxy = dict(options, mode="greedy") if options["mode"] in ("exact", "auto") else options
        exps = list(paper)
        for _ in range(2):  # coordinate descent; a second round rarely changes anything
            changed = False
            for i in range(1, last):
                start = exps[i]
                best_e = start
                best = factor(i - 1, exps, proxy).value * factor(i, exps, proxy).value
                for e in SPLIT_GRID:
                    exps[i] = e
                    value = factor(i - 1, exps, proxy).value * factor(i, exps, proxy).value
                    if value < best * (1 - 1e-12):
                        best_e, best = e, value
                exps[i] = best_e
                changed = changed or best_e != start
            if not changed:
                break
        if product(exps, options) >= product(paper, options):
            exps = paper
        if verbose:
            print(f"tf_lipschitz: SeqLip split exponents {exps[1:-1]} ({len(cache)} pair "
                  "factors evaluated)", flush=True)
        return [factor(k, exps, options) for k in range(last)], exps

    def _segment(self, chain: Chain, spectra: list[Spectrum], pairs: list[_Pair],
                 exps: Sequence[float]) -> Segment:
        graph, bounds = self.graph, self.bounds
        rows: dict[int, LayerRow] = {}
        prefix = 1.0  # product of the factors so far
        cumulative = 1.0
        last_index = len(chain.groups) - 1
        for k, group in enumerate(chain.groups):
            nodes = [graph.nodes[i] for i in group.nodes]
            spec = spectra[k]
            s1 = float(spec.s[0]) if len(spec.s) else 0.0
            acts = group_activations(group, bounds)
            act_lip = math.prod(a.lipschitz for a in acts)
            common = dict(
                name="+".join(n.name for n in nodes),
                class_name="+".join(n.class_name for n in nodes),
                kind="linear", input_shape=nodes[0].input_shapes[0],
                output_shape=nodes[-1].output_shapes[0],
                activation="+".join(a.name for a in acts) or None,
                products=spec.products, residual=spec.residual,
            )
            if k == 0:
                cumulative = s1 * act_lip
                rows[group.nodes[-1]] = LayerRow(
                    **common, lipschitz=None, norm=s1, certificate=s1 if spec.exact else None,
                    bound_kind=CERTIFIED if spec.exact else ESTIMATE,
                    method=f"seqlip-start ({spec.method})", cumulative=cumulative,
                    note=f"SeqLip chain start: ‖M‖ = {s1:.4g} enters the next pair's factor",
                )
            else:
                pair = pairs[k - 1]
                prefix *= pair.value
                post = act_lip if k == last_index else 1.0
                cumulative = (prefix * post if k == last_index
                              else prefix * s1 ** exps[k] * act_lip)
                rows[group.nodes[-1]] = LayerRow(
                    **common, lipschitz=pair.value * post, norm=pair.value,
                    certificate=pair.certificate,
                    bound_kind=CERTIFIED if pair.certified else ESTIMATE,
                    method=f"seqlip-{pair.mode}" + (f" ({pair.outcome})" if pair.outcome
                                                     else ""), cumulative=cumulative,
                    note=f"pair factor; {pair.note}; ‖M‖ = {s1:.4g} ({spec.method})",
                )
            if k < len(chain.links) and chain.links[k].nodes:
                link = chain.links[k]
                for i, a in zip(link.nodes, link.activations[-len(link.nodes):]):
                    node = graph.nodes[i]
                    cumulative *= a.lipschitz
                    rows[i] = LayerRow(
                        node.name, node.class_name, "constant", node.input_shapes[0],
                        node.output_shapes[0], lipschitz=None, activation=a.name,
                        bound_kind=CERTIFIED if pairs[k].certified else ESTIMATE,
                        method="seqlip", cumulative=cumulative,
                        note=f"inside SeqLip pair factor {k + 1} (slopes {a.slope_range})",
                    )
        last = group_activations(chain.groups[-1], bounds)
        post = math.prod(a.lipschitz for a in last)
        certified = all(p.certified for p in pairs) and all(a.certified for a in last)
        return Segment(chain.groups[0].parent, chain.nodes, prefix * post, certified, rows)

    def run(
        self,
        mode: str = "auto",
        *,
        top_k: int = 200,
        max_exact_width: int = 20,
        remainder: bool = True,
        dense_limit: int = DENSE_LIMIT,
        max_sweeps: int = 10,
        split: str = "sqrt",
        subspace_tol: float = 1e-5,
        subspace_max_iter: int = 300,
        large_operators: str = "subspace",
        certified: bool = False,
        init="warm",
        spectral: dict[Group, SpectralResult] | None = None,
        model_name: str = "model",
        verbose: int = 0,
    ) -> LipschitzReport:
        """Computes the SeqLip bound of the model.

        Args:
            mode: ``"auto"`` (exact where a link has at most ``max_exact_width`` activations,
                greedy elsewhere), ``"exact"``, ``"greedy"`` or ``"certified"``.
            top_k: Singular triplets kept per operator for greedy/certified pairs and for
                operators too large for a dense SVD (the paper's ``E``).
            max_exact_width: Widest link enumerated exactly (``2^n`` patterns).
            remainder: Bound the singular values beyond ``top_k`` by ``σ_{top_k+1}`` and add
                them back (``False`` reproduces the paper's truncation, an estimate).
            dense_limit: Largest ``out × in`` operator materialised for an exact dense SVD
                (and only when the SVD is cheap enough: :func:`dense_route`).
            max_sweeps: Cap on greedy sweeps.
            split: ``"sqrt"`` (the paper's ``Σ^{1/2} Σ^{1/2}`` split of inner layers) or
                ``"optimize"`` (search the split exponents; never larger, several times the
                pair evaluations). Each split is a valid bound; with greedy pairs the minimum
                over splits is an estimate like each of them.
            subspace_tol: Tolerance of the iterative triplets of large operators.
            subspace_max_iter: Cap on their block iterations.
            large_operators: What to do with an operator that only the block subspace
                iteration can decompose (beyond ``dense_limit`` and both sides above
                :data:`GRAM_SIDE`; each iteration costs ``top_k + 9`` products, up to 35
                minutes on a 224×224 VGG16 convolution). ``"subspace"`` (the paper's
                truncated SVD) runs it;
                ``"autolip"`` cuts the chain there: the parts before and after stay SeqLip
                chains when they keep a pair, and the operator contributes its AutoLip factor
                (an estimate, or certified with ``certified=True``), a valid bound since
                ``L(f ∘ g) ≤ L(f) L(g)``, at most AutoLip's. Such operators are listed in
                ``settings["autolip_operators"]`` and named in a warning.
            certified: Use certified per-layer norms in the AutoLip parts.
            init: Starting vectors of the AutoLip spectral solver.
            spectral: Precomputed AutoLip solver results.
            model_name: Name shown in the report.
            verbose: 1 shows progress.

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport` with ``method="seqlip"``.
        """
        check_options(mode, top_k=top_k, max_exact_width=max_exact_width, remainder=remainder,
                      dense_limit=dense_limit, max_sweeps=max_sweeps, split=split,
                      subspace_tol=subspace_tol, subspace_max_iter=subspace_max_iter,
                      large_operators=large_operators)
        start = time.perf_counter()
        chains, large = (self._cut_large(dense_limit) if large_operators == "autolip"
                         else (self.chains, []))
        if large:
            self._warn_large(large, top_k, subspace_max_iter)
        n_steps = sum(2 * len(c.groups) - 1 for c in chains)
        bar = progress_bar(n_steps, unit_name="step", label="SeqLip",
                           verbose=verbose if n_steps else 0)
        if verbose:
            print(f"tf_lipschitz: SeqLip on '{model_name}': {len(chains)} chain(s), "
                  f"{sum(len(c.links) for c in chains)} pair factor(s), mode={mode!r}.", flush=True)
        done = 0
        segments, summary = [], []
        seconds = {"spectra": 0.0, "pairs": 0.0}
        for chain in chains:
            spectra = []
            for group in chain.groups:
                tick = time.perf_counter()
                spectra.append(self._spectrum(group, top_k, dense_limit, subspace_tol,
                                              subspace_max_iter))
                seconds["spectra"] += time.perf_counter() - tick
                done += 1
                if bar is not None:
                    bar.update(done)
            tick = time.perf_counter()
            pairs, exps = self._chain_pairs(
                chain, spectra, split, verbose, mode=mode, top_k=top_k,
                max_exact_width=max_exact_width, remainder=remainder, max_sweeps=max_sweeps)
            seconds["pairs"] += time.perf_counter() - tick
            for k, pair in enumerate(pairs):
                summary.append({
                    "pair": f"{self._group_name(chain.groups[k])} -> "
                            f"{self._group_name(chain.groups[k + 1])}",
                    "mode": pair.mode, "width": pair.width, "value": pair.value,
                    "kind": CERTIFIED if pair.certified else ESTIMATE,
                    "certificate": pair.certificate, "truncated": pair.truncated,
                    "dropped_sigma_ratio": pair.dropped, "capped_by_remainder": pair.capped,
                    "split": [exps[k], exps[k + 1]],
                })
                done += 1
                if bar is not None:
                    bar.update(done)
            segments.append(self._segment(chain, spectra, pairs, exps))
        ignored = [p for p in summary if p["truncated"] and p["dropped_sigma_ratio"] > 0.1]
        if ignored and not remainder:
            worst = max(ignored, key=lambda p: p["dropped_sigma_ratio"])
            warnings.warn(
                f"SeqLip with remainder=False ignored singular values up to "
                f"{worst['dropped_sigma_ratio']:.0%} of σ_1 in {len(ignored)} pair(s) (worst: "
                f"{worst['pair']}); the result is an estimate that can be far below the true "
                "constant. Use remainder=True, or a larger top_k.",
                stacklevel=3,
            )
        capped = [p for p in summary if p["capped_by_remainder"]]
        if capped:
            worst = max(capped, key=lambda p: p["dropped_sigma_ratio"])
            warnings.warn(
                f"SeqLip: {len(capped)} of {len(summary)} pair factor(s) gained nothing over "
                f"AutoLip because the singular values beyond the top_k={top_k} kept (up to "
                f"{worst['dropped_sigma_ratio']:.0%} of σ_1, in {worst['pair']}) are bounded "
                "and added back: raise top_k for a tighter bound.", stacklevel=3)
        if spectral is None:  # the solver is only needed for groups outside every chain
            covered = {g for chain in chains for g in chain.groups}
            outside = [g for g in self.autolip.iterative if g not in covered]
            spectral = self.autolip.spectral(init=init) if outside else {}
        report = self.autolip.run(certified=certified, spectral=spectral, segments=segments,
                                  model_name=model_name)
        settings = {
            "mode": mode, "top_k": top_k, "max_exact_width": max_exact_width,
            "remainder": remainder, "dense_limit": dense_limit, "max_sweeps": max_sweeps,
            "split": split, "large_operators": large_operators,
            "autolip_operators": [self._sizes(g) for g in large], "certified_mode": certified,
            "autolip_parts": report.settings, "pairs": summary, "fallbacks": list(self.fallbacks),
            "seconds": seconds,
        }
        names = {self._group_name(g) for g in large}
        layers = tuple(dataclasses.replace(row, method=f"{row.method} (AutoLip factor: large)")
                       if row.kind == "linear" and row.name in names else row
                       for row in report.layers)
        return dataclasses.replace(report, method="seqlip", settings=settings, layers=layers,
                                   elapsed=time.perf_counter() - start)

    def _sizes(self, group: Group) -> dict:
        first, last = self.graph.nodes[group.nodes[0]], self.graph.nodes[group.nodes[-1]]
        return {"name": self._group_name(group),
                "input_shape": list(first.input_shapes[0]),
                "output_shape": list(last.output_shapes[0]),
                "input_size": int(np.prod(first.input_shapes[0])),
                "output_size": self._out_size(group)}

    def _warn_large(self, large: list[Group], top_k: int, max_iter: int) -> None:
        shown = ", ".join(f"'{d['name']}' ({d['input_size']} → {d['output_size']} entries)"
                          for d in map(self._sizes, large[:5]))
        more = f" and {len(large) - 5} more" if len(large) > 5 else ""
        warnings.warn(
            f"SeqLip kept the AutoLip factor of {len(large)} operator(s) too large for a dense "
            f"SVD or the Gram route (both sides above GRAM_SIDE={GRAM_SIDE}): {shown}{more}; "
            "their chains are cut there (large_operators='autolip'; a valid bound, at most "
            "AutoLip's). For the full SeqLip use large_operators='subspace' (--seqlip-large "
            f"subspace on the command line): the top {top_k + 1} singular triplets of each by "
            f"block subspace iteration, {top_k + 9} operator products per iteration for up to "
            f"subspace_max_iter={max_iter} iterations (up to 35 minutes for one 224×224 VGG16 "
            "convolution).",
            stacklevel=4)
