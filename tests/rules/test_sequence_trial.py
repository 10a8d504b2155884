"""Edge cases of the SimpleRNN and TimeDistributed rules, against exact or sampled ground truth."""

import math
import warnings

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl

from . import jacobian_norm

L = keras.layers


def _relu_rnn(steps, sequences, kernel, recurrent):
    layer = L.SimpleRNN(2, activation="relu", use_bias=False, return_sequences=sequences)
    model = keras.Sequential([keras.Input((steps, 2)), layer])
    layer.cell.kernel.assign(kernel * np.eye(2))
    layer.cell.recurrent_kernel.assign(recurrent * np.eye(2))
    return model


@pytest.mark.parametrize("sequences", [False, True])
def test_overflowing_recurrence_gives_an_infinite_bound(sequences):
    # r = 3 over 700 steps: r^699 ≈ 1e333 overflows float64. All states used to raise "the
    # weights contain NaN or inf" (the Toeplitz matrix held inf); the bound is inf, as for the
    # last state.
    report = tfl.LipschitzEstimator(_relu_rnn(700, sequences, 1.0, 3.0), verbose=0).autolip(
        certified=True)
    assert report.certified and report.upper == math.inf


@pytest.mark.parametrize("sequences", [False, True])
def test_zero_input_kernel_is_zero_lipschitz_even_when_the_recurrence_overflows(sequences):
    # With W = 0 the states ignore the input: the Jacobian is 0. The bound was 0 · inf = NaN
    # (a LipschitzError about NaN weights) or the error above.
    model = _relu_rnn(700, sequences, 0.0, 3.0)
    assert jacobian_norm(model, np.ones((700, 2), "float32")) == 0.0
    report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert report.certified and report.upper == 0.0


def test_last_state_bound_stays_finite_where_its_squares_overflow():
    # h_T = Σ_k 3^k x_{T-k}: the constant is √(Σ_{k<400} 9^k) ≈ 2.5e190, exact in integers;
    # the sum of squares (9^399 ≈ 1e380) overflowed to inf.
    layer = L.SimpleRNN(1, activation="linear", use_bias=False, dtype="float64")
    model = keras.Sequential([keras.Input((400, 1), dtype="float64"), layer])
    layer.cell.kernel.assign([[1.0]])
    layer.cell.recurrent_kernel.assign([[3.0]])
    exact = float(math.isqrt((9 ** 400 - 1) // 8) + 1)
    report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    row = report.layers[-1].lipschitz
    # ‖U‖ is certified with a 1e-6 margin, raised here to the 399th power.
    assert exact <= row <= exact * (1 + 1e-3)


@pytest.mark.parametrize("sequences", [False, True])
def test_log_softmax_rnn_is_bounded(sequences):
    # log_softmax needs the size of its axis, the number of units: the rule was refused with
    # "pass `size=`", an argument the user cannot give.
    layer = L.SimpleRNN(4, activation="log_softmax", return_sequences=sequences)
    model = keras.Sequential([keras.Input((3, 2)), layer])
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.standard_normal(w.shape))
    report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert report.certified
    sampled = max(jacobian_norm(model, s * rng.standard_normal((3, 2)).astype("float32"))
                  for s in (0.3, 1.0, 3.0) for _ in range(8))
    assert sampled <= report.upper


def test_rnn_rule_reads_its_weights_without_numpy_deprecation_warnings():
    # np.asarray(convert_to_numpy(variable)) warned "__array__ implementation doesn't accept a
    # copy keyword" under NumPy 2 at every estimate.
    model = keras.Sequential([keras.Input((3, 2)), L.SimpleRNN(2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)
                and "__array__" in str(w.message)]


def test_time_distributed_model_is_refused_with_what_to_do():
    inner = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="relu"), L.Dense(2)],
                             name="inner")
    model = keras.Sequential([keras.Input((5, 3)), L.TimeDistributed(inner)])
    with pytest.raises(tfl.UnsupportedLayerError,
                       match=r"wraps the model 'inner'.*Wrap each layer of that model") as err:
        tfl.LipschitzEstimator(model, verbose=0).autolip()
    assert "register_rule" not in str(err.value)
