"""Lower bounds and extreme-value estimates (tf_lipschitz.lower) against brute force.

Invariants: lower <= true <= upper (SeqLip exact / certified AutoLip), the lower bound is a real
Jacobian norm at its point (dense Jacobian), and the default search beats plain random sampling
of Jacobian norms at a comparable budget (a user trial found the previous ascent 6x below it).
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.errors import LipschitzError
from tf_lipschitz.lower import (LowerBoundError, NonFiniteLowerBoundError, extreme_value_estimate,
                                jacobian_norms, lower_bound)

L = keras.layers
POWER_ITERS = 5  # lower_bound's default: one screened random point costs 2 * 5 + 1 products


def _trial_mlp():
    """The user trial's 3 -> 8 -> BN -> 6 -> 2 ReLU MLP (default lower bound was 0.488)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), L.Dense(8, activation="relu"),
                              L.BatchNormalization(), L.Dense(6, activation="relu"), L.Dense(2)])
    model.layers[1].set_weights([
        np.random.uniform(-2, 2, 8).astype("float32"), np.random.randn(8).astype("float32"),
        np.random.randn(8).astype("float32"), np.random.uniform(0.3, 2, 8).astype("float32")])
    return model


def _deep_mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu"),
                              L.Dense(16, activation="relu"), L.Dense(12, activation="relu"),
                              L.Dense(3)])
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.bias.assign(0.5 * rng.standard_normal(layer.bias.shape).astype("float32"))
    return model


def _small_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((10, 10, 2)), L.Conv2D(4, 3, strides=2, activation="relu"),
                             L.Conv2D(4, 3, activation="elu"), L.Flatten(), L.Dense(3)])


def _jacobians(model, x):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
    return tape.batch_jacobian(y, x).numpy().reshape(len(x), y.shape[-1], -1).astype(np.float64)


def _random_sampling_max(model, n, scales=(1.0, 3.0)):
    """Largest exact Jacobian norm over n Gaussian points at each scale (brute force)."""
    rng = np.random.default_rng(123)
    shape = tuple(model.input_shape[1:])
    best = 0.0
    for scale in scales:
        x = (scale * rng.standard_normal((n, *shape))).astype("float32")
        best = max(best, float(np.linalg.svd(_jacobians(model, x), compute_uv=False)[:, 0].max()))
    return best


def _upper(model):
    est = tfl.LipschitzEstimator(model, verbose=0)
    upper = est.autolip(certified=True).upper
    if all(isinstance(layer, (L.Dense, L.BatchNormalization)) for layer in model.layers):
        upper = min(upper, est.seqlip(mode="exact").upper)
    return upper


@pytest.mark.parametrize("build", [_trial_mlp, _deep_mlp, _small_cnn],
                         ids=["trial-mlp", "deep-relu-mlp", "small-cnn"])
def test_default_lower_bound_beats_random_sampling_and_stays_below_upper(build):
    model = build()
    shape = tuple(model.input_shape[1:])
    lb = lower_bound(model, shape)
    # random sampling with as many points per scale as the search's budget buys at the cost of
    # a screened point (two scales: twice the budget)
    n = lb.evaluations // (2 * POWER_ITERS + 1)
    sampled = _random_sampling_max(model, n)
    upper = _upper(model)
    assert sampled * (1 - 1e-4) <= lb.value <= upper * (1 + 1e-5)
    # the value is a real Jacobian-vector norm at lb.x (dense Jacobian), not an estimate
    jac = _jacobians(model, lb.x[None])[0]
    assert np.linalg.norm(jac @ lb.direction.ravel()) == pytest.approx(lb.value, rel=1e-4)
    assert lb.value <= np.linalg.svd(jac, compute_uv=False)[0] * (1 + 1e-4)
    assert lb.secant == pytest.approx(lb.value, rel=2e-2)


def test_trial_mlp_reaches_the_sampled_maximum():
    # the largest Jacobian norm over 4,000 N(0, 3²) points is 2.9104 (exact SeqLip upper 3.18);
    # the former default returned 0.488, and 256 starts with 200 ascent steps 1.934
    lb = lower_bound(_trial_mlp(), (3,))
    assert lb.value == pytest.approx(2.91038, rel=1e-4)


def test_search_only_improves_on_screening():
    model = _deep_mlp()
    screened = lower_bound(model, (8,), steps=0).value
    searched = lower_bound(model, (8,)).value
    assert searched >= screened * (1 - 1e-5)


