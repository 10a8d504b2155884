"""keras.applications architectures (weights=None, small inputs): finite AutoLip bound or a clear
error naming the layer that prevents one."""

import math
import warnings

import keras
import pytest

import tf_lipschitz as tfl

A = keras.applications

CASES = [
    ("VGG16", lambda: A.VGG16(weights=None, input_shape=(32, 32, 3)), False),
    ("MobileNetV2", lambda: A.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35), False),
    ("ResNet50", lambda: A.ResNet50(weights=None, input_shape=(32, 32, 3)), True),
    ("DenseNet121", lambda: A.DenseNet121(weights=None, input_shape=(32, 32, 3)), True),
    ("Xception", lambda: A.Xception(weights=None, input_shape=(71, 71, 3)), True),
    ("InceptionV3", lambda: A.InceptionV3(weights=None, input_shape=(75, 75, 3)), True),
    ("ConvNeXtTiny", lambda: A.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3)), True),
    ("EfficientNetB0", lambda: A.EfficientNetB0(weights=None, input_shape=(32, 32, 3)), True),
]


def _params():
    for name, make, slow in CASES:
        marks = [pytest.mark.slow] if slow else []
        yield pytest.param(make, id=name, marks=marks)


@pytest.mark.parametrize("make", _params())
def test_application_gives_finite_bound_or_names_the_layer(make):
    model = make()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LayerNormalization's loose-bound warning
            est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-3, max_products=400)
            report = est.autolip()
    except tfl.NotLipschitzError as err:
        # e.g. squeeze-and-excitation gates multiply two input-dependent tensors
        layer_names = {layer.name for layer in model._flatten_layers()}
        assert any(f"'{name}'" in str(err) for name in layer_names)
        return
    assert math.isfinite(report.upper) and report.upper > 0
    assert len(report.layers) > 10
