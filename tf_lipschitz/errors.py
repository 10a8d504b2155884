"""Errors raised by tf_lipschitz.

Every error names the layer (or argument) at fault and says what to do about it, so that a
user never has to guess why no number was printed. ``except tfl.LipschitzError`` catches all of
them: a bad argument (value, type, shape, unknown option or keyword) raises
:class:`InvalidArgumentError`, which is also a ``ValueError`` and a ``TypeError``; a model the
library cannot bound raises one of the other subclasses.
"""

from __future__ import annotations

import re

__all__ = [
    "InvalidArgumentError",
    "LipschitzError",
    "LowerBoundError",
    "LowerBoundUnavailableError",
    "NonFiniteLowerBoundError",
    "UnsupportedLayerError",
    "NotLipschitzError",
    "ModelNotBuiltError",
]


class LipschitzError(Exception):
    """Base class of every error raised by tf_lipschitz."""


class InvalidArgumentError(LipschitzError, ValueError, TypeError):
    """An argument has a value or type that tf_lipschitz cannot use.

    The message names the argument, what it received and what it accepts. The class is also a
    ``ValueError`` and a ``TypeError`` (the builtins Keras raises for bad arguments), so
    ``except ValueError`` keeps working.

    Example:
        >>> import tf_lipschitz as tfl
        >>> op = tfl.LinearOperator(lambda x: 2.0 * x, (3,))
        >>> try:
        ...     tfl.SpectralSolver([op]).run(tol=2.0)
        ... except ValueError as err:  # an InvalidArgumentError, hence a ValueError
        ...     print(type(err).__name__, str(err)[:41])
        InvalidArgumentError tol is the relative accuracy asked of the
    """


class LowerBoundError(InvalidArgumentError):
    """A lower bound was asked of a model (several inputs) or with arguments that the search
    cannot handle."""


class LowerBoundUnavailableError(LipschitzError):
    """The lower-bound search cannot run on the model: TensorFlow cannot differentiate it as the
    search needs (an op without a gradient, such as ``ResizeArea``, or a layer that fails inside
    the search's ``tf.function``). Upper bounds do not need these derivatives:
    :meth:`~tf_lipschitz.LipschitzEstimator.estimate` then returns them with a warning."""


class NonFiniteLowerBoundError(LipschitzError, FloatingPointError):
    """No searched point gave a finite, confirmed Jacobian norm (inf/NaN weights, overflow)."""


class UnsupportedLayerError(LipschitzError, TypeError):
    """A layer has no Lipschitz rule in the registry.

    Example:
        >>> import tf_lipschitz as tfl
        >>> tfl.register_rule(MyLayer, tfl.rules.constant(1.0))  # doctest: +SKIP
    """

    def __init__(self, layer, detail: str = "", *, suggest_rule: bool = True):
        cls = type(layer)
        name = getattr(layer, "name", repr(layer))
        message = (
            f"No Lipschitz rule for layer '{name}' of class "
            f"{cls.__module__}.{cls.__qualname__}."
        )
        if detail:
            message += f" {detail}"
        if suggest_rule:  # off when the detail already says what to register (an activation)
            message += (
                " Register one with `tf_lipschitz.register_rule("
                f"{cls.__qualname__}, rule)`, for example "
                "`tfl.register_rule(" + cls.__qualname__ + ", tfl.rules.constant(1.0))` if the "
                "layer is 1-Lipschitz, or `tfl.rules.affine()` if it is affine in its input."
            )
        super().__init__(message)
        self.layer = layer
        self.suggest_rule = suggest_rule  # False: a rule exists and refuses this layer


class NotLipschitzError(LipschitzError, ValueError):
    """The function computed by a layer is not globally Lipschitz.

    Raised for layers such as the product of two input-dependent tensors, attention, or the
    `exponential` and `hard_shrink` activations, for which no finite global constant exists.
    """

    def __init__(self, layer, reason: str):
        name = getattr(layer, "name", None) or getattr(layer, "__name__", None) or repr(layer)
        cls = type(layer).__qualname__
        noun = getattr(layer, "error_noun", "Layer")  # "Op" for a TensorFlow graph's ops
        super().__init__(
            f"{noun} '{name}' ({cls}) is not globally Lipschitz: {reason} No finite upper bound "
            "exists on an unbounded input domain."
        )
        self.layer = layer


class ModelNotBuiltError(LipschitzError, ValueError):
    """The model has no graph or no known input shape to analyse."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without the terminal colour codes Keras puts
    around names (the exception's type name when the message is empty): the detail quoted in
    tf_lipschitz's own messages about a failure of TensorFlow or Keras."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
