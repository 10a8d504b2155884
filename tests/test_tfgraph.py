"""AutoLip on TensorFlow graphs (tf_lipschitz.tfgraph) against ground truth.

Ground truths: the Keras-level AutoLip of the same model (the graph walk must find the same
operators and constants), dense-matrix SVDs of small linear ops, and functions whose Lipschitz
constant is known in closed form.
"""

import logging
import math
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import certify, tfgraph
from tf_lipschitz.errors import ModelNotBuiltError, NotLipschitzError
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.rules.activations import activation_info
from tf_lipschitz.tfgraph import GraphEstimator, UnsupportedOpError, autolip_function

from groundtruth import exact_norm, top_singular_value

L = keras.layers
SPEC6 = tf.TensorSpec([None, 6], tf.float32)


def _mlp():
    return keras.Sequential([
        keras.Input((7,)),
        L.Dense(16, activation="relu"),
        L.Dense(12, activation="tanh"),
        L.Dense(8),
        L.Dense(3, activation="softmax"),
    ], name="mlp")


def _cnn():
    inp = keras.Input((12, 12, 2))
    x = L.Conv2D(6, 3, strides=2, padding="same")(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(8, 3, strides=1, padding="valid", activation="elu")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)  # overlapping windows: constant 2
    x = L.AveragePooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dense(5, activation="gelu")(x)
    return keras.Model(inp, L.Dense(3)(x), name="cnn")


def _resnet_block():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    shortcut = L.Conv2D(4, 1)(inp)
    x = L.ReLU()(L.Add()([x, shortcut]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, activation="silu")(x), name="resnet_block")


def _relu_bn_cnn():
    # BNs after ReLUs (one inside the Conv2D, one a layer of its own) join the convolution
    # before them across the ReLU, on both sides (graph: Relu op, then Mul/Add or
    # FusedBatchNormV3 ops).
    inp = keras.Input((10, 10, 2))
    x = L.Conv2D(4, 3, activation="relu")(inp)
    x = L.MaxPooling2D()(L.BatchNormalization()(x))
    x = L.BatchNormalization()(L.ReLU()(L.Conv2D(5, 3, padding="same")(x)))
    x = L.Flatten()(L.MaxPooling2D()(x))
    return keras.Model(inp, L.Dense(3)(x), name="relu_bn_cnn")


def _relu_ops_cnn():
    # keras.ops scalings after ReLUs: the Keras rules and the graph's Mul/Neg/RealDiv ops both
    # join the convolution before them across the ReLU.
    inp = keras.Input((10, 10, 2))
    x = L.Conv2D(4, 3, activation="relu")(inp)
    x = keras.ops.multiply(x, np.array([3.0, 0.2, -0.5, 1.5], "float32"))
    x = L.MaxPooling2D()(x)
    x = L.ReLU()(L.Conv2D(3, 3, padding="same")(x))
    x = keras.ops.divide(keras.ops.negative(x), np.array([0.25, 2.0, 1.0], "float32"))
    x = L.Flatten()(L.MaxPooling2D()(x))
    return keras.Model(inp, L.Dense(3)(x), name="relu_ops_cnn")


def _randomise_batch_norm(model, rng):
    """Moves BN statistics away from the identity so that folding them matters."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_variance.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, size=n).astype("float32"))
            layer.gamma.assign(rng.normal(size=n).astype("float32"))


@pytest.mark.parametrize("builder", [_mlp, _cnn, _resnet_block, _relu_bn_cnn, _relu_ops_cnn],
                         ids=["mlp", "cnn", "resnet", "relu-bn", "relu-ops"])
def test_exported_model_matches_keras_autolip(builder, tmp_path, rng):
    model = builder()
    _randomise_batch_norm(model, rng)
    model.export(str(tmp_path / "exported"), verbose=False)
    graph_rep = GraphEstimator.from_saved_model(str(tmp_path / "exported")).autolip()
    keras_rep = tfl.LipschitzEstimator(model, verbose=0).autolip()
    assert graph_rep.method == "autolip-graph"
    assert graph_rep.settings["signature"] == "serving_default"
    for rep in (graph_rep, keras_rep):
        assert all(row.converged is not False for row in rep.layers), rep.table()
    assert graph_rep.upper == pytest.approx(keras_rep.upper, rel=1e-3)
    # Same fusion: as many measured operators on both sides.
    measured = [r for r in graph_rep.layers if r.method in ("lanczos", "power")]
    assert len(measured) == len([r for r in keras_rep.layers if r.method in ("lanczos", "power")])


def test_fused_batch_norm_after_a_relu_stays_certified(tmp_path):
    # Relu then FusedBatchNormV3 (no float64 kernel) joins the convolution's group; the whole
    # group cannot be materialised in float64, but the scaling folds into the convolution's
    # certificate: ‖D·M‖ exactly (certified apart, ‖D‖‖M‖, before graph convolutions had
    # certificates; an estimate before that).
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype("float32")
    gamma = np.array([2.0, -0.3, 0.7, 1.1], "float32")
    variance = rng.uniform(0.3, 2.0, 4).astype("float32")
    zeros = np.zeros(4, "float32")

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((1, 6, 6, 2), tf.float32)])
        def __call__(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, gamma, zeros, zeros, variance,
                                                       epsilon=1e-3, is_training=False)
            return tf.nn.max_pool2d(y, 2, 2, "VALID")

    tf.saved_model.save(Model(), str(tmp_path / "fbn"))
    report = GraphEstimator.from_saved_model(str(tmp_path / "fbn")).autolip(certified=True)
    [row] = [r for r in report.layers if "FusedBatchNorm" in r.name]
    assert "Relu" in row.note and report.certified
    conv = LinearOperator(lambda v: tf.nn.conv2d(v, kernel.astype("float64"), 1, "SAME"),
                          (6, 6, 2), dtype="float64")
    scale = gamma.astype("float64") / np.sqrt(variance.astype("float64") + 1e-3)
    exact = top_singular_value(np.tile(scale, 36)[:, None] * conv.to_dense())
    assert exact * (1 - 1e-6) <= report.upper <= exact * (1 + 1e-5)
    assert report.upper < top_singular_value(conv.to_dense()) * np.abs(scale).max()


def test_graph_operator_equals_dense_matrix_and_its_norm():
    """A strided conv and a transposed conv: the re-executed ops are the exact linear maps."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 2, 3)).astype("float32")
    up = rng.standard_normal((3, 3, 2, 3)).astype("float32")  # (h, w, out, in) for transpose

    def f(x):
        y = tf.nn.conv2d(x, kernel, strides=2, padding="SAME")  # (4, 4, 3)
        return tf.nn.conv2d_transpose(y, up, output_shape=tf.stack([tf.shape(x)[0], 8, 8, 2]),
                                      strides=2, padding="SAME")

    est = GraphEstimator(f, tf.TensorSpec([None, 7, 7, 2]), tol=1e-8)
    (op,) = est.engine.operators  # one fused operator
    reference = LinearOperator(f, (7, 7, 2)).to_dense()
    np.testing.assert_allclose(op.to_dense(batch_size=16), reference, atol=1e-4)
    assert est.autolip().upper == pytest.approx(top_singular_value(reference), rel=1e-4)


