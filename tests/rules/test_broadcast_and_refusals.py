"""Rules against ground truth where an input is broadcast, and layers that must be refused."""

from fractions import Fraction

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl
from tf_lipschitz.operators import LinearOperator

L = keras.layers


def _exact(model, shape):
    """σ_max of a linear model: its materialised float64 Jacobian."""
    op = LinearOperator(lambda x: model(x) - model(x * 0), shape, dtype="float64")
    return float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])


def _float64_twin(build, shape):
    keras.config.set_floatx("float64")
    try:
        return build(keras.Input(shape))
    finally:
        keras.config.set_floatx("float32")


@pytest.mark.parametrize("merge, exact", [
    (L.Add, 2.0), (L.Subtract, 1.0), (L.Average, 1.0),
])
def test_merge_with_a_broadcast_input_counts_its_copies(merge, exact):
    # x + mean(x) with mean(x) of shape (1, 1) broadcast over 16 entries: the mean's constant
    # 1/4 (‖(1/16)·1‖ = 1/4) was added once, not √16 times: 1.25 for an exact 2.
    def build(inputs):
        mean = L.GlobalAveragePooling1D(keepdims=True)(inputs)
        return keras.Model(inputs, merge()([inputs, mean]))

    model = build(keras.Input((16, 1)))
    assert _exact(_float64_twin(build, (16, 1)), (16, 1)) == pytest.approx(exact, abs=1e-12)
    report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert report.certified and report.upper >= exact
    bound = {L.Add: 2.0, L.Subtract: 2.0, L.Average: 1.0}[merge]  # Σ √copies · L_p (/ 2)
    assert report.upper == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize("op", ["maximum", "minimum", "add"])
def test_constant_that_broadcasts_the_input_counts_its_copies(op):
    # maximum(x, zeros(16)) on x of shape (1,): 16 copies of x, exact norm 4; it gave 1.
    inputs = keras.Input((1,))
    outputs = getattr(keras.ops, op)(inputs, np.zeros(16, "float32"))
    report = tfl.LipschitzEstimator(keras.Model(inputs, outputs), verbose=0).autolip(
        certified=True)
    assert report.upper >= 4.0 and report.upper == pytest.approx(4.0, rel=1e-9)


def test_concatenation_is_not_a_broadcast():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Concatenate()([inputs, inputs]))
    assert tfl.LipschitzEstimator(model, verbose=0).autolip().upper == pytest.approx(
        np.sqrt(2.0), rel=1e-9)


def test_rescaling_that_broadcasts_the_input_counts_its_copies():
    # Rescaling([3, 3, 3, 3]) on inputs (2, 1) copies every entry 4 times: exact 6, it gave 3.
    def build(inputs):
        return keras.Model(inputs, L.Rescaling([3.0, 3.0, 3.0, 3.0])(inputs))

    model = build(keras.Input((2, 1)))
    exact = _exact(_float64_twin(build, (2, 1)), (2, 1))
    assert exact == pytest.approx(6.0, rel=1e-12)
    for certified in (False, True):
        upper = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=certified).upper
        assert upper >= exact and upper == pytest.approx(exact, rel=1e-9)


