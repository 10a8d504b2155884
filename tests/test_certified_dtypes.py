"""Certified AutoLip on models whose linear maps do not all run in float64.

Certified mode materialises small fused chains in float64 for an exact dense bound. These
models used to crash there: a product with a Python constant (the rule froze the constant in
float32), a user ``affine()`` layer adding a float32 bias, and 3-D average pooling (no float64
``AvgPool3D`` kernel on CPU). Ground truth is the SVD of each linear model's Jacobian, built
from the model itself on the standard basis (``model(e_i) − model(0)``); every certified upper
bound must be ``≥`` it, and within 1 % where the route is exact.
"""

import contextlib
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tf_lipschitz as tfl
from tf_lipschitz import certify
from tf_lipschitz.autolip import evaluate_rules

L = keras.layers


def _jacobian_norm(model, shape):
    """σ_max of the Jacobian of a linear (or affine) model, from the model on the basis."""
    n = math.prod(shape)
    basis = np.eye(n, dtype="float32").reshape((n, *shape))
    out = np.asarray(model(basis)) - np.asarray(model(np.zeros((1, *shape), "float32")))
    return float(np.linalg.svd(out.reshape(n, -1).astype("float64"), compute_uv=False)[0])


def _certified(model, **kwargs):
    return tfl.LipschitzEstimator(model, verbose=0, tol=1e-9).autolip(certified=True, **kwargs)


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------
# Products with constants: the constant follows the dtype of the input
# --------------------------------------------------------------------------------------------

_PRODUCTS = {
    "python-constant-left": lambda y: 2.0 * y,
    "python-constant-right": lambda y: y * 3.0,
    "ops-multiply": lambda y: keras.ops.multiply(y, 2.0),
    "rounded-constant": lambda y: 0.1 * y,  # 0.1 is not a float32 number
    "numpy-vector": lambda y: y * np.array([1.0, -4.0, 0.5, 2.0], "float32"),
    "tensor-constant": lambda y: keras.ops.multiply(
        y, keras.ops.convert_to_tensor(np.array([1.0, -4.0, 0.5, 2.0], "float32"))),
}


@pytest.mark.parametrize("name", list(_PRODUCTS))
def test_product_with_constant_is_certified_exactly(name):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, _PRODUCTS[name](L.Dense(4)(inputs)))
    with _no_warnings():
        report = _certified(model)
    exact = _jacobian_norm(model, (5,))
    assert report.certified
    assert exact <= report.upper <= exact * 1.01
    assert report.upper == pytest.approx(exact, rel=1e-5)  # the dense route is exact
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert "+" in row.name  # Dense and the product are one fused chain


@pytest.mark.parametrize("constant,shape", [
    (np.array([[2.0], [1.0], [-1.0]], "float32"), (1, 5)),  # broadcast: 3 copies of each entry
    (np.array([[0.5, 2.0]], "float32"), (3, 1)),
    (np.float32(-3.0), (2, 3)),
], ids=["copies", "outer", "scalar"])
def test_product_norm_counts_broadcast_copies(constant, shape):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, keras.ops.multiply(inputs, constant))
    exact = _jacobian_norm(model, shape)
    for report in (tfl.LipschitzEstimator(model, verbose=0).autolip(), _certified(model)):
        assert report.certified  # a closed form
        assert exact <= report.upper <= exact * (1 + 1e-6)


def test_product_with_constant_in_both_dtypes():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inputs * 0.1)
    graph = tfl.LipschitzEstimator(model, verbose=0).graph
    (linear,) = [b for b in evaluate_rules(graph).values() if isinstance(b, tfl.rules.Linear)]
    for dtype in ("float32", "float64"):
        y = linear.fn(tf.ones((2, 3), dtype))
        assert y.dtype == dtype
        np.testing.assert_allclose(np.asarray(y), 0.1, rtol=1e-7)
    assert linear.certificate() >= float(np.float32(0.1))  # the model's float32 constant


# --------------------------------------------------------------------------------------------
# Division by constants: the product with 1/c; division by the input is not Lipschitz
# --------------------------------------------------------------------------------------------

_QUOTIENTS = {
    "python-constant": lambda y: y / 4.0,
    "rounded-constant": lambda y: y / 3.0,  # 1/3 is not a float32 number
    "ops-divide-vector": lambda y: keras.ops.divide(y, np.array([1.0, -0.25, 0.5, 2.0], "float32")),
    "ops-true-divide-tensor": lambda y: keras.ops.true_divide(
        y, keras.ops.convert_to_tensor(np.array([4.0, 1.0, 0.5, 8.0], "float32"))),
    "divide-no-nan-zero": lambda y: keras.ops.divide_no_nan(
        y, np.array([0.0, 2.0, 0.25, 1.0], "float32")),
}


