"""LipschitzWrapper: effective operator norms against dense-matrix SVD, training, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.errors import InvalidArgumentError, ModelNotBuiltError
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.rules import Linear, NodeContext, get_rule
from tf_lipschitz.wrappers import LipschitzWrapper

from groundtruth import exact_norm, top_singular_value


def _norm(layer, input_shape) -> float:
    """Exact operator norm of a layer's linear part (its registered rule) on ``input_shape``."""
    ctx = NodeContext(input_shapes=(tuple(input_shape),), output_shapes=((),))
    bound = get_rule(layer)(layer, ctx)
    assert isinstance(bound, Linear)
    return top_singular_value(LinearOperator(bound.fn, tuple(input_shape)).to_dense())


LAYERS = {
    "dense": (lambda: keras.layers.Dense(6), (10,)),
    "conv2d_strided": (lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same"), (9, 9, 3)),
    "conv1d_dilated": (lambda: keras.layers.Conv1D(3, 3, dilation_rate=2), (12, 2)),
    "depthwise": (lambda: keras.layers.DepthwiseConv2D(3, strides=2), (8, 8, 2)),
    "separable": (lambda: keras.layers.SeparableConv2D(3, 3, padding="same"), (6, 6, 2)),
    "conv_transpose": (lambda: keras.layers.Conv2DTranspose(2, 3, strides=2), (5, 5, 3)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_wrapped_layer_is_the_scaled_layer(name, rng):
    make, shape = LAYERS[name]
    inner = make()
    wrapper = LipschitzWrapper(inner, max_lipschitz=0.3)
    x = rng.standard_normal((3, *shape)).astype("float32")
    y = np.asarray(wrapper(x))  # first (inference) call calibrates the vector
    raw = _norm(inner, shape)
    assert raw > 0.3
    assert wrapper.raw_operator_norm() == pytest.approx(raw, rel=1e-4)
    # effective operator: the estimator's rule sees the normalised weights
    assert _norm(wrapper, shape) == pytest.approx(0.3, rel=1e-4)
    assert wrapper.operator_norm() == pytest.approx(0.3, rel=1e-4)
    # outputs are the wrapped layer's with its kernel scaled by current_scale()
    scale = float(wrapper.current_scale())
    assert scale == pytest.approx(0.3 / raw, rel=1e-4)
    kernel = next(getattr(inner, a) for a in ("kernel", "pointwise_kernel")
                  if hasattr(inner, a))
    original = kernel.numpy()
    kernel.assign(original * scale)
    expected = np.asarray(inner(x))
    kernel.assign(original)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_layer_inside_the_ball_is_unchanged(rng):
    inner = keras.layers.Dense(3)
    wrapper = LipschitzWrapper(inner, max_lipschitz=100.0)
    x = rng.standard_normal((4, 5)).astype("float32")
    np.testing.assert_allclose(np.asarray(wrapper(x)), np.asarray(inner(x)), rtol=1e-6)
    assert float(wrapper.current_scale()) == 1.0


def test_conv_norm_uses_the_real_input_shape(rng):
    """Unlike keras.layers.SpectralNormalization, the operator (not the reshaped kernel) is 1."""
    shape = (12, 12, 3)
    x = rng.standard_normal((2, *shape)).astype("float32")
    ours = LipschitzWrapper(keras.layers.Conv2D(8, 3, padding="same"), max_lipschitz=1.0)
    ours(x)
    assert _norm(ours, shape) == pytest.approx(1.0, rel=1e-4)
    theirs = keras.layers.SpectralNormalization(keras.layers.Conv2D(8, 3, padding="same"),
                                                power_iterations=50)
    theirs(x, training=True)
    assert abs(_norm(theirs.layer, shape) - 1.0) > 0.1


def _model(shape=(10, 10, 2), target=0.5):
    return keras.Sequential([
        keras.Input(shape),
        LipschitzWrapper(keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu"),
                         max_lipschitz=target),
        keras.layers.Flatten(),
        LipschitzWrapper(keras.layers.Dense(3), max_lipschitz=target),
    ])


def test_training_keeps_operator_norms_below_target(rng):
    model = _model()
    x = rng.standard_normal((96, 10, 10, 2)).astype("float32")
    y = 10.0 * rng.standard_normal((96, 3)).astype("float32")  # pushes the norms up
    model.compile(keras.optimizers.Adam(1e-3), "mse")  # Keras' default learning rate
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]  # gradients flow
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, model.trainable_weights, strict=True))
    conv, dense = model.layers[0], model.layers[2]
    for wrapper, shape in ((conv, (10, 10, 2)), (dense, (125,))):
        effective = _norm(wrapper, shape)
        assert effective <= 0.5 * (1 + 1e-3)
        assert effective > 0.5 * (1 - 1e-3)  # active: the raw layer is above the target
        assert _norm(wrapper.layer, shape) > 0.5
    # the estimator uses the normalised weights
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    rows = {row.name: row for row in report.layers}
    assert rows[conv.name].norm == pytest.approx(_norm(conv, (10, 10, 2)), rel=1e-4)
    assert report.upper <= 0.25 * (1 + 3e-3)


