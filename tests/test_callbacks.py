"""LipCallback: logged values against a fresh estimator, TensorBoard files, failures, strategies."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_lipschitz.callbacks import LipCallback
from tf_lipschitz.errors import (InvalidArgumentError, ModelNotBuiltError, NotLipschitzError,
                                 UnsupportedLayerError)
from tf_lipschitz.estimator import LipschitzEstimator


def _model():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, strides=2, activation="relu", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(2, name="dense"),
    ])


@pytest.fixture
def data(rng):
    x = rng.standard_normal((64, 8, 8, 1)).astype("float32")
    y = rng.standard_normal((64, 2)).astype("float32")
    return x, y


def _fit(model, x, y, callbacks, epochs=2, optimizer="adam", **kwargs):
    model.compile(optimizer, "mse")
    return model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks,
                     **kwargs)


LOWER = {"steps": 5, "n_random": 4}


def test_logged_values_equal_a_fresh_estimator(data):
    x, y = data
    model = _model()
    cb = LipCallback(methods=("autolip", "lower"), x=x[:8], lower_kwargs=LOWER)
    history = _fit(model, x, y, [cb])
    logged = history.history["lipschitz_autolip"]
    lower = history.history["lipschitz_lower"]
    assert len(logged) == len(lower) == 2
    assert logged[0] != logged[1]  # the weights moved; the estimate followed
    est = LipschitzEstimator(model, verbose=0)  # fresh: cold start, new compiled solver
    fresh = est.autolip()
    assert logged[-1] == pytest.approx(fresh.upper, rel=1e-5)
    assert lower[-1] == pytest.approx(est.lower_bound(x[:8], **LOWER).value, rel=1e-5)
    assert lower[-1] <= logged[-1]
    last = cb.records[-1]
    assert [r.stage for r in cb.records] == ["train_begin", "epoch_end", "epoch_end"]
    assert last.kinds == {"lipschitz_autolip": "estimate", "lipschitz_lower": "lower bound"}
    rows = {row.name: row.lipschitz for row in fresh.layers if row.lipschitz is not None}
    assert set(last.layers["autolip"]) == set(rows) == {"conv", "flatten+dense"}
    for name, value in rows.items():
        assert last.layers["autolip"][name] == pytest.approx(value, rel=1e-5)
    assert cb.series("autolip") == logged


def test_warm_start_reuses_the_compiled_solver(data):
    x, y = data
    model = _model()
    cb = LipCallback()
    _fit(model, x, y, [cb], epochs=1)
    solver = cb.estimator._autolip.solver
    first = solver._last
    _fit(model, x, y, [cb], epochs=1)
    assert cb.estimator._autolip.solver is solver  # not rebuilt
    assert solver._last is not first  # and re-run from the previous vectors


def test_every_n_epochs_and_csv_logger(data, tmp_path):
    x, y = data
    path = tmp_path / "log.csv"
    history = _fit(_model(), x, y, [LipCallback(every_n_epochs=2), keras.callbacks.CSVLogger(path)],
                   epochs=3)
    logged = history.history["lipschitz_autolip"]
    assert math.isnan(logged[0]) and math.isnan(logged[2]) and math.isfinite(logged[1])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["lipschitz_autolip"]) == pytest.approx(logged[1], rel=1e-6)


def test_every_n_batches(data):
    x, y = data  # 4 batches per epoch
    cb = LipCallback(every_n_epochs=None, every_n_batches=3)
    history = _fit(_model(), x, y, [cb], epochs=2)
    batch = [r for r in cb.records if r.stage == "batch_end"]
    assert [r.step for r in batch] == [3, 6]
    assert [(r.epoch, r.batch) for r in batch] == [(0, 2), (1, 1)]
    assert "lipschitz_autolip" not in history.history


def test_every_n_batches_with_steps_per_execution(data):
    # With steps_per_execution=4 Keras calls on_train_batch_end at steps 4, 8, 12...; the
    # callback fired only when the step was a multiple of n (steps 12 and 24 here, silently
    # 2 estimates where 3 were due). It now fires once n steps have passed since the last one.
    x, y = data
    model = _model()
    model.compile("adam", "mse", steps_per_execution=4)
    cb = LipCallback(every_n_epochs=None, every_n_batches=6)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])  # 8 steps per epoch
    assert [r.step for r in cb.records if r.stage == "batch_end"] == [8, 16, 24]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])  # the count goes on
    assert [r.step for r in cb.records if r.stage == "batch_end"] == [8, 16, 24, 32]
    assert int(model.optimizer.iterations.numpy()) == 32


def _events(directory):
    scalars = {}
    for name in sorted(os.listdir(directory)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            for value in event.summary.value:
                if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, []).append(
                        (event.step, float(tf.make_ndarray(value.tensor)),
                         value.metadata.summary_description))
    return scalars


def test_tensorboard_scalars_next_to_keras_tensorboard(data, tmp_path):
    x, y = data
    log_dir = str(tmp_path / "logs")
    cb = LipCallback(log_dir=log_dir, every_n_batches=4)
    history = _fit(_model(), x, y, [cb, keras.callbacks.TensorBoard(log_dir)])
    assert sorted(os.listdir(log_dir)) == ["lipschitz", "train"]
    ours = _events(os.path.join(log_dir, "lipschitz"))
    total = ours["epoch_lipschitz_autolip"]
    assert [s for s, _, _ in total] == [0, 1]
    np.testing.assert_allclose([v for _, v, _ in total], history.history["lipschitz_autolip"],
                               rtol=1e-6)
    assert "estimate" in total[0][2]
    epoch_records = [r for r in cb.records if r.stage == "epoch_end"]
    for name in ("conv", "flatten+dense"):
        values = [v for _, v, _ in ours[f"epoch_lipschitz_autolip/{name}"]]
        np.testing.assert_allclose(values, [r.layers["autolip"][name] for r in epoch_records],
                                   rtol=1e-6)
    assert [s for s, _, _ in ours["batch_lipschitz_autolip"]] == [4, 8]
    # keras.callbacks.TensorBoard still writes its own run, and sees the logs we added
    theirs = _events(os.path.join(log_dir, "train"))
    assert "epoch_loss" in theirs and "epoch_lipschitz_autolip" in theirs


@pytest.mark.parametrize("shape", [(4, 8, 8, 2), (4, 7)])
def test_x_of_the_wrong_shape_fails_before_training(shape, data):
    # (4, 7) failed with NumPy's "cannot reshape array of size 28 into shape (8,8,1)";
    # (4, 8, 8, 2) was silently reshaped into 8 examples of the model's input shape.
    x, y = data
    model = _model()
    cb = LipCallback(methods=("autolip", "lower"), x=np.ones(shape, "float32"))
    with pytest.raises(InvalidArgumentError) as info:
        _fit(model, x, y, [cb], epochs=1)
    message = str(info.value)
    assert "x=" in message and str(shape) in message and "(8, 8, 1)" in message
    assert int(model.optimizer.iterations.numpy()) == 0


def test_x_may_be_one_example(data):
    x, y = data
    cb = LipCallback(methods=("autolip", "lower"), x=x[0], lower_kwargs=LOWER)
    _fit(_model(), x, y, [cb], epochs=1)
    assert cb._x_batch.shape == (1, 8, 8, 1)


def test_tf_data_dataset(data):
    x, y = data
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = _model()
    model.compile("adam", "mse")
    cb = LipCallback(methods=("autolip", "lower"), x=ds, lower_kwargs=LOWER)
    history = model.fit(ds, epochs=1, verbose=0, callbacks=[cb], shuffle=False)
    assert history.history["lipschitz_autolip"][-1] == pytest.approx(
        LipschitzEstimator(model, verbose=0).autolip().upper, rel=1e-5)
    assert cb._x_batch.shape == (16, 8, 8, 1)


def _two_input_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2, 2), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(4, activation="tanh")(a),
                                    keras.layers.Flatten()(b)])
    return keras.Model([a, b], keras.layers.Dense(2)(h), name="two_inputs")


@pytest.mark.parametrize("form", ["list", "dict", "dataset"])
def test_lower_bound_of_a_model_with_two_inputs(form, rng):
    # The lower bound is on the constant with respect to both inputs at once, like AutoLip's:
    # it must lie under the logged AutoLip value and equal a fresh estimator's.
    xa = rng.standard_normal((32, 3)).astype("float32")
    xb = rng.standard_normal((32, 2, 2)).astype("float32")
    y = rng.standard_normal((32, 2)).astype("float32")
    model = _two_input_model()
    x = {"list": [xa[:8], xb[:8]], "dict": {"b": xb[:8], "a": xa[:8]},
         "dataset": tf.data.Dataset.from_tensor_slices(((xa, xb), y)).batch(8)}[form]
    cb = LipCallback(methods=("autolip", "lower"), x=x, lower_kwargs=LOWER)
    history = _fit(model, [xa, xb], y, [cb], epochs=1)
    lower = history.history["lipschitz_lower"][-1]
    assert 0 < lower <= history.history["lipschitz_autolip"][-1]
    fresh = LipschitzEstimator(model, verbose=0).lower_bound([xa[:8], xb[:8]], **LOWER)
    assert lower == pytest.approx(fresh.value, rel=1e-6)



@pytest.mark.parametrize("inputs", [("b", "a"), ("one",)])
def test_lower_bound_of_a_model_built_on_a_dict(inputs, rng):
    # keras.Model({"b": b, "a": a}, ...) trained on a dataset of dicts: the callback fed the
    # model a list (Keras refuses it for unsorted keys) and refused a dict for one input.
    # Ground truth: the map is x -> 3 x for every input, constant 3.
    tensors = {n: keras.Input((2,), name=n) for n in inputs}
    joined = (keras.layers.Concatenate()(list(tensors.values())) if len(inputs) > 1
              else tensors[inputs[0]])
    model = keras.Model(tensors, 3.0 * joined)
    x = {n: rng.standard_normal((8, 2)).astype("float32") for n in inputs}
    y = rng.standard_normal((8, 2 * len(inputs))).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    cb = LipCallback(methods=("autolip", "lower"), x=ds, lower_kwargs=LOWER)
    model.compile("sgd", "mse")
    history = model.fit(ds, epochs=1, verbose=0, callbacks=[cb])
    assert history.history["lipschitz_lower"][-1] == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("x, match", [
    (lambda xa, xb: xa, "one array of shape \\(8, 3\\).*2 inputs: pass a list with one batch per input"),
    (lambda xa, xb: [xa, xb[:, :1]], "Input 'b' expects"),
    (lambda xa, xb: {"a": xa}, "missing \\['b'\\]"),
])
def test_wrong_inputs_of_a_two_input_model_fail_before_training(x, match, rng):
    xa = rng.standard_normal((8, 3)).astype("float32")
    xb = rng.standard_normal((8, 2, 2)).astype("float32")
    model = _two_input_model()
    cb = LipCallback(methods=("autolip", "lower"), x=x(xa, xb))
    with pytest.raises(InvalidArgumentError, match=match):
        _fit(model, [xa, xb], np.zeros((8, 2), "float32"), [cb], epochs=1)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_nan_weights_warn_and_training_continues(data):
    x, y = data
    model = _model()
    saved = {}

    def poison(epoch, logs):
        if epoch == 0:
            saved["weights"] = model.get_weights()
            model.set_weights([np.full_like(w, np.nan) for w in saved["weights"]])
        elif epoch == 1:
            model.set_weights(saved["weights"])

    cb = LipCallback()
    with pytest.warns(RuntimeWarning, match="NaN"):
        history = _fit(model, x, y, [keras.callbacks.LambdaCallback(on_epoch_end=poison), cb],
                       epochs=3, optimizer="sgd")
    logged = history.history["lipschitz_autolip"]
    assert len(logged) == 3  # the run was not stopped
    assert math.isnan(logged[0])
    assert math.isfinite(logged[1]) and math.isfinite(logged[2])  # recovered (cold restart)
    assert logged[2] == pytest.approx(LipschitzEstimator(model, verbose=0).autolip().upper,
                                      rel=1e-5)


class _NoRule(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: keras.Sequential([keras.Input((4,)), _NoRule(), keras.layers.Dense(2)]),
         UnsupportedLayerError),
        (lambda: keras.Sequential([keras.Input((4,)),
                                   keras.layers.Dense(2, activation="exponential")]),
         NotLipschitzError),
        (_Subclassed, ModelNotBuiltError),
    ],
)
def test_unusable_model_fails_before_training(make, error, rng):
    model = make()
    model.compile("sgd", "mse")
    x = rng.standard_normal((16, 4)).astype("float32")
    with pytest.raises(error) as info:
        model.fit(x, np.zeros((16, 2), "float32"), epochs=1, verbose=0,
                  callbacks=[LipCallback()])
    assert "before training started" in "\n".join(getattr(info.value, "__notes__", []))
    assert int(model.optimizer.iterations.numpy()) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"methods": ("autolip", "clever")}, "Unknown Lipschitz method"),
        ({"methods": ()}, "Unknown Lipschitz method"),
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"every_n_epochs": -2}, "every_n_epochs=-2"),
        ({"every_n_epochs": 1.5}, "every_n_epochs=1.5"),
        ({"every_n_epochs": True}, "every_n_epochs=True"),
        ({"every_n_batches": 0}, "every_n_batches=0"),
        ({"every_n_epochs": None}, "never run"),
        ({"verbose": 3}, "verbose=3"),
        ({"lower_kwargs": {"steps": 3}}, "lower"),
        ({"methods": ("lower",), "lower_kwargs": {"x": 1}}, "LipCallback"),
        ({"seqlip_kwargs": {"mode": "greedy"}}, "seqlip"),
        # accepted at construction and failing only in fit (or never) before:
        ({"solver": "svd"}, "solver='svd'"),
        ({"tol": -1}, "tol=-1"),
        ({"tol": 0.5}, "tol=0.5"),
        ({"max_products": 0}, "max_products=0"),
        ({"methods": ("lower",), "lower_kwargs": {"stepz": 3}}, "'stepz'.*'steps'"),
        ({"methods": ("lower",), "lower_kwargs": [("steps", 3)]}, "lower_kwargs="),
        ({"methods": ("seqlip",), "seqlip_kwargs": {"topk": 3}}, "'topk'.*'top_k'"),
        ({"methods": ("seqlip",), "seqlip_kwargs": {"top_k": 0}}, "top_k=0"),
        ({"x": np.ones((4, 3))}, "'lower' is not in `methods`"),
        ({"methods": ("lower",), "x": [[1.0, 2.0], [3.0]]}, "x"),
        ({"methods": ("lower",), "x": "images.npy"}, "x with shape"),
        ({"per_layer": "yes"}, "per_layer='yes'"),
        ({"certified": 1}, "certified=1"),
        ({"log_dir": 3}, "log_dir=3"),
        ({"input_shape": 28}, "input_shape=28"),
    ],
)
def test_bad_arguments(kwargs, match):
    # InvalidArgumentError (a LipschitzError, also a ValueError) naming the argument and the
    # value received, raised at construction; they were plain ValueErrors or not raised at all.
    with pytest.raises(InvalidArgumentError, match=match):
        LipCallback(**kwargs)


def test_seqlip_method(data, tmp_path):
    if not hasattr(LipschitzEstimator, "seqlip"):
        with pytest.raises(ValueError, match="seqlip"):
            LipCallback(methods=("autolip", "seqlip"))
        return
    x, y = data
    model = _model()
    log_dir = str(tmp_path / "logs")
    cb = LipCallback(methods=("autolip", "seqlip"), seqlip_kwargs={"mode": "greedy"},
                     log_dir=log_dir)
    history = _fit(model, x, y, [cb], epochs=1)
    seqlip = history.history["lipschitz_seqlip"][0]
    assert seqlip <= history.history["lipschitz_autolip"][0] * (1 + 1e-6)
    # per-layer SeqLip values are pair factors, and their TensorBoard descriptions say so
    # (a user trial read "the layer's own Lipschitz constant" on them)
    events = _events(os.path.join(log_dir, "lipschitz"))
    seqlip_tags = [t for t in events if t.startswith("epoch_lipschitz_seqlip/")]
    autolip_tags = [t for t in events if t.startswith("epoch_lipschitz_autolip/")]
    assert seqlip_tags and autolip_tags
    assert all("factor of the pair" in events[t][0][2] for t in seqlip_tags)
    assert all("own Lipschitz constant" in events[t][0][2] for t in autolip_tags)
    fresh = LipschitzEstimator(model, verbose=0).seqlip("greedy")
    assert seqlip == pytest.approx(fresh.upper, rel=1e-4)
    assert cb.records[-1].kinds["lipschitz_seqlip"] == fresh.kind


_MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from tf_lipschitz.callbacks import LipCallback
    from tf_lipschitz.constraints import SpectralNorm
    from tf_lipschitz.estimator import LipschitzEstimator
    from tf_lipschitz.wrappers import LipschitzWrapper

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            LipschitzWrapper(keras.layers.Conv2D(3, 3, strides=2, activation="relu")),
            keras.layers.Flatten(),
            keras.layers.Dense(2, kernel_constraint=SpectralNorm(0.5)),
        ])
        model.compile("adam", "mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 8, 1)).astype("float32")
    y = 5.0 * rng.standard_normal((64, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    cb = LipCallback(log_dir=sys.argv[1])
    history = model.fit(ds, epochs=2, verbose=0, callbacks=[cb])
    report = LipschitzEstimator(model, verbose=0).autolip()
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "logged": history.history["lipschitz_autolip"],
        "fresh": report.upper,
        "dense": float(np.linalg.norm(model.layers[-1].kernel.numpy(), 2)),
        "wrapper_row": [r.norm for r in report.layers if r.name.startswith("lipschitz")][0],
    }))
    """
)


