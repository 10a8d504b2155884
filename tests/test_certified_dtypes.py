"""Certified AutoLip on models whose linear maps do not all run in float64.

Certified mode materialises small fused chains in float64 for an exact dense bound. These
models used to crash there: a product with a Python constant (the rule froze the constant in
float32), a user ``affine()`` layer adding a float32 bias, and 3-D average pooling (no float64
``AvgPool3D`` kernel on CPU). Ground truth is the SVD of each linear model's Jacobian, built
from the model itself on the standard basis (``model(e_i) − model(0)``); every certified upper
bound must be ``≥`` it, and within 1 % where the route is exact.

Mixed-precision and float64 models were certified a little *below* the map they compute: the
weights were read as float32 variables, not as the float16 numbers the layer multiplies by, and
float64 normalisation layers were read in float32. There the ground truth is a float64 copy of
the model given the weights as Keras rounds them, or exact rational arithmetic (``fractions``).
"""

import contextlib
import math
import warnings
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tf_lipschitz as tfl
from tf_lipschitz import certify
from tf_lipschitz.autolip import evaluate_rules

from groundtruth import exact_norm

L = keras.layers


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
    exact = exact_norm(model, (5,))
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
    exact = exact_norm(model, shape)
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
    exact = exact_norm(model, (5,))
    assert report.certified
    assert exact <= report.upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("constant,shape", [
    (np.array([[2.0], [1.0], [-0.5]], "float32"), (1, 5)),  # each entry copied 3 times
    (np.float32(-0.25), (2, 3)),
], ids=["copies", "scalar"])
def test_division_norm_is_the_reciprocals_norm(constant, shape):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, inputs / constant)
    exact = exact_norm(model, shape)
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
    exact = exact_norm(chain, (4,))
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
    exact = exact_norm(model, (5,))
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
    exact = exact_norm(model, (5,))
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
    exact = exact_norm(model, shape)
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
    exact = exact_norm(model, shape)
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
    exact = exact_norm(model, shape)
    product = exact_norm(keras.Sequential([keras.Input(shape), conv]), shape) * _POOL_NORM
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


# --------------------------------------------------------------------------------------------
# Mixed precision: a certificate is of the weights as the layer multiplies by them
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _policy(policy, floatx=None):
    previous, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy(policy)
    keras.config.set_floatx(floatx or previous_floatx)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
        keras.config.set_floatx(previous_floatx)


def _read_as_multiplied(layer, weight):
    """A weight in float64 as Keras' own call uses it: kernels (autocast variables) rounded to
    the compute dtype; BatchNormalization upcasts half precision to float32."""
    dtype = layer.compute_dtype
    if isinstance(layer, L.BatchNormalization):
        dtype = keras.backend.result_type(dtype, "float32")
    return ops.convert_to_numpy(ops.cast(ops.cast(weight, dtype), "float64"))


def _norm_as_computed(model, shape):
    """σ_max of the model's linear map with every weight as its layer multiplies by it: a
    float64 copy of the model, given those weights, evaluated on the standard basis."""
    twins = [type(layer).from_config({**layer.get_config(), "dtype": "float64"})
             for layer in model.layers]
    copy = keras.Sequential([keras.Input(shape, dtype="float64"), *twins])
    for layer, twin in zip(model.layers, twins):
        twin.set_weights([_read_as_multiplied(layer, w) for w in layer.weights])
    return exact_norm(copy, shape, "float64")


_HALF_ULP = {"mixed_float16": 2.0 ** -10, "mixed_bfloat16": 2.0 ** -7}


