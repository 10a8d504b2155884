"""Result types: per-layer rows, the Lipschitz report and lower bounds.

Every number says what kind it is (see ``docs/concepts.md``):

- ``"certified"``: a proven upper bound on the true constant (up to floating point);
- ``"estimate"``: usually but not provably an upper bound (power iteration, greedy SeqLip,
  truncated SVD) or a statistical estimate;
- ``"lower"``: a proven lower bound.

Printing is separate from computing: ``str(report)`` renders a table like ``model.summary()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Sequence

import numpy as np

__all__ = ["LayerRow", "LipschitzReport", "LowerBound", "ExtremeValueEstimate"]

CERTIFIED = "certified"
ESTIMATE = "estimate"
LOWER = "lower"
_EPS64 = float(np.finfo(np.float64).eps)


def json_ready(value: Any) -> Any:
    """Makes a value JSON-serialisable (floats stay floats, inf/nan become strings)."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table: a layer, or a chain of fused affine layers.

    Attributes:
        name: Layer name, or ``"conv1+bn1"`` for fused layers.
        class_name: Layer class(es).
        kind: ``"input"``, ``"linear"``, ``"constant"`` or ``"merge"``.
        input_shape: Per-example input shape.
        output_shape: Per-example output shape.
        lipschitz: The row's own constant (operator norm × activation constant, or the rule's
            constant); ``None`` for inputs and merges.
        norm: Operator norm of the linear part (linear rows).
        certificate: Certified upper bound on ``norm`` when one is available.
        activation: Name of the activation applied after the linear part (several joined with
            ``+`` when a scaling was commuted through activations inside a fused group).
        bound_kind: ``"certified"`` or ``"estimate"`` for ``lipschitz``.
        method: How ``norm`` was found: ``"lanczos"``, ``"power"``, ``"closed-form"``, ``"rule"``,
            ``"seqlip-exact"``...
        products: Operator products used by the iterative method.
        residual: Relative residual of the iterative method.
        converged: Whether the iterative method met its tolerance.
        cumulative: Bound on the Lipschitz constant from the model input to this row's output.
        note: Free text (the rule's explanation).
    """

    name: str
    class_name: str
    kind: str
    input_shape: tuple
    output_shape: tuple
    lipschitz: float | None = None
    norm: float | None = None
    certificate: float | None = None
    activation: str | None = None
    bound_kind: str = CERTIFIED
    method: str = "rule"
    products: int = 0
    residual: float | None = None
    converged: bool | None = None
    cumulative: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))


def _estimate_reason(row: LayerRow, width: int = 60) -> str:
    """Why a row is an estimate, short: a rule's note, or the method that measured it."""
    if row.kind == "linear":
        text = f"{row.method}, an estimate"
        if row.certificate is None:
            text += ", no certificate"
    else:
        text = " ".join(row.note.split()) or "a rule's estimate"
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(value: float | None, width: int = 10) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:.4g}".rjust(width)


