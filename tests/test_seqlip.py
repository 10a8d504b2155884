"""SeqLip against ground truth: brute force over activation patterns on tiny networks."""

import itertools
import math
import warnings

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl
from tf_lipschitz.errors import LipschitzError
from tf_lipschitz.seqlip import pattern_max

from groundtruth import affine_map

L = keras.layers


def brute_pattern_max(a, b, lo=0.0, hi=1.0):
    """max over d ∈ {lo, hi}^n of ‖a diag(d) b‖₂, one SVD per pattern."""
    n = a.shape[1]
    d = np.array(list(itertools.product([lo, hi], repeat=n)))
    x = np.einsum("mn,sn,nq->smq", a, d, b)
    return float(np.linalg.svd(x, compute_uv=False)[:, 0].max())


def brute_chain_max(mats, lo=0.0, hi=1.0):
    """max over all pattern combinations of ‖M_K D_{K-1} … D_1 M_1‖ (≥ the true constant)."""
    prods = mats[0][None]  # (combinations so far, rows, in)
    for m in mats[1:]:
        d = np.array(list(itertools.product([lo, hi], repeat=prods.shape[1])))
        prods = (d[None, :, :, None] * prods[:, None]).reshape(-1, *prods.shape[1:])
        prods = np.einsum("ij,sjk->sik", m, prods)
    return float(np.linalg.svd(prods, compute_uv=False)[:, 0].max())


def dense_matrices(model):
    """Kernels of the Dense layers as (out, in) matrices."""
    return [l.kernel.numpy().T.astype(np.float64) for l in model.layers if isinstance(l, L.Dense)]


def mlp(sizes, activation="relu", seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((sizes[0],))]
    layers += [L.Dense(w, activation=activation) for w in sizes[1:-1]]
    layers += [L.Dense(sizes[-1])]
    return keras.Sequential(layers)


# ----------------------------------------------------------------------------- pattern_max


@pytest.mark.parametrize("shape", [(4, 8, 10), (1, 6, 3), (5, 10, 12), (7, 9, 3), (3, 14, 14)])
@pytest.mark.parametrize("slopes", [(0.0, 1.0), (0.2, 1.0), (0.0, 0.25)])
def test_pattern_max_against_brute_force(shape, slopes, rng):
    m, n, q = shape
    a, b = rng.standard_normal((m, n)), rng.standard_normal((n, q))
    truth = brute_pattern_max(a, b, *slopes)
    exact = pattern_max(a, b, slopes, mode="exact")
    greedy = pattern_max(a, b, slopes, mode="greedy")
    cert = pattern_max(a, b, slopes, mode="certified")
    assert exact.value == pytest.approx(truth, rel=1e-9)
    assert exact.certified and not greedy.certified and cert.certified
    # the returned pattern attains the value
    assert np.linalg.norm(a @ np.diag(exact.pattern) @ b, 2) == pytest.approx(truth, rel=1e-9)
    assert greedy.value <= truth * (1 + 1e-9)
    assert np.linalg.norm(a @ np.diag(greedy.pattern) @ b, 2) == pytest.approx(greedy.value)
    assert cert.value >= truth * (1 - 1e-9)
    assert cert.value <= max(slopes, key=abs) * np.linalg.norm(a, 2) * np.linalg.norm(b, 2) + 1e-9


def test_pattern_max_exact_search_over_several_blocks(rng):
    # 15 activations: 4 blocks of 2^13 patterns, a low-rank (easily pruned) and a flat case
    for a, b in [(rng.standard_normal((2, 15)), rng.standard_normal((15, 3))),
                 (rng.standard_normal((15, 15)), rng.standard_normal((15, 15)))]:
        assert pattern_max(a, b).value == pytest.approx(brute_pattern_max(a, b), rel=1e-9)


