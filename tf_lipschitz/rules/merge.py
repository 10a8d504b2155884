"""Rules for layers and ops that combine several tensors.

AutoLip (Scaman & Virmaux 2018, Alg. 1) gives a node with inputs ``p`` the constant
``Σ_p Lip_p(g) · L_p``. Tighter forms are used where they hold:

- Add / Subtract: ``Σ L_p``; Average: ``(Σ L_p) / n``;
- Concatenate: ``√(Σ L_p²)`` (the outputs occupy disjoint coordinates);
- Maximum / Minimum: ``√(Σ L_p²)`` (per coordinate ``|Δ max| ≤ max_p |Δ x_p|``);
- Multiply of one input-dependent tensor by constants: linear, norm ``max |c|``;
- Multiply / Dot / attention of two input-dependent tensors: not globally Lipschitz.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops
from keras.src.ops import numpy as knp

from tf_lipschitz.errors import NotLipschitzError
from tf_lipschitz.rules.base import Linear, Merge, NodeContext, register_rule

__all__: list[str] = []


def _sum(values):
    return float(sum(values))


def _l2(values):
    return math.sqrt(sum(v * v for v in values))


def _sum_rule(layer, ctx):
    return Merge(_sum, "sum of inputs")


def _average_rule(layer, ctx):
    return Merge(lambda values: _sum(values) / len(values), "mean of inputs")


def _l2_rule(note):
    return lambda layer, ctx: Merge(_l2, note)


def _product_rule(layer, ctx: NodeContext):
    dependent = [i for i, d in enumerate(ctx.dependent) if d]
    if len(dependent) > 1:
        raise NotLipschitzError(
            layer,
            "it multiplies two tensors that both depend on the input (a bilinear map grows "
            "without bound). Bound the input domain, or move the product out of the analysed model.",
        )
    factor = np.ones((), dtype="float64")
    for value in ctx.constants:
        if value is not None:
            factor = factor * np.asarray(value, dtype="float64")
    factor_t = ops.convert_to_tensor(factor.astype(ctx.dtype))
    norm_value = float(np.max(np.abs(factor))) if factor.size else 0.0

    def fn(x):
        return x * factor_t

    # Only exact when the constant broadcasts elementwise (no summation over a shape).
    return Linear(fn, norm=lambda: norm_value, certificate=lambda: norm_value,
                  note="product with a constant")


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
register_rule(L.Concatenate, _l2_rule("√(Σ L²) (disjoint coordinates)"))
register_rule(L.Maximum, _l2_rule("√(Σ L²) (coordinatewise max)"))
register_rule(L.Minimum, _l2_rule("√(Σ L²) (coordinatewise min)"))
register_rule(L.Multiply, _product_rule)
register_rule(L.Dot, _bilinear_error)
for _cls in (L.Attention, L.AdditiveAttention, L.MultiHeadAttention, L.GroupQueryAttention):
    register_rule(_cls, _bilinear_error)

# Keras ops applied to KerasTensors in a functional graph (``x + y``, ``keras.ops.concatenate``).
register_rule(knp.Add, _sum_rule)
register_rule(knp.Subtract, _sum_rule)
register_rule(knp.Concatenate, _l2_rule("√(Σ L²) (disjoint coordinates)"))
register_rule(knp.Maximum, _l2_rule("√(Σ L²) (coordinatewise max)"))
register_rule(knp.Minimum, _l2_rule("√(Σ L²) (coordinatewise min)"))
register_rule(knp.Multiply, _product_rule)