def test_row_wise_ops_run_a_batch_in_one_call(monkeypatch):
    """Ops that treat batch rows apart (MatMul, convolutions, BiasAdd, products by constants
    that broadcast) run a batch of examples in one call instead of one call per example (the
    dense certificate of VGG16's predictions layer took 4.3 s example by example); a reshape
    whose shape constant encodes batch 1 still goes example by example. Same matrices."""
    rng = np.random.default_rng(2)
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 3)), tf.float32)
    scale = tf.constant(rng.standard_normal((1, 1, 3)), tf.float32)
    w = tf.constant(rng.standard_normal((48, 5)), tf.float32)

    def f(x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), [1.0, 2.0, 3.0]) * scale
        return tf.matmul(tf.reshape(y, [1, 48]), w)

    mapped = []
    original = tf.map_fn
    monkeypatch.setattr(tf, "map_fn", lambda *a, **k: mapped.append(1) or original(*a, **k))
    est = GraphEstimator(tf.function(f), [tf.TensorSpec([1, 4, 4, 2])], tol=1e-8)
    (op,) = est.engine.operators
    mapped.clear()
    dense = op.to_dense(batch_size=48)
    basis = np.eye(32, dtype="float32").reshape(32, 1, 4, 4, 2)
    offset = f(tf.zeros((1, 4, 4, 2))).numpy()
    reference = np.stack([(f(e).numpy() - offset).ravel() for e in basis], axis=1)
    np.testing.assert_allclose(dense, reference, atol=1e-4)
    assert len(mapped) == 1  # the Reshape only


def test_closed_form_function():
    """tanh(2·avgpool(conv1x1(x)) Q + b), Q orthogonal: L = ‖K‖₂ exactly.

    The 1×1 conv acts on channels, 2× a non-overlapping 2×2 average pool has norm 2·½ = 1,
    the reshape and Q are isometries, the bias is removed, and tanh'(0) = 1 is attained.
    """
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 1, 3, 5)).astype("float32")
    q = np.linalg.qr(rng.standard_normal((20, 20)))[0].astype("float32")
    b = rng.standard_normal(20).astype("float32")

    @tf.function
    def f(x):
        y = tf.nn.conv2d(x, k, 1, "VALID")
        y = 2.0 * tf.nn.avg_pool2d(y, 2, 2, "VALID")
        return tf.nn.tanh(tf.reshape(y, (-1, 20)) @ q + b)

    rep = autolip_function(f, tf.TensorSpec([None, 4, 4, 3]))
    assert rep.upper == pytest.approx(top_singular_value(k[0, 0]), rel=1e-4)
    assert [row.class_name for row in rep.layers][-1] == "Tanh"


@pytest.mark.parametrize("name, fn, activation", [
    ("gelu", lambda h: tf.nn.gelu(h), activation_info("gelu")),
    ("gelu_tanh", lambda h: tf.nn.gelu(h, approximate=True),
     activation_info("gelu", approximate=True)),
    ("silu", tf.nn.silu, activation_info("silu")),
    ("mish", keras.activations.mish, activation_info("mish")),
    ("hard_silu", keras.activations.hard_silu, activation_info("hard_silu")),
    ("hard_swish", keras.ops.hard_swish, activation_info("hard_silu")),
    ("keras_ops_gelu", keras.ops.gelu, activation_info("gelu", approximate=True)),
    ("gelu_erf_form", lambda h: 0.5 * h * (1.0 + tf.math.erf(h / tf.cast(tf.sqrt(2.0), h.dtype))),
     activation_info("gelu")),
    ("x_sigmoid_x", lambda h: tf.sigmoid(h) * h, activation_info("silu")),
    ("leaky_relu", lambda h: tf.nn.leaky_relu(h, 0.3), activation_info("leaky_relu",
                                                                         negative_slope=0.3)),
])
def test_activations_built_from_several_ops_are_recognised(name, fn, activation):
    w = np.random.default_rng(3).standard_normal((6, 4)).astype("float32")
    rep = autolip_function(lambda x: fn(x @ w), SPEC6)
    assert rep.upper == pytest.approx(top_singular_value(w) * activation.lipschitz, rel=1e-5)
    assert rep.layers[-1].bound_kind == "certified"


def _slope_sup(fn, lo=-20.0, hi=20.0, n=400_001) -> float:
    """max |φ'| of an elementwise φ on a dense float64 grid (autodiff), a ground truth."""
    x = tf.constant(np.linspace(lo, hi, n), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return float(np.max(np.abs(tape.gradient(y, x))))


@pytest.mark.parametrize("fn", [
    lambda h: tf.nn.silu(h, beta=2.0),
    lambda h: h * tf.sigmoid(1.702 * h),  # quick-gelu
    lambda h: h * tf.sigmoid(h / 0.25),
    lambda h: tf.nn.silu(h, beta=-1.5),
], ids=["silu_beta2", "quick_gelu", "divided", "negative_beta"])
def test_swish_with_any_beta_has_the_silu_constant(fn):
    """x·σ(βx) has derivative g(βx), g(u) = σ(u) + u·σ'(u): silu's constant for every β.

    It raised NotLipschitzError ("not globally Lipschitz").
    """
    w = np.random.default_rng(3).standard_normal((6, 4)).astype("float32")
    rep = autolip_function(lambda x: fn(x @ w), SPEC6)
    silu = activation_info("silu").lipschitz
    assert rep.upper == pytest.approx(top_singular_value(w) * silu, rel=1e-5)
    assert rep.layers[-1].bound_kind == "certified"
    assert silu * (1 - 1e-5) <= _slope_sup(fn) <= silu


def test_composite_activations_are_recognised_by_structure_not_values():
    """Functions within 1e-4 of silu on any grid are not silu: their slopes differ.

    They were given silu's constant 1.09984 (certified) below their true constants.
    """
    silu = activation_info("silu").lipschitz
    scaled = lambda x: 1.00009 * x * tf.sigmoid(x)  # noqa: E731
    wiggly = lambda x: x * tf.sigmoid(x) * (1.0 + 5e-5 * tf.sin(1e3 * x))  # noqa: E731
    assert _slope_sup(scaled) > silu * (1 + 5e-5) and _slope_sup(wiggly) > 1.9
    for fn in (scaled, wiggly, lambda x: tf.sigmoid(x) * tf.tanh(x)):  # Sin has a rule
        with pytest.raises(UnsupportedOpError, match=r"'Mul'.*not one of the activations") \
                as info:
            autolip_function(fn, SPEC6, certified=True)
        assert "not globally Lipschitz" not in str(info.value)


GRAPH_CONVS = {  # layer, input shape, whether the graph op is the layer's own convolution
    "conv2d_same": (lambda: L.Conv2D(4, 3, padding="same"), (9, 9, 3), True),
    "conv2d_strided_valid": (lambda: L.Conv2D(4, 3, strides=2), (10, 9, 3), True),
    "conv1d_same_strided": (lambda: L.Conv1D(3, 4, strides=2, padding="same"), (13, 2), True),
    "conv1d_causal": (lambda: L.Conv1D(3, 3, padding="causal"), (12, 2), False),  # Pad+VALID
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same"),
                  (9, 9, 3), True),
    "transposed": (lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same"), (5, 5, 4), True),
    "conv3d": (lambda: L.Conv3D(2, 2, padding="same"), (4, 4, 4, 2), True),
}


def _layer_and_graph_reports(layer, shape, rng, monkeypatch):
    """``layer → BatchNormalization`` (random scales), its certified Keras report and that of
    its graph, with the structured routes forced (no dense SVD, no exact chain route: the
    graph's ExpandDims/Squeeze around a Conv1D make its chain a product of factors, which that
    route would replace by the exact norm, below the Keras layer's structured bound)."""
    bn = L.BatchNormalization()
    model = keras.Sequential([keras.Input(shape), layer, bn])
    channels = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(0.2, 3.0, channels).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    monkeypatch.setattr(certify, "CHAIN_GRAM_LIMIT", 0)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip(certified=True)
    rep = autolip_function(tf.function(lambda x: model(x)), [tf.TensorSpec([None, *shape])],
                           certified=True, tol=1e-8)
    return model, keras_rep, rep


@pytest.mark.parametrize("name", list(GRAPH_CONVS))
def test_graph_convolutions_are_certified_like_their_layers(name, monkeypatch, rng):
    """Conv ops get the polyphase-FFT certificate of the Keras layers, a BatchNormalization
    after them folded in (across a Conv1D's ExpandDims/Squeeze too).

    A graph convolution had no certificate: too large to materialise (forced here), its group
    stayed an estimate, and a SavedModel CNN could not be certified.
    """
    make, shape, same_op = GRAPH_CONVS[name]
    model, keras_rep, rep = _layer_and_graph_reports(make(), shape, rng, monkeypatch)
    assert rep.certified and keras_rep.certified
    assert rep.upper >= exact_norm(model, shape) * (1 - 1e-9)
    if same_op:
        assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-9)
    else:
        assert rep.upper <= keras_rep.upper * 1.01


