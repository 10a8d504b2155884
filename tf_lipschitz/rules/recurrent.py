"""Rules for recurrent layers: ``SimpleRNN``, ``LSTM``, ``GRU`` and ``Bidirectional`` over them.

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

**LSTM and GRU** multiply gates by states. Both factors are bounded when the gate activation
``σ`` (``recurrent_activation``) maps into ``[0, 1]`` (sigmoid, hard_sigmoid, sparse_sigmoid)
and the activation ``φ`` into a bounded range ``[lo, hi]`` (tanh, softsign, hard_tanh: ``[−1,
1]``; sigmoid, hard_sigmoid, sparse_sigmoid: ``[0, 1]``); other activations are refused (an
unbounded ``φ`` such as relu leaves the cell state unbounded, and a gate times it has no global
constant). Write ``a_σ``, ``a_φ`` for their constants, ``p = max(|lo|, |hi|)``, ``w_k = ‖W_k‖₂``
and ``u_k = ‖U_k‖₂`` for the input and recurrent kernel columns of gate ``k`` (Keras' order:
LSTM ``i, f, c, o``; GRU ``z, r, h``) and ``z_k = x_t W_k + h_{t−1} U_k + b_k``, so that
``‖δz_k‖ ≤ w_k ‖δx_t‖ + u_k ‖δh_{t−1}‖``. The bounds compare two trajectories (differences, not
derivatives: they hold at the kinks of hard_sigmoid too) with ``δ(a⊙b) = δa⊙b + a'⊙δb``,
``|a'⊙v| ≤ |v|`` for a gate ``a' ∈ [0, 1]``.

- LSTM: ``c_t = f⊙c_{t−1} + i⊙φ(z_c)``, ``h_t = o⊙φ(c_t)`` with ``|c_t| ≤ C_t = t·p``, so
  ``‖δc_t‖ ≤ ‖δc_{t−1}‖ + a_σ C_{t−1} ‖δz_f‖ + a_σ p ‖δz_i‖ + a_φ ‖δz_c‖`` and
  ``‖δh_t‖ ≤ a_φ ‖δc_t‖ + a_σ p ‖δz_o‖``.
- GRU: ``h_t = z⊙h_{t−1} + (1 − z)⊙ĥ``: the states stay in ``[m, M] = [min(lo, 0), max(hi,
  0)]`` and ``|h_{t−1} − ĥ| ≤ D = M − m``. Coordinatewise ``|z'a + (1 − z')b| ≤ max(|a|, |b|)``,
  so ``‖δh_t‖ ≤ a_σ D ‖δz_z‖ + √(‖δh_{t−1}‖² + ‖δĥ‖²)`` (tighter than the sum) with
  ``‖δĥ‖ ≤ a_φ (w_h ‖δx_t‖ + S a_σ ‖δz_r‖ + u_h ‖δh_{t−1}‖)``. With ``reset_after=True``
  (``ĥ = φ(x W_h + b_in + r⊙(h U_h + b_rec))``) ``S`` bounds ``|h U_h + b_rec|∞`` over states in
  ``[m, M]`` (from the weights' entries); with ``reset_after=False`` (``ĥ = φ(x W_h + (r⊙h) U_h
  + b)``) ``S = p u_h``. Minkowski's inequality, ``√(H² + (X e + Y H)²) ≤ √(1 + Y²) H + X e``,
  makes the step linear: ``‖δh_t‖ ≤ α ‖δx_t‖ + β ‖δh_{t−1}‖`` with ``α = a_σ D w_z + a_φ (w_h
  + S a_σ w_r)`` and ``β = a_σ D u_z + √(1 + a_φ² (u_h + S a_σ u_r)²) ≥ 1``.

Every coefficient is ``≥ 0``, so by induction ``‖δh_t‖ ≤ Σ_{s≤t} G_{ts} ‖δx_s‖`` for a
lower-triangular ``G ≥ 0`` computed by the same recursion in float64 (widened for its
roundings), and the constant is ``‖G‖₂`` for all states and ``‖G_{T,:}‖₂`` for the last one, as
for SimpleRNN (``√(‖G‖₁‖G‖∞)`` beyond 1024 steps). For a GRU, ``G = α M(β)`` is SimpleRNN's
Toeplitz form; for an LSTM the forget term grows with ``C_{t−1}``. Overflow gives ``inf``.
The bound is exact in the worst cases it is built from (a candidate-only LSTM with saturated
gates, a hard_sigmoid gate at its kink; ``tests/rules/test_gated.py``) but very loose for
trained cells: it grows geometrically (GRU) or faster (LSTM) with the length, while a trained
cell's gates do not align every worst case along a sequence. On random cells of 5 steps and
3–4 units the bound is 20 to 900 times the largest Jacobian norm found by gradient ascent; on
the MNIST-rows example (``examples/sequence_models.py``, 28 steps, 32 units) a trained
``Bidirectional(LSTM)`` layer is bounded by 3e25 and a ``Bidirectional(GRU)`` by 3e23, against
lower bounds of 72 and 9.4 found by search on the layer alone: a certificate of finiteness
there, not a usable number.
``ConvLSTM1D/2D/3D`` are refused.

``Bidirectional(layer, merge_mode)`` runs two such layers on the same input: their outputs are
concatenated (``√(L_f² + L_b²)``), summed (``L_f + L_b``) or averaged; ``mul`` multiplies two
input-dependent tensors and has no global constant.

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

    One LSTM step (tanh and sigmoid: ``a_φ = p = 1``, ``a_σ = 1/4``) is bounded by
    ``a_φ (a_σ p w_i + a_φ w_c) + a_σ p w_o``:

    >>> lstm = keras.Sequential([keras.Input((1, 3)), keras.layers.LSTM(4)])
    >>> report = tfl.LipschitzEstimator(lstm, verbose=0).autolip(certified=True)
    >>> w_i, w_f, w_c, w_o = (np.linalg.norm(k, 2)
    ...                       for k in np.split(lstm.layers[0].cell.kernel.numpy(), 4, axis=1))
    >>> bool(report.certified and np.isclose(report.upper, w_c + (w_i + w_o) / 4, rtol=1e-4))
    True
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterator

import keras
import numpy as np

from tf_lipschitz import certify
from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.report import round_up
from tf_lipschitz.rules.activations import resolve_activation
from tf_lipschitz.rules.base import (
    Activation,
    Constant,
    NodeContext,
    register_rule,
    weight_values,
)
from tf_lipschitz.rules.wrapped import wrapped_bound

__all__: list[str] = []

_EXACT_STEPS = 1024  # longest sequence whose ‖M‖₂ is computed exactly
_EPS = float(np.finfo(np.float64).eps)
# Ranges [lo, hi] of the bounded Keras activations a gated cell may use (its states and the
# gates multiplying them stay bounded only then).
_RANGES = {"tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0), "hard_tanh": (-1.0, 1.0),
           "sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "sparse_sigmoid": (0.0, 1.0)}


def _readings(layer, variable) -> tuple[np.ndarray, np.ndarray]:
    """A weight as the layer multiplies by it and as stored, in float64."""
    return (weight_values(layer, variable),
            weight_values(layer, variable, compute_dtype="float64"))


def _gate_norms(layer, variable, gates: int) -> list[float]:
    """Certified ``‖W_k‖₂`` of each of ``gates`` equal column blocks of a weight: the larger of
    the norms of the block as the layer multiplies by it and as stored."""
    blocks = [np.split(m, gates, axis=-1) for m in _readings(layer, variable)]
    return [max(certify.max_singular_value(m[None], method="exact") for m in pair)
            for pair in zip(*blocks)]


def _norm(layer, variable) -> float:
    """Certified ``‖W‖₂`` of a weight as the layer multiplies by it (and as stored)."""
    return _gate_norms(layer, variable, 1)[0]


def _steps(layer, ctx: NodeContext) -> int:
    """The sequence length of the layer's input; an error when it is unknown."""
    steps = ctx.input_shape[0]
    if steps is None:  # the graph walk gives concrete shapes; a rule called directly may not
        raise UnsupportedLayerError(
            layer, "Its sequence length is unknown, and the constant depends on it: build the "
            "model with a fixed length (keras.Input((T, features))).", suggest_rule=False)
    return int(steps)