def test_rescaling_whose_offset_broadcasts_the_input_counts_its_copies():
    # Rescaling(2, offset of shape (3, 1)) on inputs (1, 4) copies every entry 3 times; its
    # linear part x·2 left the copies out once fused with the next layer: a certified 2·‖W‖
    # for a map of norm 2√3·‖W‖ (alone, its closed form counted them).
    def build(inputs):
        rescaled = L.Rescaling(2.0, offset=np.zeros((3, 1)))(inputs)
        return keras.Model(inputs, L.Dense(2, kernel_initializer="ones")(rescaled))

    model = build(keras.Input((1, 4)))
    exact = _exact(_float64_twin(build, (1, 4)), (1, 4))
    assert exact == pytest.approx(2 * np.sqrt(3) * np.sqrt(4 * 2), rel=1e-6)
    est = tfl.LipschitzEstimator(model, verbose=0)
    for certified in (False, True):
        report = est.autolip(certified=certified)
        assert report.upper == pytest.approx(exact, rel=1e-5)
        assert not certified or (report.certified and report.upper >= exact)
    for mode in ("exact", "certified"):
        assert est.seqlip(mode=mode).upper == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_broadcast_norm_of_a_float64_constant_far_from_one(scale):
    # ‖c‖₂ over the 4 copies summed the squares: inf for |c| = 1e200, 0 for 1e-200 (a certified
    # 0 for a map that is not constant). Exact: √4 · |c|.
    def build(inputs):  # x of shape (1, 3) times c of shape (4, 3): 4 copies of every entry
        return keras.Model(inputs, keras.ops.multiply(inputs, np.full((4, 3), scale)))

    model = _float64_twin(build, (1, 3))
    exact = 2 * Fraction(scale)
    for certified in (False, True):
        report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=certified)
        assert report.certified
        assert exact <= Fraction(report.upper) <= exact * (1 + Fraction(1, 10**12))


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_layer_normalization_with_rms_scaling_is_not_lipschitz():
    # It scales the uncentred x by 1/√(var(x) + ε): a constant vector c·1 maps to c·1/√ε.
    inputs = keras.Input((4,))
    layer = L.LayerNormalization(rms_scaling=True)
    model = keras.Model(inputs, layer(inputs))
    x = np.full((1, 4), 1000.0)
    dx = np.array([[1e-3, 0.0, 0.0, 0.0]])
    ratio = float(np.linalg.norm(model(x + dx) - model(x)) / 1e-3)
    assert ratio > 10 / np.sqrt(layer.epsilon)  # far above the old max|γ|/√ε (γ = 1)
    with pytest.raises(tfl.NotLipschitzError, match="rms_scaling"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_dense_is_refused(mode):
    # The int8 kernel was read without its scale (261.6 for a layer of norm 1393); int8 and
    # float8 layers round their inputs (float8 also its kernel: certified 1.0700011 for a layer
    # that moves 0 to 1 by 1.125), a discontinuous map.
    model = keras.Sequential([keras.Input((8,)), L.Dense(4)])
    model.quantize(mode)
    with pytest.raises(tfl.LipschitzError, match="quantiz"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()


@pytest.mark.parametrize("mask_value", [0.0, 1.5])
@pytest.mark.parametrize("tail", ["rnn", "dense"])
def test_masking_is_refused_with_its_reason(mask_value, tail):
    # Keras computes the mask with not_equal/any ops placed before the Masking layer in the
    # graph: the RNN model was refused as "No Lipschitz rule for layer 'not_equal'", the Dense
    # one as "No Lipschitz rule for layer 'masking'", neither saying why.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 3))
    masked = L.Masking(mask_value, name="masking")(inputs)
    model = keras.Model(inputs, L.SimpleRNN(4)(masked) if tail == "rnn" else L.Dense(2)(masked))
    if tail == "rnn" or mask_value != 0:
        # Ground truth: a step of exactly mask_value and one 1e-4 away give outputs far apart.
        # (Masking(0) then Dense is the identity then Dense; the rule cannot see that no layer
        # uses the mask, and refuses it as well.)
        x = np.random.default_rng(0).standard_normal((1, 6, 3))
        x[0, 2] = mask_value
        nearby = x.copy()
        nearby[0, 2, 0] += 1e-4
        jump = float(np.linalg.norm(model(nearby) - model(x)))
        assert jump / 1e-4 > 1e3
    # mask_value=0: its own output is its input, so only the mask's users make the model
    # discontinuous; the rule cannot see them and refuses without claiming "not Lipschitz".
    error, reason = ((tfl.NotLipschitzError, r"\(Masking\).*output jumps") if mask_value else
                     (tfl.UnsupportedLayerError, "Masking.*skip the time steps.*no later layer"))
    with pytest.raises(error, match=rf"'masking'.*{reason}.*without the Masking"):
        tfl.LipschitzEstimator(model, verbose=0).autolip()
