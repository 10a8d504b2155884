"""Train a small CNN, save it as .keras and export it as a SavedModel, then bound it with the CLI.

The SavedModel keeps only a TensorFlow graph, so ``tf-lipschitz analyze`` runs AutoLip on the
graph ops (``tf_lipschitz.tfgraph``); the .keras file is analysed layer by layer. Both give the
same AutoLip bound. Data: the 8×8 digits that ship with scikit-learn (no download).

Run:
    python examples/export_and_analyze.py [--out DIR] [--epochs N]

It writes ``DIR/digits.keras``, ``DIR/digits_savedmodel/``, ``DIR/report.json`` (schema in
docs/json_schema.md) and ``DIR/layers.png`` (per-layer constants, log scale), and prints the
two CLI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402


def train(epochs: int, seed: int = 0) -> tuple[keras.Model, float]:
    """A small strided CNN with batch norm and max pooling, trained on scikit-learn digits."""
    keras.utils.set_random_seed(seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ], name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x[:split], y[:split], epochs=epochs, batch_size=64, verbose=0)
    _, accuracy = model.evaluate(x[split:], y[split:], verbose=0)
    return model, float(accuracy)


def cli(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python -m tf_lipschitz`` (the same as the ``tf-lipschitz`` console script)."""
    command = [sys.executable, "-m", "tf_lipschitz", *args]
    print("$", " ".join(["tf-lipschitz", *args]), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"tf-lipschitz exited with code {proc.returncode}")
    return proc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="export_and_analyze_output",
                        help="output folder (default: ./export_and_analyze_output)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    model, accuracy = train(args.epochs)
    print(f"trained '{model.name}': test accuracy {accuracy:.3f}")
    keras_path = os.path.join(args.out, "digits.keras")
    export_path = os.path.join(args.out, "digits_savedmodel")
    model.save(keras_path)
    model.export(export_path, verbose=False)

    report_path = os.path.join(args.out, "report.json")
    plot_path = os.path.join(args.out, "layers.png")
    cli("analyze", export_path, "--json", report_path, "--plot", plot_path,
        "--methods", "autolip,lower")
    cli("analyze", keras_path, "--methods", "autolip", "--quiet")

    with open(report_path, encoding="utf-8") as fh:
        doc = json.load(fh)
    autolip = doc["reports"]["autolip"]
    lower = doc["lower_bound"]["value"]
    print(f"SavedModel graph AutoLip: {autolip['upper']:.6g} ({autolip['kind']}), "
          f"lower bound {lower:.6g}, gap {autolip['upper'] / lower:.3g}")
    print(f"wrote {report_path} and {plot_path}")


if __name__ == "__main__":
    main()
