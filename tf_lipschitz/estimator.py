"""The :class:`LipschitzEstimator` facade: one object per model, every bound from it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import keras

from tf_lipschitz.autolip import AutoLip, check_solver_arguments
from tf_lipschitz.errors import LowerBoundUnavailableError
from tf_lipschitz.graph import ModelGraph, build_graph
from tf_lipschitz.lower import extreme_value_estimate, lower_bound
from tf_lipschitz.power import check_keywords, keyword_names
from tf_lipschitz.report import ExtremeValueEstimate, LipschitzReport, LowerBound

__all__ = ["LipschitzEstimator"]

# Arguments the estimator passes itself: not accepted among the forwarded keywords.
_SET_BY_ESTIMATOR = ("model", "input_shape", "x", "dtype", "mode", "certified", "init",
                     "spectral", "model_name")


def seqlip_options() -> tuple[str, ...]:
    """The options of :meth:`LipschitzEstimator.seqlip` (``SeqLip.run``'s own keywords)."""
    from tf_lipschitz.seqlip import SeqLip

    return keyword_names(SeqLip.run, _SET_BY_ESTIMATOR + ("verbose",))


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
        solver, tol, max_products = check_solver_arguments(solver, tol, max_products,
                                                           method_name="solver")
        self.model = model
        self.graph: ModelGraph = build_graph(model, input_shape)
        self.verbose = verbose
        self._autolip = AutoLip(self.graph, method=solver, tol=tol, max_products=max_products,
                                jit_compile=jit_compile)
        first = self.graph.nodes[self.graph.inputs[0]]
        self.input_shape = first.output_shapes[0]
        self.input_shapes = [self.graph.nodes[i].output_shapes[0] for i in self.graph.inputs]
        self.dtype = first.dtype

    @property
    def _sample_shape(self):
        """What the lower-bound functions take: one shape, or a list of them (several inputs)."""
        return self.input_shape if len(self.input_shapes) == 1 else self.input_shapes

    @property
    def engine(self) -> AutoLip:
        """The :class:`~tf_lipschitz.autolip.AutoLip` engine: fused groups and their operators."""
        return self._autolip

    @property
    def name(self) -> str:
        return getattr(self.model, "name", "model")

    def autolip(self, *, certified: bool = False, init: Any = "warm",
                verbose: int | None = None) -> LipschitzReport:
        """AutoLip upper bound (Scaman & Virmaux 2018, Algorithm 1).

        Args:
            certified: Use certified per-layer norms wherever a certificate exists. The report's
                ``certified`` flag is ``True`` only when every factor is certified.
            init: Starting vectors of the spectral solver: ``"warm"`` (previous vectors;
                fresh ones on the first call), ``None`` (fresh: Fourier vectors for large
                convolutions, see :mod:`tf_lipschitz.starts`, random elsewhere), ``"random"``
                or a list of arrays.
            verbose: 1 shows a progress bar over the certificates (certified mode); defaults
                to the estimator's ``verbose``, which also prints a summary line first.

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport`.
        """
        if self.verbose:
            n = len(self._autolip.operators)
            print(f"tf_lipschitz: AutoLip on '{self.name}': {len(self.graph) - 1} layer calls, "
                  f"{n} linear operators to measure ({self._autolip.method}).", flush=True)
        return self._autolip.run(certified=certified, init=init, model_name=self.name,
                                 verbose=self.verbose if verbose is None else verbose)

    def lower_bound(self, x: Any = None, **kwargs) -> LowerBound:
        """A proven lower bound: the largest Jacobian norm found by ascent over inputs.

        Args:
            x: Optional data batch used as starting points (works without data); for a model
                with several inputs, a list of batches (one per input) or a dict keyed by input
                name. The bound is then on the constant with respect to all inputs at once.
            **kwargs: See :func:`tf_lipschitz.lower.lower_bound` (``n_random``, ``steps``...).

        Returns:
            A :class:`~tf_lipschitz.report.LowerBound`.

        Raises:
            InvalidArgumentError: For a keyword that :func:`~tf_lipschitz.lower.lower_bound`
                does not take.
        """
        check_keywords(kwargs, keyword_names(lower_bound, _SET_BY_ESTIMATOR),
                       "LipschitzEstimator.lower_bound()")
        kwargs.setdefault("verbose", self.verbose)
        return lower_bound(self.model, self._sample_shape, x, dtype=self.dtype, **kwargs)

    def extreme_value_estimate(self, x: Any = None, **kwargs) -> ExtremeValueEstimate:
        """CLEVER-style statistical estimate of the constant (an estimate, never a bound).

        See :func:`tf_lipschitz.lower.extreme_value_estimate` for the arguments; an unknown
        keyword raises :class:`~tf_lipschitz.errors.InvalidArgumentError`.
        """
        check_keywords(kwargs, keyword_names(extreme_value_estimate, _SET_BY_ESTIMATOR),
                       "LipschitzEstimator.extreme_value_estimate()")
        kwargs.setdefault("verbose", self.verbose)
        return extreme_value_estimate(self.model, self._sample_shape, x, dtype=self.dtype,
                                      **kwargs)

    def _seqlip_engine(self):
        engine = getattr(self, "_seqlip", None)
        if engine is None:
            from tf_lipschitz.seqlip import SeqLip

            engine = self._seqlip = SeqLip(self._autolip)
        return engine

    def seqlip(self, mode: str = "auto", *, certified: bool = False, init: Any = "warm",
               verbose: int | None = None, **options) -> LipschitzReport:
        """SeqLip upper bound (Scaman & Virmaux 2018, Section 5) on every chain of the model.

        Each chain ``linear → activation → … → linear`` (Dense and convolutions, fused with
        their affine neighbours, activations with derivative in ``[lo, hi]``, ``lo ≥ 0``) gets
        the SeqLip product of pair factors; AutoLip propagates across merges, pooling and links
        it cannot handle (negative-slope activations such as GELU, non-elementwise ones), which
        are listed in ``report.settings["fallbacks"]``. ``report.settings["pairs"]`` and the
        per-layer rows say which mode was used for which pair.

        Args:
            mode: ``"auto"`` (exact enumeration where a link has at most ``max_exact_width``
                activations, greedy elsewhere), ``"exact"``, ``"greedy"`` or ``"certified"``
                (polynomial bounds ``‖|A||B|‖``, ``‖A‖‖B‖``).
            certified: Use certified per-layer norms in the AutoLip parts.
            init: Starting vectors of the AutoLip spectral solver.
            verbose: Progress output (defaults to the estimator's ``verbose``).
            **options: ``top_k`` (200: singular triplets kept per operator, the paper's E),
                ``max_exact_width`` (20), ``remainder`` (True: bound and add back the dropped
                singular values; False: the paper's truncation, an estimate), ``dense_limit``
                (2**25 matrix entries for an exact dense SVD, when it is cheap enough),
                ``max_sweeps`` (10, greedy), ``split`` ("sqrt", the paper's; "optimize"
                searches the split exponents), ``subspace_tol``, ``subspace_max_iter``,
                ``large_operators`` ("subspace", the paper's; "autolip" keeps the AutoLip
                factor of operators that would need the block subspace iteration, which takes
                up to half an hour per large convolution); see
                :meth:`tf_lipschitz.seqlip.SeqLip.run`.

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport` with ``method="seqlip"``;
            ``certified`` is ``True`` only when every factor is (exact or certified inner max,
            dense SVDs, no dropped singular values left out, certified AutoLip parts).

        Raises:
            InvalidArgumentError: For an unknown ``mode`` or option (the message lists the
                accepted ones) or an option out of range.

        Example:
            >>> import keras, tf_lipschitz as tfl
            >>> model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"),
            ...                           keras.layers.Dense(2)])
            >>> est = tfl.LipschitzEstimator(model, verbose=0)
            >>> rep = est.seqlip()
            >>> rep.upper <= est.autolip().upper * (1 + 1e-6)
            True
        """
        check_keywords(options, seqlip_options(), "LipschitzEstimator.seqlip()")
        return self._seqlip_engine().run(
            mode, certified=certified, init=init, model_name=self.name,
            verbose=self.verbose if verbose is None else verbose, **options,
        )

    def estimate(self, x: Any = None, *, mode: str = "auto", certified: bool = False,
                 lower_bound_options: dict | None = None, **options) -> LipschitzReport:
        """AutoLip, SeqLip and a lower bound in one report, with the gap upper / lower.

        The report is the SeqLip report (``upper`` and ``certified`` are SeqLip's) with
        ``lower`` set to the proven lower bound, and ``settings["autolip"]``,
        ``settings["lower_bound"]`` and ``settings["gaps"]`` holding the rest. AutoLip and SeqLip
        share one run of the spectral solver. If an *estimate* (greedy SeqLip, truncated SVD)
        falls below the proven lower bound, a warning says it is not an upper bound.

        Args:
            x: Optional data batch: starting points of the lower-bound search.
            mode: SeqLip mode (see :meth:`seqlip`).
            certified: Use certified per-layer norms in AutoLip.
            lower_bound_options: Keyword arguments of :meth:`lower_bound`.
            **options: SeqLip options (see :meth:`seqlip`).

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport` (``method="seqlip"``, ``gap`` set).
            When the lower-bound search cannot run on the model
            (:class:`~tf_lipschitz.errors.LowerBoundUnavailableError`: TensorFlow cannot
            differentiate it as the search needs), a warning says why and the report has the
            upper bounds only (``lower`` is ``None``).

        Example:
            >>> import keras, tf_lipschitz as tfl
            >>> model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu"),
            ...                           keras.layers.Dense(2)])
            >>> rep = tfl.LipschitzEstimator(model, verbose=0).estimate()
            >>> autolip_upper = rep.settings["autolip"].get("upper")
            >>> rep.lower <= rep.upper * (1 + 1e-6) and rep.upper <= autolip_upper * (1 + 1e-6)
            True
        """
        from tf_lipschitz.seqlip import check_options

        check_keywords(options, seqlip_options(), "LipschitzEstimator.estimate()")
        check_options(mode, **options)  # before the solver runs
        lower_bound_options = dict(lower_bound_options or {})
        check_keywords(lower_bound_options, keyword_names(lower_bound, _SET_BY_ESTIMATOR),
                       "LipschitzEstimator.estimate(lower_bound_options=...)")
        spectral = self._autolip.spectral(init="warm")
        auto = self._autolip.run(certified=certified, spectral=spectral, model_name=self.name)
        seq = self._seqlip_engine().run(mode, certified=certified, spectral=spectral,
                                        model_name=self.name, verbose=self.verbose, **options)
        try:
            low = self.lower_bound(x, **lower_bound_options)
        except LowerBoundUnavailableError as err:  # the upper bounds stand without it
            warnings.warn(f"estimate(): no lower bound, the report has the upper bounds only. "
                          f"{err}", stacklevel=2)
            low = None
        # At a point where f is not differentiable the kept Jacobian norm may exceed the
        # constant by up to the secants' 1e-3 resolution; the secant ratio does not, up to the
        # rounding of the outputs (a few 1e-4 in float32), where the norm is accurate.
        if low is not None:
            proven = min(low.value, low.secant) if math.isfinite(low.secant) else low.value
            if proven > seq.upper * (1 + 1e-5):
                warnings.warn(
                    f"The SeqLip {seq.kind} {seq.upper:.6g} is below the proven lower bound "
                    f"{low.value:.6g}: it is not an upper bound here (greedy or truncated "
                    "factors). Use mode='exact'/'certified' or remainder=True.",
                    stacklevel=2,
                )
        value = None if low is None else low.value
        positive = value is not None and value > 0
        settings = dict(seq.settings)
        settings["autolip"] = {"upper": auto.upper, "certified": auto.certified, "kind": auto.kind}
        settings["lower_bound"] = None if low is None else low.to_dict()
        settings["gaps"] = {
            "autolip": auto.upper / value if positive else None,
            "seqlip": seq.upper / value if positive else None,
            "seqlip_over_autolip": seq.upper / auto.upper if auto.upper > 0 else None,
        }
        return dataclasses.replace(seq, lower=value, settings=settings)
