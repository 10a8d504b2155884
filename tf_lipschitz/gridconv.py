"""Exact certificates for stride-1 convolutions on small grids.

The polyphase-FFT certificate of :mod:`tf_lipschitz.certify` is the norm of a *circular*
convolution; the zero-padded layer is a restriction of it, smaller by a boundary effect that
grows as the grid shrinks (about 3 % for ResNet50's 7×7×512 convolutions, 2.8 % for a
Conv1D on 17 steps). Operators small
enough to materialise (``n_in · n_out ≤ 2²³``) are certified exactly as dense matrices; this
module covers the range between: a stride-1 convolution on a grid of ``R`` rows (first spatial
axis) has an input-side Gram matrix ``M = AᵀA`` that is **block-banded** with ``R × R`` blocks
of side ``m = (other spatial sizes) · channels`` and block bandwidth ``w = d(k−1)`` (``k`` taps
of dilation ``d`` along that axis): two input rows further apart never meet in one output.

The blocks are assembled in float64 from the taps' products ``A_qᵀA_{q'}``, a Lanczos run on
the exact operator proposes ``τ = σ_ritz (1 + rtol)``, and a block Cholesky factorisation of
``τ²(1 − margin)I − M``, streamed block row by block row
(:func:`~tf_lipschitz.linalg.banded_cholesky_succeeds`), proves ``‖A‖ ≤ τ``. There is no
boundary effect: the certificate is within ``rtol`` of the true norm. The cost, up to
``(w² + 2w + ⅓)·m³`` flops per block row, limits the route to small grids (:data:`SMALL_GRID`,
:data:`BANDED_FLOP_LIMIT`): ResNet50's 7×7×512 convolutions take ``2.1·10¹²`` flops (about
20 s on two CPU cores with the BLAS libraries' default threads, 37 s with one).

Example:
    >>> import numpy as np
    >>> taps = np.ones((3, 1, 1, 1))                  # 1-D [1, 1, 1] filter, one channel
    >>> op = GridConv(taps, np.arange(3)[:, None], offset=(1,), grid_in=(4,), grid_out=(4,))
    >>> np.stack([op.apply(e).ravel() for e in np.eye(4)], axis=1)  # the 4×4 matrix
    array([[1., 1., 0., 0.],
           [1., 1., 1., 0.],
           [0., 1., 1., 1.],
           [0., 0., 1., 1.]])
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from tf_lipschitz.linalg import banded_cholesky_flops, banded_cholesky_succeeds, lanczos_ritz, \
    top_eigenvalue

__all__ = ["GridConv", "small_grid_bound", "BANDED_FLOP_LIMIT"]

BANDED_FLOP_LIMIT = 4e12
"""Largest flop count of a block-banded certificate (ResNet50's 7×7×512 convolutions: 2.1e12)."""

DENSE_GRAM_SIDE = 2048
"""Per-group Gram sides up to this get an exact ``eigvalsh`` instead of the Cholesky test."""

SMALL_GRID = 16
"""Largest spatial size (on every axis) of a grid taken by the route. The FFT bound's boundary
effect shrinks like ``(π/N)²``: measured at 3 % on 7×7, under 0.8 % on 14×14 and 0.3 % on 28×28
grids, so larger grids are left to it (and the Lanczos proposal on them would cost seconds)."""

SMALL_GRID_1D = 256
"""Largest length of a 1-D grid taken by the route. A 1-D convolution's block rows are single
positions (side ``channels``), so its factorisation costs about ``N · w² · C³`` flops, little even
on long sequences, and its boundary effect is as large as a 2-D one's at the same length (2.8 %
for a random 3-channel Conv1D on 17 steps)."""

TIGHT = 5e-3
"""The FFT bound is kept when it is within this relative distance of the Lanczos value."""

LANCZOS_STEPS = 128
"""Lanczos steps of the proposal (float64, full re-orthogonalisation)."""


class GridConv:
    """A stride-1 zero-padded convolution, exact, in NumPy: ``y[i] = Σ_q A_q x[i + q − p]``.

    Output ``i`` of the output grid reads input ``i + q − p`` of the input grid for every tap
    ``q`` (entries outside the input grid are zeros), independently for each group.

    Args:
        taps: ``(Q, groups, b, a)`` float64 matrices (``b`` outputs, ``a`` inputs per group).
        shifts: ``(Q, D)`` integer tap offsets.
        offset: Left zero padding ``p`` per axis.
        grid_in: Input spatial size per axis.
        grid_out: Output spatial size per axis.
    """

    def __init__(self, taps: np.ndarray, shifts: np.ndarray, offset: Sequence[int],
                 grid_in: Sequence[int], grid_out: Sequence[int]):
        shifts = np.asarray(shifts, np.int64).reshape(len(taps), -1)
        offset, grid_in, grid_out = (np.asarray(v, np.int64) for v in (offset, grid_in, grid_out))
        if shifts.shape[1] == 1:  # a trailing axis of size 1 keeps one code path for 1-D
            shifts = np.pad(shifts, ((0, 0), (0, 1)))
            offset, grid_in, grid_out = (np.append(offset, 0), np.append(grid_in, 1),
                                         np.append(grid_out, 1))
        self.taps = np.asarray(taps, np.float64)
        self.shifts, self.offset = shifts, offset
        self.grid_in = tuple(int(n) for n in grid_in)
        self.grid_out = tuple(int(n) for n in grid_out)
        self._products = None
        self._pairs: dict[int, list[tuple[int, int]]] = {}

    @property
    def groups(self) -> int:
        return self.taps.shape[1]

    @property
    def size_in(self) -> int:
        """Input dimension per group."""
        return math.prod(self.grid_in) * self.taps.shape[-1]

    @property
    def size_out(self) -> int:
        """Output dimension per group."""
        return math.prod(self.grid_out) * self.taps.shape[-2]

    @property
    def rows(self) -> int:
        """Block rows of the Gram matrix: the first input axis."""
        return self.grid_in[0]

    @property
    def block_side(self) -> int:
        return math.prod(self.grid_in[1:]) * self.taps.shape[-1]

    @property
    def bandwidth(self) -> int:
        """Block bandwidth of the Gram matrix ``AᵀA``."""
        return int(self.shifts[:, 0].max() - self.shifts[:, 0].min())

    def transpose(self) -> "GridConv":
        """The adjoint, itself a convolution: input ``u`` reads output ``u − q + p``."""
        return GridConv(np.swapaxes(self.taps, -1, -2), -self.shifts, -self.offset,
                        self.grid_out, self.grid_in)

    def _slices(self, shift):
        """Output and input slices of one tap, or ``None`` if it never meets the input."""
        out, inp = [slice(None)], [slice(None)]
        for q, p, n, n_out in zip(shift, self.offset, self.grid_in, self.grid_out):
            lo, hi = max(0, p - q), min(n_out, n + p - q)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
            inp.append(slice(lo + q - p, hi + q - p))
        return tuple(out), tuple(inp)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``A x`` for ``x`` of shape ``(groups, *grid_in, a)``."""
        return self._through_taps(x, adjoint=False)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """``Aᵀ y`` for ``y`` of shape ``(groups, *grid_out, b)``."""
        return self._through_taps(y, adjoint=True)

    def _through_taps(self, src: np.ndarray, adjoint: bool) -> np.ndarray:
        src_grid, dst_grid = (self.grid_out, self.grid_in) if adjoint else (self.grid_in,
                                                                            self.grid_out)
        src = src.reshape(self.groups, *src_grid, -1)
        dst = np.zeros((self.groups, *dst_grid, self.taps.shape[-1 if adjoint else -2]))
        for tap, shift in zip(self.taps, self.shifts):
            where = self._slices(shift)  # (output slices, input slices)
            if where is None:
                continue
            read, write = (where[0], where[1]) if adjoint else (where[1], where[0])
            part = src[read]
            flat = np.matmul(part.reshape(self.groups, -1, part.shape[-1]),
                             tap if adjoint else np.swapaxes(tap, -1, -2))
            dst[write] += flat.reshape(*part.shape[:-1], -1)
        return dst

    def gram(self, x: np.ndarray) -> np.ndarray:
        """``AᵀA x`` on flat per-group vectors ``(groups, size_in)``."""
        return self.adjoint(self.apply(x)).reshape(self.groups, -1)

    def block(self, row: int, col: int, groups: slice = slice(None)) -> np.ndarray:
        """Block ``(row, col)`` of ``AᵀA``: input rows ``row`` and ``col`` of the first axis.

        ``M_{u,v} = Σ_i Σ_{q: i+q−p=u} Σ_{q': i+q'−p=v} A_qᵀ A_{q'}``; for rows ``(r, c)`` the
        pair of taps fixes the output row ``i₀ = r − q₀ + p₀`` (needs ``q₀ − q'₀ = r − c``),
        and the remaining axes pair input positions through every output position.

        Args:
            row: Block row (input row along the first axis).
            col: Block column.
            groups: The groups to assemble (a slice; all by default).

        Returns:
            ``(selected groups, m, m)``, a fresh float64 array.
        """
        if self._products is None:  # A_qᵀ A_{q'} for every pair of taps: (Q, Q, G, a, a)
            t = self.taps
            self._products = np.matmul(np.swapaxes(t, -1, -2)[:, None], t[None])
            for ti, qi in enumerate(self.shifts):  # row offset q₀ − q'₀ → pairs of taps
                for tj, qj in enumerate(self.shifts):
                    self._pairs.setdefault(int(qi[0] - qj[0]), []).append((ti, tj))
        products = self._products[:, :, groups]
        rest_in, rest_out = self.grid_in[1:], self.grid_out[1:]
        positions = np.indices(rest_out).reshape(len(rest_out), -1).T
        a = self.taps.shape[-1]
        out = np.zeros((products.shape[2], math.prod(rest_in), a, math.prod(rest_in), a))
        for ti, tj in self._pairs.get(row - col, ()):
            qi, qj = self.shifts[ti], self.shifts[tj]
            if not 0 <= row - qi[0] + self.offset[0] < self.grid_out[0]:
                continue  # the output row that would pair them is outside the output grid
            u = positions + qi[1:] - self.offset[1:]
            v = positions + qj[1:] - self.offset[1:]
            ok = np.all((u >= 0) & (u < rest_in) & (v >= 0) & (v < rest_in), axis=1)
            if not ok.any():
                continue
            uf = np.ravel_multi_index(u[ok].T, rest_in)
            vf = np.ravel_multi_index(v[ok].T, rest_in)  # distinct pairs (uf, vf) per tap pair
            if a < 16:  # many small blocks: one fancy-indexed update
                out[:, uf, :, vf, :] += products[ti, tj]
            else:  # few large blocks: basic indexing, views without copies
                for ui, vi in zip(uf, vf):
                    out[:, ui, :, vi, :] += products[ti, tj]
        m = self.block_side
        return out.reshape(-1, m, m)

    def dense_gram(self, groups: slice = slice(None)) -> np.ndarray:
        """The whole ``AᵀA`` of the selected groups, ``(groups, size_in, size_in)``."""
        m, w = self.block_side, self.bandwidth
        count = len(range(self.groups)[groups])
        out = np.zeros((count, self.size_in, self.size_in))
        for r in range(self.rows):
            for c in range(max(0, r - w), r + 1):
                blk = self.block(r, c, groups)
                out[:, r * m:(r + 1) * m, c * m:(c + 1) * m] = blk
                out[:, c * m:(c + 1) * m, r * m:(r + 1) * m] = np.swapaxes(blk, -1, -2)
        return out


def small_grid_bound(spec, grid_out: Sequence[int], rtol: float,
                     margin_of: Callable[[int, int], float], loose: float) -> float | None:
    """Certified norm of a stride-1 convolution without boundary effect, or ``None``.

    ``None`` when the route does not apply (strides, transposed convolutions, kernels with a
    single non-zero tap, whose symbol has a constant norm so that the FFT bound is already
    exact, grids larger than :data:`SMALL_GRID` on some axis, or ones with a single axis
    longer than one position longer than :data:`SMALL_GRID_1D`), when the FFT
    bound ``loose`` is already within :data:`TIGHT` of the Lanczos value, when the block Cholesky
    test would exceed :data:`BANDED_FLOP_LIMIT` flops, or when the test fails twice (the
    proposal was not the top singular value: ``loose`` stays, and it is valid).

    Args:
        spec: The layer's :class:`~tf_lipschitz.certify.ConvSpec`.
        grid_out: Output spatial size per axis.
        rtol: Relative slack of the proposed level over the Lanczos value.
        margin_of: ``margin_of(rows, cols)``: the rounding margin of a ``rows × cols`` matrix.
        loose: The FFT certificate of the same operator.

    Returns:
        The certified bound, or ``None``.
    """
    if spec.adjoint or spec.offset is None or any(s != 1 for s in spec.strides):
        return None
    if all(m == 1 for m in spec.grid()):  # one frequency (1×1 kernels): the FFT bound is exact
        return None
    one_axis = sum(n > 1 for n in spec.spatial) <= 1  # a graph's Conv1D is a 1×N Conv2D
    if max(max(spec.spatial), max(grid_out)) > (SMALL_GRID_1D if one_axis else SMALL_GRID):
        return None
    taps, shifts = spec.taps()  # (Q, groups, b, a)
    if np.count_nonzero(np.any(taps != 0, axis=(1, 2, 3))) <= 1:  # one tap (or none): exact
        return None
    big = float(np.max(np.abs(taps)))
    scale = 2.0 ** math.frexp(big)[1]  # exact rescaling: no overflow or underflow
    order = np.argsort([-n for n in spec.spatial], kind="stable")  # largest axis first:
    take = lambda v: [v[i] for i in order]                           # the smallest blocks
    op = GridConv(taps / scale, np.asarray(shifts)[:, order], take(spec.offset),
                  take(spec.spatial), take(grid_out))
    margin = margin_of(op.size_out, op.size_in)
    if op.size_in > op.size_out:
        op = op.transpose()
    if op.size_in <= DENSE_GRAM_SIDE:  # exact, in chunks of groups of at most 256 MB
        chunk = max(1, (256 << 20) // (8 * op.size_in ** 2))
        lam = max(top_eigenvalue(op.dense_gram(slice(g, g + chunk)))
                  for g in range(0, op.groups, chunk))
        return min(loose, math.sqrt(max(lam, 0.0)) * (1.0 + margin) * scale)
    flops = op.groups * banded_cholesky_flops(op.rows, op.block_side, op.bandwidth)
    if flops > BANDED_FLOP_LIMIT:
        return None
    start = np.random.default_rng(0).standard_normal((op.groups, op.size_in))
    ritz = lanczos_ritz(op.gram, start, LANCZOS_STEPS)
    if loose <= math.sqrt(max(float(ritz.max()), 0.0)) * scale * (1.0 + TIGHT):
        return None
    level = float(ritz.max()) * (1.0 + rtol) ** 2
    for _ in range(2):
        if all(banded_cholesky_succeeds(_shifted(op, level * (1.0 - margin), g), op.rows,
                                        op.bandwidth, fresh=True) for g in range(op.groups)):
            return min(loose, math.sqrt(level) * (1.0 + margin) * scale)
        level *= (1.0 + 4.0 * rtol) ** 2
    return None


def _shifted(op: GridConv, level: float, group: int) -> Callable[[int, int], np.ndarray]:
    """Blocks of ``level · I − AᵀA`` for one group (a new array at every call)."""
    def block(r: int, c: int) -> np.ndarray:
        out = op.block(r, c, slice(group, group + 1))[0]  # a fresh array: negated in place
        np.negative(out, out=out)
        if r == c:
            out[np.diag_indices_from(out)] += level
        return out
    return block