def test_smooth_network_without_gradient_proposals_is_still_a_lower_bound():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((5,)), L.Dense(12, activation="tanh"),
                              L.Dense(12, activation="tanh"), L.Dense(2)])
    upper = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True).upper
    with_grad = lower_bound(model, (5,), steps=10, n_random=32)
    without = lower_bound(model, (5,), steps=10, n_random=32, learning_rate=0.0)
    assert 0 < without.value <= upper and 0 < with_grad.value <= upper
    assert without.evaluations < with_grad.evaluations


def test_lower_bound_is_deterministic_and_uses_data(rng):
    model = _deep_mlp()
    x = rng.standard_normal((10, 8)).astype("float32")
    a = lower_bound(model, (8,), x, n_random=0, steps=5)
    b = lower_bound(model, (8,), x, n_random=0, steps=5)
    assert a.starts == 10
    assert a.value == b.value and np.array_equal(a.x, b.x)


def test_small_batch_size_splits_the_search():
    model = _trial_mlp()
    lb = lower_bound(model, (3,), n_random=40, population=6, steps=5, batch_size=16)
    jac = _jacobians(model, lb.x[None])[0]
    assert np.linalg.norm(jac @ lb.direction.ravel()) == pytest.approx(lb.value, rel=1e-4)


@pytest.mark.parametrize("kwargs, name", [({"population": 0}, "population"),
                                          ({"proposals": 0}, "proposals"),
                                          ({"steps": -1}, "steps"),
                                          ({"noise": 0.0}, "noise")])
def test_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(LowerBoundError, match=name) as info:
        lower_bound(_trial_mlp(), (3,), **kwargs)
    assert isinstance(info.value, LipschitzError) and isinstance(info.value, ValueError)


def test_no_starting_points_is_an_error():
    with pytest.raises(LowerBoundError, match="n_random"):
        lower_bound(_trial_mlp(), (3,), n_random=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_extreme_value_estimate_is_never_below_its_largest_sample(seed):
    # seed 1: the fitted right end of the support (1.1614) lies below the largest sample (1.1656)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), L.Dense(8, activation="relu"), L.Dense(2)])
    ev = extreme_value_estimate(model, (4,), batches=12, batch_size=8, fit_steps=300, seed=seed)
    fitted = ev.loc - ev.scale / ev.concentration if ev.concentration < 0 else ev.loc
    assert ev.value >= ev.sample_max
    assert ev.value == pytest.approx(max(fitted, ev.sample_max), rel=1e-12)
    assert ev.sample_max <= tfl.LipschitzEstimator(model, verbose=0).autolip().upper


@pytest.mark.parametrize("scale", [3e-10, 1e-15, 1e15])
def test_lower_bound_of_a_tiny_or_huge_linear_map(scale):
    # The sum of squares of a 1e-10-sized direction underflows float32: the search used to
    # divide by the 1e-30 floor, score a direction of norm 1e11, and report 27 for a map of
    # norm 3e-10.
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(3, use_bias=False, kernel_initializer="identity")])
    model.layers[0].kernel.assign(np.eye(3, dtype="float32") * np.float32(scale))
    true = float(np.float32(scale))
    lb = lower_bound(model, (3,), x=np.random.default_rng(0).standard_normal((4, 3)).astype("float32"))
    assert true * (1 - 1e-4) <= lb.value <= true * (1 + 1e-5)
    assert np.linalg.norm(lb.direction) == pytest.approx(1.0, rel=1e-5)


def test_lower_bound_stays_below_certified_upper_on_smooth_nets():
    # sigmoid/softplus nets whose Jacobians are small: the 1e-30 floor made the lower bound up
    # to 88x the certified upper bound.
    for act in ("sigmoid", "softplus"):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)),
                                  keras.layers.Dense(4, activation=act, use_bias=False),
                                  keras.layers.Dense(2)])
        est = tfl.LipschitzEstimator(model, verbose=0)
        upper = est.autolip(certified=True).upper
        lb = est.lower_bound(x=np.random.default_rng(1).standard_normal((8, 3)).astype("float32"))
        assert 0 < lb.value <= upper


def _bias_free(act):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), L.Dense(6, activation=act, use_bias=False),
                             L.Dense(5, activation=act, use_bias=False),
                             L.Dense(2, use_bias=False)])


@pytest.mark.parametrize("act", ["celu", "relu", "hard_sigmoid", "relu6", "leaky_relu", "elu",
                                 "selu"])