def test_keras_save_load_round_trip(tmp_path, rng):
    model = _model(target=0.7)
    x = rng.standard_normal((32, 10, 10, 2)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, rng.standard_normal((32, 3)).astype("float32"), epochs=1, verbose=0)
    path = tmp_path / "wrapped.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.layers[0], LipschitzWrapper)
    assert loaded.layers[0].max_lipschitz == 0.7
    for key in ("max_lipschitz", "power_iterations", "tol", "max_iterations"):
        assert loaded.layers[0].get_config()[key] == model.layers[0].get_config()[key]
    np.testing.assert_array_equal(loaded.layers[0].vector.numpy(), model.layers[0].vector.numpy())
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    loaded.compile("adam", "mse")
    loaded.fit(x, rng.standard_normal((32, 3)).astype("float32"), epochs=1, verbose=0)


def test_activity_regularizer_loss_is_kept(rng):
    wrapper = LipschitzWrapper(keras.layers.Dense(3, activity_regularizer="l2"))
    model = keras.Sequential([keras.Input((4,)), wrapper])
    model(rng.standard_normal((2, 4)).astype("float32"))
    assert len(model.losses) == 1


@pytest.mark.parametrize(
    "layer,shape,error,match",
    [
        (keras.layers.ReLU(), (4,), InvalidArgumentError, r"affine.*layer='re_lu(_\d+)?'"),
        (keras.layers.BatchNormalization(), (4,), InvalidArgumentError, "kernel"),
        (keras.layers.Conv2D(2, 3), (None, None, 1), ModelNotBuiltError, "input shape"),
        (keras.layers.EinsumDense("abc,cd->abd", (None, 3)), (None, 4), ModelNotBuiltError,
         "EinsumDense"),
    ],
)
def test_bad_layers(layer, shape, error, match):
    with pytest.raises(error, match=match):
        keras.Sequential([keras.Input(shape), LipschitzWrapper(layer)])


@pytest.mark.parametrize("kwargs,match", [({"max_lipschitz": 0.0}, "max_lipschitz=0.0"),
                                          ({"max_lipschitz": float("nan")}, "max_lipschitz=nan"),
                                          ({"power_iterations": 0}, "power_iterations=0"),
                                          ({"max_iterations": 2.5}, "max_iterations=2.5"),
                                          ({"tol": 0.5}, "tol=0.5")])
def test_bad_arguments(kwargs, match):
    # InvalidArgumentError naming the argument and the value; they were plain ValueErrors, and
    # tol=0.5 (a calibration stopping far below the norm) was accepted.
    with pytest.raises(InvalidArgumentError, match=match):
        LipschitzWrapper(keras.layers.Dense(2), **kwargs)
    with pytest.raises(InvalidArgumentError, match="layer="):
        LipschitzWrapper("dense")


def test_dense_on_variable_length_sequences(rng):
    # A Dense layer acts on the last axis only: its operator on (T, 4) is I_T ⊗ W, of norm ‖W‖
    # for every T. The wrapper refused (None, None, 4) with a message about convolutions; it
    # now tracks a vector of shape (1, 4).
    wrapper = LipschitzWrapper(keras.layers.Dense(3), max_lipschitz=0.5)
    model = keras.Sequential([keras.Input((None, 4)), wrapper])
    assert tuple(wrapper.vector.shape) == (1, 4)
    assert top_singular_value(wrapper.layer.kernel.numpy()) > 0.5
    model.compile(keras.optimizers.SGD(0.05), "mse")
    for length in (5, 2):
        x = rng.standard_normal((16, length, 4)).astype("float32")
        model.fit(x, 10.0 * rng.standard_normal((16, length, 3)), batch_size=8, verbose=0)
    wrapper.calibrate()
    for length in (1, 3, 7):
        assert exact_norm(wrapper, (length, 4)) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("name", ["dense", "conv2d_strided"])
