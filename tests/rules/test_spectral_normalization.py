"""SpectralNormalization: the wrapped layer's rule, against dense ground truth after training.

Keras divides the kernel reshaped to ``(−1, filters)`` by a power-iteration estimate of its
norm during each training call; the bound must be the norm of the operator the trained model
computes, which for a convolution is not 1.
"""

import keras
import numpy as np
import pytest
from keras import ops

import tf_lipschitz as tfl

from groundtruth import exact_norm

L = keras.layers


def _train(model, rng):
    """Four SGD steps on random data: each one renormalises the wrapped kernels."""
    x = rng.standard_normal((8, *model.input_shape[1:])).astype("float32")
    y = rng.standard_normal((8, *model.output_shape[1:])).astype("float32")
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    return model


def _check_bounds(model, exact):
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8)
    assert est.autolip().upper == pytest.approx(exact, rel=1e-5)
    certified = est.autolip(certified=True)
    assert certified.certified
    assert exact * (1 - 1e-6) <= certified.upper <= exact * (1 + 1e-4)
    return certified


def test_dense_is_bounded_by_its_trained_kernel(rng):
    dense = L.Dense(5, activation="relu")
    model = _train(keras.Sequential([keras.Input((7,)), L.SpectralNormalization(dense)]), rng)
    exact = exact_norm(dense, (7,))
    # Normalised from below by an unconverged power iteration, then moved by SGD: near 1 only.
    assert exact == pytest.approx(1.0, abs=0.2) and exact != 1.0
    report = _check_bounds(model, exact)
    assert report.layers[-1].note.startswith("SpectralNormalization(Dense)")


def test_conv2d_operator_norm_is_not_the_normalised_kernel_norm(rng):
    conv = L.Conv2D(8, 3, padding="same")
    wrapper = L.SpectralNormalization(conv, power_iterations=20)
    model = _train(keras.Sequential([keras.Input((8, 8, 3)), wrapper]), rng)
    reshaped = np.linalg.norm(conv.kernel.numpy().reshape(-1, 8), 2)
    assert reshaped == pytest.approx(1.0, abs=0.02)  # what Keras normalises
    exact = exact_norm(conv, (8, 8, 3))  # the convolution the model computes
    assert exact > 1.3
    _check_bounds(model, exact)


def test_wrapped_layers_fuse_with_their_neighbours(rng):
    conv, dense = L.Conv2D(4, 3), L.Dense(3)
    model = _train(keras.Sequential([
        keras.Input((6, 6, 2)), L.SpectralNormalization(conv), L.BatchNormalization(),
        L.Flatten(), L.SpectralNormalization(dense)]), rng)
    exact = exact_norm(model.layers, (6, 6, 2))
    report = _check_bounds(model, exact)
    linear = [row for row in report.layers if row.kind == "linear"]
    assert len(linear) == 1 and "+" in linear[0].name  # one fused operator


def test_inner_layer_without_a_rule_is_named():
    class Squared(L.Layer):  # has a kernel, as SpectralNormalization needs, and no rule
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 2))

        def call(self, x):
            return ops.matmul(x * x, self.kernel)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], 2)

    model = keras.Sequential([keras.Input((3,)), L.SpectralNormalization(Squared(name="sq"))])
    with pytest.raises(tfl.UnsupportedLayerError, match="wraps layer 'sq' of class Squared"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()
