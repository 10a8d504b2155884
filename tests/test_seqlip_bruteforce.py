"""Adversarial trial of SeqLip and the lower bound against brute force on tiny networks.

Ground truth: every SeqLip factor recomputed independently (dense SVDs of the layer maps
materialised from the Keras layers, then all ``2^n`` vertex patterns), the largest product
over all activation patterns of the chain (at least the true constant), and sampled Jacobian
norms (at most the true constant). Invariants: sampled <= SeqLip <= AutoLip, a certified
SeqLip is at least the chain max, and each pair flagged certified is at least its true max.
"""

import itertools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import seqlip

from groundtruth import affine_map

L = keras.layers


def vertex_max(a, b, lo, hi):
    """max over d ∈ {lo, hi}^n of ‖a diag(d) b‖₂."""
    d = np.array(list(itertools.product([lo, hi], repeat=a.shape[1])))
    return float(np.linalg.svd(np.einsum("mn,sn,nq->smq", a, d, b), compute_uv=False)[:, 0].max())


def seqlip_factors(mats, slopes):
    """SeqLip's pair factors with the paper's split (Σ_1, Σ^{1/2} inside, Σ_K)."""
    svds = [np.linalg.svd(m, full_matrices=False) for m in mats]
    factors = []
    for k in range(len(mats) - 1):
        u, s, _ = svds[k]
        _, s2, vt2 = svds[k + 1]
        e_left = 1.0 if k == 0 else 0.5
        e_right = 0.0 if k + 2 == len(mats) else 0.5
        factors.append(vertex_max((vt2.T * s2 ** (1 - e_right)).T, u * s ** e_left, *slopes[k]))
    return factors


def chain_max(mats, slopes):
    """max over all pattern combinations of ‖M_K D_{K-1} … D_1 M_1‖ (≥ the true constant)."""
    prods = mats[0][None]
    for (lo, hi), m in zip(slopes, mats[1:]):
        d = np.array(list(itertools.product([lo, hi], repeat=prods.shape[1])))
        prods = (d[None, :, :, None] * prods[:, None]).reshape(-1, *prods.shape[1:])
        prods = np.einsum("ij,sjk->sik", m, prods)
    return float(np.linalg.svd(prods, compute_uv=False)[:, 0].max())


