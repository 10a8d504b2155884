"""tf_lipschitz: measure and control the Lipschitz constant of Keras models.

AutoLip and SeqLip upper bounds (Scaman & Virmaux, NeurIPS 2018), lower bounds, and Keras
integration. Every printed number says whether it is a certified upper bound, an estimate or a
lower bound.

Example:
    >>> import keras, tf_lipschitz as tfl
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    >>> report.method
    'autolip'
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise ImportError(
        "tf_lipschitz needs the TensorFlow backend of Keras 3; found KERAS_BACKEND="
        f"{_keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing keras."
    )

from tf_lipschitz import rules, tfgraph, wrappers
from tf_lipschitz.callbacks import LipCallback, LipschitzRecord
from tf_lipschitz.constraints import ConvOperatorNorm, SpectralNorm, apply_constraints
from tf_lipschitz.errors import (
    InvalidArgumentError,
    LipschitzError,
    LowerBoundError,
    LowerBoundUnavailableError,
    ModelNotBuiltError,
    NonFiniteLowerBoundError,
    NotLipschitzError,
    UnsupportedLayerError,
)
from tf_lipschitz.estimator import LipschitzEstimator
from tf_lipschitz.power import SpectralSolver, spectral_norm, top_singular_triplets
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.report import ExtremeValueEstimate, LayerRow, LipschitzReport, LowerBound
from tf_lipschitz.rules import register_activation, register_rule
from tf_lipschitz.wrappers import LipschitzWrapper
from tf_lipschitz.tfgraph import (
    BatchMixingError,
    GraphEstimator,
    UnsupportedOpError,
    autolip_function,
    autolip_saved_model,
)

__version__ = "0.1.0"

__all__ = [
    "BatchMixingError",
    "ConvOperatorNorm",
    "LipCallback",
    "LipschitzRecord",
    "LipschitzWrapper",
    "SpectralNorm",
    "ExtremeValueEstimate",
    "GraphEstimator",
    "InvalidArgumentError",
    "LayerRow",
    "LinearOperator",
    "LipschitzError",
    "LowerBoundError",
    "LowerBoundUnavailableError",
    "LipschitzEstimator",
    "LipschitzReport",
    "LowerBound",
    "ModelNotBuiltError",
    "NonFiniteLowerBoundError",
    "NotLipschitzError",
    "SpectralSolver",
    "UnsupportedLayerError",
    "UnsupportedOpError",
    "apply_constraints",
    "autolip_function",
    "autolip_saved_model",
    "register_activation",
    "register_rule",
    "rules",
    "spectral_norm",
    "tfgraph",
    "top_singular_triplets",
]
