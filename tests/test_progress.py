"""Progress output: plain lines when the output is not a terminal, Keras' bar when it is."""

import io
import sys

import keras
import numpy as np

import tf_lipschitz as tfl
from tf_lipschitz import progress


def _control_codes(text: str) -> bool:
    return any(c in text for c in ("\r", "\b", "\x1b"))


def test_line_progress_prints_plain_lines_and_always_the_last(capsys):
    bar = progress.LineProgress(5, unit_name="block", label="demo", interval=3600.0)
    for i in range(5):
        bar.update(i + 1, values=[("norm", 2.5), ("flips", 3)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert not _control_codes(out)
    assert len(lines) == 2  # the first update, then nothing until the last (interval 1 h)
    assert lines[0].startswith("demo: 1/5 blocks, ")
    assert lines[-1].startswith("demo: 5/5 blocks, ") and lines[-1].endswith("norm 2.5, flips 3")
    bar = progress.LineProgress(2, unit_name="op", interval=0.0)
    bar.add(1)
    bar.add(1)
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_progress_bar_is_keras_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(progress.progress_bar(3), keras.utils.Progbar)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert isinstance(progress.progress_bar(3), progress.LineProgress)
    assert progress.progress_bar(3, verbose=0) is None


def test_certified_autolip_progress_has_no_terminal_codes_in_a_log(capsys):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.ReLU(),
                              keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.standard_normal(w.shape).astype("float32"))
    report = tfl.LipschitzEstimator(model, verbose=1).autolip(certified=True)
    out = capsys.readouterr().out
    assert report.certified
    assert not _control_codes(out), repr(out)
    assert out.splitlines()[-1].startswith("certified AutoLip: 2/2 certificates")


def test_line_progress_finalizes_early_stops_and_formats_values(capsys):
    bar = progress.LineProgress(10, unit_name="batch", label="demo", interval=3600.0)
    bar.update(1)
    bar.update(2, values=[("norm", np.float32(0.1))], finalize=True)  # a loop that stopped
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("demo: 1/10 batches")
    assert lines[1].startswith("demo: 2/10 batches") and lines[1].endswith("norm 0.1")
    quiet = progress.LineProgress(3, unit_name="step", interval=float("inf"))  # verbose=2
    for i in range(3):
        quiet.update(i + 1)
    assert len(capsys.readouterr().out.splitlines()) == 1
