"""RMSNormalization: ``max|scale| / √ε`` is its exact constant, attained at ``x = 0``.

Checked against the dense Jacobian at 0 (equal) and at sampled points (below), for a random
scale, several axes, and the cases where Keras' broadcasting of ``scale`` (aligned with the
trailing axes, whatever ``axis`` is) differs from the normalised axes.
"""

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl

from . import jacobian_norm

L = keras.layers

CASES = [  # (input shape, axis, epsilon)
    ((6,), -1, 1e-6),
    ((6,), -1, 0.3),
    ((3, 5), -1, 1e-3),
    ((3, 4), [1, 2], 1e-2),
    ((2, 3, 4), [2, 3], 1e-2),
    ((3, 3), 1, 1e-2),  # scale (3,) multiplies the last axis, not axis 1
    ((3, 1), 1, 1e-2),  # scale (3,) broadcasts the input: output (3, 3), each entry copied
]


def _model(shape, axis, epsilon, rng):
    layer = L.RMSNormalization(axis=axis, epsilon=epsilon)
    model = keras.Sequential([keras.Input(shape), layer])
    layer.scale.assign(rng.uniform(-2.0, 2.0, layer.scale.shape).astype("float32"))
    return model


@pytest.mark.parametrize("shape,axis,epsilon", CASES)
def test_bound_is_the_jacobian_norm_at_zero(shape, axis, epsilon, rng):
    model = _model(shape, axis, epsilon, rng)
    with pytest.warns(UserWarning, match="only thanks to epsilon"):
        report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert report.certified
    at_zero = jacobian_norm(model, np.zeros(shape, "float32"))
    assert report.upper == pytest.approx(at_zero, rel=1e-4)
    assert report.upper >= at_zero * (1 - 1e-6)
    for scale in (1e-3, 0.1, 1.0, 10.0):  # sampled Jacobians, near and far from 0
        for _ in range(5):
            x = (scale * rng.standard_normal(shape)).astype("float32")
            assert jacobian_norm(model, x) <= report.upper * (1 + 1e-6)


def test_secant_ratio_approaches_the_bound_at_zero(rng):
    model = _model((8,), -1, 1e-4, rng)
    with pytest.warns(UserWarning):
        bound = tfl.LipschitzEstimator(model, verbose=0).autolip().upper
    scale = np.abs(model.layers[0].scale.numpy())
    u = np.zeros((1, 8), "float32")
    u[0, np.argmax(scale)] = 1e-5
    ratio = np.linalg.norm(np.asarray(model(u)) - np.asarray(model(-u))) / (2e-5)
    assert ratio == pytest.approx(bound, rel=1e-2) and ratio <= bound


def test_zero_epsilon_is_not_lipschitz(rng):
    model = _model((4,), -1, 0.0, rng)
    with pytest.raises(tfl.NotLipschitzError, match="epsilon=0"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


def test_batch_axis_is_refused():
    model = keras.Sequential([keras.Input((3,), batch_size=1), L.RMSNormalization(axis=0)])
    with pytest.raises(tfl.UnsupportedLayerError, match="over the batch axis"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()