def test_lower_bound_at_a_kink_stays_below_the_certified_upper_bound(act):
    # Every pre-activation of a bias-free net is exactly 0 at x = 0. There autodiff passes
    # gradient 1 through both branches of celu (derivative 2): the lower bound was 4.48 against
    # a certified upper bound of 3.31.
    model = _bias_free(act)
    upper = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True).upper
    zeros = np.zeros((4, 4), "float32")
    for kwargs in ({"n_random": 0, "steps": 0}, {}):
        lb = lower_bound(model, (4,), zeros, **kwargs)
        assert 0 <= lb.value <= upper * (1 + 1e-5)


def test_celu_at_zero_is_measured_by_its_slope_not_its_autodiff_derivative():
    # celu is continuously differentiable with slope 1 at 0, so the Jacobian of the bias-free
    # net at 0 is W3 W2 W1; autodiff returned 4 W3 W2 W1 (4.48).
    model = _bias_free("celu")
    w1, w2, w3 = (np.asarray(layer.kernel.numpy(), "float64") for layer in model.layers)
    exact = np.linalg.svd(w1 @ w2 @ w3, compute_uv=False)[0]
    zeros = np.zeros((4, 4), "float32")
    lb = lower_bound(model, (4,), zeros, n_random=0, steps=0)
    assert lb.value == pytest.approx(exact, rel=2e-3)
    assert jacobian_norms(model, zeros) == pytest.approx(np.full(4, exact), rel=2e-3)


def test_a_function_that_is_identically_zero_has_lower_bound_zero():
    # x - relu(x) + relu(-x) = 0 for every x (exactly, in floating point too), so L = 0; at
    # x = 0 autodiff takes relu'(0) = 0 in both branches and returned ‖J‖ = 1.
    def negated():
        return L.Dense(3, use_bias=False,
                       kernel_initializer=keras.initializers.Constant(-np.eye(3)))

    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.Add()([inputs, negated()(L.ReLU()(inputs)),
                                         L.ReLU()(negated()(inputs))]))
    zeros = np.zeros((2, 3), "float32")
    assert np.all(model(np.random.default_rng(0).standard_normal((64, 3))).numpy() == 0)
    assert lower_bound(model, (3,), zeros, n_random=0, steps=0).value == 0.0
    assert lower_bound(model, (3,), zeros).value == 0.0
    assert np.all(jacobian_norms(model, zeros) == 0.0)


def test_no_finite_norm_is_a_named_lipschitz_error():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, use_bias=False)], name="nan_net")
    model.layers[0].kernel.assign(np.full((3, 2), np.nan, "float32"))
    with pytest.raises(NonFiniteLowerBoundError, match="nan_net") as info:
        lower_bound(model, (3,), n_random=8, steps=1)
    assert isinstance(info.value, LipschitzError) and isinstance(info.value, FloatingPointError)


def _two_input_model(activation=None, seed=3):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((3,), name="a"), keras.Input((2, 2), name="b")
    h = L.Concatenate()([L.Dense(4)(a), L.Flatten()(b)])
    out = L.Dense(2)(L.Dense(5, activation=activation)(h))
    return keras.Model([a, b], [out, L.Dense(1)(a)], name="two_inputs")


