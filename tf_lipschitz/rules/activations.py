"""Lipschitz constants of activations: every ``keras.activations`` function and activation layer.

For an elementwise activation σ the constant is ``sup |σ'|``. The values below were derived
analytically (where a closed form exists) and checked against the autodiff derivative on a
fine grid (``tests/rules/test_activations.py``); non-integer ones are rounded *up* so that
they stay upper bounds:

=================  ==========================  ==========================================
activation         sup |σ'|                    derivation
=================  ==========================  ==========================================
relu, relu6        1                           piecewise linear
leaky_relu(α)      max(1, |α|)                 piecewise linear
elu(α)             max(1, |α|)                 α·eˣ for x < 0
celu(α), α > 0     1                           e^(x/α) ≤ 1 for x < 0
selu               scale·α ≈ 1.7581            scale·α·eˣ for x < 0
sigmoid            1/4                         σ(1 − σ) ≤ 1/4
tanh               1                           1 − tanh² ≤ 1
hard_sigmoid       1/6                         relu6(x + 3) / 6 (Keras 3)
hard_silu          3/2                         (2x + 3)/6 on (−3, 3), max at x = 3
gelu               1.128905 (exact form)       Φ(x) + xφ(x), max at x = √2
gelu (tanh form)   1.128994                    numerical
silu / swish       1.099840                    max at x ≈ 2.3994
mish               1.088500                    numerical
softmax            1/2                         J = diag(p) − ppᵀ; uᵀJu = Var_p(u) ≤ 1/2
log_softmax        √n                          J = I − 1pᵀ, idempotent: ‖J‖ = ‖1pᵀ‖ = √n‖p‖
sparsemax          1                           the projection onto the simplex (refused where Keras' is not)
sparse_sigmoid     1/2                         slope 1/2 on (−1, 1)
others             1                           softplus, softsign, log_sigmoid, hard_tanh,
                                               soft_shrink (threshold ≥ 0), tanh_shrink,
                                               squareplus (b ≥ 0), sparse_plus
=================  ==========================  ==========================================

``exponential`` (unbounded slope), ``hard_shrink`` and ``threshold`` (jumps), ``glu`` (product of
two halves of the input) and ``relu`` with a non-zero ``threshold`` (a jump) are not Lipschitz:
they raise :class:`~tf_lipschitz.errors.NotLipschitzError`. So do parameters outside the
ranges above (they reach the rules through the layers ``ReLU``, ``LeakyReLU``, ``ELU`` and the
ops ``keras.ops.celu(x, alpha)``, ``squareplus(x, b)``, ``soft_shrink(x, threshold)``...):
``celu`` with ``alpha ≤ 0`` (slope ``e^(x/α)`` unbounded as x → −∞; α = 0 divides by zero),
``squareplus`` with ``b < 0`` (NaN near 0, unbounded slope next to it), ``soft_shrink`` with
``threshold < 0`` (a jump at the threshold) and any NaN or infinite parameter. An
``Activation`` layer only names its function, so it always has the default parameters
(a ``functools.partial`` or a lambda is an unknown function: register it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import keras
import numpy as np

from tf_lipschitz.errors import LipschitzError, NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules.base import (
    IDENTITY,
    Activation,
    Constant,
    NodeContext,
    check_constant,
    check_slopes,
    register_rule,
    weight_values,
)

__all__ = ["activation_info", "register_activation", "resolve_activation"]

_SELU = 1.0507009873554805 * 1.6732632423543772

# name -> Activation (elementwise, parameter-free forms).
_TABLE: dict[str, Activation] = {
    "linear": IDENTITY,
    "relu": Activation("relu", 1.0, (0.0, 1.0)),
    "relu6": Activation("relu6", 1.0, (0.0, 1.0)),
    "leaky_relu": Activation("leaky_relu", 1.0, (0.2, 1.0)),
    "elu": Activation("elu", 1.0, (0.0, 1.0)),
    "celu": Activation("celu", 1.0, (0.0, 1.0)),
    "selu": Activation("selu", math.ceil(_SELU * 1e6) / 1e6, (0.0, math.ceil(_SELU * 1e6) / 1e6)),
    "sigmoid": Activation("sigmoid", 0.25, (0.0, 0.25)),
    "tanh": Activation("tanh", 1.0, (0.0, 1.0)),
    "hard_sigmoid": Activation("hard_sigmoid", 1.0 / 6.0, (0.0, 1.0 / 6.0)),
    "hard_silu": Activation("hard_silu", 1.5, (-0.5, 1.5)),
    "gelu": Activation("gelu", 1.128905, (-0.128905, 1.128905)),
    "gelu_tanh": Activation("gelu_tanh", 1.128994, (-0.128994, 1.128994)),
    "silu": Activation("silu", 1.099840, (-0.099840, 1.099840)),
    "mish": Activation("mish", 1.088500, (-0.112527, 1.088500)),
    "softplus": Activation("softplus", 1.0, (0.0, 1.0)),
    "softsign": Activation("softsign", 1.0, (0.0, 1.0)),
    "log_sigmoid": Activation("log_sigmoid", 1.0, (0.0, 1.0)),
    "hard_tanh": Activation("hard_tanh", 1.0, (0.0, 1.0)),
    "soft_shrink": Activation("soft_shrink", 1.0, (0.0, 1.0)),
    "tanh_shrink": Activation("tanh_shrink", 1.0, (0.0, 1.0)),
    "squareplus": Activation("squareplus", 1.0, (0.0, 1.0)),
    "sparse_plus": Activation("sparse_plus", 1.0, (0.0, 1.0)),
    "sparse_sigmoid": Activation("sparse_sigmoid", 0.5, (0.0, 0.5)),
    # Not elementwise: no slope range.
    "softmax": Activation("softmax", 0.5, None),
    "sparsemax": Activation("sparsemax", 1.0, None),
}
_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
_NOT_LIPSCHITZ = {
    "exponential": "exp has an unbounded derivative.",
    "hard_shrink": "it jumps at ±threshold.",
    "threshold": "it jumps at the threshold.",
    "glu": "it multiplies two halves of its input (a product of input-dependent tensors).",
}
_CUSTOM: dict[Any, Activation] = {}


def register_activation(fn: Callable | str, lipschitz: float,
                        slope_range: tuple[float, float] | None = None) -> Activation:
    """Registers the Lipschitz constant of a custom activation function.

    Args:
        fn: The activation function object (as stored in ``layer.activation``) or its name.
        lipschitz: ``sup |σ'|``.
        slope_range: ``(inf σ', sup σ')`` when σ is elementwise (enables SeqLip).

    Returns:
        The registered :class:`Activation`.

    Example:
        >>> import tf_lipschitz as tfl
        >>> def my_act(x):
        ...     return 0.5 * x
        >>> tfl.register_activation(my_act, 0.5, (0.5, 0.5)).lipschitz
        0.5
    """
    lipschitz = check_constant(lipschitz, "lipschitz")
    if slope_range is not None:
        slope_range = check_slopes(slope_range, "slope_range")
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
    info = Activation(name, lipschitz, slope_range)
    _CUSTOM[fn] = info
    return info


def _log_softmax(n: int) -> Activation:
    """``√n`` over ``n`` entries. The Jacobian ``J = I − 1pᵀ`` (``p`` the softmax) is
    idempotent (``pᵀ1 = 1``), and a projection other than 0 and ``I`` has the norm of its
    complement: ``‖J‖ = ‖1pᵀ‖ = √n ‖p‖₂ < √n``, approached as ``p`` nears a vertex."""
    value = math.sqrt(n)
    if math.isqrt(n) ** 2 != n:  # round up: the constant must not fall below √n
        value = math.nextafter(value, math.inf)
    return Activation("log_softmax", value, None)


@functools.cache
def _sparsemax_is_projection() -> bool:
    """Whether ``keras.activations.sparsemax`` is the projection onto the simplex (1-Lipschitz),
    checked on an input where Keras 3.x's TensorFlow implementation is not."""
    x = np.array([[-0.5, 0.2, 0.9, 0.1]], "float64")
    projection = np.array([[0.0, 0.4 / 3, 2.5 / 3, 0.1 / 3]])
    got = keras.ops.convert_to_numpy(keras.activations.sparsemax(keras.ops.convert_to_tensor(x)))
    return bool(np.allclose(got, projection, atol=1e-9))


