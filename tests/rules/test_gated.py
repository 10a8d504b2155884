"""LSTM and GRU rules against Jacobians of the layers (ground truth).

The bounds are checked three ways: above the Jacobian norms sampled at inputs of several scales
and pushed up by gradient ascent; nearly equal to them in hand-built cells where one path of the
recursion is attained (a saturated gate passes its factor 1, a hard_sigmoid gate sits at its
kink, where it is near 0 or 1 with its full slope 1/6), so that a constant in the wrong place
fails; refused, with the reason, for activations that leave the states unbounded.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.rules import recurrent
from tf_lipschitz.rules.base import NodeContext

from . import jacobian_norm

L = keras.layers
BIG = 30.0  # a bias that saturates sigmoid/hard_sigmoid gates at exactly 1 in float32
KINK = 3.0 - 1e-4  # hard_sigmoid(KINK) ≈ 1 with slope 1/6; hard_sigmoid(-KINK) ≈ 0, slope 1/6


def _upper(model) -> tfl.LipschitzReport:
    return tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)


def _ascent(model, shape, scales=(0.3, 3.0, 30.0), steps=3, seed=0) -> float:
    """Largest Jacobian norm seen from random inputs of each scale, each followed by
    ``steps`` normalised gradient-ascent steps on the norm (exact gradient of the top singular
    value of the dense Jacobian, built from one batched reverse pass)."""
    n_out = int(np.prod(model.output_shape[1:]))
    basis = tf.reshape(tf.eye(n_out), (n_out, *model.output_shape[1:]))

    def top(x):
        copies = tf.repeat(x[None], n_out, axis=0)
        with tf.GradientTape() as tape:
            tape.watch(copies)
            rows = tf.reduce_sum(model(copies) * basis)
        jac = tf.reshape(tape.gradient(rows, copies), (n_out, -1))
        return tf.linalg.svd(jac, compute_uv=False)[0]

    @tf.function
    def top_and_gradient(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            value = top(x)
        return value, outer.gradient(value, x)

    plain = tf.function(top)
    rng = np.random.default_rng(seed)
    best = 0.0
    for scale in scales:
        x = tf.constant(scale * rng.standard_normal(shape), tf.float32)
        if not steps:
            best = max(best, float(plain(x)))
        for _ in range(steps + 1 if steps else 0):
            value, grad = top_and_gradient(x)
            best = max(best, float(value))
            x = x + 0.5 * max(scale, 1.0) * grad / (tf.norm(grad) + 1e-12)
    return best


def _cell(layer, shape, kernel, bias, recurrent_kernel=None):
    """A one-layer model with the cell's weights set (recurrent kernel 0 unless given)."""
    model = keras.Sequential([keras.Input(shape), layer])
    cell = (layer.forward_layer if isinstance(layer, L.Bidirectional) else layer).cell
    cell.kernel.assign(np.asarray(kernel, "float32"))
    cell.recurrent_kernel.assign(np.zeros(cell.recurrent_kernel.shape, "float32")
                                 if recurrent_kernel is None else recurrent_kernel)
    cell.bias.assign(np.asarray(bias, "float32"))
    return model


def _triangle_norm(steps: int) -> float:
    """``‖L‖₂`` of the lower-triangular matrix of ones (float64 SVD)."""
    return float(np.linalg.norm(np.tril(np.ones((steps, steps))), 2))


SAMPLED = {
    "lstm-last": lambda: L.LSTM(4),
    "lstm-sequences": lambda: L.LSTM(4, return_sequences=True),
    "lstm-backwards": lambda: L.LSTM(3, return_sequences=True, go_backwards=True),
    "lstm-hard": lambda: L.LSTM(3, activation="hard_tanh", recurrent_activation="hard_sigmoid"),
    "lstm-softsign": lambda: L.LSTM(3, activation="softsign", return_sequences=True),
    "gru-after-last": lambda: L.GRU(4),
    "gru-after-sequences": lambda: L.GRU(4, return_sequences=True),
    "gru-before-last": lambda: L.GRU(4, reset_after=False),
    "gru-before-sequences": lambda: L.GRU(3, reset_after=False, return_sequences=True,
                                          go_backwards=True),
    "gru-sigmoid": lambda: L.GRU(3, activation="sigmoid", recurrent_activation="hard_sigmoid",
                                 return_sequences=True),
    "bidirectional-lstm": lambda: L.Bidirectional(L.LSTM(3, return_sequences=True)),
    "bidirectional-gru": lambda: L.Bidirectional(L.GRU(3), merge_mode="sum"),
}
NO_SECOND_ORDER = {"lstm-softsign"}  # TensorFlow has no gradient of SoftsignGrad: sampling only


