"""Exact small-grid certificates (block-banded Cholesky) against each layer's dense matrix.

Ground truth is the layer's own dense matrix (``layer(e_i)`` on the standard basis, float64
SVD). For stride-1 convolutions of every kind:

- :class:`GridConv` reproduces the layer's output, and its adjoint and Gram blocks are the
  transpose and ``AᵀA`` of that matrix;
- the block Cholesky test succeeds just above ``‖A‖²`` and fails just below it;
- the small-grid certificate is within ``[exact, exact · 1.01]`` where the FFT bound is not,
  and a failed proposal falls back to the (valid) FFT bound.
"""

import math

import keras
import numpy as np
import pytest

from tf_lipschitz import certify, gridconv, linalg

from groundtruth import affine_map, exact_norm

L = keras.layers

CASES = [
    ("conv2d-same", lambda: L.Conv2D(5, 3, padding="same"), (6, 5, 3)),
    ("conv2d-valid-d2", lambda: L.Conv2D(4, 3, padding="valid", dilation_rate=2), (7, 6, 3)),
    ("conv2d-groups", lambda: L.Conv2D(4, (3, 2), padding="same", groups=2), (5, 6, 4)),
    ("conv1d-causal", lambda: L.Conv1D(3, 3, padding="causal"), (9, 2)),
    ("conv1d-wide", lambda: L.Conv1D(2, 3, padding="same"), (6, 5)),  # Gram on the output side
    ("conv3d-same", lambda: L.Conv3D(2, 2, padding="same"), (3, 4, 3, 2)),
    ("dw2d-same", lambda: L.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (5, 5, 3)),
    ("sep2d-same", lambda: L.SeparableConv2D(4, 3, padding="same"), (5, 4, 3)),
]
IDS = [c[0] for c in CASES]


def _layer(make, shape, seed=0):
    layer = make()
    keras.Sequential([keras.Input(shape), layer])
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.weights])
    return layer


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    _, make, shape = request.param
    layer = _layer(make, shape)
    out_shape = tuple(layer.compute_output_shape((1, *shape))[1:])
    spec = certify.conv_certificate(layer, shape, out_shape).spec(None, None)
    taps, shifts = spec.taps()
    op = gridconv.GridConv(taps, shifts, spec.offset, spec.spatial, out_shape[:-1])
    matrix = affine_map(layer, shape)
    return {"layer": layer, "shape": shape, "out_shape": out_shape, "spec": spec, "op": op,
            "matrix": matrix, "exact": float(np.linalg.svd(matrix, compute_uv=False)[0])}


def _grouped(x, groups):
    """``(*grid, groups·a)`` → ``(groups, *grid, a)``: group ``g`` owns channels ``[g·a, …)``."""
    return np.moveaxis(x.reshape(*x.shape[:-1], groups, -1), -2, 0)


def _by_group(matrix, op):
    """Per-group diagonal blocks of the dense matrix, in the grouped layout of :class:`GridConv`."""
    grid_in, grid_out, g = op.grid_in, op.grid_out, op.groups
    n_in, n_out = math.prod(grid_in), math.prod(grid_out)
    a, b = op.taps.shape[-1], op.taps.shape[-2]
    m = matrix.reshape(n_out, g, b, n_in, g, a)
    return np.stack([m[:, k, :, :, k, :].reshape(n_out * b, n_in * a) for k in range(g)])


def _counting(monkeypatch):
    calls = []
    original = gridconv.banded_cholesky_succeeds

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(gridconv, "banded_cholesky_succeeds", counted)
    return calls


def test_apply_matches_layer(case):
    op, shape = case["op"], case["shape"]
    x = np.random.default_rng(1).standard_normal(shape)
    layer = case["layer"]  # the linear part: minus the bias
    expected = np.asarray(layer(x[None].astype("float32")) - layer(np.zeros_like(x[None])))[0]
    got = op.apply(_grouped(x, op.groups))
    got = np.moveaxis(got.reshape(op.groups, *case["out_shape"][:-1], -1), 0, -2)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-5)


