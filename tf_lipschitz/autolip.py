"""AutoLip: Lipschitz upper bounds propagated through the layer graph.

Scaman & Virmaux (NeurIPS 2018), Algorithm 1: walk the graph in topological order with
``L = 1`` at the inputs, ``0`` for constants, and ``L_k = Σ_p Lip_p(g_k) · L_p`` elsewhere.
Layers affine in their input are first fused into maximal chains (Conv → BatchNorm →
Rescaling; Conv → Flatten → Dense), whose operator norm is measured as one linear map on its
real input shape: ``‖AB‖ ≤ ‖A‖‖B‖``, so fusing can only tighten the bound. A per-channel
scaling after an elementwise activation (``Conv2D(activation="relu") → BatchNormalization``)
fuses too, across the activation, whose diagonal derivative commutes with it. Merges of tensors
that depend on disjoint sets of model inputs (branches of a multi-input model) use the tighter
forms of :class:`~tf_lipschitz.rules.Merge` (``disjoint``), since then ``‖Δx‖² = Σ ‖Δx_p‖²``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Sequence

import numpy as np

from tf_lipschitz.certify import fused_certificate
from tf_lipschitz.errors import (InvalidArgumentError, LipschitzError, NotLipschitzError,
                                 UnsupportedLayerError)
from tf_lipschitz.graph import GraphNode, ModelGraph
from tf_lipschitz.operators import LinearOperator, compose
from tf_lipschitz.power import (METHODS, SpectralResult, SpectralSolver, check_choice, check_int,
                                 check_tol)
from tf_lipschitz.progress import progress_bar
from tf_lipschitz.report import (CERTIFIED, ESTIMATE, LayerRow, LipschitzReport, combine_outputs,
                                 compose_bounds, round_up)
from tf_lipschitz.rules import (Activation, Constant, LayerBound, Linear, Merge, NodeContext,
                                get_rule)
from tf_lipschitz.starts import group_start

__all__ = ["AutoLip", "Group", "Segment", "check_solver_arguments", "group_activations"]


def check_solver_arguments(method: str, tol: float, max_products: int, *,
                           method_name: str = "method") -> tuple[str, float, int]:
    """Validates the spectral-solver arguments every AutoLip entry point takes.

    The estimators call it before reading the model, so that a bad value fails at once.

    Args:
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative tolerance, in ``(0, 0.1]``.
        max_products: Cap on operator products, ``>= 1``.
        method_name: The name of ``method`` at the entry point (``"solver"`` for the estimators).

    Returns:
        ``(method, tol, max_products)``, with ``tol`` a float and ``max_products`` an int.

    Raises:
        InvalidArgumentError: Naming the argument at fault.
    """
    return (check_choice(method, method_name, METHODS),
            check_tol(tol),
            check_int(max_products, "max_products", minimum=1,
                      hint="2000 (the default) is enough for most layers."))


@dataclasses.dataclass(frozen=True)
class Group:
    """A fused chain of affine layer calls measured as one operator.

    Attributes:
        nodes: Node indices of the affine calls, in order.
        parent: Node feeding the chain (``None`` if the chain has a constant input).
        inner: Activation layers inside the chain (``Conv2D → ReLU → BatchNormalization``),
            crossed by the scalings after them (see :func:`fuse`).
    """

    nodes: tuple[int, ...]
    parent: int | None
    inner: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Segment:
    """A chain of nodes whose joint constant is computed outside AutoLip (by SeqLip).

    Attributes:
        source: Node feeding the chain (``None`` if the chain has a constant input).
        nodes: Every node the chain covers, in order; the last one is its output.
        value: Lipschitz constant from the source's output to the last node's output.
        certified: Whether ``value`` is a certified upper bound.
        rows: Report rows of (some of) the covered nodes, by node index. Their ``cumulative``
            is relative to the source and is multiplied by the source's bound.
    """

    source: int | None
    nodes: tuple[int, ...]
    value: float
    certified: bool
    rows: dict[int, LayerRow]


def node_context(node: GraphNode) -> NodeContext:
    return NodeContext(
        input_shapes=node.input_shapes,
        output_shapes=node.output_shapes,
        dependent=node.input_dependent,
        constants=node.constants,
        dtype=node.dtype,
        name=node.name,
    )


def model_input_sources(graph: ModelGraph) -> dict[int, frozenset]:
    """For every node, the model inputs (their node indices) its output depends on."""
    sources: dict[int, frozenset] = {}
    for node in graph.nodes:
        if node.is_input:
            sources[node.index] = frozenset([node.index])
        else:
            sources[node.index] = frozenset().union(*(
                sources[p] for p, d in zip(node.parents, node.input_dependent) if d))
    return sources


def _disjoint(sets: Sequence[frozenset]) -> bool:
    """Whether the sets are pairwise disjoint (a set repeated is not)."""
    seen: set = set()
    for s in sets:
        if seen & s:
            return False
        seen |= s
    return True


def evaluate_rules(graph: ModelGraph) -> dict[int, LayerBound]:
    """Applies the registered rule of every input-dependent node.

    Errors are chosen by what they tell the user: a node without a rule does not stop the walk,
    since a later node may be refused for a reason that registering that rule would not fix.
    (Keras computes the mask of a ``Masking`` layer with ``not_equal``/``any`` ops placed before
    the layer in the graph; the layer's own error says why it is refused.)

    Raises:
        NotLipschitzError: A node's function has no finite constant (the first such node).
        UnsupportedLayerError: Otherwise, the first node whose rule refuses it with a reason,
            else the first node without a rule.
        LipschitzError: A rule that fails or returns something else than a bound, before any
            node without a rule (the walk stops there).
    """
    bounds: dict[int, LayerBound] = {}
    missing: UnsupportedLayerError | None = None
    for node in graph.nodes:
        if node.is_input or not node.dependent:
            continue
        try:
            bounds[node.index] = _node_bound(node)
        except NotLipschitzError:
            raise
        except UnsupportedLayerError as exc:
            refused = not exc.suggest_rule
            if missing is None or (refused and missing.suggest_rule):
                missing = exc
        except LipschitzError:
            if missing is None:
                raise
    if missing is not None:
        raise missing
    return bounds


def _node_bound(node: GraphNode) -> LayerBound:
    """The bound the rule of ``node`` gives, checked against the node's inputs."""
    bound = get_rule(node.operation)(node.operation, node_context(node))
    if not isinstance(bound, (Linear, Constant, Merge)):
        raise LipschitzError(
            f"The rule of layer '{node.name}' ({node.class_name}) returned {bound!r}; a rule "
            "must return tfl.rules.Linear, Constant or Merge."
        )
    if isinstance(bound, (Linear, Constant)) and sum(node.input_dependent) > 1:
        raise LipschitzError(
            f"Layer '{node.name}' ({node.class_name}) has {sum(node.input_dependent)} "
            "input-dependent inputs but its rule describes a single-input layer; register a "
            "rule returning tfl.rules.Merge for it."
        )
    return bound


def _dependent_parent(node: GraphNode) -> int | None:
    for p, d in zip(node.parents, node.input_dependent):
        if d:
            return p
    return None


def fuse(graph: ModelGraph, bounds: dict[int, LayerBound]) -> list[Group]:
    """Groups consecutive affine calls into maximal chains.

    A node joins its parent's chain when both are :class:`Linear`, the parent has no
    activation, the parent feeds nothing else and is not a model output.

    Then a chain of elementwise scalings alone (:attr:`Linear.diagonal`, e.g. a
    BatchNormalization that follows ``Conv2D(activation="relu")`` and feeds a pooling layer)
    joins the chain before it across elementwise activations: the one inside that chain's
    last layer and activation layers in between (``Conv2D → ReLU → BatchNormalization``),
    each with a single consumer and not a model output, when that chain has a layer that
    is not a scaling (scalings on both sides keep their closed forms). An activation's
    derivative is diagonal and commutes with the scaling, ``diag(s) · diag(σ') · W =
    diag(σ') · diag(s) · W``, so the pair is bounded by ``m · ‖diag(s) W‖``
    (``m = sup|σ'|``) instead of ``m · ‖W‖ · max|s|``. Such a chain carries the activations
    inside it (:func:`group_activations`); nothing but scalings follows them.
    """
    outputs = set(graph.outputs)
    group_of: dict[int, list[int]] = {}
    chains: list[list[int]] = []
    inner: dict[int, list[int]] = {}  # id of a chain -> activation layers inside it

    def feeds_one(node: int) -> bool:
        return len(graph.nodes[node].consumers) == 1 and node not in outputs

    def feeds_only_chain(parent: int) -> bool:
        return feeds_one(parent) and parent in group_of

    def elementwise(activation) -> bool:
        return activation is not None and activation.slope_range is not None

    for node in graph.nodes:
        bound = bounds.get(node.index)
        if not isinstance(bound, Linear):
            continue
        parent = _dependent_parent(node)
        pbound = bounds.get(parent) if parent is not None else None
        if (
            isinstance(pbound, Linear)
            and _no_activation(pbound.activation)
            and feeds_only_chain(parent)
        ):
            chain = group_of[parent]
            chain.append(node.index)
        else:
            chain = [node.index]
            chains.append(chain)
        group_of[node.index] = chain
    for chain in list(chains):
        if not all(bounds[i].diagonal for i in chain):
            continue
        crossed: list[int] = []  # activation layers between the chain and the one before
        parent = _dependent_parent(graph.nodes[chain[0]])
        while (parent is not None and isinstance(bounds.get(parent), Constant)
               and elementwise(bounds[parent].activation) and feeds_one(parent)):
            crossed.append(parent)
            parent = _dependent_parent(graph.nodes[parent])
        pbound = bounds.get(parent) if parent is not None else None
        own = pbound.activation if isinstance(pbound, Linear) else None
        if (isinstance(pbound, Linear) and feeds_only_chain(parent)
                and (elementwise(own) or (crossed and _no_activation(own)))
                and not all(bounds[i].diagonal for i in group_of[parent])):
            before = group_of[parent]
            before.extend(chain)
            inner.setdefault(id(before), []).extend(reversed(crossed))
            chains.remove(chain)
            for i in chain:
                group_of[i] = before
    return [Group(tuple(c), _dependent_parent(graph.nodes[c[0]]), tuple(inner.get(id(c), ())))
            for c in chains]


def _no_activation(activation: Activation | None) -> bool:
    return activation is None or activation.name == "linear"


def group_activations(group: Group, bounds: dict[int, LayerBound]) -> list[Activation]:
    """The activations a group applies (``"linear"`` left out).

    That is the last member's activation, and for a group whose scalings were commuted through
    activations (:func:`fuse`) the activations inside it too: those of its members and of its
    activation layers (an activation layer whose constant is an estimate gives an activation
    marked not certified, with the layer's constant if it is larger). Their derivatives are
    diagonal and commute with the scalings that follow them, so the group's Jacobian is
    ``diag(σ'_1) ⋯ diag(σ'_k) · M`` with ``M`` the composed linear parts (the group's
    operator): the activations act, in effect, after ``M``.
    """
    acts = [bounds[i].activation for i in group.nodes]
    for i in group.inner:  # the layer's constant is AutoLip's factor
        layer, act = bounds[i], bounds[i].activation
        acts.append(dataclasses.replace(act, lipschitz=max(act.lipschitz, layer.value),
                                        certified=act.certified and layer.certified))
    return [a for a in acts if not _no_activation(a)]


class AutoLip:
    """AutoLip on a :class:`~tf_lipschitz.graph.ModelGraph`, with a reusable compiled solver.

    The spectral solver is built once and warm-started on every call, so re-running after the
    weights changed (as :class:`~tf_lipschitz.callbacks.LipCallback` does each epoch) costs a
    few operator products per layer.

    Args:
        graph: The flattened model.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative tolerance of the spectral solver.
        max_products: Cap on operator products per linear group.
        krylov_dim: Krylov basis size for Lanczos.
        jit_compile: Compile the solver with XLA.
    """

    def __init__(self, graph: ModelGraph, *, method: str = "lanczos", tol: float = 1e-6,
                 max_products: int = 2000, krylov_dim: int = 16, jit_compile: bool = False):
        self.method, self.tol, self.max_products = check_solver_arguments(method, tol, max_products)
        self.graph = graph
        bounds = evaluate_rules(graph)
        self.groups = fuse(graph, bounds)
        self.iterative = [g for g in self.groups if not self._closed_form(g, bounds)]
        self.operators = [self.operator(g, bounds) for g in self.iterative]
        self.solver = SpectralSolver(self.operators, method=method, krylov_dim=krylov_dim,
                                     jit_compile=jit_compile)

    @staticmethod
    def _closed_form(group: Group, bounds) -> bool:
        return all(bounds[i].norm is not None for i in group.nodes)

    def operator(self, group: Group, bounds: dict[int, LayerBound]) -> LinearOperator:
        """The fused linear operator of a group, on its real input shape."""
        first = self.graph.nodes[group.nodes[0]]
        names = [self.graph.nodes[i].name for i in group.nodes]
        members = [
            LinearOperator(bounds[i].fn, self.graph.nodes[i].input_shapes[0], name=n,
                           dtype=self.graph.nodes[i].dtype, adjoint=bounds[i].adjoint)
            for i, n in zip(group.nodes, names)
        ]
        op = compose(members, name="+".join(names))
        return dataclasses.replace(op, input_shape=first.input_shapes[0])

    def start_vectors(self, seed: int = 0) -> list:
        """Fresh starting vectors, one per iterative group.

        Large convolutions (possibly fused with per-channel diagonal layers) start from the
        Fourier vector of :func:`tf_lipschitz.starts.group_start`, which spares the hundreds of
        products a random start needs on their clustered spectra; other groups start from a
        random Gaussian vector.
        """
        bounds = evaluate_rules(self.graph)
        vectors = []
        for k, group in enumerate(self.iterative):
            start = group_start([(bounds[i], self.graph.nodes[i]) for i in group.nodes])
            op = self.solver.operators[k]
            vectors.append(self.solver.random_vector(k, seed) if start is None else
                           np.reshape(start, (1, *op.input_shape)).astype(op.dtype))
        return vectors

    def spectral(self, init="warm") -> dict[Group, SpectralResult]:
        """Runs the compiled solver on every group without a closed form.

        Args:
            init: ``"warm"`` (the previous run's vectors; fresh ones on the first run), ``None``
                (fresh: :meth:`start_vectors`), ``"random"`` (random vectors only) or a list of
                arrays shaped like each group's input.
        """
        if isinstance(init, str) and init not in ("warm", "random"):
            raise InvalidArgumentError(
                f"init must be 'warm', 'random', None or a list of arrays (one per linear "
                f"operator); received init={init!r}.")
        if isinstance(init, str) and init == "random":
            init = None
        elif init is None or (isinstance(init, str) and init == "warm"
                              and not self.solver.has_warm_start):
            init = self.start_vectors()
        results = self.solver.run(tol=self.tol, max_products=self.max_products, init=init)
        return dict(zip(self.iterative, results))

    def run(self, *, certified: bool = False, init="warm", model_name: str = "model",
            spectral: dict[Group, SpectralResult] | None = None,
            segments: Sequence[Segment] = (), verbose: int = 0) -> LipschitzReport:
        """Computes the AutoLip bound.

        Args:
            certified: Use certified per-layer norms wherever available (see
                ``docs/concepts.md``); the report is certified only if every factor is.
            init: Starting vectors of the solver (``"warm"``, ``None``, ``"random"`` or arrays;
                see :meth:`spectral`).
            model_name: Name shown in the report.
            spectral: Precomputed solver results (otherwise the solver runs).
            segments: Chains whose constant is given (SeqLip); their nodes are not re-bounded.
            verbose: 1 shows a progress bar over the certificates (certified mode only; a
                convolution on a small grid can take a minute, see :mod:`tf_lipschitz.gridconv`).

        Returns:
            A :class:`~tf_lipschitz.report.LipschitzReport`.
        """
        start = time.perf_counter()
        graph = self.graph
        bounds = evaluate_rules(graph)
        if spectral is None:
            spectral = self.spectral(init=init)
        lip: dict[int, float] = {}
        proven: dict[int, bool] = {}  # whether lip[i] is certified (a certified 0: a constant)
        rows: dict[int, LayerRow] = {}
        all_certified = True
        group_of_last = {g.nodes[-1]: g for g in self.groups}
        in_group = {i for g in self.groups for i in g.nodes + g.inner}
        segment_of_last = {seg.nodes[-1]: seg for seg in segments}
        in_segment = {i for seg in segments for i in seg.nodes}
        bar = progress_bar(len(self.groups), unit_name="certificate", label="certified AutoLip",
                           verbose=verbose if certified else 0)

        sources = model_input_sources(graph)
        for node in graph.nodes:
            i = node.index
            if node.is_input:
                lip[i], proven[i] = 1.0, True
                rows[i] = LayerRow(node.name, "InputLayer", "input", node.input_shapes[0],
                                   node.output_shapes[0], cumulative=1.0)
                continue
            if not node.dependent:
                lip[i], proven[i] = 0.0, True
                continue
            if i in in_segment:
                seg = segment_of_last.get(i)
                if seg is not None:
                    base = (lip[seg.source], proven[seg.source]) if seg.source is not None else (
                        0.0, True)
                    lip[i] = compose_bounds((seg.value, seg.certified), base)
                    proven[i] = seg.certified and base[1]
                    all_certified &= seg.certified
                    for k, row in seg.rows.items():
                        cumulative = compose_bounds((row.cumulative, seg.certified), base)
                        rows[k] = dataclasses.replace(row, cumulative=cumulative)
                continue
            if i in in_group and i not in group_of_last:
                continue  # interior of a fused chain: accounted for at its last node
            bound = bounds[i]
            if isinstance(bound, Merge):
                parents = [lip[p] if d else 0.0 for p, d in zip(node.parents, node.input_dependent)]
                proven[i] = all(proven[p] for p, d in zip(node.parents, node.input_dependent) if d)
                note = bound.note
                separate = _disjoint([sources[p] for p, d in zip(node.parents, node.input_dependent)
                                      if d])
                if bound.disjoint is not None and separate:
                    lip[i] = float(bound.disjoint(parents))
                    note = f"{note}; inputs from disjoint model inputs" if note else note
                else:
                    lip[i] = float(bound.combine(parents))
                rows[i] = LayerRow(node.name, node.class_name, "merge", node.input_shapes[0],
                                   node.output_shapes[0], cumulative=lip[i], note=note)
                continue
            if isinstance(bound, Constant):
                parent = _dependent_parent(node)
                lip[i] = compose_bounds((bound.value, bound.certified),
                                        (lip[parent], proven[parent]))
                proven[i] = bound.certified and proven[parent]
                all_certified &= bound.certified
                rows[i] = LayerRow(
                    node.name, node.class_name, "constant", node.input_shapes[0],
                    node.output_shapes[0], lipschitz=bound.value,
                    bound_kind=CERTIFIED if bound.certified else ESTIMATE,
                    activation=bound.activation.name if bound.activation else None,
                    cumulative=lip[i], note=bound.note,
                )
                continue
            group = group_of_last[i]
            row, value, is_cert = self._group_row(group, bounds, spectral.get(group), certified)
            if bar is not None:
                bar.add(1)
            parent = (lip[group.parent], proven[group.parent]) if group.parent is not None else (
                0.0, True)
            lip[i] = compose_bounds((value, is_cert), parent)
            proven[i] = is_cert and parent[1]
            all_certified &= is_cert
            rows[i] = dataclasses.replace(row, cumulative=lip[i])

        for i, value in lip.items():  # a NaN would pass every comparison silently
            if not (math.isfinite(value) or value == math.inf):
                node = graph.nodes[i]
                raise LipschitzError(
                    f"The Lipschitz bound up to layer '{node.name}' ({node.class_name}) is "
                    f"{value}: a factor read from the weights is not a number (NaN, or the "
                    "square root of a negative BatchNormalization variance). Check that layer "
                    "and the ones before it for inf/NaN weights.")
        outputs = {graph.nodes[o].name: lip[o] for o in graph.outputs}
        if len(graph.outputs) > 1 and _disjoint([sources[o] for o in graph.outputs]):
            upper = max(lip[o] for o in graph.outputs)  # ‖Δx‖² = Σ ‖Δx_o‖² over the outputs
        else:
            upper = combine_outputs([lip[o] for o in graph.outputs])
        if all_certified:
            # Products and sums of certified factors round to nearest: widen by their worst
            # case (a few per node), so that a certified bound stays provably above.
            operations = 4 * len(graph.nodes) + 8
            upper = round_up(upper, operations)
            outputs = {name: round_up(value, operations) for name, value in outputs.items()}
            rows = {k: row if row.kind == "input" else dataclasses.replace(
                        row, cumulative=round_up(row.cumulative, operations))
                    for k, row in rows.items()}
        return LipschitzReport(
            method="autolip",
            upper=upper,
            certified=all_certified,
            layers=tuple(rows[k] for k in sorted(rows)),
            outputs=outputs,
            settings={"solver": self.method, "tol": self.tol, "max_products": self.max_products,
                      "certified_mode": certified},
            elapsed=time.perf_counter() - start,
            model_name=model_name,
        )

    def _certificate(self, group: Group, bounds) -> float | None:
        """The group's certificate (:func:`~tf_lipschitz.certify.fused_certificate`).

        When the whole chain has none and it ends with scalings (commuted into it, or fused),
        the part before them and each scaling are certified apart (``‖D M‖ ≤ ‖D‖ ‖M‖``): a
        scaling whose op has no float64 kernel (``FusedBatchNormV3`` in a graph) would
        otherwise leave the whole group an estimate.
        """
        members = [(bounds[i], self.graph.nodes[i]) for i in group.nodes]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cert = fused_certificate(members)
        k = len(members)
        while k > 1 and members[k - 1][0].diagonal:
            k -= 1
        if cert is None and k < len(members):
            parts = [fused_certificate(members[:k])]
            parts += [fused_certificate([m]) for m in members[k:]]
            if all(p is not None for p in parts):
                return compose_bounds(*((p, True) for p in parts))
        for w in caught:  # the group stays an estimate (or is certified): say why as usual
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return cert

    def _group_row(self, group: Group, bounds, result: SpectralResult | None, certified: bool):
        nodes = [self.graph.nodes[i] for i in group.nodes]
        members = [bounds[i] for i in group.nodes]
        acts = group_activations(group, bounds)
        post = math.prod(a.lipschitz for a in acts)
        cert = None
        if certified:  # certificates cost more than the estimate: only on request
            try:
                cert = self._certificate(group, bounds)
            except InvalidArgumentError as err:  # NaN or inf weights: name the layers
                raise LipschitzError(f"Certifying '{'+'.join(n.name for n in nodes)}' "
                                     f"({'+'.join(n.class_name for n in nodes)}): {err}") from err
        if result is None:
            norm = compose_bounds(*((float(m.norm()), True) for m in members))
            method, products, residual, converged, is_cert = "closed-form", 0, None, None, True
        else:
            norm, products = result.sigma, result.products
            residual, converged = result.residual, result.converged
            method, is_cert = result.method, False
            if not converged:
                warnings.warn(
                    f"The {result.method} iteration for '{'+'.join(n.name for n in nodes)}' did not "
                    f"reach tol={self.tol:g} in {products} products (relative residual "
                    f"{residual:.2e}); its norm is an underestimate. Raise max_products.",
                    stacklevel=3,
                )
        act_cert = all(a.certified for a in acts)
        value = norm
        if certified and cert is not None:  # a closed form's certificate is rounded up: use it
            value, is_cert = (cert if not is_cert else max(norm, cert)), True
        lipschitz = compose_bounds((value, is_cert), *((a.lipschitz, a.certified) for a in acts))
        is_cert = is_cert and act_cert
        notes = [m.note for m in members if m.note]
        inner = [bounds[i].activation.name for i in group.nodes[:-1]
                 if not _no_activation(bounds[i].activation)]
        inner += [f"'{self.graph.nodes[i].name}'" for i in group.inner]
        if inner:
            notes.append(f"scaling commuted through {' and '.join(inner)}: "
                         f"‖diag(s)·W‖ × {post:.4g}")
        row = LayerRow(
            name="+".join(n.name for n in nodes),
            class_name="+".join(n.class_name for n in nodes),
            kind="linear",
            input_shape=nodes[0].input_shapes[0],
            output_shape=nodes[-1].output_shapes[0],
            lipschitz=lipschitz,
            norm=norm,
            certificate=cert,
            activation="+".join(a.name for a in acts) or None,
            bound_kind=CERTIFIED if is_cert else ESTIMATE,
            method=method,
            products=products,
            residual=residual,
            converged=converged,
            note="; ".join(notes),
        )
        return row, lipschitz, is_cert
