"""The spectral solvers against dense-matrix SVD."""

import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.operators import LinearOperator, compose
from tf_lipschitz.power import SpectralSolver, spectral_norm, top_singular_triplets


def _dense_op(w, name="w"):
    w = np.asarray(w, dtype="float32")
    return LinearOperator(lambda x: tf.matmul(x, w), (w.shape[0],), name=name)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_matches_svd_on_random_matrices(method, rng):
    mats = [rng.standard_normal(s) for s in [(7, 5), (20, 30), (64, 10)]]
    solver = SpectralSolver([_dense_op(m) for m in mats], method=method)
    results = solver.run(tol=1e-9, max_products=5000)
    for m, res in zip(mats, results):
        exact = np.linalg.svd(m, compute_uv=False)[0]
        assert res.sigma == pytest.approx(exact, rel=1e-4)
        assert res.sigma <= exact * (1 + 1e-5)  # converges from below
        assert res.converged
        # the returned vector is the top right singular vector
        top = np.linalg.svd(m.T)[2][0]
        assert abs(np.dot(res.vector.ravel(), top)) == pytest.approx(1.0, abs=1e-3)


def test_lanczos_needs_fewer_products_than_power(rng):
    m = rng.standard_normal((60, 60))
    m = m @ np.diag(np.linspace(1.0, 0.9, 60))  # small spectral gap: hard for power iteration
    op = _dense_op(m)
    p = SpectralSolver([op], method="power").run(tol=1e-10, max_products=20000)[0]
    lz = SpectralSolver([op], method="lanczos").run(tol=1e-10, max_products=20000)[0]
    exact = np.linalg.svd(m, compute_uv=False)[0]
    assert lz.sigma == pytest.approx(exact, rel=1e-5)
    assert lz.products < p.products


def test_unconverged_run_is_flagged(rng):
    m = rng.standard_normal((50, 50))
    res = SpectralSolver([_dense_op(m)], method="power").run(tol=1e-12, max_products=3)[0]
    assert not res.converged
    assert res.products <= 4


def test_warm_start_reuses_vectors(rng):
    m = rng.standard_normal((40, 30))
    solver = SpectralSolver([_dense_op(m)], method="power")
    first = solver.run(tol=1e-8, max_products=5000)[0]
    second = solver.run(tol=1e-8, max_products=5000)[0]
    assert second.products < first.products
    assert second.sigma == pytest.approx(first.sigma, rel=1e-5)


def test_zero_operator_gives_zero():
    op = LinearOperator(lambda x: 0.0 * x, (4,))
    for method in ("power", "lanczos"):
        res = SpectralSolver([op], method=method).run()[0]
        assert res.sigma == 0.0


def test_spectral_norm_of_convolution_matches_dense_svd(rng):
    kernel = rng.standard_normal((3, 3, 2, 4)).astype("float32")

    def conv(x):
        return tf.nn.conv2d(x, kernel, strides=2, padding="SAME")

    op = LinearOperator(conv, (7, 7, 2))
    exact = np.linalg.svd(op.to_dense(), compute_uv=False)[0]
    assert spectral_norm(conv, (7, 7, 2), tol=1e-9).sigma == pytest.approx(exact, rel=1e-4)


def test_compose_applies_left_to_right(rng):
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    op = compose([_dense_op(a, "a"), _dense_op(b, "b")])
    assert op.name == "a+b"
    np.testing.assert_allclose(op.to_dense(), (a @ b).T, rtol=1e-5, atol=1e-5)


def test_top_singular_triplets(rng):
    m = rng.standard_normal((30, 25))
    trip = top_singular_triplets(_dense_op(m), 4, tol=1e-8)
    u, s, vt = np.linalg.svd(m.T)
    np.testing.assert_allclose(trip.s, s[:4], rtol=1e-4)
    for i in range(4):
        assert abs(np.dot(trip.v[i], vt[i])) == pytest.approx(1.0, abs=1e-3)
        assert abs(np.dot(trip.u[i], u[:, i])) == pytest.approx(1.0, abs=1e-3)
    assert trip.converged


