"""SeqLip time on the paper's MNIST CNN and on a VGG-sized model, next to AutoLip.

Both bounds run in the same process on the same models; the table gives wall times, the time
SeqLip spends in singular decompositions and in the pattern search, and the ratios
SeqLip time / AutoLip time and SeqLip bound / AutoLip bound. Weights are Keras's random
initialisation (timings barely depend on them). The dropped singular values are bounded and
added back (``remainder=True``): with random weights the spectra are flat, so the SeqLip bound
stays close to AutoLip; ignoring them (the paper's truncation) with a small E on VGG gives
meaningless values far below the true constant.

- ``mnist_cnn4``: the 4-layer MNIST CNN of Scaman & Virmaux (2018) on 28×28×1 inputs, greedy
  SeqLip with the paper's E = 200 triplets per convolution (exact dense SVDs: the operators
  are small enough);
- ``vgg16_32``: ``keras.applications.VGG16(weights=None)`` on 32×32×3 inputs with a 10-class
  top (138 million → 34 million parameters; 13 convolutions, 3 dense layers): SeqLip on every
  block (convolutions between max-poolings) and on the dense top, with iterative top-E
  triplets (E small: the block subspace iteration costs E+8 convolution products per step);
- ``mnist_bn``: a small MNIST CNN with a BatchNormalization after ``Conv2D(activation="relu")``
  (the shape of a user trial's model: Conv 3×3×16 → BN → max-pooling → Conv 3×3×32 stride 2 →
  Dense 32 → Dense 10), its BN statistics drawn at random (a fresh BN scales every channel by
  ~1, which hides what the scaling does), SeqLip at its defaults. AutoLip measures the BN with
  the convolution across the ReLU (``‖diag(s) W‖``), which SeqLip then starts from;
- ``cifar_cnn``: 32×32×3 → Conv2D(32, 3) → Conv2D(16, 3, strides=2) → Dense(10), SeqLip at its
  defaults, run twice in the same process: with the singular decompositions of operators of at
  most :data:`tf_lipschitz.seqlip.GRAM_SIDE` inputs or outputs taken from their Gram matrix
  (the default), then by the block subspace iteration (``GRAM_SIDE = 0``, the route before
  session 20). The row of the second run is ``cifar_cnn (subspace)``, and the JSON gives the
  time ratio of the two and the relative difference of the bounds.

Usage::

    python benchmarks/seqlip.py            # full run
    python benchmarks/seqlip.py --quick    # smaller E, fewer iterations
    python benchmarks/seqlip.py --json benchmarks/seqlip.json
    python benchmarks/seqlip.py --only cifar_cnn   # Gram route against subspace iteration
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

L = keras.layers


def mnist_cnn4() -> keras.Model:
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(32, 5, strides=2, activation="relu"),
        L.Conv2D(64, 3, strides=2, activation="relu"),
        L.Conv2D(128, 3, strides=2, activation="relu"),
        L.Conv2D(10, 2), L.Flatten(),
    ], name="mnist_cnn4")


def vgg16_32() -> keras.Model:
    return keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10,
                                     classifier_activation=None, name="vgg16_32")


def mnist_bn() -> keras.Model:
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 3, activation="relu"), L.BatchNormalization(), L.MaxPooling2D(),
        L.Conv2D(32, 3, strides=2, activation="relu"), L.Flatten(),
        L.Dense(32, activation="relu"), L.Dense(10),
    ], name="mnist_bn")
    bn = model.layers[1]
    rng = np.random.default_rng(0)
    bn.gamma.assign(rng.uniform(0.2, 3.0, 16).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.1, 2.0, 16).astype("float32"))
    return model


def cifar_cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        L.Conv2D(32, 3, padding="same", activation="relu"),
        L.Conv2D(16, 3, strides=2, padding="same", activation="relu"), L.Flatten(),
        L.Dense(10),
    ], name="cifar_cnn")


def measure(name: str, model: keras.Model, options: dict) -> dict:
    est = tfl.LipschitzEstimator(model, verbose=0)
    start = time.perf_counter()
    auto = est.autolip()
    t_auto = time.perf_counter() - start
    start = time.perf_counter()
    seq = est.seqlip(**options)
    t_seq = time.perf_counter() - start
    pairs = seq.settings["pairs"]
    row = {
        "model": name,
        "parameters": int(model.count_params()),
        "pairs": len(pairs),
        "widest_link": max((p["width"] for p in pairs), default=0),
        "modes": sorted({p["mode"] for p in pairs}),
        "options": options,
        "autolip": auto.upper,
        "autolip_kind": auto.kind,
        "seqlip": seq.upper,
        "seqlip_kind": seq.kind,
        "autolip_seconds": t_auto,
        "seqlip_seconds": t_seq,
        "seqlip_spectra_seconds": seq.settings["seconds"]["spectra"],
        "seqlip_pairs_seconds": seq.settings["seconds"]["pairs"],
        "time_ratio_seqlip_over_autolip": t_seq / t_auto,
        "bound_ratio_seqlip_over_autolip": seq.upper / auto.upper,
    }
    print(f"{name}: AutoLip {auto.upper:.4g} in {t_auto:.1f} s, SeqLip {seq.upper:.4g} in "
          f"{t_seq:.1f} s", flush=True)
    return row


def compare_routes(model: keras.Model, gram_row: dict, options: dict) -> dict:
    """Re-runs :func:`measure` with the Gram route off (``seqlip.GRAM_SIDE = 0``)."""
    from tf_lipschitz import seqlip

    saved = seqlip.GRAM_SIDE
    seqlip.GRAM_SIDE = 0
    try:
        row = measure(f"{gram_row['model']} (subspace)", model, options)
    finally:
        seqlip.GRAM_SIDE = saved
    return {
        "model": gram_row["model"],
        "gram_seconds": gram_row["seqlip_seconds"],
        "subspace_seconds": row["seqlip_seconds"],
        "time_ratio_subspace_over_gram": row["seqlip_seconds"] / gram_row["seqlip_seconds"],
        "gram_bound": gram_row["seqlip"],
        "subspace_bound": row["seqlip"],
        "bound_relative_difference": abs(row["seqlip"] - gram_row["seqlip"]) / gram_row["seqlip"],
        "row": row,
    }


def table(rows: list[dict]) -> str:
    head = (f"{'model':<22}{'params':>11}{'pairs':>6}{'widest':>8}{'AutoLip s':>11}"
            f"{'SeqLip s':>10}{'(SVD s':>9}{'search s)':>11}{'time ×':>8}{'Seq/Auto':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<22}{r['parameters']:>11,}{r['pairs']:>6}{r['widest_link']:>8}"
            f"{r['autolip_seconds']:>11.1f}{r['seqlip_seconds']:>10.1f}"
            f"{r['seqlip_spectra_seconds']:>9.1f}{r['seqlip_pairs_seconds']:>11.1f}"
            f"{r['time_ratio_seqlip_over_autolip']:>8.1f}"
            f"{r['bound_ratio_seqlip_over_autolip']:>10.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller E and iteration caps")
    parser.add_argument("--only", choices=("mnist_cnn4", "vgg16_32", "mnist_bn", "cifar_cnn"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    configs = {
        "mnist_cnn4": (mnist_cnn4, {"mode": "greedy", "top_k": 50 if args.quick else 200,
                                    "max_sweeps": 2 if args.quick else 10}),
        "vgg16_32": (vgg16_32, {"mode": "greedy", "top_k": 8 if args.quick else 16,
                                "subspace_max_iter": 10 if args.quick else 30,
                                "max_sweeps": 1 if args.quick else 2}),
        "mnist_bn": (mnist_bn, {}),
        "cifar_cnn": (cifar_cnn, {}),
    }
    rows, comparisons = [], []
    for name, (build, options) in configs.items():
        if args.only in (None, name):
            model = build()
            rows.append(measure(name, model, options))
            if name == "cifar_cnn":
                comparisons.append(compare_routes(model, rows[-1], options))
                rows.append(comparisons[-1].pop("row"))
    print()
    print(table(rows))
    for c in comparisons:
        print(f"{c['model']}: Gram route {c['gram_seconds']:.1f} s, subspace iteration "
              f"{c['subspace_seconds']:.1f} s ({c['time_ratio_subspace_over_gram']:.1f}×); "
              f"bounds {c['gram_bound']:.6g} and {c['subspace_bound']:.6g}")
    result = {"benchmark": "seqlip", "quick": args.quick, "machine": platform.machine(),
              "cpus": os.cpu_count(), "keras": keras.__version__, "rows": rows,
              "gram_route": comparisons}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