def test_adjoint_is_transpose(case):
    op = case["op"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((op.groups, op.size_in))
    y = rng.standard_normal((op.groups, op.size_out))
    lhs = np.sum(op.apply(x).reshape(y.shape) * y)
    rhs = np.sum(x * op.adjoint(y).reshape(x.shape))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_gram_blocks_are_gram_of_dense_matrix(case):
    op = case["op"]
    blocks = _by_group(case["matrix"], op)
    gram = np.matmul(np.swapaxes(blocks, -1, -2), blocks)
    np.testing.assert_allclose(op.dense_gram(), gram, atol=1e-5 * np.abs(gram).max())
    t = op.transpose()  # the output-side Gram through the adjoint convolution
    np.testing.assert_allclose(t.dense_gram(), np.matmul(blocks, np.swapaxes(blocks, -1, -2)),
                               atol=1e-5 * np.abs(gram).max())


@pytest.mark.parametrize("side", ["input", "output"])
def test_banded_cholesky_brackets_the_norm(case, side):
    op = case["op"] if side == "input" else case["op"].transpose()
    exact = case["exact"]

    def passes(level):
        return all(linalg.banded_cholesky_succeeds(gridconv._shifted(op, level, g), op.rows,
                                                   op.bandwidth) for g in range(op.groups))

    assert passes((exact * (1 + 1e-3)) ** 2)
    assert not passes((exact * (1 - 1e-3)) ** 2)


def test_small_grid_bound_is_tight(case, monkeypatch):
    monkeypatch.setattr(gridconv, "DENSE_GRAM_SIDE", 0)  # force the block Cholesky route
    monkeypatch.setattr(gridconv, "TIGHT", 0.0)  # even where the FFT bound is nearly tight
    exact = case["exact"]
    loose = certify._conv_bound(case["spec"], 1e-3)
    bound = gridconv.small_grid_bound(case["spec"], case["out_shape"][:-1], 1e-3,
                                      certify.safety_margin, loose)
    assert exact <= bound <= min(loose, exact * 1.01)


def test_failed_proposal_keeps_the_fft_bound(case, monkeypatch):
    monkeypatch.setattr(gridconv, "DENSE_GRAM_SIDE", 0)
    monkeypatch.setattr(gridconv, "TIGHT", 0.0)
    calls = _counting(monkeypatch)
    ritz = gridconv.lanczos_ritz  # the proposal 10 % low: both levels fail
    monkeypatch.setattr(gridconv, "lanczos_ritz", lambda *a: ritz(*a) * 0.9 ** 2)
    loose = certify._conv_bound(case["spec"], 1e-3)
    bound = gridconv.small_grid_bound(case["spec"], case["out_shape"][:-1], 1e-3,
                                      certify.safety_margin, loose)
    assert bound is None and 2 <= len(calls) <= 2 * case["op"].groups  # two levels tried


def test_structured_certificate_uses_the_small_grid_route(monkeypatch):
    shape = (7, 7, 48)  # 2352 > DENSE_GRAM_SIDE: Lanczos proposal, block Cholesky, 7 block rows
    calls = _counting(monkeypatch)
    layer = _layer(lambda: L.Conv2D(48, 3, padding="same", use_bias=False), shape, seed=3)
    exact = exact_norm(layer, shape)
    fft_only = certify.conv_certificate(layer, shape, shape, small_grid=False)
    refined = certify.conv_certificate(layer, shape, shape)
    assert fft_only.structured(None, None) > exact * 1.01
    assert exact <= refined.structured(None, None) <= exact * 1.002
    assert calls == [(7, 2)]  # one factorisation: 7 block rows, bandwidth 2


def test_low_proposal_is_raised_once_and_still_proven(monkeypatch):
    shape = (7, 7, 48)
    calls = _counting(monkeypatch)
    layer = _layer(lambda: L.Conv2D(48, 3, padding="same", use_bias=False), shape, seed=3)
    exact = exact_norm(layer, shape)
    ritz = gridconv.lanczos_ritz  # the proposal 0.2 % low (in the route's own scaling)
    monkeypatch.setattr(gridconv, "lanczos_ritz", lambda *a: ritz(*a) * 0.998 ** 2)
    bound = certify.conv_certificate(layer, shape, shape).structured(None, None)
    assert len(calls) == 2  # 0.998 · 1.001 fails, 0.998 · 1.001 · 1.004 passes
    assert exact <= bound <= exact * 1.01


def test_channels_first_layers_are_certified_like_their_twin():
    last = _layer(lambda: L.Conv2D(4, 3, padding="same", use_bias=False), (6, 5, 3), seed=5)
    first = L.Conv2D(4, 3, padding="same", use_bias=False, data_format="channels_first")
    first.build((None, 3, 6, 5))  # Conv2D NCHW does not run on CPU: compared by its weights
    first.set_weights(last.get_weights())
    exact = exact_norm(last, (6, 5, 3))
    spec = certify.conv_certificate(first, (3, 6, 5), (4, 6, 5)).spec(None, None)
    bound = gridconv.small_grid_bound(spec, (6, 5), 1e-3, certify.safety_margin, 9.0)
    assert exact <= bound <= exact * 1.01


def test_one_by_one_kernels_skip_the_route():
    layer = _layer(lambda: L.Conv2D(4, 1), (5, 5, 3))
    spec = certify.conv_certificate(layer, (5, 5, 3), (5, 5, 4)).spec(None, None)
    assert gridconv.small_grid_bound(spec, (5, 5), 1e-3, certify.safety_margin, 1.0) is None


def test_single_tap_kernels_skip_the_route_and_the_fft_bound_is_exact():
    layer = _layer(lambda: L.Conv2D(4, 3, padding="same", use_bias=False), (5, 6, 3), seed=2)
    kernel = np.zeros_like(layer.get_weights()[0])
    kernel[0, 2] = np.random.default_rng(2).standard_normal(kernel.shape[2:])  # off-centre tap
    layer.set_weights([kernel])
    exact = exact_norm(layer, (5, 6, 3))
    cert = certify.conv_certificate(layer, (5, 6, 3), (5, 6, 4))
    spec = cert.spec(None, None)
    assert gridconv.small_grid_bound(spec, (5, 6), 1e-3, certify.safety_margin, 9.0) is None
    assert exact <= cert.structured(None, None) <= exact * 1.001


def test_flop_count_follows_the_factorisation():
    for rows, bandwidth in ((7, 2), (2, 3), (1, 2), (5, 0)):
        multiplies = []

        def block(r, c, multiplies=multiplies):
            multiplies.append((r, c))
            return (4.0 * np.eye(3) if r == c else 0.1 * np.ones((3, 3)))

        assert linalg.banded_cholesky_succeeds(block, rows, bandwidth)
        below = [min(bandwidth, rows - 1 - i) for i in range(rows)]
        # blocks requested = diagonal + off-diagonal blocks inside the band
        assert len(multiplies) == rows + sum(below)
        m3 = 27.0
        assert linalg.banded_cholesky_flops(rows, 3, bandwidth) == pytest.approx(
            m3 * sum(1 / 3 + b + b * (b + 1) for b in below))
    # bandwidth beyond the matrix: one dense factorisation, no phantom blocks
    assert linalg.banded_cholesky_flops(1, 10, 5) == pytest.approx(1000 / 3)


def test_strided_convolutions_skip_the_route():
    layer = _layer(lambda: L.Conv2D(4, 3, strides=2, padding="same"), (6, 6, 3))
    spec = certify.conv_certificate(layer, (6, 6, 3), (3, 3, 4)).spec(None, None)
    assert gridconv.small_grid_bound(spec, (3, 3), 1e-3, certify.safety_margin, 9.0) is None


def test_large_grids_skip_the_route():
    layer = _layer(lambda: L.Conv2D(2, 3, padding="same"), (17, 3, 2))
    spec = certify.conv_certificate(layer, (17, 3, 2), (17, 3, 2)).spec(None, None)
    assert gridconv.small_grid_bound(spec, (17, 3), 1e-3, certify.safety_margin, 9.0) is None


def test_flop_limit_skips_the_route(monkeypatch):
    monkeypatch.setattr(gridconv, "BANDED_FLOP_LIMIT", 0)
    monkeypatch.setattr(gridconv, "DENSE_GRAM_SIDE", 0)
    layer = _layer(lambda: L.Conv2D(4, 3, padding="same"), (6, 6, 3))
    spec = certify.conv_certificate(layer, (6, 6, 3), (6, 6, 4)).spec(None, None)
    assert gridconv.small_grid_bound(spec, (6, 6), 1e-3, certify.safety_margin, 9.0) is None


def test_lanczos_ritz_stops_growing_at_breakdown():
    h = np.diag([2.0] + [1.0] * 59)[None]  # two distinct eigenvalues: invariant after 2 steps
    start = np.random.default_rng(0).standard_normal((1, 60))
    ritz = linalg.lanczos_ritz(lambda q: np.matmul(h, q[..., None])[..., 0], start, steps=20)
    assert ritz[0] == pytest.approx(2.0, rel=1e-12)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((100, 100)))
    assert 1.0 <= certify.max_singular_value(q[None]) <= 1.0 + 1e-4  # all σ = 1