DILATED = {
    "conv2d_same": (lambda: L.Conv2D(4, 3, dilation_rate=2, padding="same"), (9, 9, 3)),
    "conv2d_valid": (lambda: L.Conv2D(4, 3, dilation_rate=(2, 3), padding="valid"), (12, 11, 3)),
    "conv2d_large_rate": (lambda: L.Conv2D(2, 3, dilation_rate=6, padding="same"), (13, 13, 2)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, dilation_rate=2, padding="same",
                                            depth_multiplier=2), (9, 9, 3)),
    "separable": (lambda: L.SeparableConv2D(4, 3, dilation_rate=2), (9, 9, 3)),
    "conv1d_causal": (lambda: L.Conv1D(4, 3, dilation_rate=2, padding="causal"), (17, 3)),
    "conv1d_same": (lambda: L.Conv1D(4, 3, dilation_rate=3, padding="same"), (16, 3)),
}


@pytest.mark.parametrize("name", list(DILATED))
def test_dilated_convolutions_are_certified_like_their_layers(name, monkeypatch, rng):
    """TensorFlow exports a dilated convolution as SpaceToBatchND → Conv2D → BatchToSpaceND:
    the convolution ran on a batch of sub-grids and had no certificate above the dense limit
    (the whole group stayed an estimate). The triple is now certified as the dilated
    convolution on the original grid, as the Keras layer is (a Conv1D's ExpandDims and
    Squeeze around the Conv2D included, and a causal Conv1D's Pad before the blocks); a
    SeparableConv2D's depthwise and pointwise parts as one operator."""
    make, shape = DILATED[name]
    model, keras_rep, rep = _layer_and_graph_reports(make(), shape, rng, monkeypatch)
    ops = {row.class_name for row in rep.layers}
    assert any("SpaceToBatchND" in op for op in ops)
    assert rep.certified
    exact = exact_norm(model.layers, shape)
    assert rep.upper >= exact * (1 - 1e-9)
    # exact up to the small-grid route's 1e-3 (a Conv1D on 17 steps included: the route now
    # takes 1-D grids up to 256 steps, and a graph's 1×N Conv2D as one)
    assert rep.upper <= exact * 1.0011
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-9)


def test_convolution_on_a_batch_of_images_gets_a_fourier_start():
    """A group that starts with a convolution on a batch of B images (I_B ⊗ A, certified as A
    since the dilated-convolution change) got A's Fourier start, shaped for one image: a
    ValueError when the solver reshaped it to the group's input (a review's reproducer). The
    start is now the same wave in every image; the estimate is A's norm."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 4, 4)).astype("float32")

    def f(x):  # x: (1, 2·28, 28, 4), two 28×28 images
        y = tf.nn.relu(tf.reshape(x, (2, 28, 28, 4)))
        return tf.reshape(tf.nn.relu(tf.nn.conv2d(y, kernel, 1, "SAME")), (1, -1))

    rep = autolip_function(tf.function(f), [tf.TensorSpec([1, 56, 28, 4])], tol=1e-6)
    conv = L.Conv2D(4, 3, padding="same", use_bias=False)
    conv.build((None, 28, 28, 4))
    conv.kernel.assign(kernel)
    assert rep.upper == pytest.approx(exact_norm(conv, (28, 28, 4)), rel=1e-5)


def test_scaling_per_image_does_not_fold_into_a_channels_first_batch_convolution():
    """A channels-first convolution on a batch of B images has the operator shape
    (B, C, H, W): its axis 0 is the batch, so a scaling per image after it must not fold in as
    a scaling per channel. It did (a review's reproducer): certified 0.61 times the norm."""
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 4)), tf.float32)
    scale = tf.constant(np.array([10.0, 0.1, 0.1, 0.1]).reshape(4, 1, 1, 1), tf.float32)

    def f(x):  # x: (1, 4·2, 8, 8): four 2-channel images
        y = tf.nn.conv2d(tf.reshape(x, (4, 2, 8, 8)), kernel, 1, "SAME", data_format="NCHW")
        return tf.reshape(y * scale, (1, -1))

    basis = np.eye(512, dtype="float32").reshape(512, 1, 8, 8, 8)
    exact = top_singular_value(np.stack([f(e).numpy().ravel() for e in basis], axis=1))
    rep = autolip_function(tf.function(f), [tf.TensorSpec([1, 8, 8, 8])], certified=True,
                           tol=1e-8)
    assert rep.certified
    assert rep.upper >= exact * (1 - 1e-6)


def test_convolution_then_pointwise_is_one_operator(monkeypatch, rng):
    """A depthwise convolution followed by a 1×1 convolution (a SeparableConv2D in a graph, or
    two layers without activation between) is certified as one separable operator: the
    product of the two norms was up to 30 % above."""
    monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    sep = keras.Sequential([keras.Input((9, 9, 3)), L.SeparableConv2D(4, 3)])
    keras_rep = tfl.LipschitzEstimator(sep, verbose=0, tol=1e-8).autolip(certified=True)
    rep = autolip_function(tf.function(lambda x: sep(x)), [tf.TensorSpec([None, 9, 9, 3])],
                           certified=True, tol=1e-8)
    assert rep.certified
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-9)
    pair = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(5, 3, padding="same"),
                             L.BatchNormalization(), L.Conv2D(4, 1)])
    _randomise_batch_norm(pair, rng)
    rep = tfl.LipschitzEstimator(pair, verbose=0, tol=1e-8).autolip(certified=True)
    exact = exact_norm(pair.layers, (8, 8, 3))
    separate = (exact_norm(pair.layers[:2], (8, 8, 3))
                * exact_norm(pair.layers[2], (8, 8, 5)))
    assert rep.certified
    assert exact * (1 - 1e-9) <= rep.upper <= exact * 1.01 < separate