def _joint_jacobian(model, xa, xb) -> np.ndarray:
    """Dense Jacobian of all outputs with respect to both inputs at once (one example)."""
    flat = tf.constant(np.concatenate([xa.ravel(), xb.ravel()])[None], tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(flat)
        outs = model([tf.cast(flat[:, :3], "float32"),
                      tf.reshape(tf.cast(flat[:, 3:], "float32"), (1, 2, 2))], training=False)
        out = tf.concat([tf.reshape(o, (1, -1)) for o in outs], axis=1)
    return tape.jacobian(out, flat).numpy().reshape(out.shape[1], 7)


def test_multi_input_lower_bound_is_the_joint_jacobian_norm():
    # A linear two-input, two-output model: the constant with respect to both inputs at once
    # is the norm of the joint Jacobian, which the lower bound attains, under the upper bound.
    model = _two_input_model()
    exact = np.linalg.norm(_joint_jacobian(model, np.zeros(3), np.zeros((2, 2))), 2)
    est = tfl.LipschitzEstimator(model, verbose=0)
    lb = est.lower_bound(n_random=16, steps=2)
    assert lb.value == pytest.approx(exact, rel=1e-4)
    assert lb.value <= est.autolip(certified=True).upper
    # The point and the direction come back per input.
    assert [p.shape for p in lb.x] == [(3,), (2, 2)]
    assert [p.shape for p in lb.direction] == [(3,), (2, 2)]
    assert np.sqrt(sum(np.sum(d ** 2) for d in lb.direction)) == pytest.approx(1.0, rel=1e-5)


def test_multi_input_norms_and_search_with_data():
    model = _two_input_model("tanh")
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((6, 3)).astype("float32")
    xb = rng.standard_normal((6, 2, 2)).astype("float32")
    exact = [np.linalg.norm(_joint_jacobian(model, xa[i], xb[i]), 2) for i in range(6)]
    for x in ([xa, xb], {"b": xb, "a": xa}):
        norms = jacobian_norms(model, x, iters=60)  # power iteration: from below
        assert np.all(norms <= np.multiply(exact, 1 + 1e-5))
        assert np.all(norms >= np.multiply(exact, 1 - 1e-3))
    est = tfl.LipschitzEstimator(model, verbose=0)
    lb = est.lower_bound([xa, xb], n_random=16, steps=3)
    upper = est.autolip(certified=True).upper
    assert max(exact) * (1 - 1e-4) <= lb.value <= upper
    # the reported value is a Jacobian norm at the reported point
    at = np.linalg.norm(_joint_jacobian(model, lb.x[0], lb.x[1]), 2)
    assert lb.value <= at * (1 + 1e-4)
    report = est.estimate([xa, xb], lower_bound_options={"n_random": 8, "steps": 1})
    assert 0 < report.lower <= report.upper
    ev = est.extreme_value_estimate([xa, xb], batches=4, batch_size=4, fit_steps=20)
    assert ev.sample_max <= upper


def test_multi_input_mismatches_are_named_errors():
    model = _two_input_model()
    xa, xb = np.zeros((2, 3), "float32"), np.zeros((2, 2, 2), "float32")
    cases = [
        (lambda: lower_bound(model, (3,)), "list of per-example shapes, one per input"),
        (lambda: lower_bound(model, [(3,), (2, 2)], xa), "pass x as a list with one batch"),
        (lambda: lower_bound(model, [(3,), (2, 2)], [xa]), "2 inputs"),
        (lambda: lower_bound(model, [(3,), (2, 2)], [xa, xb[:, :1]]), "Input 'b' expects"),
        (lambda: lower_bound(model, [(3,), (2, 2)], [xa, xb[:1]]), "batches differ"),
        (lambda: jacobian_norms(model, {"a": xa, "c": xb}), "unknown \\['c'\\]"),
    ]
    for call, message in cases:
        with pytest.raises(LowerBoundError, match=message) as info:
            call()
        assert isinstance(info.value, LipschitzError)
    a, i = keras.Input((3,), name="x"), keras.Input((2,), dtype="int32", name="ids")
    mixed = keras.Model([a, i], L.Concatenate()([a, L.Embedding(4, 3)(i)[:, 0]]), name="mixed")
    with pytest.raises(LowerBoundError, match="mixed.*int32.*one float dtype"):
        lower_bound(mixed, [(3,), (2,)])



def test_model_built_on_a_dict_of_inputs_is_called_with_its_dict():
    # keras.Model({"b": b, "a": a}, ...) takes its inputs in model.inputs order (a, b), but
    # refuses a list when its keys are not sorted: lower bounds raised ValueError from Keras.
    # Ground truth: the joint Jacobian of the linear map (b, a) -> (10 b, a), norm 10, and the
    # dense Jacobian at each example of the tanh variant.
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    linear = keras.Model({"b": b, "a": a}, L.Concatenate()([10.0 * b, a]), name="dict_net")
    rng = np.random.default_rng(1)
    xa = rng.standard_normal((4, 2)).astype("float32")
    xb = rng.standard_normal((4, 3)).astype("float32")
    est = tfl.LipschitzEstimator(linear, verbose=0)
    lb = est.lower_bound({"a": xa, "b": xb}, n_random=4, steps=1)
    assert lb.value == pytest.approx(10.0, rel=1e-5)
    assert [p.shape for p in lb.x] == [(2,), (3,)]  # model.inputs order: a, b
    assert np.linalg.norm(lb.direction[1]) == pytest.approx(1.0, rel=1e-4)  # all along b
    keras.utils.set_random_seed(4)
    h = L.Dense(3, activation="tanh")(L.Concatenate()([b, a]))
    model = keras.Model({"b": b, "a": a}, h, name="dict_tanh")
    exact = []
    for i in range(4):
        flat = tf.constant(np.concatenate([xa[i], xb[i]])[None], tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(flat)
            out = model({"a": tf.cast(flat[:, :2], "float32"),
                         "b": tf.cast(flat[:, 2:], "float32")}, training=False)
        exact.append(np.linalg.norm(tape.jacobian(out, flat).numpy().reshape(3, 5), 2))
    for x in ({"b": xb, "a": xa}, [xa, xb]):
        norms = jacobian_norms(model, x, iters=60)
        np.testing.assert_allclose(norms, exact, rtol=1e-3)


@pytest.mark.parametrize("norm", [1e3, 1e4])
def test_half_precision_lower_bound_is_measured_in_float32(norm):
    # Under mixed_float16 the norms were summed and the products J^T J v taken in float16: the
    # power step overflowed (65504) from a norm of 256, and lower_bound raised for 1e3.
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((6,)), L.Dense(5, use_bias=False)])
        kernel = np.random.default_rng(0).standard_normal((6, 5))
        model.layers[0].kernel.assign((kernel * norm / np.linalg.norm(kernel, 2)).astype("float32"))
        # the model computes with its kernel rounded to float16
        exact = np.linalg.norm(model.layers[0].kernel.numpy().astype("float16").astype("float64"), 2)
        x = np.random.default_rng(1).standard_normal((4, 6)).astype("float32")
        lb = lower_bound(model, (6,), x)
        assert lb.value == pytest.approx(exact, rel=2.0 ** -10)
        assert lb.secant == pytest.approx(exact, rel=4.0 * 2.0 ** -10)
        assert jacobian_norms(model, x) == pytest.approx(np.full(4, exact), rel=2.0 ** -10)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _pool_model(layer, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


# A max pool's Jacobian takes one entry per output, so J^T J is diagonal with the number of
# windows whose maximum each input is: ‖J‖ = √(prod pool_size) where an input is the maximum of
# every window that holds it. Inside a tf.function TensorFlow's CPU JVP of a pool that keeps its
# shape (stride 1, "same") came out 0, and so did the lower bound.
@pytest.mark.parametrize("layer, shape", [
    (L.MaxPooling1D(3, strides=1, padding="same"), (6, 1)),
    (L.MaxPooling2D(3, strides=1, padding="same"), (5, 5, 1)),
    (L.MaxPooling3D(3, strides=1, padding="same"), (4, 4, 4, 1)),
], ids=["1d", "2d", "3d"])
def test_overlapping_max_pool_lower_bound_reaches_its_constant(layer, shape):
    model = _pool_model(layer, shape)
    exact = np.sqrt(3.0 ** (len(shape) - 1))
    upper = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True).upper
    lb = lower_bound(model, shape, n_random=32, population=4, steps=3)
    assert lb.value == pytest.approx(exact, rel=1e-5)
    assert 0 < lb.value <= upper * (1 + 1e-5)