def test_pattern_max_single_vertex_and_errors(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    same = pattern_max(a, b, (0.5, 0.5))
    assert same.mode == "product" and same.value == pytest.approx(0.5 * np.linalg.norm(a @ b, 2))
    with pytest.raises(ValueError, match="left"):
        pattern_max(a, a)
    with pytest.raises(ValueError, match="slopes"):
        pattern_max(a, b, (1.0, 0.0))
    with pytest.raises(ValueError, match="mode"):
        pattern_max(a, b, mode="fast")
    with pytest.raises(ValueError, match="2\\^40"):
        pattern_max(np.ones((1, 40)), np.ones((40, 1)))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("sizes", [(10, 8, 4), (12, 10, 1), (8, 8, 3), (9, 6, 6)])
def test_one_hidden_layer_exact_is_the_true_constant(sizes):
    # input dim >= width and generic weights: every activation pattern is reachable, so
    # max_s ‖W2 diag(s) W1‖ is the Lipschitz constant itself.
    model = mlp(sizes)
    w1, w2 = dense_matrices(model)
    truth = brute_pattern_max(w2, w1)
    est = tfl.LipschitzEstimator(model, verbose=0)
    rep = est.seqlip(mode="exact")
    assert rep.method == "seqlip" and rep.certified
    assert rep.upper == pytest.approx(truth, rel=1e-5)
    assert [r.method for r in rep.layers if r.kind == "linear"] == \
        ["seqlip-start (svd)", "seqlip-exact"]
    assert est.lower_bound().value <= rep.upper * (1 + 1e-5)
    assert rep.upper <= est.autolip().upper * (1 + 1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_catches_v_instead_of_v_transpose(seed):
    # shared/ALGORITHMS.md §5: a reference SeqLip routine used V where Vᵀ belongs and returned
    # values below the true constant on random 10→8→4 ReLU nets. The check used here (SeqLip
    # exact == brute force) fails for that formula on every seed, and on seed 4 the buggy value
    # is below the true constant.
    model = mlp((10, 8, 4), seed=seed)
    w1, w2 = dense_matrices(model)
    truth = brute_pattern_max(w2, w1)
    rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact")
    assert rep.upper == pytest.approx(truth, rel=1e-5)

    u1, s1, _ = np.linalg.svd(w1, full_matrices=False)
    _, s2, v2t = np.linalg.svd(w2)  # full 8 × 8 V: the wrong orientation still fits
    buggy = pattern_max(v2t.T[:4] * s2[:, None], u1 * s1).value  # rows of V, not of Vᵀ
    assert abs(buggy - truth) > 0.01 * truth
    if seed == 4:
        assert buggy < truth

    # A square inner layer (V and Vᵀ have the same shape) in a deeper chain: SeqLip stays above
    # the largest product over all activation patterns.
    deeper = mlp((10, 8, 8, 4), seed=seed)
    floor = brute_chain_max(dense_matrices(deeper))
    assert tfl.LipschitzEstimator(deeper, verbose=0).seqlip(mode="exact").upper >= \
        floor * (1 - 1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_deeper_net_ordering(seed):
    model = mlp((6, 6, 5, 4, 3), seed=seed)
    est = tfl.LipschitzEstimator(model, verbose=0)
    exact = est.seqlip(mode="exact")
    greedy = est.seqlip(mode="greedy")
    cert = est.seqlip(mode="certified")
    auto = est.autolip()
    lower = est.lower_bound(n_random=32).value
    floor = brute_chain_max(dense_matrices(model))
    assert lower <= floor * (1 + 1e-5)
    assert floor <= exact.upper * (1 + 1e-6)
    assert exact.upper <= auto.upper * (1 + 1e-6)
    assert greedy.upper <= exact.upper * (1 + 1e-6)
    assert cert.upper >= exact.upper * (1 - 1e-6)
    assert exact.certified and cert.certified and not greedy.certified
    # the per-pair certificate is certified and above the exact factor
    for row in greedy.layers:
        if row.method == "seqlip-greedy":
            assert row.certificate >= row.norm * (1 - 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimized_split_is_valid_and_never_looser(seed):
    """Every split exponent bounds the same constant: the optimised product stays above the
    brute-force max over all pattern combinations and at or below the paper's split."""
    model = mlp((6, 7, 5, 6, 3), seed=seed)
    est = tfl.LipschitzEstimator(model, verbose=0)
    paper = est.seqlip(mode="exact")
    best = est.seqlip(mode="exact", split="optimize")
    floor = brute_chain_max(dense_matrices(model))
    assert floor <= best.upper * (1 + 1e-6)
    assert best.upper <= paper.upper * (1 + 1e-9)
    assert best.certified and best.settings["split"] == "optimize"
    splits = [p["split"] for p in best.settings["pairs"]]
    assert splits[0][0] == 1.0 and splits[-1][1] == 0.0
    assert all(left[1] == right[0] for left, right in zip(splits, splits[1:]))
    # an explicit product of the reported pair values is the bound
    assert math.prod(p["value"] for p in best.settings["pairs"]) == pytest.approx(best.upper)


def test_split_argument_is_checked():
    est = tfl.LipschitzEstimator(mlp((3, 4, 2)), verbose=0)
    with pytest.raises(ValueError, match="split"):
        est.seqlip(split="half")


@pytest.mark.parametrize("act,slopes", [
    (lambda: L.LeakyReLU(negative_slope=0.3), (0.3, 1.0)),
    (lambda: L.Activation("sigmoid"), (0.0, 0.25)),
    (lambda: L.Activation("tanh"), (0.0, 1.0)),
])
def test_activation_layers_and_slope_boxes(act, slopes):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((9,)), L.Dense(7), act(), L.Dense(3)])
    w1, w2 = dense_matrices(model)
    rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact")
    assert rep.upper == pytest.approx(brute_pattern_max(w2, w1, *slopes), rel=1e-6)
    assert rep.certified
    inside = [r for r in rep.layers if r.kind == "constant"]
    assert len(inside) == 1 and inside[0].method == "seqlip"


def test_negative_slope_activation_falls_back_to_autolip():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="gelu"), L.Dense(2)])
    est = tfl.LipschitzEstimator(model, verbose=0)
    rep = est.seqlip()
    assert rep.upper == pytest.approx(est.autolip().upper, rel=1e-6)
    assert any("gelu" in note and "AutoLip" in note for note in rep.settings["fallbacks"])
    assert rep.settings["pairs"] == []