def test_top_singular_triplets_that_hit_max_iter_say_so(rng):
    # One block iteration from a random block cannot settle: the flag says so, and the Ritz
    # values it returns are below the singular values (they converge from below).
    m = rng.standard_normal((60, 50))
    trip = top_singular_triplets(_dense_op(m), 3, tol=1e-8, max_iter=1, oversample=0)
    assert not trip.converged
    s = np.linalg.svd(m, compute_uv=False)
    assert np.all(trip.s <= s[:3] * (1 + 1e-6))
    assert trip.s[2] < s[2] * (1 - 1e-3)


@pytest.mark.parametrize("kwargs", [{"tol": 0}, {"max_products": 0}, {"init": "cold"}])
def test_bad_arguments(kwargs):
    solver = SpectralSolver([LinearOperator(lambda x: x, (2,))])
    with pytest.raises(ValueError):
        solver.run(**kwargs)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        SpectralSolver([], method="svd")


@pytest.mark.parametrize("seed", range(4))
def test_lanczos_on_rank_deficient_operator(seed):
    # 16 -> 3: the Krylov space becomes invariant after 4 steps (breakdown); rounding noise
    # must not be taken as a new basis vector (it once corrupted the tridiagonal matrix).
    w = np.random.default_rng(seed).standard_normal((16, 3))
    res = SpectralSolver([_dense_op(w)], method="lanczos").run(tol=1e-6, init=None, seed=seed)[0]
    assert res.converged and res.products <= 40
    assert res.sigma == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_thick_restart_on_clustered_convolution_spectrum(seed):
    """Strided convolutions often have two nearly equal top singular values (seed 0: 1.4421 and
    1.4417). Restarting from the top Ritz vector alone needed 241/273 products here; keeping half
    of the Ritz vectors needs far fewer, and the value is the dense SVD's."""
    import keras

    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv2D(64, 3, strides=2)
    conv.build((None, 12, 12, 32))
    op = LinearOperator(lambda x: conv.convolution_op(x, conv.kernel), (12, 12, 32))
    exact = np.linalg.svd(op.to_dense(), compute_uv=False)[0]
    res = SpectralSolver([op]).run(tol=1e-6, init=None)[0]
    assert res.converged and res.products <= 120
    assert res.sigma == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("noise, most", [(0.0, 3), (1e-4, 8)])
def test_lanczos_tests_convergence_after_every_product(noise, most, rng):
    """A start (nearly) on the top singular vector stops after a product or two, not after a
    whole Krylov cycle of 16."""
    w = rng.standard_normal((40, 30))
    top = np.linalg.svd(w)[0][:, 0]  # the operator is x -> x @ w
    v0 = top + noise * rng.standard_normal(40)
    # start_noise=0: the start exactly as given (the solver blends in 2 % of a random vector).
    res = SpectralSolver([_dense_op(w)], start_noise=0.0).run(tol=1e-6, max_products=500,
                                                              init=[v0])[0]
    assert res.converged and res.products <= most  # products include the final evaluation
    assert res.sigma == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-6)


def test_tolerance_below_machine_precision_still_stops(rng):
    m = rng.standard_normal((60, 40))
    res = SpectralSolver([_dense_op(m)]).run(tol=1e-14, max_products=5000)[0]
    assert res.converged and res.products < 200
    assert res.sigma == pytest.approx(np.linalg.svd(m, compute_uv=False)[0], rel=1e-5)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_xla_compiled_solver_matches(method, rng):
    m = rng.standard_normal((30, 20))
    res = SpectralSolver([_dense_op(m)], method=method, jit_compile=True).run(tol=1e-8)[0]
    assert res.sigma == pytest.approx(np.linalg.svd(m, compute_uv=False)[0], rel=1e-4)


