"""``LipschitzWrapper``: keeps a layer's operator norm at most a target during training.

The wrapper computes with the wrapped layer's kernel rescaled,

    W_eff = W · min(1, max_lipschitz / σ̂),   σ̂ = ‖h_W(v)‖,

where ``h_W`` is the layer's linear part (bias removed, from the rule registry, so strides,
padding, dilation and groups are exactly the layer's), evaluated on the layer's **real input
shape**, and ``v`` is a persistent unit vector (a non-trainable weight). Unlike
``keras.layers.SpectralNormalization``, the norm is the operator's on its input shape, not the
reshaped kernel's (shared/ALGORITHMS.md §2), and a layer already inside the ball is unchanged.

The vector. It starts at zero ("fresh") and is calibrated (restarted Lanczos to ``tol``) when
the wrapper is built eagerly, on its first eager or training call, or by
:meth:`LipschitzWrapper.calibrate`. Each training call then spends ``power_iterations``
operator products from the previous vector (one power step; a short Lanczos restart for
``power_iterations >= 2``). Inference in a graph only reads it.

No gradient through ``σ̂``. Spectral normalisation (Miyato et al., ICLR 2018) differentiates
through ``σ̂ = uᵀWv``; with a single tracked vector that lets the optimiser grow the directions
the vector does not see, and on convolutions, whose top singular values are close, the true
norm escapes the estimate. Measured on the MNIST CNN of ``examples/train_with_callback.py``
(Adam 1e-3, the worst of the four layers' effective norms after each of 4 epochs, target 1):
gradient through ``σ̂`` with one power step 1.20 / 1.24 / 1.14 / 1.22, with an 8-product
Lanczos step still 1.03 / 1.02 / 1.01 / 1.02; treating the scale as a constant (this module)
with one power step 1.07 / 1.13 / 1.004 / 1.0002, with ``power_iterations=4`` 1.0014 / 1.0003 /
1.0001 / 1.0000. The scale is therefore a constant for backpropagation (projected-gradient
style, like the constraints of :mod:`tf_lipschitz.constraints`).

``σ̂`` converges from below and lags when the weights move fast (early epochs, large learning
rates), so ``W_eff``'s norm can exceed the target by that lag; ``power_iterations=4`` removes
most of it at four products per step. The vector of the last training step trails that step's
optimizer update: :meth:`LipschitzWrapper.calibrate_all` after ``fit`` converges every
wrapper of a model on its final weights. :class:`~tf_lipschitz.LipschitzEstimator` (and
``LipCallback``) measure the effective operator independently, through the rule registered
here, so an excess is always visible.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lipschitz.constraints import check_positive, start_vector, track_top_vector
from tf_lipschitz.errors import InvalidArgumentError, ModelNotBuiltError
from tf_lipschitz.power import check_int, check_tol, compiled, example_norms
from tf_lipschitz.rules.base import Linear, NodeContext, get_rule, register_rule

__all__ = ["LipschitzWrapper"]

_KERNEL_ATTRIBUTES = ("kernel", "pointwise_kernel", "depthwise_kernel")


@keras.saving.register_keras_serializable(package="tf_lipschitz")
class LipschitzWrapper(keras.layers.Wrapper):
    """Keeps the operator norm of an affine layer at most ``max_lipschitz``.

    Wrap a Dense, EinsumDense or convolution layer (any stride, padding, dilation; depthwise,
    separable and transposed included). The layer then computes with the kernel scaled by
    ``min(1, max_lipschitz / σ̂)``, where ``σ̂`` estimates the operator norm of its linear part
    on the input shape it is built with; a persistent vector is advanced by ``power_iterations``
    operator products per training call (one power step by default). With 1-Lipschitz
    activations (ReLU, tanh...) a model whose affine layers are all wrapped with
    ``max_lipschitz=1`` is 1-Lipschitz up to the lag of that estimate (see the module
    docstring: ``power_iterations=4`` keeps it below 0.2% on the MNIST CNN from the first
    epoch; check with :class:`~tf_lipschitz.LipschitzEstimator`).

    Args:
        layer: The layer to wrap; it must have a ``Linear`` rule in
            :mod:`tf_lipschitz.rules` and a kernel. Its input shape must be fully known, except
            for a ``Dense`` layer, which acts on the last axis only and so accepts unknown
            leading dimensions (variable-length sequences).
        max_lipschitz: Target operator norm of the layer's linear part (the activation's
            constant multiplies it).
        power_iterations: Operator products per training call: 1 is a power step, ``k >= 2``
            a Lanczos restart of dimension ``k`` (see
            :func:`tf_lipschitz.constraints.track_top_vector`).
        tol: Relative tolerance of the calibrating iteration (runs once: tight by default).
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
        tol: float = 1e-8,
        max_iterations: int = 1000,
        **kwargs,
    ):
        if not isinstance(layer, keras.layers.Layer):
            raise InvalidArgumentError(
                "LipschitzWrapper wraps a Keras layer (Dense, EinsumDense or a convolution). "
                f"Received: layer={layer!r}"
            )
        super().__init__(layer, **kwargs)
        self.max_lipschitz = check_positive("max_lipschitz", max_lipschitz)
        self.power_iterations = check_int(power_iterations, "power_iterations", minimum=1)
        self.tol = check_tol(tol, default=1e-8)
        self.max_iterations = check_int(max_iterations, "max_iterations", minimum=1)
        self._compiled_update = None
        self._compiled_norm = None
        self._calibrated_eagerly = False

    def build(self, input_shape):
        super().build(input_shape)
        shape = self._operator_shape(tuple(input_shape))
        out_shape = tuple(self.layer.compute_output_shape((1, *shape))[1:])
        context = NodeContext(input_shapes=(shape,), output_shapes=(out_shape,),
                              dependent=(True,), constants=(None,),
                              dtype=self.layer.variable_dtype, name=self.layer.name)
        bound = get_rule(self.layer)(self.layer, context)
        if not isinstance(bound, Linear):
            raise InvalidArgumentError(
                f"LipschitzWrapper wraps layers that are affine in their input (Dense, "
                f"EinsumDense, convolutions); received layer='{self.layer.name}' "
                f"({type(self.layer).__name__}), which has a {type(bound).__name__} rule. Leave "
                "it unwrapped: its Lipschitz constant does not depend on trainable weights."
            )
        self._linear = bound.fn
        # The attribute name is stored, not the variable: assigning a variable to an attribute
        # would make Keras track the wrapped layer's kernel a second time.
        self._kernel_attribute = next(
            (a for a in _KERNEL_ATTRIBUTES
             if isinstance(getattr(self.layer, a, None), keras.Variable)),
            None,
        )
        if self._kernel_attribute is None:
            raise InvalidArgumentError(
                f"LipschitzWrapper rescales a layer's kernel, and found none on the layer it "
                f"received: layer='{self.layer.name}' ({type(self.layer).__name__}); expected "
                f"one of the attributes {_KERNEL_ATTRIBUTES} (Dense, EinsumDense, convolutions)."
            )
        self.vector = self.add_weight(
            name="vector", shape=(1, *shape), initializer="zeros", trainable=False,
            dtype=self.layer.variable_dtype, aggregation="only_first_replica",
        )
        self.sigma = self.add_weight(
            name="sigma", shape=(), initializer="zeros", trainable=False,
            dtype=self.layer.variable_dtype, aggregation="only_first_replica",
        )
        if tf.executing_eagerly():
            # Calibrate now, so that the layer is constrained from its first call. (A model
            # being loaded pays one solve here before its saved vector replaces this one.)
            self._update_eagerly(0, force_calibration=True)

    def _operator_shape(self, input_shape: tuple) -> tuple[int, ...]:
        """The per-example input shape on which the layer's operator norm is measured.

        The full shape, except for a ``Dense`` layer: it multiplies the last axis by its kernel
        independently at every other position, so its operator on any input shape
        ``(..., n)`` is ``I ⊗ W``, of norm ``‖W‖``. Its leading dimensions may therefore be
        unknown (variable-length sequences), and the norm is measured on ``(n,)``.
        """
        shape = input_shape[1:]
        if isinstance(self.layer, keras.layers.Dense) and None in shape[:-1] and shape[-1]:
            return (int(shape[-1]),)
        if None in shape:
            raise ModelNotBuiltError(
                f"LipschitzWrapper('{self.name}') measures the operator norm of layer "
                f"'{self.layer.name}' ({type(self.layer).__name__}) on its per-example input "
                f"shape, and received input_shape={input_shape} with unknown non-batch "
                "dimensions: the norm of a convolution or an EinsumDense depends on them. Start "
                "the model with keras.Input(shape=...) giving every non-batch dimension. (A "
                "wrapped Dense layer, which acts on the last axis only, accepts unknown leading "
                "dimensions such as a variable sequence length.)"
            )
        return tuple(int(d) for d in shape)

    def _next_vector(self, iterations: int, force_calibration: bool = False) -> tf.Tensor:
        """The vector after ``iterations`` steps (converged if fresh or forced); no update."""
        v0 = ops.convert_to_tensor(self.vector)
        fresh = ops.all(ops.equal(v0, 0))
        # Once calibrated eagerly the vector is never zero again, so the training graph does
        # not need the calibration branch (it is costly to trace).
        calibrate = force_calibration if self._calibrated_eagerly else ops.logical_or(
            fresh, force_calibration)
        start = start_vector(tf.shape(v0), v0.dtype)
        return track_top_vector(
            self._linear, ops.where(fresh, start, v0), iterations=iterations,
            calibrate=calibrate, tol=self.tol, max_iterations=self.max_iterations,
        )

    def _update(self, iterations, force_calibration=False) -> tuple[tf.Tensor, tf.Tensor]:
        """Advances and stores the vector and ``sigma``; returns both."""
        v = self._next_vector(iterations, force_calibration)
        sigma = self._sigma_at(v)
        self.vector.assign(v)
        self.sigma.assign(sigma)
        return v, sigma

    def _update_eagerly(self, iterations, force_calibration=False) -> tuple[tf.Tensor, tf.Tensor]:
        # Eager callers (build, calibrate(), run_eagerly=True) get a compiled function instead
        # of while-loops executed op by op (traced once per value of `iterations`).
        if self._compiled_update is None:
            self._compiled_update = compiled(self._update)
        out = self._compiled_update(int(iterations), bool(force_calibration))
        self._calibrated_eagerly = True
        return out

    def calibrate(self) -> float:
        """Converges the vector on the current weights (restarted Lanczos to ``tol``), stores it.

        Runs automatically when the wrapper is built eagerly, on an eager call or in the
        estimator's rule while the vector is still zero, and (in the training graph) on the
        first training call of a wrapper built inside a graph. Call it yourself after
        ``set_weights``: training re-converges the vector gradually, this does it at once.

        Returns:
            The estimate of the unscaled layer's operator norm (converged to ``tol``; an
            estimate from below, not a certified bound).
        """
        self._check_built()
        self._update_eagerly(0, force_calibration=True)
        return self.raw_operator_norm()

    @staticmethod
    def calibrate_all(model: keras.layers.Layer) -> dict[str, float]:
        """Calibrates every ``LipschitzWrapper`` inside ``model``; call it after ``fit``.

        Training advances each wrapper's vector by ``power_iterations`` products per step,
        computed before that step's optimizer update, so after a short or fast run the fitted
        model can exceed its targets by a few % (see the module docstring). This converges
        every vector on the final weights (nested models and wrappers inside other wrappers
        included), after which each wrapped layer's norm is within ``tol`` of its target.

        Args:
            model: A model or layer; built wrappers anywhere inside it are calibrated.

        Returns:
            ``{qualified name: estimate of the unscaled layer's operator norm}`` per wrapper,
            named by its path of layer names from ``model`` (``"model/inner/wrapper"``).

        Example:
            >>> import keras, tf_lipschitz as tfl
            >>> model = keras.Sequential([keras.Input((4,)),
            ...                           tfl.LipschitzWrapper(keras.layers.Dense(3), name="w")],
            ...                          name="m")
            >>> list(tfl.LipschitzWrapper.calibrate_all(model))
            ['m/w']
        """
        norms: dict[str, float] = {}
        seen: set[int] = set()

        def visit(layer, prefix):
            if id(layer) in seen:  # a layer shared between models is calibrated once
                return
            seen.add(id(layer))
            name = f"{prefix}{layer.name}"
            if isinstance(layer, LipschitzWrapper) and layer.built:
                norms[name] = layer.calibrate()
            # Direct sublayers of any layer: models, wrappers and custom layers alike.
            for sub in layer._flatten_layers(include_self=False, recursive=False):
                visit(sub, f"{name}/")

        visit(model, "")
        return norms

    def is_calibrated(self) -> bool:
        """Whether the persistent vector has been computed (it starts at zero)."""
        self._check_built()
        return bool(np.any(self.vector.numpy() != 0))  # .numpy(): no NumPy copy warning

    def _sigma_at(self, v: tf.Tensor) -> tf.Tensor:
        """``σ̂ = ‖h_W(v)‖`` by one forward pass (overflow-free: in float16 ‖·‖² overflows at
        256)."""
        return example_norms(self._linear(v))[0]

    def _scale_for(self, sigma: tf.Tensor) -> tf.Tensor:
        dtype = sigma.dtype
        return ops.minimum(ops.cast(1.0, dtype),
                           ops.cast(self.max_lipschitz, dtype) / ops.maximum(sigma, 1e-12))

    def _read_sigma(self) -> tf.Tensor:
        """``σ̂`` as inference computes it: at the stored vector (the fixed start while fresh)."""
        v0 = ops.convert_to_tensor(self.vector)
        start = start_vector(tf.shape(v0), v0.dtype)
        return self._sigma_at(ops.where(ops.all(ops.equal(v0, 0)), start, v0))

    def current_scale(self) -> tf.Tensor:
        """The factor ``min(1, max_lipschitz / σ̂)`` inference applies to the kernel.

        ``σ̂`` is measured on the current weights at the stored vector. Reads the weights and
        the vector without updating anything (the estimator's rule uses it).
        """
        return self._scale_for(self._read_sigma())

    def call(self, inputs, training=None):
        if training:
            if tf.executing_eagerly():
                _, sigma = self._update_eagerly(self.power_iterations)
            else:
                _, sigma = self._update(self.power_iterations)
        elif tf.executing_eagerly() and not self.is_calibrated():
            # A fresh wrapper calibrates on its first eager call.
            _, sigma = self._update_eagerly(0, force_calibration=True)
        else:
            # Graph inference is a plain read: no loops, no writes (it may be traced in a
            # stateless scope, or differentiated in forward mode by the lower bound). A vector
            # that is still fresh here (built inside a graph, never called eagerly) gives an
            # uncalibrated scale until the first training call or calibrate().
            sigma = self._read_sigma()
        # No gradient through the scale: see the module docstring. The σ̂ of an update is the
        # one just stored: the kernel is the same, so no second forward pass.
        scale = ops.stop_gradient(self._scale_for(sigma))
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
        """The operator norm of the layer's linear part as inference computes it.

        ``‖h_W‖ · current_scale()``: the norm of the unscaled linear part on the current
        weights, converged to ``tol`` by restarted Lanczos warm-started from the stored vector,
        times the scale inference applies. That scale comes from the stored vector, which trails
        the weights (by one optimizer update after training, more when they move fast), so the
        value can exceed ``max_lipschitz`` (see the module docstring); :meth:`calibrate` or
        :meth:`calibrate_all` bring it back to the target. Read-only: the stored vector, and
        so the layer's outputs, are unchanged.

        Returns:
            A converged estimate (from below, to ``tol``), not a certified bound;
            :class:`~tf_lipschitz.LipschitzEstimator` measures the same map.
        """
        self._check_built()
        if self._compiled_norm is None:
            self._compiled_norm = compiled(self._effective_norm)
        return float(self._compiled_norm())

    def _effective_norm(self) -> tf.Tensor:
        sigma = self._sigma_at(self._next_vector(0, force_calibration=True))
        return sigma * ops.cast(self.current_scale(), sigma.dtype)

    def raw_operator_norm(self) -> float:
        """Estimate of the *unscaled* layer's operator norm, stored at the last vector update.

        A power-iteration value on the weights of that update (before the optimizer step that
        followed it); :meth:`calibrate` returns a converged one on the current weights.
        """
        self._check_built()
        return float(self.sigma.numpy())

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
