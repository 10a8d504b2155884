"""Image augmentation layers: the identity at inference, checked on the layers themselves.

Every class registered as the identity returns its input with ``training=False`` for its
default and for non-default arguments (which do transform with ``training=True``), and a model
with augmentation layers has the same bounds as the model without them. AutoContrast and CLAHE
transform at inference and are refused; their failure to be Lipschitz is measured.
"""

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl
from tf_lipschitz.rules.augmentation import IDENTITY_AT_INFERENCE
from tf_lipschitz.rules.base import NodeContext

L = keras.layers

# Non-default arguments that make each layer transform its input when training.
ARGUMENTS = {
    L.RandomFlip: dict(mode="vertical"),
    L.RandomRotation: dict(factor=(-0.5, 0.5), fill_mode="constant", fill_value=3.0,
                           interpolation="nearest"),
    L.RandomZoom: dict(height_factor=(-0.3, -0.1), width_factor=0.4, fill_mode="constant"),
    L.RandomTranslation: dict(height_factor=(0.1, 0.3), width_factor=0.5, fill_mode="wrap"),
    L.RandomContrast: dict(factor=(0.2, 0.9), value_range=(-5, 5)),
    L.RandomBrightness: dict(factor=(-0.2, 0.9), value_range=(-5, 5)),
    L.RandomHue: dict(factor=(0.2, 0.9), value_range=(0, 1)),
    L.RandomSaturation: dict(factor=(0.2, 0.9), value_range=(0, 1)),
    L.RandomColorJitter: dict(brightness_factor=0.3, contrast_factor=0.5,
                              saturation_factor=0.5, hue_factor=0.3),
    L.RandomColorDegeneration: dict(factor=(0.2, 0.9)),
    L.RandomGrayscale: dict(factor=1.0),
    L.RandomSharpness: dict(factor=(0.2, 0.9)),
    L.RandomShear: dict(x_factor=0.5, y_factor=0.5, fill_mode="reflect"),
    L.RandomPosterization: dict(factor=(2, 3)),
    L.RandomInvert: dict(factor=1.0),
    L.RandomErasing: dict(factor=1.0, scale=(0.2, 0.5), fill_value=3.0),
    L.RandomGaussianBlur: dict(factor=1.0, kernel_size=5, sigma=0.8),
    L.RandomElasticTransform: dict(factor=1.0, scale=0.5),
    L.RandomPerspective: dict(factor=1.0, scale=0.8),
    L.AugMix: dict(num_chains=2, chain_depth=2, alpha=0.5),
    L.RandAugment: dict(num_ops=3, factor=0.9),
    L.CutMix: dict(factor=0.5),
    L.MixUp: dict(alpha=0.5),
    L.Solarization: dict(addition_factor=0.5, threshold_factor=0.5),
    L.Equalization: dict(bins=16),
}
# Arguments the constructor requires (the defaults of the others are used).
REQUIRED = {
    L.RandomRotation: dict(factor=0.1),
    L.RandomZoom: dict(height_factor=0.2),
    L.RandomTranslation: dict(height_factor=0.2, width_factor=0.2),
    L.RandomContrast: dict(factor=0.5),
    L.RandomBrightness: dict(factor=0.5),
    L.RandomHue: dict(factor=0.5),
    L.RandomSaturation: dict(factor=0.5),
    L.RandomColorDegeneration: dict(factor=0.5),
    L.RandomSharpness: dict(factor=0.5),
    L.RandomShear: dict(x_factor=0.3),
    L.RandomPosterization: dict(factor=(1, 8)),
}
CLASSES = pytest.mark.parametrize("cls", IDENTITY_AT_INFERENCE, ids=lambda c: c.__name__)


def _images(rng, shape=(4, 8, 8, 3)):
    return rng.uniform(0, 255, shape).astype("float32")


def test_every_class_has_arguments():
    assert set(ARGUMENTS) == set(IDENTITY_AT_INFERENCE)


@CLASSES
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_layer_returns_its_input_at_inference(cls, data_format, rng):
    x = _images(rng)
    if data_format == "channels_first":
        x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    for arguments in (REQUIRED.get(cls, {}), ARGUMENTS[cls]):
        layer = cls(**arguments, data_format=data_format)
        np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
        np.testing.assert_array_equal(np.asarray(layer(x / 255.0 - 0.5, training=False)),
                                      x / 255.0 - 0.5)
    if data_format == "channels_last":  # the arguments do transform when training
        assert not np.array_equal(np.asarray(cls(**ARGUMENTS[cls])(x, training=True)), x)


def _conv_model(layers, shape=(6, 6, 3)):
    return keras.Sequential([keras.Input(shape), *layers, L.Conv2D(2, 3, activation="relu"),
                             L.Flatten(), L.Dense(3)])


@CLASSES
def test_model_bound_is_that_of_the_model_without_the_layer(cls):
    base = _conv_model([])
    model = _conv_model([cls(**ARGUMENTS[cls])])
    model.set_weights(base.get_weights())
    upper = tfl.LipschitzEstimator(base, verbose=0, tol=1e-8).autolip()
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8)
    assert est.autolip().upper == pytest.approx(upper.upper, rel=1e-6)
    certified = est.autolip(certified=True)
    assert certified.certified
    assert certified.upper >= upper.upper * (1 - 1e-6)
    if cls is not L.Equalization:  # Keras' Equalization returns its symbolic input: no node
        notes = {row.name: row.note for row in certified.layers}
        assert "identity at inference" in notes[f"{model.layers[0].name}+{model.layers[1].name}"]
    layer = model.layers[0]  # the rule itself, also for Equalization
    bound = tfl.rules.get_rule(layer)(layer, NodeContext(((6, 6, 3),), ((6, 6, 3),)))
    assert bound.norm() == bound.certificate() == 1.0
    x = np.ones((1, 6, 6, 3), "float32")
    assert bound.fn(x) is x