# (activation, parameter) -> (valid finite values, the requirement, what goes wrong outside it).
# Every NaN or infinite value is refused as well (``max(1, nan)`` would read as 1), except an
# infinite ``max_value`` (no clipping) and ``threshold = +inf`` of soft_shrink (output 0).
_DOMAINS: dict[tuple[str, str], tuple[Callable[[float], bool], str, str]] = {
    ("celu", "alpha"): (
        lambda v: v > 0, "alpha > 0 (constant 1)",
        "for x < 0 its slope is e^(x/alpha), unbounded as x → −∞ when alpha < 0, and alpha = 0 "
        "divides by zero (NaN)."),
    ("squareplus", "b"): (
        lambda v: v >= 0, "b ≥ 0 (constant 1)",
        "(x + √(x² + b))/2 is NaN for |x| < √(−b) when b < 0, and its slope is unbounded next to "
        "that interval."),
    ("soft_shrink", "threshold"): (
        lambda v: v >= 0, "threshold ≥ 0 (constant 1)",
        "for threshold < 0 it jumps by 2·|threshold| at x = threshold."),
    ("elu", "alpha"): (math.isfinite, "a finite alpha (constant max(1, |alpha|))", ""),
    ("leaky_relu", "negative_slope"): (
        math.isfinite, "a finite negative_slope (constant max(1, |negative_slope|))", ""),
    ("relu", "negative_slope"): (
        math.isfinite, "a finite negative_slope (constant max(1, |negative_slope|))", ""),
    ("relu", "max_value"): (lambda v: True, "a max_value that is a number, or None", ""),
}
_INFINITE_OK = {("relu", "max_value"), ("soft_shrink", "threshold")}


