"""Progress output of long computations: Keras' bar on a terminal, plain lines elsewhere.

``keras.utils.Progbar`` redraws its line with carriage returns, backspaces and colour codes
whenever it runs on a POSIX system, even when the output goes to a file or a CI log, where
those bytes are noise. :func:`progress_bar` returns that bar when the output is interactive (a
terminal or a notebook) and otherwise a :class:`LineProgress`, which prints plain lines, at
most one every ``interval`` seconds and always the last one.

Example:
    >>> from tf_lipschitz.progress import LineProgress
    >>> bar = LineProgress(3, unit_name="sweep", label="demo")  # what a log file receives
    >>> for i in range(3):
    ...     bar.update(i + 1, values=[("norm", 2.0)])
    demo: 1/3 sweeps, 0 s, norm 2
    demo: 3/3 sweeps, 0 s, norm 2
"""

from __future__ import annotations

import math
import sys
import time
from typing import Sequence

import keras
import numpy as np

__all__ = ["LineProgress", "progress_bar"]


def _interactive(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        if isatty is not None and isatty():
            return True
    except ValueError:  # a closed stream
        return False
    return "ipykernel" in sys.modules


class LineProgress:
    """A progress report as plain text lines (no terminal control codes).

    Has the part of the ``keras.utils.Progbar`` interface the library uses: ``update`` and
    ``add``. Values are shown as given (the latest one), not averaged.

    Args:
        target: Total number of steps.
        unit_name: What a step is, shown in the plural.
        label: Prefix of each line.
        interval: Least number of seconds between two lines (the last step always prints;
            ``math.inf``: only the last one, like Keras' ``verbose=2``).
    """

    def __init__(self, target: int, *, unit_name: str = "step", label: str = "tf_lipschitz",
                 interval: float = 10.0):
        self.target = int(target)
        self.unit_name = unit_name
        self.label = label
        self.interval = float(interval)
        self.current = 0
        self._start = time.monotonic()
        self._last = None

    def update(self, current: int, values: Sequence[tuple[str, float]] | None = None,
               finalize: bool | None = None) -> None:
        """Records progress; prints a line if ``interval`` has passed or this is the last step.

        Args:
            current: Steps done.
            values: ``(name, value)`` pairs shown after the count.
            finalize: Whether this is the last update (default: ``current >= target``); a
                loop that stops early passes ``True`` so that its last state is printed.
        """
        self.current = int(current)
        now = time.monotonic()
        done = self.current >= self.target if finalize is None else finalize
        if not done and (self._last is not None and now - self._last < self.interval
                         or self.interval == math.inf):
            return
        self._last = now
        text = (f"{self.label}: {self.current}/{self.target} {_plural(self.unit_name, self.target)}"
                f", {now - self._start:.0f} s")
        for name, value in values or ():
            shown = f"{float(value):.6g}" if isinstance(value, (float, np.floating)) else value
            text += f", {name} {shown}"
        print(text, flush=True)

    def add(self, steps: int, values: Sequence[tuple[str, float]] | None = None) -> None:
        """Records ``steps`` more steps (see :meth:`update`)."""
        self.update(self.current + steps, values)


def _plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def progress_bar(target: int, *, unit_name: str = "step", label: str = "tf_lipschitz",
                 stateful_metrics: Sequence[str] | None = None,
                 verbose: int = 1) -> keras.utils.Progbar | LineProgress | None:
    """A progress bar over ``target`` steps, written to ``sys.stdout`` like Keras' own.

    Args:
        target: Total number of steps.
        unit_name: What a step is (``"certificate"``, ``"batch"``...).
        label: Prefix of the plain lines (non-interactive output only).
        stateful_metrics: Names of values the Keras bar shows as given instead of averaging.
        verbose: As in Keras: 0 shows nothing, 1 the progress, 2 only the last line.

    Returns:
        ``keras.utils.Progbar`` on a terminal or in a notebook, else a :class:`LineProgress`;
        ``None`` for ``verbose=0``.
    """
    if not verbose:
        return None
    if _interactive(sys.stdout):
        return keras.utils.Progbar(target, verbose=verbose, unit_name=unit_name,
                                   stateful_metrics=stateful_metrics)
    return LineProgress(target, unit_name=unit_name, label=label,
                        interval=math.inf if verbose == 2 else 10.0)