def sampled_max(model, in_shape, n=4000):
    """Largest Jacobian norm at random points (a lower estimate of the constant)."""
    rng = np.random.default_rng(0)
    best = 0.0
    for scale in (0.3, 3.0, 30.0):
        x = tf.constant((scale * rng.standard_normal((n, *in_shape))).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        j = tape.batch_jacobian(y, x).numpy().reshape(n, -1, int(np.prod(in_shape)))
        best = max(best, float(np.linalg.svd(j.astype(np.float64), compute_uv=False)[:, 0].max()))
    return best


def randomize(model, seed):
    """Random biases and BatchNormalization statistics (negative gammas included)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            k = layer.gamma.shape
            layer.gamma.assign(rng.uniform(-2, 2, k).astype("float32"))
            layer.beta.assign(rng.standard_normal(k).astype("float32"))
            layer.moving_mean.assign(rng.standard_normal(k).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2, k).astype("float32"))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.standard_normal(layer.bias.shape).astype("float32"))


def _bn_leaky():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((2,)), L.Dense(4, name="d1"), L.BatchNormalization(name="b1"),
        L.LeakyReLU(0.2), L.Dense(4, name="d2"), L.BatchNormalization(name="b2"), L.ReLU(),
        L.Dense(2, name="d3")])
    return model, (2,), [["d1", "b1"], ["d2", "b2"], ["d3"]], [(0.2, 1.0), (0.0, 1.0)]


def _conv1d():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 1)), L.Conv1D(2, 3, padding="same", name="c1"), L.ReLU(),
        L.Conv1D(2, 3, strides=2, name="c2"), L.ReLU(), L.Flatten(name="f"), L.Dense(2, name="d")])
    return model, (6, 1), [["c1"], ["c2"], ["f", "d"]], [(0.0, 1.0), (0.0, 1.0)]


def _pool_reshape():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((4, 4, 1)), L.Conv2D(1, 2, padding="same", name="c1"), L.LeakyReLU(0.3),
        L.AveragePooling2D(2, name="p"), L.Conv2D(2, 2, name="c2"), L.Activation("tanh"),
        L.Reshape((2, 1), name="r"), L.Flatten(name="f"), L.Dense(1, name="d")])
    return model, (4, 4, 1), [["c1"], ["p", "c2"], ["r", "f", "d"]], [(0.3, 1.0), (0.0, 1.0)]


def _leaky_steep():
    keras.utils.set_random_seed(3)  # negative_slope > 1: slopes [1, 1.5]
    model = keras.Sequential([
        keras.Input((2,)), L.Dense(5, name="d1"), L.LeakyReLU(1.5), L.Dense(4, name="d2"),
        L.Activation("sigmoid"), L.Dense(2, name="d3")])
    return model, (2,), [["d1"], ["d2"], ["d3"]], [(1.0, 1.5), (0.0, 0.25)]


def _commuted():
    # Each BN follows an activation inside a Dense and joins its group across it; the link
    # after the first group composes that group's sigmoid with the ReLU layer: [0, 0.25].
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((2,)), L.Dense(4, activation="sigmoid", name="d1"),
        L.BatchNormalization(name="b1"), L.ReLU(), L.Dense(5, activation="relu", name="d2"),
        L.BatchNormalization(name="b2")])
    return model, (2,), [["d1", "b1"], ["d2", "b2"]], [(0.0, 0.25)]


def _commuted_layers():
    # A BN after a ReLU layer joins the Dense before it; the ReLU then composes with the
    # LeakyReLU of the link ([0, 1]); the second BN fuses forward into the last Dense.
    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input((3,)), L.Dense(4, name="d1"), L.ReLU(), L.BatchNormalization(name="b1"),
        L.LeakyReLU(0.2), L.Dense(4, name="d2"), L.ReLU(), L.BatchNormalization(name="b2"),
        L.Dense(2, name="d3")])
    return model, (3,), [["d1", "b1"], ["d2"], ["b2", "d3"]], [(0.0, 1.0), (0.0, 1.0)]


@pytest.mark.parametrize("build", [_bn_leaky, _conv1d, _pool_reshape, _leaky_steep, _commuted,
                                   _commuted_layers],
                         ids=["bn-leaky", "conv1d", "pool-reshape", "leaky-1.5", "commuted",
                              "commuted-layers"])
def test_exact_seqlip_equals_independent_brute_force_and_orders_the_bounds(build):
    model, in_shape, groups, slopes = build()
    randomize(model, 1)
    mats, shape = [], in_shape
    for names in groups:
        layers = [model.get_layer(n) for n in names]
        mats.append(affine_map(layers, shape))
        shape = tuple(layers[-1].output.shape[1:])
    est = tfl.LipschitzEstimator(model, verbose=0)
    exact = est.seqlip(mode="exact")
    truth = sampled_max(model, in_shape)
    floor = chain_max(mats, slopes)
    assert exact.certified
    assert [p["value"] for p in exact.settings["pairs"]] == \
        pytest.approx(seqlip_factors(mats, slopes), rel=1e-5)
    assert truth <= floor * (1 + 1e-5) and floor <= exact.upper * (1 + 1e-5)
    autolip = est.autolip(certified=True).upper
    assert exact.upper <= autolip * (1 + 1e-6)
    for mode in ("greedy", "certified"):
        rep = est.seqlip(mode=mode)
        assert truth <= rep.upper * (1 + 1e-5) and rep.upper <= autolip * (1 + 1e-6)
        if rep.certified:
            assert rep.upper >= floor * (1 - 1e-6)
    assert est.lower_bound(n_random=64, steps=10).value <= floor * (1 + 1e-5)


@pytest.mark.parametrize("options", [
    {"mode": "greedy", "top_k": 1}, {"mode": "greedy", "top_k": 2, "remainder": False},
    {"mode": "certified", "top_k": 2, "remainder": False}, {"mode": "auto", "max_exact_width": 5},
    {"mode": "greedy", "max_sweeps": 1}, {"mode": "greedy", "top_k": 1, "split": "optimize"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_certified_flags_are_honest_per_pair(options):
    # Every pair flagged certified must be at least its true inner max (brute force on the
    # full SVDs, whatever truncation the options ask for), and a certified chain at least the
    # largest product over all activation patterns.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), L.Dense(6, activation="relu"),
                              L.Dense(5, activation="relu"), L.Dense(4, activation="relu"),
                              L.Dense(2)])
    randomize(model, 0)
    mats = [layer.kernel.numpy().T.astype(np.float64) for layer in model.layers]
    slopes = [(0.0, 1.0)] * 3
    truth = seqlip_factors(mats, slopes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # remainder=False warns about itself
        rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(**options)
    for pair, exact in zip(rep.settings["pairs"], truth):
        if pair["kind"] == "certified":
            assert pair["value"] >= exact * (1 - 1e-9), pair
        else:
            assert pair["value"] <= pair["certificate"]
        assert pair["certificate"] >= exact * (1 - 1e-9)
    if rep.certified:
        assert rep.upper >= chain_max(mats, slopes) * (1 - 1e-6)


def _celu_kink_model(a):
    """f(x) = a·celu(x) + x: constant 1 + a; autodiff gives 1 + 2a at the kink x = 0."""
    x = keras.Input((1,))
    h = L.Dense(1, use_bias=False, activation="celu",
                kernel_initializer=keras.initializers.Constant(1.0))(x)
    y = L.Add()([L.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(a))(h),
                 L.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.0))(x)])
    return keras.Model(x, y)


def test_lower_bound_at_a_kink_stays_within_the_secant_resolution():
    # Autodiff's derivative of a·celu(x) + x at the kink x = 0 is 1 + 2a; the constant is 1 + a.
    # Secants cannot tell a shortfall below 1e-3 (their float32 resolution) from rounding, so the
    # kept norm may exceed the constant by that much; the secant itself does not, and estimate()
    # compares SeqLip with it (no false "not an upper bound" warning).
    a = 9e-4
    est = tfl.LipschitzEstimator(_celu_kink_model(a), verbose=0)
    upper = est.autolip(certified=True).upper
    assert upper == pytest.approx(1 + a, rel=1e-5)
    low = est.lower_bound(np.zeros((4, 1), "float32"))  # the data sit on the kink
    assert low.value <= (1 + a) * (1 + 1e-3)
    assert low.secant <= (1 + a) * (1 + 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = est.estimate(np.zeros((4, 1), "float32"), mode="exact")
    assert rep.upper >= low.secant * (1 - 1e-6)  # float32 rounding of the model


@pytest.mark.parametrize("seed, lo", [(4, 0.9999999), (8, 0.999999)])
def test_exact_search_with_cancellation_from_a_weak_incumbent(monkeypatch, seed, lo):
    # Slopes lo ≈ hi and Σ_j c_j e_jᵀ = 0: X(d) = −(1 − lo) Σ_{d_j = lo} c_j e_jᵀ is about 1e6
    # times smaller than the table entries, so float32 rounding of the pruning bounds dwarfs a
    # fixed relative margin. Started from an incumbent below the max, the search must still
    # reach the float64 brute-force max. (Pattern d and its complement have the same norm,
    # hence the 1e-6 gap that keeps the incumbent off the maximising pair.)
    rng = np.random.default_rng(seed)
    n = 14
    c, e = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    e -= c @ np.linalg.lstsq(c, e, rcond=None)[0]  # cᵀe = 0
    d = np.array(list(itertools.product([lo, 1.0], repeat=n)))
    values = np.linalg.svd(np.einsum("np,sn,nq->spq", c, d, e), compute_uv=False)[:, 0]
    truth = float(values.max())
    assert np.linalg.norm(np.abs(c).T @ np.abs(e)) > 1e5 * truth
    weak = np.flatnonzero(values < truth * (1 - 1e-6))
    k = weak[np.argmax(values[weak])]
    monkeypatch.setattr(seqlip, "_alternate", lambda *args, **kwargs: (float(values[k]), d[k]))
    value, pattern, _ = seqlip._exact_search(c, e, lo, 1.0)
    assert value == pytest.approx(truth, rel=1e-7)
    assert np.linalg.norm(c.T @ (pattern[:, None] * e), 2) == pytest.approx(truth, rel=1e-7)