GRAPH_POOLS = {
    "2d_k2": (lambda: L.AveragePooling2D(2), (8, 9, 3)),
    "2d_k3_s2_same": (lambda: L.AveragePooling2D(3, 2, padding="same"), (9, 7, 2)),
    "2d_rect_overlap": (lambda: L.AveragePooling2D((3, 2), (1, 2)), (7, 8, 2)),
    "1d_same": (lambda: L.AveragePooling1D(3, 2, padding="same"), (17, 3)),
    "3d_k3_s2_same": (lambda: L.AveragePooling3D(3, 2, padding="same"), (5, 4, 3, 2)),
}


@pytest.mark.parametrize("name", list(GRAPH_POOLS))
def test_graph_average_pooling_is_certified_like_its_layer(name, monkeypatch):
    """A graph's AvgPool / AvgPool3D had no certificate (a linear op left to the power method),
    so a group holding one stayed an estimate above the dense limit: a DenseNet121 SavedModel
    could not be certified. The op now gets the layer's closed form ``Π_d ‖A_d‖₂``, alone
    and in a chain (Conv → AvgPool → Flatten → Dense, dense route forced off)."""
    make, shape = GRAPH_POOLS[name]
    pool_only = keras.Sequential([keras.Input(shape), make()])
    rep = autolip_function(tf.function(lambda x: pool_only(x)), [tf.TensorSpec([None, *shape])],
                           certified=True)
    (row,) = [r for r in rep.layers if r.kind == "linear"]
    exact = exact_norm(pool_only.layers, shape)
    assert rep.certified and row.method == "closed-form"
    assert exact <= row.certificate <= exact * (1 + 1e-5)

    keras.utils.set_random_seed(3)
    conv = {3: L.Conv2D, 2: L.Conv1D, 4: L.Conv3D}[len(shape)](4, 2, padding="same")
    model = keras.Sequential([keras.Input(shape), conv, make(), L.Flatten(), L.Dense(3)])
    monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    monkeypatch.setattr(certify, "CHAIN_GRAM_LIMIT", 0)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip(certified=True)
    rep = autolip_function(tf.function(lambda x: model(x)), [tf.TensorSpec([None, *shape])],
                           certified=True, tol=1e-8)
    assert rep.certified and keras_rep.certified
    assert rep.upper >= exact_norm(model.layers, shape) * (1 - 1e-9)
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-9)


@pytest.mark.parametrize("pool,shape,size,blocks", [
    (lambda y: tf.nn.avg_pool2d(y, 2, 2, "SAME", data_format="NCHW"), (3, 6, 5), 27, None),
    (lambda y: tf.nn.avg_pool3d(y, 2, 1, "SAME"), (4, 4, 4, 2), 128, [2, 2, 2]),
], ids=["nchw", "3d-inside-space-to-batch"])
def test_graph_average_pooling_without_float64_kernel_in_a_chain_is_exact(pool, shape, size,
                                                                           blocks):
    """CPU has no float64 kernel for channels-first pooling, nor for AvgPool3D, also inside a
    SpaceToBatchND (the op sees a batch of 8): the small chain's dense route failed and it got
    the product of its members' certificates, 1.15 and 1.93 times the exact norm (a review's
    reproducers). The float64 map is now the Kronecker form, for every image of the op."""
    w = tf.constant(np.random.default_rng(1).standard_normal((size, 3)), tf.float32)

    def f(x):
        y = x if blocks is None else tf.space_to_batch(x, blocks, [[0, 0]] * len(blocks))
        y = pool(y)
        if blocks is not None:
            y = tf.compat.v1.batch_to_space_nd(y, blocks, [[0, 0]] * len(blocks))
        return tf.reshape(y, (-1, w.shape[0])) @ w

    exact = exact_norm(L.Lambda(f), shape)
    rep = autolip_function(tf.function(f), [tf.TensorSpec([None, *shape])], certified=True)
    assert rep.certified
    assert exact * (1 - 1e-9) <= rep.upper <= exact * 1.01


def test_function_reading_a_variable_it_writes_is_refused(tmp_path):
    """Freezing turns a variable into a constant holding its value before the call: a function
    that assigns a variable and then reads it was certified with the old value, 5 times too low
    here (reviews' reproducers; TensorFlow's public converter refuses such graphs). It raises
    now, also when the write is inside a call that freezing keeps, inside a ``tf.cond``, or in
    a SavedModel. A write that no output reads (a counter, ``c.assign(c + 1)``) changes no
    output and is accepted, as is a variable that is read and copied into another one."""
    v = tf.Variable(1.0)
    counter = tf.Variable(0)
    w, copy = tf.Variable(3.0), tf.Variable(0.0)

    @tf.function(experimental_attributes={"_noinline": True})
    def assign():
        v.assign(5.0)

    def stale(x):
        v.assign(5.0)
        return x * v

    def stale_nested(x):  # the write in a call that freezing keeps, the read outside
        assign()
        return x * v

    def stale_cond(x):
        tf.cond(tf.reduce_sum(x) > -1e30, lambda: v.assign(5.0), lambda: v.assign(5.0))
        return x * v

    def counting(x):
        counter.assign(counter + 1)
        copy.assign(w)  # w is written into another variable, not written
        return x * w

    spec = tf.TensorSpec([None, 3])
    assert float(tf.function(stale)(tf.ones((1, 3)))[0, 0]) == 5.0
    for fn in (stale, stale_nested, stale_cond):
        with pytest.raises(tfl.LipschitzError, match="writes a variable.*read of it"):
            autolip_function(tf.function(fn), [spec], certified=True)
    module = tf.Module()
    module.v = v
    module.f = tf.function(stale, input_signature=[spec])
    tf.saved_model.save(module, str(tmp_path / "stale"))
    with pytest.raises(tfl.LipschitzError, match="writes a variable.*read of it"):
        tfl.autolip_saved_model(str(tmp_path / "stale"))
    rep = autolip_function(tf.function(counting), [spec], certified=True)
    assert rep.certified and rep.upper == pytest.approx(3.0)


def test_ops_with_attributes_left_at_their_default_are_rebuilt():
    """A GraphDef leaves out attributes at their default value (GatherV2's ``batch_dims``,
    GatherNd's ``bad_indices_policy``); rebuilding such an op from its NodeDef raised a raw
    TypeError ("No argument found for attr batch_dims"), so any function gathering from a
    variable failed (a review's reproducer). The defaults are now filled in from the OpDef."""
    v = tf.Variable([1.0, -2.0, 3.0])
    for gather in (lambda: tf.gather(v, [2, 1, 0]), lambda: tf.gather_nd(v, [[2], [1], [0]])):
        rep = autolip_function(tf.function(lambda x: x * gather()), [tf.TensorSpec([None, 3])],
                               certified=True)
        assert rep.certified and rep.upper == pytest.approx(3.0)


def test_loop_in_a_saved_model_is_named_with_what_to_do(tmp_path):
    """A GRU's SavedModel runs a while loop, which the reader does not analyse: the error said
    only "the frozen graph has a cycle (a while loop that was not lowered)", and concrete
    functions' names showed as bytes (``b'__inference…'``). It now names the function and a
    node of the loop, and points to the .keras file."""
    model = keras.Sequential([keras.Input((5, 3)), L.GRU(4), L.Dense(2)])
    model.export(str(tmp_path / "gru"), verbose=False)
    with pytest.raises(tfl.LipschitzError, match="has a loop .*GRU or LSTM.*keras file") as info:
        tfl.autolip_saved_model(str(tmp_path / "gru"))
    assert "'gru:serving_default'" in str(info.value)  # was b'__inference_signature_wrapper…'
    assert "/while/" in str(info.value)  # a node of the loop, not one after it