@dataclasses.dataclass(frozen=True)
class LipschitzReport:
    """The result of an upper-bound computation (AutoLip, SeqLip).

    Attributes:
        method: ``"autolip"``, ``"seqlip"``...
        upper: The bound on the Lipschitz constant of the model (ℓ2 → ℓ2).
        certified: ``True`` only when every factor of ``upper`` is certified; otherwise ``upper``
            is an estimate (e.g. power-iteration norms converge from below).
        layers: Per-layer rows in topological order.
        outputs: Bound per model output.
        lower: Best lower bound, when computed alongside (``estimate()``).
        settings: Parameters used (tolerances, method).
        elapsed: Wall time in seconds.
        model_name: Name of the analysed model.
    """

    method: str
    upper: float
    certified: bool
    layers: tuple[LayerRow, ...]
    outputs: dict[str, float]
    lower: float | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    elapsed: float = 0.0
    model_name: str = "model"

    @property
    def kind(self) -> str:
        """``"certified upper bound"`` or ``"estimate"``."""
        return "certified upper bound" if self.certified else "estimate"

    @property
    def uncertified(self) -> tuple[str, ...]:
        """Names of the rows whose bound is an estimate: what keeps ``upper`` from being
        certified (empty when every row is certified). In estimate mode every measured row
        is an estimate; after ``autolip(certified=True)`` only those without a certificate
        are (a custom rule registered with ``certified=False``, a linear map that cannot be
        bounded in float64...)."""
        return tuple(row.name for row in self._estimated_rows())

    def _estimated_rows(self) -> list[LayerRow]:
        return [row for row in self.layers if row.kind != "input" and row.bound_kind != CERTIFIED]

    def why_not_certified(self, limit: int = 3) -> str:
        """One line naming the estimated rows (at most ``limit``) and how each was found, or
        ``""`` when the report is certified or no row is to blame."""
        rows = self._estimated_rows()
        if self.certified or not rows:
            return ""
        named = [f"'{row.name}' ({_estimate_reason(row)})" for row in rows[:limit]]
        more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
        return "not certified because of " + ", ".join(named) + more

    @property
    def certification_note(self) -> str:
        """:meth:`why_not_certified` when certified mode was asked (``certified=True``), else
        ``""``: in estimate mode every measured row is an estimate by request. The table and
        the CLI summary print it under the bound."""
        return self.why_not_certified() if self.settings.get("certified_mode") else ""

    @property
    def gap(self) -> float | None:
        """``upper / lower`` when a lower bound is known: how far from tight the bound can be."""
        if self.lower is None or self.lower <= 0:
            return None
        return self.upper / self.lower

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (schema documented in ``docs/json_schema.md``)."""
        return json_ready({
            "schema": "tf_lipschitz.report/1",
            "model": self.model_name,
            "method": self.method,
            "upper": self.upper,
            "kind": self.kind,
            "certified": self.certified,
            "lower": self.lower,
            "gap": self.gap,
            "outputs": self.outputs,
            "settings": self.settings,
            "elapsed_seconds": self.elapsed,
            "layers": [row.to_dict() for row in self.layers],
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def table(self) -> str:
        """The per-layer table as text."""
        certs = any(row.certificate is not None for row in self.layers)
        extra = f"{'Estimate':>10}{'Cert.':>10}{'ratio':>8}" if certs else ""
        head = (f"{'Layer (type)':<38}{'Output shape':<18}{'Lip':>10}{'Cumul.':>11}{extra}  "
                f"{'kind':<9} method")
        lines = [f'Lipschitz report: "{self.model_name}" ({self.method})', "=" * len(head), head,
                 "-" * len(head)]
        for row in self.layers:
            label = f"{row.name} ({row.class_name})"
            if len(label) > 37:
                label = label[:34] + "..."
            kind = "" if row.kind in ("input",) else row.bound_kind
            method = row.method if row.kind == "linear" else row.kind
            cols = ""
            if certs:  # estimate of the norm, its certificate and certificate / estimate
                ratio = (row.certificate / row.norm if row.certificate is not None and row.norm
                         else None)
                shown = "-".rjust(8) if ratio is None or math.isnan(ratio) else f"{ratio:8.4f}"
                cols = f"{_fmt(row.norm)}{_fmt(row.certificate)}{shown}"
            lines.append(
                f"{label:<38}{str(tuple(row.output_shape)):<18}{_fmt(row.lipschitz)}"
                f"{_fmt(row.cumulative, 11)}{cols}  {kind:<9} {method}"
            )
        lines.append("=" * len(head))
        lines.append(f"Upper bound ({self.kind}): {self.upper:.6g}")
        if self.certification_note:
            lines.append(f"  {self.certification_note}")
        if len(self.outputs) > 1:
            for name, value in self.outputs.items():
                lines.append(f"  output {name}: {value:.6g}")
        if self.lower is not None:
            gap = "undefined (lower bound 0)" if self.gap is None else f"{self.gap:.4g}"
            lines.append(f"Lower bound: {self.lower:.6g}   gap upper/lower: {gap}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclasses.dataclass(frozen=True)
class LowerBound:
    """A lower bound ``‖J_f(x) v‖ ≤ L(f)``, with the point and direction that attain it.

    Attributes:
        value: The lower bound: the norm of the Jacobian-vector product at ``x``, or the best
            secant ratio there when autodiff's "Jacobian" is not confirmed by it to within
            ``1e-3`` (at a kink, see ``docs/concepts.md``), rounded down by 64 machine
            epsilons of the float32 (float64) norms, ``7.6e-6`` relative, so that the
            measurement's own rounding does not put it above an exact upper bound. A
            half-precision model is measured as it computes: its own rounding (about ``1e-3``
            relative in float16) is part of the function measured.
        x: The input point (one example, no batch axis; for a model with several inputs, a
            list with one array per input).
        direction: The unit input direction ``v`` (a list like ``x`` for several inputs).
        secant: The best of the one-sided ratios ``‖f(x ± hv) − f(x)‖ / h`` for two small
            steps ``h``: a lower bound that holds even where ``f`` is not differentiable, up to
            the rounding of the outputs it divides by ``h`` (a few ``1e-4`` relative in float32:
            it checks ``value`` to its ``1e-3`` resolution and is not rounded down).
        evaluations: Number of Jacobian products used.
        starts: Number of starting points.
    """

    value: float
    x: np.ndarray | list[np.ndarray]
    direction: np.ndarray | list[np.ndarray]
    secant: float
    evaluations: int
    starts: int

    kind = LOWER

    def to_dict(self) -> dict:
        return json_ready({"kind": "lower bound", "value": self.value, "secant": self.secant,
                       "evaluations": self.evaluations, "starts": self.starts})

    def __str__(self) -> str:
        return f"Lower bound: {self.value:.6g} (secant check {self.secant:.6g}, {self.starts} starts)"


@dataclasses.dataclass(frozen=True)
class ExtremeValueEstimate:
    """A CLEVER-style statistical *estimate* of the Lipschitz constant (never a bound).

    Per-batch maxima of ``‖J_f(x)‖`` are fitted with a generalised extreme-value distribution;
    the estimate is the right end of its support (the reverse-Weibull location parameter of
    Weng et al., ICLR 2018) when the fitted shape says the support is bounded, else the fitted
    location, and never below ``sample_max`` (a fit whose end lies below a sampled norm is
    contradicted by the sample).

    Attributes:
        value: The estimate.
        loc, scale, concentration: Fitted GEV parameters (TFP's parameterisation).
        sample_max: Largest sampled Jacobian norm (itself a lower bound).
        batches: Number of per-batch maxima fitted.
        batch_size: Samples per batch.
    """

    value: float
    loc: float
    scale: float
    concentration: float
    sample_max: float
    batches: int
    batch_size: int

    kind = ESTIMATE

    def to_dict(self) -> dict:
        return json_ready({"kind": "estimate", **dataclasses.asdict(self)})

    def __str__(self) -> str:
        return (f"Extreme-value estimate: {self.value:.6g} (statistical estimate, not a bound; "
                f"largest sample {self.sample_max:.6g})")


def combine_outputs(values: Sequence[float]) -> float:
    """Lipschitz constant of the concatenation of the outputs: ``√(Σ L_i²)``.

    Computed by :func:`math.hypot`, whose squares neither overflow (a plain ``√(Σ v²)`` turns
    bounds above ``1e154`` into inf) nor underflow (nor turn positive bounds below ``1e-154``
    into 0), and whose result is within one unit in the last place of the exact value, closer
    than a plain sum of squares: :func:`round_up` with one operation covers its rounding.
    An infinite value gives inf.

    Example:
        >>> combine_outputs([3 * 2.0**600, 4 * 2.0**600]) == 5 * 2.0**600  # squares: 1e361
        True
    """
    return math.hypot(*values)


def compose_bounds(*factors: tuple[float, bool]) -> float:
    """The product of Lipschitz constants ``(value, certified)``, with ``0 · inf`` defined.

    IEEE arithmetic gives NaN for ``0 · inf`` (a layer whose bound overflowed, then a Dense
    layer with a zero kernel). A certified 0 is a proof that the map is constant: the
    composition is constant too, whatever the other factors, and the product is 0. A 0 that is
    only an estimate (a power iteration that found ``J v = 0`` on its start vector) proves
    nothing about the map, and the product is inf. NaN stays NaN (a weight that is not a
    number), and a product of positive factors that underflows gives the smallest positive
    float instead of 0, so that only a zero factor ever gives 0.

    Args:
        *factors: ``(value, certified)`` pairs, ``value >= 0``.

    Returns:
        The product.

    Example:
        >>> compose_bounds((math.inf, False), (0.0, True))
        0.0
        >>> compose_bounds((math.inf, True), (0.0, False))
        inf
    """
    values = [value for value, _ in factors]
    if any(math.isnan(v) for v in values):
        return math.nan
    zeros = [certified for value, certified in factors if value == 0.0]
    infinite = any(math.isinf(v) for v in values)
    if zeros:
        return math.inf if infinite and not any(zeros) else 0.0
    if infinite:
        return math.inf
    # Mantissas and exponents apart: a running product may leave the float range part-way
    # (1e-200 · 1e-200 · 1e300), and a subnormal result is rounded up, not to nearest.
    mantissa, exponent = 1.0, 0
    for v in values:
        m, e = math.frexp(v)
        mantissa, shift = math.frexp(mantissa * m)
        exponent += e + shift
    if exponent > sys.float_info.max_exp:
        return math.inf
    product = math.ldexp(mantissa, exponent)
    if product < sys.float_info.min:  # subnormal or 0: the rounding may exceed round_up's
        product = math.nextafter(product, math.inf)
    return product


def round_up(value: float, operations: int) -> float:
    """``value`` widened by the worst rounding of ``operations`` float64 operations.

    A certified bound is computed by products, sums and square roots of certified factors, each
    rounded to nearest (relative error at most ``2⁻⁵³``), which may land the result a few units
    in the last place *below* the exact bound. Widening by ``operations`` machine epsilons (and
    one more step up) keeps it provably above.

    Example:
        >>> round_up(1.0, 10) > 1.0
        True
    """
    if not math.isfinite(value) or value <= 0.0:
        return value
    return math.nextafter(value * (1.0 + operations * _EPS64), math.inf)