def _rounding_up_kernels(model, policy, rng):
    """Kernels of ``±c · 2^e`` with ``c`` a float32 number 0.6 units above 1 in the compute
    dtype: it rounds every entry up by the same factor (``3.9e-4`` in float16, ``3.1e-3`` in
    bfloat16), so the operator the model applies has a norm that much above the float32 one."""
    c = np.float32(1 + 0.6 * _HALF_ULP[policy])
    for layer in model.layers:
        values = []
        for w in layer.weights:
            if w.path.endswith("kernel"):
                signs = rng.choice([-1.0, 1.0], w.shape) * 2.0 ** rng.integers(-1, 2, w.shape)
                values.append((signs * c).astype("float32"))
            else:
                values.append(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        layer.set_weights(values)


_MIXED_LAYERS = {
    "dense": (lambda k: L.Dense(5), (4,)),
    "einsum": (lambda k: L.EinsumDense("abc,cd->abd", output_shape=(3, 5)), (3, 4)),
    "conv1d": (lambda k: L.Conv1D(3, k, padding="same"), (6, 2)),
    "conv2d-strided": (lambda k: L.Conv2D(3, k, strides=2), (5, 5, 2)),
    "conv3d": (lambda k: L.Conv3D(2, k, padding="same"), (3, 3, 3, 2)),
    "depthwise1d": (lambda k: L.DepthwiseConv1D(k, depth_multiplier=2), (6, 2)),
    "depthwise2d": (lambda k: L.DepthwiseConv2D(k, padding="same"), (5, 5, 2)),
    "separable1d": (lambda k: L.SeparableConv1D(3, k, padding="same"), (6, 2)),
    "separable2d": (lambda k: L.SeparableConv2D(3, k, strides=2), (5, 5, 2)),
    "transpose1d": (lambda k: L.Conv1DTranspose(3, k, strides=2), (4, 2)),
    "transpose2d": (lambda k: L.Conv2DTranspose(3, k, padding="same"), (4, 4, 2)),
    "transpose3d": (lambda k: L.Conv3DTranspose(2, k), (2, 2, 2, 2)),
}


@pytest.mark.parametrize("route", ["dense", "structured"])
@pytest.mark.parametrize("name", list(_MIXED_LAYERS))
@pytest.mark.parametrize("policy", list(_HALF_ULP))
def test_mixed_precision_certificate_is_of_the_rounded_kernel(policy, name, route, monkeypatch):
    # The certificate was of the float32 variables: 16.00798 for a float16 map of norm 16.01562.
    # "dense" materialises the rule's fn in float64; "structured" (kernel SVD, polyphase FFT)
    # reads the kernel itself, on 1-tap kernels where it is exact.
    if route == "structured":
        monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    make, shape = _MIXED_LAYERS[name]
    with _policy(policy):
        model = keras.Sequential([keras.Input(shape), make(3 if route == "dense" else 1)])
        _rounding_up_kernels(model, policy, np.random.default_rng(7))
        report = _certified(model)
    exact = _norm_as_computed(model, shape)
    assert report.certified
    assert exact <= report.upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("route", ["dense", "structured"])
@pytest.mark.parametrize("policy", list(_HALF_ULP))
def test_mixed_precision_fused_conv_batchnorm(policy, route, monkeypatch):
    if route == "structured":  # BN's scales folded into the kernel (exact for one tap)
        monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    shape = (4, 4, 3)
    with _policy(policy):
        model = keras.Sequential([keras.Input(shape), L.Conv2D(4, 3 if route == "dense" else 1,
                                                               padding="same"),
                                  L.BatchNormalization()])
        _rounding_up_kernels(model, policy, np.random.default_rng(8))
        report = _certified(model)
    (row,) = [r for r in report.layers if r.kind == "linear"]
    assert "+" in row.name and report.certified
    exact = _norm_as_computed(model, shape)
    assert exact <= report.upper <= exact * (1 + 1e-5)


def test_mixed_precision_adjoint_is_the_transpose_of_the_rounded_kernel():
    # The solver's explicit transpose (stride-1 convolutions) reads the kernel too.
    from tf_lipschitz.operators import LinearOperator
    from tf_lipschitz.rules import NodeContext, get_rule

    shape = (4, 4, 2)
    with _policy("mixed_float16"):
        layer = L.Conv2D(2, 3, padding="same")
        model = keras.Sequential([keras.Input(shape), layer])
        _rounding_up_kernels(model, "mixed_float16", np.random.default_rng(9))
    twin = L.Conv2D(2, 3, padding="same", use_bias=False, dtype="float64")
    twin.build((None, *shape))
    twin.set_weights([_read_as_multiplied(layer, layer.kernel)])
    matrix = LinearOperator(twin, shape, dtype="float64").to_dense()  # (n_out, n_in)
    bound = get_rule(layer)(layer, NodeContext((shape,), (shape,)))
    y = np.random.default_rng(1).standard_normal((1, *shape))
    adjoint = np.asarray(bound.adjoint(tf.constant(y))).reshape(-1)
    np.testing.assert_allclose(adjoint, matrix.T @ y.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", list(_HALF_ULP))
@pytest.mark.parametrize("kind", ["rescaling", "layer-scale"])
def test_mixed_precision_channel_scale_is_the_rounded_factor(policy, kind):
    from keras.src.applications.convnext import LayerScale

    c = float(np.float32(1 + 0.6 * _HALF_ULP[policy]))
    with _policy(policy):
        layer = L.Rescaling(c) if kind == "rescaling" else LayerScale(c, 3)
        model = keras.Sequential([keras.Input((2, 3)), layer])
        report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
        used = float(ops.convert_to_numpy(ops.cast(ops.cast(c, layer.compute_dtype), "float64")))
    assert used > c  # the factor the model multiplies by
    assert report.certified
    assert used <= report.upper <= used * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# float64 models: closed forms in float64, above the exact value
# --------------------------------------------------------------------------------------------


def _float64_model(where, make, shape):
    """``make()`` in a float64 model (``floatx``) or as a float64 layer in a float32 model."""
    if where == "floatx":
        with _policy("float64", floatx="float64"):
            layer = make({})
            return keras.Sequential([keras.Input(shape), layer]), layer
    layer = make({"dtype": "float64"})
    return keras.Sequential([keras.Input(shape), layer]), layer


@pytest.mark.parametrize("where", ["floatx", "layer"])
def test_float64_batchnorm_certificate_is_above_the_exact_value(where):
    # The rule computed γ/√(var+ε) in float32: certified 1.0000000000000038 for 1.000000059.
    gamma = np.array([1 + 2.0 ** -24, 0.5, -1 - 3 * 2.0 ** -26])  # not float32 numbers
    var = np.array([1 - 1e-3, 0.999, 1.5 + 2.0 ** -30])
    model, bn = _float64_model(where, lambda kw: L.BatchNormalization(**kw), (3,))
    bn.set_weights([gamma, np.zeros(3), np.zeros(3), var])
    assert bn.moving_variance.dtype == "float64"
    with _no_warnings():
        report = _certified(model)
    (row,) = [r for r in report.layers if r.kind == "linear"]
    eps = Fraction(bn.epsilon)
    for bound in (Fraction(row.certificate), Fraction(report.upper)):
        assert all(bound ** 2 * (Fraction(v) + eps) >= Fraction(g) ** 2 for g, v in zip(gamma, var))
    assert report.upper == pytest.approx(np.max(np.abs(gamma) / np.sqrt(var + bn.epsilon)),
                                         rel=1e-14)


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalization_certificate_is_above_the_models_factor(dtype, invert):
    # float64: the variance was read in float32 (0.25 or 4.0), giving 2.0 for 2 + 2⁻³⁹. float32:
    # 1/√var was rounded to float32, 1.2e-8 below the factor the model divides by, and the
    # certificate was that factor, below the exact 1/√var (or √var, inverted).
    if dtype == "float64":
        var = np.array([4.0 + 2.0 ** -30, 1.0, 0.5] if invert else [0.25 - 2.0 ** -40, 1.0, 3.0])
        model, _ = _float64_model("floatx", lambda kw: L.Normalization(
            mean=np.zeros(3), variance=var, invert=invert, **kw), (3,))
    else:
        var = np.array([0.3, 2.0, 0.7], "float32")
        model = keras.Sequential([keras.Input((3,)), L.Normalization(
            mean=np.zeros(3), variance=var, invert=invert)])
    with _no_warnings():
        report = _certified(model)
    (row,) = [r for r in report.layers if r.kind == "linear"]
    std = np.sqrt(var)  # the model's √var, rounded in its dtype
    for value in (report.upper, row.certificate):  # the factor the model multiplies by
        bound = Fraction(value)
        assert all(bound >= Fraction(s) if invert else bound * Fraction(s) >= 1
                   for s in map(float, std))
    bound = Fraction(row.certificate)  # and the exact one
    assert all(bound ** 2 >= Fraction(v) if invert else bound ** 2 * Fraction(v) >= 1
               for v in map(float, var))
    assert report.upper == pytest.approx(float(np.max(std if invert else 1 / std)), rel=1e-7)


@pytest.mark.parametrize("route", ["dense", "structured"])
def test_float64_fused_conv_batchnorm_uses_float64_scales(route, monkeypatch):
    # Variances below float32's normal range (a float64 model's reason to be): the rule read
    # them in float32, where TensorFlow flushes them to zero, and the chain's scales became inf
    # (the solver refused a NaN). The scales fold into the kernel or go into the float64 matrix.
    if route == "structured":
        monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    shape = (4, 4, 2)
    with _policy("float64", floatx="float64"):
        conv = L.Conv2D(3, 3 if route == "dense" else 1, padding="same", use_bias=False)
        bn = L.BatchNormalization(epsilon=1e-60)
        model = keras.Sequential([keras.Input(shape), conv, bn])
    rng = np.random.default_rng(10)
    conv.set_weights([rng.standard_normal(conv.kernel.shape)])
    var = (np.array([1000, 700, 1500]) + 0.51) * 2.0 ** -149
    bn.set_weights([np.full(3, 1e-21), np.zeros(3), np.zeros(3), var])
    report = _certified(model)
    exact = exact_norm(model, shape, "float64")
    assert report.certified
    assert exact <= report.upper <= exact * (1 + 1e-5)


def test_layer_normalization_bound_uses_the_epsilon_the_model_adds():
    # float32(1e-5) < 1e-5: max|γ|/√ε with the float64 epsilon was 1.3e-8 below the model's.
    model = keras.Sequential([keras.Input((4,)), L.LayerNormalization(epsilon=1e-5)])
    with pytest.warns(UserWarning, match="epsilon"):
        report = _certified(model)
    bound = Fraction(report.upper)
    for eps in (1e-5, float(np.float32(1e-5))):
        assert bound ** 2 * Fraction(eps) >= 1
    assert report.upper == pytest.approx(1 / math.sqrt(1e-5), rel=1e-7)


def test_float32_batchnorm_alone_reports_its_rounded_up_certificate():
    # A closed-form factor reported its float32 norm in certified mode, not its certificate:
    # here float32 rsqrt(var + ε) rounds below the exact 1/√(var + ε).
    rng = np.random.default_rng(3)
    var = rng.uniform(0.5, 2.0, 4096).astype("float32")
    computed = ops.convert_to_numpy(ops.rsqrt(ops.convert_to_tensor(var) + 1e-3)).astype("float64")
    exact = 1.0 / np.sqrt(var.astype("float64") + 1e-3)
    low = var[np.argmax(exact - computed)]  # the channel whose float32 scale is furthest below
    var = np.full(64, low)  # computed as above (TensorFlow's vectorised rsqrt)
    model = keras.Sequential([keras.Input((64,)), L.BatchNormalization()])
    model.layers[0].set_weights([np.ones(64), np.zeros(64), np.zeros(64), var])
    scale = float(np.max(ops.convert_to_numpy(ops.rsqrt(ops.convert_to_tensor(var) + 1e-3))))
    report = _certified(model)
    assert report.certified
    for eps in (Fraction(1e-3), Fraction(float(np.float32(1e-3)))):
        assert Fraction(report.upper) ** 2 * (Fraction(float(low)) + eps) >= 1
        assert Fraction(scale) ** 2 * (Fraction(float(low)) + eps) < 1  # the old value
    assert report.upper == pytest.approx(scale, rel=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_prelu_slope_is_the_rounded_one(policy):
    # PReLU multiplies by alpha rounded to the compute dtype, up to half a unit above.
    with _policy(policy):
        model = keras.Sequential([keras.Input((2,)), L.PReLU()])
    alpha = -(1 + 0.6 * _HALF_ULP[policy])  # rounds away from zero in the compute dtype
    model.layers[0].set_weights([np.array([alpha, 0.5], "float32")])
    used = abs(float(_read_as_multiplied(model.layers[0], model.layers[0].alpha)[0]))
    assert used > abs(alpha)
    for certified in (False, True):
        report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=certified)
        assert report.upper >= used


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_chain_through_a_data_movement_layer(policy):
    # Flatten, called as layer(x), casts the float32 start vector to the half compute dtype:
    # the solver met float16 products in a float32 iteration and crashed with a raw TypeError.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras.Sequential([keras.Input((5, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
        dense = model.layers[1]
        half = keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(dense.kernel, dense.compute_dtype), "float32"))
        exact = np.linalg.norm(half.astype(np.float64), 2)
        est = tfl.LipschitzEstimator(model, verbose=0)
        rounding = 1e-2 if policy == "mixed_bfloat16" else 2e-3
        assert est.autolip().upper == pytest.approx(exact, rel=rounding)
        certified = est.autolip(certified=True)
        assert certified.upper >= exact * (1 - 1e-7)
    finally:
        keras.mixed_precision.set_global_policy(previous)