def test_op_on_a_resource_is_named_with_what_to_do():
    """A ``tf.random.Generator`` in the function reads and advances its state, a resource that
    freezing turns into a constant: rebuilding its op raised a raw ``AssertionError:
    Unreachable`` (a review's reproducer). It is now an UnsupportedOpError naming the op and
    pointing to stateless random ops."""
    generator = tf.random.Generator.from_seed(1)
    w = tf.constant(np.eye(3, dtype="float32"))
    with pytest.raises(UnsupportedOpError, match="RngReadAndSkip.*resource.*stateless"):
        autolip_function(tf.function(lambda x: x @ w + generator.normal(tf.shape(x))),
                         [tf.TensorSpec([None, 3])])


def test_chain_of_closed_forms_keeps_their_exact_product():
    """A graph's batch normalisation is a ``Mul`` by per-channel constants then an ``Add``:
    two closed forms whose product (``max|c|``) is the exact norm. The small chain went to the
    dense route, whose certificate carries a rounding margin: 1e-6 above, on every BN of a
    DenseNet121 SavedModel (its graph value 1.8e-5 above the .keras one). The chain now keeps
    the smaller of the two."""
    scale = np.array([0.3, -1.7, 0.9], "float32")
    c, b = tf.constant(scale), tf.constant(np.array([0.1, 0.2, 0.3], "float32"))
    rep = autolip_function(tf.function(lambda x: tf.nn.relu(x * c + b)),
                           [tf.TensorSpec([None, 4, 4, 3])], certified=True)
    (row,) = [r for r in rep.layers if r.kind == "linear"]
    assert rep.certified
    assert row.certificate == float(np.max(np.abs(scale)))


def test_graph_average_pooling_3d_in_a_chain_is_exact():
    """TensorFlow has no float64 AvgPool3D kernel on CPU: a small graph Conv3D → AvgPool3D
    was certified by the product of the two norms (1.23 times the exact norm here). The op's
    float64 map is now the Kronecker product of its averaging matrices, and the chain's dense
    certificate is exact, as for the Keras layers."""
    keras.utils.set_random_seed(1)
    shape = (4, 5, 4, 2)
    model = keras.Sequential([keras.Input(shape), L.Conv3D(2, 2, padding="same"),
                              L.AveragePooling3D(2)])
    rep = autolip_function(tf.function(lambda x: model(x)), [tf.TensorSpec([None, *shape])],
                           certified=True, tol=1e-8)
    exact = exact_norm(model.layers, shape)
    assert rep.certified
    assert exact * (1 - 1e-9) <= rep.upper <= exact * 1.01


def test_freezing_skips_the_wrapped_function_and_keeps_its_graph(monkeypatch):
    """The reader freezes with TensorFlow's converter but does not wrap the frozen GraphDef
    into a new concrete function (14 of the 16 s that freezing VGG16 took): it prunes the
    GraphDef itself. Same nodes, inputs and outputs as the public function's; the public
    function is the fallback when the private converter is missing."""
    from tensorflow.python.framework import convert_to_constants

    model = _cnn()
    concrete = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec([None, 12, 12, 2]))
    public = convert_to_constants.convert_variables_to_constants_v2(concrete)
    frozen = tfgraph._freeze(concrete)
    assert (sorted(n.name for n in frozen.graph_def.node)
            == sorted(n.name for n in public.graph.as_graph_def().node))
    assert [(t.name, t.dtype, t.shape.as_list()) for t in frozen.inputs] == [
        (t.name, t.dtype, t.shape.as_list()) for t in public.inputs]
    assert [t.name for t in frozen.outputs] == [t.name for t in public.outputs]
    expected = autolip_function(concrete).upper

    # a TensorFlow whose converter module keeps only its public function
    monkeypatch.setattr(tfgraph, "convert_to_constants", types.SimpleNamespace(
        convert_variables_to_constants_v2=convert_to_constants.convert_variables_to_constants_v2))
    fallback = tfgraph._freeze(concrete)
    assert len(fallback.graph_def.node) == len(frozen.graph_def.node)
    assert autolip_function(concrete).upper == pytest.approx(expected, rel=1e-6)


def test_nested_calls_are_inlined_up_to_a_depth_then_named():
    """Calls that freezing keeps are inlined level by level. Past the depth limit, the loop
    stopped silently and the reader later failed on the call op with a misleading message;
    it now names the call and its function."""
    from tensorflow.python.framework import convert_to_constants

    @tf.function(experimental_attributes={"_noinline": True})
    def inner(x):
        return 2.0 * x

    @tf.function(experimental_attributes={"_noinline": True})
    def middle(x):
        return inner(x) + 1.0

    @tf.function
    def outer(x):
        return tf.nn.relu(middle(x))

    concrete = outer.get_concrete_function(tf.TensorSpec([None, 3]))
    graph_def = convert_to_constants.convert_variables_to_constants_v2(
        concrete).graph.as_graph_def()
    assert [n.op for n in graph_def.node].count("PartitionedCall") == 1
    inlined = tfgraph._inline_calls(graph_def, max_depth=2)
    assert not [n for n in inlined.node if n.op in tfgraph._CALLS]
    with pytest.raises(UnsupportedOpError, match="inner.*after 1 nested level"):
        tfgraph._inline_calls(graph_def, max_depth=1)
    assert autolip_function(outer, [tf.TensorSpec([None, 3])]).upper == pytest.approx(2.0)


def test_grouped_convolutions_are_inlined_and_certified_like_their_layers(tmp_path, rng):
    """Keras compiles a grouped Conv2D to a function call (``_XlaMustCompile``) that freezing
    keeps: reading such a graph raised an error (a review's RegNet and ConvNeXt SavedModels).
    The call is now inlined, and its Conv2D, whose kernel reads fewer channels than the input
    has, gets the grouped layer's certificate, the BatchNormalization after it folded in."""
    model = keras.Sequential([
        keras.Input((7, 7, 4)), L.Conv2D(6, 3, groups=2, padding="same"),
        L.BatchNormalization(), L.ReLU(), L.Conv2D(6, 3, strides=2, groups=3),
    ])
    _randomise_batch_norm(model, rng)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip(certified=True)
    model.export(str(tmp_path / "saved"), verbose=False)
    rep = tfl.autolip_saved_model(str(tmp_path / "saved"), certified=True, tol=1e-8)
    assert rep.certified and keras_rep.certified
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-6)
    norms = [(row.norm, row.certificate) for row in rep.layers if row.norm is not None]
    keras_norms = [(row.norm, row.certificate) for row in keras_rep.layers
                   if row.norm is not None]
    assert np.allclose(norms, keras_norms, rtol=1e-6)
    # the strided grouped convolution is small: exact, its float64 matrix built column by
    # column (Conv2DBackpropInput has no float64 grouped kernel on CPU)
    assert norms[1][1] == pytest.approx(exact_norm(model.layers[3], (7, 7, 6)), rel=1e-6)
    assert norms[0][1] >= exact_norm(model.layers[:2], (7, 7, 4)) * (1 - 1e-9)