def _unrolled_norm(r: float, steps: int, sequences: bool) -> tuple[float, str]:
    """A certified bound on ``‖M‖₂`` (all states) or ``‖M_{T,:}‖₂`` (last state)."""
    with np.errstate(over="ignore"):
        powers = r ** np.arange(steps, dtype=np.float64)
    if not np.isfinite(powers[-1]):  # r^(T-1) > 1.8e308: no finite float64 bound
        return math.inf, f"T={steps}, r^(T-1) overflows"
    if not sequences:  # hypot: the squares would overflow from r^k ≈ 1e154
        return math.hypot(*powers) * (1 + 4 * steps * _EPS), f"T={steps}"
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
    factor, length = _unrolled_norm(r, _steps(layer, ctx), layer.return_sequences)
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


@dataclasses.dataclass(frozen=True)
class _Bounded:
    """A bounded activation of a gated cell: its constant and its range ``[lo, hi]``."""

    info: Activation
    lo: float
    hi: float

    @property
    def lipschitz(self) -> float:
        return self.info.lipschitz

    @property
    def peak(self) -> float:
        """``p = max |φ|``."""
        return max(-self.lo, self.hi)


def _bounded(layer, argument: str) -> _Bounded:
    """The cell's ``activation`` or ``recurrent_activation`` with its range; an error unless it
    is a bounded Keras activation (with range inside ``[0, 1]`` for the gates)."""
    cell = layer.cell
    fn = getattr(cell, argument)
    info = resolve_activation(fn, layer, size=cell.units)
    bounds = _RANGES.get(info.name)
    kind = type(layer).__name__
    if bounds is not None and keras.activations.get(info.name) is not fn:
        raise UnsupportedLayerError(  # a custom function registered under a known name
            layer, f"Its {argument} is a custom function registered as '{info.name}', whose "
            f"range the {kind} rule cannot know (the gated rules need bounded activations and "
            "gates in [0, 1]). Use Keras' own activation of that name, or register a rule of "
            f"your own for {kind} (tfl.register_rule).", suggest_rule=False)
    if argument == "recurrent_activation" and not (bounds and 0.0 <= bounds[0] <= bounds[1] <= 1.0):
        raise UnsupportedLayerError(
            layer, f"Its recurrent_activation '{info.name}' does not map into [0, 1] ("
            + ("no known range" if bounds is None else "its range is [%g, %g]" % bounds)
            + f"): the {kind} rule needs gates between 0 and 1, which keep the states bounded "
            "and scale a perturbation by at most 1. Use recurrent_activation='sigmoid' (Keras' "
            "default), 'hard_sigmoid' or 'sparse_sigmoid'.", suggest_rule=False)
    if bounds is None:
        raise UnsupportedLayerError(
            layer, f"Its activation '{info.name}' is not one of the bounded activations the "
            f"{kind} rule knows ({', '.join(_RANGES)}): with an unbounded activation the cell's "
            "state grows with the input, and the gates multiplied by it have no global "
            "Lipschitz bound. Use a bounded activation (Keras' default is tanh) or register a "
            f"rule of your own for {kind} (tfl.register_rule).", suggest_rule=False)
    lo, hi = bounds
    return _Bounded(info, lo, hi)


