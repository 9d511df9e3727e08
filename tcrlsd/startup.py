"""Start-up cost of a stage process: pandas, which no stage uses, kept out of it.

DVC starts every stage as a fresh interpreter, so what a stage imports is paid once per stage per
iteration. pyarrow imports pandas the first time it asks whether an object is a DataFrame (building
a table from a dict, ``Schema.empty_table``, opening ``pyarrow.dataset`` for ``pq.read_table``) and
again from C++ on the first ``to_numpy`` of a chunked column; DVCLive imports it at import time.
That import is 0.4-0.5 s of a model-free stage's ~1.1 s process on this machine (issue 23,
``bench/stage_timer.py --tiny``). pandas is a dependency neither of tcrlsd nor of anything a
per-iteration stage runs (pyarrow, numpy, torch, transformers, deepspeed, DVCLive, math-verify, the
HTTP critic client, vLLM): all of them treat it as optional and work without it when its import
fails. So the process of a per-iteration stage hides pandas (:func:`hide_pandas`, called by
:func:`tcrlsd.stagecli.process_main`): the import system's finders are wrapped so that none of them
finds it, and both ``import pandas`` and ``importlib.util.find_spec("pandas")`` see it as not
installed.

Outputs do not change: pyarrow writes pandas metadata only for tables made from pandas objects,
which no stage builds (bench/stage_timer.py compares the stages' Parquet bytes with and without this).
"""

from __future__ import annotations

import sys

__all__ = ["hide_pandas"]


class _WithoutPandas:
    """A meta-path finder wrapped so that it never finds pandas (nor a submodule): to ``import`` and to
    ``importlib.util.find_spec`` (torch's dynamo asks it) pandas then looks not installed."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pandas":
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...: the wrapped finder's
        return getattr(self._finder, attr)


def hide_pandas() -> bool:
    """Make pandas look not installed for the rest of this process; False (nothing done) when pandas
    was already imported or is already hidden. For a stage's own process only: never in a library call."""
    if "pandas" in sys.modules or any(isinstance(f, _WithoutPandas) for f in sys.meta_path):
        return False
    sys.meta_path[:] = [f if not hasattr(f, "find_spec") else _WithoutPandas(f) for f in sys.meta_path]
    return True