@pytest.mark.parametrize("name", list(SAMPLED))
def test_bound_exceeds_sampled_and_ascended_jacobians(name):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((5, 3)), SAMPLED[name]()])
    for weight in model.weights:  # larger weights: the gates saturate and the paths matter
        weight.assign(2.0 * weight)
    report = _upper(model)
    assert report.certified
    if name in NO_SECOND_ORDER:
        sampled = _ascent(model, (5, 3), (0.3, 1.0, 3.0, 10.0, 30.0) * 4, steps=0)
    else:
        sampled = _ascent(model, (5, 3))
    assert 0.0 < sampled <= report.upper < np.inf


@pytest.mark.parametrize("sequences", [False, True])
def test_lstm_candidate_path_with_saturated_gates_is_exact(sequences):
    # i = f = o = 1: c_t = Σ_s tanh(w x_s), h_t = tanh(c_t); at 0 the Jacobian is w·L, the
    # bound's own matrix (a_φ w_c on the input, carry coefficient 1, a_φ on the output).
    w, steps = 1.5, 6
    model = _cell(L.LSTM(1, return_sequences=sequences), (steps, 1),
                  [[0.0, 0.0, w, 0.0]], [BIG, BIG, 0.0, BIG])
    exact = w * (_triangle_norm(steps) if sequences else np.sqrt(steps))
    assert jacobian_norm(model, np.zeros((steps, 1), "float32")) == pytest.approx(exact, rel=1e-5)
    assert exact <= _upper(model).upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("sequences", [False, True])
def test_lstm_output_gate_path_is_attained(sequences):
    # g = tanh(BIG) = 1 = p, i = f = 1: c_t = t, h_t = σ(w x_t)·tanh(t); at 0 the Jacobian is
    # diag(a_σ w tanh(t)): the bound's a_σ·p·w_o, up to tanh(6) = 1 − 1.2e-5.
    w, steps = 2.0, 6
    model = _cell(L.LSTM(1, return_sequences=sequences), (steps, 1),
                  [[0.0, 0.0, 0.0, w]], [BIG, BIG, BIG, 0.0])
    sampled = jacobian_norm(model, np.zeros((steps, 1), "float32"))
    assert sampled == pytest.approx(0.25 * w * np.tanh(steps), rel=1e-5)
    assert sampled <= _upper(model).upper <= sampled * (1 + 1e-4)


def test_lstm_input_gate_path_at_the_hard_sigmoid_kink_is_attained():
    # i = hard_sigmoid(-KINK) ≈ 0 with slope 1/6, g = 1, f = o = 1: c_t ≈ 0 and the Jacobian is
    # ≈ (w/6)·L: the bound's a_σ·p·w_i, carried with coefficient 1.
    w, steps = 1.2, 5
    model = _cell(L.LSTM(1, recurrent_activation="hard_sigmoid", return_sequences=True),
                  (steps, 1), [[w, 0.0, 0.0, 0.0]], [-KINK, BIG, BIG, BIG])
    sampled = jacobian_norm(model, np.zeros((steps, 1), "float32"))
    assert sampled == pytest.approx(w / 6 * _triangle_norm(steps), rel=1e-3)
    assert sampled <= _upper(model).upper <= sampled * (1 + 1e-3)


