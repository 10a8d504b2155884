"""The model graph walk: a Keras model as a flat, topologically ordered list of layer calls.

Sequential and Functional models are walked through their node graph; models nested inside
models are expanded in place, so every primitive layer appears once per call with its real,
concrete input shape (batch axis removed). Concrete shapes come from one forward pass on a
batch of one example, which also tells which tensors depend on the model input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np
from keras.src import tree

from tf_lipschitz.errors import (InvalidArgumentError, LipschitzError, ModelNotBuiltError,
                                 UnsupportedLayerError)

__all__ = ["GraphNode", "ModelGraph", "build_graph", "input_name"]


@dataclasses.dataclass
class GraphNode:
    """One call of a layer (or Keras op) in the model, or a model input.

    Attributes:
        index: Position in topological order.
        operation: The layer or op; ``None`` for a model input.
        name: Qualified name (``"outer/inner/conv1"`` inside nested models).
        parents: For each tensor input of the call, the index of the node producing it.
        input_shapes: Per-example shapes of the tensor inputs.
        output_shapes: Per-example shapes of the outputs.
        dependent: Whether the node's output depends on the model input.
        input_dependent: For each tensor input, whether it depends on the model input.
        constants: One entry per positional argument of the call (flattened, in order):
            ``None`` for a tensor that depends on the model input, else the argument's value
            (a constant tensor's batch-1 value, a Python number, an array, a captured tensor's
            value, or a captured ``keras.Variable`` itself, which rules read when they run).
        consumers: Indices of nodes using this node's output.
        dtype: Floating dtype of the first input.
    """

    index: int
    operation: Any
    name: str
    parents: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    dependent: bool
    input_dependent: tuple[bool, ...] = ()
    constants: tuple[Any, ...] = ()
    consumers: list[int] = dataclasses.field(default_factory=list)
    dtype: str = "float32"

    @property
    def is_input(self) -> bool:
        return self.operation is None

    @property
    def class_name(self) -> str:
        return "InputLayer" if self.operation is None else type(self.operation).__name__


@dataclasses.dataclass
class ModelGraph:
    """A model as layer calls in topological order.

    Attributes:
        nodes: All nodes, inputs first.
        inputs: Indices of the model-input nodes.
        outputs: Indices of the nodes producing the model outputs.
        output_names: Display names of the outputs.
    """

    nodes: list[GraphNode]
    inputs: list[int]
    outputs: list[int]
    output_names: list[str]

    def __len__(self) -> int:
        return len(self.nodes)


def _functional_of(model, where: str):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ModelNotBuiltError(
                f"Sequential model '{model.name}'{where} has no known input shape. Start it with "
                "`keras.Input(shape=...)` or call `model.build((None, ...))` before analysing it."
            )
        return functional
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations"):
        return model
    raise ModelNotBuiltError(
        f"Model '{getattr(model, 'name', model)}'{where} is a subclassed model, which has no "
        "inspectable layer graph. Rebuild it as a Functional or Sequential model, or analyse "
        "the TensorFlow graph of its call (AutoLip, certified AutoLip and a lower bound, as "
        "the tf-lipschitz command does for a subclassed .keras file): `est = tfl.GraphEstimator("
        "lambda x: model(x, training=False), tf.TensorSpec((None, *input_shape)))`, then "
        "`est.autolip()` or `est.lower_bound()`."
    )


def _is_model(op) -> bool:
    return isinstance(op, keras.Model)


def _example_shape(value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape[1:])


def _check_batch_axis(name: str, op, outputs, dependent: bool) -> None:
    """Refuses an input-dependent layer whose output does not keep the batch axis of its input.

    The graph is walked on one example; an output with more examples than that (a constant of
    shape ``(2, n)`` broadcast into the batch axis, a reshape across examples) is not a
    per-example map, so no per-example constant describes it.
    """
    if not dependent:
        return
    for value in outputs:
        if len(value.shape) and value.shape[0] != 1:
            raise LipschitzError(
                f"Layer '{name}' ({type(op).__name__}) returns {value.shape[0]} examples for one "
                f"input example (output shape {tuple(value.shape)}): a constant broadcasts into "
                "the batch axis, or the layer reshapes across examples. tf_lipschitz bounds "
                "per-example maps: give such a constant a batch axis of size 1 or none, and "
                "keep the batch axis first and unchanged.")


class _Builder:
    def __init__(self):
        self.nodes: list[GraphNode] = []

    def add(self, **kwargs) -> GraphNode:
        node = GraphNode(index=len(self.nodes), **kwargs)
        self.nodes.append(node)
        return node

    def walk(self, functional, entries: list[tuple[Any, int]], prefix: str) -> list[tuple[Any, int]]:
        """Expands ``functional`` given ``(value, node index)`` entries for its inputs."""
        inputs = tree.flatten(functional.inputs)
        if len(inputs) != len(entries):
            raise LipschitzError(
                f"Model '{functional.name}' expects {len(inputs)} inputs, received {len(entries)}."
            )
        tensor_map = {id(x): e for x, e in zip(inputs, entries)}
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for node in functional._nodes_by_depth[depth]:
                if node.is_input or not node.operation:
                    continue
                if any(id(x) not in tensor_map for x in node.input_tensors):
                    continue
                op = node.operation
                in_entries = [tensor_map[id(x)] for x in node.input_tensors]
                if _is_model(op):
                    inner = _functional_of(op, f" (nested in '{prefix.rstrip('/') or 'model'}')")
                    outs = self.walk(inner, in_entries, f"{prefix}{op.name}/")
                else:
                    outs = self.call(op, node, tensor_map, in_entries, prefix)
                for x, e in zip(node.outputs, outs):
                    tensor_map[id(x)] = e
        results = []
        for x in tree.flatten(functional.outputs):
            if id(x) not in tensor_map:
                raise LipschitzError(
                    f"Output '{x.name}' of model '{functional.name}' could not be reached from "
                    "its inputs; tf_lipschitz analyses outputs that are computed from the inputs."
                )
            results.append(tensor_map[id(x)])
        return results

    def call(self, op, node, tensor_map, in_entries, prefix) -> list[tuple[Any, int]]:
        values = {k: v[0] for k, v in tensor_map.items()}
        args, kwargs = node.arguments.fill_in(values)
        if isinstance(op, keras.layers.Layer) and getattr(op, "_call_has_training_arg", False):
            kwargs = dict(kwargs, training=False)
        try:
            outputs = op(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the layer named
            raise LipschitzError(
                f"Layer '{prefix}{op.name}' ({type(op).__name__}) failed on the concrete input "
                f"shapes {[_example_shape(e[0]) for e in in_entries]}: {exc}"
            ) from exc
        flat_out = tree.flatten(outputs)
        parents = tuple(e[1] for e in in_entries)
        input_dependent = tuple(self.nodes[p].dependent for p in parents)
        _check_batch_axis(f"{prefix}{op.name}", op, flat_out, any(input_dependent))
        constants = []
        dependent_ids = {id(x) for x, d in zip(node.input_tensors, input_dependent) if d}
        for arg in tree.flatten(node.arguments.args):
            if isinstance(arg, keras.KerasTensor):
                constants.append(None if id(arg) in dependent_ids
                                 else keras.ops.convert_to_numpy(values[id(arg)]))
            elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
                constants.append(arg)  # a Python scalar (weakly typed: takes x's dtype)
            elif isinstance(arg, (np.ndarray, np.generic)):
                constants.append(np.asarray(arg))
            elif isinstance(arg, keras.Variable):
                constants.append(arg)  # kept, not read: rules read it when they run
            elif keras.ops.is_tensor(arg):  # captured tensors
                constants.append(keras.ops.convert_to_numpy(arg))
        first = in_entries[0][0] if in_entries else None
        graph_node = self.add(
            operation=op,
            name=f"{prefix}{op.name}",
            parents=parents,
            input_shapes=tuple(_example_shape(e[0]) for e in in_entries),
            output_shapes=tuple(_example_shape(o) for o in flat_out),
            dependent=any(input_dependent),
            input_dependent=input_dependent,
            constants=tuple(constants),
            dtype=str(first.dtype.name if hasattr(first.dtype, "name") else first.dtype)
            if first is not None else "float32",
        )
        for p in set(parents):
            self.nodes[p].consumers.append(graph_node.index)
        return [(o, graph_node.index) for o in flat_out]


def input_name(tensor) -> str:
    """The name of a model input as reports show it: its InputLayer's (``input_layer_1``)."""
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else tensor.name


