"""JSON Lines for scripts: one object per row (list fields) or per sample (full details, tokens).

JSON already escapes C0 controls (``\\u001b``); C1 controls, bidi overrides and line separators
are also written as ``\\uXXXX`` escapes (valid JSON), so that ``cat``-ing the file in a terminal
shows no raw control character while a JSON parser still gets the exact text back.
"""

from __future__ import annotations

import json
from typing import Iterable

from tcrlsd.inspect.safe_text import UNSAFE
from tcrlsd.inspect.views import RenderOptions, View

__all__ = ["render", "dumps_line", "render_lines"]


def dumps_line(obj) -> str:
    s = json.dumps(obj, ensure_ascii=False, allow_nan=False, sort_keys=False)
    # Every UNSAFE char left in s sits inside a JSON string (the syntax itself is ASCII).
    return UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def render_lines(objs: Iterable[dict]) -> str:
    return "".join(dumps_line(o) + "\n" for o in objs)


def render(view: View, opts: RenderOptions) -> str:
    """One sample: its full row. A list or group: one line per row of the page (list fields), or
    full rows with ``opts.tokens``."""
    if view.kind == "sample" or opts.tokens:
        return render_lines(view.samples())
    return render_lines(view.page.rows)
