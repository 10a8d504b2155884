"""The graph walk: Sequential, Functional, nested, shared layers, several inputs/outputs, errors."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.graph import build_graph

L = keras.layers


def test_sequential_nodes_and_shapes():
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, strides=2, padding="same"),
                              L.Flatten(), L.Dense(5)])
    graph = build_graph(model)
    assert [n.class_name for n in graph.nodes] == ["InputLayer", "Conv2D", "Flatten", "Dense"]
    assert graph.nodes[1].input_shapes == ((8, 8, 3),)
    assert graph.nodes[1].output_shapes == ((4, 4, 4),)
    assert graph.nodes[3].parents == (2,)
    assert graph.outputs == [3]


def test_nested_models_are_expanded():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(4, name="d1"), L.Dense(3, name="d2")],
                             name="inner")
    inp = keras.Input((6,))
    out = L.Dense(2, name="head")(inner(inp))
    graph = build_graph(keras.Model(inp, out))
    names = [n.name for n in graph.nodes[1:]]
    assert names == ["inner/d1", "inner/d2", "head"]


def test_shared_layer_gets_one_node_per_call():
    shared = L.Dense(4, name="shared")
    a, b = keras.Input((4,)), keras.Input((4,))
    out = L.Add()([shared(a), shared(b)])
    graph = build_graph(keras.Model([a, b], out))
    assert sum(n.name == "shared" for n in graph.nodes) == 2


def test_unknown_spatial_size_needs_input_shape():
    model = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(2, 3)])
    with pytest.raises(tfl.ModelNotBuiltError, match="input_shape"):
        build_graph(model)
    graph = build_graph(model, input_shape=(9, 9, 3))
    assert graph.nodes[1].output_shapes == ((7, 7, 2),)


def test_input_shape_override_must_fit():
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    with pytest.raises(ValueError, match="does not fit"):
        build_graph(model, input_shape=(5,))


def test_input_errors_name_the_input_layer():
    # Messages named the input by its KerasTensor ('keras_tensor_3'), reports by its layer.
    x = keras.Input((None, 3), name="pixels")
    model = keras.Model(x, L.Dense(2)(x))
    with pytest.raises(tfl.ModelNotBuiltError, match="Model input 'pixels' has shape"):
        build_graph(model)
    with pytest.raises(ValueError, match="does not fit model input 'pixels'"):
        build_graph(model, input_shape=(4, 2))
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    with pytest.raises(tfl.ModelNotBuiltError, match="Model input 'token_ids' has dtype int32"):
        build_graph(keras.Model(ids, L.Embedding(10, 2)(ids)))


def test_unbuilt_sequential_says_so():
    with pytest.raises(tfl.ModelNotBuiltError, match="keras.Input"):
        build_graph(keras.Sequential([L.Dense(2)]))


def test_subclassed_model_is_refused_with_a_way_out():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(tfl.ModelNotBuiltError, match="subclassed") as info:
        build_graph(net)
    # the way out the message gives runs as written, and bounds the model
    recipe = re.search(r"`est = (tfl\.GraphEstimator\(.*?\))`", str(info.value)).group(1)
    est = eval(recipe, {"tfl": tfl, "tf": tf, "model": net, "input_shape": (3,)})
    assert est.autolip().upper == pytest.approx(np.linalg.norm(net.d.kernel.numpy(), 2),
                                                rel=1e-4)


def test_integer_inputs_point_to_the_embedding_output():
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(10, 4, name="embedding")(inp)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    with pytest.raises(tfl.ModelNotBuiltError, match="embedding"):
        build_graph(model)
    sub = keras.Model(model.get_layer("embedding").output, model.output)
    assert tfl.LipschitzEstimator(sub, verbose=0).autolip().upper > 0


def test_unsupported_layer_names_it_and_the_fix():
    class Weird(L.Layer):
        def call(self, x):
            return keras.ops.sin(x) * 3

    model = keras.Sequential([keras.Input((3,)), Weird(name="weird")])
    with pytest.raises(tfl.UnsupportedLayerError, match=r"weird.*register_rule"):
        tfl.LipschitzEstimator(model, verbose=0)
    tfl.register_rule(Weird, tfl.rules.constant(3.0))
    assert tfl.LipschitzEstimator(model, verbose=0).autolip().upper == pytest.approx(3.0)


def test_subclass_overriding_call_does_not_inherit_the_rule():
    class Doubling(L.Dense):
        def call(self, x):
            return 2 * super().call(x)

    model = keras.Sequential([keras.Input((3,)), Doubling(2, name="doubling")])
    with pytest.raises(tfl.UnsupportedLayerError, match="overrides call"):
        tfl.LipschitzEstimator(model, verbose=0)


def test_multiply_of_two_dependent_tensors_is_not_lipschitz():
    inp = keras.Input((3,))
    out = L.Multiply(name="gate")([L.Dense(3)(inp), L.Dense(3)(inp)])
    with pytest.raises(tfl.NotLipschitzError, match="gate"):
        tfl.LipschitzEstimator(keras.Model(inp, out), verbose=0)


def test_attention_is_not_lipschitz():
    inp = keras.Input((4, 8))
    out = L.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    with pytest.raises(tfl.NotLipschitzError, match="mha"):
        tfl.LipschitzEstimator(keras.Model(inp, out), verbose=0)


@pytest.mark.parametrize("shape", [(2, 4), (3, 1, 4)])
def test_constant_broadcast_into_the_batch_axis_is_refused_by_name(shape):
    # x * c with c of shape (2, 4) gives 2 "examples" per example: not a per-example map
    # (this was a raw NumPy broadcasting error from inside a rule).
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(4)(inputs) * np.full(shape, 2.0, "float32")
    model = keras.Model(inputs, outputs)
    with pytest.raises(tfl.LipschitzError, match="multiply.*examples for one input example"):
        build_graph(model)


def test_constant_with_a_unit_batch_axis_is_a_per_example_scaling():
    inputs = keras.Input((4,))
    outputs = inputs * np.array([[[1.0, -2.0, 0.5, 1.0]], [[2.0, 0.0, 0.0, 1.0]]])[None]
    model = keras.Model(inputs, outputs)  # (1, 2, 1, 4): each example copied into 2 rows
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    # Input entry j goes to two outputs scaled by c[0, j] and c[1, j]: norm max_j ‖c[:, j]‖₂.
    np.testing.assert_allclose(report.upper, np.sqrt(1.0**2 + 2.0**2), rtol=1e-6)


def test_adaptive_max_pooling_of_output_size_one_is_refused_before_it_runs():
    # Called eagerly, Keras 3.15's layer kills the process (SIGFPE in TensorFlow's max pool):
    # it must be refused before the graph walk calls any layer.
    model = keras.Sequential([keras.Input((5, 2)), L.Dense(3), L.AdaptiveMaxPooling1D(1)])
    with pytest.raises(tfl.UnsupportedLayerError, match=r"output_size=\(1,\).*GlobalMaxPooling"):
        build_graph(model)
