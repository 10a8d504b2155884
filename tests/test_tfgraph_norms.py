"""Euclidean norms and the celu / squareplus activations in TensorFlow graphs (tfgraph).

Ground truths: the exact norm (SVD) of the stacked matrix of the terms of a norm, the largest
dense float64 Jacobian norm over sampled points (a lower bound every upper bound must exceed),
the .keras analysis of the same model (``STFTSpectrogram(mode="magnitude")``, Dense → celu
or squareplus), and for the fused ``EuclideanNorm`` (``tf.math.reduce_euclidean_norm``) the
same norm written as √(Σ squares). Near misses of each structure must stay refused.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.errors import NotLipschitzError
from tf_lipschitz.rules.base import Merge
from tf_lipschitz.tfgraph import BatchMixingError, UnsupportedOpError, autolip_function

from groundtruth import top_singular_value

_RNG = np.random.default_rng(21)
# float32 values, so that the float64 ground truth is that of the graph's float32 weights
_W1 = _RNG.standard_normal((5, 4)).astype("float32").astype("float64")
_W2 = _RNG.standard_normal((5, 4)).astype("float32").astype("float64")
SPEC = tf.TensorSpec([None, 5], tf.float32)


def _w(w, x):
    return tf.constant(w, x.dtype)


def _sampled_jacobian_norm(fn, shape, points=30, scale=2.0) -> float:
    """Largest dense float64 Jacobian norm of ``fn`` over random points of shape ``(1, *shape)``."""
    best = 0.0
    for _ in range(points):
        x = tf.constant(scale * _RNG.standard_normal((1, *shape)), tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        jac = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1)
        best = max(best, top_singular_value(jac))
    return best


# name: (function, exact Lipschitz constant or None, bound expected)
NORMS = {
    # (a, b) ↦ √(a² + b²) of two linear maps of x: ‖[W1 W2]‖ (stacked), below √(‖W1‖² + ‖W2‖²)
    "two_terms": (lambda x: tf.sqrt(tf.square(x @ _w(_W1, x)) + tf.square(x @ _w(_W2, x))),
                  top_singular_value(np.hstack([_W1, _W2]))),
    "two_terms_epsilon": (
        lambda x: tf.sqrt(tf.square(x @ _w(_W1, x)) + tf.square(x @ _w(_W2, x)) + 1e-3),
        top_singular_value(np.hstack([_W1, _W2]))),
    "two_terms_floor": (  # as Keras' STFTSpectrogram: √max(re² + im², ε)
        lambda x: tf.sqrt(tf.maximum(tf.square(x @ _w(_W1, x) + 1.0)
                                     + tf.square(x @ _w(_W2, x)), 1e-7)),
        top_singular_value(np.hstack([_W1, _W2]))),
    "tf_norm": (lambda x: tf.norm(x @ _w(_W1, x), axis=-1), top_singular_value(_W1)),
    "norm_of_rows": (  # per row of a (4, 4) reshape: groups of 4 entries, Sum over an axis
        lambda x: tf.norm(tf.reshape(x @ _w(np.hstack([_W1, _W2, _W1, _W2]), x), (-1, 4, 4)),
                          axis=1),
        None),
    "sum_plus_one": (lambda x: tf.sqrt(tf.reduce_sum(x * x, axis=-1) + 1.0), 1.0),
    "one_term_same_tensor_twice": (  # √(a² + a²) = √2|a|
        lambda x: tf.sqrt(tf.square(x @ _w(_W1, x)) + tf.square(x @ _w(_W1, x))),
        math.sqrt(2.0) * top_singular_value(_W1)),
    "abs_as_sqrt_of_square": (lambda x: tf.sqrt(tf.square(x)), 1.0),
    "halves": (lambda x: tf.sqrt(tf.square(x[:, :2]) + tf.square(x[:, 3:])), 1.0),
    # |re + i·im| of a complex tensor made from real ones (ComplexAbs of Complex)
    "complex_abs": (lambda x: tf.abs(tf.complex(x @ _w(_W1, x), x @ _w(_W2, x))),
                    top_singular_value(np.hstack([_W1, _W2]))),
    "complex_abs_constant_part": (
        lambda x: tf.abs(tf.complex(x @ _w(_W1, x), tf.ones((1, 4), x.dtype))),
        top_singular_value(_W1)),
    # the fused op of tf.math.reduce_euclidean_norm: the norm of its one term, 1 (‖W‖ after x @ W)
    "reduce_euclidean_norm": (lambda x: tf.math.reduce_euclidean_norm(x @ _w(_W1, x), -1),
                              top_singular_value(_W1)),
    "reduce_euclidean_norm_keepdims": (
        lambda x: tf.math.reduce_euclidean_norm(x @ _w(_W1, x), 1, keepdims=True),
        top_singular_value(_W1)),
    "reduce_euclidean_norm_alone": (lambda x: tf.math.reduce_euclidean_norm(x, [1]), 1.0),
    "reduce_euclidean_norm_rows": (  # groups of 4 entries, as norm_of_rows
        lambda x: tf.math.reduce_euclidean_norm(
            tf.reshape(x @ _w(np.hstack([_W1, _W2, _W1, _W2]), x), (-1, 4, 4)), 1),
        None),
    "reduce_euclidean_norm_all_axes": (  # every axis of an example: ‖x M‖, M the 5 × 16 map
        lambda x: tf.math.reduce_euclidean_norm(
            tf.reshape(x @ _w(np.hstack([_W1, _W2, _W1, _W2]), x), (-1, 4, 4)), [-2, -1]),
        top_singular_value(np.hstack([_W1, _W2, _W1, _W2]))),
    # no axes, or an axis of size 1: TensorFlow returns |x W1| (entrywise), Lipschitz ‖W1‖
    "reduce_euclidean_norm_no_axes": (
        lambda x: tf.math.reduce_euclidean_norm(x @ _w(_W1, x), tf.constant([], tf.int32)),
        top_singular_value(_W1)),
    "reduce_euclidean_norm_size_one_axis": (
        lambda x: tf.math.reduce_euclidean_norm(tf.reshape(x @ _w(_W1, x), (-1, 4, 1)), -1,
                                                keepdims=True),
        top_singular_value(_W1)),
}


@pytest.mark.parametrize("fn, exact", NORMS.values(), ids=NORMS.keys())
def test_euclidean_norms_are_bounded_by_their_stacked_terms(fn, exact):
    rep = autolip_function(fn, SPEC, tol=1e-9)
    sampled = _sampled_jacobian_norm(fn, (5,))
    assert sampled <= rep.upper * (1 + 1e-6)
    if exact is not None:
        assert rep.upper == pytest.approx(exact, rel=1e-6)
    assert any("Euclidean norm" in row.note for row in rep.layers)
    certified = autolip_function(fn, SPEC, certified=True)
    assert certified.certified and certified.upper >= rep.upper * (1 - 1e-9)
    if exact is not None:  # a certificate is the exact norm rounded up (SAFETY_MARGIN)
        assert exact * (1 - 1e-12) <= certified.upper <= exact * (1 + 1e-5)


_MAP = np.hstack([_W1, _W2, _W1, _W2])
_SHAPED = SPEC, (lambda x: tf.reshape(x @ _w(_MAP, x), (-1, 2, 4, 2)))


@pytest.mark.parametrize("axis, keepdims, axes", [
    ((1,), False, [1]), ((-1,), True, [3]), ((-3, 3), False, [1, 3]), ((1, 2, 3), True, [1, 2, 3]),
    ((), False, None), ((-2, 1), True, [1, 2]),
], ids=["1", "-1_keepdims", "-3_3", "all_keepdims", "none", "-2_1_keepdims"])
def test_reduce_euclidean_norm_is_bounded_as_its_sum_of_squares(axis, keepdims, axes):
    """The fused op and the same norm from primitive ops, √(Σ x²) over the same axes, get the
    same bound (both the norm of the linear map before them); the note names the axes read."""
    spec, shaped = _SHAPED
    fused = lambda x: tf.math.reduce_euclidean_norm(  # noqa: E731
        shaped(x), tf.constant(axis, tf.int32), keepdims=keepdims)
    rep = autolip_function(fused, spec, tol=1e-9)
    primitive = autolip_function(lambda x: tf.sqrt(tf.reduce_sum(
        tf.square(shaped(x)), tf.constant(axis, tf.int32), keepdims=keepdims)), spec, tol=1e-9)
    assert rep.upper == pytest.approx(primitive.upper, rel=1e-9)
    assert rep.upper == pytest.approx(top_singular_value(_MAP), rel=1e-6)
    assert _sampled_jacobian_norm(fused, (5,)) <= rep.upper * (1 + 1e-6)
    (note,) = [row.note for row in rep.layers if row.class_name == "EuclideanNorm"]
    assert (f"over axes {axes}" if axes else "over no axes") in note
    assert ("keep_dims" in note) == keepdims
    assert rep.layers[-1].output_shape == fused(tf.zeros((1, 5))).shape[1:]


@pytest.mark.parametrize("fn", [
    lambda x: tf.math.reduce_euclidean_norm(x),
    lambda x: tf.math.reduce_euclidean_norm(x, 0, keepdims=True),
    lambda x: tf.math.reduce_euclidean_norm(x @ _w(_W1, x), [-2, -1], keepdims=True),
], ids=["axis_none", "batch_axis_keepdims", "all_axes_negative"])
def test_reduce_euclidean_norm_over_the_batch_axis_mixes_examples(fn):
    with pytest.raises(BatchMixingError, match="EuclideanNorm"):
        autolip_function(fn, SPEC)


def test_reduce_euclidean_norm_refusals():
    # axes that depend on the input (1 at every input of this scale, but not a constant)
    moving = lambda x: tf.math.reduce_euclidean_norm(  # noqa: E731
        x, tf.cast(x[0, 0] > 1e30, tf.int32) + 1)
    with pytest.raises(UnsupportedOpError, match="'EuclideanNorm'.*axes depend on the input"):
        autolip_function(moving, SPEC)
    # a complex input: its norm is complex-typed
    complex_norm = lambda x: tf.abs(tf.math.reduce_euclidean_norm(  # noqa: E731
        tf.complex(x @ _w(_W1, x), x @ _w(_W2, x)), -1))
    with pytest.raises(UnsupportedOpError, match="'EuclideanNorm'.*complex64"):
        autolip_function(complex_norm, SPEC)
    # integers: the norm is rounded (the cast that made them is not Lipschitz either)
    integers = lambda x: tf.cast(tf.math.reduce_euclidean_norm(  # noqa: E731
        tf.cast(x, tf.int32), -1), tf.float32)
    with pytest.raises(NotLipschitzError, match="'EuclideanNorm'.*int32"):
        autolip_function(integers, SPEC)


def test_exported_dense_then_reduce_euclidean_norm(tmp_path):
    model = _dense_then(keras.layers.Lambda(
        lambda h: tf.math.reduce_euclidean_norm(h, -1, keepdims=True)))
    model.export(str(tmp_path / "saved"), verbose=False)
    rep = tfl.autolip_saved_model(str(tmp_path / "saved"), certified=True)
    kernel = model.layers[1].kernel.numpy().astype(np.float64)
    exact = top_singular_value(kernel)
    assert rep.certified and exact * (1 - 1e-6) <= rep.upper <= exact * (1 + 1e-5)
    assert any("EuclideanNorm" in row.note for row in rep.layers)


def test_norm_of_terms_not_linear_in_one_tensor_takes_root_sum_of_squares():
    """√(relu(xW1)² + (xW2)²): the relu branch is not linear, so the terms' constants combine
    as √(L₁² + L₂²) (valid for branches of one input: Σ‖Δa_j‖² ≤ Σ L_j² ‖Δx‖²)."""
    fn = lambda x: tf.sqrt(tf.square(tf.nn.relu(x @ _w(_W1, x)))  # noqa: E731
                           + tf.square(x @ _w(_W2, x)))
    rep = autolip_function(fn, SPEC, tol=1e-9)
    expected = math.hypot(top_singular_value(_W1), top_singular_value(_W2))
    assert rep.upper == pytest.approx(expected, rel=1e-6)
    assert _sampled_jacobian_norm(fn, (5,)) <= rep.upper
    assert any(row.kind == "merge" and "√(Σ L²)" in row.note for row in rep.layers)


def test_merge_of_norm_terms_is_the_l2_merge():
    assert Merge.l2("").combine([3.0, 4.0]) == pytest.approx(5.0)


NEAR_MISSES = {
    "difference_of_squares": lambda x: tf.sqrt(tf.square(x) - tf.square(0.5 * x)),
    "negative_constant": lambda x: tf.sqrt(tf.square(x) + tf.square(2.0 * x) + (-1.0)),
    "negative_constant_sub": lambda x: tf.sqrt(tf.square(x) + tf.square(2.0 * x) - 1.0),
    "negative_floor": lambda x: tf.sqrt(tf.maximum(tf.square(x), -1.0)),
    "square_read_elsewhere": lambda x: (lambda s: tf.sqrt(s + 1.0) + s)(tf.square(x)),
    "sum_read_elsewhere": lambda x: (lambda s: tf.sqrt(s) + s)(
        tf.square(x) + tf.square(x[:, ::-1])),
    "rsqrt": lambda x: tf.math.rsqrt(tf.square(x) + 1.0),
    "scaled_square": lambda x: tf.sqrt(2.0 * tf.square(x) + 1.0),
    "broadcast_term": lambda x: tf.sqrt(tf.square(x) + tf.square(x[:, :1])),
    "fourth_power": lambda x: tf.sqrt(tf.square(tf.square(x)) + 1.0),
}


@pytest.mark.parametrize("fn", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_of_a_norm_are_refused(fn):
    with pytest.raises((UnsupportedOpError, NotLipschitzError)):
        autolip_function(fn, SPEC)


@pytest.mark.parametrize("kwargs", [dict(frame_length=16, frame_step=8),
                                    dict(frame_length=8, frame_step=4, padding="same",
                                         window="hamming")], ids=["valid", "same_hamming"])
def test_exported_stft_magnitude_matches_the_keras_analysis(kwargs, tmp_path):
    model = keras.Sequential([keras.Input((48, 1)),
                              keras.layers.STFTSpectrogram(mode="magnitude", **kwargs)])
    model.export(str(tmp_path / "stft"), verbose=False)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    graph_rep = tfl.autolip_saved_model(str(tmp_path / "stft"), tol=1e-9)
    certified = tfl.autolip_saved_model(str(tmp_path / "stft"), certified=True)
    assert graph_rep.upper == pytest.approx(keras_rep.upper, rel=1e-5)
    assert certified.certified and certified.upper == pytest.approx(keras_rep.upper, rel=1e-6)
    # real and imaginary parts bounded apart would give √(‖A_re‖² + ‖A_im‖²), ~1.3× more
    assert any(row.class_name.startswith("StackedTerms") for row in graph_rep.layers)
    best = 0.0
    for _ in range(5):
        x = tf.constant(_RNG.standard_normal((1, 48, 1)), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        jac = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1)
        best = max(best, top_singular_value(jac.astype(np.float64)))
    assert best <= certified.upper


# ---------------------------------------------------------------------------------------------
# celu and squareplus
# ---------------------------------------------------------------------------------------------


def _dense_then(activation):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(
        stddev=1.0, seed=3))(inputs)
    return keras.Model(inputs, activation(hidden))


@pytest.mark.parametrize("activation", [
    lambda h: keras.activations.celu(h),
    lambda h: keras.ops.celu(h, alpha=0.4),
    lambda h: keras.ops.celu(h, alpha=3.0),
    lambda h: keras.activations.squareplus(h),
    lambda h: keras.ops.squareplus(h, b=0.5),
    lambda h: keras.ops.squareplus(h, b=0.0),  # relu
], ids=["celu", "celu_0.4", "celu_3", "squareplus", "squareplus_0.5", "squareplus_0"])
def test_exported_dense_then_celu_or_squareplus_matches_keras(activation, tmp_path):
    model = _dense_then(activation)
    model.export(str(tmp_path / "saved"), verbose=False)
    keras_rep = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    graph_rep = tfl.autolip_saved_model(str(tmp_path / "saved"), certified=True)
    assert graph_rep.certified
    assert graph_rep.upper == pytest.approx(keras_rep.upper, rel=1e-6)
    kernel = model.layers[1].kernel.numpy().astype(np.float64)
    assert graph_rep.upper == pytest.approx(top_singular_value(kernel), rel=1e-5)
    assert any("recognised" in row.note for row in graph_rep.layers)
    best = max(_sampled_jacobian_norm(lambda x: activation(x @ tf.constant(kernel)), (5,)),
               0.0)
    assert best <= graph_rep.upper


CELU_SQUAREPLUS_NEAR_MISSES = {
    # slope 2eˣ for x < 0: sup 2, not celu's 1
    "celu_wrong_factor": lambda x: tf.maximum(x, 0.0) + 2.0 * tf.math.expm1(
        tf.minimum(x, 0.0) / 1.0),
    # 1 − e^(−x) for x < 0: slope −e^(−x), unbounded as x → −∞
    "celu_negative_alpha": lambda x: keras.ops.celu(x, alpha=-1.0),
    "celu_max_not_at_zero": lambda x: tf.maximum(x, 1.0) + 1.0 * tf.math.expm1(
        tf.minimum(x, 0.0) / 1.0),
    "squareplus_wrong_factor": lambda x: (x + tf.sqrt(2.0 * tf.square(x) + 4.0)) / 2.0,
    "squareplus_negative_b": lambda x: keras.ops.squareplus(x, b=-1.0),
}


@pytest.mark.parametrize("fn", CELU_SQUAREPLUS_NEAR_MISSES.values(),
                         ids=CELU_SQUAREPLUS_NEAR_MISSES.keys())
def test_near_misses_of_celu_and_squareplus_are_refused(fn):
    with pytest.raises((UnsupportedOpError, NotLipschitzError)):
        autolip_function(fn, SPEC)


@pytest.mark.parametrize("fn", [lambda x: x + tf.sqrt(tf.square(x) + 4.0),
                                lambda x: (x + tf.sqrt(tf.square(x) + 4.0)) / 1.0],
                         ids=["no_division", "divided_by_one"])
def test_squareplus_without_the_half_is_bounded_by_its_parts(fn):
    """``x + √(x² + b)`` is not squareplus (slope up to 2): not recognised as it, its parts
    (the identity and a norm) give 2, which the sampled slope approaches."""
    rep = autolip_function(fn, SPEC)
    assert rep.upper == pytest.approx(2.0, rel=1e-9)
    assert not any("squareplus" in row.note for row in rep.layers)
    assert 1.9 < _sampled_jacobian_norm(fn, (5,), scale=30.0) <= rep.upper