def test_operator_norm_is_the_effective_norm(name, rng):
    # New weights with a stale vector (the state after fast training, made deterministic):
    # the layer computes with a norm above its target. operator_norm() returned
    # min(σ̂, max_lipschitz) and read 1.0 whatever the truth (1.137 after 2 epochs of Adam 0.05
    # in a user trial); it now gives the norm of the map inference computes, without changing it.
    make, shape = LAYERS[name]
    wrapper = LipschitzWrapper(make(), max_lipschitz=1.0)
    keras.Sequential([keras.Input(shape), wrapper])
    kernel = wrapper.layer.kernel
    kernel.assign(3.0 * rng.standard_normal(kernel.shape).astype("float32"))
    exact = exact_norm(wrapper, shape)
    assert exact > 1.0 + 1e-3
    vector = wrapper.vector.numpy().copy()
    assert wrapper.operator_norm() == pytest.approx(exact, rel=1e-5)
    np.testing.assert_array_equal(wrapper.vector.numpy(), vector)  # read-only
    assert exact_norm(wrapper, shape) == exact
    wrapper.calibrate()
    assert wrapper.operator_norm() == pytest.approx(1.0, rel=1e-5)
    assert exact_norm(wrapper, shape) == pytest.approx(1.0, rel=1e-5)


def test_calibration_finds_a_channel_the_vector_has_lost(rng):
    """A depthwise convolution maps each channel apart: a channel block of the vector that is
    exactly zero (flushed by half-precision products) stayed zero. After mixed-precision
    training a wrapped DepthwiseConv2D calibrated to 1.16× its target while operator_norm()
    read 1.0005; the calibration now mixes 1 % of a random vector into its start."""
    wrapper = LipschitzWrapper(keras.layers.DepthwiseConv2D(3, padding="same"), 1.0)
    keras.Sequential([keras.Input((6, 6, 3)), wrapper])
    kernel = rng.standard_normal(wrapper.layer.kernel.shape).astype("float32")
    kernel[..., 1, :] *= 3.0  # channel 1 has the largest norm
    wrapper.layer.kernel.assign(kernel)
    lost = np.zeros(wrapper.vector.shape, "float32")
    lost[..., 0] = 1.0  # the vector has only channel 0
    wrapper.vector.assign(lost)
    assert exact_norm(wrapper.layer, (6, 6, 3)) > 3.0 * exact_norm(wrapper, (6, 6, 3))
    wrapper.calibrate()
    assert exact_norm(wrapper, (6, 6, 3)) == pytest.approx(1.0, rel=1e-5)
    assert wrapper.operator_norm() == pytest.approx(1.0, rel=1e-5)


def test_calibrated_at_build_and_after_set_weights(rng):
    """Built eagerly -> calibrated: constrained from the first predict(); set_weights() needs
    calibrate() (or training) to re-converge the vector."""
    wrapper = LipschitzWrapper(keras.layers.Dense(4), max_lipschitz=0.2)
    model = keras.Sequential([keras.Input((6,)), wrapper])
    assert wrapper.is_calibrated()
    x = rng.standard_normal((5, 6)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.asarray(model(x)), rtol=1e-5,
                               atol=1e-6)
    assert _norm(wrapper, (6,)) == pytest.approx(0.2, rel=1e-5)
    kernel, bias = wrapper.layer.get_weights()
    wrapper.layer.set_weights([rng.standard_normal(kernel.shape).astype("float32"), bias])
    raw = _norm(wrapper.layer, (6,))
    assert wrapper.calibrate() == pytest.approx(raw, rel=1e-5)
    assert _norm(wrapper, (6,)) == pytest.approx(0.2, rel=1e-5)