def test_nested_calls_are_inlined():
    """A call inside an inlined function body is inlined in its turn; the function's value is
    unchanged by the inlining."""
    conv = L.Conv2D(4, 3, groups=2)
    conv.build((None, 6, 6, 4))

    @tf.function(jit_compile=True)
    def inner(x):
        return conv(x) * 2.0

    @tf.function(experimental_attributes={"_noinline": True})
    def outer(x):
        return inner(x) + x[:, 1:-1, 1:-1, :]

    est = GraphEstimator(tf.function(lambda x: outer(x)), [tf.TensorSpec([None, 6, 6, 4])],
                         tol=1e-8)
    calls = [n for n in est._reader.graph_def.node if n.op in tfgraph._CALLS]
    assert not calls
    x = tf.random.normal([2, 6, 6, 4])
    np.testing.assert_allclose(est.model_function()(x).numpy().reshape(2, -1),
                               outer(x).numpy().reshape(2, -1), rtol=1e-5, atol=1e-6)
    rep = est.autolip(certified=True)
    basis = np.concatenate([np.zeros((1, 144)), np.eye(144)]).reshape(145, 6, 6, 4)
    y = outer(tf.constant(basis, tf.float32)).numpy().reshape(145, -1).astype(np.float64)
    assert rep.upper >= top_singular_value((y[1:] - y[:1]).T) * (1 - 1e-6)


def test_reading_a_graph_does_not_copy_its_weights_into_new_graphs(monkeypatch):
    """The replays that evaluate the tensors and check the batch feed the frozen weights as
    captured tensors: embedded as constants of each replay, VGG16's 528 MB of weights took
    the reading to 17.6 GB and 92 s (9.6 GB and 5 s now)."""
    built = []
    once = tfgraph._once

    def spy(fn, specs):
        wrapped = once(fn, specs)
        built.append(wrapped.graph.as_graph_def())
        return wrapped

    monkeypatch.setattr(tfgraph, "_once", spy)
    model = keras.Sequential([keras.Input((40,)), L.Dense(50, activation="relu"), L.Dense(3)])
    rep = autolip_function(tf.function(lambda x: model(x)), [tf.TensorSpec([None, 40])])
    assert len(built) >= 2 and rep.upper > 0
    sizes = [tf.make_ndarray(n.attr["value"].tensor).size for g in built for n in g.node
             if n.op == "Const"]
    # no weight matrix (40×50 = 2000 entries) among the replays' constants (TensorFlow still
    # inlines captured tensors of at most 128 entries, such as the biases)
    assert max(sizes) <= 128


def test_certifying_a_graph_does_not_warn_of_retracing(caplog):
    """Each op's function is traced for its shapes and for float64: TensorFlow counted them
    together (one code object) and logged "triggered tf.function retracing" warnings that
    blamed the user's code."""
    inputs = keras.Input((12, 12, 1))
    x = L.BatchNormalization()(L.Conv2D(4, 3, activation="relu")(inputs))
    x = L.Conv2D(4, 3, activation="relu")(L.MaxPooling2D()(x))
    x = L.Dense(6, activation="relu")(L.Flatten()(x))
    model = keras.Model(inputs, L.Dense(3)(x))
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        report = autolip_function(tf.function(lambda t: model(t)),
                                  [tf.TensorSpec([None, 12, 12, 1])], certified=True)
        report.to_dict()
    assert report.certified
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def test_saved_model_cnn_is_certified(tmp_path, rng):
    """The user trial's CNN, Conv2D(relu) -> BatchNormalization on 28×28 (784 × 10816, above
    the dense limit): its SavedModel stayed an estimate, now certified as its .keras file."""
    inputs = keras.Input((28, 28, 1))
    x = L.BatchNormalization(name="bn")(L.Conv2D(16, 3, activation="relu")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(L.MaxPooling2D(4)(x))))
    model.get_layer("bn").gamma.assign(rng.uniform(0.2, 3.0, 16).astype("float32"))
    model.export(str(tmp_path / "cnn"), verbose=False)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip(certified=True)
    rep = tfl.autolip_saved_model(str(tmp_path / "cnn"), certified=True, tol=1e-8)
    assert rep.certified and keras_rep.certified
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-6)


@pytest.mark.parametrize("low, high", [(-2.5, 1.8), (0.05, 0.3)], ids=["wide", "leaky"])
@pytest.mark.parametrize("shared", [None, [1, 2]], ids=["per-entry", "per-channel"])
def test_prelu_in_a_graph_has_the_layer_constant(low, high, shared):
    """Keras' PReLU exports as ``relu(x) + (−α)·relu(−x)``: constant ``max(1, max|α|)``.

    The two branches were bounded apart, ``1 + max|α|``: the graph bound of this model was
    above the Keras-level one (1.9× for α in [0.05, 0.3]).
    """
    inp = keras.Input((5, 5, 2))
    prelu = L.PReLU(shared_axes=shared, name="prelu")
    out = L.Dense(2)(L.Flatten()(prelu(L.Conv2D(3, 3, padding="same")(inp))))
    model = keras.Model(inp, out)
    alpha = np.random.default_rng(0).uniform(low, high, prelu.alpha.shape).astype("float32")
    prelu.alpha.assign(alpha)
    # ground truth of the activation: its secants through 0, entry by entry
    ones = np.ones((1, *prelu.input.shape[1:]), "float32")
    slopes = np.concatenate([np.asarray(prelu(ones)), -np.asarray(prelu(-ones))])
    keras_rep = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip()
    rep = autolip_function(tf.function(lambda x: model(x)), [tf.TensorSpec([None, 5, 5, 2])],
                           tol=1e-8)
    [row] = [r for r in rep.layers if "prelu" in r.note]
    assert row.lipschitz == pytest.approx(max(1.0, float(np.abs(slopes).max())), rel=1e-7)
    assert row.bound_kind == "certified"
    assert rep.upper == pytest.approx(keras_rep.upper, rel=1e-6)


@pytest.mark.parametrize("fn, truth", [
    (lambda h: tf.nn.relu(h) + 2.0 * tf.nn.relu(h), 3.0),  # no negation: slopes 0 and 3
    (lambda h: tf.nn.relu(h) + 2.0 * tf.nn.relu(-tf.nn.relu(h)), 1.0),  # relu(-relu) = 0
    (lambda h: tf.nn.relu(h) + 0.5 * tf.nn.relu(-2.0 * h), 1.0),  # not relu(-h): slope 1
], ids=["same-side", "other-source", "scaled-negation"])
def test_sums_of_relus_that_are_not_prelu_are_bounded_branch_by_branch(fn, truth):
    w = np.random.default_rng(3).standard_normal((6, 4)).astype("float32")
    rep = autolip_function(lambda x: fn(x @ w), SPEC6)
    assert not any("prelu" in r.note for r in rep.layers)
    assert rep.upper >= top_singular_value(w) * truth * (1 - 1e-6)
    assert _slope_sup(fn) == pytest.approx(truth)