def test_lanczos_ritz_is_below_and_close_to_the_top():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 40, 40))
    h = np.matmul(np.swapaxes(a, -1, -2), a)
    top = np.linalg.eigvalsh(h)[:, -1]
    ritz = linalg.lanczos_ritz(lambda q: np.matmul(h, q[..., None])[..., 0],
                               rng.standard_normal((3, 40)), steps=40)
    assert np.all(ritz <= top * (1 + 1e-12))
    np.testing.assert_allclose(ritz, top, rtol=1e-10)


class _NeverInPlace:
    """SciPy's LAPACK or BLAS module, whose routines work on copies of their array arguments
    (as the wrappers do for buffers they cannot use in place): results must be copied back."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        routine = getattr(self._module, name)

        def copied(*args, **kwargs):
            fresh = lambda v: np.array(v, order="F") if isinstance(v, np.ndarray) else v
            return routine(*map(fresh, args), **{k: fresh(v) for k, v in kwargs.items()})
        return copied


@pytest.mark.parametrize("routines", ["lapack-in-place", "lapack-copies", "numpy"])
@pytest.mark.parametrize("rows,side,bandwidth", [(1, 7, 0), (4, 6, 1), (5, 9, 2), (6, 5, 3),
                                                 (3, 1, 2)])
def test_block_cholesky_decides_definiteness(rows, side, bandwidth, routines, monkeypatch):
    """Against ``eigvalsh`` of the assembled matrix: positive definite just above ``−λ_min``
    and not just below, whether the LAPACK/BLAS wrappers work in place or on copies (whose
    results must be copied back) or NumPy and TensorFlow replace them, with blocks handed over
    as copies, as views of the matrix (overwriting them would corrupt blocks fetched later),
    in Fortran order or in float32."""
    if routines == "numpy":
        monkeypatch.setattr(linalg, "_blas", None)
        monkeypatch.setattr(linalg, "_lapack", None)
    elif routines == "lapack-copies":
        monkeypatch.setattr(linalg, "_blas", _NeverInPlace(linalg._blas))
        monkeypatch.setattr(linalg, "_lapack", _NeverInPlace(linalg._lapack))
    rng = np.random.default_rng(rows * 100 + side * 10 + bandwidth)
    n = rows * side
    a = rng.standard_normal((n, n))
    near = np.abs(np.arange(n)[:, None] // side - np.arange(n)[None] // side) <= bandwidth
    h = np.where(near, a @ a.T, 0.0)
    h -= (np.linalg.eigvalsh(h)[0] + 1.0) * np.eye(n)  # block-banded, smallest eigenvalue −1
    layouts = [lambda b: b.copy(), lambda b: b, lambda b: np.asfortranarray(b),
               lambda b: b.astype(np.float32)]
    for k, layout in enumerate(layouts):
        gap = 1e-3 if k == 3 else 1e-7  # float32 blocks round the matrix by about 1e-6
        for shift, expected in ((1.0 + gap, True), (1.0 - gap, False)):
            s = h + shift * np.eye(n)
            got = linalg.banded_cholesky_succeeds(
                lambda r, c: layout(s[r * side:(r + 1) * side, c * side:(c + 1) * side]),
                rows, bandwidth)
            assert got is expected, (k, shift)


def test_block_cholesky_copies_shared_and_read_only_blocks():
    """Blocks that the caller keeps (a cache of equal blocks, read-only arrays) are not
    factorised in place unless the caller says they are fresh."""
    toeplitz = [np.array([[0.285]]), np.array([[0.352]])]  # eigenvalues 0.637 and −0.067
    assert not linalg.banded_cholesky_succeeds(lambda r, c: toeplitz[r - c], 2, 1)
    assert toeplitz[0][0, 0] == 0.285
    frozen = np.diag([4.0, 9.0])
    frozen.setflags(write=False)
    assert linalg.banded_cholesky_succeeds(lambda r, c: frozen, 1, 0, fresh=True)
    np.testing.assert_array_equal(frozen, np.diag([4.0, 9.0]))


@pytest.mark.parametrize("scipy_blas", [True, False], ids=["lapack", "numpy"])
@pytest.mark.parametrize("where", [(0, 0), (2, 1), (2, 2)])
def test_block_cholesky_fails_on_nan_and_inf(where, scipy_blas, monkeypatch):
    if not scipy_blas:
        monkeypatch.setattr(linalg, "_blas", None)
        monkeypatch.setattr(linalg, "_lapack", None)
    for bad in (np.nan, np.inf):
        def block(r, c):
            out = 10.0 * np.eye(3) if r == c else 0.1 * np.ones((3, 3))
            if (r, c) == where:
                out[1, 0] = out[0, 1] = bad
            return out
        assert not linalg.banded_cholesky_succeeds(block, 3, 1, fresh=True), bad


def test_block_cholesky_without_scipy(case, monkeypatch):
    monkeypatch.setattr(linalg, "_blas", None)  # NumPy and TensorFlow instead of SciPy
    monkeypatch.setattr(linalg, "_lapack", None)
    op, exact = case["op"], case["exact"]
    for factor, expected in ((1 + 1e-3, True), (1 - 1e-3, False)):
        level = (exact * factor) ** 2
        assert all(linalg.banded_cholesky_succeeds(gridconv._shifted(op, level, g), op.rows,
                                                   op.bandwidth)
                   for g in range(op.groups)) is expected