class _Holder(keras.layers.Layer):
    """A custom layer holding a wrapper (not a model: no ``.layers``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.wrap = LipschitzWrapper(keras.layers.Dense(4), name="wrap")

    def call(self, x):
        return self.wrap(x)


def test_calibrate_all_after_weights_moved(rng):
    """Stale vectors (the state after a short fit, made here deterministically by new kernels)
    let the layers exceed the target; calibrate_all re-converges every wrapper: in nested
    models, in a custom layer, and with the same name in two places."""
    first = keras.Sequential([keras.Input((6,)), LipschitzWrapper(keras.layers.Dense(5),
                                                                   name="wrap")], name="first")
    second = keras.Sequential([keras.Input((5,)), LipschitzWrapper(keras.layers.Dense(5),
                                                                    name="wrap")], name="second")
    outer = keras.Sequential([keras.Input((6,)), first, keras.layers.ReLU(), second,
                              _Holder(name="holder")], name="outer")
    wrappers = {"outer/first/wrap": (first.layers[0], (6,)),
                "outer/second/wrap": (second.layers[0], (5,)),
                "outer/holder/wrap": (outer.layers[-1].wrap, (5,))}
    for wrapper, _ in wrappers.values():
        kernel, bias = wrapper.layer.get_weights()
        wrapper.layer.set_weights([3.0 * rng.standard_normal(kernel.shape).astype("float32"),
                                   bias])
    before = [_norm(w, shape) for w, shape in wrappers.values()]
    assert max(before) > 1.0 + 1e-3  # the stale vectors no longer see the top direction
    norms = LipschitzWrapper.calibrate_all(outer)
    assert sorted(norms) == sorted(wrappers)
    for name, (wrapper, shape) in wrappers.items():
        assert _norm(wrapper, shape) == pytest.approx(1.0, rel=1e-6)
        assert norms[name] == pytest.approx(_norm(wrapper.layer, shape), rel=1e-6)


@pytest.mark.parametrize("name", ["dense", "conv2d_strided"])
def test_float16_layer_of_large_norm(name, rng):
    # Under the float16 policy the vector and σ̂ are float16: ‖h(v)‖² overflowed above σ̂ = 256,
    # σ̂ was inf and the wrapped layer computed with its kernel times 0. The vector is now
    # iterated in float32 and σ̂ measured without overflow.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float16")
    try:
        make, shape = LAYERS[name]
        inner = make()
        inner.build((None, *shape))
        inner.kernel.assign(inner.kernel.numpy() * (1e3 / _norm(inner, shape)))
        raw = _norm(inner, shape)  # of the float16 kernel
        wrapper = LipschitzWrapper(inner, max_lipschitz=1.0)
        x = rng.standard_normal((3, *shape)).astype("float16")
        y = np.asarray(wrapper(x), "float64")  # built eagerly: calibrated
        assert wrapper.raw_operator_norm() == pytest.approx(raw, rel=2.0 ** -10)
        assert _norm(wrapper, shape) == pytest.approx(1.0, rel=2.0 ** -9)
        expected = np.asarray(inner(x), "float64") / wrapper.raw_operator_norm()  # zero bias
        np.testing.assert_allclose(y, expected, rtol=2.0 ** -8,
                                   atol=2.0 ** -8 * np.abs(y).max())
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("power_iterations", [1, 4])
def test_training_step_calls_the_layer_once_per_product_plus_once_for_sigma(power_iterations,
                                                                              rng):
    # The scale that keeps JᵀJ in range comes from the first product's forward pass, and σ̂ of
    # the update scales the kernel: a step used to call the linear map twice more (4 calls
    # for one power step, 7 for a 4-product restart).
    calls = tf.Variable(0, dtype=tf.int64, trainable=False)
    wrapper = LipschitzWrapper(keras.layers.Dense(3), power_iterations=power_iterations)
    model = keras.Sequential([keras.Input((6,)), wrapper])
    linear = wrapper._linear

    def counted(v):
        with tf.control_dependencies([calls.assign_add(1)]):
            return linear(v)

    wrapper._linear = counted
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = rng.standard_normal((32, 6)), rng.standard_normal((32, 3))
    model.fit(x, y, batch_size=32, verbose=0)  # traces the step
    calls.assign(0)
    model.fit(x, y, batch_size=8, verbose=0)  # 4 steps
    assert int(calls.numpy()) == 4 * (power_iterations + 1)