def test_broadcast_operands_of_merges_count_their_copies():
    """A merged operand broadcast to N/n copies enters with its constant times √(N/n).

    x + sum(x) gave 5 (exact 17), sum(x) − x 5 (exact 15), the Keras x + mean(x) 1.25 (exact 2),
    max(x, sum(x)) 4.12 (Jacobian norm 16 at x = 1), a (16,) + b (1,) √2 (exact √17).
    """
    spec = tf.TensorSpec([None, 16], tf.float32)
    for fn, exact in [(lambda x: x + tf.reduce_sum(x, -1, keepdims=True), 17.0),
                      (lambda x: tf.reduce_sum(x, -1, keepdims=True) - x, 15.0)]:
        dense = LinearOperator(fn, (16,)).to_dense()
        assert top_singular_value(dense) == pytest.approx(exact, rel=1e-6)
        rep = autolip_function(fn, spec, certified=True)
        assert rep.upper >= exact * (1 - 1e-6) and rep.upper == pytest.approx(17.0, rel=1e-6)

    inp = keras.Input((16, 1))
    model = keras.Model(inp, L.Add()([inp, L.GlobalAveragePooling1D(keepdims=True)(inp)]))
    jacobian = np.asarray(model(np.eye(16, dtype="float32")[:, :, None])).reshape(16, 16)
    rep = autolip_function(tf.function(lambda x: model(x)), tf.TensorSpec([None, 16, 1]),
                           certified=True)
    assert rep.certified and rep.upper == pytest.approx(top_singular_value(jacobian), rel=1e-6)  # 2

    def maximum(x):
        return tf.maximum(x, tf.reduce_sum(x, -1, keepdims=True))

    x = tf.ones((1, 16), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = maximum(x)
    jacobian_norm = top_singular_value(tape.jacobian(y, x).numpy().reshape(16, 16))  # 16
    assert autolip_function(maximum, spec).upper >= jacobian_norm * (1 - 1e-6)

    two = [tf.TensorSpec([None, 16], tf.float32), tf.TensorSpec([None, 1], tf.float32)]
    rep = autolip_function(lambda a, b: a + b, two)
    exact = top_singular_value(np.concatenate([np.eye(16), np.ones((16, 1))], axis=1))  # √17
    assert rep.upper == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("fn, a", [
    (lambda x: tf.maximum(x, tf.zeros((1, 16))), 1.0),
    (lambda x: tf.minimum(tf.ones((16,)), x), -1.0),
    (lambda x: x + tf.zeros((1, 16)), 0.0),
], ids=["maximum", "minimum", "add"])
def test_constant_operand_that_broadcasts_the_input(fn, a):
    """x (one entry) against 16 constants: 16 copies of a 1-Lipschitz map of x, exactly 4.

    Maximum and Minimum gave 1; the sum was measured (4.000004), now the closed form √16.
    """
    spec = tf.TensorSpec([None, 1], tf.float32)
    secant = float(np.linalg.norm(fn(tf.constant([[a + 1.0]])) - fn(tf.constant([[a]]))))
    assert secant == pytest.approx(4.0)
    rep = autolip_function(fn, spec, certified=True)
    assert rep.certified and rep.upper == pytest.approx(4.0, rel=1e-9)


def test_registered_elementwise_op_counts_broadcast_copies():
    """A registered binary elementwise op whose dependent operand is broadcast 16 times."""
    tfgraph.register_op_rule("Atan2", tfgraph.elementwise_rule(1.0))  # |∂ atan2(y, 1)/∂y| ≤ 1
    try:
        fn = lambda y: tf.math.atan2(y, tf.ones((1, 16)))  # noqa: E731
        x = tf.constant([[1e-4]])
        secant = float(np.linalg.norm(fn(x) - fn(-x))) / 2e-4  # ≈ 4 (slope 1 at 0, 16 copies)
        rep = autolip_function(fn, tf.TensorSpec([None, 1], tf.float32))
        assert rep.upper >= secant and rep.upper == pytest.approx(4.0)
    finally:
        tfgraph._OP_RULES.pop("Atan2")


def test_merges_follow_autolip_rules():
    rng = np.random.default_rng(4)
    a, b, c = (rng.standard_normal((6, 5)).astype("float32") for _ in range(3))
    sa, sb, sc = top_singular_value(a), top_singular_value(b), top_singular_value(c)

    def f(x):
        left = tf.nn.relu(x @ a)
        joined = tf.concat([left, x @ b], axis=-1)  # √(La² + Lb²)
        summed = tf.nn.relu(x @ c) + left  # Lc + La
        return {"joined": joined, "summed": tf.maximum(summed, x @ c)}  # √((Lc+La)² + Lc²)

    rep = autolip_function(f, SPEC6)
    joined = math.hypot(sa, sb)
    summed = math.hypot(sc + sa, sc)
    assert rep.outputs["joined"] == pytest.approx(joined, rel=1e-4)
    assert rep.outputs["summed"] == pytest.approx(summed, rel=1e-4)
    assert rep.upper == pytest.approx(math.hypot(joined, summed), rel=1e-4)


@pytest.fixture(scope="module")
def exported_mlp(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = _mlp()
    path = str(tmp_path_factory.mktemp("mlp") / "exported")
    model.export(path, verbose=False)
    return model, GraphEstimator.from_saved_model(path)


def test_graph_function_is_the_model(exported_mlp):
    model, est = exported_mlp
    x = np.random.default_rng(5).standard_normal((4, 7)).astype("float32")
    np.testing.assert_allclose(est.model_function()(tf.constant(x)), model(x), atol=1e-6)


def test_certified_graph_bound_is_exact_on_small_operators(exported_mlp):
    _, est = exported_mlp
    estimate = est.autolip()
    certified = est.autolip(certified=True)
    assert certified.certified and not estimate.certified
    assert certified.upper == pytest.approx(estimate.upper, rel=1e-5)
    for row in certified.layers:
        if row.kind == "linear":
            assert row.certificate >= row.norm * (1 - 1e-6)


def test_fused_batch_norm_at_inference():
    """FusedBatchNormV3 (no float64 kernel) fused with a conv: the bias-free affine part."""
    rng = np.random.default_rng(9)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype("float32")
    scale, offset, mean = (rng.standard_normal(4).astype("float32") for _ in range(3))
    variance = rng.uniform(0.5, 2.0, 4).astype("float32")

    def conv_bn(x, center=True):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(
            y, scale, offset if center else 0 * offset, mean if center else 0 * mean, variance,
            epsilon=1e-3, is_training=False)[0]

    est = GraphEstimator(conv_bn, tf.TensorSpec([None, 5, 5, 2]))
    assert [r.class_name for r in est.autolip().layers][-1] == "Conv2D+FusedBatchNormV3"
    linear = LinearOperator(lambda x: conv_bn(x, center=False), (5, 5, 2)).to_dense()
    assert est.autolip().upper == pytest.approx(top_singular_value(linear), rel=1e-4)
    # Certified mode: no float64 matrix of the pair, but the convolution has its own
    # certificate, into which the scaling (read from the op in float32) folds: the exact norm
    # of the pair (it stayed an estimate, then was certified apart, ‖conv‖·max|s|)
    report = est.autolip(certified=True)
    conv = LinearOperator(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"), (5, 5, 2)).to_dense()
    apart = top_singular_value(conv) * float(np.max(np.abs(scale) / np.sqrt(variance + 1e-3)))
    assert report.certified and report.upper >= top_singular_value(linear) * (1 - 1e-6)
    assert report.upper == pytest.approx(top_singular_value(linear), rel=1e-5) and report.upper < apart


@pytest.mark.slow
def test_lower_bound_is_below_upper(exported_mlp):
    _, est = exported_mlp
    x = np.random.default_rng(5).standard_normal((4, 7)).astype("float32")
    lower = est.lower_bound(x=x, n_random=4, steps=10)
    assert 0 < lower.value <= est.autolip().upper * (1 + 1e-6)


def test_products_of_input_dependent_tensors_are_not_lipschitz():
    w = np.ones((6, 6), "float32")
    with pytest.raises(NotLipschitzError, match="Mul"):
        autolip_function(lambda x: (x @ w) * (x @ w + 1.0), SPEC6)
    with pytest.raises(NotLipschitzError, match="BatchMatMul|MatMul"):
        autolip_function(lambda x: tf.matmul(x[:, :, None], x[:, None, :]), SPEC6)
    with pytest.raises(NotLipschitzError, match="exponential"):
        autolip_function(tf.exp, SPEC6)
    with pytest.raises(NotLipschitzError, match="not a recognised activation"):
        autolip_function(lambda x: x * x, SPEC6)


def test_unsupported_op_names_type_and_node_and_can_be_registered():
    # asinh is 1-Lipschitz (1/√(1 + x²) ≤ 1) and has no built-in rule
    with pytest.raises(UnsupportedOpError, match=r"'Asinh' \(node '.*Asinh.*'\).*register_op_rule"):
        autolip_function(lambda x: tf.asinh(2.0 * x), SPEC6)
    tfgraph.register_op_rule("Asinh", tfgraph.elementwise_rule(1.0))
    try:
        assert autolip_function(lambda x: tf.asinh(2.0 * x), SPEC6).upper == pytest.approx(2.0)
    finally:
        tfgraph._OP_RULES.pop("Asinh")


def test_non_float_input_and_unknown_dimensions():
    with pytest.raises(ModelNotBuiltError, match="int32"):
        autolip_function(lambda t: tf.cast(t, tf.float32) * 2.0,
                         tf.TensorSpec([None, 6], tf.int32))
    kernel = np.random.default_rng(6).standard_normal((3, 3, 1, 2)).astype("float32")

    def conv(x):
        return tf.nn.conv2d(x, kernel, 1, "SAME")

    spec = tf.TensorSpec([None, None, None, 1])
    with pytest.raises(ModelNotBuiltError, match="unknown dimensions"):
        autolip_function(conv, spec)
    rep = autolip_function(conv, spec, input_shape=(5, 5, 1))
    assert rep.upper == pytest.approx(top_singular_value(LinearOperator(conv, (5, 5, 1)).to_dense()),
                                      rel=1e-4)


def test_tf_saved_model_save_with_named_signature(tmp_path):
    class Scorer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.random.default_rng(7).standard_normal((6, 3)), dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="features")])
        def score(self, x):
            return {"scores": tf.nn.sigmoid(x @ self.w), "label": tf.argmax(x @ self.w, -1)}

    module = Scorer()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"score": module.score})
    with pytest.raises(KeyError, match="available signatures: score"):
        GraphEstimator.from_saved_model(str(tmp_path / "sm"), "serving_default")
    with pytest.warns(UserWarning, match="label"):
        est = GraphEstimator.from_saved_model(str(tmp_path / "sm"))
    rep = est.autolip()
    assert rep.settings["skipped_outputs"] == ["label"]
    assert rep.upper == pytest.approx(0.25 * top_singular_value(module.w.numpy()), rel=1e-5)