def test_functional_graph_chains_between_merges():
    keras.utils.set_random_seed(4)
    x = keras.Input((6,))
    h = L.Dense(8, activation="relu", name="a")(x)
    y = L.Dense(8, activation="relu", name="b")(h)
    y = L.Dense(8, name="c")(y)
    z = L.Add(name="add")([h, y])
    z = L.ReLU(name="r")(z)
    out = L.Dense(3, name="d")(L.Dense(5, activation="relu", name="e")(z))
    model = keras.Model(x, out)
    est = tfl.LipschitzEstimator(model, verbose=0)
    rep = est.seqlip(mode="exact")
    pairs = [p["pair"] for p in rep.settings["pairs"]]
    assert pairs == ["b -> c", "e -> d"]  # 'a' feeds two layers: no chain through it
    assert est.lower_bound(n_random=16).value <= rep.upper * (1 + 1e-5)
    assert rep.upper < est.autolip().upper
    names = [r.name for r in rep.layers]
    assert names.index("add") < names.index("d")


def test_batchnorm_fused_and_op_activation_in_chain():
    keras.utils.set_random_seed(11)
    x = keras.Input((7,))
    h = L.BatchNormalization(name="bn")(L.Dense(6, name="d1")(x))
    h = keras.ops.relu(h)
    model = keras.Model(x, L.Dense(3, name="d2")(h))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(11)
    bn.gamma.assign(rng.uniform(0.5, 2.0, 6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 6).astype("float32"))
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    w1 = scale[:, None] * model.get_layer("d1").kernel.numpy().T
    w2 = model.get_layer("d2").kernel.numpy().T
    rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact")
    assert [p["pair"] for p in rep.settings["pairs"]] == ["d1+bn -> d2"]
    assert rep.upper == pytest.approx(brute_pattern_max(w2.astype(float), w1.astype(float)),
                                      rel=1e-5)
    assert rep.to_dict()["method"] == "seqlip" and "pairs" in rep.to_json()


def test_conv_chain_exact_is_the_true_constant():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(3, 3, activation="relu"),
                              L.Flatten(), L.Dense(2)])
    est = tfl.LipschitzEstimator(model, verbose=0)
    ops = est.engine.operators
    w1, w2 = (op.to_dense().astype(np.float64) for op in ops)  # 12 x 16, 2 x 12
    rep = est.seqlip()
    assert rep.settings["pairs"][0]["mode"] == "exact"
    assert rep.upper == pytest.approx(brute_pattern_max(w2, w1), rel=1e-5)


def test_truncated_singular_triplets_are_estimates():
    model = mlp((10, 8, 7, 3), seed=6)
    est = tfl.LipschitzEstimator(model, verbose=0)
    floor = brute_chain_max(dense_matrices(model))
    kwargs = {"mode": "greedy", "top_k": 3, "dense_limit": 0, "subspace_tol": 1e-8}
    full = est.seqlip(mode="greedy")
    added = est.seqlip(remainder=True, **kwargs)
    with pytest.warns(UserWarning, match="remainder=False ignored singular values"):
        cut = est.seqlip(remainder=False, **kwargs)
    assert not added.certified and not cut.certified
    assert cut.upper <= added.upper
    assert added.upper >= floor * (1 - 1e-4)  # the remainder bound makes it an upper bound
    assert all(p["truncated"] for p in added.settings["pairs"])
    assert all(p["certificate"] is None for p in added.settings["pairs"])  # iterative SVD
    assert full.upper >= cut.upper * (1 - 1e-4)
    # a dense SVD truncated for the greedy search keeps a certified per-pair certificate
    dense = est.seqlip(mode="certified", top_k=3)
    assert dense.certified and dense.upper >= floor * (1 - 1e-6)


def test_unsettled_subspace_iteration_warns(monkeypatch):
    # The iterative triplets stopped at subspace_max_iter without a word; their values come
    # from below, so the user is told.
    from tf_lipschitz import seqlip

    monkeypatch.setattr(seqlip, "GRAM_SIDE", 0)  # the block iteration, not the Gram route
    model = mlp((10, 8, 7, 3), seed=6)
    est = tfl.LipschitzEstimator(model, verbose=0)
    with pytest.warns(RuntimeWarning, match="did not settle.*subspace_max_iter=1"):
        est.seqlip(mode="greedy", top_k=3, dense_limit=0, subspace_tol=1e-8, subspace_max_iter=1)


def test_auto_mode_chooses_per_pair_and_reports_it():
    model = mlp((5, 6, 40, 2), seed=7)
    rep = tfl.LipschitzEstimator(model, verbose=0).seqlip()
    modes = [(p["width"], p["mode"], p["kind"]) for p in rep.settings["pairs"]]
    assert modes == [(6, "exact", "certified"), (40, "greedy", "estimate")]
    assert not rep.certified
    assert [r.method for r in rep.layers if r.kind == "linear"][1:] == \
        ["seqlip-exact", "seqlip-greedy"]
    assert rep.to_dict()["kind"] == "estimate"


def test_exact_mode_too_wide_names_the_pair():
    model = mlp((5, 24, 2), seed=8)
    est = tfl.LipschitzEstimator(model, verbose=0)
    with pytest.raises(LipschitzError, match="dense.*24 activations.*max_exact_width"):
        est.seqlip(mode="exact")
    with pytest.raises(ValueError, match="mode"):
        est.seqlip(mode="fastest")