def _check_parameters(name: str, owner: Any, params: dict) -> None:
    """Refuses parameter values for which the activation ``name`` is not Lipschitz.

    Raises:
        NotLipschitzError: Naming the owner, the parameter, its value and the valid range.
    """
    for (act, param), (valid, requirement, reason) in _DOMAINS.items():
        if act != name or params.get(param) is None:
            continue
        value = float(params[param])
        finite = math.isfinite(value) or (value == math.inf and (act, param) in _INFINITE_OK)
        if finite and valid(value):
            continue
        if not finite:
            kind = "NaN" if math.isnan(value) else "infinite"
            reason = f"a {kind} {param} makes its output or its slope NaN or infinite."
        raise NotLipschitzError(
            owner, f"activation '{name}' with {param}={value:g}: {reason} Use {requirement}.")


def activation_info(name: str, owner: Any = None, *, size: int | None = None, **params) -> Activation:
    """The :class:`Activation` of a named Keras activation with parameters.

    Args:
        name: Keras activation name (``"relu"``, ``"leaky_relu"``...).
        owner: The layer using it, named in errors.
        size: Size of the softmax axis (for ``log_softmax``).
        **params: ``negative_slope``, ``alpha``, ``max_value``, ``threshold``, ``approximate``,
            ``b``.

    Raises:
        NotLipschitzError: For activations without a global constant, and for parameters that
            make one non-Lipschitz: celu's ``alpha ≤ 0``, squareplus' ``b < 0``, soft_shrink's
            ``threshold < 0``, relu's ``threshold ≠ 0``, any NaN or infinite parameter.

    Example:
        >>> activation_info("leaky_relu", negative_slope=-3.0).lipschitz
        3.0
        >>> try:
        ...     activation_info("celu", alpha=-1.0)
        ... except NotLipschitzError as error:
        ...     print("Use alpha > 0" in str(error))
        True
    """
    name = _ALIASES.get(name, name)
    owner = owner if owner is not None else name
    _check_parameters(name, owner, params)
    if name in _NOT_LIPSCHITZ:
        raise NotLipschitzError(owner, f"activation '{name}': {_NOT_LIPSCHITZ[name]}")
    if name == "sparsemax" and not _sparsemax_is_projection():
        raise UnsupportedLayerError(
            owner,
            "Keras' sparsemax (TensorFlow backend) is not the Euclidean projection onto the "
            "simplex: its threshold sums the running sums of the sorted inputs "
            "(sparsemax([-0.5, 0.2, 0.9, 0.1]) = [0, 0, 0.167, 0]; the projection is "
            "[0, 0.133, 0.833, 0.033]), and secant ratios above 1 (√3 on 4 entries) grow with "
            "the size, so the projection's constant 1 does not hold. Replace it with a correct "
            "sparsemax and register its rule.",
            suggest_rule=False)
    if name in ("relu", "leaky_relu"):
        slope = float(params.get("negative_slope", 0.2 if name == "leaky_relu" else 0.0) or 0.0)
        threshold = float(params.get("threshold", 0.0) or 0.0)
        if threshold != 0.0:
            raise NotLipschitzError(
                owner, f"relu with threshold={threshold} jumps at the threshold (0 to {threshold})."
            )
        lo, hi = min(slope, 1.0), max(slope, 1.0)
        if params.get("max_value") is not None:
            lo = min(lo, 0.0)
        return Activation(name, max(1.0, abs(slope)), (lo, hi))
    if name == "elu":
        alpha = float(params.get("alpha", 1.0))
        if alpha < 0:
            return Activation(name, max(1.0, abs(alpha)), (min(alpha, 0.0), 1.0))
        return Activation(name, max(1.0, alpha), (0.0, max(1.0, alpha)))
    if name == "gelu" and params.get("approximate", False):
        return _TABLE["gelu_tanh"]
    if name == "log_softmax":
        if size is None:
            raise UnsupportedLayerError(
                owner, "log_softmax needs the size of its axis (pass `size=`).",
                suggest_rule=False)
        return _log_softmax(size)
    if name in _TABLE:
        return _TABLE[name]
    raise UnsupportedLayerError(
        owner,
        f"Unknown activation '{name}'. Register it with "
        "`tfl.register_activation(fn, lipschitz, slope_range)`.",
        suggest_rule=False,
    )