def test_finish_normalises_the_returned_vector():
    from tf_lipschitz.power import _finish

    w = np.diag([3.0, 1.0]).astype("float32")
    sigma, resid = _finish(lambda x: tf.matmul(x, w), tf.constant([[5.0, 0.0]]))
    assert float(sigma) == pytest.approx(3.0)  # ‖Av‖/‖v‖, not ‖Av‖ = 15
    assert float(resid) == pytest.approx(0.0, abs=1e-6)


def test_warm_rerun_from_a_converged_vector_keeps_the_value():
    # The first Gram-Schmidt pass then cancels all but ~tol of the product: the re-run must
    # re-orthogonalise enough not to build a spurious basis (it used to return garbage).
    import keras

    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
    conv.build((None, 48, 48, 16))
    op = LinearOperator(lambda x: conv.convolution_op(x, conv.kernel), (48, 48, 16))
    solver = SpectralSolver([op], start_noise=0.0)  # the converged vector exactly
    first = solver.run(tol=1e-5, init=None)[0]
    assert first.converged
    for _ in range(2):
        again = solver.run(tol=1e-5, init="warm")[0]
        assert again.converged and again.products <= 3
        assert again.sigma == pytest.approx(first.sigma, rel=1e-6)
    # With the default blend of 2 % random vector: a few more products, the same value.
    solver.start_noise = 0.02
    again = solver.run(tol=1e-5, init="warm")[0]
    assert again.converged and again.products < first.products
    assert again.sigma == pytest.approx(first.sigma, rel=1e-6)


@pytest.mark.parametrize("start", ["random", "cluster"])
def test_clustered_spectrum_is_not_stopped_early(start, rng):
    """30 singular values within 6e-4 of the top, the rest below 0.95: while Lanczos has not
    resolved the cluster, the gap between its Ritz values looks large, and a stop on a
    gap-based estimate of the error (``r² / gap``) returned 0.99973 here (random start) or
    0.99970 (start spread evenly over the cluster) for ``tol=1e-4``. The residual stop must
    not."""
    n = 3000
    d = np.concatenate([1.0 - 2e-5 * np.arange(30), rng.uniform(0.0, 0.95, n - 30)])
    diag = tf.constant(d[None])
    op = LinearOperator(lambda x: x * diag, (n,), dtype="float64")
    v0 = (rng.standard_normal(n) if start == "random"
          else np.concatenate([np.ones(30), 1e-2 * rng.standard_normal(n - 30)]))
    res = SpectralSolver([op]).run(tol=1e-4, init=[v0])[0]
    assert res.converged
    assert 1.0 - 1e-4 <= res.sigma <= 1.0 + 1e-12


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("scale", [1e-17, 1e-12, 1e12, 1e18])
def test_operators_of_extreme_norm_are_measured(method, scale, rng):
    # JᵀJ squares the norm: in float32 products of size 1e36 overflow in the norms of the
    # iteration and 1e-36 ones underflow; without the solver's power-of-two scaling, ×1e18 came
    # out at 0.68 of its norm and ×1e-17 at 0.78, silently.
    m = rng.standard_normal((30, 20))
    w = tf.constant(m, tf.float32)
    c = tf.constant(scale, tf.float32)
    op = LinearOperator(lambda x: tf.matmul(x, w) * c, (30,), name="scaled")
    res = SpectralSolver([op], method=method).run(tol=1e-9, max_products=5000)[0]
    exact = np.linalg.svd(m, compute_uv=False)[0] * float(np.float32(scale))
    assert res.sigma == pytest.approx(exact, rel=1e-4)
    assert res.converged


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_products_name_the_operator(method, bad, rng):
    m = rng.standard_normal((6, 4)).astype("float32")
    m[2, 1] = bad
    op = LinearOperator(lambda x: tf.matmul(x, m), (6,), name="broken")
    with pytest.raises(tfl.LipschitzError, match=r"'broken'.*not finite.*float32"):
        SpectralSolver([op], method=method).run(tol=1e-6)
    with pytest.raises(tfl.LipschitzError, match=r"'broken'.*not finite"):
        top_singular_triplets(op, 2)


