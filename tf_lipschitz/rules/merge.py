"""Rules for layers and ops that combine several tensors.

AutoLip (Scaman & Virmaux 2018, Alg. 1) gives a node with inputs ``p`` the constant
``Σ_p Lip_p(g) · L_p``. Tighter forms are used where they hold:

- Add / Subtract: ``Σ L_p``; Average: ``(Σ L_p) / n``;
- Concatenate: ``√(Σ L_p²)`` (the outputs occupy disjoint coordinates);
- Maximum / Minimum: ``√(Σ L_p²)`` (per coordinate ``|Δ max| ≤ max_p |Δ x_p|``);
- inputs that depend on disjoint sets of model inputs (branches of a multi-input model):
  ``√(Σ L_p²)`` for sums, ``max L_p`` for Concatenate / Maximum / Minimum, since then
  ``‖Δx‖² = Σ_p ‖Δx_p‖²``;
- Multiply of one input-dependent tensor by constants ``c``: linear, norm ``max |c|``, or
  ``max_j ‖c‖₂`` over the output entries each input entry ``j`` is broadcast to;
- Division of an input-dependent tensor by constants ``c`` (``x / 2.0``, ``ops.divide``,
  ``ops.divide_no_nan``): the product with ``1 / c``; a division *by* an input-dependent
  tensor (``1 / x``) is not globally Lipschitz;
- Multiply / Dot / attention of two input-dependent tensors: not globally Lipschitz.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from keras.src.ops import numpy as knp

from tf_lipschitz.errors import LipschitzError, NotLipschitzError
from tf_lipschitz.rules.base import (
    Linear,
    Merge,
    NodeContext,
    broadcast_factor,
    broadcast_product_norm,
    constant_like,
    register_rule,
)

__all__: list[str] = []

_EPS = float(np.finfo(np.float64).eps)


def _broadcast(merge: Merge, ctx: NodeContext) -> Merge:
    """An elementwise merge whose inputs may be broadcast to the output shape.

    An input of ``n`` entries broadcast to ``N`` output entries is copied ``N / n`` times, and
    the copy map has norm ``√(N / n)``: that input's constant is multiplied by it before the
    merge combines the constants (``x + mean(x, keepdims=True)`` on 16 entries is 2-Lipschitz,
    not 1.25). Applies to sums, means, maxima and minima, not to concatenations.
    """
    return merge.with_input_factors(
        [broadcast_factor(shape, ctx.output_shapes[0]) for shape in ctx.input_shapes])


def _sum_rule(layer, ctx):
    return _broadcast(Merge.sum(), ctx)


def _average_rule(layer, ctx):
    return _broadcast(Merge.mean(), ctx)


def _l2_rule(note, elementwise=True):
    if not elementwise:  # a concatenation: the inputs occupy disjoint output coordinates
        return lambda layer, ctx: Merge.l2(note)
    return lambda layer, ctx: _broadcast(Merge.l2(note), ctx)


def _product_rule(layer, ctx: NodeContext):
    dependent = [i for i, d in enumerate(ctx.dependent) if d]
    if len(dependent) > 1:
        raise NotLipschitzError(
            layer,
            "it multiplies two tensors that both depend on the input (a bilinear map grows "
            "without bound). Bound the input domain, or move the product out of the analysed model.",
        )
    known = sum(ctx.dependent) + sum(value is not None for value in ctx.constants)
    if isinstance(layer, knp.Multiply) and known != 2:  # an operand read as neither
        raise LipschitzError(
            f"Layer '{ctx.name or layer.name}' ({type(layer).__name__}) multiplies by an operand "
            "that is neither input-dependent nor readable as a constant; pass the constant as a "
            "number, a NumPy array or a tensor.")
    return _scaling(ctx, [v for v in ctx.constants if v is not None], dependent)


def _reading_dtype(value, dtype: str) -> str | None:
    """The dtype in which the model applies a constant to a ``dtype`` tensor, or ``None`` when
    it is not a float computation (the constant is then used exactly)."""
    if not keras.backend.is_float_dtype(dtype):
        return None
    if isinstance(value, (bool, int, float)):  # Python scalars are weakly typed: x's dtype
        return dtype
    value_dtype = value.dtype if isinstance(value, keras.Variable) else np.asarray(value).dtype
    return keras.backend.result_type(dtype, keras.backend.standardize_dtype(value_dtype))


def _readings(value, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A constant exactly (float64) and as the model uses it (rounded to the dtype of the
    computation: a Python float in a float32 or bfloat16 model), both in float64. A variable is
    read now (rules are evaluated at every run, so a changed variable is seen)."""
    array = value.numpy() if isinstance(value, keras.Variable) else value
    exact = np.asarray(array, dtype="float64")
    used_dtype = _reading_dtype(value, dtype)
    used = exact if used_dtype is None else ops.convert_to_numpy(  # via float64: no NumPy bf16
        ops.cast(ops.cast(exact, used_dtype), "float64"))
    return exact, used


def _as_used(value, used: np.ndarray, dtype: str):
    """``like(x)``: the constant as the model uses it (``used``, from :func:`_readings`), in
    ``x``'s dtype. A variable is read at every call instead (the solver's operators are built
    once and re-run after training steps)."""
    if isinstance(value, keras.Variable):
        used_dtype = _reading_dtype(value, dtype) or "float64"

        def like(x):
            return ops.cast(ops.cast(value, used_dtype), keras.backend.standardize_dtype(x.dtype))

        return like
    return constant_like(used)