def test_overlapping_max_pool_jacobian_norm_at_a_peak():
    # x = (0, 0, 5, 0, 0, 0): the peak is the maximum of 3 windows, J^T J = diag(1, 0, 3, 1, 1, 0)
    model = _pool_model(L.MaxPooling1D(3, strides=1, padding="same"), (6, 1))
    x = np.zeros((2, 6, 1), "float32")
    x[:, 2] = 5.0
    assert jacobian_norms(model, x) == pytest.approx(np.full(2, np.sqrt(3.0)), rel=1e-6)


def test_overlapping_max_pool_after_a_convolution_is_measured_exactly(rng):
    # the pool's tangent is an intermediate here, so even the first power step came out 0
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="relu"),
                              L.MaxPooling2D(3, strides=1, padding="same"), L.Flatten(),
                              L.Dense(2)])
    x = rng.standard_normal((4, 6, 6, 2)).astype("float32")
    exact = np.linalg.svd(_jacobians(model, x), compute_uv=False)[:, 0]
    assert jacobian_norms(model, x) == pytest.approx(exact, rel=1e-4)
    upper = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True).upper
    lb = lower_bound(model, (6, 6, 2), x, n_random=16, population=4, steps=3)
    assert exact.max() * (1 - 1e-4) <= lb.value <= upper * (1 + 1e-5)
    jac = _jacobians(model, lb.x[None])[0]
    assert np.linalg.norm(jac @ lb.direction.ravel()) == pytest.approx(lb.value, rel=1e-4)