def test_lstm_forget_gate_path_uses_the_previous_cell_bound():
    # Feature 1 drives g = tanh(v x) to +1 then -1 (saturated: no slope), so c_1 = 1 = C_1 and
    # c_2 ≈ 0; feature 0 drives f_2 = hard_sigmoid(KINK) ≈ 1 with slope 1/6. Then ∂h_2/∂x_2 has
    # the entry a_σ·C_1·w_f = w/6, and the bound's last row is a_φ(v, a_σ C_1 w_f + v).
    w, v, steps = 1.2, 1e-4, 2
    model = _cell(L.LSTM(1, recurrent_activation="hard_sigmoid"), (steps, 2),
                  [[0.0, w, 0.0, 0.0], [0.0, 0.0, v, 0.0]], [BIG, KINK, 0.0, BIG])
    x = np.array([[0.0, 1e6], [0.0, -1e6]], "float32")
    sampled = jacobian_norm(model, x)
    assert sampled == pytest.approx(w / 6, rel=1e-3)
    assert sampled <= _upper(model).upper <= sampled * (1 + 2e-3)


@pytest.mark.parametrize("sequences", [False, True])
def test_gru_update_gate_path_at_the_hard_sigmoid_kink_is_exact(sequences):
    # φ = sigmoid, ĥ = sigmoid(BIG) = 1, h_0 = 0: the states stay in [0, 1], so |h − ĥ| ≤ 1
    # (not 2p = 2). z = hard_sigmoid(KINK) ≈ 1 with slope 1/6 keeps h ≈ 0: the Jacobian is
    # ≈ −(w/6)·L, the bound's a_σ·D·w_z with β = 1.
    w, steps = 1.5, 5
    layer = L.GRU(1, activation="sigmoid", recurrent_activation="hard_sigmoid",
                  return_sequences=sequences)
    model = _cell(layer, (steps, 1), [[w, 0.0, 0.0]], [[KINK, 0.0, BIG], [0.0, 0.0, 0.0]])
    sampled = jacobian_norm(model, np.zeros((steps, 1), "float32"))
    exact = w / 6 * (_triangle_norm(steps) if sequences else np.sqrt(steps))
    assert sampled == pytest.approx(exact, rel=1e-3)
    assert sampled <= _upper(model).upper <= sampled * (1 + 1e-3)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_candidate_path_of_one_step_is_exact(reset_after):
    # z = σ(-BIG) ≈ 0: h_1 = tanh(w x): the bound's a_φ w_h.
    w = 1.7
    bias = [[-BIG, 0.0, 0.0], [0.0, 0.0, 0.0]] if reset_after else [-BIG, 0.0, 0.0]
    model = _cell(L.GRU(1, reset_after=reset_after), (1, 1), [[0.0, 0.0, w]], bias)
    sampled = jacobian_norm(model, np.zeros((1, 1), "float32"))
    assert sampled == pytest.approx(w, rel=1e-6)
    assert sampled <= _upper(model).upper <= sampled * (1 + 1e-5)


def test_gru_reset_after_path_uses_the_recurrent_bias():
    # ĥ = tanh(x W_h − B/2 + r·(h U_h + B)) with h_0 = 0 and r = σ(w x): at 0 the argument is 0
    # and ∂ĥ/∂x = a_σ w B: the bound's a_φ·S·a_σ·w_r with S = max |h U_h + b_rec| = B.
    w, b = 2.0, 4.0
    model = _cell(L.GRU(1), (1, 1), [[0.0, w, 0.0]], [[-BIG, 0.0, -b / 2], [0.0, 0.0, b]])
    sampled = jacobian_norm(model, np.zeros((1, 1), "float32"))
    assert sampled == pytest.approx(0.25 * w * b, rel=1e-6)
    assert sampled <= _upper(model).upper <= sampled * (1 + 1e-5)