def test_products_that_disagree_with_the_forward_pass_are_refused(rng):
    # An adjoint that is not the transpose (what a product folded out of range by TensorFlow
    # looks like: JᵀJv = 0 while Jv is not): a value from such a run would be meaningless.
    m = rng.standard_normal((6, 4)).astype("float32")
    op = LinearOperator(lambda x: tf.matmul(x, m), (6,), name="folded",
                        adjoint=lambda y: 0.0 * tf.matmul(y, m.T))
    for method in ("power", "lanczos"):
        with pytest.raises(tfl.LipschitzError, match=r"'folded'.*disagree"):
            SpectralSolver([op], method=method).run(tol=1e-6)
    with pytest.raises(tfl.LipschitzError, match=r"'folded'.*disagree"):
        top_singular_triplets(op, 2)


def test_float16_operator_of_large_size(rng):
    # The scale is taken from ‖h(v₀)‖, not its largest entry: with the latter, the scaled norm
    # of a 1024-wide float16 layer was large enough for ‖JᵀJv‖ to overflow float16.
    m = rng.standard_normal((1024, 1024)) / 32.0
    w = tf.constant(m, tf.float16)
    op = LinearOperator(lambda x: tf.matmul(x, w), (1024,), name="half", dtype="float16")
    res = SpectralSolver([op]).run(tol=1e-3, max_products=300)[0]
    exact = np.linalg.svd(m.astype(np.float16).astype(np.float64), compute_uv=False)[0]
    assert res.sigma == pytest.approx(exact, rel=5e-3)


@pytest.mark.parametrize("scale", [1e-15, 1e15])
def test_top_singular_triplets_of_extreme_norm(scale, rng):
    m = rng.standard_normal((12, 9))
    w, c = tf.constant(m, tf.float32), tf.constant(scale, tf.float32)
    op = LinearOperator(lambda x: tf.matmul(x, w) * c, (12,), name="scaled")
    trip = top_singular_triplets(op, 3, tol=1e-7)
    u, s, vt = np.linalg.svd(m)
    np.testing.assert_allclose(trip.s, s[:3] * float(np.float32(scale)), rtol=1e-4)
    for i in range(3):  # unit singular vectors (the operator is x ↦ x·m, of matrix mᵀ)
        assert abs(np.dot(trip.v[i].ravel(), u[:, i])) == pytest.approx(1.0, abs=1e-3)
        assert abs(np.dot(trip.u[i].ravel(), vt[i])) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_warm_start_finds_a_singular_value_that_grew(method):
    # The previous top vector e1 is still an exact singular vector after the weights change; a
    # Krylov iteration from it alone never leaves span{e1} and reported 1.0 (converged) for a
    # norm of 2.0. The start is blended with a random vector (start_noise).
    w = tf.Variable(np.diag([1.0, 0.5, 0.25, 0.1]).astype("float32"))
    op = LinearOperator(lambda x: tf.matmul(x, w), (4,), name="diag")
    solver = SpectralSolver([op], method=method)
    assert solver.run(tol=1e-8, max_products=500)[0].sigma == pytest.approx(1.0, rel=1e-6)
    w.assign(np.diag([1.0, 2.0, 0.25, 0.1]).astype("float32"))
    assert solver.run(tol=1e-8, max_products=500)[0].sigma == pytest.approx(2.0, rel=1e-6)
    # A supplied start with no component along the top direction, likewise.
    res = SpectralSolver([op], method=method).run(tol=1e-8, max_products=500,
                                                  init=[np.array([1.0, 0, 0, 0], "float32")])
    assert res[0].sigma == pytest.approx(2.0, rel=1e-6)
    # Without the blend the iteration is stuck (what the test guards against).
    stuck = SpectralSolver([op], method=method, start_noise=0.0)
    assert stuck.run(tol=1e-8, init=[np.array([1.0, 0, 0, 0], "float32")])[0].sigma == \
        pytest.approx(1.0, rel=1e-6)