def test_search_calls_are_sized_to_the_model(monkeypatch):
    # ResNet50 at 96x96 took more than 20 GB with the default 512 points per call: calls are
    # now sized from the layers' outputs (8 float32 copies per entry, about 2 GiB per call).
    from tf_lipschitz import lower as lower_module

    model = keras.Sequential([keras.Input((10,)), L.Dense(1000), L.Dense(3000), L.Dense(2)])
    entries = 1000 + 3000 + 2
    assert lower_module._activation_size(model) == entries
    assert lower_module._points_per_call(model, 10 ** 6, tf.float32) == 2 ** 31 // (entries * 32)
    assert lower_module._points_per_call(model, 8, tf.float32) == 8
    monkeypatch.setattr(lower_module, "_MEMORY_BUDGET", entries * 32 * 3)  # 3 points per call
    seen = []
    original = lower_module._chunks
    monkeypatch.setattr(lower_module, "_chunks",
                        lambda n, size: seen.append(size) or original(n, size))
    lower_bound(model, (10,), n_random=8, steps=1, population=4)
    assert seen and max(seen) <= 3


@pytest.mark.parametrize("shape", [(3, 9, 9, 1), (5,), (0, 8, 8, 1)])
def test_x_of_the_wrong_size_is_a_named_error(shape):
    # (3, 9, 9, 1) for an (8, 8, 1) model raised NumPy's "cannot reshape array of size 243".
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(2)])
    with pytest.raises(LowerBoundError, match=r"shape \(n, 8, 8, 1\).*" + re.escape(str(shape))):
        lower_bound(model, (8, 8, 1), np.zeros(shape, "float32"), n_random=4, steps=0)


@pytest.mark.parametrize("layer, n", [
    (L.Flatten, 5), (L.Flatten, 17), (L.GlobalAveragePooling1D, 11),
    (L.GlobalAveragePooling1D, 64), (lambda: L.Dense(7), 17),
])
def test_lower_bound_stays_below_exact_certified_constants(layer, n):
    # Linear layers whose certified AutoLip is exact (to float64 rounding): the lower bound
    # attains their constant, and its float32 rounding no longer puts it above (it measured a
    # Flatten at 1.0000001 and a 64-entry mean 8 units in the last place above 1/8).
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n, 3)), layer()])
    est = tfl.LipschitzEstimator(model, verbose=0)
    upper = est.autolip(certified=True).upper
    lb = est.lower_bound()
    assert upper * (1 - 1e-5) <= lb.value <= upper


@pytest.mark.parametrize("kwargs", [
    dict(interpolation="bilinear"), dict(interpolation="nearest"),
    dict(interpolation="bicubic"), dict(interpolation="lanczos3"),
    dict(interpolation="bilinear", antialias=True),
])
def test_lower_bound_through_image_resampling(kwargs):
    # A review: TensorFlow's forward-mode product of ResizeBilinear is None (read as 0: a lower
    # bound of 0), and the other resize ops have no gradient of their gradient (raw
    # LookupError). Their JVP is now the op on the tangent: the bound reaches the constant.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Resizing(8, 7, **kwargs), L.Flatten(),
                              L.Dense(2)])
    est = tfl.LipschitzEstimator(model, verbose=0)
    upper = est.autolip(certified=True).upper  # a linear model: exact up to 1e-6
    lb = est.lower_bound(n_random=8, steps=3)
    assert upper * (1 - 1e-4) <= lb.value <= upper


def test_lower_bound_names_an_op_without_gradient():
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Resizing(3, 3, interpolation="area")])
    est = tfl.LipschitzEstimator(model, verbose=0)
    assert est.autolip(certified=True).certified  # the upper bound does not need gradients
    with pytest.raises(tfl.LowerBoundUnavailableError,
                       match=r"could not differentiate.*ResizeArea"):
        est.lower_bound(n_random=4, steps=1)
    # estimate() returns its upper bounds, with a warning instead of the lower bound
    with pytest.warns(UserWarning, match=r"no lower bound.*ResizeArea"):
        rep = est.estimate(lower_bound_options={"n_random": 4, "steps": 1})
    assert rep.lower is None and rep.settings["lower_bound"] is None
    assert rep.upper == pytest.approx(est.autolip().upper, rel=1e-4)
