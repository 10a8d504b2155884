"""Certificates of fused linear chains: the exact chain routes against the product of norms.

A ``Resizing`` (or padding, cropping, a bilinear ``UpSampling2D``) followed by a convolution is
one linear map, and certified AutoLip bounds it as one group. Above the dense limit, its
certificate used to be the product of its members' certificates, which can be far above the
chain's norm; :func:`tf_lipschitz.certify.fused_certificate` now bounds such chains exactly,
by materialising them (``"matrix"`` route) or through their float64 Gram matrix (``"gram"``
route), when they are small enough (:func:`tf_lipschitz.certify._chain_route`).

For each chain below, in the same run: the route, the estimate (Lanczos, ``tol=1e-6``), the
chain's norm computed independently (the float64 Gram matrix of its float32 Jacobian columns,
by NumPy), then two certified AutoLip calls (each after an estimate that traced the solver):
with the exact route turned off (the product of the members' certificates, as before session
20; ``cert. s`` is that whole call), then on (``+ route s``: the call again, whose members'
certificates are now cached, so it is the route's own cost), with both certificates over the
norm. Weights are Keras's random initialisation (seed 0).

Usage::

    python benchmarks/chains.py
    python benchmarks/chains.py --quick          # the two smallest chains
    python benchmarks/chains.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_lipschitz as tfl  # noqa: E402
from tf_lipschitz import autolip as autolip_module  # noqa: E402
from tf_lipschitz import certify  # noqa: E402

L = keras.layers

# (name, input shape, layers): every chain fuses into one linear group.
CHAINS = (
    ("resize32_conv16", (28, 28, 1), lambda: [L.Resizing(32, 32), L.Conv2D(16, 3, padding="same")]),
    ("pad_conv_crop", (28, 28, 4), lambda: [L.ZeroPadding2D(2), L.Conv2D(8, 3, padding="same"),
                                            L.Cropping2D(2)]),
    ("resize64_conv32", (28, 28, 1), lambda: [L.Resizing(64, 64), L.Conv2D(32, 3, padding="same")]),
    ("cifar_resize64_conv16", (32, 32, 3),
     lambda: [L.Resizing(64, 64), L.Conv2D(16, 3, padding="same")]),
    ("resize96_conv8", (64, 64, 1), lambda: [L.Resizing(96, 96), L.Conv2D(8, 3, padding="same")]),
)
QUICK = ("resize32_conv16", "pad_conv_crop")


def exact_norm(layers: list, input_shape: tuple[int, ...], batch: int = 256) -> float:
    """``‖J‖₂`` of the chain (biases removed): the top eigenvalue of the float64 Gram matrix
    ``JᵀJ`` of its Jacobian columns, computed from ``batch`` basis vectors at a time and summed
    over blocks of outputs in float64."""
    n_in = int(np.prod(input_shape))
    rows = []  # J's columns, float32 (the chain's own precision)
    for start in range(0, n_in, batch):
        count = min(batch, n_in - start)
        x = np.zeros((count, n_in), np.float32)
        x[np.arange(count), start + np.arange(count)] = 1.0
        y = x.reshape(count, *input_shape)
        for layer in layers:
            y = layer(y)
            if getattr(layer, "bias", None) is not None:
                y = y - layer.bias
        rows.append(keras.ops.convert_to_numpy(y).reshape(count, -1))
    a = np.concatenate(rows)
    del rows
    gram = np.zeros((n_in, n_in))
    for start in range(0, a.shape[1], 4096):
        block = a[:, start:start + 4096].astype(np.float64)
        gram += block @ block.T
    return float(np.sqrt(np.linalg.eigvalsh(gram)[-1]))


def certified_run(model: keras.Model) -> tuple[float, float, float]:
    """The chain's certificate, the time ``fused_certificate`` spent on it, and the time of
    the whole certified AutoLip call (the members' own certificates, which the product route
    multiplies, are computed outside ``fused_certificate``)."""
    times = []
    original = autolip_module.fused_certificate

    def timed(members):
        start = time.perf_counter()
        value = original(members)
        times.append(time.perf_counter() - start)
        return value

    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-6)
    est.autolip()  # traces the solver: the timed call is warm-started from it, as in use
    autolip_module.fused_certificate = timed
    start = time.perf_counter()
    try:
        report = est.autolip(certified=True)
    finally:
        autolip_module.fused_certificate = original
    total = time.perf_counter() - start
    (row,) = [r for r in report.layers if r.kind == "linear"]
    return row.certificate, sum(times), total


def measure(name: str, input_shape: tuple[int, ...], make) -> dict:
    keras.utils.set_random_seed(0)
    layers = make()
    model = keras.Sequential([keras.Input(input_shape), *layers], name=name)
    output_shape = tuple(model.output_shape[1:])
    route = certify._chain_route(input_shape, output_shape)
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-6).autolip()
    (row,) = [r for r in report.layers if r.kind == "linear"]
    norm = exact_norm(layers, input_shape)
    # The product first: the members' certificates it multiplies are cached (keyed on the
    # kernels), and the exact route, which computes them too, then adds only its own cost.
    original = certify._chain_route
    certify._chain_route = lambda i, o: None
    try:
        cert_product, _, total_product = certified_run(model)
    finally:
        certify._chain_route = original
    cert_route, t_route, total_route = certified_run(model)
    result = {
        "chain": name, "input": list(input_shape), "output": list(output_shape),
        "route": route, "estimate": row.norm, "norm": norm,
        "certificate": cert_route, "certificate_seconds": t_route,
        "route_call_seconds": total_route,
        "product": cert_product, "product_certified_autolip_seconds": total_product,
        "certificate_over_norm": cert_route / norm, "product_over_norm": cert_product / norm,
        "estimate_over_norm": row.norm / norm,
    }
    print(f"{name}: route {route}, certificate/norm {result['certificate_over_norm']:.6f} "
          f"(route {t_route:.2f} s), product/norm {result['product_over_norm']:.4f} "
          f"(certified AutoLip {total_product:.2f} s)", flush=True)
    return result


def table(rows: list[dict]) -> str:
    head = (f"{'chain':<24}{'inputs':>8}{'outputs':>9}{'route':>8}{'norm':>10}{'est/norm':>11}"
            f"{'product/norm':>14}{'cert. s':>9}{'cert/norm':>11}{'+ route s':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['chain']:<24}{int(np.prod(r['input'])):>8}{int(np.prod(r['output'])):>9}"
            f"{str(r['route']):>8}{r['norm']:>10.5g}{r['estimate_over_norm']:>11.7f}"
            f"{r['product_over_norm']:>14.4f}{r['product_certified_autolip_seconds']:>9.2f}"
            f"{r['certificate_over_norm']:>11.7f}{r['route_call_seconds']:>11.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the two smallest chains")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    rows = [measure(name, shape, make) for name, shape, make in CHAINS
            if not args.quick or name in QUICK]
    print()
    print(table(rows))
    result = {"benchmark": "chains", "machine": platform.machine(), "cpus": os.cpu_count(),
              "keras": keras.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
