"""The rule registry: what a Keras layer class contributes to a Lipschitz bound.

A *rule* is a function ``rule(layer, context) -> LayerBound`` registered for a layer class.
It returns one of:

- :class:`Linear`: the layer is affine in its input; its linear part (bias removed) is given as
  a batched function whose operator norm the power method measures on the real input shape,
  optionally followed by an elementwise :class:`Activation`;
- :class:`Constant`: the layer is ``value``-Lipschitz in its single input;
- :class:`Merge`: the layer combines several inputs; ``combine`` maps the parents' constants to
  the layer's.

Rules raise :class:`~tf_lipschitz.errors.NotLipschitzError` for layers that have no global
constant. Adding support for a layer type is one call to :func:`register_rule`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence, Union

import keras
import numpy as np

from tf_lipschitz.errors import InvalidArgumentError, UnsupportedLayerError
from tf_lipschitz.report import combine_outputs, compose_bounds, round_up

_FLOAT64_EPS = float(np.finfo(np.float64).eps)

__all__ = [
    "Activation",
    "Linear",
    "Constant",
    "Merge",
    "LayerBound",
    "NodeContext",
    "register_rule",
    "get_rule",
    "registered_classes",
    "constant",
    "affine",
    "constant_like",
    "weight_as_used",
    "weight_values",
    "check_constant",
    "check_slopes",
    "float32_reference",
]


def check_constant(value: Any, name: str) -> float:
    """Validates a Lipschitz constant given by the user.

    Args:
        value: The value received.
        name: The argument's name, for the message.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: Unless ``value`` is a finite number ``>= 0``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if number >= 0 and math.isfinite(number):
        return number
    raise InvalidArgumentError(
        f"{name} must be a finite number >= 0 (a Lipschitz constant); received {name}={value!r}.")


