"""The :class:`LipschitzEstimator` facade: one object per model, every bound from it."""

from __future__ import annotations

from typing import Any, Sequence

import keras

from tf_lipschitz.autolip import AutoLip
from tf_lipschitz.graph import ModelGraph, build_graph
from tf_lipschitz.lower import extreme_value_estimate, lower_bound
from tf_lipschitz.report import ExtremeValueEstimate, LipschitzReport, LowerBound

__all__ = ["LipschitzEstimator"]


class LipschitzEstimator:
    """Bounds the ℓ2 Lipschitz constant of a Keras model.

    The estimator flattens the model once (nested models expanded, concrete shapes found by
    one forward pass) and compiles one spectral solver for all its linear layers. Later calls
    read the current weights and warm-start from the previous singular vectors, so calling
    :meth:`autolip` again after training steps is cheap.

    Args:
        model: A built Sequential or Functional model (nested models allowed).
        input_shape: Per-example input shape(s); needed when the model input has unknown
            dimensions (the operator norm of a convolution depends on its input size).
        solver: ``"lanczos"`` (default) or ``"power"`` for the per-layer spectral norms.
        tol: Relative tolerance of the spectral solver.
        max_products: Cap on operator products per linear layer.
        jit_compile: Compile the spectral solver with XLA (useful on GPU).
        verbose: 0 silent, 1 progress output on long computations.

    Example:
        >>> import keras, tf_lipschitz as tfl
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        ...                           keras.layers.Dense(2)])
        >>> est = tfl.LipschitzEstimator(model, verbose=0)
        >>> rep = est.autolip()
        >>> rep.upper >= est.lower_bound().value
        True
    """

    def __init__(
        self,
        model: keras.Model,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        *,
        solver: str = "lanczos",
        tol: float = 1e-6,
        max_products: int = 2000,
        jit_compile: bool = False,
        verbose: int = 1,
    ):
        self.model = model
        self.graph: ModelGraph = build_graph(model, input_shape)
        self.verbose = verbose
        self._autolip = AutoLip(self.graph, method=solver, tol=tol, max_products=max_products,
                                jit_compile=jit_compile)
        first = self.graph.nodes[self.graph.inputs[0]]
        self.input_shape = first.output_shapes[0]
        self.dtype = first.dtype

    @property
    def name(self) -> str:
        return getattr(self.model, "name", "model")

    def autolip(self, *, certified: bool = False, init: Any = "warm") -> LipschitzReport:
        """AutoLip upper bound (Scaman & Virmaux 2018, Algorithm 1).

        Args:
            certified: Use certified per-layer norms wherever a certificate exists. The report's
                ``certified`` flag is ``True`` only when every factor is certified.
            init: Starting vectors of the spectral solver: ``"warm"`` (previous vectors),
                ``None`` (random) or a list of arrays.

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport`.
        """
        if self.verbose:
            n = len(self._autolip.operators)
            print(f"tf_lipschitz: AutoLip on '{self.name}': {len(self.graph) - 1} layer calls, "
                  f"{n} linear operators to measure ({self._autolip.method}).", flush=True)
        return self._autolip.run(certified=certified, init=init, model_name=self.name)

    def lower_bound(self, x: Any = None, **kwargs) -> LowerBound:
        """A proven lower bound: the largest Jacobian norm found by ascent over inputs.

        Args:
            x: Optional data batch used as starting points (works without data).
            **kwargs: See :func:`tf_lipschitz.lower.lower_bound` (``n_random``, ``steps``...).

        Returns:
            A :class:`~tf_lipschitz.report.LowerBound`.
        """
        kwargs.setdefault("verbose", self.verbose)
        return lower_bound(self.model, self.input_shape, x, dtype=self.dtype, **kwargs)

    def extreme_value_estimate(self, x: Any = None, **kwargs) -> ExtremeValueEstimate:
        """CLEVER-style statistical estimate of the constant (an estimate, never a bound).

        See :func:`tf_lipschitz.lower.extreme_value_estimate` for the arguments.
        """
        kwargs.setdefault("verbose", self.verbose)
        return extreme_value_estimate(self.model, self.input_shape, x, dtype=self.dtype, **kwargs)
