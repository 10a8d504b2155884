"""Lipschitz rules for Keras layers, and the registry users extend with :func:`register_rule`.

Importing this package registers the built-in rules (linear, activations, pooling,
normalisation, shape and merge layers, image resampling, TimeDistributed,
SpectralNormalization, SimpleRNN and Bidirectional, the audio front ends STFTSpectrogram and
MelSpectrogram, and the image augmentation layers, which are the identity at inference).
"""

from tf_lipschitz.rules import (activations, augmentation, linear, merge, normalization, pooling,
                                recurrent, resampling, shape, spectrogram, wrapped)
from tf_lipschitz.rules.activations import activation_info, register_activation, resolve_activation
from tf_lipschitz.rules.base import (
    Activation,
    Constant,
    LayerBound,
    Linear,
    Merge,
    NodeContext,
    affine,
    constant,
    constant_like,
    get_rule,
    register_rule,
    registered_classes,
)
from tf_lipschitz.rules.pooling import max_pool_constant

__all__ = [
    "Activation",
    "Constant",
    "LayerBound",
    "Linear",
    "Merge",
    "NodeContext",
    "activation_info",
    "affine",
    "constant",
    "constant_like",
    "get_rule",
    "max_pool_constant",
    "register_activation",
    "register_rule",
    "registered_classes",
    "resolve_activation",
]
