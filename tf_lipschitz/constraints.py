"""Weight constraints that cap the operator norm of a layer: ``SpectralNorm``, ``ConvOperatorNorm``.

A Keras constraint is applied by the optimizer after every update (``w ← constraint(w)``). These
constraints rescale the kernel so that the *operator* it defines has spectral norm at most
``max_value``:

    w ← w · min(1, max_value / σ̂(w)),

where ``σ̂`` comes from a power iteration on ``JᵀJ`` through the layer's linear map, run with the
core's loop (:mod:`tf_lipschitz.power`, Scaman & Virmaux 2018, Algorithm 2).

Design: persistent, warm-started vectors. Keras treats constraints as stateless callables, but
a power iteration needs a start vector. A fixed start with a few iterations would be
stateless but wrong: power iteration converges *from below*, so a short run from the same
start every step can stay well under ``σ`` forever, and the "constrained" kernel would keep a
norm above ``max_value``. Running to convergence every step is correct but costs tens to
hundreds of products per step for a convolution. Instead each constraint owns one small
non-trainable ``tf.Variable`` per constrained kernel (created on first use, mirrored under
``tf.distribute`` strategies). It belongs to the kernel *variable object*, not to its name: one
constraint shared by several models, or by a model rebuilt under the same name (a loop, a
re-run notebook cell), calibrates a new vector for each new kernel instead of warm-starting
from another kernel's (which left the "constrained" kernel 8 % above ``max_value``). A tensor
that is not a variable has no identity across calls, so it is measured from scratch (to
``tol``) at every call. The first call runs restarted Lanczos
from a fixed pseudo-random start until its residual is below ``tol``; every later call spends
``power_iterations`` operator products from the previous vector (one power step, or a short
Lanczos restart for ``power_iterations >= 2``, see :func:`track_top_vector`). The weights move
little between optimizer steps, so the vector stays nearly converged and ``σ̂`` tracks ``σ`` at
a few products per step (the warm-start scheme of Miyato et al., ICLR 2018). It lags when the
weights move fast (first epochs, large learning rates): ``power_iterations=4`` removes most of
that lag (measurements in ``docs/keras_integration.md``); :func:`apply_constraints` after
``fit`` converges every vector on the final weights and projects once more. The vectors are a
cache: they are not saved with the model, and a reloaded model re-converges on its first step.

``SpectralNorm`` treats a 2-D kernel as the matrix of a Dense layer. Do **not** use it for a
convolution: the norm of the reshaped kernel is not the convolution's operator norm (for a 3×3
convolution the gap can reach 3×, ``√(kh·kw)``). ``ConvOperatorNorm`` measures
the convolution itself on its real input shape, strides and padding.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops
# The convolution base classes (not exported by Keras) tell which kernel a ConvOperatorNorm
# must describe, for user subclasses of them too.
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

from tf_lipschitz.errors import InvalidArgumentError
from tf_lipschitz.power import (as_shape, check_int, check_tol, compiled, example_norms,
                                lanczos_loop, power_loop, prepare_operator)

__all__ = ["SpectralNorm", "ConvOperatorNorm", "apply_constraints", "check_conv_constraint",
           "track_top_vector"]

_START_SEED = (1805, 10965)  # arXiv 1805.10965: any fixed seed makes the first start reproducible


def track_top_vector(
    fn: Callable[[tf.Tensor], tf.Tensor],
    vector: tf.Tensor,
    *,
    iterations: int,
    calibrate: bool | tf.Tensor,
    tol: float = 1e-8,
    max_iterations: int = 1000,
    krylov_dim: int = 16,
) -> tf.Tensor:
    """Advances a warm-started iteration for the top right singular vector of a linear ``fn``.

    Graph-friendly (the branch is a ``tf.cond``). When ``calibrate`` is true, restarted
    Lanczos (:mod:`tf_lipschitz.power`) runs until its Ritz residual is at most ``tol`` (at
    most ``max_iterations`` products). Otherwise exactly ``iterations`` products are spent:
    ``1`` is one power-method step, ``k >= 2`` is one Lanczos restart over the Krylov space
    of dimension ``k`` (it contains the power iterates up to ``k − 1`` steps and maximises the
    Rayleigh quotient over them all, which helps most when the top singular values are close,
    as for convolutions on large inputs), ``0`` only normalises ``vector``. Each product is one
    forward and one backward pass of ``fn`` on a batch of one example
    (:func:`tf_lipschitz.power.jtj_product`). The iteration runs on the map as
    :func:`tf_lipschitz.power.prepare_operator` prepares it (half precision iterated in float32,
    divided by a power of two near its size), whose scale comes from the forward pass of the
    first product: no pass beyond the products.

    Args:
        fn: Linear map on batches ``(batch, *input_shape)``.
        vector: Current vector, shape ``(1, *input_shape)``, nonzero.
        iterations: Operator products per call once calibrated (a Python int).
        calibrate: Iterate to convergence instead (first call, or a fresh vector).
        tol: Relative tolerance of the calibrating iteration.
        max_iterations: Cap on products of the calibrating iteration.
        krylov_dim: Krylov basis size of the calibrating Lanczos restarts.

    Returns:
        The new unit vector (gradient stopped), shape ``(1, *input_shape)``.

    Example:
        >>> import tensorflow as tf
        >>> w = tf.constant([[3.0, 0.0], [0.0, 1.0]])
        >>> v = track_top_vector(lambda x: tf.matmul(x, w), tf.constant([[1.0, 1.0]]),
        ...                      iterations=1, calibrate=True)
        >>> round(float(tf.norm(tf.matmul(v, w))), 4)
        3.0
    """
    vector = tf.convert_to_tensor(vector)
    size = int(np.prod(vector.shape[1:]))
    iterations = check_int(iterations, "iterations", minimum=0)
    # A calibration starts from the vector plus a little of a fixed random one. On a
    # block-diagonal operator (depthwise and grouped convolutions) a block of the tracked vector
    # that decayed to exact zeros (quickly with half-precision products) stays zero under every
    # product, and a block that became the largest since would never be seen again: a wrapped
    # DepthwiseConv2D calibrated after mixed-precision training was 1.16× its target.
    if calibrate is True:
        vector = _with_random_part(vector)
    elif calibrate is not False:
        vector = tf.where(tf.convert_to_tensor(calibrate, tf.bool), _with_random_part(vector),
                          vector)

    # Every branch but a zero-step one starts with the product at the (unit) vector.
    prep = prepare_operator(fn, None, vector,
                            first_product=calibrate is not False or iterations > 0)
    fn, start, first = prep.fn, prep.start, prep.first

    def calibrated():
        m = int(min(krylov_dim, max(2, size)))
        # xla=True: the train step that applies a constraint may be XLA-compiled.
        v, _, _ = lanczos_loop(fn, start, tf.constant(float(tol), tf.float64),
                                tf.constant(int(max_iterations)), m, xla=True, first=first)
        return v

    def stepped():
        if iterations >= 2 and size >= 2:
            m = min(iterations, size)
            v, _, _ = lanczos_loop(fn, start, tf.constant(0.0, tf.float64), tf.constant(m), m,
                                    xla=True, first=first)
        else:
            v, _, _ = power_loop(fn, start, tf.constant(0.0, tf.float64),
                                  tf.constant(iterations), first=first)
        return v

    if isinstance(calibrate, bool):  # known when tracing: keep only the branch that runs
        v = calibrated() if calibrate else stepped()
    else:
        v = tf.cond(tf.convert_to_tensor(calibrate, tf.bool), calibrated, stepped)
    # Products that are not finite (inf/NaN weights) return a NaN vector: keep the previous one
    # rather than store NaN in the persistent state.
    v = tf.where(tf.reduce_all(tf.math.is_finite(v)), v, start)
    return tf.stop_gradient(tf.cast(v, vector.dtype))


def start_vector(shape, dtype) -> tf.Tensor:
    """A fixed-seed Gaussian vector: the deterministic start of the persistent iterations."""
    return tf.random.stateless_normal(shape, seed=_START_SEED, dtype=dtype)


_CONV_KINDS = ("conv", "depthwise", "transposed")


_RANDOM_PART = 0.01  # of a calibration's start (see track_top_vector)


def _with_random_part(vector: tf.Tensor) -> tf.Tensor:
    """``v/‖v‖ + 0.01·r/‖r‖`` for the fixed random ``r`` of :func:`start_vector` (computed in
    float32 at least, so that the random part is not lost in half precision)."""
    wide = tf.float32 if vector.dtype.size < 4 else vector.dtype
    v = tf.cast(vector, wide)
    r = start_vector(tf.shape(v), wide)
    mixed = v / tf.maximum(tf.norm(v), 1e-30) + _RANDOM_PART * r / tf.norm(r)
    return tf.cast(mixed, vector.dtype)


def check_positive(name: str, value: Any) -> float:
    """Validates a finite number > 0 (a target norm such as ``max_value``).

    Args:
        name: The argument's name, for the message.
        value: The value received.

    Returns:
        ``value`` as a float.

    Raises:
        InvalidArgumentError: Unless ``value`` is a real number, finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        0 < value < float("inf")
    ):
        raise InvalidArgumentError(
            f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
        )
    return float(value)


