"""The verify stage: grade every rollout against its prompt's gold answer (reward 1.0 or 0.0).

Graders are data (STYLE.md point 7): :data:`GRADERS` maps a name to a pure function with one
signature, ``grader(response, gold, limits) -> Grade``. Which grader a rollout gets is decided by
its prompt's ``source`` through params (``graders_by_source``, else ``default_grader``).

- ``math_verify``: the prediction is the content of the LAST ``\\boxed{}`` of the response (cut
  out by :mod:`tcrlsd.answers`: math-verify's own extraction merges every box into a set), and,
  for an answer boxed part by part (``\\boxed{(2,2)} and \\boxed{(6,2)}``), those final boxes
  joined (see :func:`tcrlsd.verify.graders.grade_math_verify`); the gold is parsed as LaTeX and as
  a plain expression. Percentages work through
  :mod:`tcrlsd.verify.mathverify_compat`.
- ``string``: for GSM8K-style integer answers; the last ``\\boxed{}`` or, when the text opens no box
  at all, the last number of the text, normalised (commas, ``$``, whitespace, trailing ``.0`` removed) and compared as
  decimals.

Every grade has a ``reason``: correct | incorrect | no_answer (nothing to grade: no box, no
number) | unparsable (an answer was found but could not be read as math, or the gold could not) |
timeout.

Why worker processes: math-verify's timeouts are ``signal.alarm``, which only works in a main
thread, takes whole seconds (a float timeout silently disables the comparison and returns a
false "incorrect"), and cannot interrupt long C-level work (big-integer powers in sympy). So
:class:`GradingPool` grades in worker processes that use integer timeouts inside, and the parent
enforces a wall-clock deadline per row: a worker past its deadline is killed and replaced, and the
row is recorded ``timeout``. Results come back in input order and do not depend on which worker
graded what.

Start method: ``forkserver`` by default. The stage's parent process holds pyarrow (and, in tests,
maybe torch) thread pools; forking such a process copies locks that other threads may hold, which
can deadlock a child. A fork server is a clean single-threaded process started once; with
math-verify preloaded into it, replacing a killed worker is a cheap fork (tens of ms) that needs no
re-import. ``fork`` (each new worker imports math-verify itself unless the parent already did,
~1-2 s; unsafe after threads) and ``spawn`` (a fresh interpreter per worker) are selectable in
params. Measured with 3 of 6 rows killed at the deadline: forkserver 4.4 s, fork 8.1 s, spawn 10.9 s.

Known math-verify false positives we inherit (upstream issues): ``1/2^99`` vs ``1/2^98`` compare
equal at its default float rounding (#14); ``3x-y+13=0`` vs ``3x+4y+14=0`` too (#60).

Layout of this package: ``graders``, ``params``, ``pool``, ``stage``, ``mathverify_compat`` (see docs/ARCHITECTURE.md).
Importing it is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

from tcrlsd.answers import last_boxed, last_number
from tcrlsd.verify.graders import (  # noqa: F401
    GRADERS,
    MAX_EXTRACTED_CHARS,
    REASONS,
    Grade,
    GradeLimits,
    GradeRequest,
    GraderFn,
    grade_math_verify,
    grade_sequential,
    grade_string,
    normalize_number,
)
from tcrlsd.verify.params import VerifyError, VerifyParams, grader_for_source  # noqa: F401
from tcrlsd.verify.pool import GradingPool, WorkerStartError  # noqa: F401
from tcrlsd.verify.stage import verdict_metrics, verify_rollouts  # noqa: F401
