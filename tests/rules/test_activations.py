"""Each activation constant equals the largest |σ'| found numerically on a fine grid."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules import activation_info, resolve_activation

# offset so that no grid point sits exactly on a kink, where autodiff sums one-sided slopes
# (sups approached at ±∞, as for squareplus, are reached on the wide log-spaced tails)
_WIDE = np.logspace(1.3, 5, 2000)
GRID = tf.constant(
    np.concatenate([-_WIDE[::-1], np.linspace(-20.0, 20.0, 400_001) + 1e-7 * np.pi, _WIDE]),
    tf.float64,
)

ELEMENTWISE = [
    "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "sigmoid", "tanh", "hard_sigmoid",
    "hard_silu", "hard_swish", "gelu", "silu", "swish", "mish", "softplus", "softsign",
    "log_sigmoid", "hard_tanh", "soft_shrink", "tanh_shrink", "squareplus", "sparse_plus",
    "sparse_sigmoid", "linear",
]


def _derivative(fn):
    with tf.GradientTape() as tape:
        tape.watch(GRID)
        y = fn(GRID)
    return tape.gradient(y, GRID).numpy()


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_constant_is_max_abs_derivative(name):
    fn = keras.activations.get(name)
    info = resolve_activation(fn)
    d = _derivative(fn)
    # an upper bound, and tight: within the grid's resolution (spacing 1e-4; the sup of selu'
    # is approached at 0⁻ only) of the numerical maximum
    assert info.lipschitz >= np.max(np.abs(d)) - 1e-9
    assert info.lipschitz <= np.max(np.abs(d)) * (1 + 2e-4) + 1e-6
    lo, hi = info.slope_range
    assert lo <= d.min() + 1e-9 and hi >= d.max() - 1e-9


def test_gelu_tanh_form():
    d = _derivative(lambda x: keras.activations.gelu(x, approximate=True))
    info = activation_info("gelu", approximate=True)
    assert np.max(np.abs(d)) <= info.lipschitz <= np.max(np.abs(d)) + 1e-5


@pytest.mark.parametrize("kwargs", [{"negative_slope": 0.3}, {"negative_slope": -2.0}, {"max_value": 6.0}])
def test_relu_parameters(kwargs):
    d = _derivative(lambda x: keras.activations.relu(x, **kwargs))
    assert activation_info("relu", **kwargs).lipschitz == pytest.approx(np.max(np.abs(d)))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.5])
def test_elu_alpha(alpha):
    d = _derivative(lambda x: keras.activations.elu(x, alpha=alpha))
    assert activation_info("elu", alpha=alpha).lipschitz == pytest.approx(np.max(np.abs(d)), rel=2e-4)
    assert activation_info("elu", alpha=alpha).lipschitz >= np.max(np.abs(d))


def _max_jacobian_norm(fn, n, rng, samples=300):
    """Largest Jacobian spectral norm over random points of varied scale (one batched call)."""
    scales = rng.uniform(0.1, 10, (samples, 1))
    x = tf.constant(rng.standard_normal((samples, n)) * scales, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    jac = tape.batch_jacobian(y, x).numpy()
    return float(np.linalg.norm(jac, ord=2, axis=(1, 2)).max())


def test_softmax_half_is_a_bound_and_is_attained(rng):
    for n in (2, 5, 10):
        assert _max_jacobian_norm(keras.activations.softmax, n, rng) <= 0.5 + 1e-12
    # two equal dominant logits attain 1/2
    x = tf.constant([[30.0, 30.0, -30.0]], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = keras.activations.softmax(x)
    jac = tape.batch_jacobian(y, x).numpy()[0]
    assert np.linalg.svd(jac, compute_uv=False)[0] == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("n", [2, 4, 10])
def test_log_softmax_bound(n, rng):
    bound = activation_info("log_softmax", size=n).lipschitz
    assert _max_jacobian_norm(keras.activations.log_softmax, n, rng) <= bound
    # exact: approached where one logit dominates (‖J‖ = √n‖p‖₂, p near a vertex); the
    # previous min(1 + √n, √(2(n − 1))) was 3.74 for n = 8, against √8 = 2.83 (a user trial)
    x = tf.constant([[40.0] + [0.0] * (n - 1)], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = keras.activations.log_softmax(x)
    jac = tape.batch_jacobian(y, x).numpy()[0]
    assert np.linalg.svd(jac, compute_uv=False)[0] == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Dense(4, activation="log_softmax"),
    lambda: keras.layers.Conv1D(4, 2, activation="log_softmax"),
])
def test_log_softmax_fused_in_a_layer_uses_its_last_axis(make, rng):
    layer = make()
    shape = (5,) if isinstance(layer, keras.layers.Dense) else (6, 3)
    model = keras.Sequential([keras.Input(shape), layer])
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip()
    plain = make()
    plain.activation = keras.activations.linear
    split = keras.Sequential([keras.Input(shape), plain, keras.layers.Activation("log_softmax")])
    plain.set_weights(layer.get_weights())
    x = rng.standard_normal((200, *shape)).astype("float32")
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = tf.reshape(model(xt), (200, -1))
    jac = tape.batch_jacobian(y, xt).numpy().reshape(200, y.shape[1], -1)
    sampled = np.linalg.svd(jac, compute_uv=False)[:, 0].max()
    assert sampled <= report.upper
    # same bound as the layer followed by an Activation("log_softmax") layer
    assert report.upper == pytest.approx(
        tfl.LipschitzEstimator(split, verbose=0, tol=1e-8).autolip().upper, rel=1e-6)


def test_sparsemax_gets_1_only_if_keras_computes_the_projection(rng):
    # Keras 3's TensorFlow sparsemax sums the running sums in its threshold: it is not the
    # projection onto the simplex, and not 1-Lipschitz (it was certified 1).
    x = np.array([[0.03, 0.02, 0.01, 0.0]])
    h = np.array([[1e-3, 0.0, 0.0, 0.0]])
    f = keras.activations.sparsemax
    ratio = float(np.linalg.norm(f(tf.constant(x + h)) - f(tf.constant(x))) / 1e-3)
    if ratio > 1.0 + 1e-6:  # this Keras: the rule must refuse
        with pytest.raises(tfl.UnsupportedLayerError, match="sparsemax.*not the Euclidean"):
            resolve_activation(f)
        return
    assert resolve_activation(f).lipschitz == 1.0  # a fixed Keras: the projection's constant
    a, b = rng.standard_normal((2, 500, 6)) * 3
    ratios = (np.linalg.norm(f(tf.constant(a)) - f(tf.constant(b)), axis=1)
              / np.linalg.norm(a - b, axis=1))
    assert ratios.max() <= 1.0 + 1e-9


@pytest.mark.parametrize("name", ["exponential", "hard_shrink", "glu"])
def test_not_lipschitz_activations_raise(name):
    with pytest.raises(NotLipschitzError, match=name):
        resolve_activation(keras.activations.get(name))


def test_relu_threshold_is_not_lipschitz():
    layer = keras.layers.ReLU(threshold=0.5)
    model = keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(NotLipschitzError, match=layer.name):
        tfl.LipschitzEstimator(model, verbose=0)


def test_unknown_activation_names_the_layer_and_the_fix():
    def mystery(x):
        return x * 2

    layer = keras.layers.Dense(2, activation=mystery, name="odd_dense")
    model = keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(UnsupportedLayerError, match="odd_dense.*register_activation") as info:
        tfl.LipschitzEstimator(model, verbose=0)
    assert "register_rule" not in str(info.value)  # a rule for Dense would be the wrong fix
    tfl.register_activation(mystery, 2.0, (2.0, 2.0))
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-10).autolip()
    exact = np.linalg.svd(np.asarray(layer.kernel), compute_uv=False)[0]
    assert report.upper == pytest.approx(2.0 * exact, rel=1e-4)


LAYERS = [
    (keras.layers.ReLU(), lambda x: tf.nn.relu(x)),
    (keras.layers.ReLU(max_value=6.0, negative_slope=0.1), None),
    (keras.layers.LeakyReLU(negative_slope=0.3), None),
    (keras.layers.ELU(alpha=2.0), None),
    (keras.layers.Activation("selu"), None),
    (keras.layers.Softmax(), None),
]


@pytest.mark.parametrize("layer", [c[0] for c in LAYERS], ids=lambda l: type(l).__name__)
def test_activation_layers_bound_sampled_slopes(layer, rng):
    model = keras.Sequential([keras.Input((4,)), layer])
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    x = rng.standard_normal((2000, 4)).astype("float32") * 4
    y = x + rng.standard_normal((2000, 4)).astype("float32") * 0.1
    fx, fy = np.asarray(layer(x)), np.asarray(layer(y))
    ratio = np.linalg.norm(fx - fy, axis=1) / np.linalg.norm(x - y, axis=1)
    assert ratio.max() <= report.upper * (1 + 1e-5)
    assert report.certified


def test_prelu_uses_its_weights():
    layer = keras.layers.PReLU()
    model = keras.Sequential([keras.Input((3,)), layer])
    layer.set_weights([np.array([0.1, -1.5, 0.3], dtype="float32")])
    assert tfl.LipschitzEstimator(model, verbose=0).autolip().upper == pytest.approx(1.5)


@pytest.mark.parametrize("name, op_class", [
    ("abs", "Absolute"), ("sin", "Sin"), ("cos", "Cos"), ("arctan", "Arctan"), ("clip", "Clip"),
])
def test_elementwise_op_rules_match_the_derivative_on_a_grid(name, op_class):
    # The op's derivative range on a fine grid lies inside the rule's slope range and reaches
    # its ends (|x|: -1 and 1; clip: 0 and 1), and the constant is the sup of |σ'|.
    from keras.src.ops import numpy as knp

    from tf_lipschitz.rules.base import get_rule

    op = getattr(knp, op_class)(-2.0, 3.0) if name == "clip" else getattr(knp, op_class)()
    bound = get_rule(op)(op, None)
    lo, hi = bound.activation.slope_range
    fn = {"clip": lambda x: keras.ops.clip(x, -2.0, 3.0)}.get(name, getattr(keras.ops, name))
    slopes = _derivative(fn)
    assert bound.value == pytest.approx(np.abs(slopes).max(), abs=1e-6)
    assert lo - 1e-9 <= slopes.min() and slopes.max() <= hi + 1e-9
    assert slopes.min() == pytest.approx(lo, abs=1e-6)
    assert slopes.max() == pytest.approx(hi, abs=1e-6)


def test_abs_op_in_a_functional_model_against_brute_force():
    # x -> W1 x -> |.| -> W2: a.e. the Jacobian is W2 diag(s) W1 with s in {-1, 1}^4, and with
    # 5 inputs every sign pattern occurs, so L = max_s ‖W2 diag(s) W1‖ exactly.
    keras.utils.set_random_seed(3)
    x = keras.Input((5,))
    d1, d2 = keras.layers.Dense(4), keras.layers.Dense(3)
    model = keras.Model(x, d2(keras.ops.abs(d1(x))))
    w1, w2 = d1.kernel.numpy().T.astype("float64"), d2.kernel.numpy().T.astype("float64")
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 4)).reshape(4, -1).T
    true = max(np.linalg.norm(w2 @ np.diag(s) @ w1, 2) for s in signs)
    est = tfl.LipschitzEstimator(model, verbose=0)
    certified = est.autolip(certified=True)
    assert certified.certified
    assert certified.upper >= true * (1 - 1e-7)
    assert certified.upper == pytest.approx(np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2),
                                            rel=1e-5)
    lower = est.lower_bound(n_random=64, steps=5)
    assert true * (1 - 1e-4) <= lower.value <= true
    rows = [row for row in certified.layers if row.kind not in ("input", "linear")]
    assert any("abs" in row.method or "abs" in str(row) for row in rows)


# Parameters reach the rules through the ops (keras.ops.celu(x, alpha=...)) and the layers
# (ReLU, LeakyReLU, ELU); an Activation layer only names its function (default parameters).
VALID_OP_PARAMETERS = [
    ("Celu", {"alpha": 0.3}), ("Celu", {"alpha": 2.0}), ("Squareplus", {"b": 0.0}),
    ("Squareplus", {"b": 0.5}), ("Squareplus", {"b": 9.0}), ("SoftShrink", {"threshold": 0.0}),
    ("SoftShrink", {"threshold": 1.5}), ("LeakyRelu", {"negative_slope": 3.0}),
    ("LeakyRelu", {"negative_slope": -2.0}), ("Elu", {"alpha": -1.5}), ("Elu", {"alpha": 3.0}),
]


def _op(op_class, kwargs):
    from keras.src.ops import nn as knn

    from tf_lipschitz.rules.base import get_rule

    op = getattr(knn, op_class)(**kwargs)
    return op, (lambda: get_rule(op)(op, None))


@pytest.mark.parametrize("op_class, kwargs", VALID_OP_PARAMETERS, ids=str)
def test_parameterised_op_rules_bound_the_derivative(op_class, kwargs):
    op, rule = _op(op_class, kwargs)
    bound = rule()
    d = _derivative(op)
    assert np.all(np.isfinite(d))
    assert np.max(np.abs(d)) - 1e-9 <= bound.value <= np.max(np.abs(d)) * (1 + 2e-4) + 1e-6
    lo, hi = bound.activation.slope_range
    assert lo <= d.min() + 1e-9 and hi >= d.max() - 1e-9


def _steepest_secant(fn):
    """The largest |f(x) − f(y)| / |x − y| over neighbouring grid points (NaN if f is NaN)."""
    y = fn(GRID).numpy()
    x = GRID.numpy()
    return np.max(np.abs(np.diff(y)) / np.diff(x)) if np.all(np.isfinite(y)) else np.nan


INVALID_OP_PARAMETERS = [
    ("Celu", {"alpha": -1.0}), ("Celu", {"alpha": 0.0}), ("Celu", {"alpha": np.inf}),
    ("Squareplus", {"b": -1.0}), ("Squareplus", {"b": -1e-3}), ("Squareplus", {"b": np.inf}),
    ("SoftShrink", {"threshold": -0.5}), ("Elu", {"alpha": np.nan}), ("Elu", {"alpha": np.inf}),
    ("LeakyRelu", {"negative_slope": np.nan}), ("LeakyRelu", {"negative_slope": -np.inf}),
]


@pytest.mark.parametrize("op_class, kwargs", INVALID_OP_PARAMETERS, ids=str)
def test_parameters_that_break_lipschitz_continuity_are_refused(op_class, kwargs):
    op, rule = _op(op_class, kwargs)
    # the function really has no constant near 1: a NaN/infinite value or a steep secant
    steepest = _steepest_secant(op)
    assert not steepest < 100, steepest
    (param, value), = kwargs.items()
    with pytest.raises(NotLipschitzError, match=f"'{op.name}'.*{param}={value:g}.*Use "):
        rule()


@pytest.mark.parametrize("make", [
    lambda: keras.layers.ELU(alpha=float("nan")),
    lambda: keras.layers.LeakyReLU(negative_slope=float("nan")),
    lambda: keras.layers.ReLU(negative_slope=float("nan")),
    lambda: keras.layers.ReLU(max_value=float("nan")),
], ids=["ELU", "LeakyReLU", "ReLU-slope", "ReLU-max_value"])
def test_layers_with_nan_parameters_are_refused(make):
    # Keras accepts NaN (NaN < 0 is False); max(1, nan) would have read as 1.
    layer = make()
    model = keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(NotLipschitzError, match=f"{layer.name}.*=nan"):
        tfl.LipschitzEstimator(model, verbose=0)


def test_relu_layer_infinite_max_value_is_no_clip():
    layer = keras.layers.ReLU(max_value=float("inf"), negative_slope=0.5)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert tfl.LipschitzEstimator(model, verbose=0).autolip().upper == pytest.approx(1.0)