def check_slopes(slopes: Any, name: str = "slopes") -> tuple[float, float]:
    """Validates a range ``(lo, hi)`` of activation derivatives.

    Args:
        slopes: The value received.
        name: The argument's name, for the message.

    Returns:
        ``(lo, hi)`` as floats.

    Raises:
        InvalidArgumentError: Unless ``slopes`` is a pair of finite numbers with ``lo <= hi``.
    """
    try:
        lo, hi = (float(v) for v in slopes)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
        return lo, hi
    raise InvalidArgumentError(
        f"{name} must be a pair (lo, hi) of finite numbers with lo <= hi, the range of the "
        f"activation's derivative (relu: (0, 1)); received {name}={slopes!r}.")


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation: its Lipschitz constant and the range of its derivative.

    Attributes:
        name: Activation name, e.g. ``"relu"``.
        lipschitz: ``sup |σ'|``, rounded up.
        slope_range: ``(inf σ', sup σ')``, used by SeqLip; ``None`` when the map is not
            elementwise (softmax).
        certified: Whether ``lipschitz`` is a proven upper bound.
    """

    name: str
    lipschitz: float
    slope_range: tuple[float, float] | None = None
    certified: bool = True


IDENTITY = Activation("linear", 1.0, (1.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Linear:
    """The layer is affine in its input, possibly followed by an elementwise activation.

    Attributes:
        fn: Linear part of the layer (bias removed), on batches ``(batch, *input_shape)``.
        activation: Activation applied after the linear part (``None`` for none).
        norm: Optional closed form of the exact operator norm, evaluated with the current weights
            when the bound is computed (used when the layer is not fused with a neighbour).
        certificate: Optional certified upper bound on the operator norm for the layer's input
            shape, evaluated with the current weights.
        note: Shown in the report.
        adjoint: Optional transpose of ``fn`` (maps an output batch back to the input shape).
            When every layer of a fused chain has one, the spectral solver applies ``JᵀJ`` as
            ``adjoint(fn(v))`` instead of an autodiff backward pass (faster for stride-1
            convolutions on CPU). It must be the exact transpose: ``tests/test_adjoints.py``
            checks ``<fn(x), y> == <x, adjoint(y)>`` for every built-in one. A
            :class:`tf_lipschitz.operators.Adjoint` has its weight-dependent part (a flipped
            kernel) prepared once per solve instead of once per product.
        diagonal: The linear part scales every entry of the input by its own factor (same
            input and output shape: BatchNormalization at inference, Rescaling, Normalization).
            Such a scaling commutes with the diagonal derivative of an elementwise activation,
            so AutoLip measures ``Conv2D(activation="relu") → BatchNormalization`` as
            ``m · ‖diag(s) W‖`` instead of ``m · ‖W‖ · max|s|``. Setting it on a layer that
            mixes entries gives a wrong bound.
    """

    fn: Callable[[Any], Any]
    activation: Activation | None = None
    norm: Callable[[], float] | None = None
    certificate: Callable[[], float] | None = None
    note: str = ""
    adjoint: Callable[[Any], Any] | None = None
    diagonal: bool = False

    @property
    def post(self) -> float:
        return 1.0 if self.activation is None else self.activation.lipschitz


@dataclasses.dataclass(frozen=True)
class Constant:
    """The layer is ``value``-Lipschitz in its single input.

    Attributes:
        value: The constant.
        certified: Whether it is a proven upper bound (``False`` for an estimate).
        note: Shown in the report.
        activation: Set when the layer is an elementwise activation (SeqLip uses its slopes).
    """

    value: float
    certified: bool = True
    note: str = ""
    activation: Activation | None = None


@dataclasses.dataclass(frozen=True)
class Merge:
    """The layer merges several inputs.

    Attributes:
        combine: Maps the Lipschitz constants of the inputs (in call order) to the layer's.
        note: Shown in the report, e.g. ``"sum of inputs"``.
        disjoint: The same map when the inputs depend on disjoint sets of model inputs (two
            branches of a multi-input model), where ``‖Δx‖² = Σ_p ‖Δx_p‖²`` allows a tighter
            form: ``√(Σ L_p²)`` for a sum (Cauchy–Schwarz), ``max_p L_p`` for a concatenation.
            ``None``: ``combine`` is used.
    """

    combine: Callable[[Sequence[float]], float]
    note: str = ""
    disjoint: Callable[[Sequence[float]], float] | None = None

    @classmethod
    def sum(cls, note: str = "sum of inputs") -> "Merge":
        """A sum of the inputs: ``Σ L_p``, or ``√(Σ L_p²)`` for disjoint model inputs."""
        return cls(_sum, note, disjoint=_l2)

    @classmethod
    def mean(cls, note: str = "mean of inputs") -> "Merge":
        """The mean of the inputs: ``Σ L_p / n``, or ``√(Σ L_p²) / n`` for disjoint inputs."""
        return cls(lambda values: _sum(values) / len(values), note,
                   disjoint=lambda values: _l2(values) / len(values))

    def with_input_factors(self, factors: Sequence[float]) -> "Merge":
        """The merge of inputs first multiplied by Lipschitz ``factors`` (one per input).

        Used for broadcasting in elementwise merges: an input of ``n`` entries copied to ``N``
        output entries goes through a map of norm ``√(N / n)`` before it is added (or maxed)
        with the others (``x + mean(x, keepdims=True)`` on 16 entries is 2-Lipschitz, not 1.25).
        """
        factors = [float(f) for f in factors]
        if all(f == 1.0 for f in factors):
            return self

        def scaled(combine):  # a factor 0 (an empty output) makes even an inf input constant
            return lambda values: combine(
                [compose_bounds((v, True), (f, True)) for v, f in zip(values, factors)])

        copies = ", ".join(f"{f * f:g}" for f in factors if f != 1.0)
        return Merge(scaled(self.combine), f"{self.note}; broadcast inputs ×√copies ({copies})",
                     disjoint=None if self.disjoint is None else scaled(self.disjoint))

    @classmethod
    def l2(cls, note: str) -> "Merge":
        """Inputs on disjoint output coordinates (concatenation) or a coordinatewise max/min:
        ``√(Σ L_p²)``, or ``max_p L_p`` for disjoint model inputs."""
        return cls(_l2, note, disjoint=lambda values: float(max(values, default=0.0)))


def _sum(values: Sequence[float]) -> float:
    return float(sum(values))


def _l2(values: Sequence[float]) -> float:
    return combine_outputs(values)  # √(Σ v²) without overflow or underflow in the squares


LayerBound = Union[Linear, Constant, Merge]


@dataclasses.dataclass(frozen=True)
class NodeContext:
    """What a rule knows about one call of a layer in the model.

    Attributes:
        input_shapes: Per-example shapes of the inputs (batch axis removed).
        output_shapes: Per-example shapes of the outputs.
        dependent: For each input, whether it depends on the model input (``False`` for
            constants).
        constants: For each positional argument of the call (flattened, in order), its value
            (a batch-1 array, a number, a captured tensor) when it does not depend on the model
            input, else ``None``: ``x / 2.0`` gives ``(None, 2.0)``, ``2.0 / x`` ``(2.0, None)``.
        dtype: Floating dtype of the inputs.
        name: Qualified name of the node (``"outer/inner/conv1"`` for nested models).
    """

    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    dependent: tuple[bool, ...] = ()
    constants: tuple[Any, ...] = ()
    dtype: str = "float32"
    name: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input_shapes[0]


Rule = Callable[[Any, NodeContext], LayerBound]
_REGISTRY: dict[type, Rule] = {}


def register_rule(layer_class: type, rule: Rule | None = None):
    """Registers the Lipschitz rule of a layer class (usable as a decorator).

    Args:
        layer_class: A Keras layer (or operation) class. Subclasses that do not override
            ``call`` inherit the rule.
        rule: ``rule(layer, context) -> LayerBound``. Helpers :func:`constant` and
            :func:`affine` build the common ones.

    Returns:
        The rule (so that the function can be used as ``@register_rule(MyLayer)``).

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> class Halve(keras.layers.Layer):
        ...     def call(self, x):
        ...         return 0.5 * x
        >>> _ = tfl.register_rule(Halve, tfl.rules.constant(0.5))
    """
    if not isinstance(layer_class, type):
        raise InvalidArgumentError(
            f"layer_class must be a class (a Keras layer class such as keras.layers.Dense, not "
            f"an instance); received layer_class={layer_class!r}."
        )

    def decorator(fn: Rule) -> Rule:
        if not callable(fn):
            raise InvalidArgumentError(
                f"rule must be a callable rule(layer, context) -> LayerBound (see "
                f"tfl.rules.constant and tfl.rules.affine); received rule={fn!r}.")
        _REGISTRY[layer_class] = fn
        return fn

    return decorator if rule is None else decorator(rule)


def _call_owner(cls: type) -> type | None:
    for klass in cls.__mro__:
        if "call" in vars(klass):
            return klass
    return None


def get_rule(layer: Any) -> Rule:
    """Returns the rule registered for ``type(layer)`` (or an inherited one).

    Raises:
        UnsupportedLayerError: If no rule applies.
    """
    cls = type(layer)
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    owner = _call_owner(cls)
    for base in cls.__mro__[1:]:
        if base in _REGISTRY:
            if owner is None or issubclass(base, owner):
                return _REGISTRY[base]
            raise UnsupportedLayerError(
                layer,
                f"It subclasses {base.__qualname__}, which has a rule, but {owner.__qualname__} "
                "overrides call(), so the inherited rule may not hold.",
            )
    raise UnsupportedLayerError(layer)


def registered_classes() -> list[type]:
    """Layer classes that currently have a rule."""
    return list(_REGISTRY)


def constant(value: float, *, certified: bool = True, note: str = "") -> Rule:
    """A rule for a layer that is ``value``-Lipschitz in its single input."""
    value = check_constant(value, "value")

    def rule(layer, ctx):
        return Constant(value, certified=certified, note=note)

    return rule


def constant_like(value: Any) -> Callable[[Any], Any]:
    """A constant captured by a rule, converted to the dtype of the input it is applied to.

    A rule's ``fn`` runs in the model's dtype (float32) in the spectral solver and in float64
    when :mod:`tf_lipschitz.certify` materialises a small operator for an exact certificate;
    a constant frozen in one dtype makes the other fail (TensorFlow does not promote
    ``float64 * float32``). The value is kept in float64 (float32 values convert exactly) and
    converted on use.

    Args:
        value: The constant: a number or an array that broadcasts against the input.

    Returns:
        ``like(x)``: the constant as a tensor of ``x``'s dtype.

    Example:
        >>> import numpy as np
        >>> scale = constant_like(np.array([2.0, 0.5], "float32"))
        >>> x = np.ones((1, 2), "float64")
        >>> keras.backend.standardize_dtype((x * scale(x)).dtype)
        'float64'
    """
    array = np.asarray(value, dtype=np.float64)

    def like(x):  # NumPy is converted on use: no tensor is shared between traced graphs
        return keras.ops.convert_to_tensor(array, dtype=keras.backend.standardize_dtype(x.dtype))

    return like


def weight_as_used(layer: Any, value: Any, dtype: str = "float64", *,
                   compute_dtype: str | None = None) -> Any:
    """A weight as ``layer`` multiplies by it, converted to ``dtype``.

    A Keras layer computes in its ``compute_dtype``: under ``mixed_float16`` a Dense layer keeps
    a float32 kernel and multiplies by its float16 rounding. Every weight a rule reads, for its
    ``fn`` (run in float32, in float16, or in float64 when :mod:`tf_lipschitz.certify`
    materialises it) and for a certificate, goes through that rounding first, so that the bound
    is of the map the model computes rather than of its float32 variables.

    Args:
        layer: The layer that owns the weight.
        value: A variable, tensor, array or number.
        dtype: Dtype of the result (that of the input the weight is applied to).
        compute_dtype: The dtype the layer computes this product in, when it is not
            ``layer.compute_dtype`` (BatchNormalization upcasts half precision to float32).

    Returns:
        A tensor of ``dtype``.

    Example:
        >>> import keras
        >>> layer = keras.layers.Dense(1, dtype="mixed_float16")
        >>> layer.build((None, 1))
        >>> _ = layer.kernel.assign([[1.0001]])
        >>> float(weight_as_used(layer, layer.kernel)[0, 0])
        1.0
    """
    computed = compute_dtype or getattr(layer, "compute_dtype", None)
    if computed is not None:
        value = keras.ops.cast(value, computed)
    return keras.ops.cast(value, dtype)


def weight_values(layer: Any, value: Any, *, compute_dtype: str | None = None) -> np.ndarray:
    """:func:`weight_as_used` as a float64 NumPy array, for closed forms and certificates."""
    used = weight_as_used(layer, value, "float64", compute_dtype=compute_dtype)
    return np.asarray(keras.ops.convert_to_numpy(used), dtype=np.float64)


def broadcast_product_norm(magnitude: np.ndarray, input_shape, output_shape) -> float:
    """Norm of ``x ↦ x ⊙ c`` on one example, ``|c|`` given, broadcasting included.

    Every input entry ``x_j`` is copied to the output entries of its broadcast fibre and scaled
    by ``c`` there; fibres are disjoint, so the columns of the matrix are orthogonal and the
    norm is ``max_j ‖c|fibre(j)‖₂`` (``max |c|`` when nothing is broadcast).
    """
    out = (1, *output_shape)
    x = (1, *input_shape)
    x = (1,) * (len(out) - len(x)) + x
    c = np.broadcast_to(magnitude, out)
    axes = tuple(a for a, (n, m) in enumerate(zip(x, out)) if n == 1 and m != 1)
    if c.size == 0:
        return 0.0
    peak = float(np.max(c))
    if not axes:
        return peak
    # Divided by a power of two near the largest entry (exactly), the squares neither overflow
    # (|c| above 1e154) nor underflow (below 1e-154); the roots of sums in range are unchanged.
    # A float64 sum of k squares and its root are within (k + 2)·eps of the exact value.
    scale = math.ldexp(1.0, math.frexp(peak)[1] - 1) if math.isfinite(peak) and peak > 0 else 1.0
    c = c / scale
    copies = math.prod(out[a] for a in axes)
    root = float(np.sqrt(np.max(np.sum(c * c, axis=axes))))
    return root * scale * (1 + (copies + 2) * _FLOAT64_EPS)


def broadcast_factor(input_shape: Sequence[int], output_shape: Sequence[int]) -> float:
    """Norm of broadcasting one input of an elementwise op to the output shape.

    Broadcasting copies each of the ``n`` input entries ``N / n`` times (``N`` output entries),
    so the copy map ``x ↦ broadcast(x)`` has norm ``√(N / n)`` exactly (1 without broadcast).
    """
    size = math.prod(input_shape)
    return math.sqrt(math.prod(output_shape) / size) if size else 1.0


def certified_max(layer: Any, closed_form: Callable[[float], Any], epsilon: float, dtype: str,
                   computed: Sequence[Any], operations: int) -> float:
    """A certified upper bound on the largest entry of a per-channel closed form.

    ``closed_form(ε)`` gives the magnitudes in float64, from the weights as the layer reads them
    (:func:`~tf_lipschitz.rules.base.weight_values`). It is evaluated for ``ε`` in float64 and
    rounded to ``dtype`` as the layer adds it (a smaller ``ε`` gives a larger ``1/√(var+ε)``;
    both are tried), its maximum is widened by ``operations`` float64 roundings, and the values
    the layer computes itself (``computed``: rounded in its dtype, they can sit a unit above the
    exact ones) are included. A NaN stays NaN, so that AutoLip refuses the factor.

    Args:
        layer: The layer (``None`` for a TensorFlow op: ``dtype`` says how it rounds).
        closed_form: ``closed_form(epsilon) -> float64 array`` of non-negative magnitudes.
        epsilon: The layer's epsilon.
        dtype: The dtype the layer adds epsilon in.
        computed: Magnitudes as the layer computes them (arrays or tensors).
        operations: Float64 operations in ``closed_form`` (each rounds once).

    Returns:
        The bound (a float).
    """
    readings = (float(epsilon), float(weight_values(layer, epsilon, compute_dtype=dtype)))
    with np.errstate(divide="ignore", invalid="ignore"):  # np.max keeps NaN, max() may not
        exact = float(np.max([np.max(closed_form(eps)) for eps in readings]))
    values = [round_up(exact, operations)]
    values += [np.max(np.abs(keras.ops.convert_to_numpy(v))) for v in computed]
    return float(np.max(values))


def float32_reference(layer: Any) -> Any:
    """``layer``, or a float32 copy of it (same config) when it computes in half precision.

    For rules that check their model of a layer against the layer itself on a random input:
    under ``mixed_float16`` the layer's own rounding (``1e-3``) would hide a wrong window.

    Example:
        >>> layer = keras.layers.AdaptiveAveragePooling1D(2, dtype="mixed_float16")
        >>> float32_reference(layer).compute_dtype
        'float32'
    """
    if getattr(layer, "compute_dtype", "float32") in ("float32", "float64"):
        return layer
    return type(layer).from_config({**layer.get_config(), "dtype": "float32"})


def affine() -> Rule:
    """A rule for a layer that is affine in its input: ``x ↦ layer(x) − layer(0)`` is measured.

    The layer's norm is estimated by the autodiff power method on its real input shape. With
    ``autolip(certified=True)``, a small chain containing the layer is materialised in float64
    (called without Keras' float32 input cast) and bounded exactly; that needs the layer to
    compute in the dtype of its input (``ops.add(y, self.b)`` or ``ops.cast(self.b, x.dtype)``
    rather than ``y + self.b`` with a float32 variable). A layer that cannot leaves its factor
    an estimate, with a warning (see ``docs/certified.md``).
    """

    def rule(layer, ctx):
        def fn(x):
            return layer(x) - layer(x * 0)

        return Linear(fn, note="affine (user rule)")

    return rule