def _concrete_shape(tensor, override, index: int, n_inputs: int) -> tuple[int, ...]:
    shape = tuple(tensor.shape[1:])
    if override is not None:
        try:
            given = override[index] if n_inputs > 1 else override
            given = None if isinstance(given, str) else tuple(int(d) for d in given)
        except (TypeError, ValueError, IndexError):
            given = None
        if given is None or len(given) != len(shape) or any(
                s is not None and s != g for s, g in zip(shape, given)):
            expected = ("a list of shapes, one per model input" if n_inputs > 1
                        else "the shape of one example")
            raise InvalidArgumentError(
                f"input_shape={override!r} does not fit model input '{input_name(tensor)}' of "
                f"shape {shape} (batch axis excluded); pass {expected}, without the batch axis."
            )
        return given
    if any(d is None for d in shape):
        raise ModelNotBuiltError(
            f"Model input '{input_name(tensor)}' has shape {shape} with unknown dimensions. The "
            "operator norm of a convolution depends on the input size: pass "
            "`input_shape=(...)` (without the batch axis) to LipschitzEstimator."
        )
    return tuple(int(d) for d in shape)


def _refuse_known_crashes(model: keras.Model) -> None:
    """Refuses, before any layer runs, layers that kill the process when called eagerly.

    Keras 3.15's AdaptiveMaxPooling with an output size of 1 on some axis pools with a window
    larger than the axis, and TensorFlow's eager max pool then divides by zero (SIGFPE: the
    Python process dies; ``model.predict`` raises a ``ValueError`` instead).
    """
    adaptive_max = tuple(getattr(keras.layers, f"AdaptiveMaxPooling{d}D", None) for d in (1, 2, 3))
    adaptive_max = tuple(cls for cls in adaptive_max if cls is not None)
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if adaptive_max and isinstance(layer, adaptive_max) and 1 in tuple(layer.output_size):
            raise UnsupportedLayerError(
                layer, f"Its output_size={tuple(layer.output_size)} has a size of 1: Keras "
                "3.15 then pools with a window larger than the axis, which crashes TensorFlow's "
                "eager max pool (the process dies) and makes model.predict fail. Use "
                "GlobalMaxPooling, or a larger output size.", suggest_rule=False)


