"""SimpleRNN and Bidirectional rules against Jacobians of the layers (ground truth)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl

from . import jacobian_norm

L = keras.layers


def _sampled(model, shape, count=12, seed=0) -> float:
    rng = np.random.default_rng(seed)
    return max(jacobian_norm(model, 2.0 * rng.standard_normal(shape).astype("float32"))
               for _ in range(count))


def _upper(model) -> tfl.LipschitzReport:
    return tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)


@pytest.mark.parametrize("sequences", [False, True])
def test_scalar_linear_rnn_bound_is_its_exact_norm(sequences):
    # h_t = w x_t + u h_{t-1} (u > 0): the Jacobian is w M with M_ts = u^(t-s), the bound's
    # own matrix: the rule is exact here.
    layer = L.SimpleRNN(1, activation="linear", use_bias=False, return_sequences=sequences)
    model = keras.Sequential([keras.Input((7, 1)), layer])
    layer.cell.kernel.assign([[1.5]])
    layer.cell.recurrent_kernel.assign([[0.8]])
    exact = jacobian_norm(model, np.zeros((7, 1), "float32"))
    report = _upper(model)
    assert report.certified
    assert exact * (1 - 1e-6) <= report.upper <= exact * (1 + 1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("sequences", [False, True])
@pytest.mark.parametrize("backwards", [False, True])
def test_simple_rnn_bound_exceeds_its_jacobians(activation, sequences, backwards):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((5, 3)),
        L.SimpleRNN(4, activation=activation, return_sequences=sequences,
                    go_backwards=backwards),
        L.Flatten() if sequences else L.Identity(),
        L.Dense(2),
    ])
    report = _upper(model)
    assert report.certified
    assert _sampled(model, (5, 3)) <= report.upper


@pytest.mark.parametrize("mode", ["concat", "sum", "ave"])
def test_bidirectional_bound_exceeds_its_jacobians(mode):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((4, 2)),
        L.Bidirectional(L.SimpleRNN(3, return_sequences=True), merge_mode=mode),
    ])
    report = _upper(model)
    assert report.certified
    sampled = _sampled(model, (4, 2))
    assert sampled <= report.upper
    layer = model.layers[0]
    sub = [tfl.LipschitzEstimator(keras.Sequential([keras.Input((4, 2)), s]), verbose=0)
           .autolip(certified=True).upper for s in (layer.forward_layer, layer.backward_layer)]
    combined = {"concat": np.hypot(*sub), "sum": sum(sub), "ave": sum(sub) / 2}[mode]
    assert report.upper == pytest.approx(combined, rel=1e-12)


def test_long_sequence_bound_covers_the_exact_norm():
    # Beyond 1024 steps ‖M‖₂ is bounded by Young's inequality, Σ r^k < 1/(1 - r).
    layer = L.SimpleRNN(1, activation="linear", use_bias=False, return_sequences=True)
    model = keras.Sequential([keras.Input((1100, 1)), layer])
    layer.cell.kernel.assign([[1.0]])
    layer.cell.recurrent_kernel.assign([[0.9]])
    index = np.arange(1100)
    lag = index[:, None] - index[None, :]
    exact = np.linalg.norm(np.where(lag >= 0, 0.9 ** np.maximum(lag, 0), 0.0), 2)
    assert exact <= _upper(model).upper <= 10.0 * (1 + 1e-3)


def test_conv_lstm_and_multiplicative_recurrent_layers_are_refused_with_the_reason():
    conv = keras.Sequential([keras.Input((4, 5, 2)), L.ConvLSTM1D(3, 3, name="conv_lstm")])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match="ConvLSTM1D multiplies gates.*SimpleRNN, LSTM and GRU"):
        _upper(conv)
    mul = keras.Sequential([keras.Input((4, 2)),
                            L.Bidirectional(L.SimpleRNN(3), merge_mode="mul")])
    with pytest.raises(tfl.NotLipschitzError, match="merge_mode='mul'"):
        _upper(mul)


def test_bidirectional_over_gated_layers_combines_their_rules():
    # Bidirectional(GRU/LSTM) used to be refused; it now combines the two directions' rules
    # (their bounds against Jacobians: tests/rules/test_gated.py).
    keras.utils.set_random_seed(7)
    for inner in (L.GRU(3), L.LSTM(3, return_sequences=True)):
        model = keras.Sequential([keras.Input((4, 2)), L.Bidirectional(inner)])
        report = _upper(model)
        layer = model.layers[0]
        sub = [tfl.LipschitzEstimator(keras.Sequential([keras.Input((4, 2)), s]), verbose=0)
               .autolip(certified=True).upper for s in (layer.forward_layer, layer.backward_layer)]
        assert report.certified
        assert report.upper == pytest.approx(np.hypot(*sub), rel=1e-12)


def test_lower_bound_through_a_recurrent_layer():
    # TensorFlow cannot push forward-mode tangents through Keras' RNN loop (a variant tensor
    # list): the search used to fail with a TypeError; its products now come from two reverse
    # passes.
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6, 2)),
        L.Bidirectional(L.SimpleRNN(4, return_sequences=True)),
        L.TimeDistributed(L.Dense(2)),
        L.Flatten(),
        L.Dense(1),
    ])
    x = np.random.default_rng(0).standard_normal((8, 6, 2)).astype("float32")
    est = tfl.LipschitzEstimator(model, verbose=0)
    upper = est.autolip(certified=True).upper
    low = est.lower_bound(x)
    at_data = max(jacobian_norm(model, xi) for xi in x)
    assert at_data * (1 - 1e-3) <= low.value <= upper


def test_reverse_mode_jvp_matches_forward_mode():
    from tf_lipschitz import lower

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), L.Dense(7, activation="tanh"), L.Dense(3)])
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((4, 5)), tf.float32)
    v = tf.constant(rng.standard_normal((4, 5)), tf.float32)
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        y = model(x)
    _, jv = lower._jvp_by_reverse(model, x, v)
    np.testing.assert_allclose(jv.numpy(), acc.jvp(y).numpy(), rtol=1e-5, atol=1e-6)