def _scaling(ctx: NodeContext, multipliers, dependent, divisor=None, no_nan=False) -> Linear:
    """``x ↦ x · Π multipliers`` (``/ divisor``): linear, norm from the broadcast magnitudes.

    The operator (``fn``, materialised in float64 by certified mode) uses the constants as the
    model does, rounded to the dtype of the computation; the closed-form norm bounds both that
    and the exact reading.
    """
    bound = np.ones((), dtype="float64")
    factors = []
    for value in multipliers:
        exact, used = _readings(value, ctx.dtype)
        bound = bound * np.maximum(np.abs(exact), np.abs(used))
        factors.append(_as_used(value, used, ctx.dtype))
    note = "product with a constant"
    divisor_like = None
    if divisor is not None:
        exact, used = _readings(divisor, ctx.dtype)
        zero = (exact == 0) | (used == 0)
        if np.any(zero) and not no_nan:
            raise LipschitzError(
                f"Layer '{ctx.name}' divides by a constant with {int(np.sum(zero))} zero "
                "entries (an infinite or undefined output); use `keras.ops.divide_no_nan` if the "
                "zeros are intended.")
        with np.errstate(divide="ignore"):
            magnitude = np.where(zero, 0.0, 1.0 / np.minimum(np.abs(exact), np.abs(used)))
        bound = bound * magnitude * (1 + 2 * _EPS)  # the reciprocal is rounded to nearest
        divisor_like = _as_used(divisor, used, ctx.dtype)
        note = "division by a constant"
    norm_value = broadcast_product_norm(bound, ctx.input_shapes[dependent[0]],
                                         ctx.output_shapes[0]) if dependent else 0.0

    def fn(x):  # the constants follow x: float32 in the solver, float64 when materialised
        y = x
        for like in factors:
            y = y * like(x)
        if divisor_like is None:
            return y
        return ops.divide_no_nan(y, divisor_like(x)) if no_nan else y / divisor_like(x)

    diagonal = bool(dependent) and (tuple(ctx.input_shapes[dependent[0]])
                                    == tuple(ctx.output_shapes[0]))
    return Linear(fn, norm=lambda: norm_value, certificate=lambda: norm_value, note=note,
                  diagonal=diagonal)


def _quotient_rule(layer, ctx: NodeContext):
    """``x / c`` for an input-dependent ``x`` and a constant ``c``."""
    if len(ctx.constants) != 2:
        raise LipschitzError(
            f"Layer '{ctx.name or layer.name}' ({type(layer).__name__}): expected two operands "
            f"(`x / c`), read {len(ctx.constants)}. Call the division with its two operands as "
            "positional arguments (`x / c` or `keras.ops.divide(x, c)`), or register a rule for "
            "the layer that computes it with `tfl.register_rule`.")
    numerator, denominator = ctx.constants
    if denominator is None:
        raise NotLipschitzError(
            layer,
            "it divides by a tensor that depends on the input (`c / x` has no global Lipschitz "
            "constant near x = 0). Bound the input domain, or move the division out of the "
            "analysed model.",
        )
    dependent = [i for i, d in enumerate(ctx.dependent) if d]
    if numerator is not None or not dependent:  # neither operand depends on the input
        raise LipschitzError(
            f"Layer '{ctx.name or layer.name}' ({type(layer).__name__}) divides by a constant "
            "but its numerator is neither input-dependent nor readable as a constant; pass a "
            "constant numerator as a number, a NumPy array or a tensor.")
    return _scaling(ctx, [], dependent, divisor=denominator,
                    no_nan=isinstance(layer, knp.DivideNoNan))


def _bilinear_error(layer, ctx: NodeContext):
    if sum(ctx.dependent) > 1:
        raise NotLipschitzError(
            layer, "it takes products of tensors that both depend on the input (bilinear)."
        )
    raise NotLipschitzError(layer, "attention/dot products are not globally Lipschitz.")


L = keras.layers
register_rule(L.Add, _sum_rule)
register_rule(L.Subtract, _sum_rule)
register_rule(L.Average, _average_rule)
register_rule(L.Concatenate, _l2_rule("√(Σ L²) (disjoint coordinates)", elementwise=False))
register_rule(L.Maximum, _l2_rule("√(Σ L²) (coordinatewise max)"))
register_rule(L.Minimum, _l2_rule("√(Σ L²) (coordinatewise min)"))
register_rule(L.Multiply, _product_rule)
register_rule(L.Dot, _bilinear_error)
for _cls in (L.Attention, L.AdditiveAttention, L.MultiHeadAttention, L.GroupQueryAttention):
    register_rule(_cls, _bilinear_error)

# Keras ops applied to KerasTensors in a functional graph (``x + y``, ``keras.ops.concatenate``).
register_rule(knp.Add, _sum_rule)
register_rule(knp.Subtract, _sum_rule)
register_rule(knp.Concatenate, _l2_rule("√(Σ L²) (disjoint coordinates)", elementwise=False))
register_rule(knp.Maximum, _l2_rule("√(Σ L²) (coordinatewise max)"))
register_rule(knp.Minimum, _l2_rule("√(Σ L²) (coordinatewise min)"))
register_rule(knp.Multiply, _product_rule)
for _cls in (knp.TrueDivide, knp.Divide, knp.DivideNoNan):
    register_rule(_cls, _quotient_rule)
