"""``LipschitzWrapper``: keeps a layer's operator norm at most a target during training.

The wrapper reparametrises the wrapped layer's kernel as

    W_eff = W · min(1, max_lipschitz / σ̂),   σ̂ = ‖h_W(v)‖,

where ``h_W`` is the layer's linear part (bias removed, from the rule registry, so strides,
padding, dilation and groups are exactly the layer's), evaluated on the layer's **real input
shape**, and ``v`` is a persistent unit vector (a non-trainable weight). Each training call
advances ``v`` by ``power_iterations`` steps of the power method on ``JᵀJ`` (warm-started).
The vector starts at zero ("fresh"): the first training call, the first eager call or
:meth:`LipschitzWrapper.calibrate` runs restarted Lanczos to convergence instead. Inference
calls in a graph never write the vector (a fresh one is calibrated on the fly).
Gradients flow through ``σ̂`` (with ``v`` held fixed), as in spectral normalisation
(Miyato et al., ICLR 2018), but unlike ``keras.layers.SpectralNormalization`` the norm is the
operator's on its input shape, not the reshaped kernel's (shared/ALGORITHMS.md §2), and
layers already inside the ball are not rescaled.

``σ̂`` converges from below, so ``W_eff``'s norm can exceed the target by the power method's
error; once ``v`` has converged (after the first training call) the excess is second order in
the weights' change per step. :class:`~tf_lipschitz.LipschitzEstimator` measures the
effective operator independently, through the rule registered here.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lipschitz.constraints import track_top_vector
from tf_lipschitz.rules.base import Linear, NodeContext, get_rule, register_rule

__all__ = ["LipschitzWrapper"]

_KERNEL_ATTRIBUTES = ("kernel", "pointwise_kernel", "depthwise_kernel")


@keras.saving.register_keras_serializable(package="tf_lipschitz")
class LipschitzWrapper(keras.layers.Wrapper):
    """Keeps the operator norm of an affine layer at most ``max_lipschitz``.

    Wrap a Dense, EinsumDense or convolution layer (any stride, padding, dilation; depthwise,
    separable and transposed included). The layer then computes with the kernel scaled by
    ``min(1, max_lipschitz / σ̂)``, where ``σ̂`` estimates the operator norm of its linear part
    on the input shape it is built with; a persistent vector is advanced by one power step per
    training call. With 1-Lipschitz activations (ReLU, tanh...) a model whose affine layers are
    all wrapped with ``max_lipschitz=1`` is 1-Lipschitz up to the power method's tolerance.

    Args:
        layer: The layer to wrap; it must have a ``Linear`` rule in
            :mod:`tf_lipschitz.rules` and a kernel.
        max_lipschitz: Target operator norm of the layer's linear part (the activation's
            constant multiplies it).
        power_iterations: Power-iteration steps per training call.
        tol: Relative tolerance of the calibrating iteration (first call).
        max_iterations: Cap on steps of the calibrating iteration.
        **kwargs: Base layer arguments (``name``...).

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> model = keras.Sequential([
        ...     keras.Input((28, 28, 1)),
        ...     tfl.LipschitzWrapper(keras.layers.Conv2D(8, 3, strides=2, activation="relu")),
        ...     keras.layers.Flatten(),
        ...     tfl.LipschitzWrapper(keras.layers.Dense(10)),
        ... ])
        >>> model.compile("adam", "mse")
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        max_lipschitz: float = 1.0,
        power_iterations: int = 1,
        *,
        tol: float = 1e-6,
        max_iterations: int = 1000,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        if isinstance(max_lipschitz, bool) or not isinstance(max_lipschitz, (int, float)) or not (
            max_lipschitz > 0 and math.isfinite(max_lipschitz)
        ):
            raise ValueError(
                f"`max_lipschitz` must be a finite number > 0. Received: "
                f"max_lipschitz={max_lipschitz!r}"
            )
        for name, value in (("power_iterations", power_iterations),
                            ("max_iterations", max_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"`tol` must be a finite number > 0. Received: tol={tol!r}")
        self.max_lipschitz = float(max_lipschitz)
        self.power_iterations = int(power_iterations)
        self.tol = float(tol)
        self.max_iterations = int(max_iterations)
        self._compiled_update = None

    def build(self, input_shape):
        super().build(input_shape)
        shape = tuple(input_shape[1:])
        if any(d is None for d in shape):
            raise ValueError(
                f"LipschitzWrapper('{self.layer.name}') needs the full per-example input shape, "
                f"received input_shape={tuple(input_shape)}: the operator norm of a convolution "
                "depends on the input size. Start the model with keras.Input(shape=...) with "
                "every non-batch dimension known."
            )
        shape = tuple(int(d) for d in shape)
        out_shape = tuple(self.layer.compute_output_shape((1, *shape))[1:])
        context = NodeContext(input_shapes=(shape,), output_shapes=(out_shape,),
                              dependent=(True,), constants=(None,),
                              dtype=self.layer.variable_dtype, name=self.layer.name)
        bound = get_rule(self.layer)(self.layer, context)
        if not isinstance(bound, Linear):
            raise TypeError(
                f"LipschitzWrapper wraps layers that are affine in their input (Dense, "
                f"EinsumDense, convolutions); layer '{self.layer.name}' "
                f"({type(self.layer).__name__}) has a {type(bound).__name__} rule. Leave it "
                "unwrapped: its Lipschitz constant does not depend on trainable weights."
            )
        self._linear = bound.fn
        self._activation = bound.activation
        # The attribute name is stored, not the variable: assigning a variable to an attribute
        # would make Keras track the wrapped layer's kernel a second time.
        self._kernel_attribute = next(
            (a for a in _KERNEL_ATTRIBUTES
             if isinstance(getattr(self.layer, a, None), keras.Variable)),
            None,
        )
        if self._kernel_attribute is None:
            raise TypeError(
                f"LipschitzWrapper found no kernel on layer '{self.layer.name}' "
                f"({type(self.layer).__name__}); expected one of {_KERNEL_ATTRIBUTES}."
            )
        self.vector = self.add_weight(
            name="vector", shape=(1, *shape), initializer="zeros", trainable=False,
            dtype=self.layer.variable_dtype, aggregation="only_first_replica",
        )
        self.sigma = self.add_weight(
            name="sigma", shape=(), initializer="zeros", trainable=False,
            dtype=self.layer.variable_dtype, aggregation="only_first_replica",
        )
        self.norm_input_shape = shape

    def _next_vector(self, iterations, force_calibration=False) -> tf.Tensor:
        """The vector after ``iterations`` power steps (Lanczos to ``tol`` if fresh); no update."""
        v0 = ops.convert_to_tensor(self.vector)
        fresh = ops.all(ops.equal(v0, 0))
        start = tf.random.stateless_normal(tf.shape(v0), seed=(1805, 10965), dtype=v0.dtype)
        return track_top_vector(
            self._linear, ops.where(fresh, start, v0), iterations=iterations,
            calibrate=ops.logical_or(fresh, force_calibration), tol=self.tol,
            max_iterations=self.max_iterations,
        )

    def _update(self, iterations, force_calibration=False) -> tf.Tensor:
        """Advances and stores the vector and ``sigma``; returns the new vector."""
        v = self._next_vector(iterations, force_calibration)
        self.vector.assign(v)
        self.sigma.assign(ops.norm(ops.reshape(self._linear(v), [-1])))
        return v

    def _update_eagerly(self, iterations, force_calibration=False) -> tf.Tensor:
        # Eager callers (run_eagerly=True, calibrate()) get a compiled function instead of
        # while-loops executed op by op.
        if self._compiled_update is None:
            self._compiled_update = tf.function(self._update, autograph=False)
        return self._compiled_update(tf.constant(iterations, tf.int32),
                                     tf.constant(force_calibration))

    def calibrate(self) -> float:
        """Runs the power method on the current weights to convergence and stores the vector.

        Called automatically by the first training call, by the first eager inference call,
        and by the estimator's rule when the vector is fresh. Call it yourself after
        ``set_weights`` on a model that will not be trained again.

        Returns:
            The estimate of the unscaled layer's operator norm (converged to ``tol``; an
            estimate from below, not a certified bound).
        """
        self._check_built()
        self._update_eagerly(0, force_calibration=True)
        return self.raw_operator_norm()

    def is_calibrated(self) -> bool:
        """Whether the persistent vector has been computed (it starts at zero)."""
        self._check_built()
        return bool(np.any(ops.convert_to_numpy(self.vector) != 0))

    def _scale_at(self, v: tf.Tensor) -> tf.Tensor:
        sigma = ops.norm(ops.reshape(self._linear(v), [-1]))
        dtype = sigma.dtype
        return ops.minimum(ops.cast(1.0, dtype),
                           ops.cast(self.max_lipschitz, dtype) / ops.maximum(sigma, 1e-12))

    def current_scale(self) -> tf.Tensor:
        """The factor ``min(1, max_lipschitz / σ̂)`` applied to the kernel, from the stored vector.

        Reads the weights and the vector without updating anything (the estimator's rule uses
        it).
        """
        return self._scale_at(ops.convert_to_tensor(self.vector))

    def call(self, inputs, training=None):
        if training:
            if tf.executing_eagerly():
                v = self._update_eagerly(self.power_iterations)
            else:
                v = self._update(self.power_iterations)
        elif tf.executing_eagerly() and not self.is_calibrated():
            v = self._update_eagerly(0)  # a fresh wrapper calibrates on its first eager call
        else:
            # Inference never writes state (graph tracing may happen in a stateless scope); a
            # fresh vector is calibrated on the fly, the same way calibrate() would.
            v = self._next_vector(0)
        scale = self._scale_at(ops.stop_gradient(v))
        kernel = getattr(self.layer, self._kernel_attribute)
        # Every variable of the wrapped layer is mapped to its current value (so that an outer
        # StatelessScope keeps working); the kernel is mapped to its scaled value.
        mapping = [
            (var, var.value * ops.cast(scale, var.dtype) if var is kernel else var.value)
            for var in self.layer.variables
        ]
        with keras.StatelessScope(mapping, collect_losses=True,
                                  initialize_variables=False) as scope:
            outputs = self.layer(inputs)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def operator_norm(self) -> float:
        """Current estimate of the wrapped layer's effective operator norm (≤ ``max_lipschitz``).

        ``min(σ̂, max_lipschitz)`` with ``σ̂ = ‖h_W(v)‖`` for the stored vector: a
        power-iteration *estimate* (from below) of the norm of the linear part after scaling.
        :class:`~tf_lipschitz.LipschitzEstimator` gives a converged value.
        """
        self._check_built()
        v = ops.convert_to_tensor(self.vector)
        return float(self._scale_at(v) * ops.norm(ops.reshape(self._linear(v), [-1])))

    def raw_operator_norm(self) -> float:
        """Estimate of the *unscaled* layer's operator norm at the last vector update."""
        self._check_built()
        return float(ops.convert_to_numpy(self.sigma))

    def _check_built(self):
        if not self.built:
            raise ValueError(
                f"LipschitzWrapper '{self.name}' is not built yet; call it on an input first."
            )

    def get_config(self):
        return {
            **super().get_config(),
            "max_lipschitz": self.max_lipschitz,
            "power_iterations": self.power_iterations,
            "tol": self.tol,
            "max_iterations": self.max_iterations,
        }


def _wrapper_rule(wrapper: LipschitzWrapper, context: NodeContext) -> Linear:
    """The wrapped layer's rule with its kernel scaled as in ``call`` (effective weights)."""
    inner = get_rule(wrapper.layer)(wrapper.layer, context)
    if not isinstance(inner, Linear):  # build() refuses such layers; kept for direct use
        return inner
    if not wrapper.is_calibrated():
        wrapper.calibrate()  # the scale must come from a converged vector, as in call()

    def fn(x):
        return ops.cast(wrapper.current_scale(), x.dtype) * inner.fn(x)

    return Linear(fn, inner.activation,
                  note=f"LipschitzWrapper(max_lipschitz={wrapper.max_lipschitz:g})")


register_rule(LipschitzWrapper, _wrapper_rule)