class _OperatorNormConstraint(keras.constraints.Constraint):
    """Shared machinery: per-kernel persistent vectors and the rescaling ``w·min(1, c/σ̂)``."""

    def __init__(self, max_value: float, power_iterations: int, tol: float,
                 max_iterations: int):
        self.max_value = check_positive("max_value", max_value)
        self.power_iterations = check_int(power_iterations, "power_iterations", minimum=1)
        self.tol = check_tol(tol, default=1e-8)
        self.max_iterations = check_int(max_iterations, "max_iterations", minimum=1)
        # id(kernel variable) -> (weak reference to it, its tracked vector). A weak reference
        # (Keras variables are unhashable) tells a kernel from a later one that reuses its id or
        # its name, and drops the entry when the kernel is deleted.
        self._vectors: dict[int, tuple[weakref.ref, tf.Variable]] = {}
        self._compiled = None

    def _operator(self, w: tf.Tensor) -> tuple[Callable[[tf.Tensor], tf.Tensor], tuple[int, ...]]:
        """Returns the linear map defined by kernel ``w`` and its per-example input shape."""
        raise NotImplementedError

    def _vector_for(self, w, input_shape: tuple[int, ...], dtype) -> tf.Variable | None:
        """The persistent vector of kernel variable ``w``; ``None`` if ``w`` is not a variable."""
        if not isinstance(w, (keras.Variable, tf.Variable)):
            return None
        key = id(w)
        ref, var = self._vectors.get(key, (None, None))
        if ref is None or ref() is not w or tuple(var.shape) != (1, *input_shape):
            # Zeros mark a vector that has not been calibrated yet. init_scope lifts the creation
            # out of the training function; under a distribution strategy the variable is
            # mirrored and every replica computes the same update, so the first one is kept.
            with tf.init_scope():
                var = tf.Variable(
                    tf.zeros((1, *input_shape), dtype=dtype),
                    trainable=False,
                    name="lipschitz_vector",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                )
            vectors = self._vectors

            def forget(dead, key=key):
                if vectors.get(key, (None,))[0] is dead:
                    del vectors[key]

            self._vectors[key] = (weakref.ref(w, forget), var)
        return var

    def _sigma(self, w, calibrate: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """One constraint step's estimate: ``(σ̂, kernel tensor)``, updating the stored vector
        (converged to ``tol`` when ``calibrate``)."""
        kernel = ops.convert_to_tensor(w)
        try:
            _, input_shape = self._operator(kernel)
        except InvalidArgumentError as err:
            path = getattr(w, "path", None)  # e.g. "sequential/conv2d/kernel"
            if path is None:
                raise
            raise InvalidArgumentError(f"{type(self).__name__} on kernel '{path}': {err}") \
                from None
        state = self._vector_for(w, input_shape, kernel.dtype)
        if tf.executing_eagerly():  # direct calls: compile once instead of running loops eagerly
            if self._compiled is None:
                self._compiled = compiled(self._update, reduce_retracing=True)
            return self._compiled(kernel, state, calibrate), kernel
        return self._update(kernel, state, calibrate), kernel

    def _update(self, kernel: tf.Tensor, state: tf.Variable | None,
                calibrate: bool = False) -> tf.Tensor:
        fn, input_shape = self._operator(kernel)
        if state is None:  # not a variable: no vector to warm-start from, calibrate
            v0, fresh = start_vector((1, *input_shape), kernel.dtype), True
        else:
            v0 = tf.convert_to_tensor(state)
            fresh = tf.reduce_all(tf.equal(v0, 0))
            v0 = tf.where(fresh, start_vector(tf.shape(v0), v0.dtype), v0)
            fresh = True if calibrate else fresh
        v = track_top_vector(fn, v0, iterations=self.power_iterations, calibrate=fresh,
                             tol=self.tol, max_iterations=self.max_iterations)
        if state is not None:
            state.assign(v)
        return example_norms(fn(v))[0]  # float16: ‖·‖² overflows at 256

    def __call__(self, w):
        return self._project(w)[0]

    def _project(self, w, calibrate: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """``(w · min(1, max_value / σ̂), the projected kernel's estimated norm)``."""
        sigma, kernel = self._sigma(w, calibrate)
        tiny = tf.constant(1e-12, kernel.dtype)
        scale = tf.minimum(tf.constant(1.0, kernel.dtype),
                           tf.constant(self.max_value, kernel.dtype) / tf.maximum(sigma, tiny))
        return kernel * scale, sigma * scale

    def operator_norm(self, w) -> float:
        """Estimate of the operator norm of kernel ``w`` (advances the stored vector).

        A power-iteration value: it converges from below and is an *estimate*, not a
        certified bound.
        """
        sigma, _ = self._sigma(w)
        return float(sigma)

    def get_config(self) -> dict:
        return {
            "max_value": self.max_value,
            "power_iterations": self.power_iterations,
            "tol": self.tol,
            "max_iterations": self.max_iterations,
        }


def apply_constraints(model: keras.layers.Layer) -> dict[str, float]:
    """Projects every kernel of ``model`` that has a tf_lipschitz constraint, with a converged
    estimate; call it after ``fit``.

    During training each constraint spends ``power_iterations`` products per step from its
    tracked vector, so ``σ̂`` lags fast-moving weights and the fitted kernels can exceed
    ``max_value`` by a few % (more when the top singular vector of a convolution keeps
    changing). This converges each tracked vector on the final weights (restarted Lanczos to
    the constraint's ``tol``) and applies the projection once more, after which each
    constrained operator's norm is at most ``max_value`` up to ``tol``. Every variable of the
    model whose ``constraint`` is a :class:`SpectralNorm` or :class:`ConvOperatorNorm` is
    visited (nested models and wrappers included); other constraints are left alone.

    A :class:`ConvOperatorNorm` is first checked against the layer that owns its kernel
    (:func:`check_conv_constraint`): a constraint whose strides, padding, dilation, input shape
    or kind measure another operator than the layer's raises instead of reporting its target.

    Args:
        model: A built model or layer.

    Returns:
        ``{variable path: operator norm estimate after the projection}``.

    Raises:
        InvalidArgumentError: A ``ConvOperatorNorm`` does not measure its layer's operator.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> layer = keras.layers.Dense(3, kernel_constraint=tfl.SpectralNorm(0.5), name="d")
        >>> model = keras.Sequential([keras.Input((4,)), layer], name="m")
        >>> _ = layer.kernel.assign(4.0 * layer.kernel)  # an update that left the ball
        >>> {k: round(v, 6) for k, v in tfl.apply_constraints(model).items()}
        {'m/d/kernel': 0.5}
    """
    owners = _variable_owners(model)
    norms: dict[str, float] = {}
    seen: set[int] = set()
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        if not isinstance(constraint, _OperatorNormConstraint) or id(variable) in seen:
            continue
        seen.add(id(variable))
        if isinstance(constraint, ConvOperatorNorm) and id(variable) in owners:
            check_conv_constraint(constraint, *owners[id(variable)])
        projected, norm = constraint._project(variable, calibrate=True)  # noqa: SLF001
        variable.assign(projected)
        norms[variable.path] = float(norm)
    return norms


def _variable_owners(model: keras.layers.Layer) -> dict[int, tuple[Any, str]]:
    """``{id(variable): (layer, attribute)}`` for the kernels of the convolutions in ``model``
    (nested models and wrappers included)."""
    owners = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):  # noqa: SLF001
        for attribute in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            variable = getattr(layer, attribute, None) if isinstance(
                layer, keras.layers.Layer) and getattr(layer, "built", False) else None
            if isinstance(variable, keras.Variable):
                owners.setdefault(id(variable), (layer, attribute))
    return owners


def _expected_kind(layer, attribute: str) -> str | None:
    """The ``kind`` a ConvOperatorNorm needs on ``layer.<attribute>``, or None when the
    variable is not a convolution kernel whose settings can be checked."""
    if isinstance(layer, BaseConvTranspose) and attribute == "kernel":
        return "transposed"
    if isinstance(layer, BaseDepthwiseConv):
        return "depthwise" if attribute == "kernel" else None
    if isinstance(layer, BaseSeparableConv):
        return "depthwise" if attribute == "depthwise_kernel" else None
    if isinstance(layer, BaseConv) and attribute == "kernel":
        return "conv"
    return None


def _layer_input_shapes(layer) -> list[tuple]:
    """The per-example input shape of every call of ``layer`` in a Functional graph (a shared
    layer has several; ``layer.input`` gives only the first), ``None`` for unknown sizes."""
    shapes = []
    for node in getattr(layer, "_inbound_nodes", None) or []:
        tensors = getattr(node, "input_tensors", None) or []
        if tensors:
            shapes.append(tuple(tensors[0].shape[1:]))
    return shapes


def check_conv_constraint(constraint: "ConvOperatorNorm", layer: Any,
                          attribute: str = "kernel") -> None:
    """Raises unless ``constraint`` caps an operator at least as large as ``layer``'s.

    A :class:`ConvOperatorNorm` measures the convolution its own arguments describe; it cannot
    see the layer. It caps the layer's operator when its settings are the layer's, or when it
    uses ``strides=1`` and ``padding="same"`` with the layer's dilation and an input at least as
    large: every output of the layer (strided, "valid" or "same") is then one of its outputs.
    Anything else can leave the layer above ``max_value`` (``padding="valid"``, the default, on
    a ``padding="same"`` layer ended 9.6 % above its target in training). Every call of a
    shared layer is checked; a call on inputs of unknown size (``None`` dimensions) gives a
    warning, since larger inputs can have a larger norm.

    Args:
        constraint: The constraint.
        layer: The convolution layer whose ``attribute`` it constrains.
        attribute: ``"kernel"``, ``"depthwise_kernel"`` or ``"pointwise_kernel"``.

    Raises:
        InvalidArgumentError: Naming the layer and the differing settings.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> from tf_lipschitz.constraints import check_conv_constraint
        >>> conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
        >>> _ = keras.Sequential([keras.Input((8, 8, 2)), conv])
        >>> check_conv_constraint(tfl.ConvOperatorNorm(1.0, (8, 8, 2), padding="same"), conv)
        >>> check_conv_constraint(tfl.ConvOperatorNorm(1.0, (8, 8, 2)), conv)
        Traceback (most recent call last):
        ...
        tf_lipschitz.errors.InvalidArgumentError: ConvOperatorNorm on layer 'conv' ... padding='valid' (layer: 'same')....
    """
    kind = _expected_kind(layer, attribute)
    if kind is None:
        return
    rank = len(constraint.input_shape) - 1
    layer_padding = str(layer.padding).lower()
    mine = {"strides": constraint.strides, "padding": constraint.padding,
            "dilation_rate": constraint.dilation_rate}
    theirs = {"strides": tuple(layer.strides), "padding": layer_padding,
              "dilation_rate": tuple(layer.dilation_rate)}
    problems = []
    if constraint.kind != kind:
        problems.append(f"kind={constraint.kind!r} (the layer needs kind={kind!r})")
    if constraint.data_format != layer.data_format:
        problems.append(f"data_format={constraint.data_format!r} (layer: {layer.data_format!r})")
    shapes = _layer_input_shapes(layer)
    safe = (constraint.padding == "same" and constraint.strides == (1,) * rank
            and constraint.dilation_rate == theirs["dilation_rate"] and kind != "transposed"
            and layer_padding in ("same", "valid"))
    if not safe:
        problems += [f"{key}={mine[key]!r} (layer: {theirs[key]!r})" for key in mine
                     if mine[key] != theirs[key]]
    if kind == "transposed" and constraint.output_padding is not None:
        output_padding = layer.output_padding
        if output_padding is None or tuple(output_padding) != constraint.output_padding:
            problems.append(f"output_padding={constraint.output_padding!r} "
                            f"(layer: {output_padding!r})")
    for shape in dict.fromkeys(shapes):  # each distinct call once
        if shape == constraint.input_shape or any(d is None for d in shape):
            continue
        larger = len(shape) == len(constraint.input_shape) and all(
            a >= b for a, b in zip(constraint.input_shape, shape))
        if not (safe and larger):
            problems.append(f"input_shape={constraint.input_shape!r} (layer: {shape!r})")
    unknown = [shape for shape in shapes if any(d is None for d in shape)]
    if unknown and not problems:
        warnings.warn(
            f"ConvOperatorNorm on layer '{layer.name}' caps the operator on "
            f"input_shape={constraint.input_shape!r}, but the layer is called on inputs of "
            f"unknown size {unknown[0]!r}: on larger inputs its operator norm can exceed "
            f"max_value={constraint.max_value:g} (a 'same' 3×3 convolution capped at 1 on 4×4 "
            "measured 1.23 on 16×16). Give the constraint the largest input size it will see.",
            stacklevel=3)
    if problems:
        advice = ("Pass the layer's own settings" + (
            ", or strides=1 with padding='same' (its outputs contain the layer's, so the cap "
            "only gets stricter)" if kind != "transposed" and layer_padding != "causal" else "")
            + (". A causal convolution has no ConvOperatorNorm setting: wrap the layer in "
               "tfl.LipschitzWrapper instead" if layer_padding == "causal" else ""))
        raise InvalidArgumentError(
            f"ConvOperatorNorm on layer '{layer.name}' ({type(layer).__name__}.{attribute}) "
            f"measures another operator than the layer's: {'; '.join(problems)}. The layer's "
            f"operator norm can then exceed max_value={constraint.max_value:g}. {advice}.")


@keras.saving.register_keras_serializable(package="tf_lipschitz")
class SpectralNorm(_OperatorNormConstraint):
    """Caps the spectral norm of a Dense kernel at ``max_value``.

    After every optimizer update the kernel ``W`` (shape ``(in, out)``) is rescaled to
    ``W · min(1, max_value / σ̂)``, where ``σ̂`` is a warm-started power-iteration estimate of
    ``‖W‖₂`` with a persistent vector (see the module docstring for why the vector is kept).
    Kernels already inside the ball are left unchanged, so this is a projection, not a
    normalisation to exactly ``max_value``.

    For convolutions use :class:`ConvOperatorNorm`: the spectral norm of a reshaped conv
    kernel is not the norm of the convolution.

    Args:
        max_value: Largest allowed spectral norm.
        power_iterations: Operator products per optimizer step after the first (see
            :func:`track_top_vector`).
        tol: Relative tolerance of the first (calibrating) iteration; it runs once, so it is
            tight by default.
        max_iterations: Cap on products of the calibrating iteration.

    Returns:
        A constraint for ``kernel_constraint=``.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> layer = keras.layers.Dense(16, kernel_constraint=SpectralNorm(1.0))
    """

    def __init__(self, max_value: float = 1.0, power_iterations: int = 1, *, tol: float = 1e-8,
                 max_iterations: int = 1000):
        super().__init__(max_value, power_iterations, tol, max_iterations)

    def _operator(self, w):
        if len(w.shape) != 2:
            raise InvalidArgumentError(
                f"SpectralNorm constrains 2-D Dense kernels; received a kernel of shape "
                f"{tuple(w.shape)}. For a convolution use tfl.constraints.ConvOperatorNorm("
                "max_value, input_shape=..., strides=..., padding=...): the norm of the reshaped "
                "kernel is not the convolution's operator norm. For other layers wrap them in "
                "tfl.LipschitzWrapper."
            )
        return (lambda x: tf.matmul(x, w)), (int(w.shape[0]),)


@keras.saving.register_keras_serializable(package="tf_lipschitz")
class ConvOperatorNorm(_OperatorNormConstraint):
    """Caps the operator norm of a convolution, on its real input shape, at ``max_value``.

    The operator norm of a convolution depends on the input's spatial size, the strides, the
    padding and the dilation, so they are arguments; they must match the layer's (the
    constraint cannot see the layer). If unsure, ``strides=1`` with ``padding="same"`` is a
    safe choice: those outputs contain every strided or "valid" output, so their norm is an
    upper bound and the constraint only becomes stricter.

    The kernel is rescaled to ``K · min(1, max_value / σ̂)`` after each update, with ``σ̂`` from a
    warm-started power iteration on ``JᵀJ`` of the convolution (persistent vector of shape
    ``(1, *input_shape)``). Supports the kernels of Conv1D/2D/3D (grouped convolutions
    included), of DepthwiseConv1D/2D and SeparableConv1D/2D's ``depthwise_constraint``
    (``kind="depthwise"``) and of Conv1D/2D/3DTranspose (``kind="transposed"``). Say which:
    the kernel's shape cannot tell a transposed or depthwise kernel from an ordinary one, and
    the wrong kind measures another operator (a Conv2DTranspose kernel constrained as an
    ordinary one ended 1.3× its target).

    Args:
        max_value: Largest allowed operator norm.
        input_shape: Per-example input shape of the layer, e.g. ``(28, 28, 1)``.
        strides: The layer's strides.
        padding: ``"valid"`` or ``"same"``, as in the layer.
        dilation_rate: The layer's dilation rate (``strides`` and ``dilation_rate`` cannot both
            exceed 1, as in Keras).
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        kind: ``"conv"`` (ordinary and grouped convolutions), ``"depthwise"`` (kernel
            ``(*window, channels, multiplier)``) or ``"transposed"`` (kernel
            ``(*window, filters, channels)``).
        output_padding: A transposed convolution's ``output_padding`` (``None``: inferred, as
            in the layer).
        power_iterations: As in :class:`SpectralNorm` (4 tracks fast-moving weights much
            better than 1).
        tol: As in :class:`SpectralNorm`.
        max_iterations: As in :class:`SpectralNorm`.

    Returns:
        A constraint for ``kernel_constraint=``.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> conv = keras.layers.Conv2D(
        ...     32, 3, strides=2, padding="same",
        ...     kernel_constraint=ConvOperatorNorm(1.0, input_shape=(28, 28, 1), strides=2,
        ...                                        padding="same"))
    """

    def __init__(
        self,
        max_value: float = 1.0,
        input_shape: Sequence[int] | None = None,
        strides: int | Sequence[int] = 1,
        padding: str = "valid",
        dilation_rate: int | Sequence[int] = 1,
        data_format: str | None = None,
        power_iterations: int = 1,
        *,
        kind: str = "conv",
        output_padding: int | Sequence[int] | None = None,
        tol: float = 1e-8,
        max_iterations: int = 1000,
    ):
        super().__init__(max_value, power_iterations, tol, max_iterations)
        if kind not in _CONV_KINDS:
            raise InvalidArgumentError(
                f"`kind` must be one of {', '.join(map(repr, _CONV_KINDS))}: 'depthwise' for "
                "DepthwiseConv and SeparableConv depthwise kernels, 'transposed' for "
                f"ConvTranspose kernels. Received: kind={kind!r}")
        self.kind = kind
        if input_shape is None:
            raise InvalidArgumentError(
                "ConvOperatorNorm needs the layer's per-example `input_shape`, e.g. "
                "input_shape=(28, 28, 1): a convolution's operator norm depends on it. "
                "Received: input_shape=None"
            )
        shape = as_shape(input_shape) or ()
        if len(shape) not in (2, 3, 4):
            raise InvalidArgumentError(
                "`input_shape` must be the full per-example shape of a 1-D, 2-D or 3-D "
                f"convolution input (spatial dims + channels, all known), e.g. (28, 28, 1). "
                f"Received: input_shape={input_shape!r}"
            )
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise InvalidArgumentError(
                f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        padding = padding.lower()
        self.input_shape = shape
        rank = len(shape) - 1
        self.strides = self._tuple("strides", strides, rank)
        self.dilation_rate = self._tuple("dilation_rate", dilation_rate, rank)
        self.padding = padding
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise InvalidArgumentError(
                "`strides` and `dilation_rate` cannot both exceed 1 (Keras convolutions refuse "
                f"it). Received: strides={strides!r}, dilation_rate={dilation_rate!r}")
        if output_padding is not None and kind != "transposed":
            raise InvalidArgumentError(
                "`output_padding` is for kind='transposed' only. Received: "
                f"output_padding={output_padding!r}, kind={kind!r}")
        self.output_padding = None if output_padding is None else self._tuple(
            "output_padding", output_padding, rank, minimum=0)
        data_format = data_format or keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise InvalidArgumentError(
                "`data_format` must be 'channels_last' or 'channels_first'. Received: "
                f"data_format={data_format!r}"
            )
        self.data_format = data_format

    @staticmethod
    def _tuple(name: str, value, rank: int, minimum: int = 1) -> tuple[int, ...]:
        values = (value,) * rank if isinstance(value, int) else (
            tuple(value) if isinstance(value, (tuple, list)) else ())
        if len(values) != rank or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
        ):
            raise InvalidArgumentError(
                f"`{name}` must be an int >= {minimum} or a tuple of {rank} of them for "
                f"input_shape of rank {rank + 1}. Received: {name}={value!r}"
            )
        return values

    def _operator(self, w):
        rank = len(self.input_shape) - 1
        channels = self.input_shape[-1 if self.data_format == "channels_last" else 0]
        if self.kind == "conv":
            fits, axis = channels % int(w.shape[-2]) == 0, "input-channel axis (-2) divides"
        elif self.kind == "depthwise":
            fits, axis = int(w.shape[-2]) == channels, "channel axis (-2) equals"
        else:
            fits, axis = int(w.shape[-1]) == channels, "input-channel axis (-1) equals"
        if len(w.shape) != rank + 2 or not fits:
            raise InvalidArgumentError(
                f"ConvOperatorNorm(input_shape={self.input_shape}, kind={self.kind!r}, "
                f"data_format={self.data_format!r}) received a kernel of shape "
                f"{tuple(w.shape)}; expected a kernel of rank {rank + 2} whose {axis} "
                f"{channels}. Check that input_shape and kind are the layer's."
            )
        options = dict(strides=self.strides, padding=self.padding,
                       data_format=self.data_format, dilation_rate=self.dilation_rate)

        def fn(x):
            if self.kind == "depthwise":
                return ops.depthwise_conv(x, w, **options)
            if self.kind == "transposed":
                return ops.conv_transpose(x, w, output_padding=self.output_padding, **options)
            return ops.conv(x, w, **options)

        return fn, self.input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_shape": list(self.input_shape),
            "strides": list(self.strides),
            "padding": self.padding,
            "dilation_rate": list(self.dilation_rate),
            "data_format": self.data_format,
            "kind": self.kind,
            "output_padding": None if self.output_padding is None else list(self.output_padding),
        }