def _gated_norm(rows: Iterator[np.ndarray], steps: int, sequences: bool,
                roundings: int) -> tuple[float, str]:
    """A certified bound on ``‖G‖₂`` (all states) or ``‖G_{T,:}‖₂`` (last state), from the
    rows of a non-negative ``T × T`` matrix ``G`` whose entries were computed with at most
    ``roundings`` float64 roundings each (all terms ``≥ 0``, so each is within that many
    relative ``eps`` of the exact value, and ``‖·‖₂`` grows with the entries)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not sequences:
            last = collections.deque(rows, maxlen=1)[0]
            value = math.hypot(*last)  # no overflow of the squares; within one ulp
            if not math.isfinite(value):  # inf, or NaN from 0·inf
                return math.inf, f"T={steps}, overflow"
            return round_up(value, roundings + steps + 4), f"T={steps}"
        if steps <= _EXACT_STEPS:
            matrix = np.array(list(rows))
            if not np.all(np.isfinite(matrix)):
                return math.inf, f"T={steps}, overflow"
            value = certify.max_singular_value(matrix[None], method="exact")
            return round_up(value, roundings), f"T={steps}"
        widest, columns = 0.0, np.zeros(steps)
        for row in rows:
            widest = max(widest, float(np.sum(row)))
            columns += row
        value = math.sqrt(widest) * math.sqrt(float(np.max(columns)))
        if not math.isfinite(value):
            return math.inf, f"T={steps}, overflow"
        return round_up(value, roundings + 2 * steps + 4), f"T={steps}, √(‖G‖₁‖G‖∞)"


def _lstm_rows(steps: int, sigma: _Bounded, phi: _Bounded, w: list[float],
               u: list[float]) -> Iterator[np.ndarray]:
    """Rows ``G_{t,:}`` of the LSTM recursion (module docstring), each entry rounded at most
    ``8 t`` times on top of coefficients rounded up."""
    a_s, a_p, p = sigma.lipschitz, phi.lipschitz, phi.peak
    (w_i, w_f, w_c, w_o), (u_i, u_f, u_c, u_o) = w, u
    out_in, out_rec = round_up(a_s * p * w_o, 2), round_up(a_s * p * u_o, 2)
    carry, state = np.zeros(steps), np.zeros(steps)
    for t in range(steps):
        cap = t * p  # C_{t−1}: the cell state gained at most p at each of the t earlier steps
        gate_in = round_up(a_s * (cap * w_f + p * w_i) + a_p * w_c, 6)
        gate_rec = round_up(a_s * (cap * u_f + p * u_i) + a_p * u_c, 6)
        carry = carry + gate_rec * state
        carry[t] += gate_in
        state = a_p * carry + out_rec * state
        state[t] += out_in
        yield state


def _lstm(layer, ctx: NodeContext) -> Constant:
    _check_recurrent(layer, ctx)
    cell = layer.cell
    sigma, phi = _bounded(layer, "recurrent_activation"), _bounded(layer, "activation")
    steps = _steps(layer, ctx)
    w, u = _gate_norms(cell, cell.kernel, 4), _gate_norms(cell, cell.recurrent_kernel, 4)
    value, length = _gated_norm(_lstm_rows(steps, sigma, phi, w, u), steps,
                                layer.return_sequences, 8 * steps)
    what = "all states" if layer.return_sequences else "last state"
    return Constant(value, certified=sigma.info.certified and phi.info.certified,
                    note=f"LSTM ({what}, {length}): ‖G‖ of the gate recursion")


def _reset_range(cell, lo: float, hi: float) -> float:
    """Certified bound on ``|h U_h + b_rec|∞`` over states ``h ∈ [lo, hi]^units``
    (``lo ≤ 0 ≤ hi``)."""
    units = cell.units
    kernels = [k[:, 2 * units:] for k in _readings(cell, cell.recurrent_kernel)]
    biases = ([b[1, 2 * units:] for b in _readings(cell, cell.bias)] if cell.use_bias
              else [np.zeros(units)] * 2)
    value = 0.0
    for kernel, bias in zip(kernels, biases):
        top = np.sum(np.maximum(hi * kernel, lo * kernel), axis=0) + bias
        bottom = np.sum(np.minimum(hi * kernel, lo * kernel), axis=0) + bias
        # The bias may cancel the sums: their rounding is bounded in absolute terms.
        size = np.sum(np.abs(kernel), axis=0) * max(hi, -lo) + np.abs(bias)
        slack = (units + 3) * _EPS * float(np.max(size))
        value = max(value, float(np.max(top)) + slack, float(np.max(-bottom)) + slack)
    return round_up(value, 2)


def _gru_coefficients(layer) -> tuple[float, float, bool]:
    """``(α, β)`` of ``‖δh_t‖ ≤ α ‖δx_t‖ + β ‖δh_{t−1}‖`` (module docstring), rounded up, and
    whether the activations' constants are certified."""
    cell = layer.cell
    sigma, phi = _bounded(layer, "recurrent_activation"), _bounded(layer, "activation")
    a_s, a_p = sigma.lipschitz, phi.lipschitz
    low, high = min(phi.lo, 0.0), max(phi.hi, 0.0)  # the states' range
    w_z, w_r, w_h = _gate_norms(cell, cell.kernel, 3)
    u_z, u_r, u_h = _gate_norms(cell, cell.recurrent_kernel, 3)
    reset = _reset_range(cell, low, high) if cell.reset_after else round_up(phi.peak * u_h, 1)
    alpha = a_s * (high - low) * w_z + a_p * (w_h + reset * a_s * w_r)
    candidate = a_p * (u_h + reset * a_s * u_r)  # ‖δĥ‖ per unit ‖δh_{t−1}‖
    beta = a_s * (high - low) * u_z + math.hypot(1.0, candidate)
    return round_up(alpha, 8), round_up(beta, 10), sigma.info.certified and phi.info.certified