def test_gru_reset_before_path_uses_the_state_bound():
    # Step 1: h_1 = tanh(BIG) = 1 = p. Step 2: ĥ_2 = tanh(BIG + (r_2 h_1) U_h) with U_h = −2·BIG
    # and r_2 = σ(w x_2) = 1/2 at 0, so the argument is 0 and ∂h_2/∂x_2 = a_σ w p |U_h|: the
    # step's input coefficient α = a_φ·(p u_h)·a_σ·w_r (the row's other entry, β·α, is loose
    # here: x_1 does not reach h_1).
    w = 1.0
    layer = L.GRU(1, reset_after=False)
    model = _cell(layer, (2, 1), [[0.0, w, 0.0]], [-BIG, 0.0, BIG],
                  recurrent_kernel=[[0.0, 0.0, -2 * BIG]])
    sampled = jacobian_norm(model, np.zeros((2, 1), "float32"))
    assert sampled == pytest.approx(0.25 * w * 2 * BIG, rel=1e-5)
    alpha, _, certified = recurrent._gru_coefficients(layer)
    assert certified
    assert sampled <= alpha <= sampled * (1 + 1e-5)


def test_long_sequence_bound_covers_the_exact_norm():
    # Beyond 1024 steps ‖G‖₂ ≤ √(‖G‖₁‖G‖∞) = w·T for the candidate-only cell's G = w·L, whose
    # norm is 1 / (2 sin(π / (4T + 2))) (L⁻¹ is the difference matrix).
    steps, w = 1100, 0.5
    assert _triangle_norm(7) == pytest.approx(1 / (2 * np.sin(np.pi / 30)), rel=1e-12)
    exact = w / (2 * np.sin(np.pi / (4 * steps + 2)))
    rows = (w * (np.arange(steps) <= t) for t in range(steps))
    value, note = recurrent._gated_norm(rows, steps, True, 0)
    assert exact <= value <= w * steps * (1 + 1e-9) and "√(‖G‖₁‖G‖∞)" in note


def test_overflow_gives_inf_and_a_zero_input_kernel_gives_zero():
    keras.utils.set_random_seed(6)
    for layer in (L.LSTM(2, return_sequences=True), L.LSTM(2), L.GRU(2)):
        model = keras.Sequential([keras.Input((100, 2)), layer])
        layer.cell.recurrent_kernel.assign(1e4 * layer.cell.recurrent_kernel)
        assert _upper(model).upper == np.inf
        layer.cell.kernel.assign(np.zeros(layer.cell.kernel.shape))
        assert _upper(model).upper == 0.0


def test_unbounded_activations_are_refused_with_the_reason():
    relu = keras.Sequential([keras.Input((4, 2)), L.LSTM(3, activation="relu", name="cell")])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match="'cell'.*activation 'relu' is not one of the bounded.*unbounded "
                             ".*tanh"):
        _upper(relu)
    linear = keras.Sequential([keras.Input((4, 2)), L.Bidirectional(L.GRU(3, activation=None))])
    with pytest.raises(tfl.UnsupportedLayerError, match="activation 'linear'.*default is tanh"):
        _upper(linear)
    gate = keras.Sequential([keras.Input((4, 2)),
                             L.GRU(3, recurrent_activation="tanh", name="gru_tanh")])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match=r"'gru_tanh'.*recurrent_activation 'tanh' does not map into \[0, 1\] "
                             r"\(its range is \[-1, 1\]\).*'sigmoid'"):
        _upper(gate)


def test_custom_function_named_like_a_bounded_activation_is_refused():
    def tanh(x):  # registered with its constant, but unbounded: its range is not tanh's
        return 2.0 * x

    tfl.register_activation(tanh, 2.0, (2.0, 2.0))
    model = keras.Sequential([keras.Input((3, 2)), L.LSTM(2, activation=tanh)])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match="activation is a custom function registered as .tanh.*range"):
        _upper(model)


def test_conv_lstm_is_still_refused_and_the_length_must_be_known():
    conv = keras.Sequential([keras.Input((3, 5, 2)), L.ConvLSTM1D(2, 3, name="conv_lstm")])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match="'conv_lstm'.*ConvLSTM1D multiplies gates.*register a rule"):
        _upper(conv)
    layer = L.LSTM(2)
    layer.build((None, None, 3))
    with pytest.raises(tfl.UnsupportedLayerError, match="sequence length is unknown"):
        recurrent._lstm(layer, NodeContext(((None, 3),), ((2,),)))