def ideal_matrix(rows, cols, rng, eps=0.01):
    """Random orthogonal U, V with singular values (1, eps, eps, ...) (the paper's 'ideal')."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    s = np.zeros((rows, cols))
    k = min(rows, cols)
    s[np.arange(k), np.arange(k)] = eps
    s[0, 0] = 1.0
    return u @ s @ v.T


def test_ideal_orthogonal_weights_ratio_falls_like_one_over_pi():
    # Top singular vectors random and independent: each activation layer divides
    # SeqLip/AutoLip by about π (Scaman & Virmaux 2018, Section 6); at width 100 the
    # finite-size excess is about 15 %.
    for depth in (1, 2, 3):  # activation layers
        per_layer = []
        for seed in range(2):
            rng = np.random.default_rng(seed)
            model = mlp((2,) + (100,) * depth + (1,), seed=seed)
            autolip = 1.0  # product of the layer norms (ReLU is 1-Lipschitz)
            for layer in model.layers:
                w = ideal_matrix(layer.kernel.shape[1], layer.kernel.shape[0], rng)
                layer.kernel.assign(w.T.astype("float32"))
                autolip *= np.linalg.norm(w, 2)
            seqlip = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="greedy").upper
            per_layer.append((seqlip / autolip) ** (1.0 / depth))
        assert 0.8 / math.pi < float(np.mean(per_layer)) < 1.45 / math.pi, (depth, per_layer)


def test_estimate_combines_bounds_and_is_silent(capsys):
    model = mlp((6, 7, 5, 2), seed=9)
    est = tfl.LipschitzEstimator(model, verbose=0)
    rep = est.estimate(lower_bound_options={"n_random": 8, "steps": 10})
    assert rep.lower is not None and rep.lower <= rep.upper
    assert rep.upper <= rep.settings["autolip"]["upper"] * (1 + 1e-6)
    assert rep.gap == pytest.approx(rep.upper / rep.lower)
    assert rep.settings["gaps"]["autolip"] >= rep.gap * (1 - 1e-6)
    assert "gap upper/lower" in str(rep)
    assert capsys.readouterr().out == ""


def test_progress_output_when_verbose(capsys):
    model = mlp((6, 7, 2), seed=10)
    tfl.LipschitzEstimator(model, verbose=0).seqlip(verbose=1)
    assert "SeqLip" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:SeqLip.*did not settle:RuntimeWarning")  # float16 noise
@pytest.mark.parametrize("route", ["subspace", "gram"])
def test_mixed_float16_chain_through_the_block_iteration(route, monkeypatch):
    # With dense_limit=0 the spectra come from the block subspace iteration, which iterated the
    # float16 operators of a mixed_float16 model in float16 and raised (eigh has no float16
    # kernel). It now runs on the solver's preparation: applied in float16, iterated in float32.
    # The Gram route applies them in float16 and decomposes in float64.
    from tf_lipschitz import seqlip

    if route == "subspace":
        monkeypatch.setattr(seqlip, "GRAM_SIDE", 0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = mlp((10, 8, 4))
        for layer in model.layers:
            layer.kernel.assign(layer.kernel.numpy() * 1e3)  # norms about 1e3
        w1, w2 = [m.astype("float16").astype("float64") for m in dense_matrices(model)]
        truth = brute_pattern_max(w2, w1)  # of the float16-cast kernels
        rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact", dense_limit=0)
        assert [r.method for r in rep.layers if r.kind == "linear"] == \
            [f"seqlip-start ({route})", "seqlip-exact"]
        assert rep.upper == pytest.approx(truth, rel=2.0 ** -10)
    finally:
        keras.config.set_dtype_policy(previous)


def test_greedy_pair_that_reaches_its_certificate_is_certified():
    # A one-unit ReLU link: the greedy value is the exact max and equals the certificate (both
    # capped by AutoLip's factor); it was labelled an estimate although proven.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="relu"),
                              keras.layers.Dense(2)])
    w1, w2 = model.layers[0].kernel.numpy(), model.layers[1].kernel.numpy()
    exact = float(np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2))  # the unit is on somewhere
    report = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="greedy", certified=True)
    assert report.certified and report.upper >= exact
    assert report.upper == pytest.approx(exact, rel=1e-6)



def test_diagonal_spectrum_is_the_svd_of_the_diagonal_matrix():
    from tf_lipschitz.seqlip import diagonal_spectrum

    d = np.array([0.5, -2.0, 1.0, -1.0, 0.0, 3.0])
    full = diagonal_spectrum(d)
    np.testing.assert_allclose(full.s, np.linalg.svd(np.diag(d), compute_uv=False))
    np.testing.assert_allclose((full.u * full.s) @ full.v.T, np.diag(d), atol=0)
    assert full.exact and full.rest == 0.0 and full.method == "diagonal"
    top = diagonal_spectrum(d, top_k=2)
    assert top.s.tolist() == [3.0, 2.0] and top.rest == 1.0
    np.testing.assert_allclose(top.u.T @ np.diag(d) @ top.v, np.diag(top.s))


def _scaled_model(scaling_first=True, relu_layer=False):
    """A tiny CNN with a BatchNormalization (random negative and positive scales).

    ``scaling_first``: the BN is the first layer, a linear group of its own at the start of
    the SeqLip chain (``BN → ReLU → Conv → ReLU → Dense``). Otherwise it follows the
    convolution's ReLU (inside the Conv2D, or a ReLU layer with ``relu_layer``) and joins the
    convolution's group across it (``Conv → ReLU → BN → ReLU → Dense``).
    """
    inputs = keras.Input((2, 3, 2))
    if scaling_first:
        x = L.Conv2D(3, 3, padding="same", name="conv")(L.ReLU()(L.BatchNormalization(name="bn")(
            inputs)))
    elif relu_layer:
        x = L.BatchNormalization(name="bn")(L.ReLU()(L.Conv2D(3, 3, padding="same",
                                                               name="conv")(inputs)))
    else:
        x = L.BatchNormalization(name="bn")(L.Conv2D(3, 3, padding="same", activation="relu",
                                                     name="conv")(inputs))
    x = L.Flatten()(L.ReLU()(x))
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    rng = np.random.default_rng(11)
    bn = model.get_layer("bn")
    size = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(-2.0, 2.0, size).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype("float32"))
    return model


@pytest.mark.parametrize("mode", ["exact", "greedy", "certified"])
def test_batchnorm_group_gets_its_exact_diagonal_spectrum(mode, monkeypatch):
    # The BN group's SVD is its diagonal, without a dense SVD (or, on large grids, a subspace
    # iteration over a spectrum where each scale repeats over the grid); the pair next to it
    # needs no pattern search: in every mode it equals the exact enumeration through the
    # dense SVD (to the 8 float32 units the scales are widened by), and is certified.
    from tf_lipschitz import seqlip

    model = _scaled_model()
    dense_calls, diagonal_calls = [], []
    original, diagonal = seqlip.operator_spectrum, seqlip.diagonal_spectrum
    monkeypatch.setattr(seqlip, "operator_spectrum",
                        lambda op, *a, **k: dense_calls.append(op.name) or original(op, *a, **k))
    monkeypatch.setattr(seqlip, "diagonal_spectrum",
                        lambda d, *a: diagonal_calls.append(len(d)) or diagonal(d, *a))
    kwargs = {"max_exact_width": 18, "certified": True}
    fast = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode=mode, **kwargs)
    assert diagonal_calls == [12] and "bn" not in dense_calls and "conv" in dense_calls
    assert [p["mode"] for p in fast.settings["pairs"]] == ["diagonal", mode]
    monkeypatch.setattr(seqlip, "_diagonal_of", lambda op: None)
    exact = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact", **kwargs)
    assert exact.certified
    assert fast.settings["pairs"][0]["value"] == pytest.approx(
        exact.settings["pairs"][0]["value"], rel=2e-6)
    assert fast.settings["pairs"][0]["value"] >= exact.settings["pairs"][0]["value"]
    # top_k does not truncate the exact SVD next to the scaling: one norm takes every triplet
    monkeypatch.undo()
    few = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode=mode, top_k=2, **kwargs)
    assert few.settings["pairs"][0]["value"] == pytest.approx(
        fast.settings["pairs"][0]["value"], rel=1e-12)


@pytest.mark.parametrize("relu_layer", [False, True], ids=["relu-in-conv", "relu-layer"])
def test_batchnorm_after_a_relu_joins_the_convolution_group(relu_layer):
    # Conv → ReLU → BN: the BN commutes with the ReLU's diagonal derivative and joins the
    # convolution's group; the chain is then one pair, with both ReLUs in its link (D₂D₁ is
    # again a 0/1 pattern). Its exact value is the enumeration over that pair.
    model = _scaled_model(scaling_first=False, relu_layer=relu_layer)
    rep = tfl.LipschitzEstimator(model, verbose=0).seqlip(mode="exact", certified=True,
                                                          max_exact_width=18)
    [pair] = rep.settings["pairs"]
    assert pair["pair"].startswith("conv+bn -> flatten")
    conv, bn, head = model.get_layer("conv"), model.get_layer("bn"), model.get_layer("head")
    scale = (bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)).astype(float)
    m1 = np.tile(scale, 6)[:, None] * affine_map(conv, (2, 3, 2))
    m2 = head.kernel.numpy().T.astype(np.float64)
    patterns = np.array(list(itertools.product([0.0, 1.0], repeat=18)))
    truth = 0.0
    for chunk in np.array_split(patterns, 16):
        prods = np.einsum("on,sn,ni->soi", m2, chunk, m1)
        gram = prods @ prods.transpose(0, 2, 1)
        truth = max(truth, float(np.sqrt(np.linalg.eigvalsh(gram)[:, -1].max())))
    assert rep.certified and rep.upper == pytest.approx(truth, rel=1e-5)
    assert rep.upper >= truth * (1 - 1e-6)


def test_truncated_diagonal_spectrum_keeps_the_remainder(monkeypatch):
    # dense_limit=0: the BN group (2 scales, each repeated over 6 positions) keeps its top 4
    # triplets and bounds the rest by the fifth scale; the bound stays above the reference.
    from tf_lipschitz import seqlip

    model = _scaled_model()
    est = tfl.LipschitzEstimator(model, verbose=0)
    reference = est.seqlip(mode="certified")
    kept = []
    diagonal = seqlip.diagonal_spectrum
    monkeypatch.setattr(seqlip, "diagonal_spectrum",
                        lambda d, *a: kept.append(a) or diagonal(d, *a))
    truncated = est.seqlip(mode="greedy", top_k=4, dense_limit=0, subspace_tol=1e-8)
    assert kept == [(4,)]
    assert truncated.upper >= reference.upper * (1 - 1e-6)


@pytest.mark.parametrize("side", ["before", "after", "both"])
def test_diagonal_pair_equals_the_vertex_enumeration(side):
    # The closed form on either side of the activations (and on both), against all 2^n
    # vertex patterns through the full SVDs; the split exponents of a middle pair included.
    # (Built-in scalings after an activation join the group before it, so models reach only
    # the "before" side; the closed form does not depend on that.)
    from tf_lipschitz.seqlip import Spectrum, _diagonal_pair, diagonal_spectrum

    rng = np.random.default_rng(3)
    n, lo, hi = 6, 0.1, 1.0
    scales = rng.uniform(-2.0, 2.0, n)

    def dense(m):
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return Spectrum(s, u, vt.T, 0.0, True, "svd")

    left_m = np.diag(scales) if side in ("before", "both") else rng.standard_normal((n, 4))
    right_m = np.diag(scales[::-1]) if side in ("after", "both") else rng.standard_normal((3, n))
    left = diagonal_spectrum(scales) if side in ("before", "both") else dense(left_m)
    right = diagonal_spectrum(scales[::-1]) if side in ("after", "both") else dense(right_m)
    for e_left, e_right in ((1.0, 0.0), (0.5, 0.5)):
        def t_left(x, e=e_left):
            return np.power(x, e)

        def t_right(x, e=e_right):
            return np.power(x, 1.0 - e)
        b = left.u * t_left(left.s)
        a = (right.v * t_right(right.s)).T
        truth = max(np.linalg.norm(a @ (np.array(d)[:, None] * b), 2)
                    for d in itertools.product([lo, hi], repeat=n))
        got = _diagonal_pair(left, right, (lo, hi), t_left, t_right)
        assert got.certified and got.value == pytest.approx(truth, rel=1e-12)


def test_diagonal_probe_refuses_a_rule_that_is_not_diagonal():
    from tf_lipschitz.operators import LinearOperator
    from tf_lipschitz.seqlip import _diagonal_of

    scale = np.array([1.0, -2.0, 3.0], np.float32)
    assert np.array_equal(_diagonal_of(LinearOperator(lambda x: x * scale, (3,))), scale)
    assert _diagonal_of(LinearOperator(lambda x: x[:, ::-1] * scale, (3,))) is None
    # a weak coupling is not diagonal either (a loose check accepted it, then certified 3.0
    # for a map of norm 3.0000239)
    two = np.array([3.0, 3.0], np.float32)
    coupled = LinearOperator(lambda x: x * two + 1.2e-5 * (x - x[:, ::-1]), (2,))
    assert _diagonal_of(coupled) is None


def test_dense_route_takes_thin_operators_and_leaves_square_ones_to_the_subspace_iteration():
    from tf_lipschitz.seqlip import DENSE_LIMIT, dense_route

    # 28×28×1 → 26×26×16 convolution: 8.5e6 entries (above the former 2**23 limit), a 0.9 s
    # exact SVD instead of a subspace iteration that took 3.3 s without settling
    assert dense_route(10816, 784, DENSE_LIMIT)
    assert not dense_route(4096, 4096, DENSE_LIMIT)  # 1.7e7 entries, but ~7e10 flops
    assert not dense_route(10816, 784, 2 ** 23)  # an explicit limit is still a limit
    assert not dense_route(3, 4, 0) and dense_route(3, 4, 12)


def test_spectrum_route_takes_the_gram_route_when_one_side_is_small(monkeypatch):
    from tf_lipschitz import seqlip

    monkeypatch.setattr(seqlip, "GRAM_SIDE", 40)
    assert seqlip.spectrum_route(64, 48, 3072) == "svd"
    assert seqlip.spectrum_route(64, 48, 3071) == "subspace"  # both sides above GRAM_SIDE
    assert seqlip.spectrum_route(1000, 40, 0) == "gram"
    assert seqlip.spectrum_route(40, 1000, 0) == "gram"


def test_warns_when_the_truncation_remainder_leaves_seqlip_at_autolip():
    # top_k=2 of 40 exact triplets: the bounded remainder lifts every pair factor to AutoLip's.
    rng = np.random.default_rng(2)
    model = keras.Sequential([keras.Input((40,)), L.Dense(40, activation="relu"),
                              L.Dense(40, activation="relu"), L.Dense(3)])
    for w in model.weights:
        w.assign(rng.standard_normal(w.shape).astype("float32") / 6)
    est = tfl.LipschitzEstimator(model, verbose=0)
    with pytest.warns(UserWarning, match=r"gained nothing over AutoLip.*raise top_k"):
        short = est.seqlip(mode="greedy", top_k=2)
    assert any(p["capped_by_remainder"] for p in short.settings["pairs"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all 40 triplets: nothing to add back
        full = est.seqlip(mode="greedy", top_k=40)
    assert full.upper < short.upper
    assert not any(p["capped_by_remainder"] for p in full.settings["pairs"])


def test_table_says_when_a_pair_gained_nothing_over_autolip():
    # A user trial read "certified seqlip-greedy" on a pair whose value was AutoLip's factor
    # (the truncation's remainder, added back, lifted it there), and "certified" on a chain
    # start with no certificate shown.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 1)),
                              L.Conv2D(4, 3, strides=2, activation="relu", padding="same"),
                              L.Conv2D(6, 3, strides=2, activation="relu")])
    norms = [np.linalg.norm(affine_map(model.layers[0], (12, 12, 1)), 2),
             np.linalg.norm(affine_map(model.layers[1], (6, 6, 4)), 2)]
    est = tfl.LipschitzEstimator(model, verbose=0)
    with pytest.warns(UserWarning, match="gained nothing over AutoLip"):
        capped = est.seqlip(top_k=2)
    start, pair = [r for r in capped.layers if r.kind == "linear"]
    assert start.method == "seqlip-start (svd)"
    assert start.certificate == pytest.approx(norms[0], rel=1e-9)
    assert pair.method == "seqlip-greedy (= AutoLip factor)"
    assert capped.upper == pytest.approx(norms[0] * norms[1], rel=1e-6)
    # with the whole spectrum the greedy search gains, and keeps the plain label
    full = est.seqlip(top_k=200)
    assert [r.method for r in full.layers if r.kind == "linear"][1] == "seqlip-greedy"
    assert full.upper < capped.upper * (1 - 1e-2)


@pytest.mark.parametrize("strides, filters", [(1, 5), (2, 2)], ids=["inputs", "outputs"])
def test_gram_route_spectrum_against_the_dense_svd(strides, filters):
    """Beyond the dense route, an operator with a small side is decomposed through its Gram
    matrix on that side (here the 6×6×3 inputs, or the 3×3×2 outputs of a stride-2 conv):
    the top singular triplets and the remainder of a dense SVD."""
    import tensorflow as tf

    from tf_lipschitz import seqlip
    from tf_lipschitz.operators import LinearOperator

    rng = np.random.default_rng(3)
    kernel = tf.constant(rng.standard_normal((3, 3, 3, filters)).astype("float32"))
    op = LinearOperator(lambda x: tf.nn.conv2d(x, kernel, strides, "SAME"), (6, 6, 3))
    matrix = op.to_dense().astype(np.float64)
    exact = np.linalg.svd(matrix, compute_uv=False)
    spec = seqlip.operator_spectrum(op, matrix.shape[0], top_k=4, dense_limit=0)
    assert spec.method == "gram" and not spec.exact
    np.testing.assert_allclose(spec.s, exact[:4], rtol=1e-5)
    assert spec.rest == pytest.approx(exact[4], rel=1e-5)
    np.testing.assert_allclose(matrix @ spec.v, spec.u * spec.s, atol=1e-5 * exact[0])
    np.testing.assert_allclose(spec.u.T @ spec.u, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(spec.v.T @ spec.v, np.eye(4), atol=1e-5)


# ------------------------------------------------- large operators: large_operators="autolip"


def _conv_stack():
    """Conv(2→3) → Conv(3→4) → Conv(4→1) → Dense(3) on 4×4 images, ReLU between (a leaky one,
    as a layer, after the middle one): operators of 32→48, 48→64 (the middle one, 3072
    entries), 64→16 and 16→3 entries."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((4, 4, 2)), L.Conv2D(3, 3, padding="same", activation="relu", name="first"),
        L.Conv2D(4, 3, padding="same", name="mid"), L.LeakyReLU(negative_slope=0.2),
        L.Conv2D(1, 3, padding="same", activation="relu"), L.Flatten(), L.Dense(3)])


