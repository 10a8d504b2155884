"""TimeDistributed: the wrapped layer's rule on one time step, against dense ground truth."""

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl

from . import jacobian_norm

L = keras.layers


def _randomise(model, seed=0):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "moving_variance" in w.path or "gamma" in w.path:
            w.assign(rng.uniform(0.3, 3.0, w.shape).astype(w.dtype))
        else:
            w.assign(rng.standard_normal(w.shape).astype(w.dtype))
    return model


def _linear_model():
    return _randomise(keras.Sequential([
        keras.Input((4, 6, 6, 2)),
        L.TimeDistributed(L.Conv2D(3, 3, padding="same")),
        L.TimeDistributed(L.BatchNormalization()),
        L.TimeDistributed(L.AveragePooling2D(2)),
        L.TimeDistributed(L.Flatten()),
        L.TimeDistributed(L.Dense(5)),
        L.Flatten(),
        L.Dense(3),
    ]))


def test_linear_sequence_model_is_measured_and_certified_exactly():
    model = _linear_model()
    exact = jacobian_norm(model, np.zeros((4, 6, 6, 2), "float32"))
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-7)
    estimate = est.autolip()
    assert [row.name for row in estimate.layers if row.kind == "linear"] == [
        "+".join(layer.name for layer in model.layers)]
    assert estimate.upper == pytest.approx(exact, rel=1e-5)
    certified = est.autolip(certified=True)
    assert certified.certified
    # The chain is small: materialised in float64 (TimeDistributed(Flatten) included).
    assert exact * (1 - 1e-6) <= certified.upper <= exact * (1 + 1e-5)


def test_flatten_inside_the_wrapper_keeps_the_float64_route():
    # The wrapped Flatten was called as layer(x) with Keras' float32 cast: the chain fell back
    # to a product of factors, 2.48 for an exact 2.02.
    model = _randomise(keras.Sequential([
        keras.Input((6, 4, 4, 3)), L.TimeDistributed(L.Flatten()),
        L.TimeDistributed(L.Dense(5)), L.Flatten(), L.Dense(2)]))
    exact = jacobian_norm(model, np.zeros((6, 4, 4, 3), "float32"))
    certified = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert certified.certified
    assert exact * (1 - 1e-6) <= certified.upper <= exact * (1 + 1e-5)


def test_nonlinear_sequence_model_bounds_its_gradients():
    model = _randomise(keras.Sequential([
        keras.Input((5, 3)),
        L.TimeDistributed(L.Dense(8, activation="tanh")),
        L.TimeDistributed(L.Dense(4)),
        L.TimeDistributed(L.LeakyReLU(negative_slope=0.2)),
        L.TimeDistributed(L.Dropout(0.5)),
        L.Flatten(),
        L.Dense(2),
    ]), seed=1)
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-6)
    upper = est.autolip(certified=True)
    assert upper.certified
    rng = np.random.default_rng(0)
    sampled = max(jacobian_norm(model, rng.standard_normal((5, 3)).astype("float32"))
                  for _ in range(20))
    assert sampled <= upper.upper
    lower = est.lower_bound(rng.standard_normal((32, 5, 3)).astype("float32"))
    assert sampled * (1 - 1e-5) <= lower.value <= upper.upper
    notes = {row.name: row.note for row in upper.layers}
    assert "TimeDistributed(LeakyReLU)" in notes[model.layers[2].name]


def test_wrapped_layer_without_a_rule_is_named():
    class Square(L.Layer):
        def call(self, x):
            return x * x

        def compute_output_shape(self, input_shape):
            return input_shape

    model = keras.Sequential([keras.Input((3, 2)), L.TimeDistributed(Square(name="sq"))])
    with pytest.raises(tfl.UnsupportedLayerError, match=r"wraps layer 'sq' of class Square"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()
