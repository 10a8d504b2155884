"""Bounds of audio classifiers that start with Keras' STFTSpectrogram or MelSpectrogram layer.

Data: generated, no download. Each clip is 1024 samples (8 kHz) of one of three tones
(440, 880 or 1760 Hz, random phase and amplitude) in white noise; the classifier must name the
tone. Two small models are trained, one on the STFT magnitudes, one on a mel spectrogram, and
for each the script prints

- the certified AutoLip bound and its per-layer table: the spectrogram layer is bounded by the
  norm of its stacked real/imaginary STFT operator (``‖A‖``, exact for the magnitudes; times
  the mel filterbank's norm for the mel spectrogram);
- a lower bound searched from test clips, and checks ``lower <= certified upper``.

It also shows the settings that have no global Lipschitz constant: a mel spectrogram in
decibels (``power_to_db=True``, the Keras default) is refused with the reason.

Run:
    python examples/audio_spectrogram.py            # 3 epochs on 1,200 clips
    python examples/audio_spectrogram.py --quick    # 1 epoch on 300 clips
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_lipschitz.errors import NotLipschitzError, first_line  # noqa: E402
from tf_lipschitz.estimator import LipschitzEstimator  # noqa: E402

L = keras.layers
RATE, LENGTH, TONES = 8000, 1024, (440.0, 880.0, 1760.0)


def tones(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` noisy clips ``(count, LENGTH, 1)`` and their tone labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(TONES), size=count)
    t = np.arange(LENGTH) / RATE
    freq = np.asarray(TONES)[labels][:, None]
    amp = rng.uniform(0.3, 1.0, (count, 1))
    clips = amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (count, 1)))
    clips += 0.3 * rng.standard_normal(clips.shape)
    return clips[..., None].astype("float32"), labels


def classifier(front: list[L.Layer], name: str) -> keras.Model:
    """``front`` (a spectrogram, laid out as (frames, features)) then a small convolutional
    classifier."""
    return keras.Sequential([keras.Input((LENGTH, 1)), *front,
                             L.Conv1D(16, 3, activation="relu"), L.GlobalAveragePooling1D(),
                             L.Dense(len(TONES))], name=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 300 clips")
    args = parser.parse_args()

    x, y = tones(300 if args.quick else 1200, seed=0)
    x_test, y_test = tones(64, seed=1)
    keras.utils.set_random_seed(0)
    models = [
        classifier([L.STFTSpectrogram(mode="magnitude", frame_length=128, frame_step=64,
                                      fft_length=128)], "stft_magnitude"),
        # MelSpectrogram reads (batch, samples) and returns (batch, mel bins, frames)
        classifier([L.Reshape((LENGTH,)),
                    L.MelSpectrogram(fft_length=128, sequence_stride=64, sequence_length=128,
                                     num_mel_bins=32, sampling_rate=RATE, mag_exp=1.0,
                                     power_to_db=False),
                    L.Permute((2, 1))], "mel_magnitude"),
    ]
    for model in models:
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x, y, epochs=1 if args.quick else 3, batch_size=32, verbose=2,
                  validation_data=(x_test, y_test))
        est = LipschitzEstimator(model, verbose=0)
        report = est.autolip(certified=True)
        print(report)
        lower = est.lower_bound(x_test)
        print(f"lower bound from test clips: {lower.value:.6g}; "
              f"certified upper / lower = {report.upper / lower.value:.3g}\n")
        assert report.certified and lower.value <= report.upper

    in_db = keras.Sequential([keras.Input((LENGTH,)),
                              L.MelSpectrogram(fft_length=128, sequence_stride=64,
                                               sequence_length=128, sampling_rate=RATE)])
    try:
        LipschitzEstimator(in_db, verbose=0).autolip()
    except NotLipschitzError as err:
        print(f"MelSpectrogram with its defaults (decibels): refused, as expected:\n  "
              f"{first_line(err)}")
    else:
        raise AssertionError("a mel spectrogram in decibels has no global Lipschitz constant")


if __name__ == "__main__":
    main()