@pytest.fixture
def large_middle(monkeypatch):
    """The conv stack with its middle convolution 'large': above dense_limit=3071 entries and
    both sides (48, 64) above GRAM_SIDE=40, so only the block subspace iteration decomposes
    it; the other operators take the dense SVD."""
    from tf_lipschitz import seqlip

    monkeypatch.setattr(seqlip, "GRAM_SIDE", 40)
    model = _conv_stack()
    return model, tfl.LipschitzEstimator(model, verbose=0), {"dense_limit": 3071}


def _no_subspace_iteration(monkeypatch):
    from tf_lipschitz import seqlip

    def refuse(*args, **kwargs):
        raise AssertionError("top_singular_triplets called")

    monkeypatch.setattr(seqlip, "top_singular_triplets", refuse)


def test_large_operator_keeps_its_autolip_factor(large_middle, monkeypatch):
    model, est, limits = large_middle
    shapes = [(4, 4, 2), (4, 4, 3)]
    w1, w2 = (affine_map(model.layers[k], shapes[k]) for k in range(2))
    w3 = affine_map(model.layers[3], (4, 4, 4))
    w4 = affine_map(model.layers[4:], (4, 4, 1))
    subspace = est.seqlip(large_operators="subspace", **limits)  # iterates on 'mid'
    auto = est.autolip().upper
    _no_subspace_iteration(monkeypatch)
    with pytest.warns(UserWarning, match=r"AutoLip factor of 1 operator.*'mid' \(48 → 64 "
                                         r"entries\).*large_operators='subspace'.*"
                                         r"subspace_max_iter=300"):
        rep = est.seqlip(large_operators="autolip", **limits)
    # The chain is cut at 'mid': the first convolution is alone (its norm), 'mid' gives its
    # norm, the leaky ReLU its slope 1, and conv2d_2 → dense stays a SeqLip pair (16 ReLU
    # activations, exact).
    norm = [np.linalg.norm(w, 2) for w in (w1, w2)]
    assert rep.upper == pytest.approx(norm[0] * norm[1] * brute_pattern_max(w4, w3), rel=1e-5)
    assert [p["width"] for p in rep.settings["pairs"]] == [16]
    assert rep.settings["large_operators"] == "autolip"
    assert rep.settings["autolip_operators"] == [{
        "name": "mid", "input_shape": [4, 4, 3], "output_shape": [4, 4, 4], "input_size": 48,
        "output_size": 64}]
    rows = {r.name: r.method for r in rep.layers if r.kind == "linear"}
    assert rows["mid"].endswith("(AutoLip factor: large)")
    assert "large" not in rows["first"]  # alone, but not large
    assert "AutoLip factor" in rep.to_json()
    # here, between the paper's SeqLip and AutoLip (not a theorem: the cut is another split)
    assert subspace.upper <= rep.upper <= auto * (1 + 1e-6)
    assert subspace.settings["autolip_operators"] == []
    # certified=True: the cut-out operator takes its certificate, as AutoLip would
    with pytest.warns(UserWarning, match="'mid'"):
        cert = est.seqlip(large_operators="autolip", certified=True, **limits)
    assert cert.certified and cert.upper >= rep.upper * (1 - 1e-6)
    assert cert.upper <= est.autolip(certified=True).upper * (1 + 1e-9)
    rng = np.random.default_rng(0)
    sampled = max(_jacobian_norm(model, x) for x in rng.standard_normal((8, 4, 4, 2)))
    assert sampled <= rep.upper


