"""The prepare stage: raw problem sets -> the ``prompts`` artifact (one table, a ``split`` column).

Sources are listed in params (``prepare.sources``); each has a *format* that says how one raw record
becomes a prompt row:

- ``math``      MATH records (problem, level "Level 3", type, solution). The gold answer is the LAST
                ``\\boxed{...}`` of the solution (verl's convention), nested braces handled.
- ``math500``   MATH500 records: like ``math`` but with an ``answer`` field, which is the gold answer,
                an integer ``level`` and a ``subject``.
- ``gsm8k``     GSM8K records (question, answer = worked text, ``#### 42``): gold answer after ``####``
                with thousands commas removed; solution = the worked text with ``<<calc>>`` notes removed.
- ``synthetic`` the embedded arithmetic task (:mod:`tcrlsd.synthetic`), generated from the seed.

Raw records come from local JSONL or Parquet files, or ``hf:<dataset id>`` when the optional
``datasets`` package is installed and the network works.

Selection is deterministic: each source shuffles its usable records with a ``random.Random`` seeded
from (``seed``, source name, split) and takes the first ``count``. Rows keep the order of
``sources`` in params, and within a source the shuffled order.

Accounting (what the metrics JSON records, per source): records read, records skipped because no
gold answer could be found (each id with its file:line and reason; ``missing_answer: error`` makes
that an error instead),
val records dropped because the same problem text was selected for train, and rows kept per level.
A val set must be held out: a val problem whose text equals a selected train problem is never
kept (synthetic val sources redraw instead, so their ``count`` is still met).

Layout of this package: ``params``, ``sources``, ``stage`` (see docs/ARCHITECTURE.md).
Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.answers import final_boxed_answer as extract_boxed  # the one extractor (tcrlsd.answers)
from tcrlsd.prepare.params import DEFAULT_PROMPT_TEMPLATE, HF_HINT, PrepareError, PrepareParams, SourceParams  # noqa: F401
from tcrlsd.prepare.sources import (  # noqa: F401
    FORMATS,
    FormatFn,
    RawRecord,
    Row,
    gsm8k_answer,
    gsm8k_solution,
    parse_math_level,
    read_raw,
)
from tcrlsd.prepare.stage import prepare, render_prompt, select, stream_seed  # noqa: F401