def build_graph(model: keras.Model, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
                *, seed: int = 0) -> ModelGraph:
    """Flattens a built Sequential or Functional model (nested models expanded).

    Args:
        model: The model.
        input_shape: Per-example input shape(s), required when the model's input shape has
            unknown dimensions (fully convolutional models).
        seed: Seed of the random example used to find the concrete shapes.

    Returns:
        A :class:`ModelGraph`.

    Raises:
        ModelNotBuiltError: For a subclassed or unbuilt model, or unknown input dimensions.
        UnsupportedLayerError: For integer inputs.
    """
    if not isinstance(model, keras.Model):
        raise InvalidArgumentError(
            f"model must be a keras.Model (Sequential or Functional); received model={model!r}. "
            "Load a .keras file with keras.saving.load_model first; for a TensorFlow function "
            "or SavedModel use tfl.autolip_function or tfl.autolip_saved_model.")
    functional = _functional_of(model, "")
    _refuse_known_crashes(functional)
    inputs = tree.flatten(functional.inputs)
    rng = np.random.default_rng(seed)
    builder = _Builder()
    entries = []
    for i, tensor in enumerate(inputs):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise ModelNotBuiltError(
                f"Model input '{input_name(tensor)}' has dtype {dtype}: integer inputs (token ids "
                "for an Embedding) have no continuous perturbation. Analyse the model from the first "
                "floating-point tensor instead, e.g. `keras.Model(model.get_layer('embedding')"
                ".output, model.output)`."
            )
        shape = _concrete_shape(tensor, input_shape, i, len(inputs))
        value = keras.ops.convert_to_tensor(rng.standard_normal((1, *shape)).astype(dtype))
        name = input_name(tensor)
        node = builder.add(
            operation=None, name=name, parents=(), input_shapes=(shape,),
            output_shapes=(shape,), dependent=True, dtype=dtype,
        )
        entries.append((value, node.index))
    outs = builder.walk(functional, entries, "")
    out_nodes = [e[1] for e in outs]
    names = [builder.nodes[i].name for i in out_nodes]
    return ModelGraph(builder.nodes, [e[1] for e in entries], out_nodes, names)
