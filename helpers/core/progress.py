"""Progress bars that suit where they are shown: a redrawn bar on a terminal, a widget in a
notebook, and a few plain lines in a log (``make demo > demo.log``, a pipe, a CI job).

tqdm redraws its bar with carriage returns whatever the stream is, so a log file or a pipe
gets every redraw: thousands of lines for one loop. :func:`progress_bar` is the one place the
package makes a bar; it picks tqdm.auto's bar where the stream is a terminal or a notebook
shows it, and :class:`LogBar` otherwise.

A ``progress`` argument is ``True`` (bars, and training's line per epoch), ``False`` (nothing) or
:data:`EPOCHS` (training's line per epoch only, no bar: a notebook that retrains keeps its saved
output short); :func:`show_bars` reads it.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

# A line in a log at most this often (seconds): enough to see a long loop move.
LOG_INTERVAL = 30.0
# progress=EPOCHS: a training run prints its one line per epoch and draws no bar.
EPOCHS = "epochs"
# tqdm.auto's bar is the widget one when a notebook kernel runs this process.
_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)


class LogBar(std_tqdm):
    """A bar for a stream that is not a terminal: one plain line (ending in a newline, never a
    carriage return or a cursor move) at most every :data:`LOG_INTERVAL` seconds while the loop
    makes progress, and the final state when it ends, even for ``leave=False``."""

    # tqdm's monitor thread would force a refresh every ``maxinterval`` seconds, a line each time.
    monitor_interval = 0

    def __init__(self, *args, **kwargs):
        # tqdm displays the bar as it starts: a line saying "nothing done yet" is not worth writing.
        self._logged_n = kwargs.get("initial", 0)
        kwargs["mininterval"] = max(kwargs.get("mininterval") or 0.0, LOG_INTERVAL)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval") or 0.0, kwargs["mininterval"])
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        # ``msg`` is tqdm clearing a bar that is not left: a log has nothing to erase. The same
        # count again would only repeat the previous line.
        if msg is not None or self.n == self._logged_n:
            return False
        self._logged_n = self.n
        self.fp.write(f"{self}\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        """Nothing to clear in a log (tqdm's ``write`` clears bars before it prints: a carriage return)."""

    def close(self):
        if not self.disable and hasattr(self, "last_print_t"):
            self._ema_dt = lambda: None  # the final line shows the overall rate, as tqdm's own final bar
            self.display()
            self.leave = False  # written already: tqdm's close must not add a newline after it
        super().close()


def progress_bar(iterable=None, **tqdm_kwargs):
    """A tqdm bar over ``iterable`` (or a manual one: ``total=``, ``.update(n)``), taking tqdm's
    arguments: tqdm.auto's bar on a terminal or in a notebook, a :class:`LogBar` when the stream
    (``file``, default stderr) is a file or a pipe."""
    stream = tqdm_kwargs.get("file") or sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    if _NOTEBOOK or terminal:
        return auto_tqdm(iterable, **tqdm_kwargs)
    return LogBar(iterable, **tqdm_kwargs)


def show_bars(progress: bool | str) -> bool:
    """Whether a ``progress`` argument asks for bars: ``True`` does; ``False`` and :data:`EPOCHS`
    (a line per training epoch only) do not. Any other string is an error, never a silent bar."""
    if isinstance(progress, str):
        if progress != EPOCHS:
            raise ValueError(f"progress={progress!r}: expected True, False or {EPOCHS!r}")
        return False
    return bool(progress)