def test_augmented_model_is_analysed_in_inference_mode(rng):
    base = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu"),
                             L.MaxPooling2D(), L.Flatten(), L.Dense(3)])
    model = keras.Sequential([keras.Input((8, 8, 3)), L.RandomFlip(), L.RandomRotation(0.1),
                              L.Pipeline([L.RandomZoom(0.2), L.Dropout(0.5),
                                          L.Pipeline([L.RandomContrast(0.3)])]),
                              *base.layers])
    est, ref = (tfl.LipschitzEstimator(m, verbose=0, tol=1e-8) for m in (model, base))
    assert est.autolip().upper == pytest.approx(ref.autolip().upper, rel=1e-6)
    assert est.autolip(certified=True).upper == pytest.approx(
        ref.autolip(certified=True).upper, rel=1e-9)
    assert est.seqlip().upper == pytest.approx(ref.seqlip().upper, rel=1e-6)
    x = rng.uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    # Same lower bound: the search ran on the un-augmented function (Keras' call default is
    # training=True: model(x) would flip and rotate).
    assert est.lower_bound(x).value == pytest.approx(ref.lower_bound(x).value, rel=1e-6)
    assert not np.allclose(np.asarray(model(x)), np.asarray(base(x)))


def test_auto_contrast_is_not_lipschitz(rng):
    layer = L.AutoContrast(value_range=(0, 1))
    u, v = rng.uniform(-1, 1, (2, 1, 4, 4, 1)).astype("float32")
    ratios = []
    for delta in (1e-1, 1e-3):  # c + δu and c + δv: the outputs do not shrink with δ
        a, b = 0.5 + delta * u, 0.5 + delta * v
        out = np.asarray(layer(a, training=False)) - np.asarray(layer(b, training=False))
        ratios.append(np.linalg.norm(out) / np.linalg.norm(a - b))
    assert ratios[1] > 50 * ratios[0] > 50
    model = keras.Sequential([keras.Input((4, 4, 1)), layer, L.Flatten(), L.Dense(2)])
    with pytest.raises(tfl.NotLipschitzError, match="stretches every channel"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


def test_clahe_is_not_lipschitz(rng):
    layer = L.ContrastLimitedAdaptiveHistogramEqualization(tile_grid_size=(2, 2))
    a = rng.uniform(0, 255, (1, 8, 8, 1)).astype("float32")
    jumps = []
    for gap in (1e-1, 1e-3):  # one pixel across an integer: the output jumps by the same amount
        b = a.copy()
        a[0, 3, 3, 0], b[0, 3, 3, 0] = 100 - gap, 100 + gap
        out = np.asarray(layer(a, training=False)) - np.asarray(layer(b, training=False))
        jumps.append(np.linalg.norm(out))
    assert jumps[1] == pytest.approx(jumps[0], rel=1e-3) and jumps[1] > 0.5
    model = keras.Sequential([keras.Input((8, 8, 1)), layer, L.Flatten(), L.Dense(2)])
    with pytest.raises(tfl.NotLipschitzError, match="integer parts"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


class Square(L.Layer):  # no rule
    def call(self, x):
        return x * x


@pytest.mark.parametrize("inner,error,match", [
    (lambda: L.AutoContrast(), tfl.NotLipschitzError, "stretches every channel"),
    (lambda: L.Rescaling(2.0), tfl.UnsupportedLayerError, r"'scale' \(Rescaling\) is not the"),
    (lambda: L.ReLU(), tfl.UnsupportedLayerError, "is not the identity at inference"),
    (lambda: Square(name="sq"), tfl.UnsupportedLayerError, "wraps layer 'sq' of class Square"),
])
def test_pipeline_with_a_transforming_layer_is_refused(inner, error, match):
    layer = inner()
    if isinstance(layer, L.Rescaling):
        layer = L.Rescaling(2.0, name="scale")
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              L.Pipeline([L.RandomFlip(), layer, L.RandomZoom(0.2)]),
                              L.Flatten(), L.Dense(2)])
    with pytest.raises(error, match=match):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


def test_subclass_that_transforms_at_inference_is_refused():
    class AlwaysFlip(L.RandomFlip):  # flips whatever `training` says
        def transform_images(self, images, transformation, training=True):
            return images[:, ::-1]

    class Renamed(L.RandomFlip):  # only its constructor differs: still the identity
        def __init__(self, **kwargs):
            super().__init__(mode="vertical", **kwargs)

    ctx = NodeContext(((4, 4, 3),), ((4, 4, 3),))
    assert tfl.rules.get_rule(Renamed())(Renamed(), ctx).norm() == 1.0
    layer = AlwaysFlip(name="always")
    with pytest.raises(tfl.UnsupportedLayerError, match=r"overrides transform_images\(\)"):
        tfl.rules.get_rule(layer)(layer, ctx)


def test_integer_dtype_is_not_lipschitz():
    layer = L.RandomFlip(dtype="int32")
    x = np.full((1, 2, 2, 1), 1.7, "float32")
    assert np.asarray(layer(x, training=False)).ravel()[0] == 1  # rounded: a step function
    with pytest.raises(tfl.NotLipschitzError, match="rounds floats to integers"):
        tfl.rules.get_rule(layer)(layer, NodeContext(((2, 2, 1),), ((2, 2, 1),)))
