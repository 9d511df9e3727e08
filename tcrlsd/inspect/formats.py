"""The output formats of `tcrlsd inspect`: name -> renderer, each ``(View, RenderOptions) -> str``."""

from __future__ import annotations

from typing import Callable

from tcrlsd.inspect import render_html, render_jsonl, render_terminal
from tcrlsd.inspect.views import RenderOptions, View

__all__ = ["FORMATS"]

FORMATS: dict[str, Callable[[View, RenderOptions], str]] = {
    "table": render_terminal.render,  # rich text for a terminal (colour when stdout is one)
    "html": render_html.render,  # one standalone page, no script, no network
    "jsonl": render_jsonl.render,  # one JSON object per line, for scripts
}