def _name_of(fn: Callable) -> str | None:
    """The Keras name of ``fn`` if it is one of ``keras.activations``' functions."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return None
    try:
        known = keras.activations.get(name)
    except (ValueError, TypeError):
        return None
    return _ALIASES.get(name, name) if known is fn else None


def resolve_activation(fn: Callable | None, owner: Any = None, *, size: int | None = None) -> Activation:
    """Identifies an activation function object (``layer.activation``) and returns its constant.

    Raises:
        NotLipschitzError: For activations that have no global constant.
        UnsupportedLayerError: For an unknown function; the message says how to register it.
    """
    if fn is None:
        return IDENTITY
    if fn in _CUSTOM:
        return _CUSTOM[fn]
    name = _name_of(fn)
    if name is None:
        raise UnsupportedLayerError(
            owner if owner is not None else fn,
            f"Its activation {getattr(fn, '__name__', fn)!r} is not a Keras activation; register "
            "it with `tfl.register_activation(fn, lipschitz, slope_range)`.",
            suggest_rule=False,
        )
    if name in _CUSTOM:
        return _CUSTOM[name]
    return activation_info(name, owner, size=size)


def _last_axis(ctx: NodeContext, axis: int | tuple = -1) -> int:
    shape = (None,) + tuple(ctx.input_shape)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return int(np.prod([shape[a] for a in axes]))


def _activation_layer(layer, ctx: NodeContext) -> Constant:
    size = _last_axis(ctx) if ctx.input_shapes and ctx.input_shape else None
    info = resolve_activation(layer.activation, layer, size=size)
    return Constant(info.lipschitz, certified=info.certified, note=info.name, activation=info)


def _relu_layer(layer, ctx):
    info = activation_info(
        "relu", layer,
        negative_slope=float(layer.negative_slope),
        max_value=None if layer.max_value is None else float(layer.max_value),
        threshold=float(layer.threshold),
    )
    return Constant(info.lipschitz, note="relu", activation=info)


def _leaky_relu_layer(layer, ctx):
    info = activation_info("leaky_relu", layer, negative_slope=float(layer.negative_slope))
    return Constant(info.lipschitz, note=f"leaky_relu({layer.negative_slope:g})", activation=info)


def _elu_layer(layer, ctx):
    info = activation_info("elu", layer, alpha=float(layer.alpha))
    return Constant(info.lipschitz, note=f"elu({layer.alpha:g})", activation=info)


def _prelu_layer(layer, ctx):
    # The slopes as stored and as the layer multiplies by them (rounded to float16 under
    # mixed precision, possibly above the stored value): the bound covers both.
    stored = weight_values(layer, layer.alpha, compute_dtype="float64")
    alpha = np.concatenate([stored.ravel(), weight_values(layer, layer.alpha).ravel()])
    if not np.all(np.isfinite(alpha)):  # max(1, nan) would read as 1
        raise LipschitzError(f"PReLU layer '{ctx.name or layer.name}' has alpha values that are "
                             "not finite (inf/NaN); fix or reinitialise its weights.")
    lo = float(min(alpha.min(), 1.0))
    hi = float(max(alpha.max(), 1.0))
    value = float(max(1.0, np.abs(alpha).max()))
    return Constant(value, note="prelu (max(1, |alpha|) from weights)",
                    activation=Activation("prelu", value, (lo, hi)))


def _softmax_layer(layer, ctx):
    return Constant(0.5, note="softmax: ‖diag(p) − ppᵀ‖ ≤ 1/2",
                    activation=Activation("softmax", 0.5, None))


register_rule(keras.layers.Activation, _activation_layer)
register_rule(keras.layers.ReLU, _relu_layer)
register_rule(keras.layers.LeakyReLU, _leaky_relu_layer)
register_rule(keras.layers.ELU, _elu_layer)
register_rule(keras.layers.PReLU, _prelu_layer)
register_rule(keras.layers.Softmax, _softmax_layer)


def _op_rule(name: str, params: tuple[str, ...] = ()):
    """Rule for an activation op applied to a KerasTensor (``keras.ops.relu(x)``)."""

    def rule(op, ctx: NodeContext) -> Constant:
        kwargs = {p: getattr(op, p) for p in params if hasattr(op, p)}
        size = _last_axis(ctx, getattr(op, "axis", -1)) if name == "log_softmax" else None
        info = activation_info(name, op, size=size, **kwargs)
        return Constant(info.lipschitz, certified=info.certified, note=info.name, activation=info)

    return rule


def _register_ops():
    from keras.src.ops import nn as knn
    from keras.src.ops import numpy as knp

    table = {
        "Relu": ("relu", ()), "Relu6": ("relu6", ()), "Sigmoid": ("sigmoid", ()),
        "Softplus": ("softplus", ()), "Softsign": ("softsign", ()), "Silu": ("silu", ()),
        "Gelu": ("gelu", ("approximate",)), "Elu": ("elu", ("alpha",)), "Selu": ("selu", ()),
        "Celu": ("celu", ("alpha",)), "LeakyRelu": ("leaky_relu", ("negative_slope",)),
        "HardSigmoid": ("hard_sigmoid", ()), "HardSilu": ("hard_silu", ()),
        "HardTanh": ("hard_tanh", ()), "LogSigmoid": ("log_sigmoid", ()),
        "SoftShrink": ("soft_shrink", ("threshold",)), "TanhShrink": ("tanh_shrink", ()),
        "SparsePlus": ("sparse_plus", ()), "SparseSigmoid": ("sparse_sigmoid", ()),
        "Squareplus": ("squareplus", ("b",)), "Softmax": ("softmax", ()),
        "LogSoftmax": ("log_softmax", ()), "Sparsemax": ("sparsemax", ()),
        "HardShrink": ("hard_shrink", ()), "Glu": ("glu", ()), "Threshold": ("threshold", ()),
    }
    for cls_name, (name, params) in table.items():
        cls = getattr(knn, cls_name, None)
        if cls is not None:
            register_rule(cls, _op_rule(name, params))
    register_rule(knp.Tanh, _op_rule("tanh"))
    register_rule(knp.Exp, _op_rule("exponential"))
    # Elementwise ops whose derivative lies in [lo, hi] (SeqLip leaves links with negative
    # slopes to AutoLip): |x| and sin/cos in [-1, 1], clip in {0, 1}, arctan in (0, 1].
    slopes = {knp.Absolute: ("abs", (-1.0, 1.0)), knp.Abs: ("abs", (-1.0, 1.0)),
              knp.Sin: ("sin", (-1.0, 1.0)), knp.Cos: ("cos", (-1.0, 1.0)),
              knp.Clip: ("clip", (0.0, 1.0)), knp.Arctan: ("arctan", (0.0, 1.0))}
    for cls, (name, (lo, hi)) in slopes.items():
        register_rule(cls, _elementwise_op(Activation(name, 1.0, (lo, hi))))


def _elementwise_op(info: Activation):
    """Rule for an elementwise op of constant ``info.lipschitz`` (``keras.ops.abs(x)``)."""

    def rule(op, ctx: NodeContext) -> Constant:
        return Constant(info.lipschitz, note=f"{info.name} (op)", activation=info)

    return rule


_register_ops()
