"""Benchmark: compiled, batched spectral solver vs a plain eager per-layer power loop.

The baseline is what the paper's reference code does: for each layer separately, an eager
Python loop of a fixed 500 power iterations through autodiff. tf_lipschitz runs all layers'
iterations together in one compiled ``tf.function`` with a tolerance-based stop: Lanczos from
its fresh starts (Fourier vectors for large convolutions, ``tf_lipschitz.starts``; what AutoLip
does), and for comparison Lanczos and power iteration from random vectors. Both run in the same process on the same operators (the
model's fused linear layers on their real input shapes); accuracy is measured against a tight
reference (dense SVD where the operator is small, else the largest value any method found: all
converge from below).

Prints a table and a JSON line of ratios measured in this run.

Usage:
    python benchmarks/power_method.py                     # VGG16 at 224x224 + MNIST CNN
    python benchmarks/power_method.py --vgg-size 64       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_lipschitz as tfl  # noqa: E402
from tf_lipschitz.power import SpectralSolver, jtj_product  # noqa: E402


def mnist_cnn() -> keras.Model:
    """The paper's 4-layer MNIST CNN (28→12→5→2→1)."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 5, strides=2, activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(128, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(10, 2),
    ], name="mnist_cnn4")


def eager_power(op, iterations: int, seed: int) -> float:
    """The baseline: a plain eager loop of ``iterations`` power steps on one operator."""
    v = tf.random.stateless_normal((1, *op.input_shape), [seed, 0])
    v = v / tf.norm(v)
    for _ in range(iterations):
        _, g = jtj_product(op.fn, v)
        v = g / tf.norm(g)
    return float(tf.norm(op.fn(v)))


def reference_norms(ops, candidates: list[list[float]],
                    certificates: list[float | None]) -> tuple[list[float], list[float]]:
    """``(lower, upper)`` brackets of every operator's true norm.

    Small operators: a dense SVD (both brackets). Otherwise the lower bracket is the largest
    value any method found (all converge from below) and the upper one the certified norm of
    ``tf_lipschitz.certify`` (infinite if the operator has none), so the true error of an
    estimate lies between ``(lower - v) / lower`` and ``(upper - v) / upper``.
    """
    lower, upper = [], []
    for i, op in enumerate(ops):
        if op.size <= 4096:
            exact = float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])
            lower.append(exact)
            upper.append(exact)
        else:
            lower.append(max(c[i] for c in candidates))
            upper.append(certificates[i] if certificates[i] is not None else float("inf"))
    return lower, upper


METHODS = {  # name: (solver method, Fourier starts, tolerance: "tol" or "matched")
    "fourier": ("lanczos", True, "tol"),  # Lanczos from tf_lipschitz's fresh starts (AutoLip)
    "fourier_matched": ("lanczos", True, "matched"),  # same, at the looser matched tolerance
    "lanczos": ("lanczos", False, "tol"),  # Lanczos from random vectors
    "power": ("power", False, "tol"),  # compiled power iteration from random vectors
}
LABELS = {"fourier": "lanczos Fourier start", "fourier_matched": "same, matched tol",
          "lanczos": "lanczos random start", "power": "power random start"}