def _jacobian_norm(model, x) -> float:
    import tensorflow as tf

    x = tf.constant(x[None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    jac = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1).astype(np.float64)
    return float(np.linalg.svd(jac, compute_uv=False)[0])


def test_large_operator_cut_against_brute_force(monkeypatch):
    # Dense 6→5→7→4→2, ReLU between: the 5→7 map (35 entries) is 'large' with dense_limit=34
    # and GRAM_SIDE=4. The cut bound stays above the largest product over all activation
    # patterns of the whole chain (itself at least the true constant) and below AutoLip.
    from tf_lipschitz import seqlip

    monkeypatch.setattr(seqlip, "GRAM_SIDE", 4)
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, "relu"),
                              L.Dense(7, "relu", name="wide"), L.Dense(4, "relu"), L.Dense(2)])
    est = tfl.LipschitzEstimator(model, verbose=0)
    mats = dense_matrices(model)
    _no_subspace_iteration(monkeypatch)
    with pytest.warns(UserWarning, match="'wide' "):
        rep = est.seqlip(mode="exact", dense_limit=34, large_operators="autolip")
    assert rep.settings["autolip_operators"][0]["name"] == "wide"
    assert rep.upper >= brute_chain_max(mats) * (1 - 1e-6)
    assert rep.upper <= est.autolip().upper * (1 + 1e-6)
    norm = [np.linalg.norm(m, 2) for m in mats]
    assert rep.upper == pytest.approx(norm[0] * norm[1] * brute_pattern_max(mats[3], mats[2]),
                                      rel=1e-5)


