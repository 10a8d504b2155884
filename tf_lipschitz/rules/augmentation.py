"""Rules for Keras' image augmentation layers, which are the identity at inference.

The random augmentation layers (RandomFlip, RandomRotation, RandomZoom, …, AugMix, RandAugment,
CutMix, MixUp) and the deterministic Solarization and Equalization transform their input only
when called with ``training=True``; with ``training=False`` every one of them returns its input
cast to the layer's compute dtype, whatever its arguments (checked in Keras 3's source: each
``transform_images``, or the base class's, returns the input unless ``training``). tf_lipschitz
analyses a model in inference mode (every layer is called with ``training=False``), so they
count as the identity: 1, and they fuse with their linear neighbours.

Beware that their ``call`` defaults to ``training=True``: ``model(x)`` without ``training``
augments its input, while ``model.predict(x)`` and ``model(x, training=False)`` do not.

Two layers transform at inference and are refused: AutoContrast stretches every channel of
every image to the value range (``(x − min) · range / (max − min)``), which has no global
constant near a constant image; ContrastLimitedAdaptiveHistogramEqualization maps pixels through
histograms of their integer parts, a discontinuous map. A ``Pipeline`` is the identity when all
of its layers are.

Example:
    >>> import keras, tf_lipschitz as tfl
    >>> conv = keras.layers.Conv2D(4, 3)
    >>> plain = keras.Sequential([keras.Input((8, 8, 3)), conv])
    >>> augmented = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.RandomFlip(),
    ...     keras.layers.RandomRotation(0.1),
    ...     conv,
    ... ])
    >>> a, b = (tfl.LipschitzEstimator(m, verbose=0, tol=1e-8).autolip().upper
    ...         for m in (augmented, plain))
    >>> bool(abs(a - b) <= 1e-6 * b)
    True
"""

from __future__ import annotations

import keras

from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules.base import Linear, NodeContext, register_rule
from tf_lipschitz.rules.shape import identity, known_norm
from tf_lipschitz.rules.wrapped import wrapped_bound

__all__: list[str] = []

L = keras.layers

IDENTITY_AT_INFERENCE = (
    L.RandomFlip, L.RandomRotation, L.RandomZoom, L.RandomTranslation, L.RandomContrast,
    L.RandomBrightness, L.RandomHue, L.RandomSaturation, L.RandomColorJitter,
    L.RandomColorDegeneration, L.RandomGrayscale, L.RandomSharpness, L.RandomShear,
    L.RandomPosterization, L.RandomInvert, L.RandomErasing, L.RandomGaussianBlur,
    L.RandomElasticTransform, L.RandomPerspective, L.AugMix, L.RandAugment, L.CutMix, L.MixUp,
    L.Solarization, L.Equalization,
)

# The methods through which an image preprocessing layer transforms its input; a subclass that
# overrides one of them outside Keras may transform at inference.
_TRANSFORM_METHODS = ("__call__", "call", "transform_images", "transform_single_image",
                      "get_random_transformation", "_transform_images")

_identity_rule = known_norm(1.0, "identity at inference", fn=identity)


def _owner(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def _augmentation(layer, ctx: NodeContext) -> Linear:
    """The identity, for a layer that Keras' source shows returns its input at inference."""
    cls = type(layer)
    for name in _TRANSFORM_METHODS:
        owner = _owner(cls, name)
        if owner is not None and not owner.__module__.startswith("keras."):
            raise UnsupportedLayerError(
                layer, f"It subclasses a Keras augmentation layer and overrides {name}() (in "
                f"{owner.__qualname__}), so it may transform its input at inference.")
    if not keras.backend.is_float_dtype(layer.compute_dtype):
        raise NotLipschitzError(
            layer, f"at inference it casts its input to its compute dtype "
            f"{layer.compute_dtype!r}, which rounds floats to integers (1.7 -> 1), a step "
            "function. Give the layer a float dtype.")
    return _identity_rule(layer, ctx)


def _auto_contrast(layer, ctx: NodeContext):
    raise NotLipschitzError(
        layer,
        "it transforms at inference too: it stretches every channel of every image to "
        f"value_range={list(layer.value_range)!r} (x ↦ (x − min)·(hi − lo)/(max − min) + lo, "
        "clipped), so c + δ·u and c + δ·v map to the stretched u and v for every δ > 0: the "
        "ratio grows like 1/δ near a constant image (which is left unchanged, a jump). Remove "
        "the layer from the model you analyse and normalise the images before the model.")


def _clahe(layer, ctx: NodeContext):
    raise NotLipschitzError(
        layer,
        "it transforms at inference too: it maps every pixel through the cumulative "
        "histograms of its tile and its neighbours, computed from the pixels' integer parts, so "
        "its output jumps when a pixel crosses an integer. Remove the layer from the model you "
        "analyse and equalise the images before the model.")


def _pipeline(layer, ctx: NodeContext) -> Linear:
    """The identity when every layer of the pipeline is (each is called with ``training``)."""
    for inner in layer.layers:
        bound = wrapped_bound(layer, inner, ctx)  # the input is unchanged by the previous layers
        if not (isinstance(bound, Linear) and bound.fn is identity):
            raise UnsupportedLayerError(
                layer, f"Its layer '{inner.name}' ({type(inner).__name__}) is not the identity "
                "at inference, and tf_lipschitz bounds a Pipeline only when all of its layers "
                "are. Put the Pipeline's layers in the model itself (or in a Sequential model, "
                "which is expanded layer by layer) instead.", suggest_rule=False)
    return _identity_rule(layer, ctx)


for _cls in IDENTITY_AT_INFERENCE:
    register_rule(_cls, _augmentation)
register_rule(L.AutoContrast, _auto_contrast)
register_rule(L.ContrastLimitedAdaptiveHistogramEqualization, _clahe)
register_rule(L.Pipeline, _pipeline)