@pytest.mark.parametrize("name", list(_QUOTIENTS))
def test_division_by_constant_is_certified_exactly(name):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.Dense(3)(_QUOTIENTS[name](L.Dense(4)(inputs))))
    with _no_warnings():
        report = _certified(model)
    exact = _jacobian_norm(model, (5,))
    assert report.certified
    assert exact <= report.upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("constant,shape", [
    (np.array([[2.0], [1.0], [-0.5]], "float32"), (1, 5)),  # each entry copied 3 times
    (np.float32(-0.25), (2, 3)),
], ids=["copies", "scalar"])
def test_division_norm_is_the_reciprocals_norm(constant, shape):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, inputs / constant)
    exact = _jacobian_norm(model, shape)
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    assert report.certified  # a closed form
    assert exact <= report.upper <= exact * (1 + 1e-6)


def test_division_by_the_input_is_not_lipschitz():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, 2.0 / L.Dense(3)(inputs))
    with pytest.raises(tfl.NotLipschitzError, match="divides by a tensor that depends"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


def test_division_by_zero_names_the_layer_and_the_fix():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inputs / np.array([1.0, 0.0, 2.0], "float32"))
    with pytest.raises(tfl.LipschitzError, match=r"true_divide.*1 zero.*divide_no_nan"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


def test_division_rule_errors_say_what_to_do():
    from keras.src.ops import numpy as knp

    from tf_lipschitz.rules.base import NodeContext, get_rule

    divide = knp.Divide()
    rule = get_rule(divide)
    one = NodeContext(input_shapes=((3,),), output_shapes=((3,),), dependent=(True,),
                      constants=(None,), name="div")
    with pytest.raises(tfl.LipschitzError, match=r"'div'.*read 1.*positional.*register_rule"):
        rule(divide, one)
    opaque = NodeContext(input_shapes=((3,), ()), output_shapes=((3,),), dependent=(False, False),
                         constants=(None, 2.0), name="div")
    with pytest.raises(tfl.LipschitzError, match=r"'div'.*numerator.*pass a constant numerator"):
        rule(divide, opaque)


def test_variable_operand_is_read_at_every_run():
    # The variable is captured by the graph: an estimator re-run after it changed (as
    # LipCallback does every epoch) must see the new value, alone and inside a fused chain.
    v = keras.Variable(np.float32(2.0))
    inputs = keras.Input((4,))
    quotient = tfl.LipschitzEstimator(keras.Model(inputs, inputs / v), verbose=0)
    assert quotient.autolip().upper == pytest.approx(0.5, rel=1e-12)
    dense = L.Dense(3, use_bias=False)
    chain = keras.Model(inputs, dense(L.Dense(4, use_bias=False)(inputs) * v))
    est = tfl.LipschitzEstimator(chain, verbose=0, tol=1e-9)
    before = est.autolip().upper
    v.assign(0.25)
    report = quotient.autolip(certified=True)
    assert report.certified and report.upper == pytest.approx(4.0, rel=1e-12)
    assert est.autolip().upper == pytest.approx(before / 8, rel=1e-6)
    exact = _jacobian_norm(chain, (4,))
    assert exact <= est.autolip(certified=True).upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_low_precision_constant_is_certified_as_the_model_rounds_it(policy):
    # A bfloat16 model divides by bf16(0.7) = 0.69921875 (norm 1.43017): the fused chain
    # materialised in float64 used 0.7 exactly (1.42857, 0.11 % below the model's map).
    def rounded(value):
        return float(ops.convert_to_numpy(ops.cast(ops.cast(value, policy), "float64")))

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((4,))
        dense = L.Dense(4, use_bias=False, kernel_initializer="identity")
        cases = ((dense(inputs) / 0.7, 1 / rounded(0.7)), (dense(inputs) * (1 / 0.7), rounded(1 / 0.7)))
        for out, model_map in cases:  # the norm of the map the model computes
            report = tfl.LipschitzEstimator(keras.Model(inputs, out), verbose=0).autolip(
                certified=True)
            assert report.certified
            assert model_map <= report.upper <= max(model_map, 1 / 0.7) * (1 + 1e-5)
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------------------
# A user affine() layer that adds a float32 bias: the dense route is skipped, not a crash
# --------------------------------------------------------------------------------------------


class BiasAffine(keras.layers.Layer):
    """``x W + b`` with ``+`` on a float32 variable: cannot run on float64 inputs."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], 3))
        self.b = self.add_weight(shape=(3,), initializer="ones")

    def call(self, x):
        return ops.matmul(x, self.w) + self.b


class CastingAffine(BiasAffine):
    """The same map, computing in the dtype of its input."""

    def call(self, x):
        return ops.add(ops.matmul(x, self.w), self.b)


tfl.register_rule(BiasAffine, tfl.rules.affine())
tfl.register_rule(CastingAffine, tfl.rules.affine())


@pytest.mark.parametrize("with_dense", [False, True], ids=["alone", "fused-with-dense"])
def test_float32_user_layer_stays_an_estimate(with_dense):
    keras.utils.set_random_seed(2)
    layers = [L.Dense(6)] if with_dense else []
    model = keras.Sequential([keras.Input((5,)), *layers, BiasAffine()])
    with pytest.warns(UserWarning, match="not materialised in float64.*AddV2"):
        report = _certified(model)
    exact = _jacobian_norm(model, (5,))
    assert not report.certified  # the user rule has no certificate of its own
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert row.certificate is None and row.bound_kind == "estimate"
    assert report.upper == pytest.approx(exact, rel=1e-5)  # the Lanczos estimate


@pytest.mark.parametrize("with_dense", [False, True], ids=["alone", "fused-with-dense"])
def test_user_layer_computing_in_input_dtype_is_certified(with_dense):
    keras.utils.set_random_seed(2)
    layers = [L.Dense(6)] if with_dense else []
    model = keras.Sequential([keras.Input((5,)), *layers, CastingAffine()])
    with _no_warnings():
        report = _certified(model)
    exact = _jacobian_norm(model, (5,))
    assert report.certified
    assert exact <= report.upper <= exact * 1.01


def test_estimate_factor_does_not_hide_certified_ones():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="relu"), BiasAffine()])
    with pytest.warns(UserWarning, match="float64"):
        report = _certified(model)
    rows = [r for r in report.layers if r.kind == "linear"]
    assert [r.bound_kind for r in rows] == ["certified", "estimate"]
    assert not report.certified


# --------------------------------------------------------------------------------------------
# Float64 failures are told apart from genuine errors
# --------------------------------------------------------------------------------------------


def test_dense_route_rejects_float32_and_float64_failures():
    w32 = tf.constant(np.arange(6.0).reshape(3, 2), tf.float32)
    assert certify._dense_exact(lambda x: tf.matmul(x, w32), (3,), (2,)) is None
    # returns float32 when given float64: the dense route is skipped as well
    assert certify._dense_exact(lambda x: tf.matmul(tf.cast(x, tf.float32), w32), (3,), (2,)) \
        is None
    exact = certify._dense_exact(lambda x: tf.matmul(x, tf.cast(w32, x.dtype)), (3,), (2,))
    assert exact == pytest.approx(np.linalg.norm(w32.numpy(), 2), rel=1e-6)


def test_dense_route_reraises_genuine_errors():
    def broken(x):
        raise ValueError("a bug in the rule")

    with pytest.raises(ValueError, match="a bug in the rule"):
        certify._dense_exact(broken, (3,), (2,))


# --------------------------------------------------------------------------------------------
# 3-D average pooling: a closed form, no float64 AvgPool3D
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [
    (lambda: L.AveragePooling3D(2), (4, 4, 4, 1)),
    (lambda: L.AveragePooling3D(3, strides=2, padding="same"), (5, 4, 3, 2)),
    (lambda: L.AveragePooling3D((2, 1, 3), strides=(1, 1, 2)), (3, 2, 5, 1)),
], ids=["k2", "k3-s2-same", "rect-overlap"])
def test_average_pooling_3d_is_certified_by_its_closed_form(make, shape, monkeypatch):
    model = keras.Sequential([keras.Input(shape), make()])

    def no_materialisation(*args, **kwargs):
        raise AssertionError("a closed-form layer was materialised")

    monkeypatch.setattr(certify, "_float64_matrix", no_materialisation)
    with _no_warnings():
        report = _certified(model)
    exact = _jacobian_norm(model, shape)
    assert report.certified
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert row.method == "closed-form"
    assert exact <= row.certificate <= exact * (1 + 1e-5)
    assert exact * (1 - 1e-6) <= report.upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("make,shape", [
    (lambda: L.AveragePooling3D(2), (4, 4, 4, 1)),
    (lambda: L.AveragePooling3D(3, strides=2, padding="same"), (5, 4, 3, 2)),
    (lambda: L.AveragePooling3D(2, data_format="channels_first"), (2, 4, 2, 4)),
], ids=["k2", "k3-s2-same", "channels-first"])
def test_average_pooling_3d_in_a_chain_is_exact(make, shape):
    keras.utils.set_random_seed(4)
    conv = L.Conv3D(2, 2, padding="same", data_format=make().data_format)
    model = keras.Sequential([keras.Input(shape), conv, make()])
    with _no_warnings():
        report = _certified(model)
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert row.name.count("+") == 1  # Conv3D and the pooling are one fused chain
    exact = _jacobian_norm(model, shape)
    assert report.certified
    assert exact <= row.certificate <= exact * 1.01
    assert row.norm == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("pool", [2, 3], ids=["k2", "k3"])
def test_average_pooling_3d_float64_map_is_the_layer(pool):
    from tf_lipschitz.rules import NodeContext, get_rule

    shape = (5, 4, 6, 2)
    for padding in ("valid", "same"):
        layer = L.AveragePooling3D(pool, strides=2, padding=padding)
        out_shape = tuple(layer.compute_output_shape((1, *shape))[1:])
        bound = get_rule(layer)(layer, NodeContext((shape,), (out_shape,), (True,), (None,)))
        x = np.random.default_rng(pool).standard_normal((3, *shape))
        y64 = bound.fn(tf.constant(x, tf.float64))
        assert y64.dtype == tf.float64
        np.testing.assert_allclose(np.asarray(y64), np.asarray(layer(x.astype("float32"))),
                                   rtol=1e-5, atol=1e-6)


class Pool3D(keras.layers.Layer):
    """Average pooling through the raw op, which has no float64 kernel on CPU."""

    def call(self, x):
        return ops.average_pool(x, 2, 2, "valid")


_POOL_NORM = 1 / math.sqrt(8)
tfl.register_rule(Pool3D, lambda layer, ctx: tfl.rules.Linear(
    lambda x: ops.average_pool(x, 2, 2, "valid"), norm=lambda: _POOL_NORM,
    certificate=lambda: _POOL_NORM * (1 + 1e-6)))


def test_op_without_float64_kernel_falls_back_to_the_product():
    keras.utils.set_random_seed(5)
    shape = (4, 4, 4, 1)
    conv = L.Conv3D(2, 2, padding="same")
    model = keras.Sequential([keras.Input(shape), conv, Pool3D()])
    with _no_warnings():
        report = _certified(model)
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert row.name.count("+") == 1
    exact = _jacobian_norm(model, shape)
    product = _jacobian_norm(keras.Sequential([keras.Input(shape), conv]), shape) * _POOL_NORM
    assert report.certified  # every member has a certificate: ‖AB‖ ≤ ‖A‖‖B‖
    assert exact <= row.certificate <= product * (1 + 1e-5)
    assert row.certificate >= product * (1 - 1e-5)  # the product, not a dense bound
    assert row.norm == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_chain_is_estimated_in_float32(policy):
    # Flatten+Dense after a float16 convolution is a float16 operator. Iterated in float16, its
    # norms overflow at 256 (after the solver's scaling it raised; bfloat16 failed in np.finfo);
    # it is now applied in its dtype and iterated in float32.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 2))
        x = L.ReLU()(L.Conv2D(3, 3, padding="same")(inputs))
        dense = L.Dense(4)
        model = keras.Model(inputs, dense(L.Flatten()(x)))
        kernel = np.asarray(dense.kernel.numpy(), "float64") * 4.0
        dense.kernel.assign(kernel)
        est = tfl.LipschitzEstimator(model, verbose=0)
        for certified in (False, True):
            row = [r for r in est.autolip(certified=certified).layers
                   if r.name.endswith(f"+{dense.name}")][0]
            exact = np.linalg.svd(np.asarray(dense.kernel.numpy(), "float64"), compute_uv=False)[0]
            eps = 2.0 ** -10 if policy == "mixed_float16" else 2.0 ** -7
            assert row.norm == pytest.approx(exact, rel=8 * eps)
    finally:
        keras.config.set_dtype_policy(previous)
