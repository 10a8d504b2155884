"""``LipCallback``: Lipschitz bounds of a model during ``model.fit``.

The callback builds one :class:`~tf_lipschitz.LipschitzEstimator` when training starts and
re-runs it every ``every_n_epochs`` epochs (and optionally every ``every_n_batches`` batches).
The estimator keeps its compiled spectral solver and warm-starts it from the previous singular
vectors, so after the first call an estimate costs a few operator products per layer.

Values go into the ``logs`` dictionary under ``lipschitz_autolip``, ``lipschitz_seqlip`` and
``lipschitz_lower``, so ``History``, ``CSVLogger``, ``EarlyStopping`` and the progress bar see
them (place ``LipCallback`` *before* those callbacks in the list: Keras calls callbacks in
order). With ``log_dir`` the totals and per-layer values are also written as TensorBoard
scalars to ``log_dir/lipschitz``, a run next to the ``train`` and ``validation`` runs that
``keras.callbacks.TensorBoard(log_dir)`` writes (one writer per run directory: TensorBoard reads
one active event file per directory).

What the numbers are: ``lipschitz_autolip`` is an upper bound built from power-iteration
norms, so an **estimate** (certified only with ``certified=True`` and certified per-layer norms
for every layer); ``lipschitz_seqlip`` is whatever the SeqLip report says (greedy: estimate);
``lipschitz_lower`` is a proven **lower bound**. The kinds are recorded in
:attr:`LipCallback.records` and in the TensorBoard descriptions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_lipschitz.autolip import check_solver_arguments
from tf_lipschitz.errors import InvalidArgumentError, LowerBoundError
from tf_lipschitz.estimator import LipschitzEstimator
from tf_lipschitz.lower import input_names, input_layout, lower_bound
from tf_lipschitz.power import as_shape, check_int, check_keywords, keyword_names
from tf_lipschitz.report import json_ready

__all__ = ["LipCallback", "LipschitzRecord"]

# TensorBoard descriptions of the per-layer scalars. A SeqLip row carries the factor of the
# pair that ends at it (its activation pattern maximised jointly with the previous layer), not
# the layer's own constant; a chain's first layer has no factor of its own and no scalar.
_LAYER_DESCRIPTIONS = {
    "autolip": "the layer's own Lipschitz constant (AutoLip)",
    "seqlip": "the SeqLip factor of the pair of linear layers ending at this layer (not the "
              "layer's own constant; their product is the SeqLip bound)",
}

METHODS = ("autolip", "seqlip", "lower")
LOWER_KIND = "lower bound"


@dataclasses.dataclass(frozen=True)
class LipschitzRecord:
    """One estimate made by :class:`LipCallback`.

    Attributes:
        stage: ``"train_begin"``, ``"epoch_end"`` or ``"batch_end"``.
        epoch: Keras' 0-based epoch index (``None`` at ``"train_begin"``).
        batch: Batch index within the epoch for ``"batch_end"`` records, else ``None``.
        step: Optimizer iterations done when the estimate was made.
        values: ``{"lipschitz_autolip": ..., ...}`` (NaN when an estimate failed).
        kinds: For each value, ``"certified upper bound"``, ``"estimate"`` or ``"lower bound"``.
        layers: ``{method: {layer name: value}}`` when ``per_layer``: the layer's own
            constant for AutoLip; for SeqLip the factor of the pair of linear layers that ends
            at the layer (a chain's first layer has none).
        elapsed: Seconds spent computing this record.
    """

    stage: str
    epoch: int | None
    batch: int | None
    step: int
    values: dict[str, float]
    kinds: dict[str, str]
    layers: dict[str, dict[str, float]]
    elapsed: float

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))


def _as_batch(x) -> np.ndarray:
    """``x`` (an array-like) as a numeric array, or :class:`InvalidArgumentError` naming ``x``."""
    try:
        batch = np.asarray(x)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise InvalidArgumentError(
            f"LipCallback(x=...) must be an array of input examples or a tf.data.Dataset; "
            f"converting it to an array failed ({exc}). Received: x of type {type(x).__name__}"
        ) from exc
    if batch.ndim == 0 or not (np.issubdtype(batch.dtype, np.number)
                               or batch.dtype == np.bool_):
        raise InvalidArgumentError(
            "LipCallback(x=...) must be a numeric array of input examples, shape "
            f"(n, *input_shape), or a tf.data.Dataset. Received: x with shape {batch.shape} and "
            f"dtype {batch.dtype}"
        )
    return batch


def _as_batches(x) -> np.ndarray | list[np.ndarray] | dict[str, np.ndarray]:
    """``x`` as an array, or as a list or dict of arrays (one batch per input of the model)."""
    if isinstance(x, Mapping):
        return {k: _as_batch(v) for k, v in x.items()}
    try:
        return _as_batch(x)
    except InvalidArgumentError:
        if isinstance(x, (list, tuple)) and x:  # batches of different shapes: several inputs
            try:
                batches = [_as_batch(v) for v in x]
            except InvalidArgumentError:
                batches = []
            if batches and all(b.ndim >= 2 for b in batches):
                return batches
        raise


def _first_element(x):
    """The inputs of ``x``: itself, or the first batch of a dataset without its targets."""
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x))
        if isinstance(element, (tuple, list)):
            element = element[0]
        return tf.nest.map_structure(np.asarray, element)
    return x


def _checked_inputs(x, estimator: LipschitzEstimator, model_name: str):
    """``x`` checked against the estimator's model inputs: one batch, or one per input."""
    x = _first_element(x)
    if len(estimator.input_shapes) == 1:
        if isinstance(x, Mapping):
            names = input_names(estimator.model)
            if list(x) != list(names):  # a dataset of ({"name": batch}, y) for a dict model
                raise InvalidArgumentError(
                    f"LipCallback(x=...) received a dict of inputs with keys {list(x)}, but "
                    f"model '{model_name}' has one input ({names[0]!r}): pass its batch as an "
                    "array, or a dict with that one key.")
            x = x[names[0]]
        return _check_batch_shape(_as_batch(x), estimator.input_shape, model_name)
    batches = _as_batches(x)
    if isinstance(batches, np.ndarray):  # a list of batches of equal shapes stacked into one
        if not isinstance(x, (list, tuple)):  # a plain array: one batch for a model of several
            raise InvalidArgumentError(
                f"LipCallback(x=...) received one array of shape {batches.shape}, but model "
                f"'{model_name}' has {len(estimator.input_shapes)} inputs: pass a list with one "
                "batch per input, in the order of model.inputs, or a dict keyed by input name.")
        batches = list(batches)
    try:
        input_layout(estimator.model, estimator.input_shapes).join(batches, estimator.dtype)
    except LowerBoundError as exc:
        raise InvalidArgumentError(
            f"LipCallback(x=...) must hold a batch for each input of model '{model_name}': "
            f"{exc}") from exc
    return batches


def _check_batch_shape(batch: np.ndarray, input_shape: tuple[int, ...], model_name: str
                       ) -> np.ndarray:
    """``batch`` as ``(n, *input_shape)`` (a single example becomes a batch of one)."""
    if tuple(batch.shape) == tuple(input_shape):
        return batch[None]
    if tuple(batch.shape[1:]) != tuple(input_shape):
        raise InvalidArgumentError(
            f"LipCallback(x=...) must hold inputs of model '{model_name}', shape (n, "
            f"{', '.join(map(str, input_shape))}) for the per-example input shape "
            f"{tuple(input_shape)}. Received: x with shape {tuple(batch.shape)}"
        )
    return batch


class LipCallback(keras.callbacks.Callback):
    """Logs Lipschitz bounds of the model during training (History, CSV, TensorBoard).

    Use it to watch how training changes the model's Lipschitz constant (robustness,
    generalisation and stability all depend on it), and to check constrained models. Bad
    arguments raise :class:`~tf_lipschitz.InvalidArgumentError` at construction. The
    first estimate runs at ``on_train_begin``: a model the estimator cannot analyse fails
    there, before any training, with the estimator's error. Later failures (NaN weights,
    numerical trouble) never stop training: the callback warns and records NaN.

    Args:
        methods: Any of ``"autolip"`` (default), ``"seqlip"`` (needs
            ``LipschitzEstimator.seqlip``) and ``"lower"`` (a lower bound by gradient ascent
            on the Jacobian norm; slower).
        every_n_epochs: Estimate at the end of every n-th epoch (``None``: never at epoch end,
            then ``every_n_batches`` is required). Epochs without an estimate log NaN, so that
            ``CSVLogger`` keeps a fixed set of columns.
        every_n_batches: Also estimate at the end of a training batch once at least n
            optimizer steps have passed since the last batch estimate (counted over the whole
            run, across ``fit`` calls). With ``compile(steps_per_execution=k)`` Keras calls
            batch callbacks every k steps only, so estimates come every ``k·⌈n/k⌉`` steps.
        log_dir: Directory for TensorBoard scalars (written to ``log_dir/lipschitz``); use the
            same directory as ``keras.callbacks.TensorBoard``.
        per_layer: Also record and write each layer's own constant (for SeqLip, the factor of
            the pair ending at the layer; the TensorBoard descriptions say which).
        x: A small batch of inputs, shape ``(n, *input_shape)`` (e.g. 64 examples; an array,
            or a ``tf.data.Dataset`` whose first batch is used) to start the lower-bound search
            from; every example is a starting point. For a model with several inputs, a list of
            batches (one per input) or a dict keyed by input name (a dataset's first element
            likewise). Only with ``"lower"`` in ``methods``; random inputs are used without it.
            Its shape is checked against the model's inputs at ``on_train_begin``.
        verbose: 1 prints one line per estimate.
        input_shape: Per-example input shape, for models with unknown input dimensions.
        certified: Use certified per-layer norms where available (AutoLip). Certificates are
            recomputed at every estimate and cost more than the estimate itself (a 3×3×512
            convolution on a 7×7 grid takes about 20 s, see :mod:`tf_lipschitz.gridconv`;
            ``tf_lipschitz.gridconv.BANDED_FLOP_LIMIT = 0`` trades tightness for speed).
        solver: ``"lanczos"`` (default) or ``"power"``.
        tol: Relative tolerance of the spectral solver.
        max_products: Cap on operator products per layer and estimate.
        lower_kwargs: Extra arguments of :func:`tf_lipschitz.lower.lower_bound`
            (``n_random``, ``steps``...).
        seqlip_kwargs: Extra arguments of ``LipschitzEstimator.seqlip`` (``mode``,
            ``top_k``...).

    Example:
        >>> import keras, numpy as np, tf_lipschitz as tfl
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        ...                           keras.layers.Dense(1)])
        >>> model.compile("adam", "mse")
        >>> history = model.fit(np.ones((32, 4)), np.ones((32, 1)), epochs=2, verbose=0,
        ...                     callbacks=[tfl.LipCallback()])
        >>> len(history.history["lipschitz_autolip"])
        2
    """

    def __init__(
        self,
        methods: Sequence[str] | str = ("autolip",),
        every_n_epochs: int | None = 1,
        every_n_batches: int | None = None,
        log_dir: str | os.PathLike | None = None,
        per_layer: bool = True,
        x: Any = None,
        verbose: int = 0,
        *,
        input_shape: Sequence[int] | None = None,
        certified: bool = False,
        solver: str = "lanczos",
        tol: float = 1e-6,
        max_products: int = 2000,
        lower_kwargs: dict | None = None,
        seqlip_kwargs: dict | None = None,
    ):
        super().__init__()
        if isinstance(methods, str):
            methods = (methods,)
        try:
            methods = tuple(dict.fromkeys(methods))
        except TypeError:  # not iterable, or unhashable items
            methods = (methods,)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise InvalidArgumentError(
                f"Unknown Lipschitz method(s) {unknown}; `methods` must be a non-empty subset of "
                f"{METHODS}. Received: methods={methods!r}"
            )
        if "seqlip" in methods and not hasattr(LipschitzEstimator, "seqlip"):
            raise InvalidArgumentError(
                "methods includes 'seqlip', but this tf_lipschitz has no "
                "LipschitzEstimator.seqlip. Use methods=('autolip',) or ('autolip', 'lower')."
            )
        every_n_epochs, every_n_batches = (
            None if value is None else check_int(
                value, name, minimum=1, hint="Use None to never estimate at that point.")
            for name, value in (("every_n_epochs", every_n_epochs),
                                ("every_n_batches", every_n_batches)))
        if every_n_epochs is None and every_n_batches is None:
            raise InvalidArgumentError(
                "LipCallback would never run: set `every_n_epochs` and/or `every_n_batches` to a "
                "positive integer. Received: every_n_epochs=None, every_n_batches=None"
            )
        if verbose not in (0, 1, 2) or isinstance(verbose, bool):
            raise InvalidArgumentError(
                f"`verbose` must be 0, 1 or 2. Received: verbose={verbose!r}")
        for name, value, accepted, what in (
            ("log_dir", log_dir, (str, os.PathLike, type(None)), "a directory path or None"),
            ("per_layer", per_layer, (bool, np.bool_), "True or False"),
            ("certified", certified, (bool, np.bool_), "True or False"),
        ):
            if not isinstance(value, accepted):
                raise InvalidArgumentError(
                    f"`{name}` must be {what}. Received: {name}={value!r}")
        if input_shape is not None:
            if as_shape(input_shape) is None:
                raise InvalidArgumentError(
                    "`input_shape` must be a per-example shape of positive integers such as "
                    f"(28, 28, 1), or None. Received: input_shape={input_shape!r}")
            input_shape = as_shape(input_shape)
        solver, tol, max_products = check_solver_arguments(solver, tol, max_products,
                                                           method_name="solver")
        lower_kwargs = self._check_kwargs("lower_kwargs", lower_kwargs, "lower", methods)
        if "x" in lower_kwargs:
            raise InvalidArgumentError(
                "Pass the lower-bound data as LipCallback(x=...), not in `lower_kwargs`. "
                f"Received: lower_kwargs={lower_kwargs!r}"
            )
        # dtype comes from the model; x is LipCallback(x=...).
        check_keywords(lower_kwargs, keyword_names(lower_bound, ("model", "input_shape", "x",
                                                                 "dtype")),
                       "LipCallback(lower_kwargs=...), forwarded to tfl.lower.lower_bound(),")
        seqlip_kwargs = self._check_kwargs("seqlip_kwargs", seqlip_kwargs, "seqlip", methods)
        reserved = {"certified", "init", "verbose"} & set(seqlip_kwargs)
        if reserved:
            raise InvalidArgumentError(
                f"`seqlip_kwargs` may not set {sorted(reserved)}: LipCallback sets them (use "
                f"LipCallback(certified=...)). Received: seqlip_kwargs={seqlip_kwargs!r}"
            )
        if seqlip_kwargs:
            from tf_lipschitz.estimator import seqlip_options
            from tf_lipschitz.seqlip import check_options

            options = dict(seqlip_kwargs)
            mode = options.pop("mode", "auto")
            check_keywords(options, ("mode", *seqlip_options()),
                           "LipCallback(seqlip_kwargs=...), forwarded to "
                           "LipschitzEstimator.seqlip(),")
            check_options(mode, **options)
        if x is not None:
            if "lower" not in methods:
                raise InvalidArgumentError(
                    "`x` is set but 'lower' is not in `methods`: x only gives the lower bound "
                    f"its starting points. Received: methods={methods!r}"
                )
            if not isinstance(x, tf.data.Dataset):
                _as_batches(x)
        self.methods = methods
        self.every_n_epochs = every_n_epochs
        self.every_n_batches = every_n_batches
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.per_layer = bool(per_layer)
        self.x = x
        self.verbose = verbose
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.certified = bool(certified)
        self.estimator_kwargs = {"solver": solver, "tol": tol, "max_products": max_products}
        self._last_batch_step: int | None = None
        self.lower_kwargs = lower_kwargs
        self.seqlip_kwargs = seqlip_kwargs
        self.records: list[LipschitzRecord] = []
        self.estimator: LipschitzEstimator | None = None
        self._x_batch: np.ndarray | list | dict | None = None  # a list/dict: several inputs
        self._writer = None
        self._cold = True  # next solver run starts from random vectors (after a failure)
        self._epoch: int | None = None

    @staticmethod
    def _check_kwargs(name: str, value: Any, method: str, methods: tuple[str, ...]) -> dict:
        """``value`` (``None`` or a mapping) as a dict; refused if ``method`` is not used."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(
                f"`{name}` must be a dict of keyword arguments of the {method!r} estimate. "
                f"Received: {name}={value!r}"
            )
        if value and method not in methods:
            raise InvalidArgumentError(
                f"`{name}` is set but {method!r} is not in `methods`. Received: "
                f"methods={methods!r}, {name}={dict(value)!r}"
            )
        return dict(value)

    # ------------------------------------------------------------------ set-up and tear-down
    def on_train_begin(self, logs=None):
        if self.estimator is None or self.estimator.model is not self.model:
            try:
                self.estimator = LipschitzEstimator(
                    self.model, self.input_shape, verbose=0, **self.estimator_kwargs
                )
            except Exception as exc:
                exc.add_note(
                    f"Raised by LipCallback.on_train_begin for model '{self.model.name}', before "
                    "training started. Fix the model or register a rule (see the message above), "
                    "or remove the callback."
                )
                raise
            self._cold = True
            self._last_batch_step = None
            if "lower" in self.methods and self.x is not None:
                self._x_batch = _checked_inputs(self.x, self.estimator, self.model.name)
        step = self._step()
        if self._last_batch_step is None or step < self._last_batch_step:  # new run or optimizer
            self._last_batch_step = step
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "lipschitz"))
        # The first estimate compiles the solver and checks the model end to end: errors here
        # are raised (nothing is lost yet); later ones only warn.
        self._record("train_begin", None, None, raise_errors=True)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ hooks
    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs is None:
            return
        if (epoch + 1) % self.every_n_epochs == 0:
            record = self._record("epoch_end", epoch, None)
            values = record.values
        else:
            values = {self.log_key(m): math.nan for m in self.methods}
        if logs is not None:
            logs.update(values)

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_batches is None:
            return
        # With compile(steps_per_execution=k) this runs once per k steps, so the step count is
        # compared with the last estimate's rather than tested for a multiple of n.
        step = self._step()
        if step - self._last_batch_step >= self.every_n_batches:
            self._last_batch_step = step
            record = self._record("batch_end", self._epoch, batch)
            if logs is not None:
                logs.update(record.values)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    # ------------------------------------------------------------------ computing
    @staticmethod
    def log_key(method: str) -> str:
        """The ``logs`` key of a method: ``"lipschitz_<method>"``."""
        return f"lipschitz_{method}"

    def _step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return 0
        return int(optimizer.iterations.numpy())  # not np.array(variable): NumPy 2 warns

    def _run(self, method: str) -> tuple[float, str, dict[str, float]]:
        est = self.estimator
        if method == "lower":
            result = est.lower_bound(self._x_batch, **{"verbose": 0, **self.lower_kwargs})
            return float(result.value), LOWER_KIND, {}
        init = None if self._cold else "warm"
        if method == "autolip":
            report = est.autolip(certified=self.certified, init=init)
        else:
            report = est.seqlip(certified=self.certified, init=init, verbose=0,
                                **self.seqlip_kwargs)
        layers = {}
        if self.per_layer:
            layers = {row.name: float(row.lipschitz) for row in report.layers
                      if row.lipschitz is not None}
        return float(report.upper), report.kind, layers

    def _record(self, stage: str, epoch: int | None, batch: int | None, *,
                raise_errors: bool = False) -> LipschitzRecord:
        start = time.perf_counter()
        values, kinds, layers = {}, {}, {}
        for method in self.methods:
            key = self.log_key(method)
            try:
                value, kind, per_layer = self._run(method)
            except Exception as exc:  # noqa: BLE001 - reported, recorded as NaN, never silent
                if raise_errors:
                    exc.add_note(
                        f"Raised by LipCallback ({method}) at {stage}, before training started."
                    )
                    raise
                warnings.warn(
                    f"LipCallback: the {method} estimate at {self._where(stage, epoch, batch)} "
                    f"failed with {type(exc).__name__}: {exc}. Recording NaN and continuing "
                    "training.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                value, kind, per_layer = math.nan, "failed", {}
            if not math.isfinite(value):
                if kind != "failed":
                    warnings.warn(
                        f"LipCallback: the {method} estimate at "
                        f"{self._where(stage, epoch, batch)} is {value} (are the weights "
                        "finite?). Recording NaN and continuing training.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                value = math.nan
            if method != "lower":
                # Never warm-start from vectors computed on broken (NaN) weights.
                self._cold = not math.isfinite(value)
            values[key] = value
            kinds[key] = kind
            if per_layer:
                layers[method] = per_layer
        record = LipschitzRecord(stage=stage, epoch=epoch, batch=batch, step=self._step(),
                                 values=values, kinds=kinds, layers=layers,
                                 elapsed=time.perf_counter() - start)
        self.records.append(record)
        self._write(record)
        if self.verbose:
            shown = ", ".join(f"{k[len('lipschitz_'):]} {v:.6g} ({kinds[k]})"
                              for k, v in values.items())
            print(f"LipCallback {self._where(stage, epoch, batch)}: {shown} "
                  f"[{record.elapsed:.2f} s]", flush=True)
        return record

    @staticmethod
    def _where(stage, epoch, batch) -> str:
        if stage == "train_begin":
            return "train begin"
        if stage == "epoch_end":
            return f"epoch {epoch + 1}"
        return f"epoch {(epoch or 0) + 1} batch {batch + 1}"

    def _write(self, record: LipschitzRecord):
        if self._writer is None or record.stage == "train_begin":
            return
        prefix, step = ("epoch_", record.epoch) if record.stage == "epoch_end" else (
            "batch_", record.step)
        with self._writer.as_default(step=step):
            for key, value in record.values.items():
                tf.summary.scalar(f"{prefix}{key}", value,
                                  description=f"{key}: {record.kinds[key]}")
            for method, rows in record.layers.items():
                what = _LAYER_DESCRIPTIONS.get(method, "the layer's own Lipschitz constant")
                for name, value in rows.items():
                    tf.summary.scalar(f"{prefix}lipschitz_{method}/{name}", value,
                                      description=what)
        self._writer.flush()

    # ------------------------------------------------------------------ results
    def series(self, method: str = "autolip", stage: str = "epoch_end") -> list[float]:
        """The values of one method at one stage, in order (e.g. for plotting).

        Args:
            method: ``"autolip"``, ``"seqlip"`` or ``"lower"``.
            stage: ``"train_begin"``, ``"epoch_end"`` or ``"batch_end"``.

        Returns:
            The recorded values (NaN where an estimate failed).
        """
        key = self.log_key(method)
        return [r.values[key] for r in self.records if r.stage == stage and key in r.values]