def bench(model: keras.Model, iterations: int, tol: float, methods=tuple(METHODS),
          matched_tol: float = 1e-4) -> dict:
    est = tfl.LipschitzEstimator(model, verbose=0)
    ops = est.engine.operators
    long_run = sum(op.size for op in ops) > 1_000_000

    t0 = time.perf_counter()
    base = [eager_power(op, iterations, seed=i) for i, op in enumerate(ops)]
    t_base = time.perf_counter() - t0

    rows = {"baseline": (t_base, base, [iterations] * len(ops))}
    for name in methods:
        method, fourier, which = METHODS[name]
        solver_tol = tol if which == "tol" else matched_tol
        solver = SpectralSolver(ops, method=method)

        def solve():
            # Fresh starts are computed inside the timed region: they are part of the cost.
            init = est.engine.start_vectors() if fourier else None
            # Same cap as the baseline: never more products per operator than it uses.
            return solver.run(tol=solver_tol, max_products=iterations, init=init)

        t0 = time.perf_counter()
        res = solve()  # includes tracing
        t_first = time.perf_counter() - t0
        if method == "lanczos" or not long_run:
            t0 = time.perf_counter()
            res = solve()  # traced
            t_run = time.perf_counter() - t0
        else:  # slow power iteration on big models: one run, tracing included (pessimistic)
            t_run = t_first
        t0 = time.perf_counter()
        solver.run(tol=solver_tol, max_products=iterations, init="warm")
        t_warm = time.perf_counter() - t0
        rows[name] = (t_run, [r.sigma for r in res], [r.products for r in res])
        rows[name + "_first_call"] = (t_first, None, None)
        rows[name + "_warm"] = (t_warm, None, None)

    certs = est.autolip(certified=True).layers
    by_name = {row.name: row.certificate for row in certs}
    lower, upper = reference_norms(ops, [rows[k][1] for k in ("baseline", *methods)],
                                   [by_name.get(op.name) for op in ops])

    def err(values):
        """Largest relative error below the lower bracket (a lower bound on the true error)."""
        return max(abs(v - r) / r for v, r in zip(values, lower) if r > 0)

    def err_upper(values):
        """Largest relative distance to the certified bracket (an upper bound on the error)."""
        return max((r - v) / r for v, r in zip(values, upper) if r > 0)

    out = {
        "model": model.name,
        "operators": len(ops),
        "baseline_seconds": t_base,
        "baseline_max_rel_error": err(base),
        "baseline_max_rel_error_upper": err_upper(base),
        "certified_brackets": int(sum(np.isfinite(upper))),
        "baseline_products": iterations * len(ops),
        "methods": list(methods),
        "tol": tol,
        "matched_tol": matched_tol,
    }
    for method in methods:
        t_run, values, products = rows[method]
        out[f"{method}_seconds"] = t_run
        out[f"{method}_first_call_seconds"] = rows[method + "_first_call"][0]
        out[f"{method}_warm_seconds"] = rows[method + "_warm"][0]
        out[f"{method}_max_rel_error"] = err(values)
        out[f"{method}_max_rel_error_upper"] = err_upper(values)
        out[f"{method}_products"] = int(sum(products))
        out[f"speedup_{method}_vs_baseline"] = t_base / t_run
        out[f"speedup_{method}_warm_vs_baseline"] = t_base / rows[method + "_warm"][0]
    return out


def table(results: list[dict], iterations: int) -> str:
    """The results as a text table (errors: below the best value found / below the certificate)."""
    head = (f"{'model':<12}{'ops':>4}  {'method':<24}{'seconds':>9}{'products':>10}"
            f"{'rel err >=':>12}{'rel err <=':>12}{'speed-up':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['model']:<12}{r['operators']:>4}  {'eager power x' + str(iterations):<24}"
                     f"{r['baseline_seconds']:>9.2f}{r['baseline_products']:>10}"
                     f"{r['baseline_max_rel_error']:>12.2e}"
                     f"{r['baseline_max_rel_error_upper']:>12.2e}{1.0:>10.1f}")
        for method in r["methods"]:
            for label, key in ((LABELS[method], f"{method}_seconds"),
                               ("  first call (tracing)", f"{method}_first_call_seconds"),
                               ("  warm start", f"{method}_warm_seconds")):
                main_row = key == f"{method}_seconds"
                errs = (f"{r[f'{method}_max_rel_error']:>12.2e}"
                        f"{r[f'{method}_max_rel_error_upper']:>12.2e}") if main_row else " " * 24
                lines.append(f"{'':<12}{'':>4}  {label:<24}{r[key]:>9.2f}"
                             f"{r[f'{method}_products'] if main_row else '':>10}{errs}"
                             f"{r['baseline_seconds'] / r[key]:>10.1f}")
    lines.append("rel err >=: below the best value found (or dense SVD); rel err <=: below the "
                 "certified norm; speed-up: eager baseline time / row time. Solver tol "
                 f"{results[0]['tol']:g} (matched row: {results[0]['matched_tol']:g}).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-size", type=int, default=224, help="VGG16 input size (default 224)")
    parser.add_argument("--iterations", type=int, default=500, help="baseline iterations (500)")
    parser.add_argument("--tol", type=float, default=1e-6, help="solver tolerance (1e-6)")
    parser.add_argument("--skip-vgg", action="store_true", help="only the MNIST CNN")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="compiled solvers to compare with the eager baseline")
    parser.add_argument("--matched-tol", type=float, default=1e-4,
                        help="tolerance of the 'fourier_matched' row, loose enough to approach "
                             "the baseline's accuracy from above (1e-4)")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    models = [mnist_cnn()]
    if not args.skip_vgg:
        models.append(keras.applications.VGG16(weights=None, input_shape=(args.vgg_size,) * 2 + (3,)))
    results = [bench(m, args.iterations, args.tol, tuple(args.methods), args.matched_tol)
               for m in models]

    print(table(results, args.iterations))
    print(json.dumps({"benchmark": "power_method", "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
