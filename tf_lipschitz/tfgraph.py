"""AutoLip on TensorFlow graphs: SavedModels and ``tf.function``\\ s without the Keras structure.

A SavedModel exported with ``model.export()`` or ``tf.saved_model.save()`` keeps only a
TensorFlow graph. This module runs AutoLip (Scaman & Virmaux, NeurIPS 2018, Algorithm 1;
shared/ALGORITHMS.md §4) on that graph directly:

1. the signature's concrete function is inlined and its variables frozen into a ``GraphDef``
   (TensorFlow's converter, :func:`_freeze`); calls that freezing keeps (``_noinline``,
   ``_XlaMustCompile``: a grouped ``Conv2D``) are replaced by their bodies (:func:`_inline_calls`);
2. the ops are walked in topological order from the input placeholder(s); an op whose value does
   not depend on the input (weights, shape arithmetic) is a constant, evaluated once;
3. every input-dependent op gets a rule from a registry keyed by op type:

   - ops *linear* (or affine) in their one input-dependent operand (``MatMul``, ``Conv2D``,
     ``DepthwiseConv2dNative``, ``Conv2DBackpropInput``, ``BiasAdd``, ``AddV2`` with a constant,
     ``Mul`` by a constant, ``AvgPool``, ``Mean``, ``Reshape``, ``Transpose``, ``Pad``,
     ``GatherNd``, ``ConcatV2``, ``StridedSlice``, ``FusedBatchNormV3`` at inference...) are
     re-executed on their own, as a function of that operand, with their additive constants
     (biases, offsets, batch-norm means) set to zero. Consecutive linear ops are fused into one
     operator and the operator norms of all of them are measured together by the core
     :class:`~tf_lipschitz.power.SpectralSolver` on their real input shapes;
   - elementwise activations (``Relu``, ``Relu6``, ``Elu``, ``Selu``, ``LeakyRelu``, ``Sigmoid``,
     ``Tanh``, ``Softplus``, ``Softsign``, ``Softmax``, ``LogSoftmax``) get the constants of
     :func:`tf_lipschitz.rules.activations.activation_info`; activations that TensorFlow builds from
     several ops (gelu as ``0.5·x·erfc(−x/√2)``, silu/swish as ``x·σ(βx)``, mish, hard-silu,
     Keras' celu ``max(x, 0) + α·expm1(min(x, 0)/α)`` with ``α > 0`` and squareplus
     ``(x + √(x² + b))/2`` with ``b ≥ 0``) are recognised by the exact structure of the
     elementwise sub-graph (ops and constants, or the parameter read where it must be),
     never by its values; other products of elementwise functions raise
     :class:`UnsupportedOpError`;
     on their own, ``Erf`` and ``Erfc`` get ``2/√π``, and ops whose slope is unbounded
     (``Exp``, ``Log``, ``Sqrt``, ``Square``, ``Reciprocal``, ``Pow`` with an exponent other
     than 0 or 1...) raise :class:`~tf_lipschitz.errors.NotLipschitzError` with the reason;
   - Euclidean norms ``√(Σ_j a_j² + c)`` and ``√max(Σ_j a_j², c)`` (``Square`` or ``x·x``,
     sums without broadcasting, ``Sum`` over axes, a constant ``c ≥ 0``: ``tf.norm``, the
     magnitude of an STFT from its real and imaginary parts, ``|tf.complex(re, im)|``; the
     fused ``EuclideanNorm`` of ``tf.math.reduce_euclidean_norm`` over constant axes) are
     1-Lipschitz in the stacked terms ``(a_1, …, a_k)``; terms that are linear maps of one
     tensor ``s`` are stacked into one linear operator of ``s`` whose norm is measured (the
     STFT's ``‖[A_re; A_im]‖``, as for the Keras layer), others combine as ``√(Σ L_j²)``
     (:meth:`_GraphReader._euclidean_norm`);
   - ``MaxPool`` gets the overlap constant :func:`~tf_lipschitz.rules.pooling.max_pool_constant`;
   - image resampling (``ResizeBilinear``, ``ResizeBicubic``, ``ResizeNearestNeighbor``,
     ``ResizeArea``, ``ScaleAndTranslate``) with constant sizes is ``R_h ⊗ R_w ⊗ I``, its
     per-axis matrices read off the op as the Keras ``Resizing`` rule reads them, with the
     exact norm ``‖R_h‖‖R_w‖`` and a certificate (:func:`_resampling`);
   - ops of two input-dependent tensors: sums (``AddV2``, ``Sub``, ``AddN``) add their parents'
     constants, concatenation and ``Maximum``/``Minimum`` take ``√(Σ L²)``; an operand that an
     elementwise op broadcasts (``x + reduce_sum(x, -1, keepdims=True)``) is copied, and its
     constant is multiplied by ``√copies`` first; products (``Mul``, ``MatMul``,
     ``BatchMatMul``, ``Einsum``...) raise :class:`~tf_lipschitz.errors.NotLipschitzError`;
   - any other op raises :class:`UnsupportedOpError` naming the op type and the node.

The graph is turned into the same :class:`~tf_lipschitz.graph.ModelGraph` the Keras walk produces
and handed to the core :class:`~tf_lipschitz.autolip.AutoLip`, so fusion, the compiled solver
and the report are shared with :class:`~tf_lipschitz.LipschitzEstimator`: on a model exported
from Keras, the graph bound equals the Keras-level bound.

Every op is analysed at batch size 1, as a function of one example, which is the function on
batches only when the outputs of each example depend on that example alone. A graph whose input
has a free batch axis is therefore also run on a batch of two examples with dependence witnesses
that no input value can cancel (structural, not numerical); one that reduces, transposes, rolls,
slices or otherwise mixes across the batch axis (``x - tf.reduce_mean(x, axis=0)``) raises
:class:`BatchMixingError` naming the op. Inputs with a fixed leading dimension have no batch
axis: the whole tensor is one example.

Example:
    >>> import tensorflow as tf, tf_lipschitz as tfl
    >>> w = tf.constant([[3.0, 0.0], [0.0, 1.0]])
    >>> f = tf.function(lambda x: tf.nn.relu(tf.matmul(x, w)))
    >>> rep = tfl.autolip_function(f, tf.TensorSpec([None, 2], tf.float32))
    >>> round(rep.upper, 4)
    3.0
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import os
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.python.eager import execute
from tensorflow.python.framework import function_def_to_graph, op_def_library, op_def_registry
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.framework import convert_to_constants

from tf_lipschitz import certify
from tf_lipschitz.autolip import AutoLip, check_solver_arguments
from tf_lipschitz.errors import (InvalidArgumentError, LipschitzError, LowerBoundError,
                                 ModelNotBuiltError, NotLipschitzError, first_line)
from tf_lipschitz.graph import GraphNode, ModelGraph
from tf_lipschitz.lower import lower_bound as _lower_bound
from tf_lipschitz.power import check_keywords, keyword_names
from tf_lipschitz.progress import progress_bar
from tf_lipschitz.report import LipschitzReport, LowerBound
from tf_lipschitz.rules.activations import activation_info
from tf_lipschitz.rules.base import (Activation, Constant, LayerBound, Linear, Merge,
                                     broadcast_factor, certified_max, check_constant,
                                     register_rule)
from tf_lipschitz.rules.pooling import max_pool_constant
from tf_lipschitz.rules.resampling import axis_matrix, separable_mismatch

__all__ = [
    "BatchMixingError",
    "GraphEstimator",
    "OpContext",
    "SavedModelNotFoundError",
    "SavedModelReadError",
    "SignatureNotFoundError",
    "UnsupportedOpError",
    "autolip_function",
    "autolip_saved_model",
    "elementwise_rule",
    "linear_rule",
    "register_op_rule",
    "supported_ops",
]


class UnsupportedOpError(LipschitzError, TypeError):
    """A TensorFlow op in the analysed graph has no Lipschitz rule.

    Attributes:
        op_type: The op type, e.g. ``"Asinh"``.
        node: The node name in the frozen graph.

    Example:
        >>> import tf_lipschitz as tfl
        >>> rule = tfl.tfgraph.elementwise_rule(1.0)
        >>> tfl.tfgraph.register_op_rule("MyActivation", rule)  # doctest: +SKIP
    """

    def __init__(self, op_type: str, node: str, detail: str = ""):
        message = f"No Lipschitz rule for TensorFlow op '{op_type}' (node '{node}')."
        if detail:
            message += f" {detail}"
        else:
            message += (
                f" Register a rule with `tfl.tfgraph.register_op_rule('{op_type}', rule)`: "
                "`tfl.tfgraph.elementwise_rule(c)` for an elementwise c-Lipschitz op, "
                "`tfl.tfgraph.linear_rule()` for an op linear in its input. For a model built with "
                "Keras, analysing its .keras file instead of the SavedModel may avoid the op."
            )
        super().__init__(message)
        self.op_type = op_type
        self.node = node


class BatchMixingError(LipschitzError, ValueError):
    """The outputs of the function for one example of a batch depend on other examples.

    The graph is analysed one example at a time (batch size 1), so a function that reduces,
    transposes, rolls or slices across its batch axis would be bounded as a different function.
    Also a ``ValueError``.

    Attributes:
        op_type: The op type where examples first interact, e.g. ``"Mean"``.
        node: The node name in the frozen graph.

    Example:
        >>> import tensorflow as tf, tf_lipschitz as tfl
        >>> centred = lambda x: x - tf.reduce_mean(x, axis=0)  # centred over the batch
        >>> try:
        ...     tfl.autolip_function(centred, tf.TensorSpec([None, 3]))
        ... except tfl.tfgraph.BatchMixingError as err:
        ...     print(err.op_type)
        Mean
    """

    def __init__(self, function: str, op_type: str, node: str, detail: str):
        super().__init__(
            f"'{function}' mixes the examples of a batch: op '{op_type}' (node '{node}') "
            f"{detail}. The graph is analysed one example at a time (batch size 1), which "
            "bounds a different function when examples interact. Write the function per "
            "example, keeping the batch axis apart (reduce, transpose, roll, slice and multiply "
            "over the other axes only, or map a per-example function with tf.vectorized_map), "
            "or give the input a fixed batch size in its signature (tf.TensorSpec([B, ...])) "
            "to bound the map of whole batches of B examples."
        )
        self.op_type = op_type
        self.node = node


class SavedModelNotFoundError(InvalidArgumentError, FileNotFoundError):
    """``path`` is not a SavedModel directory (no ``saved_model.pb``).

    Also a ``FileNotFoundError``, the builtin raised before tf_lipschitz had its own class.
    """


class SavedModelReadError(LipschitzError, OSError):
    """A SavedModel directory exists but TensorFlow cannot load it (also an ``OSError``)."""


class SignatureNotFoundError(InvalidArgumentError, KeyError):
    """The SavedModel has no signature of that name, or several and none was chosen.

    Also a ``KeyError``, the builtin raised before tf_lipschitz had its own class.
    """

    __str__ = Exception.__str__  # the message, not KeyError's quoted repr of it


# ---------------------------------------------------------------------------------------------
# Op categories
# ---------------------------------------------------------------------------------------------

# Ops whose outputs are their inputs (output k is input k): skipped, their consumers read the
# producer directly.
_ALIASES = frozenset({
    "Identity", "IdentityN", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics",
    "EnsureShape", "PlaceholderWithDefault", "DebugIdentity", "DebugIdentityV2",
    "DebugIdentityV3",
})
# Ops whose value depends only on the shape (or nothing) of their input.
_SHAPE_ONLY = frozenset({"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike",
                         "BroadcastArgs", "BroadcastGradientArgs"})
_IGNORED = frozenset({"NoOp", "Assert", "Print", "PrintV2"})
_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_HALF_DTYPES = (tf.float16, tf.bfloat16)


def _tensor_name(ref: str) -> str:
    """Normalises an input reference ``"node"`` / ``"node:1"`` to ``"node:k"``."""
    return ref if ":" in ref else f"{ref}:0"


def _split(ref: str) -> tuple[str, int]:
    node, _, index = _tensor_name(ref).rpartition(":")
    return node, int(index)


def _data_inputs(node_def) -> list[str]:
    return [_tensor_name(i) for i in node_def.input if not i.startswith("^")]


def _ancestors(nodes: dict, names, control: bool = False) -> set[str]:
    """The names of ``names`` and of the nodes they read, through data inputs (and control
    inputs if ``control``); ``nodes`` maps names to ``NodeDef`` s."""
    found: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in found or name not in nodes:
            continue
        found.add(name)
        refs = ([r.lstrip("^") for r in nodes[name].input] if control
                else _data_inputs(nodes[name]))
        stack.extend(_split(r)[0] for r in refs)
    return found


def _graph_def_with(graph_def, nodes):
    """A ``GraphDef`` with the versions and function library of ``graph_def`` and ``nodes``."""
    result = type(graph_def)()
    result.versions.CopyFrom(graph_def.versions)
    result.library.CopyFrom(graph_def.library)
    result.node.extend(nodes)
    return result


_CALLS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})


def _inline_calls(graph_def, max_depth: int = 16):
    """``graph_def`` with the function calls that freezing left in place replaced by the bodies
    of their functions.

    Freezing inlines ordinary calls but keeps those marked ``_noinline`` or
    ``_XlaMustCompile``: Keras 3 compiles a grouped ``Conv2D`` (``groups > 1``) to such a call,
    whose body is a plain ``Conv2D``. Each call ``c`` becomes its body's nodes, named
    ``c/<node>``, fed by ``Identity`` nodes ``c/<argument>`` of the call's inputs, and ``c``
    itself an ``IdentityN`` of the returned tensors, so that consumers of ``c:k`` read output
    ``k`` unchanged. Nested calls are inlined in turn, up to ``max_depth`` levels; control flow
    (``While``, ``If``) is left as it is.

    Raises:
        UnsupportedOpError: Calls are still left after ``max_depth`` levels (a function that
            calls itself, directly or not).
    """
    library = {f.signature.name: f for f in graph_def.library.function}
    if not library:
        return graph_def
    # the bodies are read in a graph that holds the library (a body calling a function needs it)
    scope = tf.Graph()
    with scope.as_default():
        holder = type(graph_def)()
        holder.library.CopyFrom(graph_def.library)
        tf.graph_util.import_graph_def(holder, name="")
        return _inline_levels(graph_def, library, max_depth)


def _inline_levels(graph_def, library: dict, max_depth: int):
    """The loop of :func:`_inline_calls`: one level of calls at a time."""
    for level in range(max_depth + 1):
        calls = [n for n in graph_def.node
                 if n.op in _CALLS and n.attr["f"].func.name in library]
        if not calls:
            break
        if level == max_depth:
            raise UnsupportedOpError(
                calls[0].op, calls[0].name, f"Its function "
                f"'{calls[0].attr['f'].func.name}' still calls functions after "
                f"{max_depth} nested level(s) of calls were inlined (a recursive function?). "
                "Analyse a function without recursion, or its layers from the .keras file.")
        nodes = []
        for node in graph_def.node:
            if node.op in _CALLS and node.attr["f"].func.name in library:
                nodes.extend(_call_body(node, library[node.attr["f"].func.name]))
            else:
                nodes.append(node)
        graph_def = _graph_def_with(graph_def, nodes)
    return graph_def


def _call_body(call, fdef) -> list:
    """The ``NodeDef`` s that replace ``call`` (see :func:`_inline_calls`)."""
    body, flat = function_def_to_graph.function_def_to_graph_def(fdef)
    prefix = call.name + "/"
    args = [a.name for a in fdef.signature.input_arg]
    data = [i for i in call.input if not i.startswith("^")]
    control = [i for i in call.input if i.startswith("^")]
    nodes = []
    for node in body.node:
        new = tf.compat.v1.NodeDef()
        if node.name in args and node.op == "Placeholder":
            new.name, new.op = prefix + node.name, "Identity"
            new.input.extend([data[args.index(node.name)], *control])
            new.attr["T"].type = node.attr["dtype"].type
        else:
            new.CopyFrom(node)
            new.name = prefix + node.name
            del new.input[:]
            new.input.extend(("^" + prefix + i[1:]) if i.startswith("^") else prefix + i
                             for i in node.input)
        nodes.append(new)
    returns = []
    for arg in fdef.signature.output_arg:
        ref = fdef.ret[arg.name]
        returns.append(prefix + flat.get(ref, ref))
    out = tf.compat.v1.NodeDef(name=call.name, op="IdentityN", input=returns)
    out.attr["T"].list.type.extend(call.attr["Tout"].list.type)
    nodes.append(out)
    return nodes


# ---------------------------------------------------------------------------------------------
# Re-executing ops from their NodeDefs
# ---------------------------------------------------------------------------------------------


def _attr_value(value) -> Any:
    """The raw value of an ``AttrValue`` (enums, protos and bytes, as op construction takes)."""
    kind = value.WhichOneof("value")
    if kind == "list":
        for field in ("type", "shape", "s", "i", "f", "b", "tensor", "func"):
            items = list(getattr(value.list, field))
            if items:
                return items
        return []
    return getattr(value, kind) if kind else None


def _dilated_explicit(node_def) -> bool:
    """A ``Conv2D`` or ``DepthwiseConv2dNative`` with explicit paddings and a dilation: the
    CPU has no gradient kernel for that form ("Current CPU implementations do not yet support
    dilation rates larger than 1" in ``Conv2DBackpropInput``)."""
    return (node_def.op in ("Conv2D", "DepthwiseConv2dNative")
            and node_def.attr["padding"].s == b"EXPLICIT"
            and any(d > 1 for d in node_def.attr["dilations"].list.i))


def _padded_dilated_conv(node_def, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
    """The op of :func:`_dilated_explicit` as the same padding (``tf.pad``) followed by the
    ``VALID`` dilated convolution of ``tf.nn``, which has gradients on every device (it
    moves the dilation into ``SpaceToBatchND`` blocks)."""
    x, kernel = inputs
    pairs = np.reshape(list(node_def.attr["explicit_paddings"].list.i), (-1, 2)).tolist()
    data_format = node_def.attr["data_format"].s.decode() or "NHWC"
    spatial = slice(1, 3) if data_format == "NHWC" else slice(2, 4)
    strides = list(node_def.attr["strides"].list.i)
    dilations = list(node_def.attr["dilations"].list.i)[spatial]
    x = tf.pad(x, pairs)
    if node_def.op == "DepthwiseConv2dNative":
        return tf.nn.depthwise_conv2d(x, kernel, strides, "VALID", data_format=data_format,
                                      dilations=dilations)
    return tf.nn.convolution(x, kernel, strides[spatial], "VALID", data_format=data_format,
                             dilations=dilations)


def _run_node(node_def, inputs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Creates the op of ``node_def`` on ``inputs`` in the current graph; returns its outputs.

    The op is built from its ``OpDef`` and the node's attributes exactly as the generated
    ``tf.raw_ops`` wrappers build it, including the gradient record, so ``tf.GradientTape`` and
    ``tf.autodiff.ForwardAccumulator`` differentiate through it (to any order). Graph mode only:
    see :func:`_eager_safe`.
    """
    op_type = node_def.op
    if op_type == "Const":
        return [tf.constant(tf.make_ndarray(node_def.attr["value"].tensor))]
    if _dilated_explicit(node_def):
        return [_padded_dilated_conv(node_def, inputs)]
    if op_type in _ALIASES:
        return [tf.identity(t) for t in (inputs if op_type == "IdentityN" else inputs[:1])]
    op_def = op_def_registry.get(op_type)
    if op_def is None:
        raise UnsupportedOpError(op_type, node_def.name, "The op is not registered in this "
                                 "TensorFlow build (a custom op whose library is not loaded).")
    if any(arg.type == types_pb2.DT_RESOURCE for arg in op_def.input_arg):
        raise UnsupportedOpError(
            op_type, node_def.name, "It takes a resource (a variable or a random generator's "
            "state), which freezing turned into a constant. Use stateless ops in the analysed "
            "function (tf.random.stateless_normal with a seed instead of a tf.random.Generator), "
            "or analyse the .keras model.")
    kwargs: dict[str, Any] = {}
    inferred: set[str] = set()
    pos = 0
    for arg in op_def.input_arg:
        if arg.number_attr:
            count = node_def.attr[arg.number_attr].i
            kwargs[arg.name] = list(inputs[pos:pos + count])
            inferred |= {arg.number_attr, arg.type_attr}
        elif arg.type_list_attr:
            count = len(node_def.attr[arg.type_list_attr].list.type)
            kwargs[arg.name] = list(inputs[pos:pos + count])
            inferred.add(arg.type_list_attr)
        else:
            count = 1
            kwargs[arg.name] = inputs[pos]
            inferred.add(arg.type_attr)
        pos += count
    for attr in op_def.attr:
        if attr.name in inferred:
            continue
        if attr.name not in node_def.attr:
            # a GraphDef leaves out attributes at their default (GatherV2's batch_dims), which
            # the op builder needs (the generated wrappers fill them in)
            if attr.HasField("default_value") and attr.type not in ("type", "list(type)"):
                kwargs[attr.name] = _attr_value(attr.default_value)
            continue
        if attr.type in ("func", "list(func)"):
            raise UnsupportedOpError(
                op_type, node_def.name, "Ops that call functions (control flow such as "
                "While or If, calls of functions missing from the graph's library) are not "
                "supported. For a Keras model, analyse its .keras file instead "
                "(`tf-lipschitz analyze model.keras`), whose layers all have rules.")
        kwargs[attr.name] = _attr_value(node_def.attr[attr.name])
    _, _, op, outputs = op_def_library._apply_op_helper(op_type, **kwargs)  # noqa: SLF001
    if execute.must_record_gradient():
        attrs: list[Any] = []
        for attr in op.op_def.attr:
            value = (op._get_attr_type(attr.name) if attr.type == "type"  # noqa: SLF001
                     else op.get_attr(attr.name))
            attrs += [attr.name, value]
        execute.record_gradient(op_type, op.inputs, tuple(attrs), outputs)
    return list(outputs)


class _OwnRetracingFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning about this module's
    per-op functions (:func:`_batched`). TensorFlow counts traces per code object, so the
    compiled functions of all the ops of a graph count as one that retraces at every op: an
    expected cost (each op is traced for its own shapes and for float64 certificates), not
    the user's mistake the warning describes. Warnings about other functions pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("retracing" in message and "_batched.<locals>" in message)


logging.getLogger("tensorflow").addFilter(_OwnRetracingFilter())


def _eager_safe(fn: Callable) -> Callable:
    """Runs ``fn`` inline when tracing, and through a compiled ``tf.function`` when eager."""
    compiled = tf.function(fn, autograph=False, reduce_retracing=True)

    def call(*args):
        return compiled(*args) if tf.executing_eagerly() else fn(*args)

    return call


def _once(fn: Callable, specs: Sequence[tf.TensorSpec]) -> Callable:
    """Builds ``fn`` once as a graph function for fixed input specs (no retracing)."""
    return tf.compat.v1.wrap_function(fn, list(specs))


def _replay(nodes: Sequence[Any], feeds: dict[str, tf.Tensor], resolve: Callable[[str], str],
            visit: Callable[[Any, list[tf.Tensor], list[tf.Tensor]], None] | None = None
            ) -> dict[str, tf.Tensor]:
    """Re-executes ``nodes`` (topological order); ``feeds`` gives tensors by ``"node:k"``.

    ``visit(node_def, inputs, outputs)``, if given, is called after each op is created.
    """
    values = dict(feeds)
    for node in nodes:
        if node.op in _IGNORED or f"{node.name}:0" in feeds:
            continue
        inputs = [values[resolve(r)] if resolve(r) in values else values[r]
                  for r in _data_inputs(node)]
        outputs = _run_node(node, inputs)
        for k, out in enumerate(outputs):
            values[f"{node.name}:{k}"] = out
        if visit is not None:
            visit(node, inputs, outputs)
    return values


def _example_shape(full: tuple[int, ...]) -> tuple[int, ...]:
    """Per-example shape of a tensor evaluated at batch 1 (the leading 1 removed)."""
    return tuple(full[1:]) if full and full[0] == 1 else tuple(full)


def _batched(single: Callable, in_full: tuple[int, ...], out_full: tuple[int, ...],
             compute_dtype: tf.DType, out_dtype: tf.DType, rowwise: bool = False) -> Callable:
    """Lifts a batch-1 op function to batches ``(B, *example_shape)``.

    The graph is evaluated at batch 1 (shape arithmetic is frozen for that size), so a batch of
    one is passed straight through and larger batches are mapped example by example, unless
    ``rowwise``: the op treats the rows of its batch axis apart and none of its constants
    encodes the batch size (:func:`_rowwise`), and a batch runs as one call (the dense
    certificate of VGG16's ``predictions`` MatMul took 4.3 s example by example). An input
    wider than the graph's dtype is computed in its own dtype where the op supports it, the
    op's constants widened exactly: float64 for the exact dense certificates of
    :mod:`tf_lipschitz.certify`, float32 for the power iteration of a half-precision graph
    (whose products rounded to float16 put the estimate up to ~1e-3 below the norm of its
    weights); otherwise in the graph's own dtype.
    """
    out_example = _example_shape(out_full)

    def one(x):
        x = tf.reshape(x, (-1, *in_full[1:]) if rowwise else in_full)
        if x.dtype.size > compute_dtype.size:
            try:
                y = single(x)
            except (TypeError, ValueError):  # the op has no kernel for x's dtype: graph dtype
                y = None
            if y is not None and y.dtype == x.dtype:
                return tf.reshape(y, (-1, *out_example))
        y = single(tf.cast(x, compute_dtype))
        return tf.cast(tf.reshape(y, (-1, *out_example)), out_dtype)

    def fn(x):
        if rowwise or (x.shape.rank is not None and x.shape[0] == 1):
            return one(x)
        dtype = one(x[:1]).dtype
        return tf.map_fn(lambda e: one(e[None])[0], x,
                         fn_output_signature=tf.TensorSpec(out_example, dtype))

    return _eager_safe(fn)


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpContext:
    """What a graph-op rule knows about one input-dependent op.

    Attributes:
        node_def: The op's ``NodeDef`` in the frozen graph.
        name: Display name of the node.
        inputs: Data inputs, as ``"node:k"`` tensor names.
        dependent: For each data input, whether it depends on the model input.
        constants: For each data input that does not depend on the model input, its value
            (evaluated once, at batch size 1); ``None`` for dependent inputs.
        input_shapes: Full shapes (batch axis included, batch size 1) of the data inputs.
        output_shape: Full shape of output 0.
        dtype: Dtype of the first dependent input.
        elementwise_of: For a product of two elementwise functions of one tensor that is not a
            recognised activation, the name of that tensor.
        feeds: For an op whose slope is unbounded (``Exp``, ``Square``...), the ``(name, op
            type)`` of the elementwise ops that read its output: it is then part of a larger
            elementwise function, which may be Lipschitz as a whole.
        offsets: Set by :meth:`linear`: the constant slots it set to zero (``None`` until then).
        block_move: Set by the ``SpaceToBatchND`` / ``BatchToSpaceND`` rule when the blocks
            leave the last axis alone: the block shape and the paddings (or crops),
            ``((b, …), ((left, right), …))``; by the ``Pad`` rule for a padding of the spatial
            axes only (blocks of 1). Such an op moves entries between positions (and the batch
            axis) but leaves each in its channel: channel scalings commute with it, and
            certificates fold them across it.
    """

    node_def: Any
    name: str
    inputs: tuple[str, ...]
    dependent: tuple[bool, ...]
    constants: tuple[np.ndarray | None, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    dtype: tf.DType
    elementwise_of: str | None = None
    offsets: tuple[int, ...] | None = None
    block_move: tuple | None = None
    feeds: tuple[tuple[str, str], ...] = ()

    @property
    def op_type(self) -> str:
        return self.node_def.op

    @property
    def dependent_slots(self) -> list[int]:
        return [i for i, d in enumerate(self.dependent) if d]

    def attr(self, key: str, default: Any = None) -> Any:
        """The Python value of a node attribute (ints, floats, strings, lists)."""
        if key not in self.node_def.attr:
            return default
        value = self.node_def.attr[key]
        kind = value.WhichOneof("value")
        if kind == "list":
            lst = value.list
            for field in ("i", "f", "s", "b"):
                items = list(getattr(lst, field))
                if items:
                    return [x.decode() if isinstance(x, bytes) else x for x in items]
            return []
        result = getattr(value, kind) if kind else default
        return result.decode() if isinstance(result, bytes) else result

    def single_dependent(self) -> int:
        """The slot of the only input-dependent operand; raises if there are several."""
        slots = self.dependent_slots
        if len(slots) != 1:
            raise NotLipschitzError(
                _culprit(self), f"{self.op_type} of {len(slots)} tensors that all depend on the "
                "input is a product (bilinear), which grows without bound. Bound the input "
                "domain, or move the product out of the analysed function."
            )
        return slots[0]

    def linear(self, *, offsets: Sequence[int] = (), norm: float | None = None,
               note: str = "", diagonal: bool = False) -> Linear:
        """A :class:`~tf_lipschitz.rules.Linear` bound re-executing this op on its own.

        Args:
            offsets: Constant input slots that are *added* to the result (biases, offsets,
                batch-norm means, padding values): they are set to zero, which leaves the linear
                part of the affine op.
            norm: Exact operator norm when known in closed form (also used as certificate).
            note: Shown in the report.
            diagonal: The linear part scales each entry on its own (same input and output
                shape): see :attr:`tf_lipschitz.rules.Linear.diagonal`.
        """
        slot = self.single_dependent()
        self.offsets = tuple(offsets)
        if not _has_gradient(self.op_type):
            raise UnsupportedOpError(
                self.op_type, self.name, "TensorFlow registers no gradient for it, and the "
                "spectral solver differentiates every linear op. Use an op with a gradient "
                "(tf.image.resize with method='bilinear' instead of 'area'), or register a rule "
                "with a closed-form norm: `tfl.tfgraph.register_op_rule(op_type, "
                "tfl.tfgraph.linear_rule(norm=...))`.")
        node_def = self.node_def
        compute = self.dtype
        values = [None if i == slot else np.zeros_like(value) if i in offsets else value
                  for i, value in enumerate(self.constants)]
        constants = [None if v is None else tf.constant(v) for v in values]

        def single(x):
            if x.dtype == compute:
                consts = constants
            else:  # float64 evaluation (exact certificates): the float constants follow x
                same = np.dtype(compute.as_numpy_dtype)
                consts = [None if v is None else tf.constant(
                    v.astype(x.dtype.as_numpy_dtype) if v.dtype == same else v) for v in values]
            inputs = [x if i == slot else c for i, c in enumerate(consts)]
            return _run_node(node_def, inputs)[0]

        fn = _batched(single, self.input_shapes[slot], self.output_shape, compute,
                      _work_dtype(compute), rowwise=_rowwise(self, slot))
        if norm is None:
            return Linear(fn, note=note or f"{self.op_type} (linear)", diagonal=diagonal)
        value = float(norm)
        return Linear(fn, norm=lambda: value, certificate=lambda: value,
                      note=note or f"{self.op_type}: norm {value:.4g}", diagonal=diagonal)


# Ops that treat the rows of their first operand's batch axis apart: with a constant kernel,
# and elementwise (their constants must broadcast along the batch axis).
_ROWWISE_KERNEL_OPS = frozenset({"MatMul", "Conv2D", "Conv3D", "DepthwiseConv2dNative"})
_ROWWISE_ELEMENTWISE_OPS = frozenset({
    "BiasAdd", "Mul", "AddV2", "Add", "Sub", "RealDiv", "Div", "Neg", "AvgPool", "AvgPool3D",
})


def _rowwise(ctx: "OpContext", slot: int) -> bool:
    """Whether the op can run on a batch of examples at once (see :func:`_batched`): linear in
    its first operand, at batch 1 in and out, with a constant kernel (``MatMul`` not
    transposing that operand, convolutions), or elementwise with constants that broadcast along
    the batch axis (lower rank, or a leading 1)."""
    if slot != 0 or ctx.attr("transpose_a", False):
        return False
    full_in, full_out = ctx.input_shapes[0], ctx.output_shape
    if not full_in or not full_out or full_in[0] != 1 or full_out[0] != 1 \
            or len(full_in) != len(full_out):
        return False
    if ctx.op_type in _ROWWISE_KERNEL_OPS:
        return True
    return ctx.op_type in _ROWWISE_ELEMENTWISE_OPS and all(
        c is None or np.ndim(c) < len(full_out) or np.shape(c)[0] == 1
        for c in ctx.constants[1:])


def _has_gradient(op_type: str) -> bool:
    """Whether TensorFlow can differentiate ``op_type`` (``ResizeArea`` has no gradient)."""
    try:
        return tf_ops._gradient_registry.lookup(op_type) is not None  # noqa: SLF001
    except LookupError:
        return False


def _culprit(ctx: "OpContext"):
    """An object naming the op (node name, op type) for the core error classes."""
    return _op_class(ctx.op_type)(ctx.name, None)


def _work_dtype(dtype: tf.DType) -> tf.DType:
    """Dtype of the power iteration: half-precision graphs are measured in float32."""
    return tf.float32 if dtype in _HALF_DTYPES else dtype


OpRule = Callable[[OpContext], LayerBound]
_OP_RULES: dict[str, OpRule] = {}


def register_op_rule(op_type: str, rule: OpRule) -> OpRule:
    """Registers the Lipschitz rule of a TensorFlow op type for graph analysis.

    Args:
        op_type: The op type as it appears in a ``GraphDef`` (``"Asinh"``, ``"MyActivation"``).
        rule: ``rule(ctx: OpContext) -> Linear | Constant | Merge``. The helpers
            :func:`elementwise_rule` and :func:`linear_rule` build the common ones.

    Returns:
        The rule.

    Example:
        >>> import tf_lipschitz as tfl
        >>> _ = tfl.tfgraph.register_op_rule("MyActivation", tfl.tfgraph.elementwise_rule(1.0))
    """
    if not isinstance(op_type, str) or not op_type:
        raise InvalidArgumentError(
            f"op_type must be a non-empty string, the op type as in a GraphDef (\"Sin\"); "
            f"received op_type={op_type!r}.")
    if not callable(rule):
        raise InvalidArgumentError(
            f"rule must be a callable rule(ctx: OpContext) -> Linear | Constant | Merge (see "
            f"elementwise_rule and linear_rule); received rule={rule!r}.")
    _OP_RULES[op_type] = rule
    return rule


def supported_ops() -> list[str]:
    """Op types with a rule (aliases such as ``Identity`` and shape ops are always handled)."""
    return sorted(set(_OP_RULES) | _ALIASES | _SHAPE_ONLY)


def elementwise_rule(lipschitz: float, note: str = "") -> OpRule:
    """A rule for an elementwise op that is ``lipschitz``-Lipschitz in its single input.

    When the input-dependent operand is broadcast against a larger constant operand, each of
    its entries is used ``copies`` times and the constant is multiplied by ``√copies``. The rule
    is marked ``elementwise``: the check that examples of a batch stay apart relies on it.
    """
    lipschitz = check_constant(lipschitz, "lipschitz")

    def rule(ctx: OpContext) -> Constant:
        factor = max(1.0, _broadcast_factor(ctx, ctx.single_dependent()))
        return Constant(lipschitz * factor, note=note or f"{ctx.op_type} (registered)")

    rule.elementwise = True  # read by the check that examples stay apart (_witness)
    return rule


def linear_rule(offsets: Sequence[int] = (), norm: float | None = None) -> OpRule:
    """A rule for an op linear (affine through the ``offsets`` slots) in its one input."""

    def rule(ctx: OpContext) -> Linear:
        return ctx.linear(offsets=offsets, norm=norm)

    return rule


def _same_shape(ctx: OpContext, slot: int) -> bool:
    return tuple(ctx.input_shapes[slot]) == tuple(ctx.output_shape)


def _broadcast_factor(ctx: OpContext, slot: int) -> float:
    """Norm of the broadcast of input ``slot`` of an elementwise op to its output shape.

    Broadcasting copies each of the ``n`` input entries ``N / n`` times (``N`` output entries),
    so the copy map ``x ↦ broadcast(x)`` has norm ``√(N / n)`` exactly (1 without broadcast).
    """
    return broadcast_factor(ctx.input_shapes[slot], ctx.output_shape)


def _broadcast_merge(ctx: OpContext, merge: Merge) -> Merge:
    """``merge`` of the input-dependent operands of an elementwise op, broadcasting included.

    Each operand's constant is multiplied by its :func:`_broadcast_factor` before ``merge``
    combines them: ``x + reduce_sum(x, -1, keepdims=True)`` on 16 entries is ``I + 11ᵀ``, of
    norm ``1 + 4·4 = 17`` (not ``1 + 4``). Not for concatenations (no entry is copied).
    """
    return merge.with_input_factors([_broadcast_factor(ctx, slot) for slot in ctx.dependent_slots])


def _isometry(ctx: OpContext) -> Linear:
    """Reshape-like ops: a permutation of the entries (norm exactly 1)."""
    return ctx.linear(norm=1.0, note=f"{ctx.op_type}: isometry")


def _restriction(ctx: OpContext) -> Linear:
    """Slices: keeping a subset of the entries (norm 1, or 0 when nothing is kept)."""
    value = 1.0 if math.prod(ctx.output_shape) > 0 else 0.0
    return ctx.linear(norm=value, note=f"{ctx.op_type}: restriction")


def _block_move(ctx: OpContext) -> Linear:
    """``SpaceToBatchND`` (zero padding, then a permutation: norm 1) and ``BatchToSpaceND``
    (a permutation, then a crop: norm 1, or 0 when nothing is kept), as TensorFlow builds a
    dilated convolution: ``SpaceToBatchND → Conv2D → BatchToSpaceND``. Neither moves an entry
    out of its channel when the blocks leave the last axis alone."""
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its block shape, paddings or crops "
                                 "depend on the input.")
    blocks = tuple(int(b) for b in np.ravel(ctx.constants[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in np.reshape(ctx.constants[2], (-1, 2)))
    if 1 + len(blocks) < len(ctx.input_shapes[0]):  # the channels are not blocked
        ctx.block_move = (blocks, pads)
    kept = math.prod(ctx.output_shape) > 0
    note = "zero padding and permutation" if ctx.op_type == "SpaceToBatchND" else \
        "permutation and crop"
    return ctx.linear(norm=1.0 if kept else 0.0, note=f"{ctx.op_type}: {note}")


def _padding(ctx: OpContext) -> Linear:
    """Pad, PadV2: a zero padding (PadV2's constant value is an additive offset). One that pads
    the spatial axes only keeps the channels, and is recorded as a ``SpaceToBatchND`` of blocks
    1 (a causal Conv1D pads before its dilated convolution's blocks)."""
    offsets = (2,) if ctx.op_type == "PadV2" else ()
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Only the padded tensor may depend on "
                                 "the input.")
    pads = [(int(lo), int(hi)) for lo, hi in np.reshape(ctx.constants[1], (-1, 2))]
    if len(pads) >= 3 and pads[0] == (0, 0) and pads[-1] == (0, 0):
        ctx.block_move = ((1,) * (len(pads) - 2), tuple(pads[1:-1]))
    return ctx.linear(offsets=offsets, norm=1.0, note="zero padding: isometry")


def _bilinear(ctx: OpContext) -> Linear:
    """MatMul, convolutions, Einsum: linear in whichever single operand depends on the input."""
    slot = ctx.single_dependent()
    if ctx.op_type in ("Conv2DBackpropInput", "Conv3DBackpropInputV2",
                       "DepthwiseConv2dNativeBackpropInput") and slot == 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name,
                                 "Its output size argument depends on the input.")
    bound = ctx.linear(note=f"{ctx.op_type} (linear)")
    if ctx.op_type in _CONV_OPS:
        cert = _conv_certificate(ctx, bound.fn)
    else:
        cert = _matmul_certificate(ctx) if ctx.op_type == "MatMul" else None
    return bound if cert is None else dataclasses.replace(bound, certificate=cert)


def _matmul_certificate(ctx: OpContext) -> certify.LayerCertificate | None:
    """``σ_max`` of the constant matrix of ``x @ W`` (one example's row ``x``, as a Dense
    layer exports), as for the Dense layer (:func:`tf_lipschitz.certify.matrix_certificate`);
    ``None`` for other forms."""
    shape, kernel = ctx.input_shapes[0], ctx.constants[1]
    if ctx.dependent_slots != [0] or kernel is None or ctx.attr("transpose_a", False) \
            or len(shape) != 2 or shape[0] != 1:
        return None
    transposed = bool(ctx.attr("transpose_b", False))

    def read():  # float64 on demand: a copy held for every MatMul would double its memory
        w = np.asarray(kernel, np.float64)
        return w.T if transposed else w

    return certify.matrix_certificate(read, shape[1:], ctx.output_shape[1:])


# Convolution ops certified like the Keras layers: (kind, kernel slot, dependent slot).
_CONV_OPS = {
    "Conv2D": ("conv", 1, 0), "Conv3D": ("conv", 1, 0),
    "DepthwiseConv2dNative": ("depthwise", 1, 0),
    "Conv2DBackpropInput": ("transpose", 1, 2), "Conv3DBackpropInputV2": ("transpose", 1, 2),
}


def _conv_certificate(ctx: OpContext, fn: Callable) -> certify.LayerCertificate | None:
    """The polyphase-FFT certificate of a convolution op with a constant kernel (as for the
    Keras layers: :func:`tf_lipschitz.certify.conv_certificate`), or ``None`` when the op's
    form is not covered (explicit paddings wider than the kernel, an input-dependent kernel).

    The op's attributes give the geometry: ``strides`` and ``dilations`` per axis of the full
    shape, ``padding`` ``SAME``/``VALID``/``EXPLICIT`` (``explicit_paddings``), ``data_format``
    ``NHWC``/``NCHW`` (and the 3-D forms). A transposed convolution (``Conv*BackpropInput``)
    is the adjoint of the forward convolution with the same kernel.
    """
    kind, kernel_slot, slot = _CONV_OPS[ctx.op_type]
    kernel = ctx.constants[kernel_slot]
    full_in, full_out = ctx.input_shapes[slot], ctx.output_shape
    if ctx.dependent_slots != [slot] or kernel is None or full_in[0] != full_out[0]:
        return None
    # A batch of B > 1 (a dilated convolution's SpaceToBatchND blocks) is one operator here,
    # I_B ⊗ A: its norm is that of the convolution A on one image.
    rank = len(full_in) - 2
    channels_last = not str(ctx.attr("data_format", "NHWC")).startswith("NC")
    spatial = slice(1, rank + 1) if channels_last else slice(2, rank + 2)
    strides = tuple(ctx.attr("strides", [1] * (rank + 2))[spatial])
    dilation = tuple(ctx.attr("dilations", [1] * (rank + 2))[spatial])
    spatial_in, spatial_out = tuple(full_in[spatial]), tuple(full_out[spatial])
    padding = ctx.attr("padding", "VALID")
    extents = [d * (k - 1) + 1 for k, d in zip(kernel.shape[:rank], dilation)]
    if padding == "EXPLICIT":
        pairs = np.reshape(ctx.attr("explicit_paddings", []), (-1, 2))[spatial]
        if np.any(pairs > np.reshape(extents, (-1, 1)) - 1):
            return None  # the FFT grid covers paddings up to the kernel's extent - 1
        offset = tuple(int(p) for p in pairs[:, 0])
    else:  # (a transposed convolution's spec ignores it)
        offset = certify.left_padding(padding, spatial_in, spatial_out, strides, extents)
    if kind == "conv":  # TF: groups when the kernel reads fewer channels than the input has
        groups = full_in[-1 if channels_last else 1] // kernel.shape[-2]
    else:
        groups = 1
    per_example_in, per_example_out = _example_shape(full_in), _example_shape(full_out)

    def spec(in_scale, out_scale):  # the kernel in float64 on demand (no copy held)
        return certify.conv_spec(kind, np.asarray(kernel, np.float64), strides, dilation,
                                 spatial_in, spatial_out, offset, groups=groups,
                                 in_scale=in_scale, out_scale=out_scale)

    cert = certify.spec_certificate(spec, per_example_in, per_example_out, channels_last, fn,
                                    grid_out=spatial_out)
    if full_in[0] != 1 and not channels_last:
        # the operator's shape is (B, C, ...): its axis 0 is the batch, not the channels, so no
        # scaling folds into this certificate (a scale per image is not one per channel)
        cert = dataclasses.replace(cert, channel_axis=None)
    return cert


def _affine_sum(ctx: OpContext) -> LayerBound:
    """Add, AddV2, Sub, BiasAdd, AddN: a sum of dependent tensors, or x + constant."""
    slots = ctx.dependent_slots
    if len(slots) > 1:
        if ctx.op_type in ("BiasAdd", "BiasAddV1"):
            raise NotLipschitzError(_culprit(ctx), "a bias that depends on the input is a "
                                    "broadcast sum; not supported.")
        return _broadcast_merge(ctx, Merge.sum())
    slot = slots[0]
    offsets = tuple(i for i in range(len(ctx.inputs)) if i != slot)
    note = "affine: constant added" if ctx.op_type != "Sub" or slot == 0 else "constant − x"
    return ctx.linear(offsets=offsets, norm=_broadcast_factor(ctx, slot), note=note,
                      diagonal=_same_shape(ctx, slot))


def _neg(ctx: OpContext) -> Linear:
    return ctx.linear(norm=1.0, note="negation", diagonal=True)


def _scale(ctx: OpContext) -> LayerBound:
    """Mul and division by constants (elementwise scaling, possibly broadcasting)."""
    slots = ctx.dependent_slots
    if len(slots) > 1:
        return _product(ctx)
    slot = slots[0]
    other = ctx.constants[1 - slot]
    if ctx.op_type != "Mul" and slot != 0:
        raise NotLipschitzError(_culprit(ctx), "division by a tensor that depends on the input "
                                "has an unbounded derivative near zero.")
    norm = None
    if _same_shape(ctx, slot) and other is not None and other.size:
        factor = np.abs(other.astype("float64"))
        if ctx.op_type != "Mul":
            with np.errstate(divide="ignore"):
                factor = 1.0 / factor
        if np.all(np.isfinite(factor)):
            norm = float(np.max(factor))
    return ctx.linear(norm=norm, note=f"{ctx.op_type} by a constant",
                      diagonal=_same_shape(ctx, slot))


def _reduction_mean(ctx: OpContext) -> Linear:
    slot = ctx.single_dependent()
    if slot != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its axes depend on the input.")
    n_in, n_out = math.prod(ctx.input_shapes[0]), max(math.prod(ctx.output_shape), 1)
    count = n_in // n_out
    if ctx.op_type == "Mean":
        return ctx.linear(norm=1.0 / math.sqrt(count), note=f"mean over {count}: 1/√{count}")
    return ctx.linear(norm=math.sqrt(count), note=f"sum over {count}: √{count}")


def _batch_norm(ctx: OpContext) -> Linear:
    if ctx.attr("is_training", False):
        raise UnsupportedOpError(
            ctx.op_type, ctx.name,
            "It normalises with batch statistics (is_training=True), so examples are not "
            "independent. Export the model for inference (training=False).")
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Only x may depend on the input.")
    scale, variance = ctx.constants[1], ctx.constants[4]
    eps = float(ctx.attr("epsilon", 1e-3))
    norm = None
    if scale is not None and variance is not None and scale.size and variance.size:
        # The op multiplies by rsqrt(var + ε)·γ computed in its dtype, which can round a unit
        # above the exact value; ε is added in that dtype too. The bound covers both.
        dtype = str(variance.dtype)
        computed = tf.math.rsqrt(tf.constant(variance) + tf.constant(eps, dtype))
        gamma, var = np.abs(scale.astype("float64")), variance.astype("float64")
        norm = certified_max(None, lambda e: gamma / np.sqrt(var + e), eps, dtype,
                             [computed * tf.constant(scale, dtype)], operations=4)
    return ctx.linear(offsets=(2, 3), norm=norm, note="batch norm (inference)", diagonal=True)


def _concat(ctx: OpContext) -> LayerBound:
    if ctx.op_type == "ConcatV2":
        data = list(range(len(ctx.inputs) - 1))
    elif ctx.op_type == "Concat":
        data = list(range(1, len(ctx.inputs)))
    else:  # Pack
        data = list(range(len(ctx.inputs)))
    slots = ctx.dependent_slots
    if any(s not in data for s in slots):
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its axis depends on the input.")
    if len(slots) > 1:
        return Merge.l2("√(Σ L²) (disjoint coordinates)")
    offsets = tuple(i for i in data if i != slots[0])
    return ctx.linear(offsets=offsets, norm=1.0, note="embedding into a concatenation")


def _split_like(ctx: OpContext) -> Constant:
    ctx.single_dependent()
    return Constant(1.0, note=f"{ctx.op_type}: each output is a restriction")


def _max_merge(ctx: OpContext) -> LayerBound:
    """Maximum/Minimum: ``|Δ max(a, b)| ≤ max(|Δa|, |Δb|)`` per entry, after broadcasting.

    With a constant operand, the op is a 1-Lipschitz elementwise map of ``broadcast(x)``: the
    norm of the broadcast, as for a constant added (:func:`_affine_sum`).
    """
    slots = ctx.dependent_slots
    if len(slots) > 1:
        return _broadcast_merge(ctx, Merge.l2("√(Σ L²) (coordinatewise max/min)"))
    factor = _broadcast_factor(ctx, slots[0])
    note = f"{ctx.op_type} with a constant: 1-Lipschitz"
    if factor != 1.0:
        note += f", input broadcast ×√{factor * factor:g}"
    return Constant(factor, note=note)


def _select(ctx: OpContext) -> LayerBound:
    """Select, SelectV2 (``tf.where(c, a, b)``) with a constant condition ``c``: every output
    entry is an entry of ``a`` or of ``b`` (after broadcasting). With both branches depending
    on the input, ``‖Δy‖² = ‖MΔa‖² + ‖(I − M)Δb‖² ≤ ‖Δa‖² + ‖Δb‖²`` (``M`` the 0/1 diagonal of
    ``c``): ``√(L_a² + L_b²)``, as for a concatenation. With one, the op is linear in it: its
    entries masked by ``c``, norm 1 (0 when ``c`` keeps none of them) without broadcasting."""
    slots = ctx.dependent_slots
    if 0 in slots:
        raise UnsupportedOpError(
            ctx.op_type, ctx.name,
            "Its condition depends on the input: the output switches between the branches, "
            "which is continuous only where they agree, and a rule cannot see that. Write "
            "tf.where(x > 0, x, 0) as tf.nn.relu(x), or use a constant condition.")
    if len(slots) > 1:
        return _broadcast_merge(ctx, Merge.l2("√(Σ L²) (entries picked from either branch)"))
    slot = slots[0]
    mask = ctx.constants[0]
    norm = None
    if mask is not None and _same_shape(ctx, slot):
        kept = np.broadcast_to(np.asarray(mask, bool), ctx.output_shape)
        norm = 1.0 if (kept if slot == 1 else ~kept).any() else 0.0
    return ctx.linear(offsets=(3 - slot,), norm=norm, note="tf.where: masked entries",
                      diagonal=_same_shape(ctx, slot))


def _comparison(ctx: OpContext):
    raise UnsupportedOpError(
        ctx.op_type, ctx.name,
        "It compares values that depend on the input: its boolean output is a step function, "
        "and what uses it (a tf.where condition, a cast to numbers, a mask) switches or jumps "
        "where the comparison flips, which a rule cannot bound. Write tf.where(x > 0, x, 0) as "
        "tf.nn.relu(x) and tf.where(x > a, x, a) as tf.maximum(x, a), or use a constant mask.")


def _clip(ctx: OpContext) -> Constant:
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its bounds depend on the input.")
    return Constant(1.0, note="clipping: 1-Lipschitz")


def _reduce_max(ctx: OpContext) -> Constant:
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its axes depend on the input.")
    return Constant(1.0, note=f"{ctx.op_type} over disjoint sets: 1-Lipschitz")


def _average_pool(ctx: OpContext) -> Linear:
    """``AvgPool``, ``AvgPool3D``: ``I ⊗ A_1 ⊗ … ⊗ A_D`` with 1-D averaging matrices, exact
    norm ``Π_d ‖A_d‖₂`` as for the Keras layers (:func:`tf_lipschitz.certify.box_average_norm`;
    the op divides by the number of entries inside the input, which factors over the axes).
    A window or stride along the batch or channel axis is refused: TensorFlow's CPU kernel
    does not implement it (on a ``(1, 4, 4, 4)`` input with ``ksize=[1, 1, 1, 2]`` it returns
    an empty ``(1, 0, 0, 2)`` tensor)."""
    ctx.single_dependent()
    full = ctx.input_shapes[0]
    rank = len(full) - 2
    channels_last = not str(ctx.attr("data_format", "NHWC")).startswith("NC")
    spatial = list(range(1, rank + 1) if channels_last else range(2, rank + 2))
    ksize = [int(k) for k in ctx.attr("ksize", [])]
    strides = [int(s) for s in ctx.attr("strides", [])]
    others = [i for i in range(rank + 2) if i not in spatial]
    if len(ksize) != rank + 2 or len(strides) != rank + 2 or any(
            ksize[i] != 1 or strides[i] != 1 for i in others):
        raise UnsupportedOpError(
            ctx.op_type, ctx.name,
            f"It averages along the batch or channel axis (ksize={ksize}, strides={strides}), "
            "which TensorFlow's CPU kernel does not implement (it returns an empty tensor). "
            "Average over channels with a reshape and tf.reduce_mean, or a 1×1 convolution.")
    matrices = certify.box_average_matrices([full[i] for i in spatial],
                                            [ksize[i] for i in spatial],
                                            [strides[i] for i in spatial],
                                            str(ctx.attr("padding", "VALID")))
    value = certify.box_average_norm(matrices)
    bound = ctx.linear(note=f"average pooling ⊗_d A_d: {value:.4g}")
    op, out_example = bound.fn, _example_shape(ctx.output_shape)

    def fn(x):
        if x.dtype != tf.float64:
            return op(x)
        # CPU has no float64 kernel for AvgPool3D nor for channels-first pooling: the exact
        # float64 route of certify (a small chain such as Conv3D → AvgPool3D) applies the same
        # map as the Kronecker product of the A_d (on every image of a batch inside the op)
        y = certify.apply_box_average(tf.reshape(x, (-1, *full[1:])), matrices, channels_last)
        return tf.reshape(y, (-1, *out_example))

    return dataclasses.replace(bound, fn=fn, norm=lambda: value,
                               certificate=certify.box_average_certificate(matrices))


# Image resampling ops (NHWC, linear in their images) and the operands after the images.
_RESAMPLING_OPERANDS = {
    "ResizeBilinear": ("size",), "ResizeBicubic": ("size",),
    "ResizeNearestNeighbor": ("size",), "ResizeArea": ("size",),
    "ScaleAndTranslate": ("size", "scale", "translation"),
}


def _output_on(node_def, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Output 0 of the op of ``node_def`` on the arrays ``inputs``, as a float64 array."""
    specs = [tf.TensorSpec(np.shape(v), tf.as_dtype(np.asarray(v).dtype)) for v in inputs]
    out = _once(lambda *xs: _run_node(node_def, xs)[0], specs)(
        *[tf.constant(v) for v in inputs])
    return np.asarray(out, np.float64)


def _resampling(ctx: OpContext) -> Linear:
    """Image resampling with constant sizes (and scales, translations): ``R_h ⊗ R_w ⊗ I``.

    ``ResizeBilinear``, ``ResizeBicubic``, ``ResizeNearestNeighbor``, ``ResizeArea`` and
    ``ScaleAndTranslate`` (``tf.image.resize``'s ``lanczos3``, ``lanczos5``, ``gaussian``,
    ``mitchellcubic`` and antialiased methods) compute their weights per spatial axis, from
    the axis's input and output sizes (scale and translation) and the op's attributes
    (``align_corners``, ``half_pixel_centers``, ``kernel_type``, ``antialias``), and apply them
    to every image of the batch and every channel alike. Each ``R_d`` is read off the op
    itself in float64 (:func:`tf_lipschitz.rules.resampling.axis_matrix`: the op on the unit
    vectors of the axis, the other axis of size 1 kept, with scale 1 and translation 0), as
    the Keras ``Resizing`` rule reads it. The operator norm is ``‖R_h‖₂‖R_w‖₂`` exactly, and
    the certificate is that norm times ``1 + 1e-6``
    (:func:`tf_lipschitz.certify.box_average_certificate`).
    The bound's map applies the matrices as one einsum, in the dtype of its input (float64
    for exact certificates of fused chains; the ops return float32 even on float64 images),
    with gradients (``ResizeArea`` has none of its own).

    Before returning, the op is run on a random float64 input of its real shape and compared
    with ``(R_h ⊗ R_w ⊗ I) x``; a difference beyond float32 rounding raises
    :class:`UnsupportedOpError`, as does a size, scale or translation that depends on the
    input.
    """
    if any(ctx.dependent[1:]):  # not a product: the weights move with the input
        raise UnsupportedOpError(
            ctx.op_type, ctx.name, "Its size, scale or translation depends on the input: the "
            "rule reads the resampling weights for constant ones. Resize to a fixed size "
            "(tf.image.resize(x, (h, w)) with Python integers).")
    full_in, node_def = tuple(ctx.input_shapes[0]), ctx.node_def
    operands = [np.asarray(c) for c in ctx.constants[1:]]
    if len(full_in) != 4 or len(operands) != len(_RESAMPLING_OPERANDS[ctx.op_type]) or any(
            c.shape != (2,) for c in operands):
        raise UnsupportedOpError(ctx.op_type, ctx.name, f"The rule reads images of rank 4 "
                                 f"(NHWC) with 2-vector operands; received images of shape "
                                 f"{full_in} and operands of shapes "
                                 f"{[c.shape for c in operands]}.")

    def one_axis(d):  # the op along axis d; the other: size 1 → 1, scale 1, translation 0
        kept = [(np.zeros if name == "translation" else np.ones)(2, c.dtype)
                for name, c in zip(_RESAMPLING_OPERANDS[ctx.op_type], operands)]
        for c, k in zip(operands, kept):
            k[d] = c[d]
        return lambda basis: _output_on(node_def, [basis.numpy(), *kept])

    matrices = [axis_matrix(one_axis(d), full_in[1 + d], d) for d in (0, 1)]
    x = np.random.default_rng(0).standard_normal(full_in)
    try:
        got = _output_on(node_def, [x, *operands])
    except Exception as err:  # noqa: BLE001 - reported as the reason for the refusal
        got = err
    reason = separable_mismatch(got, x, matrices)
    attrs = ", ".join(f"{k}={ctx.attr(k)}" for k in ("align_corners", "half_pixel_centers",
                                                       "kernel_type", "antialias")
                      if k in node_def.attr)
    spatial = (tuple(full_in[1:3]), tuple(m.shape[0] for m in matrices))
    description = f"{ctx.op_type} {spatial[0]} → {spatial[1]}" + (f" ({attrs})" if attrs else "")
    if reason is not None:
        raise UnsupportedOpError(
            ctx.op_type, ctx.name, f"The rule models it as {description}, a separable linear "
            f"map R_h ⊗ R_w ⊗ I with each R_d read off the op, but {reason}: this TensorFlow "
            "version does not resample per axis as expected, and no bound is given rather "
            "than a wrong one. Register a measured rule for it "
            f"(`tfl.tfgraph.register_op_rule('{ctx.op_type}', tfl.tfgraph.linear_rule())`), "
            "or analyse the model's .keras file.")
    ctx.offsets = ()  # the batch-mixing witnesses run the op itself on them
    value = certify.box_average_norm(matrices)
    out_example = _example_shape(ctx.output_shape)

    def fn(x):
        y = certify.apply_box_average(tf.reshape(x, (-1, *full_in[1:])), matrices)
        return tf.reshape(y, (-1, *out_example))

    return Linear(_eager_safe(fn), norm=lambda: value,
                  certificate=certify.box_average_certificate(matrices),
                  note=f"{description}: ‖R_h‖‖R_w‖ = {value:.4g}")


def _max_pool(ctx: OpContext) -> Constant:
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its window depends on the input.")
    if ctx.op_type == "MaxPoolV2":
        ksize = [int(v) for v in np.ravel(ctx.constants[1])]
        strides = [int(v) for v in np.ravel(ctx.constants[2])]
    else:
        ksize, strides = ctx.attr("ksize"), ctx.attr("strides")
    value = max_pool_constant(ksize, strides)
    return Constant(value, note=f"max-pool √(Π⌈k/s⌉) = {value:.4g}")


_ACTIVATIONS = {
    "Relu": "relu", "Relu6": "relu6", "Elu": "elu", "Selu": "selu", "Sigmoid": "sigmoid",
    "Tanh": "tanh", "Softplus": "softplus", "Softsign": "softsign", "Softmax": "softmax",
    "LogSoftmax": "log_softmax", "LeakyRelu": "leaky_relu",
}


def _activation(ctx: OpContext) -> Constant:
    ctx.single_dependent()
    name = _ACTIVATIONS[ctx.op_type]
    params = {}
    if ctx.op_type == "LeakyRelu":
        params["negative_slope"] = float(ctx.attr("alpha", 0.2))
    size = int(ctx.input_shapes[0][-1]) if ctx.op_type == "LogSoftmax" else None
    info = activation_info(name, _culprit(ctx), size=size, **params)
    return Constant(info.lipschitz, certified=info.certified, note=info.name, activation=info)


def _abs(ctx: OpContext) -> Constant:
    ctx.single_dependent()
    return Constant(1.0, note="abs: 1-Lipschitz")


# |erf'(x)| = |erfc'(x)| = (2/√π)·exp(−x²): its sup, at x = 0, rounded up one unit.
_ERF_SLOPE = math.nextafter(2.0 / math.sqrt(math.pi), math.inf)

# Unary ops whose derivative is unbounded on their domain: the reason, shown in the error.
_UNBOUNDED_SLOPES = {
    "Exp": "exp (the 'exponential' activation): d/dx eˣ = eˣ is unbounded as x → ∞",
    "Expm1": "expm1: d/dx (eˣ − 1) = eˣ is unbounded as x → ∞",
    "Log": "log: d/dx log x = 1/x is unbounded as x → 0⁺",
    "Log1p": "log1p: d/dx log(1 + x) = 1/(1 + x) is unbounded as x → −1⁺",
    "Sqrt": "sqrt: d/dx √x = 1/(2√x) is unbounded as x → 0⁺",
    "Rsqrt": "rsqrt: d/dx x^(−1/2) = −x^(−3/2)/2 is unbounded as x → 0⁺",
    "Square": "square: d/dx x² = 2x is unbounded",
    "Reciprocal": "reciprocal: d/dx 1/x = −1/x² is unbounded as x → 0",
    "SquaredDifference": "squared difference: d/dx (x − y)² = 2(x − y) is unbounded",
}


def _refuse_unbounded(ctx: OpContext, reason: str):
    """Raises :class:`NotLipschitzError` for an op whose slope is unbounded, with what to do;
    :class:`UnsupportedOpError` when its output feeds other elementwise ops (``ctx.feeds``):
    the function they compute together may be Lipschitz (``log(1 + exp(x))``), and the graph
    reader does not recognise it."""
    if ctx.feeds:
        name, op = ctx.feeds[0]
        raise UnsupportedOpError(
            ctx.op_type, ctx.name,
            f"On its own it has no Lipschitz constant ({reason}), and here it feeds "
            f"'{name}' ({op}): it is part of an elementwise function that is not a recognised "
            "activation, and that function may be Lipschitz as a whole (softplus written as "
            "log(1 + exp(x)) is). The graph reader recognises gelu, silu/swish, mish, "
            "hard_silu, celu, squareplus and Euclidean norms √(Σ a² + c) by their structure "
            "and bounds other ops one by one. Analyse the "
            ".keras file instead (its activations have exact rules), or clip the op's input "
            f"and register sup |f'| on that interval with `tfl.tfgraph.register_op_rule("
            f"'{ctx.op_type}', tfl.tfgraph.elementwise_rule(c))`.")
    raise NotLipschitzError(
        _culprit(ctx),
        f"{reason}, so no constant holds for all inputs. Clip its input to an interval [a, b] "
        "(tf.clip_by_value) and register the constant sup |f'| on [a, b] with "
        f"`tfl.tfgraph.register_op_rule('{ctx.op_type}', tfl.tfgraph.elementwise_rule(c))` "
        f"(valid only if every '{ctx.op_type}' op of the function reads values in [a, b]), or "
        "use a bounded activation (tanh, sigmoid, softplus).")


_UNBOUNDED_OPS = frozenset(_UNBOUNDED_SLOPES) | {"Pow"}
# Elementwise ops that are affine maps (by nonzero constants) of their one dependent operand.
_AFFINE_BY_CONSTANT = frozenset({"AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "Neg"})


def _unbounded_slope(ctx: OpContext):
    """``Exp``, ``Log``, ``Sqrt``, ``Square``... (:data:`_UNBOUNDED_SLOPES`): not Lipschitz."""
    if ctx.op_type == "SquaredDifference" and len(set(ctx.inputs)) == 1:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "It computes (x − x)² = 0 of one "
                                 "tensor: a constant; remove it from the function.")
    _refuse_unbounded(ctx, _UNBOUNDED_SLOPES[ctx.op_type])


def _pow(ctx: OpContext) -> Constant:
    """``Pow`` (``x ** p``, ``tf.pow``): Lipschitz only where it is constant or the identity.

    ``d/dx x^p = p·x^(p−1)`` is unbounded as ``x → ∞`` for ``p > 1`` and as ``x → 0`` for
    ``p < 1``, ``p ∉ {0, 1}``; ``x^0 = 1`` and ``x^1 = x`` (exponents all in ``{0, 1}``) have
    slopes 0 and 1, and the input broadcast to ``copies`` times its size gives ``√copies``.
    ``d/dx cˣ = ln(c)·cˣ`` is unbounded unless ``c = 1`` (``1ˣ = 1``).
    """
    slots = ctx.dependent_slots
    if slots == [0]:
        power = np.asarray(ctx.constants[1], np.float64)
        if np.all((power == 0) | (power == 1)):
            value = _broadcast_factor(ctx, 0) if np.any(power == 1) else 0.0
            return Constant(value, note=f"x^p with p ∈ {{0, 1}}: {value:.4g}")
        shown = ", ".join(f"{p:g}" for p in np.unique(power[(power != 0) & (power != 1)])[:3])
        _refuse_unbounded(ctx, f"pow: d/dx x^p = p·x^(p−1) is unbounded for the exponent p = "
                          f"{shown} (as x → ∞ for p > 1, as x → 0 for p < 1)")
    if slots == [1]:
        base = np.asarray(ctx.constants[0], np.float64)
        if np.all(base == 1):
            return Constant(0.0, note="1^x = 1: constant")
        shown = ", ".join(f"{c:g}" for c in np.unique(base[base != 1])[:3])
        _refuse_unbounded(ctx, f"pow: d/dx cˣ = ln(c)·cˣ is unbounded for the base c = {shown}")
    _refuse_unbounded(ctx, "pow of two tensors that both depend on the input: d/dx xʸ = "
                      "y·x^(y−1) is unbounded")


def _selection_norm(rows: np.ndarray) -> float:
    """``√(largest number of times one row of ``rows`` occurs)``, rounded up: the exact norm
    of the selection (with repeats) of the slices those rows index (``SᵀS`` is the diagonal of
    the counts)."""
    if rows.size == 0:
        return 0.0
    top = int(np.max(np.unique(rows, axis=0, return_counts=True)[1]))
    root = math.sqrt(top)
    return root if math.isqrt(top) ** 2 == top else math.nextafter(root, math.inf)


def _gather(ctx: OpContext) -> Linear:
    """``GatherV2``/``Gather`` (``tf.gather``) and ``GatherNd`` (``tf.gather_nd``) with
    constant indices: a selection of slices of ``x`` with repeats, hence linear, of norm
    ``√(largest number of times one index is selected)`` (:func:`_selection_norm`; exact and
    certified). ``tf.gather`` with ``batch_dims > 0`` selects per row: measured. Indices that
    depend on the input are refused (a selection that moves with ``x`` jumps)."""
    if ctx.single_dependent() != 0:
        raise UnsupportedOpError(ctx.op_type, ctx.name, "Its indices depend on the input: the "
                                 "selected entries change with it, a step function. Use "
                                 "constant indices.")
    indices = np.asarray(ctx.constants[1])
    if ctx.op_type == "GatherNd":
        rows, what = indices.reshape(-1, indices.shape[-1] if indices.ndim else 1), "gather_nd"
    elif int(ctx.attr("batch_dims", 0) or 0) == 0:
        rows, what = indices.reshape(-1, 1), "gather"
    else:
        return ctx.linear(note="gather with batch_dims: selection per row (linear)")
    value = _selection_norm(rows)
    return ctx.linear(norm=value, note=f"{what}: selection, √(max repeats) = {value:.4g}")


def _cast(ctx: OpContext) -> Linear:
    """A cast between floating-point dtypes: the identity (its rounding aside).

    Running the cast itself would round every product of the power iteration (and the float64
    certificate's basis vectors) to a half-precision target, so the identity stands for it:
    the consumers of a float16 tensor compute in the wider dtype (see :func:`_batched`).
    """
    target = tf.as_dtype(ctx.attr("DstT"))
    if target.is_complex:
        raise UnsupportedOpError(
            ctx.op_type, ctx.name, f"It casts to {target.name}: complex values (an FFT, say) "
            "are not analysed; tf_lipschitz bounds real-valued functions.")
    if target not in _FLOAT_DTYPES:
        raise NotLipschitzError(_culprit(ctx), f"casting to {target.name} rounds to integers "
                                "(or booleans), a step function.")
    ctx.single_dependent()
    return Linear(_eager_safe(tf.identity), norm=lambda: 1.0, certificate=lambda: 1.0,
                  note=f"cast to {target.name}: norm 1")


def _product(ctx: OpContext) -> LayerBound:
    if ctx.elementwise_of is not None:
        if len(set(ctx.inputs)) == 1:
            raise NotLipschitzError(
                _culprit(ctx),
                f"{ctx.op_type} multiplies '{ctx.elementwise_of}' by itself: x·x is not a "
                "recognised activation, and its derivative 2x grows without bound.",
            )
        raise UnsupportedOpError(
            ctx.op_type, ctx.name,
            f"It multiplies two elementwise functions of '{ctx.elementwise_of}', and their "
            "product is not one of the activations recognised by the exact structure of their "
            "ops (gelu, silu/swish x·σ(βx), mish, hard_silu as TensorFlow and Keras build them). "
            "Such a product may or may not be Lipschitz, and the graph does not give its "
            "constant: write the activation with tf.nn or keras.activations, or analyse the "
            "Keras model file.",
        )
    raise NotLipschitzError(
        _culprit(ctx),
        f"{ctx.op_type} multiplies two tensors that both depend on the input (bilinear), which "
        "grows without bound. Normalisation layers (LayerNormalization) and attention compile to "
        "such products; analyse the Keras model file instead, or bound the input domain.",
    )


def _register_builtin_rules():
    for op in ("Reshape", "Squeeze", "ExpandDims", "Transpose", "DepthToSpace", "SpaceToDepth",
               "ReverseV2", "Roll"):
        register_op_rule(op, _isometry)
    for op in ("Slice", "StridedSlice"):
        register_op_rule(op, _restriction)
    for op in ("Pad", "PadV2"):
        register_op_rule(op, _padding)
    for op in ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D",
               "Conv3D", "Conv1D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
               "Conv3DBackpropInputV2", "DepthwiseConv2dNativeBackpropInput"):
        register_op_rule(op, _bilinear)
    for op in ("Add", "AddV2", "Sub", "BiasAdd", "BiasAddV1", "AddN"):
        register_op_rule(op, _affine_sum)
    register_op_rule("Neg", _neg)
    for op in ("Mul", "RealDiv", "Div", "DivNoNan"):
        register_op_rule(op, _scale)
    for op in ("Mean", "Sum"):
        register_op_rule(op, _reduction_mean)
    for op in ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"):
        register_op_rule(op, _batch_norm)
    for op in ("ConcatV2", "Concat", "Pack"):
        register_op_rule(op, _concat)
    for op in ("Split", "SplitV", "Unpack"):
        register_op_rule(op, _split_like)
    for op in ("Maximum", "Minimum"):
        register_op_rule(op, _max_merge)
    register_op_rule("ClipByValue", _clip)
    for op in ("Select", "SelectV2"):
        register_op_rule(op, _select)
    for op in ("Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual"):
        register_op_rule(op, _comparison)
    for op in ("Max", "Min"):
        register_op_rule(op, _reduce_max)
    for op in ("MaxPool", "MaxPoolV2", "MaxPool3D"):
        register_op_rule(op, _max_pool)
    for op in _ACTIVATIONS:
        register_op_rule(op, _activation)
    register_op_rule("Abs", _abs)
    for op in ("Sin", "Cos", "Atan"):  # sup |f'| = 1 (a SIREN's sine activations)
        register_op_rule(op, elementwise_rule(1.0, note=f"{op.lower()}: sup |f'| = 1"))
    for op in ("Erf", "Erfc"):  # sup |f'| = 2/√π, at 0
        register_op_rule(op, elementwise_rule(_ERF_SLOPE, note=f"{op.lower()}: sup |f'| = 2/√π"))
    for op in _UNBOUNDED_SLOPES:
        register_op_rule(op, _unbounded_slope)
    register_op_rule("Pow", _pow)
    for op in ("GatherV2", "Gather", "GatherNd"):
        register_op_rule(op, _gather)
    register_op_rule("Cast", _cast)
    for op in ("AvgPool", "AvgPool3D"):
        register_op_rule(op, _average_pool)
    for op in ("MirrorPad", "Tile", "BroadcastTo", "Cumsum"):
        register_op_rule(op, lambda ctx: ctx.linear())
    for op in ("SpaceToBatchND", "BatchToSpaceND"):
        register_op_rule(op, _block_move)
    for op in _RESAMPLING_OPERANDS:
        register_op_rule(op, _resampling)


_register_builtin_rules()

# Ops that may appear inside an elementwise activation built from several ops (gelu, silu...).
_ELEMENTWISE = frozenset({
    "Neg", "Abs", "Sigmoid", "Tanh", "Softplus", "Softsign", "Relu", "Relu6", "Elu", "Selu",
    "LeakyRelu", "Erf", "Erfc", "Exp", "Expm1", "Log", "Log1p", "Sqrt", "Rsqrt", "Square",
    "Reciprocal", "Sin", "Cos", "Mul", "AddV2", "Add", "Sub", "RealDiv", "Div", "Maximum",
    "Minimum", "Pow", "SquaredDifference", "ClipByValue", "Cast",
})
# Activations that TensorFlow and Keras build from several ops: (Keras activation name, its
# parameters, a function building it). Each function is traced in the graph's dtype and the
# structure of its sub-graph, constants included, is the pattern (see _reference_forms).
_COMPOSITE: tuple[tuple[str, tuple, Callable], ...] = (
    ("gelu", (), tf.nn.gelu),
    ("gelu", (), lambda x: keras.activations.gelu(x, approximate=False)),
    # the erf form of earlier TensorFlow releases (and of Hugging Face's TF models)
    ("gelu", (), lambda x: 0.5 * x * (1.0 + tf.math.erf(x / tf.cast(1.4142135623730951,
                                                                      x.dtype)))),
    ("gelu", (("approximate", True),), lambda x: tf.nn.gelu(x, approximate=True)),
    ("gelu", (("approximate", True),), lambda x: keras.activations.gelu(x, approximate=True)),
    ("silu", (), tf.nn.silu),
    ("silu", (), keras.activations.silu),
    ("mish", (), keras.activations.mish),
    ("hard_silu", (), keras.activations.hard_silu),
)
# Ops whose operands may be swapped without changing the result.
_COMMUTATIVE = frozenset({"Mul", "AddV2", "Add", "Maximum", "Minimum", "SquaredDifference"})
# Structural forms of sub-graphs, interned: a key (op, output index, attributes, operand ids)
# maps to a small id, so that equal sub-graphs of different graphs get equal ids.
_FORM_IDS: dict[tuple, int] = {}


def _attr_key(node_def) -> tuple:
    """The attributes of a node (not the private ``_``-prefixed ones), comparable exactly."""
    return tuple(sorted((key, value.SerializeToString(deterministic=True))
                        for key, value in node_def.attr.items() if not key.startswith("_")))


@functools.lru_cache(maxsize=None)
def _reference_forms(dtype: tf.DType) -> dict[int, tuple[str, tuple]]:
    """Structural forms of the :data:`_COMPOSITE` activations traced in ``dtype``.

    Returns:
        ``{form id: (activation name, parameters)}``.
    """
    forms: dict[int, tuple[str, tuple]] = {}
    for name, params, fn in _COMPOSITE:
        try:
            reader = _GraphReader(_concrete(fn, [tf.TensorSpec([None, 2], dtype)]), None)
        except (LipschitzError, TypeError, ValueError):  # not defined for this dtype
            continue
        live = reader._live_nodes()  # noqa: SLF001 - the reader of the same module
        refs = {reader.resolve(r) for n in live for r in _data_inputs(reader.nodes[n])}
        reader.values = reader.evaluate([r for r in refs if not reader.is_dependent(r)])
        form = reader.form(reader.resolve(reader.outputs[0]), reader.inputs[0], set(live))
        if form is not None:
            forms.setdefault(form, (name, params))
    return forms


# ---------------------------------------------------------------------------------------------
# Examples stay apart: the outputs for one example of a batch depend on that example only
# ---------------------------------------------------------------------------------------------

# Ops whose output entry depends only on the entries of their operands at the same (broadcast)
# index.
_ENTRYWISE = (_ELEMENTWISE | frozenset(_ACTIVATIONS)) - {"Softmax", "LogSoftmax"}
_WINDOW_MAX = frozenset({"MaxPool", "MaxPoolV2", "MaxPool3D"})
# Linear ops whose rule is not Linear: every constant floating-point operand is an offset.
_LINEAR_MERGES = frozenset({"AddN", "ConcatV2", "Concat", "Pack", "Split", "SplitV", "Unpack"})


def _witness(node_def, inputs: list[tf.Tensor], slots: list[int],
             tangents: list[tf.Tensor | None], outputs: list[tf.Tensor],
             noise: Callable[[tf.Tensor], tf.Tensor], offsets: Sequence[int] | None
             ) -> list[tf.Tensor | None]:
    """Dependence witnesses of the outputs of one op from those of its dependent operands.

    A witness is a tangent whose zero entries are structural: it is propagated through each op
    by a random member (independent weights ``r`` in [0.5, 1.5) drawn by ``noise``) of a family
    of linear maps that contains the op's Jacobian at every input. Linear ops are run on the
    witnesses with their constant ``offsets`` (biases, batch-norm means, padding values) set to
    zero: their own linear map, the same at every input. Nonlinear ops, whose Jacobian at one
    point can vanish (a ReLU off, a maximum taken elsewhere), use:

    - entrywise ops (activations, ``Maximum``, the products inside gelu or silu...):
      ``Σₖ r ⊙ broadcast(wₖ)``;
    - ``Softmax`` and ``LogSoftmax`` (last axis): ``r ⊙ w + r' ⊙ Σ_last(r'' ⊙ w)``;
    - ``Max``, ``Min`` and ``EuclideanNorm`` over axes: ``Σ_axes(r ⊙ w)`` (the norm's
      Jacobian weighs each group by ``x/‖x‖``, or a subgradient where ``x = 0``);
    - max pools: a sum over each window with a weight for every output and window offset;
    - ``Roll``: its product plus ``r ⊙ roll(w, 1)`` along the rolled axes, since a shift that
      is a multiple of the batch checked (2) moves examples at other batch sizes.

    A witness is then a polynomial in the weights that vanishes identically only if every
    choice of Jacobians along the graph, the true ones at any input included, gives zero: an
    entry that stays zero depends on no other entry at any input (almost surely in the draw).
    Ops of other types with no such family (registered by users) use their product at the
    sample point, or, without a gradient, make every output entry depend on every input entry.
    """
    if offsets is None and node_def.op in _LINEAR_MERGES:
        offsets = [i for i, t in enumerate(inputs) if i not in slots and t.dtype.is_floating]
    present = [(slot, t) for slot, t in zip(slots, tangents) if t is not None]
    out = outputs[0]
    if node_def.op in _ENTRYWISE or getattr(_OP_RULES.get(node_def.op), "elementwise", False):
        w = tf.add_n([noise(out) * tf.broadcast_to(tf.cast(t, out.dtype), tf.shape(out))
                      for _, t in present])
        if len(present) > 1:
            w /= len(present)
        # Each op scales the largest magnitude by 1/4 to 3/2: only half precision, which a few
        # such ops in a row under- or overflow, is rescaled after every op.
        return [_unit_scaled(w) if out.dtype in _HALF_DTYPES else w]
    made = _structured_witness(node_def, inputs, slots, present, outputs, noise, offsets)
    return [None if w is None else _unit_scaled(w) for w in made]


def _structured_witness(node_def, inputs, slots, present, outputs, noise, offsets
                        ) -> list[tf.Tensor | None]:
    """:func:`_witness` of the ops that are not entrywise, before rescaling."""
    op, out, w = node_def.op, outputs[0], present[0][1]
    if op in ("Softmax", "LogSoftmax"):
        return [noise(w) * w + noise(w) * tf.reduce_sum(noise(w) * w, -1, keepdims=True)]
    if op in ("Max", "Min", "EuclideanNorm"):
        keep = bool(node_def.attr["keep_dims"].b)
        return [tf.raw_ops.Sum(input=noise(w) * w, axis=inputs[1], keep_dims=keep)]
    if op in _WINDOW_MAX:
        window = _window_witness(node_def, inputs, w, out, noise)
        return [window] if window is not None else _dense_witness(outputs, [w], noise)
    products = _product_witness(node_def, inputs, slots, present, offsets)
    if products is None:
        return _dense_witness(outputs, [t for _, t in present], noise)
    if op == "Roll":
        step = tf.cast(tf.not_equal(inputs[1], 0), inputs[1].dtype)
        products[0] += noise(out) * tf.roll(w, step, inputs[2])
    return products


def _product_witness(node_def, inputs, slots, present, offsets: Sequence[int] | None
                     ) -> list[tf.Tensor | None] | None:
    """The linear part of one op applied to the witnesses ``present`` (``(slot, w)`` pairs).

    With known ``offsets`` (the op is linear in its dependent operands plus those constants),
    the op itself is run on the witnesses, the offsets set to zero. Otherwise (ops registered
    by users) its forward-mode product at the sample point; ``None`` when it has none.
    """
    if offsets is not None:
        operands = list(inputs)
        for slot in [*offsets, *slots]:
            operands[slot] = tf.zeros_like(inputs[slot])
        for slot, w in present:
            operands[slot] = w
        return [o if o.dtype.is_floating else None for o in _run_node(node_def, operands)]
    watched: dict[int, tuple[tf.Tensor, tf.Tensor]] = {}
    for slot, w in present:
        watched.setdefault(id(inputs[slot]), (inputs[slot], w))
    try:
        with tf.autodiff.ForwardAccumulator([p for p, _ in watched.values()],
                                            [w for _, w in watched.values()]) as acc:
            again = _run_node(node_def, inputs)
        return [acc.jvp(o, unconnected_gradients="zero") if o.dtype.is_floating else None
                for o in again]
    except (LookupError, NotImplementedError, TypeError, ValueError):
        return None


def _dense_witness(outputs, witnesses, noise) -> list[tf.Tensor | None]:
    """Every output entry depends on every entry of the witnesses (no structure known)."""
    total = tf.add_n([tf.reduce_sum(tf.cast(noise(w) * w, tf.float32)) for w in witnesses])
    return [noise(o) * tf.cast(total, o.dtype) if o.dtype.is_floating else None
            for o in outputs]


def _window_witness(node_def, inputs, w, out, noise) -> tf.Tensor | None:
    """Witness of a max pool: each window summed with its own weight per output and offset.

    ``None`` when the window or a shape is not known statically.
    """
    if node_def.op == "MaxPoolV2":
        ksize, strides = tf.get_static_value(inputs[1]), tf.get_static_value(inputs[2])
    else:
        ksize, strides = list(node_def.attr["ksize"].list.i), list(node_def.attr["strides"].list.i)
    padding = node_def.attr["padding"].s.decode()
    explicit = list(node_def.attr["explicit_paddings"].list.i)
    shape_in, shape_out = w.shape, out.shape
    if (ksize is None or strides is None or not shape_in.is_fully_defined()
            or not shape_out.is_fully_defined() or len(ksize) != shape_in.rank):
        return None
    ksize, strides = [int(k) for k in ksize], [int(s) for s in strides]
    pads = []
    for axis, (n, o, k, s) in enumerate(zip(shape_in, shape_out, ksize, strides)):
        extent = (o - 1) * s + k
        before = (explicit[2 * axis] if padding == "EXPLICIT"
                  else max(extent - n, 0) // 2 if padding == "SAME" else 0)
        pads.append([before, max(extent - n - before, 0)])
    padded = tf.pad(w, pads)
    terms = []
    for offset in itertools.product(*(range(k) for k in ksize)):
        end = [d + (o - 1) * s + 1 for d, o, s in zip(offset, shape_out, strides)]
        terms.append(noise(out) * tf.strided_slice(padded, list(offset), end, strides))
    return tf.add_n(terms)


def _unit_scaled(w: tf.Tensor) -> tf.Tensor:
    """``w`` divided by its largest magnitude, so that witnesses neither overflow nor underflow
    along the graph; a non-finite entry (an overflow within one op) becomes 1, non-zero."""
    w = tf.where(tf.math.is_finite(w), w, tf.ones_like(w))
    return tf.math.divide_no_nan(w, tf.reduce_max(tf.abs(w)))


# ---------------------------------------------------------------------------------------------
# The frozen graph
# ---------------------------------------------------------------------------------------------


class _OpNode:
    """The ``operation`` of a graph-level :class:`~tf_lipschitz.graph.GraphNode`.

    Subclassed per op type (so that reports show ``MatMul``, ``Conv2D``...); the rule of the core
    registry returns the bound computed when the graph was read.
    """

    error_noun = "Op"  # errors say "Op 'name' (MatMul)", not "Layer"

    def __init__(self, name: str, bound: LayerBound, block_move: tuple | None = None):
        self.name = name
        self.bound = bound
        self.block_move = block_move  # see OpContext.block_move


_OP_CLASSES: dict[str, type] = {}


def _op_class(op_type: str) -> type:
    if op_type not in _OP_CLASSES:
        _OP_CLASSES[op_type] = type(op_type, (_OpNode,), {"__module__": __name__})
    return _OP_CLASSES[op_type]


register_rule(_OpNode, lambda op, ctx: op.bound)


def _display_names(names: Sequence[str]) -> dict[str, str]:
    """Shortens node names: drops ``StatefulPartitionedCall/`` wrappers and a shared first scope."""
    def strip(name: str) -> str:
        parts = [p for p in name.split("/")
                 if not (p.startswith(("StatefulPartitionedCall", "PartitionedCall")))]
        return "/".join(parts) or name

    short = {n: strip(n) for n in names}
    firsts = {s.split("/")[0] for s in short.values() if "/" in s}
    if len(firsts) == 1 and all("/" in s for s in short.values()):
        short = {n: s.split("/", 1)[1] for n, s in short.items()}
    return short


@dataclasses.dataclass
class _Signature:
    """A concrete function with named inputs and outputs."""

    function: Any
    input_names: list[str]
    output_names: list[str]
    name: str


def _resolve_shape(spec_shape: tf.TensorShape, given: Sequence[int] | None, name: str
                   ) -> tuple[int, ...]:
    """Full batch-1 shape of an input from its spec and an optional user shape."""
    dims = spec_shape.as_list() if spec_shape.rank is not None else None
    if given is not None:
        received = given
        try:
            given = None if isinstance(given, str) else tuple(int(d) for d in given)
        except (TypeError, ValueError):
            given = None
        if given is not None and dims is None:
            return given
        if given is not None and len(given) == len(dims) - 1:
            given = (1, *given)
        if given is None or len(given) != len(dims) or any(
                d is not None and d != g for d, g in zip(dims, given)):
            raise InvalidArgumentError(
                f"input_shape={received!r} does not fit input '{name}' of shape "
                f"{None if dims is None else tuple(dims)}; give the shape of one example "
                "(without the batch axis) or of a batch of one."
            )
        if given and dims and dims[0] is None and given[0] != 1:
            given = (1, *given[1:])
        return given
    if dims is None:
        raise ModelNotBuiltError(
            f"Input '{name}' has unknown rank; pass input_shape=(...) (CLI: --input-shape)."
        )
    full = list(dims)
    if full and full[0] is None:
        full[0] = 1
    if any(d is None for d in full):
        raise ModelNotBuiltError(
            f"Input '{name}' has shape {tuple(dims)} with unknown dimensions. The operator norm "
            "of a convolution depends on the input size: pass input_shape=(...) (CLI: "
            "--input-shape 1,H,W,C)."
        )
    return tuple(full)


@dataclasses.dataclass
class _Frozen:
    """A concrete function with its variables frozen into constants: the ``GraphDef``, and
    the input and output tensors (names in the ``GraphDef``, dtypes, shapes)."""

    graph_def: Any
    inputs: list
    outputs: list


def _freeze(fn) -> _Frozen:
    """Freezes the variables of concrete function ``fn`` into constants, inlines the calls that
    freezing keeps (:func:`_inline_calls`) and keeps the ancestors of the outputs.

    ``convert_variables_to_constants_v2`` builds the frozen ``GraphDef`` (Grappler's function
    inlining, variables read into ``Const`` nodes), then wraps it into a new concrete function
    (import, pruning, lifting): on VGG16, 2 s for the first step and 14 s for the second, which
    the reader does not need. The first step is called on its own, the pruning done here (the
    ancestors of the outputs, and the inputs), and the input and output tensors are those of
    ``fn`` (the wrapped function takes their names and shapes). The public function is the
    fallback if TensorFlow's private converter changes.

    Raises:
        LipschitzError: The function reads a variable that it writes
            (:func:`_check_no_stale_reads`).
    """
    try:
        data = convert_to_constants._FunctionConverterDataInEager(  # noqa: SLF001
            func=fn, lower_control_flow=True, aggressive_inlining=False)
        graph_def, converted = convert_to_constants._replace_variables_by_constants(  # noqa
            converter_data=data)
        captures = fn.graph.internal_captures
        removed = {id(captures[i]) for i in converted}
        inputs = [t for t in fn.inputs if id(t) not in removed]
        outputs = list(fn.outputs)
    except (AttributeError, TypeError):  # the private API moved
        frozen = convert_to_constants.convert_variables_to_constants_v2(fn)
        graph_def = frozen.graph.as_graph_def()
        inputs, outputs = list(frozen.inputs), list(frozen.outputs)
    graph_def = _inline_calls(graph_def)
    _check_no_stale_reads(graph_def, [t.name for t in outputs])
    nodes = {n.name: n for n in graph_def.node}
    keep = _ancestors(nodes, [_split(t.name)[0] for t in outputs], control=True)
    keep |= {_split(t.name)[0] for t in inputs}
    if len(keep) < len(graph_def.node):
        graph_def = _graph_def_with(graph_def, (n for n in graph_def.node if n.name in keep))
    return _Frozen(graph_def, inputs, outputs)


# Ops that pass a tensor on unchanged (lowered control flow included), and variable writes.
# Control-flow ops left in a frozen graph (lowered or functional conditionals).
_CONTROL_FLOW = frozenset({"Switch", "Merge", "RefSwitch", "RefMerge", "If", "StatelessIf",
                           "Case", "StatelessCase", "While", "StatelessWhile"})

_FORWARDS = frozenset({"Identity", "IdentityN", "Snapshot", "Switch", "Merge", "Enter", "Exit",
                       "NextIteration"})
_WRITE_PREFIXES = ("Assign", "ResourceScatter", "ResourceApply", "ResourceSparseApply",
                   "ResourceStridedSliceAssign")


def _is_write(node) -> bool:
    """Whether ``node`` writes the variable of its first operand."""
    op_def = op_def_registry.get(node.op)
    return (node.op.startswith(_WRITE_PREFIXES) and op_def is not None
            and bool(op_def.input_arg) and op_def.input_arg[0].type == types_pb2.DT_RESOURCE)


def _check_no_stale_reads(graph_def, outputs: Sequence[str]) -> None:
    """Raises if the function writes a variable and the outputs use a read of it.

    Freezing replaces each variable by a constant holding its value before the call, the
    variable's writes (``AssignVariableOp``...) then write to that constant and its reads
    become ``Identity`` nodes of it: a read after a write would see the old value, and the
    bound would not be that of the function that runs (TensorFlow's public converter refuses
    such graphs). Each constant is followed through the ops that pass it on (an inlined
    call's arguments, lowered ``tf.cond``); a write is an ``Assign*`` / ``Resource*`` update of
    it, a read any other op that takes it and whose value reaches an output (``outputs``:
    tensor names). Writes that no output reads (a counter, a metric) change no output.
    """
    nodes = {n.name: n for n in graph_def.node}
    consumers: dict[str, list[str]] = {}
    for node in graph_def.node:
        for ref in _data_inputs(node):
            consumers.setdefault(_split(ref)[0], []).append(node.name)
    sinks = {_split(ref)[0] for ref in outputs}
    used = _ancestors(nodes, sinks)
    for const in (n.name for n in graph_def.node if n.op == "Const"):
        passed, stack, writer, reader = {const}, [const], None, None
        while stack:
            current = stack.pop()
            for name in consumers.get(current, []):
                node = nodes[name]
                if _is_write(node) and _split(_data_inputs(node)[0])[0] == current:
                    # (the variable's own operand, not the value written)
                    writer = writer or name
                elif node.op in _FORWARDS and name not in sinks:
                    if name not in passed:
                        passed.add(name)
                        stack.append(name)
                elif name in used:
                    reader = reader or name
        if writer is not None and reader is not None:
            raise LipschitzError(
                f"The function writes a variable (node '{writer}') and its outputs use a read of "
                f"it (node '{reader}'): frozen into a constant, the variable would keep its value "
                "from before the call, so the bound would not be that of the function that runs "
                "(reads before the write are refused too: the frozen graph does not keep their "
                "order). Analyse a function that does not assign the variables it uses (no "
                "optimizer step or random-generator state; a model called with "
                "training=False), or the .keras model.")


@dataclasses.dataclass(frozen=True)
class _Region:
    """Ops of the graph bounded as one node (an activation built from several ops, a norm).

    Attributes:
        sources: The tensors the region reads (its parents).
        members: The ops it absorbs, its output op aside.
        bound: The bound of the output in its parents, or in ``stack`` when there is one.
        stack: ``(linear, shape)`` when the region reads linear functions of one source, a
            :class:`~tf_lipschitz.rules.Linear` stacking them (flattened, in order) into a
            vector of ``shape``: a node of its own between the source and the output.
    """

    sources: tuple[str, ...]
    members: set[str]
    bound: LayerBound
    stack: tuple[Linear, tuple[int, ...]] | None = None


def _keras_activation_region(activation: str, formula: str, source: str,
                             members: set[str]) -> _Region:
    """The region of a Keras activation recognised from the ``members`` ops (plus its output
    op) reading ``source``, bounded by that activation's rule."""
    info = activation_info(activation)
    note = f"{formula}: {info.lipschitz:g} (recognised from {len(members) + 1} ops)"
    return _Region((source,), members, Constant(info.lipschitz, certified=info.certified,
                                                activation=info, note=note))


class _GraphReader:
    """Reads a frozen concrete function into a :class:`ModelGraph` of :class:`_OpNode` s."""

    def __init__(self, signature: _Signature, input_shapes, *, seed: int = 0, progress=None):
        fn = signature.function
        try:
            frozen = _freeze(fn)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise LipschitzError(
                f"Could not freeze the variables of '{signature.name}' into constants: {exc}"
            ) from exc
        self.frozen = frozen
        self._const_cache: dict[str, tf.Tensor] = {}  # see _constant_feeds
        self.name = signature.name
        self.seed = seed
        self.graph_def = frozen.graph_def
        self.nodes = {n.name: n for n in self.graph_def.node}
        self.order = self._topological_order()
        self.progress = progress
        placeholders = [t.name for t in frozen.inputs]
        outputs = [t.name for t in frozen.outputs]
        names = (signature.output_names if len(signature.output_names) == len(outputs)
                 else [o.split(":")[0] for o in outputs])
        # Integer outputs (class ids from argmax...) are not continuous: analyse the others.
        keep = [i for i, t in enumerate(frozen.outputs) if t.dtype in _FLOAT_DTYPES]
        self.skipped_outputs = [names[i] for i in range(len(outputs)) if i not in keep]
        if self.skipped_outputs:
            warnings.warn(
                f"Outputs {self.skipped_outputs} of '{signature.name}' are not floating-point "
                "(not continuous in the input); the bound covers the other outputs only.",
                stacklevel=3,
            )
        self.outputs = [outputs[i] for i in keep]
        self.output_names = [names[i] for i in keep]
        if not placeholders:
            raise ModelNotBuiltError(f"'{signature.name}' has no tensor inputs to analyse.")
        if input_shapes is not None and len(placeholders) == 1 and not _is_shape_list(input_shapes):
            input_shapes = [input_shapes]
        if input_shapes is not None and len(input_shapes) != len(placeholders):
            raise InvalidArgumentError(
                f"'{signature.name}' has {len(placeholders)} inputs; received "
                f"{len(input_shapes)} input shapes (input_shape={input_shapes!r}). Pass one "
                "shape per input, in the order of the signature."
            )
        names = (signature.input_names if len(signature.input_names) == len(placeholders)
                 else [p.split(":")[0] for p in placeholders])
        self.inputs: list[str] = []
        self.input_names = names
        self.input_full: dict[str, tuple[int, ...]] = {}
        # Inputs whose signature leaves the leading (batch) axis free: examples of a batch.
        self.batched: dict[str, bool] = {}
        self.dtypes: dict[str, tf.DType] = {}
        for i, (ref, tensor) in enumerate(zip(placeholders, frozen.inputs)):
            if tensor.dtype not in _FLOAT_DTYPES:
                raise ModelNotBuiltError(
                    f"Input '{names[i]}' of '{signature.name}' has dtype {tensor.dtype.name}: "
                    "integer or boolean inputs (token ids, masks) have no continuous "
                    "perturbation, so no Lipschitz constant. Export a function that starts at the "
                    "first floating-point tensor (e.g. after the embedding)."
                )
            self.inputs.append(ref)
            self.dtypes[ref] = tensor.dtype
            self.batched[ref] = bool(tensor.shape.rank) and tensor.shape[0] is None
            self.input_full[ref] = _resolve_shape(
                tensor.shape, None if input_shapes is None else input_shapes[i], names[i])
        self.dependent = self._dependence()
        self.alias = self._aliases()
        rng = np.random.default_rng(seed)
        self.sample = {ref: rng.standard_normal(self.input_full[ref]).astype(
            self.dtypes[ref].as_numpy_dtype) for ref in self.inputs}

    # -- structure -----------------------------------------------------------------------------

    def _topological_order(self) -> list[str]:
        index = {n.name: i for i, n in enumerate(self.graph_def.node)}
        indegree = {n.name: 0 for n in self.graph_def.node}
        children: dict[str, list[str]] = {n.name: [] for n in self.graph_def.node}
        for n in self.graph_def.node:
            for ref in n.input:
                src = ref.lstrip("^").split(":")[0]
                if src in indegree:
                    indegree[n.name] += 1
                    children[src].append(n.name)
        ready = sorted((name for name, d in indegree.items() if d == 0), key=index.get)
        order = []
        heap = [(index[n], n) for n in ready]
        heapq.heapify(heap)
        while heap:
            _, name = heapq.heappop(heap)
            order.append(name)
            for child in children[name]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    heapq.heappush(heap, (index[child], child))
        if len(order) != len(self.graph_def.node):
            left = [name for name, d in indegree.items() if d > 0]  # the loop and after it
            frames = [n for n in left if self.nodes[n].op in ("Enter", "Merge", "NextIteration")]
            raise LipschitzError(
                f"The frozen graph of '{self.name}' has a loop (node '{(frames or left)[0]}'): "
                "a tf.while_loop, such as the one a Keras GRU or LSTM layer runs. Loops are not "
                "analysed in graphs; analyse the .keras file, whose recurrent layers have rules, "
                "or a function without the loop.")
        return order

    def _dependence(self) -> dict[str, bool]:
        dep: dict[str, bool] = {}
        input_nodes = {r.split(":")[0] for r in self.inputs}
        for name in self.order:
            node = self.nodes[name]
            if name in input_nodes:
                dep[name] = True
            elif node.op in _SHAPE_ONLY or node.op in _IGNORED:
                dep[name] = False
            else:
                dep[name] = any(dep[_split(r)[0]] for r in _data_inputs(node))
        return dep

    def _aliases(self) -> dict[str, str]:
        """Maps tensors produced by alias ops to the tensor they forward."""
        alias: dict[str, str] = {}
        for name in self.order:
            node = self.nodes[name]
            if node.op in _ALIASES and self.dependent[name]:
                ins = _data_inputs(node)
                for k, ref in enumerate(ins if node.op == "IdentityN" else ins[:1]):
                    alias[f"{name}:{k}"] = self.resolve(ref, alias)
        return alias

    def resolve(self, ref: str, alias: dict[str, str] | None = None) -> str:
        alias = self.alias if alias is None else alias
        ref = _tensor_name(ref)
        return alias.get(ref, ref)

    def is_dependent(self, ref: str) -> bool:
        return self.dependent[_split(ref)[0]]

    # -- values --------------------------------------------------------------------------------

    def ancestors(self, refs: Sequence[str]) -> list[Any]:
        """``NodeDef``s needed to compute ``refs``, in topological order."""
        need = _ancestors(self.nodes, [_split(r)[0] for r in refs])
        return [self.nodes[n] for n in self.order if n in need]

    def evaluate(self, refs: Sequence[str], sample: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
        """Values of tensors at ``sample`` (default: the batch-1 sample input), in one
        compiled pass."""
        refs = sorted(set(refs))
        if not refs:
            return {}
        sample = self.sample if sample is None else sample
        nodes = self.ancestors(refs)
        inputs = list(self.inputs)

        consts = self._constant_feeds(nodes)

        def run(*xs):
            values = _replay(nodes, {**consts, **dict(zip(inputs, xs))}, _tensor_name)
            return [values[r] for r in refs]

        specs = [tf.TensorSpec(sample[r].shape, self.dtypes[r]) for r in inputs]
        outs = _once(run, specs)(*[tf.constant(sample[r]) for r in inputs])
        return {r: np.asarray(v.numpy()) for r, v in zip(refs, outs)}  # bfloat16 scalars too

    def _constant_feeds(self, nodes) -> dict[str, tf.Tensor]:
        """The values of the ``Const`` nodes among ``nodes`` as eager tensors, made once.

        Fed to the replays of :meth:`evaluate` and :meth:`_batch_witnesses`, a function graph
        captures them instead of embedding each one as a constant of its own: for VGG16's 528 MB
        of frozen weights, embedding them took the graph reading to 17.6 GB and 92 s.
        """
        feeds = {}
        for node in nodes:
            if node.op == "Const":
                ref = f"{node.name}:0"
                if ref not in self._const_cache:
                    self._const_cache[ref] = tf.constant(
                        tf.make_ndarray(node.attr["value"].tensor))
                feeds[ref] = self._const_cache[ref]
        return feeds

    # -- the walk ------------------------------------------------------------------------------

    def build(self) -> ModelGraph:
        live = self._live_nodes()
        needed: set[str] = set()
        for name in live:
            for ref in _data_inputs(self.nodes[name]):
                needed.add(self.resolve(ref))
            needed.add(f"{name}:0")
        for ref in self.outputs:
            needed.add(self.resolve(ref))
        try:
            self.values = self.evaluate([r for r in needed if r not in self.input_full])
        except LipschitzError:
            raise
        except (ValueError, tf.errors.OpError) as exc:
            shapes = ", ".join(str(tuple(self.sample[r].shape)) for r in self.inputs)
            raise LipschitzError(
                f"The graph of '{self.name}' fails on a batch of one example (input shape "
                f"{shapes}): {first_line(exc)}. tf_lipschitz runs the function on batches of one and of "
                "several examples; a function that only runs on a fixed batch size, such as a "
                "reshape that merges the examples of a batch (tf.reshape(x, [-1, 8]) on 4 "
                "features), cannot be analysed per example. Keep the batch axis first and "
                "untouched.") from exc
        display = _display_names(live)
        self.offsets: dict[str, tuple[int, ...] | None] = {}  # of ops with Linear rules
        regions = self._find_regions(live, display)
        absorbed = {n for r in regions.values() for n in r.members}
        other_outputs = {
            _split(self.resolve(ref))[0]
            for name in live for ref in _data_inputs(self.nodes[name])
            if _split(self.resolve(ref))[1] != 0
        }

        nodes: list[GraphNode] = []
        index_of: dict[str, int] = {}
        for ref, name in zip(self.inputs, self.input_names):
            shape = _example_shape(self.input_full[ref])
            node = GraphNode(index=len(nodes), operation=None, name=name, parents=(),
                             input_shapes=(shape,), output_shapes=(shape,), dependent=True,
                             dtype=_work_dtype(self.dtypes[ref]).name)
            index_of[ref.split(":")[0]] = node.index
            nodes.append(node)

        todo = [n for n in live if n not in absorbed]
        bar = progress_bar(len(todo), unit_name="op", label="reading the graph",
                           verbose=int(self.progress and len(todo) > 50))
        for count, name in enumerate(todo):
            node_def = self.nodes[name]
            block_move = None
            if name in regions:
                region = regions[name]
                bound, dep_refs = region.bound, list(region.sources)
            else:
                ctx = self._context(node_def, display[name])
                bound = self._rule(ctx)
                dep_refs = [r for r, d in zip(ctx.inputs, ctx.dependent) if d]
                block_move = ctx.block_move
                if isinstance(bound, Linear) and name in other_outputs:
                    raise UnsupportedOpError(node_def.op, name, "Only its first output may be "
                                             "used by later input-dependent ops.")
            if name not in regions:
                self.offsets[name] = ctx.offsets
            parents = tuple(index_of[_split(r)[0]] for r in dep_refs)
            shapes = tuple(_example_shape(self._shape(r)) for r in dep_refs)
            out_shape = _example_shape(self._shape(f"{name}:0"))
            dtype = self._dtype(dep_refs[0])
            if name in regions and regions[name].stack is not None:
                # the terms as one linear map of the region's source, before the norm
                stack, stack_shape = regions[name].stack
                node = GraphNode(
                    index=len(nodes),
                    operation=_op_class("StackedTerms")(f"{display[name]}/terms", stack),
                    name=f"{display[name]}/terms", parents=parents, input_shapes=shapes,
                    output_shapes=(stack_shape,), dependent=True,
                    input_dependent=tuple(True for _ in parents), dtype=_work_dtype(dtype).name,
                )
                for p in set(parents):
                    nodes[p].consumers.append(node.index)
                nodes.append(node)
                parents, shapes = (node.index,), (stack_shape,)
            node = GraphNode(
                index=len(nodes),
                operation=_op_class(node_def.op)(display[name], bound, block_move),
                name=display[name], parents=parents, input_shapes=shapes,
                output_shapes=(out_shape,), dependent=True,
                input_dependent=tuple(True for _ in parents), dtype=_work_dtype(dtype).name,
            )
            for p in set(parents):
                nodes[p].consumers.append(node.index)
            index_of[name] = node.index
            nodes.append(node)
            if bar is not None:
                bar.update(count + 1)

        outputs, names = [], []
        for ref, out_name in zip(self.outputs, self.output_names):
            ref = self.resolve(ref)
            if not self.is_dependent(ref):
                continue
            outputs.append(index_of[_split(ref)[0]])
            names.append(out_name)
        if not outputs:
            raise LipschitzError("No output of the function depends on its inputs (constant "
                                 "function: Lipschitz constant 0).")
        self._check_examples_apart(live, display)
        return ModelGraph(nodes, [index_of[r.split(":")[0]] for r in self.inputs], outputs, names)

    # -- examples stay apart -------------------------------------------------------------------

    def _check_examples_apart(self, live: Sequence[str], display: dict[str, str]) -> None:
        """Raises :class:`BatchMixingError` if an output for one example reads another example.

        Every op is analysed at batch size 1, i.e. as a function of one example. That is the
        function on batches only if the outputs of each example depend on that example alone.
        The graph is therefore run on a batch of two examples, with a dependence witness
        (:func:`_witness`) started on the first example, then on the second: each output must
        have an axis twice as long as at batch 1 (the batch axis, possibly merged with others,
        as in ``(batch·time, ...)``) and the witness must stay in the block of its example. A
        function that does not run on two examples (a batch size frozen into its graph) is
        only defined at batch 1, where the analysis is exact; so is one whose inputs all have a
        fixed leading dimension (the whole tensor is one example).
        """
        if not any(self.batched.values()):
            return
        outputs = sorted({self.resolve(o) for o in self.outputs
                          if self.is_dependent(self.resolve(o))})
        found = self._batch_witnesses(outputs, live)
        if found is None:
            return
        failing = [o for o in outputs if self._layout(o, *found[o]) in ("mixed", "merged")]
        if not failing:
            return
        read = {self.resolve(r) for name in live for r in _data_inputs(self.nodes[name])}
        refs = sorted({r for r in read if self.is_dependent(r)} | set(outputs))
        found = self._batch_witnesses(refs, live)
        status = {r: self._layout(r, *found[r]) for r in refs}
        ref = failing[0]
        while True:  # back to the first op whose inputs keep examples apart
            node = self.nodes[_split(ref)[0]]
            worse = [r for r in (self.resolve(i) for i in _data_inputs(node))
                     if status.get(r) in ("mixed", "merged")]
            if not worse:
                break
            ref = worse[0]
        detail = ("makes the outputs for one example depend on other examples"
                  if status[ref] == "mixed" else
                  "gives an output with no axis that keeps the examples apart (the batch axis "
                  "is reduced, sliced, moved, or broadcast against an axis of a constant)")
        raise BatchMixingError(self.name, node.op, display.get(node.name, node.name), detail)

    def _layout(self, ref: str, shape: np.ndarray, reach: tuple) -> str:
        """How tensor ``ref`` holds the examples of a batch of 2, from its batch-2 ``shape`` and
        ``reach`` (for a witness started on each example, the non-zero entries along each axis,
        or ``None`` where it does not reach ``ref``).

        Returns:
            ``"apart"`` (one axis doubles, and each example's witness stays in its half),
            ``"mixed"`` (it reaches the other half), ``"merged"`` (no axis holds the examples,
            yet they reach the tensor) or ``"shared"`` (no example reaches it).
        """
        single, double = self._shape(ref), tuple(int(d) for d in shape)
        grown = [k for k, (a, b) in enumerate(zip(single, double)) if a != b]
        ranks = {len(single), len(double)} | {len(r) for r in reach if r is not None}
        if len(ranks) == 1 and len(grown) == 1 and double[grown[0]] == 2 * single[grown[0]]:
            axis, half = grown[0], single[grown[0]]
            first, second = reach
            if (first is not None and first[axis][half:].any()) or (
                    second is not None and second[axis][:half].any()):
                return "mixed"
            return "apart"
        if any(r is not None and any(np.any(a) for a in r) for r in reach):
            return "merged"
        return "shared"

    def _batch_witnesses(self, refs: Sequence[str], live: Sequence[str]) -> dict[str, tuple] | None:
        """Batch-2 shapes of ``refs`` and where the witness of each example reaches in them.

        Returns:
            ``{ref: (shape, (first, second))}``, ``first``/``second`` a list with, for each
            axis, which of its indices the witness started on that example reaches (``None``
            if it does not reach ``ref``); ``None`` if the graph does not run on 2 examples.
        """
        nodes = self.ancestors(refs)
        inputs = list(self.inputs)
        live = set(live)
        full = {r: (2, *self.input_full[r][1:]) if self.batched[r] else self.input_full[r]
                for r in inputs}
        rng = np.random.default_rng(self.seed)
        sample = {r: rng.standard_normal(full[r]).astype(self.dtypes[r].as_numpy_dtype)
                  for r in inputs}
        reached: dict[tuple[str, int], bool] = {}
        state = {"in_witness": False}
        consts = self._constant_feeds(nodes)

        def run(*xs):
            count = itertools.count()

            def noise(like):  # weights in [0.5, 1.5), an independent draw at each call
                seed = tf.constant([self.seed, next(count)], tf.int64)
                return tf.raw_ops.StatelessRandomUniform(shape=tf.shape(like), seed=seed,
                                                         dtype=like.dtype) + 0.5

            passes: tuple[dict[str, tf.Tensor], ...] = ({}, {})
            for ref, x in zip(inputs, xs):
                if self.batched[ref]:
                    for example, witnesses in enumerate(passes):
                        one = tf.one_hot(example, 2, dtype=x.dtype)
                        witnesses[ref] = noise(x) * tf.reshape(one, [2] + [1] * (x.shape.rank - 1))

            def visit(node_def, ins, outs):
                if node_def.name not in live:
                    return
                state["in_witness"] = True
                ins_refs = [self.resolve(r) for r in _data_inputs(node_def)]
                slots = [i for i, r in enumerate(ins_refs) if self.is_dependent(r)]
                offsets = self.offsets.get(node_def.name)
                for witnesses in passes:
                    tangents = [witnesses.get(ins_refs[i]) for i in slots]
                    if all(t is None for t in tangents):
                        continue
                    made = _witness(node_def, ins, slots, tangents, outs, noise, offsets)
                    for k, w in enumerate(made):
                        if w is not None:
                            witnesses[f"{node_def.name}:{k}"] = w
                state["in_witness"] = False

            values = _replay(nodes, {**consts, **dict(zip(inputs, xs))}, _tensor_name, visit)
            result = []
            for ref in refs:
                value = values[ref]
                per_pass = []
                for example, witnesses in enumerate(passes):
                    w = witnesses.get(ref)
                    reached[ref, example] = w is not None
                    if w is None:
                        continue
                    nonzero = tf.not_equal(w, 0)
                    rank = value.shape.rank or 0  # unknown: only whether w reaches ref
                    per_pass.append([tf.reduce_any(nonzero, [a for a in range(rank) if a != k])
                                     for k in range(rank)] or [tf.reduce_any(nonzero)[None]])
                result.append((tf.shape(value), per_pass))
            return result

        specs = [tf.TensorSpec(full[r], self.dtypes[r]) for r in inputs]
        try:
            outs = _once(run, specs)(*[tf.constant(sample[r]) for r in inputs])
        except (ValueError, TypeError, tf.errors.OpError):
            if state["in_witness"]:
                raise
            try:
                self.evaluate(refs, sample)  # the witnesses failed at run time: a bug
            except (ValueError, TypeError, tf.errors.OpError):
                return None  # the function itself runs on one example only
            raise
        found = {}
        for ref, (shape, per_pass) in zip(refs, outs):
            values = iter(per_pass)
            reach = tuple([np.asarray(a) for a in next(values)] if reached[ref, e] else None
                          for e in range(2))
            found[ref] = (np.asarray(shape), reach)
        return found

    def _live_nodes(self) -> list[str]:
        """Input-dependent, non-alias nodes that some output depends on, in topological order."""
        wanted: set[str] = set()
        stack = [_split(self.resolve(r))[0] for r in self.outputs]
        input_nodes = {r.split(":")[0] for r in self.inputs}
        while stack:
            name = stack.pop()
            if name in wanted or not self.dependent.get(name, False):
                continue
            wanted.add(name)
            for ref in _data_inputs(self.nodes[name]):
                src = _split(self.resolve(ref))[0]
                if self.dependent.get(src, False):
                    stack.append(src)
        return [n for n in self.order if n in wanted and n not in input_nodes
                and self.nodes[n].op not in _ALIASES]

    def _shape(self, ref: str) -> tuple[int, ...]:
        ref = self.resolve(ref)
        if ref in self.input_full:
            return self.input_full[ref]
        return tuple(int(d) for d in self.values[ref].shape)

    def _dtype(self, ref: str) -> tf.DType:
        ref = self.resolve(ref)
        if ref in self.dtypes:
            return self.dtypes[ref]
        return tf.as_dtype(self.values[ref].dtype)

    def _context(self, node_def, display: str) -> OpContext:
        inputs = tuple(self.resolve(r) for r in _data_inputs(node_def))
        dependent = tuple(self.is_dependent(r) for r in inputs)
        constants = tuple(None if d else self.values[r] for r, d in zip(inputs, dependent))
        dep_dtypes = [self._dtype(r) for r, d in zip(inputs, dependent) if d]
        for dtype in dep_dtypes:
            if dtype not in _FLOAT_DTYPES:
                raise NotLipschitzError(
                    _op_class(node_def.op)(display, None),
                    f"it reads a {dtype.name} tensor computed from the input (rounding, argmax or "
                    "comparisons jump), so the function is not continuous.",
                )
        return OpContext(
            node_def=node_def, name=display, inputs=inputs, dependent=dependent,
            constants=constants, input_shapes=tuple(self._shape(r) for r in inputs),
            output_shape=self._shape(f"{node_def.name}:0"), dtype=dep_dtypes[0],
            elementwise_of=self.unmatched.get(node_def.name),
            feeds=self._elementwise_readers(node_def.name) if node_def.op in _UNBOUNDED_OPS
            else (),
        )

    def _elementwise_readers(self, name: str) -> tuple[tuple[str, str], ...]:
        """``(name, op)`` of the elementwise ops downstream of node ``name`` that may make the
        function they compute with it Lipschitz (celu's ``Expm1`` feeds a ``Minimum``, a
        ``Square`` under a ``Sqrt``). Affine maps by nonzero constants (``+ 1``, ``· 2``)
        keep an unbounded slope unbounded: they are looked through."""
        found, todo, seen = [], [name], {name}
        while todo:
            current = todo.pop()
            for node in self.graph_def.node:
                if node.name in seen or node.op not in _ENTRYWISE or not any(
                        _split(self.resolve(r))[0] == current for r in _data_inputs(node)):
                    continue
                seen.add(node.name)
                refs = [self.resolve(r) for r in _data_inputs(node)]
                consts = [self.values.get(r) for r in refs if not self.is_dependent(r)]
                if (node.op in _AFFINE_BY_CONSTANT and len(consts) == len(refs) - 1
                        and all(c is not None and np.all(np.asarray(c) != 0) for c in consts)):
                    todo.append(node.name)
                else:
                    found.append((node.name, node.op))
        return tuple(found)

    def _rule(self, ctx: OpContext) -> LayerBound:
        rule = _OP_RULES.get(ctx.op_type)
        if rule is None and ctx.op_type in _CONTROL_FLOW:
            raise UnsupportedOpError(
                ctx.op_type, ctx.name,
                "It is control flow (a tf.cond, tf.case or Python `if` on a tensor that the "
                "graph kept): branches are not analysed in graphs, and a rule for the op would "
                "not describe them. Use tf.where with a constant mask or a function without "
                "the branch, or analyse the .keras file.")
        if rule is None:
            raise UnsupportedOpError(ctx.op_type, ctx.name)
        bound = rule(ctx)
        if not isinstance(bound, (Linear, Constant, Merge)):
            raise LipschitzError(
                f"The rule of op type '{ctx.op_type}' returned {bound!r}; a rule must return "
                "tfl.rules.Linear, Constant or Merge."
            )
        return bound

    # -- activations built from several ops (gelu, silu, mish...) -----------------------------

    def _find_regions(self, live: Sequence[str], display: dict[str, str]
                      ) -> dict[str, "_Region"]:
        """Elementwise functions built from several ops, bounded as a whole.

        - Products ``a·b`` whose operands are elementwise functions of one tensor. For each
          such product ``m`` (outermost first), the nearest tensor ``s`` through which every
          dependent path into ``m`` passes is found by expanding, through elementwise ops, the
          open tensor latest in topological order until one remains. The sub-graph from ``s``
          to ``m`` computes ``φ(s)`` for a scalar function φ (all its constants are scalars);
          φ is recognised by its structure (:meth:`_match`), never by its values: a function
          equal to silu within 1e-4 on a grid can have twice silu's slope between the points.
        - Sums and quotients that are PReLU (:meth:`_prelu`), celu (:meth:`_celu`) or
          squareplus (:meth:`_squareplus`), read op by op with their parameters.
        - Square roots of sums of squares, Euclidean norms (:meth:`_euclidean_norm`),
          magnitudes of complex numbers made from real tensors (:meth:`_complex_magnitude`),
          and the fused ``EuclideanNorm`` (:meth:`_fused_euclidean_norm`).

        A member whose value is also read outside the region stays a node of its own (with its
        own rule), and so do the members it reads.
        """
        position = {n: i for i, n in enumerate(self.order)}
        consumers: dict[str, set[str]] = {}
        for name in live:
            for ref in _data_inputs(self.nodes[name]):
                consumers.setdefault(_split(self.resolve(ref))[0], set()).add(name)
        for ref in self.outputs:
            consumers.setdefault(_split(self.resolve(ref))[0], set()).add("<output>")

        def inside(name: str, members: set[str]) -> set[str]:
            keep = set(members)
            while True:
                drop = {m for m in keep if not consumers.get(m, set()) <= keep | {name}}
                if not drop:
                    return keep
                keep -= drop

        regions: dict[str, _Region] = {}
        self.unmatched: dict[str, str] = {}
        absorbed: set[str] = set()
        for name in reversed(live):
            node = self.nodes[name]
            if name in absorbed:
                continue
            found = None
            if node.op in ("AddV2", "Add"):
                found = self._prelu(name) or self._celu(name)
            elif node.op in ("RealDiv", "Mul"):
                found = self._squareplus(name)
            elif node.op == "Sqrt":
                found = self._euclidean_norm(name, display)
            elif node.op == "ComplexAbs":
                found = self._complex_magnitude(name, display)
            elif node.op == "EuclideanNorm":
                found = self._fused_euclidean_norm(name, display)
            if found is not None:
                region = dataclasses.replace(found, members=inside(name, found.members))
                regions[name] = region
                absorbed |= region.members
                continue
            if node.op != "Mul":
                continue
            refs = [self.resolve(r) for r in _data_inputs(node)]
            if sum(self.is_dependent(r) for r in refs) < 2:
                continue
            expanded = self._expand(refs, position)
            if expanded is None:
                continue
            source, members = expanded
            if self._shape(source) != self._shape(f"{name}:0"):
                continue
            match = self._match(source, members | {name}, f"{name}:0")
            if match is None:
                self.unmatched[name] = source.split(":")[0]
                continue
            info, formula = match
            label = f"{formula}: {info.name}" if formula else info.name
            bound = Constant(info.lipschitz, certified=info.certified,
                             note=f"{label} (recognised from {len(members) + 1} ops)",
                             activation=info)
            regions[name] = _Region((source,), inside(name, members), bound)
            absorbed |= regions[name].members
        return regions

    def _expand(self, refs, position):
        open_refs = {r for r in refs if self.is_dependent(r)}
        members: set[str] = set()
        while len(open_refs) > 1:
            ref = max(open_refs, key=lambda r: position[_split(r)[0]])
            src = _split(ref)[0]
            node = self.nodes[src]
            if node.op not in _ELEMENTWISE or src in {r.split(":")[0] for r in self.inputs}:
                return None
            ins = [self.resolve(r) for r in _data_inputs(node)]
            for r in ins:
                if not self.is_dependent(r) and self.values[r].size != 1:
                    return None
            open_refs.remove(ref)
            open_refs |= {r for r in ins if self.is_dependent(r)}
            members.add(src)
            if len(members) > 64:
                return None
        if not open_refs:
            return None
        return next(iter(open_refs)), members

    def _match(self, source: str, members: set[str], output: str
               ) -> tuple[Activation, str] | None:
        """The activation computed by the sub-graph ``members`` from ``source`` to ``output``.

        Structural, hence exact: the sub-graph must be op for op, constant for constant (same
        dtype, same bits), the sub-graph that one of the :data:`_COMPOSITE` functions builds in
        this TensorFlow/Keras version (operands of commutative ops in any order), or
        ``x·σ(βx)`` for a finite constant β (:meth:`_swish_beta`). Any other function, however
        close in value, is not recognised.

        Returns:
            ``(activation, formula)`` (``formula`` is ``""`` or e.g. ``"x·σ(1.702·x)"``), or
            ``None``.
        """
        form = self.form(output, source, members)
        if form is None:
            return None
        known = _reference_forms(self._dtype(source)).get(form)
        if known is not None:
            name, params = known
            return activation_info(name, **dict(params)), ""
        beta = self._swish_beta(output, source)
        if beta is None:
            return None
        formula = "x·σ(x)" if beta == 1.0 else f"x·σ({beta:.6g}·x)"
        return activation_info("silu"), formula

    def form(self, output: str, source: str, members: set[str]) -> int | None:
        """An id of the structure of the sub-graph ``members`` computing ``output`` from ``source``.

        Two sub-graphs (of any graphs) get the same id when they apply the same ops, with the
        same attributes, to the same operands (in any order for commutative ops), and their
        constants have the same dtype and value bit for bit: they compute the same function of
        their source. ``None`` when the sub-graph reads a non-scalar constant or an
        input-dependent tensor other than ``source`` outside ``members``.
        """
        memo: dict[str, int | None] = {}

        def form_of(ref: str) -> int | None:
            if ref in memo:
                return memo[ref]
            node_name, index = _split(ref)
            key: tuple | None = None
            if ref == source:
                key = ("source",)
            elif not self.is_dependent(ref):
                value = np.asarray(self.values[ref])
                if value.size == 1:
                    key = ("const", value.dtype.name, value.tobytes())
            elif node_name in members:
                node = self.nodes[node_name]
                operands = [form_of(self.resolve(r)) for r in _data_inputs(node)]
                if None not in operands:
                    if node.op in _COMMUTATIVE:
                        operands.sort()
                    key = (node.op, index, _attr_key(node), tuple(operands))
            memo[ref] = None if key is None else _FORM_IDS.setdefault(key, len(_FORM_IDS))
            return memo[ref]

        return form_of(output)

    def _node_of(self, ref: str):
        """The node whose first output is ``ref`` (``None`` for another output)."""
        name, index = _split(ref)
        return self.nodes[name] if index == 0 else None

    def _operands(self, node) -> list[str]:
        """The resolved data inputs of ``node``."""
        return [self.resolve(r) for r in _data_inputs(node)]

    def _prelu(self, name: str) -> "_Region | None":
        """The region of the sum ``name`` when it is ``relu(s) + c·relu(−s)``.

        That is Keras' PReLU (``relu(x) − α·relu(−x)``, ``c = −α`` a constant broadcast over
        ``s``): slope 1 where ``s > 0`` and ``α`` where ``s < 0``, entry by entry, so its
        constant is ``max(1, max|α|)`` and its slopes lie in ``[min(1, min α), max(1, max α)]``,
        as for the layer. The two branches bounded apart would give ``1 + max|α|``.
        """
        refs = self._operands(self.nodes[name])
        out = f"{name}:0"
        if len(refs) != 2 or not all(self.is_dependent(r) for r in refs):
            return None
        for first, second in (refs, refs[::-1]):
            relu, product = self._node_of(first), self._node_of(second)
            if relu is None or product is None or relu.op != "Relu" or product.op != "Mul":
                continue
            (source,) = self._operands(relu)
            pair = self._operands(product)
            if self._shape(source) != self._shape(out) or sum(map(self.is_dependent, pair)) != 1:
                continue
            inner_ref = pair[0] if self.is_dependent(pair[0]) else pair[1]
            scale_ref = pair[1] if inner_ref == pair[0] else pair[0]
            inner = self._node_of(inner_ref)
            negation = self._node_of(self._operands(inner)[0]) if inner is not None \
                and inner.op == "Relu" else None
            if negation is None or negation.op != "Neg" or self._operands(negation) != [source]:
                continue
            alpha = -np.asarray(self.values[scale_ref], dtype=np.float64)
            if np.broadcast_shapes(alpha.shape, self._shape(source)) != self._shape(source) \
                    or not np.all(np.isfinite(alpha)):
                continue
            value = float(max(1.0, np.abs(alpha).max()))
            slopes = (float(min(1.0, alpha.min())), float(max(1.0, alpha.max())))
            bound = Constant(value, note="prelu: relu(x) − α·relu(−x), max(1, |α|) (recognised "
                                         "from 5 ops)",
                             activation=Activation("prelu", value, slopes))
            return _Region((source,), {relu.name, product.name, inner.name, negation.name},
                           bound)
        return None

    def _scalar(self, ref: str) -> float | None:
        """The value of ``ref`` when it is a constant of one entry, else ``None``."""
        if self.is_dependent(ref) or np.size(self.values[ref]) != 1:
            return None
        return float(np.asarray(self.values[ref], dtype="float64").ravel()[0])

    def _with_scalar(self, node, ordered: bool = False) -> tuple[str, float] | None:
        """``(x, c)`` when ``node`` reads an input-dependent tensor ``x`` and a constant ``c``
        of one entry (in that order when ``ordered``: ``x / c``, not ``c / x``)."""
        pair = self._operands(node)
        if len(pair) != 2:
            return None
        for x, c in (pair,) if ordered else (pair, pair[::-1]):
            value = self._scalar(c)
            if self.is_dependent(x) and value is not None:
                return x, value
        return None

    def _celu(self, name: str) -> "_Region | None":
        """The region of the sum ``name`` when it is Keras' celu of a tensor ``s``.

        Keras (TensorFlow backend) computes ``celu(s) = max(s, 0) + α·expm1(min(s, 0)/α)``: the
        same constant ``α`` in the product and the division, and ``α > 0``. Its slope is 1
        where ``s > 0`` and ``e^(s/α) ∈ (0, 1)`` where ``s < 0``: 1-Lipschitz, slopes in
        ``[0, 1]``, as for the Keras activation. Near misses are not recognised: with
        ``c·expm1(min(s, 0)/α)`` the slope reaches ``c/α``, and with ``α < 0`` it is unbounded.
        """
        node_of, operands = self._node_of, self._operands
        refs = operands(self.nodes[name])
        if len(refs) != 2:
            return None
        for first, second in (refs, refs[::-1]):
            top, scaled = node_of(first), node_of(second)
            if top is None or scaled is None or top.op != "Maximum" or scaled.op != "Mul":
                continue
            hinge, outer = self._with_scalar(top), self._with_scalar(scaled)
            if hinge is None or outer is None or hinge[1] != 0.0:
                continue
            source, alpha = hinge[0], outer[1]
            expm1 = node_of(outer[0])
            division = node_of(operands(expm1)[0]) if expm1 is not None \
                and expm1.op == "Expm1" else None
            inner = self._with_scalar(division, ordered=True) if division is not None \
                and division.op == "RealDiv" else None
            low = node_of(inner[0]) if inner is not None else None
            if low is None or low.op != "Minimum" or self._with_scalar(low) != (source, 0.0) \
                    or inner[1] != alpha or not (math.isfinite(alpha) and alpha > 0) \
                    or self._shape(source) != self._shape(f"{name}:0"):
                continue
            return _keras_activation_region(
                "celu", f"celu max(x, 0) + α·expm1(min(x, 0)/α), α = {alpha:.6g}", source,
                {top.name, scaled.name, expm1.name, division.name, low.name})
        return None

    def _squareplus(self, name: str) -> "_Region | None":
        """The region of ``name`` when it is Keras' squareplus of a tensor ``s``.

        Keras computes ``squareplus(s) = (s + √(s² + b)) / 2`` (the division may also be a
        product by 0.5) with a constant ``b ≥ 0``. Its slope ``(1 + s/√(s² + b))/2`` lies in
        ``[0, 1]`` (``b = 0`` is relu): 1-Lipschitz, as for the Keras activation. A negative
        ``b`` (undefined near 0) or another factor is not recognised.
        """
        node_of, operands = self._node_of, self._operands
        node = self.nodes[name]
        half = self._with_scalar(node, ordered=node.op == "RealDiv")
        if half is None or half[1] != (2.0 if node.op == "RealDiv" else 0.5):
            return None
        total = node_of(half[0])
        if total is None or total.op not in ("AddV2", "Add") or len(operands(total)) != 2:
            return None
        pair = operands(total)
        for source, other in (pair, pair[::-1]):
            root = node_of(other)
            inner = node_of(operands(root)[0]) if root is not None and root.op == "Sqrt" \
                else None
            shifted = self._with_scalar(inner) if inner is not None \
                and inner.op in ("AddV2", "Add") else None
            square = node_of(shifted[0]) if shifted is not None else None
            if square is None or square.op != "Square" or operands(square) != [source] \
                    or not (math.isfinite(shifted[1]) and shifted[1] >= 0) \
                    or self._shape(source) != self._shape(f"{name}:0"):
                continue
            return _keras_activation_region(
                "squareplus", f"squareplus (x + √(x² + b))/2, b = {shifted[1]:.6g}", source,
                {total.name, root.name, inner.name, square.name})
        return None

    def _euclidean_norm(self, name: str, display: dict[str, str]) -> "_Region | None":
        """The region of the square root ``name`` when it is a Euclidean norm of its terms.

        Recognised: ``√S``, ``√(S + c)`` and ``√max(S, c)`` with a constant ``c ≥ 0`` that
        does not broadcast ``S``, where ``S`` is a sum of squares (:meth:`_squares`): the
        squares ``a²`` (``Square``, or ``Mul`` of a tensor by itself) of terms ``a₁ … a_k``,
        added without broadcasting (``AddV2``, ``AddN``) and summed over axes (``Sum``).
        Each output entry ``y_o`` is then ``‖v_o‖`` lifted by ``c_o`` (``√(‖v‖² + c)`` or
        ``max(‖v‖, √c)``, both 1-Lipschitz in ``v``), where ``v_o`` gathers the entries of the
        terms that the sums send to ``o``, and each entry of each term goes to one ``o``. So
        ``‖Δy‖² ≤ Σ_o ‖Δv_o‖² = Σ_j ‖Δa_j‖²``: ``y`` is 1-Lipschitz in the stacked terms
        (a term squared twice counts twice).

        One term: the bound 1. Several that are linear functions (ops with
        :class:`~tf_lipschitz.rules.Linear` rules, :meth:`_stacked_terms`) of one tensor
        ``s`` (the real and imaginary parts of an STFT): a node stacking them, ``Bs``, whose
        norm is measured, then the bound 1, so the region is ``‖B‖``-Lipschitz in ``s``.
        Otherwise ``√(Σ_j L_j²)`` from the terms' constants
        (:meth:`~tf_lipschitz.rules.Merge.l2`), valid when they depend on one input too, since
        ``Σ_j ‖Δa_j‖² ≤ Σ_j L_j² ‖Δx‖²``.

        ``√(a² − b²)``, a negative ``c``, ``Rsqrt``, a square read elsewhere (which keeps its
        own rule) are not recognised, and are refused as before.
        """
        (inner,) = self._operands(self.nodes[name])
        members: set[str] = set()
        node = self._node_of(inner)
        lift = ""
        if node is not None and node.op in ("Maximum", "AddV2", "Add"):
            refs = self._operands(node)
            dependent = [r for r in refs if self.is_dependent(r)]
            if len(refs) == 2 and len(dependent) == 1:
                floor = np.asarray(self.values[refs[1 - refs.index(dependent[0])]], np.float64)
                if not (floor.size and np.all(np.isfinite(floor)) and np.all(floor >= 0)) \
                        or self._shape(dependent[0]) != self._shape(inner):
                    return None
                members.add(node.name)
                inner = dependent[0]
                lift = " + c" if node.op != "Maximum" else ", max with c"
        terms = self._squares(inner, members)
        if terms is None:
            return None
        return self._norm_region(terms, members, f"√(Σ squares{lift})", display)

    def _complex_magnitude(self, name: str, display: dict[str, str]) -> "_Region | None":
        """The region of ``ComplexAbs`` ``name`` when it reads ``Complex(re, im)``: ``|re + i·im|
        = √(re² + im²)``, a Euclidean norm of the input-dependent parts (a constant part ``c``
        lifts it as ``√(· + c²)``), as in :meth:`_euclidean_norm`."""
        (inner,) = self._operands(self.nodes[name])
        node = self._node_of(inner)
        if node is None or node.op != "Complex":
            return None
        terms = [r for r in self._operands(node) if self.is_dependent(r)]
        if not terms or any(self._shape(t) != self._shape(inner) for t in terms):
            return None
        return self._norm_region(terms, {node.name}, "|re + i·im|", display)

    def _fused_euclidean_norm(self, name: str, display: dict[str, str]) -> "_Region | None":
        """The region of ``EuclideanNorm`` ``name`` (``tf.math.reduce_euclidean_norm(x, axis,
        keepdims)``): a Euclidean norm of its one term ``x``, as in :meth:`_euclidean_norm`.

        The op computes ``y_o = ‖x_{S_o}‖`` for the groups ``S_o`` of entries of ``x`` that
        agree off the reduced axes (``keep_dims`` only reshapes ``y``). The groups are
        disjoint, so ``‖Δy‖² ≤ Σ_o ‖Δx_{S_o}‖² ≤ ‖Δx‖²``: 1-Lipschitz, and exactly 1 (along
        one group). With no axes, or axes of size 1 only, TensorFlow returns ``|x|``:
        1-Lipschitz too. A linear map before the op (``x @ W``) is a node of its own, fused
        with the linear ops before it (``‖W‖``), as the one term of a ``√(Σ squares)``. Axes
        with the batch axis mix the examples: the witness (:func:`_structured_witness`)
        reduces over the same axes, and the graph is refused. The axes are read as the
        constant they must be, normalised for the note.

        Raises:
            UnsupportedOpError: The axes depend on the input, or ``x`` is complex (the norm
                is then complex-typed).
            NotLipschitzError: ``x`` has an integer dtype (the norm is rounded); the cast
                to integers that made it would be refused too, later in the walk.
        """
        node = self.nodes[name]
        data, axis = self._operands(node)
        if self.is_dependent(axis):
            raise UnsupportedOpError(
                node.op, display[name],
                "Its axes depend on the input: which entries are reduced together changes "
                "with the input, a jump that no constant bounds. Reduce over constant axes "
                "(tf.math.reduce_euclidean_norm(x, axis=-1)).")
        dtype = self._dtype(data)
        if dtype.is_complex:
            raise UnsupportedOpError(
                node.op, display[name],
                f"It reduces a {dtype.name} tensor: complex values are not analysed, and its "
                "norm is complex-typed; tf_lipschitz bounds real-valued functions. Take the "
                "norm of the real parts it is made from: over an axis a ≥ 0 of "
                "tf.complex(re, im), tf.math.reduce_euclidean_norm(tf.stack([re, im], -1), "
                "[a, -1]); entrywise, tf.abs(tf.complex(re, im)).")
        if dtype not in _FLOAT_DTYPES:  # made by a cast to integers (refused too)
            raise NotLipschitzError(
                _op_class(node.op)(display[name], None),
                f"the norm of an integer tensor ({dtype.name}) is rounded to an integer, a "
                "step function. Take the norm of the floating-point tensor before the cast.")
        rank = len(self._shape(data))
        axes = sorted({int(a) % rank for a in np.ravel(self.values[axis])})
        form = (f"over axes {axes}" if axes else "over no axes (|x|)") \
            + (", keep_dims" if node.attr["keep_dims"].b else "") + " (EuclideanNorm)"
        return self._norm_region([data], set(), form, display)

    def _norm_region(self, terms: list[str], members: set[str], form: str,
                     display: dict[str, str]) -> "_Region":
        """The region of a Euclidean norm of ``terms`` (see :meth:`_euclidean_norm`)."""
        note = (f"Euclidean norm {form} of {len(terms)} term(s): 1-Lipschitz in the stacked "
                f"terms (recognised from {len(members) + 1} ops)")
        if len(terms) == 1:
            return _Region((terms[0],), members, Constant(1.0, note=note))
        stacked = self._stacked_terms(terms, display)
        if stacked is not None:
            source, path, linear, shape = stacked
            return _Region((source,), members | path, Constant(1.0, note=note), (linear, shape))
        return _Region(tuple(terms), members, Merge.l2(f"{note}; √(Σ L²) over the terms"))

    def _squares(self, ref: str, members: set[str]) -> list[str] | None:
        """The terms ``a_j`` when ``ref`` is a sum of their squares, else ``None``; the ops
        are added to ``members``. The grammar: ``Square(a)``, ``Mul(a, a)``, ``AddV2``/``AddN``
        of sums of squares of the output's shape (no broadcasting), ``Sum`` of a sum of
        squares over constant axes."""
        node = self._node_of(ref)
        if node is None or not self.is_dependent(ref):
            return None
        refs = self._operands(node)
        if node.op == "Square" or (node.op == "Mul" and len(refs) == 2 and refs[0] == refs[1]):
            terms = [refs[0]]
        elif node.op in ("AddV2", "Add", "AddN"):
            if not all(self.is_dependent(r) and self._shape(r) == self._shape(ref)
                       for r in refs):
                return None
            terms = []
            for r in refs:
                more = self._squares(r, members)
                if more is None:
                    return None
                terms += more
        elif node.op == "Sum" and len(refs) == 2 and not self.is_dependent(refs[1]):
            terms = self._squares(refs[0], members)
            if terms is None:
                return None
        else:
            return None
        members.add(node.name)
        return terms

    def _stacked_terms(self, terms: Sequence[str], display: dict[str, str]
                       ) -> tuple[str, set[str], Linear, tuple[int, ...]] | None:
        """The terms as one linear map of a tensor ``s``: ``(s, ops, linear, shape)``.

        Each term is followed down its chain of ops with one input-dependent operand to the
        nearest tensor ``s`` on every chain; every op between must have a
        :class:`~tf_lipschitz.rules.Linear` rule (run here, as in the walk). ``linear`` maps
        ``s`` to the terms (their linear parts: biases and offsets set to zero), flattened and
        concatenated in the order of ``terms`` (repeats included), a vector of ``shape``.
        ``None`` when no such ``s`` or op is found.
        """
        chains = []
        for term in dict.fromkeys(terms):
            chain = [term]
            while len(chain) <= 64:
                node = self._node_of(chain[-1])
                dependent = [] if node is None else [r for r in self._operands(node)
                                                     if self.is_dependent(r)]
                if len(dependent) != 1:
                    break
                chain.append(dependent[0])
            chains.append(chain)
        source = next((r for r in chains[0] if all(r in c for c in chains[1:])), None)
        if source is None:
            return None
        maps: dict[str, list[Callable]] = {}
        path: set[str] = set()
        for chain in chains:
            fns = []
            for ref in reversed(chain[:chain.index(source)]):
                node_def = self.nodes[_split(ref)[0]]
                try:
                    ctx = self._context(node_def, display[node_def.name])
                    bound = self._rule(ctx)
                except LipschitzError:
                    return None
                if not isinstance(bound, Linear) or bound.activation is not None:
                    return None
                self.offsets[node_def.name] = ctx.offsets
                fns.append(bound.fn)
                path.add(node_def.name)
            maps[chain[0]] = fns
        sizes = [math.prod(_example_shape(self._shape(t))) for t in terms]
        sequence = [maps[t] for t in terms]

        def fn(x):
            parts = []
            for fns, size in zip(sequence, sizes):
                y = x
                for f in fns:
                    y = f(y)
                parts.append(tf.cast(tf.reshape(y, (-1, size)), x.dtype))
            return tf.concat(parts, axis=1)

        linear = Linear(_eager_safe(fn), note=f"{len(terms)} terms, linear in one tensor, "
                                              "stacked")
        return source, path, linear, (sum(sizes),)

    def _swish_beta(self, output: str, source: str) -> float | None:
        """β when ``output`` is ``x·σ(x)``, ``x·σ(c·x)`` or ``x·σ(x/c)`` of ``x = source``.

        ``x ↦ x·σ(βx)`` has derivative ``g(βx)`` with ``g(u) = σ(u) + u·σ'(u)`` for every β
        (``tf.nn.silu(x, beta)``, the quick-gelu ``x·σ(1.702x)``), and ``g`` ranges in
        ``[-0.0998, 1.0998]``: silu's constant holds for every finite constant β.
        """
        node_of, operands = self._node_of, self._operands
        product = node_of(output)
        if product is None or product.op != "Mul" or source not in operands(product):
            return None
        pair = operands(product)
        gate = node_of(pair[1 - pair.index(source)])
        if gate is None or gate.op != "Sigmoid" or not self.is_dependent(gate.name):
            return None
        (argument,) = operands(gate)
        if argument == source:
            return 1.0
        scaling = node_of(argument)
        if scaling is None or scaling.op not in ("Mul", "RealDiv"):
            return None
        pair = operands(scaling)
        if source not in pair or (scaling.op == "RealDiv" and pair[0] != source):
            return None
        other = pair[1 - pair.index(source)]
        if self.is_dependent(other) or np.size(self.values[other]) != 1:
            return None
        value = float(np.asarray(self.values[other], dtype="float64").ravel()[0])
        with np.errstate(divide="ignore"):
            beta = value if scaling.op == "Mul" else float(np.float64(1.0) / value)
        return beta if math.isfinite(beta) else None


def _is_shape_list(value) -> bool:
    return bool(value) and isinstance(value[0], (list, tuple))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_specs(input_signature) -> list[tf.TensorSpec]:
    if isinstance(input_signature, tf.TensorSpec):
        return [input_signature]
    specs = list(input_signature)
    for spec in specs:
        if not isinstance(spec, tf.TensorSpec):
            raise InvalidArgumentError(
                "input_signature must be a tf.TensorSpec or a list of them, one per positional "
                f"argument; received {spec!r}."
            )
    return specs


def _concrete(fn, input_signature) -> _Signature:
    """A :class:`_Signature` from a concrete function, a ``tf.function`` or a callable."""
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None) or type(fn).__name__
    if isinstance(fn, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"Expected a function or a concrete function, not a path ({os.fspath(fn)!r}); for a "
            "SavedModel "
            "directory use tfl.GraphEstimator.from_saved_model(path) or "
            "tfl.autolip_saved_model(path).")
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        if input_signature is not None:
            raise InvalidArgumentError(
                f"A concrete function already has its signature; pass input_signature=None "
                f"(received input_signature={input_signature!r}).")
        concrete = fn
    else:
        if input_signature is None:
            if isinstance(fn, tf.types.experimental.PolymorphicFunction):
                try:
                    concrete = fn.get_concrete_function()
                except (TypeError, ValueError) as exc:
                    raise InvalidArgumentError(
                        f"'{name}' has no input_signature of its own; pass "
                        "input_signature=[tf.TensorSpec(shape, dtype), ...]."
                    ) from exc
            else:
                raise InvalidArgumentError(
                    f"input_signature is required for the Python callable '{name}', e.g. "
                    "[tf.TensorSpec([None, 28, 28, 1], tf.float32)]."
                )
        else:
            specs = _as_specs(input_signature)
            if not isinstance(fn, tf.types.experimental.PolymorphicFunction):
                fn = tf.function(fn, autograph=False)
            with _keras_name_scopes_restored():
                concrete = fn.get_concrete_function(*specs)
    structured = concrete.structured_input_signature
    input_names = []
    if structured is not None:
        args, kwargs = structured
        flat = tf.nest.flatten(args) + [kwargs[k] for k in sorted(kwargs)]
        input_names = [getattr(s, "name", None) or f"input_{i}" for i, s in enumerate(flat)]
    outputs = concrete.structured_outputs
    # Frozen functions keep the flattened output order, which sorts dictionary keys.
    output_names = sorted(outputs) if isinstance(outputs, dict) else []
    if isinstance(name, bytes):  # a concrete function's name
        name = name.decode()
    return _Signature(concrete, input_names, output_names, str(name))


@contextlib.contextmanager
def _keras_name_scopes_restored():
    """Leaves Keras' name-scope stack as it was, even when tracing a Keras call fails.

    A Keras model whose call raises while it is traced (an input shape it rejects) can leave
    its name scope on Keras' global stack, and every variable created afterwards in the process
    is then named under it (``"my_model/dense/kernel"``).
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - another Keras layout: nothing to restore
        yield
        return
    stack = global_state.get_global_attribute("name_scope_stack")
    depth = len(stack) if stack else 0
    try:
        yield
    finally:
        stack = global_state.get_global_attribute("name_scope_stack")
        if stack is not None and len(stack) > depth:
            del stack[depth:]


def load_signature(path: str, signature: str | None = None) -> tuple[Any, str, Any]:
    """Loads a SavedModel; returns ``(concrete_function, signature_key, loaded_object)``.

    Raises:
        SavedModelNotFoundError: If ``path`` is not a SavedModel directory (an
            :class:`~tf_lipschitz.errors.InvalidArgumentError` and a ``FileNotFoundError``).
        SavedModelReadError: If the SavedModel cannot be read (a ``LipschitzError`` and an
            ``OSError``).
        SignatureNotFoundError: If the signature does not exist (the message lists the
            available ones; an ``InvalidArgumentError`` and a ``KeyError``).
    """
    if not os.path.isdir(path) or not any(
        os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")
    ):
        raise SavedModelNotFoundError(
            f"path={path!r} is not a SavedModel directory (no saved_model.pb); pass the "
            "directory written by model.export() or tf.saved_model.save().")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable model
        raise SavedModelReadError(
            f"Could not read the SavedModel '{path}': {first_line(exc)}") from exc
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if signature is None:
        if "serving_default" in signatures:
            signature = "serving_default"
        elif len(signatures) == 1:
            signature = next(iter(signatures))
        else:
            raise SignatureNotFoundError(
                f"SavedModel '{path}' has {len(signatures)} signatures "
                f"({', '.join(sorted(signatures)) or 'none'}); choose one by name with "
                "signature=..."
            )
    if signature in signatures:
        return signatures[signature], signature, loaded
    attr = getattr(loaded, signature, None)
    concretes = list(getattr(attr, "concrete_functions", None) or [])
    if len(concretes) == 1:
        return concretes[0], signature, loaded
    raise SignatureNotFoundError(
        f"SavedModel '{path}' has no signature '{signature}'; available signatures: "
        f"{', '.join(sorted(signatures)) or 'none'}."
    )


class GraphEstimator:
    """Bounds the ℓ2 Lipschitz constant of a TensorFlow function from its graph.

    The function is traced (if needed), inlined and frozen into a ``GraphDef``, and read into
    the core graph representation once; one compiled spectral solver then serves every
    :meth:`autolip` call. See the module docstring for the op rules.

    Args:
        fn: A ``tf.function``, a concrete function (e.g. a SavedModel signature), or a Python
            callable of tensors (traced with ``input_signature``).
        input_signature: ``tf.TensorSpec`` (or a list of them, one per positional argument);
            not needed for concrete functions and ``tf.function``\\ s with their own signature.
        input_shape: Shape of one example, or of a batch of one (needed for unknown spatial
            dimensions); a list of shapes for several inputs.
        solver: ``"lanczos"`` (default) or ``"power"``.
        tol: Relative tolerance of the spectral solver.
        max_products: Cap on operator products per fused linear operator.
        name: Name shown in reports.
        verbose: 1 shows a progress bar while reading large graphs.
        seed: Seed of the sample input used to evaluate constants.

    Example:
        >>> import tensorflow as tf, tf_lipschitz as tfl
        >>> f = tf.function(lambda x: 2.0 * tf.nn.tanh(x))
        >>> est = tfl.GraphEstimator(f, tf.TensorSpec([None, 3]))
        >>> round(est.autolip().upper, 5)
        2.0
    """

    def __init__(self, fn, input_signature=None, *, input_shape=None, solver: str = "lanczos",
                 tol: float = 1e-6, max_products: int = 2000, name: str | None = None,
                 verbose: int = 0, seed: int = 0, _signature_name: str | None = None,
                 _owner: Any = None):
        solver, tol, max_products = check_solver_arguments(solver, tol, max_products,
                                                           method_name="solver")
        signature = _concrete(fn, input_signature)
        self.name = name or signature.name
        self.signature = _signature_name
        if _signature_name is not None:  # messages name the SavedModel and its signature, not
            # the function TensorFlow wraps it in (__inference_signature_wrapper_…)
            signature = dataclasses.replace(signature, name=f"{self.name}:{_signature_name}")
        reader = _GraphReader(signature, input_shape, seed=seed, progress=verbose)
        self.graph: ModelGraph = reader.build()
        self._reader = reader
        self._autolip = AutoLip(self.graph, method=solver, tol=tol, max_products=max_products)
        first = self.graph.nodes[self.graph.inputs[0]]
        self.input_shape = first.output_shapes[0]
        self.dtype = first.dtype
        self.op_count = len(reader.graph_def.node)
        self._owner = _owner  # keeps a loaded SavedModel (and its variables) alive

    @property
    def engine(self) -> AutoLip:
        """The :class:`~tf_lipschitz.autolip.AutoLip` engine: fused groups and their operators."""
        return self._autolip

    @classmethod
    def from_saved_model(cls, path: str, signature: str | None = None, **kwargs
                         ) -> "GraphEstimator":
        """Analyses a signature of a SavedModel directory.

        Args:
            path: The SavedModel directory.
            signature: Signature key (default ``"serving_default"`` or the only one).
            **kwargs: Passed to :class:`GraphEstimator` (``input_shape``, ``tol``...).

        Raises:
            InvalidArgumentError: For a ``path`` that is not a SavedModel, an unknown
                ``signature`` or keyword (see :func:`load_signature`).
        """
        check_keywords(kwargs, _estimator_keywords(("fn", "input_signature")),
                       "GraphEstimator.from_saved_model()")
        fn, key, loaded = load_signature(path, signature)
        kwargs.setdefault("name", os.path.basename(os.path.normpath(path)))
        return cls(fn, _signature_name=key, _owner=loaded, **kwargs)

    def autolip(self, *, certified: bool = False, init: Any = "warm",
                verbose: int = 0) -> LipschitzReport:
        """AutoLip on the graph (method ``"autolip-graph"``).

        Args:
            certified: Use the closed-form certified norms where they exist; the report is
                certified only when every factor is.
            init: Starting vectors of the solver (``"warm"``, ``None`` or arrays).
            verbose: 1 shows a progress bar over the certificates (certified mode).

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport`.
        """
        report = self._autolip.run(certified=certified, init=init, model_name=self.name,
                                   verbose=verbose)
        settings = dict(report.settings, analysis="tf-graph", graph_ops=self.op_count)
        if self._reader.skipped_outputs:
            settings["skipped_outputs"] = list(self._reader.skipped_outputs)
        if self.signature is not None:
            settings["signature"] = self.signature
        by_node = report.outputs
        outputs = {name: by_node[self.graph.nodes[o].name]
                   for o, name in zip(self.graph.outputs, self.graph.output_names)}
        return dataclasses.replace(report, method="autolip-graph", settings=settings,
                                   outputs=outputs)

    def model_function(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """The analysed (frozen) function on batches ``(n, *input_shape)``.

        Floating-point outputs are flattened and concatenated. Only for single-input
        functions; used by :meth:`lower_bound`.
        """
        if len(self.graph.inputs) != 1:
            raise LowerBoundError(f"'{self.name}' has {len(self.graph.inputs)} inputs; lower "
                                  "bounds support single-input functions.")
        reader = self._reader
        ref = reader.inputs[0]
        full = reader.input_full[ref]
        compute = reader.dtypes[ref]
        spec_shape = reader.frozen.inputs[0].shape
        batch_free = spec_shape.rank is not None and spec_shape.rank > 0 and spec_shape[0] is None
        outputs = [o for o in reader.outputs if reader.is_dependent(reader.resolve(o))]
        nodes = reader.ancestors(outputs)
        constants = {f"{n.name}:0": tf.constant(tf.make_ndarray(n.attr["value"].tensor))
                     for n in nodes if n.op == "Const"}
        work = _work_dtype(compute)

        def call(x, batch):
            values = _replay(nodes, {ref: tf.cast(x, compute), **constants}, _tensor_name)
            return tf.concat([tf.reshape(tf.cast(values[o], work), [batch, -1])
                              for o in outputs], axis=1)

        def batched(x):
            return call(tf.reshape(x, (-1, *full[1:])), tf.shape(x)[0])

        def per_example(x):
            return tf.map_fn(lambda e: call(tf.reshape(e, full), 1)[0], x)

        return _eager_safe(batched if batch_free else per_example)

    def lower_bound(self, x=None, **kwargs) -> LowerBound:
        """A proven lower bound: the largest Jacobian norm found by ascent over inputs.

        Args:
            x: Optional data batch used as starting points.
            **kwargs: See :func:`tf_lipschitz.lower.lower_bound`.
        """
        check_keywords(kwargs, keyword_names(_lower_bound, ("model", "input_shape", "x", "dtype")),
                       "GraphEstimator.lower_bound()")
        return _lower_bound(self.model_function(), self.input_shape, x, dtype=self.dtype,
                            **kwargs)


def _estimator_keywords(exclude: Sequence[str]) -> tuple[str, ...]:
    """Keywords a function forwarding to :class:`GraphEstimator` accepts."""
    return keyword_names(GraphEstimator.__init__, exclude)


def autolip_function(fn, input_signature=None, *, input_shape=None, certified: bool = False,
                     **kwargs) -> LipschitzReport:
    """AutoLip bound of any TensorFlow function, read from its graph.

    Args:
        fn: A ``tf.function``, concrete function or Python callable of tensors.
        input_signature: ``tf.TensorSpec`` or list of them (see :class:`GraphEstimator`).
        input_shape: Shape of one example when the signature has unknown dimensions.
        certified: Use closed-form certified norms where they exist.
        **kwargs: ``solver``, ``tol``, ``max_products``, ``name``, ``verbose``, ``seed``.

    Returns:
        A :class:`~tf_lipschitz.report.LipschitzReport` with method ``"autolip-graph"``.

    Raises:
        UnsupportedOpError: For an op without a rule (named with its node).
        NotLipschitzError: For products of input-dependent tensors and other non-Lipschitz ops.
        ModelNotBuiltError: For non-float inputs or unknown input dimensions.
        BatchMixingError: For a function whose outputs for one example depend on other
            examples of the batch (named with the op where they first interact).

    Example:
        >>> import tensorflow as tf, tf_lipschitz as tfl
        >>> q = tf.linalg.qr(tf.random.normal([4, 4]))[0]
        >>> rep = tfl.autolip_function(lambda x: 3.0 * tf.matmul(x, q),
        ...                            tf.TensorSpec([None, 4], tf.float32))
        >>> round(rep.upper, 4)
        3.0
    """
    check_keywords(kwargs, _estimator_keywords(("fn", "input_signature", "input_shape")),
                   "autolip_function()")
    est = GraphEstimator(fn, input_signature, input_shape=input_shape, **kwargs)
    return est.autolip(certified=certified)


def autolip_saved_model(path: str, signature: str | None = None, *, input_shape=None,
                        certified: bool = False, **kwargs) -> LipschitzReport:
    """AutoLip bound of a SavedModel signature (see :meth:`GraphEstimator.from_saved_model`)."""
    check_keywords(kwargs, _estimator_keywords(("fn", "input_signature", "input_shape")),
                   "autolip_saved_model()")
    est = GraphEstimator.from_saved_model(path, signature, input_shape=input_shape, **kwargs)
    return est.autolip(certified=certified)
