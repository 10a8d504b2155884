"""Rules for recurrent layers: ``SimpleRNN`` and ``Bidirectional`` over it.

``SimpleRNN`` computes ``h_t = φ(x_t W + h_{t−1} U + b)`` from ``h_0 = 0``. With ``a`` the
Lipschitz constant of ``φ``, ``w = ‖W‖₂`` and ``u = ‖U‖₂``, a perturbation moves the states by
``‖δh_t‖ ≤ a (w ‖δx_t‖ + u ‖δh_{t−1}‖)``, so, unrolled, ``‖δh_t‖ ≤ a w Σ_{s≤t} r^{t−s} ‖δx_s‖``
with ``r = a u``: the vector of state perturbations is bounded entrywise by ``a w M`` times that
of the input perturbations, ``M`` the lower-triangular Toeplitz matrix ``M_{ts} = r^{t−s}``.
Hence the constant

- of the whole sequence (``return_sequences=True``): ``a · w · ‖M‖₂``;
- of the last state: ``a · w · ‖M_{T,:}‖₂ = a · w · √(Σ_{k<T} r^{2k})``.

``‖M‖₂`` is computed exactly (a certified float64 bound) up to 1024 steps and bounded by
Young's inequality ``‖M‖₂ ≤ Σ_{k<T} r^k`` beyond; when ``r^{T−1}`` overflows float64 the bound
is ``inf`` (and 0 for a zero input kernel, whose states ignore the input). ``go_backwards``
reverses the sequence (an isometry).
The weights are read as the cell multiplies by them (:func:`~tf_lipschitz.rules.base.weight_values`).

``Bidirectional(layer, merge_mode)`` runs two such layers on the same input: their outputs are
concatenated (``√(L_f² + L_b²)``), summed (``L_f + L_b``) or averaged; ``mul`` multiplies two
input-dependent tensors and has no global constant.

LSTM and GRU multiply gates by input-dependent states: they are Lipschitz (every factor is
bounded) but have no rule yet, and are refused with that reason.

Example:
    >>> import keras, numpy as np, tf_lipschitz as tfl
    >>> model = keras.Sequential([keras.Input((6, 3)), keras.layers.SimpleRNN(4)])
    >>> report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    >>> cell = model.layers[0].cell
    >>> w = np.linalg.norm(cell.kernel.numpy(), 2)
    >>> r = np.linalg.norm(cell.recurrent_kernel.numpy(), 2)  # tanh: a = 1
    >>> bound = w * np.sqrt(sum(r ** (2 * k) for k in range(6)))
    >>> bool(report.certified and np.isclose(report.upper, bound, rtol=1e-4))  # margins
    True
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from tf_lipschitz import certify
from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules.activations import resolve_activation
from tf_lipschitz.rules.base import Constant, NodeContext, register_rule, weight_values
from tf_lipschitz.rules.wrapped import wrapped_bound

__all__: list[str] = []

_EXACT_STEPS = 1024  # longest sequence whose ‖M‖₂ is computed exactly
_EPS = float(np.finfo(np.float64).eps)


def _norm(layer, variable) -> float:
    """Certified ``‖W‖₂`` of a weight as the layer multiplies by it (and as stored)."""
    used = weight_values(layer, variable)
    stored = weight_values(layer, variable, compute_dtype="float64")
    return max(certify.max_singular_value(m[None], method="exact") for m in (used, stored))


def _unrolled_norm(r: float, steps: int | None, sequences: bool, layer) -> tuple[float, str]:
    """A certified bound on ``‖M‖₂`` (all states) or ``‖M_{T,:}‖₂`` (last state)."""
    if steps is None:  # the graph walk gives concrete shapes; a rule called directly may not
        raise UnsupportedLayerError(
            layer, "Its sequence length is unknown, and the constant depends on it: build the "
            "model with a fixed length (keras.Input((T, features))).", suggest_rule=False)
    with np.errstate(over="ignore"):
        powers = r ** np.arange(steps, dtype=np.float64)
    if not np.isfinite(powers[-1]):  # r^(T-1) > 1.8e308: no finite float64 bound
        return math.inf, f"T={steps}, r^(T-1) overflows"
    if not sequences:
        peak = float(np.max(powers))  # scaled first: the squares overflow from r^k ≈ 1e154
        root = math.sqrt(float(np.sum((powers / peak) ** 2)))
        return peak * root * (1 + 4 * steps * _EPS), f"T={steps}"
    if steps <= _EXACT_STEPS:
        index = np.arange(steps)
        lag = index[:, None] - index[None, :]
        toeplitz = np.where(lag >= 0, r ** np.maximum(lag, 0), 0.0)
        return certify.max_singular_value(toeplitz[None], method="exact"), f"T={steps}"
    return float(np.sum(powers)) * (1 + 4 * steps * _EPS), f"T={steps}, Young"


def _simple_rnn(layer, ctx: NodeContext) -> Constant:
    _check_recurrent(layer, ctx)
    cell = layer.cell
    act = resolve_activation(cell.activation, layer, size=cell.units)
    w, u = _norm(cell, cell.kernel), _norm(cell, cell.recurrent_kernel)
    r = act.lipschitz * u
    factor, length = _unrolled_norm(r, ctx.input_shape[0], layer.return_sequences, layer)
    value = act.lipschitz * w * factor if w > 0 else 0.0  # W = 0: no input reaches the states
    what = "all states" if layer.return_sequences else "last state"
    return Constant(value, certified=act.certified,
                    note=f"SimpleRNN ({what}, {length}): a‖W‖·‖M(a‖U‖ = {r:.4g})‖")


def _check_recurrent(layer, ctx: NodeContext) -> None:
    if len(ctx.input_shapes) != 1:
        raise UnsupportedLayerError(
            layer, "It is called with an initial state: only the zero initial state is "
            "supported (analyse the model without initial_state=).", suggest_rule=False)
    if getattr(layer, "stateful", False):
        raise UnsupportedLayerError(
            layer, "It is stateful: its output depends on states left by earlier batches; "
            "analyse a copy with stateful=False.", suggest_rule=False)
    if getattr(layer, "return_state", False):
        raise UnsupportedLayerError(
            layer, "It returns its states as extra outputs (return_state=True); analyse a model "
            "that uses only its main output.", suggest_rule=False)


def _bidirectional(layer, ctx: NodeContext) -> Constant:
    _check_recurrent(layer, ctx)
    mode = layer.merge_mode
    if mode not in ("concat", "sum", "ave"):
        detail = ("merge_mode='mul' multiplies the two directions' outputs, two "
                  "input-dependent tensors" if mode == "mul" else
                  "merge_mode=None returns the two directions as separate outputs")
        raise (NotLipschitzError(layer, detail + ".") if mode == "mul" else
               UnsupportedLayerError(layer, detail + "; use 'concat', 'sum' or 'ave'.",
                                     suggest_rule=False))
    out = tuple(ctx.output_shapes[0])
    if mode == "concat":
        out = out[:-1] + (out[-1] // 2,)
    bounds = []
    for sub in (layer.forward_layer, layer.backward_layer):
        bound = wrapped_bound(layer, sub, dataclasses.replace(
            ctx, output_shapes=(out,), name=f"{ctx.name}/{sub.name}"))
        if not isinstance(bound, Constant):
            raise UnsupportedLayerError(
                layer, f"Its layer '{sub.name}' is not a recurrent layer with a constant.",
                suggest_rule=False)
        bounds.append(bound)
    forward, backward = (b.value for b in bounds)
    value = {"concat": math.hypot(forward, backward), "sum": forward + backward,
             "ave": 0.5 * (forward + backward)}[mode]
    return Constant(value, certified=all(b.certified for b in bounds),
                    note=f"Bidirectional ({mode}) of {forward:.4g} and {backward:.4g}")


def _gated(layer, ctx: NodeContext):
    raise UnsupportedLayerError(
        layer, f"{type(layer).__name__} multiplies gates by input-dependent states: it is "
        "Lipschitz (every factor is bounded) but tf_lipschitz has no rule for it yet. SimpleRNN "
        "is supported; for this layer register a rule of your own (tfl.register_rule).",
        suggest_rule=False)


register_rule(keras.layers.SimpleRNN, _simple_rnn)
register_rule(keras.layers.Bidirectional, _bidirectional)
for _cls in (keras.layers.LSTM, keras.layers.GRU, keras.layers.ConvLSTM1D,
             keras.layers.ConvLSTM2D, keras.layers.ConvLSTM3D):
    register_rule(_cls, _gated)
