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
:func:`tcrlsd.stagecli.process_main`): an import of it fails as if it were not installed, with a
message that says why.

Outputs do not change: pyarrow writes pandas metadata only for tables made from pandas objects,
which no stage builds (bench/stage_timer.py compares the stages' Parquet bytes with and without this).
"""

from __future__ import annotations

import sys

__all__ = ["hide_pandas"]


class _NoPandas:
    """Meta-path finder: ``import pandas`` (or a submodule) fails as if pandas were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(
                f"No module named {name!r}: a tcrlsd stage process runs without pandas (tcrlsd/startup.py)",
                name=name)
        return None


def hide_pandas() -> bool:
    """Make ``import pandas`` fail for the rest of this process; False (nothing done) when pandas was
    already imported or is already hidden. For a stage's own process only: never in a library call."""
    if "pandas" in sys.modules or any(isinstance(f, _NoPandas) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _NoPandas())
    return True