def test_mirrored_strategy_two_logical_cpus(tmp_path):
    """Logical devices must be configured before TensorFlow starts: run in a fresh process."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, str(tmp_path / "logs")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert len(result["logged"]) == 2
    assert result["logged"][-1] == pytest.approx(result["fresh"], rel=1e-5)
    assert result["dense"] <= 0.5 * (1 + 1e-3)
    assert result["wrapper_row"] <= 1.0 * (1 + 1e-3)
    assert "lipschitz" in os.listdir(tmp_path / "logs")


def test_no_numpy_copy_deprecation_warning_from_reading_variables():
    # np.array(variable) (keras.ops.convert_to_numpy of a Keras/TF variable) makes NumPy 2 warn
    # "__array__ implementation doesn't accept a copy keyword" in users' logs, from the
    # callback's step counter, the wrapper's vector and a captured constant variable.
    import warnings

    import tf_lipschitz as tfl

    inputs = keras.Input((4,))
    scale = keras.Variable(np.full((4,), 2.0, "float32"))
    hidden = keras.layers.Dense(4)(inputs) * scale
    wrapper = tfl.LipschitzWrapper(keras.layers.Dense(3), max_lipschitz=1.0)
    model = keras.Model(inputs, wrapper(hidden))
    model.compile("sgd", "mse")
    callback = tfl.LipCallback(every_n_batches=1, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.zeros((8, 4), "float32"), np.zeros((8, 3), "float32"), batch_size=4,
                  epochs=1, verbose=0, callbacks=[callback])
        assert wrapper.is_calibrated()
        tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert not [w for w in caught if "__array__" in str(w.message)]


@pytest.mark.parametrize("shape", [tf.TensorShape([4]), np.array([4]), [np.int64(4)], (4,)])
def test_input_shape_accepts_shapes_of_any_kind(shape):
    assert LipCallback(input_shape=shape).input_shape == (4,)