def test_large_operator_at_a_chain_end_equals_a_seqlip_without_gain(monkeypatch):
    # Conv(3→4) on 4×4 (48→64, large) → ReLU → Dense(2): cutting there leaves no pair, so
    # the bound is AutoLip's; the paper's SeqLip with top_k=2 of 48 triplets gains nothing
    # either (the remainder added back lifts the pair to its AutoLip factor): the same bound.
    from tf_lipschitz import seqlip

    monkeypatch.setattr(seqlip, "GRAM_SIDE", 40)
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((4, 4, 3)),
                              L.Conv2D(4, 3, padding="same", activation="relu", name="big"),
                              L.Flatten(), L.Dense(2)])
    est = tfl.LipschitzEstimator(model, verbose=0)
    with pytest.warns(UserWarning, match="gained nothing over AutoLip"):
        paper = est.seqlip(top_k=2, dense_limit=3071, large_operators="subspace")
    _no_subspace_iteration(monkeypatch)
    with pytest.warns(UserWarning, match="'big'"):
        cut = est.seqlip(top_k=2, dense_limit=3071, large_operators="autolip")
    assert cut.settings["pairs"] == []
    assert cut.upper == pytest.approx(est.autolip().upper, rel=1e-6)
    assert cut.upper == pytest.approx(paper.upper, rel=1e-5)


def test_large_operators_argument_is_checked():
    from tf_lipschitz.errors import InvalidArgumentError

    est = tfl.LipschitzEstimator(mlp((4, 5, 2)), verbose=0)
    for call in (est.seqlip, est.estimate):
        with pytest.raises(InvalidArgumentError,
                           match="large_operators must be one of 'subspace', 'autolip'; "
                                 "received large_operators='dense'"):
            call(large_operators="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing large: no warning, nothing cut
        rep = est.seqlip(large_operators="autolip")
    assert rep.settings["autolip_operators"] == [] and len(rep.settings["pairs"]) == 1
