"""Make untrusted model text inert before any output shows it.

A response, critique or problem may contain terminal escape sequences (``ESC [31m`` colours,
``ESC ] 8 ;; url BEL`` hyperlinks, a bare CR that overwrites the line), C1 controls that some
terminals treat like ESC, or Unicode bidi overrides that reorder what a reader sees. Every such
character is replaced by a visible escape (``\\x1b``, ``\\x9b``, ``\\u202e``), so the reader sees
exactly which bytes the model wrote and nothing is interpreted. Renderers then apply their own
escaping on top (rich ``Text`` objects, never markup; ``html.escape``; JSON).
"""

from __future__ import annotations

import re

__all__ = ["visible", "one_line", "UNSAFE"]

# C0 except TAB and LF, DEL, C1; zero-width and bidi controls; line/paragraph separators; BOM.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def visible(text: str | None) -> str:
    """``text`` with every control / invisible-formatting character written as a visible escape."""
    if text is None:
        return ""
    return UNSAFE.sub(_escape, text)


def one_line(text: str | None, width: int | None = None) -> str:
    """:func:`visible`, with newlines as ``⏎`` and tabs as spaces, cut to ``width`` characters."""
    s = visible(text).replace("\n", "⏎").replace("\t", " ")
    if width is not None and len(s) > width:
        s = s[: max(width - 1, 0)] + "…"
    return s