def _half_precision_operator(kind, rng):
    """A float16 Dense (2048 -> 16) or Conv2D (12x12x8 -> 16) map of norm about 1e3, as a
    mixed_float16 model gives it to the solvers, and the singular values of the same map with
    the float16-cast kernel in float64."""
    if kind == "dense":
        kernel, shape = rng.standard_normal((2048, 16)), (2048,)
        apply = tf.matmul
    else:
        kernel, shape = rng.standard_normal((3, 3, 8, 16)), (12, 12, 8)
        apply = lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")  # noqa: E731

    def exact(k):
        k = tf.constant(k, tf.float64)
        dense = LinearOperator(lambda x: apply(x, k), shape, dtype="float64").to_dense()
        return np.linalg.svd(dense, compute_uv=False)

    kernel = tf.constant(kernel * 1e3 / exact(kernel)[0], tf.float16)
    op = LinearOperator(lambda x: apply(x, kernel), shape, name=kind, dtype="float16")
    return op, exact(kernel.numpy().astype(np.float64))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_half_precision_operator_in_the_solver_and_the_block_iteration(kind, rng):
    # Applied in float16, iterated in float32 by both. The block iteration of SeqLip used to
    # iterate in float16 (it raised: eigh has no float16 kernel).
    op, exact = _half_precision_operator(kind, rng)
    res = SpectralSolver([op]).run(tol=1e-6)[0]
    assert res.sigma == pytest.approx(exact[0], rel=2.0 ** -10)
    trip = top_singular_triplets(op, 3)
    np.testing.assert_allclose(trip.s, exact[:3], rtol=2.0 ** -10)
    # Its tolerance is raised to a 16th of the float16 rounding, so it stops (300 iterations,
    # 3311 products, without).
    assert trip.products < 1000


@pytest.mark.parametrize("head, reachable", [((1.0, 0.99999, 0.9999, 0.999, 0.99), False),
                                              ((1.0, 0.99, 0.98, 0.9), True)])
def test_power_method_converged_means_within_tol(head, reachable, rng):
    # The power method stopped when σ² changed by less than tol between iterations: here it
    # reported converged 1.1e-4 (cluster) and 1.1e-5 (gap of 1 %) below the top for tol=1e-6.
    # It now stops on the residual, as Lanczos does; on the cluster it runs out of products,
    # and says so.
    n = 200
    d = np.concatenate([head, rng.uniform(0.0, 0.8, n - len(head))])
    diag = tf.constant(d[None], tf.float32)
    op = LinearOperator(lambda x: x * diag, (n,), name="diag")
    res = SpectralSolver([op], method="power").run(tol=1e-6, max_products=2000,
                                                   init=[rng.standard_normal(n)])[0]
    assert res.converged == reachable
    if res.converged:
        assert 1.0 - 1e-6 <= res.sigma <= 1.0 + 1e-6
    else:
        assert res.products == 2000


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("cap", [1, 3, 20])
def test_max_products_is_a_hard_cap(method, cap, rng):
    # Lanczos finished its Krylov cycle of 16 products (17 with the final evaluation for a cap
    # of 3, 33 for 20); the power method spent the cap plus the final evaluation.
    op = _dense_op(rng.standard_normal((60, 60)))
    res = SpectralSolver([op], method=method).run(tol=1e-8, max_products=cap)[0]
    assert res.products <= cap
    assert not res.converged
    assert 0 < res.sigma <= np.linalg.svd(op.to_dense(), compute_uv=False)[0] * (1 + 1e-6)


def test_analysing_many_models_does_not_warn_about_retracing():
    # Every new model is traced once, as intended, but TensorFlow counted the traces of the
    # solver and of the lower-bound search across models and logged "5 out of the last 5 calls
    # ... triggered tf.function retracing" from the fifth model in a process.
    import logging

    import keras

    import tf_lipschitz as tfl

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        for _ in range(6):  # TensorFlow warns from the fifth trace
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                                      keras.layers.Dense(2)])
            estimator = tfl.LipschitzEstimator(model, verbose=0)
            estimator.autolip()
            estimator.lower_bound(n_random=4, steps=1, verbose=0)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "retracing" in r.getMessage()]