def _gru(layer, ctx: NodeContext) -> Constant:
    _check_recurrent(layer, ctx)
    alpha, beta, certified = _gru_coefficients(layer)
    factor, length = _unrolled_norm(beta, _steps(layer, ctx), layer.return_sequences)
    value = round_up(alpha * factor, 1) if alpha > 0 else 0.0  # no input reaches the states
    what = "all states" if layer.return_sequences else "last state"
    reset = "after" if layer.cell.reset_after else "before"
    return Constant(value, certified=certified,
                    note=f"GRU ({what}, {length}, reset {reset}): {alpha:.4g}·‖M({beta:.4g})‖")


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


def _conv_lstm(layer, ctx: NodeContext):
    raise UnsupportedLayerError(
        layer, f"{type(layer).__name__} multiplies gates by input-dependent states through "
        "convolutions: it is Lipschitz (every factor is bounded) but tf_lipschitz has no rule "
        "for it yet. SimpleRNN, LSTM and GRU are supported; for this layer register a rule of "
        "your own (tfl.register_rule).", suggest_rule=False)


register_rule(keras.layers.SimpleRNN, _simple_rnn)
register_rule(keras.layers.LSTM, _lstm)
register_rule(keras.layers.GRU, _gru)
register_rule(keras.layers.Bidirectional, _bidirectional)
for _cls in (keras.layers.ConvLSTM1D, keras.layers.ConvLSTM2D, keras.layers.ConvLSTM3D):
    register_rule(_cls, _conv_lstm)
