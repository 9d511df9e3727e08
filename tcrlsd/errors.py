"""The project's own errors: what the person running a command can fix.

Every error raised on purpose for a user -- bad params, a damaged or mismatched input file, a
checkpoint the code cannot use, a resume conflict -- derives from :class:`TcrlsdError` and says which
file, row, column or key is wrong. A stage prints such an error (or an ``OSError``: a missing,
unreadable or unwritable file, a full disk) as one ``<stage>: error: <message>`` line and exits with
status 2 (:mod:`tcrlsd.stagecli`). Anything else -- a bug here, or inside numpy, pyarrow or torch --
is not caught: it keeps its traceback and the exit status is 1.

The package's error classes also derive from the built-in class they used to be (``ValueError``,
``RuntimeError``), so code that catches those keeps working.
"""

from __future__ import annotations

__all__ = ["TcrlsdError", "InputError"]


class TcrlsdError(Exception):
    """Base of the project's own errors (expected errors: one message line, no traceback)."""


class InputError(TcrlsdError, ValueError):
    """An argument, setting or input the caller must change, where no stage-specific error fits."""
