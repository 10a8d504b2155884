"""Quick start: train a small CNN on real digits and bound its Lipschitz constant.

Data: the 8×8 handwritten digits that ship inside scikit-learn (no download).

Run:
    python examples/quickstart.py            # ~1 minute on 2 CPU cores
    python examples/quickstart.py --epochs 1 --json report.json
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_lipschitz as tfl  # noqa: E402


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_cnn",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--json", help="write the AutoLip report as JSON to this file")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    model = build_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=args.epochs, batch_size=64, validation_split=0.2, verbose=2)

    estimator = tfl.LipschitzEstimator(model)
    report = estimator.autolip()
    print(report)
    certified = estimator.autolip(certified=True)
    print(f"\nCertified AutoLip ({certified.kind}): {certified.upper:.6g}")
    lower = estimator.lower_bound(x[:64], steps=30)
    print(lower)
    print(f"Gap upper/lower: {report.upper / lower.value:.3g} "
          "(how far from tight the upper bound may be)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(report.to_json())
        print(f"Report written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
