"""Fourier starting vectors (tf_lipschitz.starts) against dense SVDs of the same operators."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import certify, starts
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.power import SpectralSolver

L = keras.layers


def _layer(layer, shape, seed=0):
    layer.build((None, *shape))
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.standard_normal(w.shape).astype("float32"))
    return layer


def _exact(layer, shape) -> float:
    dense = LinearOperator(lambda x: layer(x), shape).to_dense(batch_size=512).astype(np.float64)
    gram = dense.T @ dense if dense.shape[0] >= dense.shape[1] else dense @ dense.T
    return float(np.sqrt(np.linalg.eigvalsh(gram)[-1]))


def _start(layer, shape):
    out = tuple(layer.compute_output_shape((1, *shape))[1:])
    return starts.conv_start(certify.conv_certificate(layer, shape, out).spec(None, None))


CASES = {
    "conv2d": (lambda: L.Conv2D(3, 3, padding="same", use_bias=False), (32, 32, 2)),
    "conv2d_stride2_same": (lambda: L.Conv2D(3, 3, strides=2, padding="same", use_bias=False),
                            (32, 32, 2)),
    "conv2d_stride2_valid": (lambda: L.Conv2D(3, 3, strides=2, use_bias=False), (33, 33, 2)),
    "conv2d_dilation2": (lambda: L.Conv2D(3, 3, dilation_rate=2, padding="same",
                                          use_bias=False), (32, 32, 2)),
    "conv2d_groups": (lambda: L.Conv2D(4, 3, groups=2, padding="same", use_bias=False),
                      (32, 32, 2)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                            use_bias=False), (32, 32, 2)),
    "separable": (lambda: L.SeparableConv2D(3, 3, padding="same", use_bias=False),
                  (32, 32, 2)),
    "conv1d_causal": (lambda: L.Conv1D(3, 5, padding="causal", use_bias=False), (1024, 2)),
    "conv1d_stride3": (lambda: L.Conv1D(3, 5, strides=3, padding="same", use_bias=False),
                       (1024, 2)),
    "conv3d": (lambda: L.Conv3D(2, 3, padding="same", use_bias=False), (11, 11, 11, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_is_close_to_the_top_singular_vector(case):
    make, shape = CASES[case]
    layer = _layer(make(), shape)
    x = _start(layer, shape)
    assert x is not None and x.shape == shape
    assert np.isclose(np.linalg.norm(x), 1.0)
    rayleigh = float(tf.norm(layer(x[None].astype("float32"))))
    exact = _exact(layer, shape)
    # A random unit vector has a Rayleigh quotient near the RMS singular value, far lower.
    assert rayleigh >= 0.98 * exact, (rayleigh, exact)
    assert rayleigh <= exact * (1 + 1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tilted_wave_packet_is_closer_to_the_top_singular_vector(case, monkeypatch):
    # The packet's frequencies near the peak carry the channel vector v(θ*) of the peak; the
    # first-order tilt -i ∂v·∇φ gives each of them its own v(θ), and the Rayleigh quotient
    # moves towards the norm (4-9x closer where v varies with θ; depthwise and grouped
    # kernels with one input channel per group have nothing to tilt).
    make, shape = CASES[case]
    layer = _layer(make(), shape)
    exact = _exact(layer, shape)

    def gap(x):
        return 1.0 - float(tf.norm(layer(x[None].astype("float32")))) / exact

    tilted = gap(_start(layer, shape))
    monkeypatch.setattr(starts, "_tilt", lambda *args: None)
    plain = gap(_start(layer, shape))
    assert tilted <= max(plain, 2e-6), (tilted, plain)
    if case.startswith("conv2d") and case != "conv2d_groups":
        assert tilted <= 0.3 * plain, (tilted, plain)


@pytest.mark.parametrize("kernel", ["identity", "near_identity"])
def test_start_is_finite_where_the_peak_is_a_multiple_eigenvalue(kernel):
    # Â(θ) = I (up to 1e-7): every channel vector is a top one, ∂v is not defined and the
    # perturbation solve is singular or huge; the start must stay the plain wave.
    shape = (32, 32, 3)
    layer = L.Conv2D(3, 3, padding="same", use_bias=False)
    layer.build((None, *shape))
    taps = np.zeros((3, 3, 3, 3), "float32")
    taps[1, 1] = np.eye(3)
    if kernel == "near_identity":
        taps[0, 1] = 1e-7 * np.random.default_rng(0).standard_normal((3, 3))
    layer.kernel.assign(taps)
    x = _start(layer, shape)
    assert x is not None and np.all(np.isfinite(x))
    assert np.isclose(np.linalg.norm(x), 1.0)
    assert float(tf.norm(layer(x[None].astype("float32")))) >= 0.98 * _exact(layer, shape)


def test_start_saves_products_on_a_clustered_spectrum_and_converges_to_the_exact_norm():
    shape = (1024, 2)
    layer = _layer(L.Conv1D(3, 5, padding="same", use_bias=False), shape)
    solver = SpectralSolver([LinearOperator(lambda x: layer(x), shape)])
    exact = _exact(layer, shape)
    wave = solver.run(tol=1e-6, max_products=3000, init=[_start(layer, shape)])[0]
    rand = solver.run(tol=1e-6, max_products=3000, init=None)[0]
    assert abs(wave.sigma - exact) <= 1e-4 * exact
    assert wave.products * 4 <= rand.products, (wave.products, rand.products)


def test_no_start_for_small_grids_and_transposed_convolutions():
    small = _layer(L.Conv2D(3, 3, padding="same", use_bias=False), (16, 16, 2))
    assert _start(small, (16, 16, 2)) is None
    shape = (32, 32, 2)
    transposed = _layer(L.Conv2DTranspose(3, 3, padding="same", use_bias=False), shape)
    assert _start(transposed, shape) is None


POINTWISE = {
    "1x1": (lambda: L.Conv2D(6, 1, use_bias=False), (32, 32, 4)),
    "1x1_stride2": (lambda: L.Conv2D(6, 1, strides=2, use_bias=False), (32, 32, 4)),
    "2x2_stride2": (lambda: L.Conv2D(6, 2, strides=2, use_bias=False), (32, 32, 4)),
}


@pytest.mark.parametrize("case", sorted(POINTWISE))
def test_no_start_for_pointwise_convolutions_whose_random_start_converges_fast(case):
    # One matrix applied at every (polyphase) position: the top singular value is repeated
    # once per output position, so a random start converges in a few products and the
    # start's search would cost more than it saves.
    make, shape = POINTWISE[case]
    layer = _layer(make(), shape)
    assert _start(layer, shape) is None
    solver = SpectralSolver([LinearOperator(lambda x: layer(x), shape)])
    rand = solver.run(tol=1e-4, max_products=500, init=None)[0]
    exact = _exact(layer, shape)
    assert abs(rand.sigma - exact) <= 1e-4 * exact, (rand.sigma, exact)
    assert rand.products <= 40, rand.products


def _conv_bn_model():
    inputs = keras.Input((40, 40, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 3, strides=2, padding="same", name="head")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(3)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    return model


def test_autolip_starts_fused_conv_batchnorm_from_fourier_vectors():
    model = _conv_bn_model()
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-6)
    vectors = est.engine.start_vectors()
    names = [op.name for op in est.engine.operators]
    assert names == ["conv+bn", "head"]
    op = est.engine.operators[0]
    # The Fourier vector of the fused operator (BN scale folded into the kernel), not random.
    rayleigh = float(tf.norm(op.fn(tf.convert_to_tensor(vectors[0]))))
    dense = op.to_dense(batch_size=512).astype(np.float64)
    exact = float(np.sqrt(np.linalg.eigvalsh(dense.T @ dense)[-1]))
    assert rayleigh >= 0.98 * exact
    fresh = est.autolip(init=None)
    rand = est.autolip(init="random")
    row = {r.name: r for r in fresh.layers}["conv+bn"]
    assert abs(row.norm - exact) <= 1e-4 * exact
    assert abs(fresh.upper - rand.upper) <= 1e-4 * rand.upper
    assert row.products < {r.name: r for r in rand.layers}["conv+bn"].products


def test_unknown_init_string_names_the_choices():
    est = tfl.LipschitzEstimator(_conv_bn_model(), verbose=0)
    with pytest.raises(ValueError, match="init must be 'warm', 'random', None"):
        est.autolip(init="fourier")


# -- channel-subspace refinement ---------------------------------------------------------------

SUBSPACE = {
    "same": (lambda: L.Conv2D(5, 3, padding="same", use_bias=False), (29, 29, 6)),
    "valid": (lambda: L.Conv2D(5, 3, use_bias=False), (29, 29, 6)),
    "dilation2": (lambda: L.Conv2D(5, 3, dilation_rate=2, padding="same", use_bias=False),
                  (29, 29, 6)),
    "conv1d_causal": (lambda: L.Conv1D(4, 5, padding="causal", use_bias=False), (900, 6)),
    "conv1d_valid_dilation3": (lambda: L.Conv1D(4, 3, dilation_rate=3, use_bias=False),
                               (900, 6)),
    "conv3d": (lambda: L.Conv3D(3, 3, padding="same", use_bias=False), (10, 10, 10, 6)),
}


def _spec_and_grid(layer, shape):
    out = tuple(layer.compute_output_shape((1, *shape))[1:])
    return certify.conv_certificate(layer, shape, out).spec(None, None), out[:-1]


@pytest.mark.parametrize("case", sorted(SUBSPACE))
def test_subspace_convolution_is_the_layer_on_inputs_in_the_channel_subspace(case):
    # x[n] = Q g[n]: the restricted convolution of g must equal the layer applied to x,
    # output for output (padding, dilation and the output grid read from the spec).
    make, shape = SUBSPACE[case]
    layer = _layer(make(), shape)
    spec, grid_out = _spec_and_grid(layer, shape)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((shape[-1], 2)))
    g = rng.standard_normal((2, *shape[:-1], 2))
    pads = starts.subspace_pads(spec, grid_out)
    got = starts.subspace_conv(tf.constant(g, tf.float32),
                               tf.constant(starts.subspace_kernel(spec, q), tf.float32),
                               pads, spec.dilation).numpy()
    want = layer((g @ q.T).astype("float32")).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", sorted(SUBSPACE))
def test_refinement_on_the_whole_channel_space_finds_the_top_singular_vector(case, monkeypatch):
    # When the peaks' channel vectors span every channel, the restricted problem is the
    # operator itself: the refined start is its top singular vector (Lanczos to 1e-4 on the
    # residual: the Rayleigh quotient within ~1e-7 of the norm), while the plain wave is not
    # on a grid (boundary effects in every direction).
    make, shape = SUBSPACE[case]
    layer = _layer(make(), shape)
    spec, grid_out = _spec_and_grid(layer, shape)
    exact = _exact(layer, shape)

    def quotient(x):
        return float(tf.norm(layer(x[None].astype("float32"))))

    wave = starts.conv_start(spec)
    monkeypatch.setattr(starts, "_channel_basis", lambda vectors: np.eye(shape[-1]))
    monkeypatch.setattr(starts, "_REDUCED_RATIO", 1.0)
    refined = starts.conv_start(spec, grid_out=grid_out)
    assert refined.shape == shape and np.isclose(np.linalg.norm(refined), 1.0)
    assert quotient(refined) >= exact * (1 - 1e-6), (quotient(refined), exact)
    assert quotient(refined) <= exact * (1 + 1e-5)
    assert quotient(refined) >= quotient(wave)
    if not case.startswith("conv1d"):  # on a line, the wave's envelope is already close
        assert quotient(wave) < exact * (1 - 1e-5), (quotient(wave), exact)


def test_refined_start_saves_products_on_a_large_convolution():
    # 40×40×64 → 64: the peaks' subspace is a few channels out of 64; from the refined start
    # the solver needs far fewer products than from the plain wave, for the same value.
    shape = (40, 40, 64)
    layer = L.Conv2D(64, 3, padding="same", use_bias=False)
    layer.build((None, *shape))
    spec, grid_out = _spec_and_grid(layer, shape)
    wave = starts.conv_start(spec)
    refined = starts.conv_start(spec, grid_out=grid_out)
    solver = SpectralSolver([LinearOperator(lambda x: layer(x), shape)])
    from_wave = solver.run(tol=1e-4, max_products=2000, init=[wave])[0]
    from_refined = solver.run(tol=1e-4, max_products=2000, init=[refined])[0]
    tight = solver.run(tol=1e-7, max_products=2000, init=[refined])[0]
    assert from_refined.products * 2 <= from_wave.products, (from_refined.products,
                                                              from_wave.products)
    assert abs(from_refined.sigma - tight.sigma) <= 1e-4 * tight.sigma


def test_no_refinement_for_strided_and_grouped_convolutions():
    # Their channel vector changes with the polyphase component or the group: the start
    # stays the plain wave.
    for make, shape in (CASES["conv2d_stride2_same"], CASES["depthwise"], CASES["separable"]):
        layer = _layer(make(), shape)
        spec, grid_out = _spec_and_grid(layer, shape)
        np.testing.assert_array_equal(starts.conv_start(spec, grid_out=grid_out),
                                      starts.conv_start(spec))


def _symbol(taps, shifts, theta):
    return np.tensordot(np.exp(1j * (shifts @ theta)), taps, axes=1)


def _sigma(taps, shifts, theta):
    return float(np.linalg.svd(_symbol(taps, shifts, theta), compute_uv=False)[0])


@pytest.mark.parametrize("shape", [(9, 12, 10, 2), (5, 6, 6, 1), (27, 5, 7, 3), (9, 160, 150, 2)])
def test_ascent_ends_on_a_local_maximum_of_the_symbol(shape):
    """``_refine`` (quasi-Newton ascent) stops where no nearby frequency has a larger top
    singular value, above its start, with the symbol's top right singular vector. The last
    shape (150 columns) runs the power-step branch of ``_top_pair``."""
    q, rows, cols, dims = shape
    rng = np.random.default_rng(sum(shape))
    taps = rng.standard_normal((q, rows, cols))
    shifts = rng.integers(0, 3, (q, dims))
    theta0 = rng.uniform(-np.pi, np.pi, dims)
    sigma, theta, v = starts._refine(taps, shifts, theta0)
    exact = _sigma(taps, shifts, theta)
    # σ comes from a few power steps warm-started from the previous step's vector (from below);
    # an SVD starts the ascent on small symbols, power steps on larger ones.
    rtol = 1e-6 if cols <= starts._SVD_SIDE else 1e-4
    assert exact * (1 - rtol) <= sigma <= exact * (1 + 1e-9)
    assert sigma >= _sigma(taps, shifts, theta0) * (1 - rtol)
    assert np.isclose(np.linalg.norm(_symbol(taps, shifts, theta) @ v), sigma, rtol=1e-9)
    for d in range(dims):
        for step in (-3e-2, 3e-2):
            probe = theta.copy()
            probe[d] += step
            assert _sigma(taps, shifts, probe) <= exact * (1 + 1e-7), (d, step)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tilt_is_the_derivative_of_the_top_singular_vector(dims):
    """``_tilt`` against central differences of the phase-aligned top right singular vector
    (the gauge ``vᴴ∂v = 0``)."""
    rng = np.random.default_rng(dims)
    taps = rng.standard_normal((9, 7, 5))
    shifts = rng.integers(0, 3, (9, dims))
    theta = rng.uniform(-np.pi, np.pi, dims)

    def top(th):
        return np.conj(np.linalg.svd(_symbol(taps, shifts, th))[2][0])

    v = top(theta)
    tilt = starts._tilt(taps, shifts, theta, v)
    h = 1e-5
    for d in range(dims):
        step = np.eye(dims)[d] * h
        ends = []
        for th in (theta + step, theta - step):
            w = top(th)
            ends.append(w * np.exp(-1j * np.angle(np.vdot(v, w))))  # vᴴw real: the gauge
        fd = (ends[0] - ends[1]) / (2 * h)
        np.testing.assert_allclose(tilt[d], fd, atol=1e-6 * max(1.0, np.abs(fd).max()))


def test_ranking_by_taps_matches_the_symbols_eigenvalues():
    """``_ranking_ritz`` (products through the taps, single precision) against the exact top
    eigenvalues of ``Â(θ)ᴴÂ(θ)``: with as many steps as columns, Lanczos is exact."""
    rng = np.random.default_rng(0)
    taps = rng.standard_normal((9, 2, 10, 8))  # (Q, groups, rows, cols)
    shifts = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1).reshape(9, 2)
    thetas = rng.uniform(-np.pi, np.pi, (5, 2))
    ritz = starts._ranking_ritz(taps, shifts, thetas).reshape(5, 2)
    for f, theta in enumerate(thetas):
        for g in range(2):
            exact = _sigma(taps[:, g], shifts, theta) ** 2
            assert np.isclose(ritz[f, g], exact, rtol=1e-5), (f, g)


# (frequency, peak of |â|) per channel: the global peak at 2π·3.5/16, between the frequencies
# of a 16-point grid, and four peaks 0.2 % lower on it, which take all four candidates there.
PEAKS = [(3.5, 1.0), (0, 0.998), (2, 0.998), (5, 0.998), (7, 0.998)]


def _peaked_conv1d(peaks, length=800, taps=63):
    """Independent channels, each a Hann-windowed cosine: a symbol peak about 0.2 rad wide."""
    t = np.arange(taps) - taps // 2
    kernel = np.zeros((taps, len(peaks), len(peaks)))
    for channel, (index, peak) in enumerate(peaks):
        theta = 2 * np.pi * index / 16
        wave = np.hanning(taps) * np.cos(theta * t)
        kernel[:, channel, channel] = peak * wave / abs(np.sum(wave * np.exp(-1j * theta * t)))
    layer = L.Conv1D(len(peaks), taps, padding="same", use_bias=False)
    layer.build((None, length, len(peaks)))
    layer.kernel.assign(kernel.astype("float32"))
    return layer, (length, len(peaks))


@pytest.mark.parametrize("frequencies", [16, None])
def test_fourier_start_finds_a_peak_between_coarse_frequencies(frequencies, monkeypatch):
    """The symbol's global peak lies between the frequencies of a coarse ranking grid, and
    four peaks 0.2 % lower lie on it (``PEAKS``). With 16 frequencies (the budget forced down)
    the start is the lower peaks' waves, and Lanczos converges on one of their clusters, 0.2 %
    low with a small residual: a Krylov method never certifies that it found the top. The
    default floor ``_MIN_FREQUENCIES`` ranks enough frequencies to find the global peak."""
    layer, shape = _peaked_conv1d(PEAKS)
    exact = max(_exact(*_peaked_conv1d([peak])) for peak in PEAKS)  # independent channels
    monkeypatch.setattr(starts, "_COARSE_ENTRIES", 4)  # the budget alone: one frequency
    if frequencies is not None:
        monkeypatch.setattr(starts, "_MIN_FREQUENCIES", frequencies)
    model = keras.Sequential([keras.Input(shape), layer])
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-4).autolip(init=None)
    estimate = next(r.norm for r in report.layers if r.kind == "linear")
    if frequencies is None:
        assert abs(estimate - exact) <= 1e-4 * exact, (estimate, exact)
    else:  # the trap the floor avoids
        assert estimate < exact * (1 - 1e-3), (estimate, exact)
