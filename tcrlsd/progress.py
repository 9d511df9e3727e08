"""Progress bars that stay readable in a log file.

On a terminal a stage's bar redraws in place as tqdm does. When stderr is not a terminal (``dvc
repro > log``, CI, a batch job), tqdm would still write a carriage-return redraw ten times a second,
which a log file keeps as one ever-growing line. There the bar instead prints one plain line at most
every ``TCRLSD_PROGRESS_INTERVAL`` seconds (default 30), plus the final state, each ending in a
newline.

Every stage builds its bar through :func:`progress_bar`; tqdm is imported inside it.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from tcrlsd.errors import InputError

__all__ = ["progress_bar", "LogLines", "log_interval"]

DEFAULT_LOG_INTERVAL_S = 30.0


def log_interval() -> float:
    """Seconds between progress lines when not on a terminal (``TCRLSD_PROGRESS_INTERVAL``)."""
    raw = os.environ.get("TCRLSD_PROGRESS_INTERVAL", "")
    try:
        value = float(raw) if raw else DEFAULT_LOG_INTERVAL_S
    except ValueError:
        raise InputError(f"TCRLSD_PROGRESS_INTERVAL must be a number of seconds, got {raw!r}") from None
    return max(value, 0.0)


class LogLines:
    """A file wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def progress_bar(iterable=None, total: int | float | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, file: IO[str] | None = None, **kwargs):
    """A tqdm bar on stderr (or ``file``): live on a terminal, a line every ~30 s in a log.

    ``iterable`` (optional) is wrapped like ``tqdm(iterable)``; ``kwargs`` go to tqdm (postfix, unit_scale...).
    """
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if is_tty:
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream, **kwargs)
    interval = log_interval()
    # maxinterval must not undercut mininterval, or tqdm's monitor forces more frequent lines.
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("mininterval", None)

    class _LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kw):  # noqa: ARG002 -- no forced line
            super().set_postfix(ordered_dict, refresh=False, **kw)

    return _LogBar(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=LogLines(stream),
                mininterval=interval, maxinterval=max(interval, 10.0), ncols=100, ascii=True, **kwargs)