def test_bfloat16_graph_with_constants():
    """Scalar bfloat16 constants (gelu's) are read; they raised a NumPy ValueError."""
    w = np.random.default_rng(8).standard_normal((6, 4)).astype("float32")
    rep = autolip_function(lambda x: tf.nn.gelu(x @ tf.cast(w, tf.bfloat16)),
                           tf.TensorSpec([None, 6], tf.bfloat16))
    rounded = tf.cast(tf.cast(w, tf.bfloat16), tf.float32).numpy()
    assert rep.upper == pytest.approx(top_singular_value(rounded) * activation_info("gelu").lipschitz,
                                      rel=1e-3)


def test_half_precision_graph_is_measured_in_float32():
    w = np.random.default_rng(8).standard_normal((6, 4)).astype("float16")
    rep = autolip_function(lambda x: tf.nn.relu(x @ w), tf.TensorSpec([None, 6], tf.float16))
    assert rep.upper == pytest.approx(top_singular_value(w.astype("float32")), rel=1e-3)


def _fused_batch_norm(scale, variance, zero):
    def f(x):
        return tf.compat.v1.nn.fused_batch_norm(x, scale, zero, zero, variance, epsilon=1e-3,
                                                is_training=False)[0]
    return f


def test_fused_batch_norm_bound_covers_the_float32_scale_the_op_multiplies_by():
    # The closed form was the exact float64 |γ|/√(var+ε); TensorFlow multiplies by the float32
    # rsqrt(var + ε)·γ, which can round above it (certified 0.5591991998 for 0.5591992736).
    rng = np.random.default_rng(0)
    zero = tf.constant([0.0])
    for _ in range(200):  # a channel whose float32 slope rounds above the exact one
        var = np.float32(rng.uniform(0.01, 4.0))
        gamma = np.float32(rng.uniform(0.5, 2.0))
        f = _fused_batch_norm(tf.constant([gamma]), tf.constant([var]), zero)

        ones = tf.ones([1, 1, 1, 1])
        slope = float(f(ones)[0, 0, 0, 0] - f(0 * ones)[0, 0, 0, 0])
        exact = float(gamma) / math.sqrt(float(var) + 1e-3)
        if slope > exact * (1 + 2 ** -30):
            break
    else:
        pytest.skip("no channel rounds up on this machine")
    report = tfl.autolip_function(
        tf.function(f, input_signature=[tf.TensorSpec([None, 1, 1, 1], tf.float32)]),
        certified=True)
    assert report.certified and report.upper >= slope


def test_graph_average_pooling_over_channels_is_refused_by_name():
    # TensorFlow's CPU kernel returns an empty tensor for a channel window; the reader failed
    # with a raw graph-execution error while checking its examples.
    @tf.function
    def pool(x):
        return tf.nn.avg_pool(x, ksize=[1, 1, 1, 2], strides=[1, 1, 1, 2], padding="VALID")

    with pytest.raises(UnsupportedOpError, match=r"'AvgPool'.*batch or channel axis "
                                                  r"\(ksize=\[1, 1, 1, 2\]"):
        tfl.autolip_function(pool, tf.TensorSpec((None, 4, 4, 4)))


def test_graph_errors_from_a_user_trial_say_what_to_do():
    spec = tf.TensorSpec((None, 4))
    # a lowered tf.cond: control flow, not an op to register a rule for
    with pytest.raises(UnsupportedOpError, match=r"'Switch'.*control flow"):
        tfl.autolip_function(
            lambda x: tf.cond(tf.constant(True), lambda: 2.0 * x, lambda: x), spec)
    # a reshape that merges the examples of a batch fails at batch 1: named, not a raw error
    with pytest.raises(tfl.LipschitzError, match=r"fails on a batch of one example.*"
                                                 r"divisible by 8"):
        tfl.autolip_function(lambda x: tf.reshape(x, [-1, 8]), spec)
    # a cast to complex is exact, but complex values are not analysed
    with pytest.raises(UnsupportedOpError, match=r"'Cast'.*complex64.*real-valued"):
        tfl.autolip_function(lambda x: tf.math.real(tf.cast(x, tf.complex64)), spec)
