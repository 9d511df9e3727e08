"""The verify stage: grade every rollout against its prompt's gold answer (reward 1.0 or 0.0).

Graders are data (STYLE.md point 7): :data:`GRADERS` maps a name to a pure function with one
signature, ``grader(response, gold, limits) -> Grade``. Which grader a rollout gets is decided by
its prompt's ``source`` through params (``graders_by_source``, else ``default_grader``).

- ``math_verify``: the prediction is the content of the LAST ``\\boxed{}`` of the response (we cut
  it out ourselves: math-verify's own extraction merges several boxes into a set); the gold is
  parsed as LaTeX and as a plain expression. Percentages work through
  :mod:`tcrlsd.mathverify_compat`.
- ``string``: for GSM8K-style integer answers; the last ``\\boxed{}`` or else the last number of
  the text, normalised (commas, ``$``, whitespace, trailing ``.0`` removed) and compared as
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
"""

from __future__ import annotations

import os
import re
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Literal, NamedTuple

__all__ = [
    "GRADERS",
    "REASONS",
    "Grade",
    "GradeLimits",
    "GradeRequest",
    "GradingPool",
    "VerifyError",
    "VerifyParams",
    "WorkerStartError",
    "grade_math_verify",
    "grade_sequential",
    "grade_string",
    "grader_for_source",
    "last_boxed",
    "last_number",
    "normalize_number",
    "verdict_metrics",
    "verify_rollouts",
]

REASONS: tuple[str, ...] = ("correct", "incorrect", "no_answer", "unparsable", "timeout")

# extracted_answer is a diagnostic column: a 1 MB "answer" is clipped so verdicts stay small.
MAX_EXTRACTED_CHARS = 1000


class Grade(NamedTuple):
    reward: float  # 1.0 or 0.0
    extracted_answer: str | None  # what was graded (clipped to MAX_EXTRACTED_CHARS); None = nothing found
    reason: str  # one of REASONS


class GradeLimits(NamedTuple):
    """Timeouts inside one grader call: whole seconds, because math-verify's signal.alarm takes ints."""

    parse_timeout_s: int = 3
    verify_timeout_s: int = 3


class GradeRequest(NamedTuple):
    grader: str
    response: str
    gold: str


# ---------------------------------------------------------------------------------------------
# Answer extraction


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_EXTRACTED_CHARS else text[:MAX_EXTRACTED_CHARS] + "..."


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text``, braces balanced.

    ``None`` when there is no box, or when the last box is never closed (a response cut off by
    ``max_new_tokens`` inside its answer): an earlier box is then NOT used, so a hedged or
    truncated answer is not rewarded for a value it abandoned.
    """
    start = None
    # Scan from the right: rfind each keyword and take the later one, so a 1 MB response with no
    # box costs two linear searches, not a regex over every backslash.
    for kw in ("\\boxed", "\\fbox"):
        i = text.rfind(kw)
        while i >= 0:
            m = _BOX_RE.match(text, i)
            if m:
                if start is None or m.end() > start:
                    start = m.end()
                break
            i = text.rfind(kw, 0, i)
    if start is None:
        return None
    depth = 1
    for k in range(start, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:k]
    return None


# A number: 1,234,567.89 (with thousands separators) or 1234.5 or .5, optionally negative.
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written, e.g. ``'1,234.50'``), or None."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last.group(0) if last else None


_STRIP_RE = re.compile(r"\\\$|\$|\\!|\\,|\{,\}|,|\s+")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def normalize_number(text: str) -> str:
    """GSM8K-style normalisation: drop ``$``, commas, whitespace, a trailing period, and a zero
    fractional part (``'1,234.0'`` -> ``'1234'``, ``'$18.50'`` -> ``'18.5'``). A string that is not
    a number comes back with only the stripping applied."""
    s = _TEXT_RE.sub(r"\1", text)
    s = _STRIP_RE.sub("", s).rstrip(".")
    if _is_number(s):
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s in ("-0", "", "-"):
            s = "0"
        if s.startswith("."):
            s = "0" + s
        elif s.startswith("-."):
            s = "-0" + s[1:]
    return s


_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def _is_number(s: str) -> bool:
    return bool(_PLAIN_NUMBER_RE.fullmatch(s))


# ---------------------------------------------------------------------------------------------
# Graders: pure functions (response, gold, limits) -> Grade


def grade_string(response: str, gold: str, limits: GradeLimits) -> Grade:
    """Normalised-string grader (GSM8K): last ``\\boxed{}``, else the last number of the text.

    The gold may be a bare answer (``'72'``) or a GSM8K solution ending in ``#### 72``. Numbers are
    compared as decimals (``18.50`` == ``18.5``); a non-numeric gold is compared as a normalised
    string. ``unparsable``: the response boxed something that is not a number while the gold is one.
    """
    gold_text = gold.rsplit("####", 1)[-1] if "####" in gold else gold
    gold_norm = normalize_number(gold_text)
    boxed = last_boxed(response)
    if boxed is not None:
        pred = normalize_number(boxed)
    else:
        raw = last_number(response)
        pred = normalize_number(raw) if raw is not None else None
    if not pred:
        return Grade(0.0, None, "no_answer")
    extracted = _clip(pred)
    if _is_number(gold_norm):
        if not _is_number(pred):
            return Grade(0.0, extracted, "unparsable")
        try:
            same = Decimal(pred) == Decimal(gold_norm)
        except InvalidOperation:  # pragma: no cover -- both matched the number pattern
            return Grade(0.0, extracted, "unparsable")
    else:
        same = pred == gold_norm
    return Grade(1.0, extracted, "correct") if same else Grade(0.0, extracted, "incorrect")


def _math_targets():
    from tcrlsd.mathverify_compat import ExprExtractionConfig, LatexExtractionConfig

    # Gold and prediction alike: LaTeX first, then a plain expression (``1/2``, ``3*x``).
    return [LatexExtractionConfig(), ExprExtractionConfig()]


@lru_cache(maxsize=4096)
def _parse_gold(gold_answer: str, parse_timeout_s: int) -> tuple:
    """Parse a gold answer once per worker (8 rollouts of a group share it). Raises on timeout."""
    from tcrlsd.mathverify_compat import parse

    return tuple(
        parse("\\boxed{" + gold_answer + "}", extraction_config=_math_targets(),
              parsing_timeout=parse_timeout_s, raise_on_error=True)
    )


def grade_math_verify(response: str, gold: str, limits: GradeLimits) -> Grade:
    """math-verify grader: gold (its last ``\\boxed{}`` if it has one, else the whole string) vs
    the content of the response's last ``\\boxed{}``. ``verify`` is called gold first (it is not
    symmetric), pair by pair, so that a timeout in one pair is seen (math-verify would report it
    as a plain False) while an error in one pair does not hide a match in another."""
    from sympy import Basic
    from sympy.matrices import MatrixBase

    from tcrlsd.mathverify_compat import TimeoutException, parse, verify

    content = last_boxed(response)
    if content is None or not content.strip():
        return Grade(0.0, None, "no_answer")
    extracted = _clip(content)
    gold_answer = last_boxed(gold)
    if gold_answer is None:
        gold_answer = gold
    try:
        gold_parsed = _parse_gold(gold_answer.strip(), int(limits.parse_timeout_s))
        pred_parsed = parse("\\boxed{" + content + "}", extraction_config=_math_targets(),
                            parsing_timeout=int(limits.parse_timeout_s), raise_on_error=True)
    except TimeoutException:
        return Grade(0.0, extracted, "timeout")
    except Exception:  # noqa: BLE001 -- any parser failure on model text is a verdict, not a crash
        return Grade(0.0, extracted, "unparsable")
    if not gold_parsed or not pred_parsed:
        return Grade(0.0, extracted, "unparsable")
    timed_out = False
    for g in gold_parsed:
        for p in pred_parsed:
            try:
                if verify(g, p, timeout_seconds=int(limits.verify_timeout_s), raise_on_error=True):
                    return Grade(1.0, extracted, "correct")
            except TimeoutException:
                timed_out = True
            except Exception:  # noqa: BLE001, S110 -- one failing comparison pair is not a match
                pass
    if timed_out:
        return Grade(0.0, extracted, "timeout")
    if not any(isinstance(p, (Basic, MatrixBase)) for p in pred_parsed):
        # Only the raw-string fallback survived: the box holds something that is not math.
        return Grade(0.0, extracted, "unparsable")
    return Grade(0.0, extracted, "incorrect")


GraderFn = Callable[[str, str, GradeLimits], Grade]

# The registry: name -> pure grading function, one signature. Add graders here, nowhere else.
GRADERS: dict[str, GraderFn] = {
    "math_verify": grade_math_verify,
    "string": grade_string,
}


def grade_sequential(requests: Sequence[GradeRequest], limits: GradeLimits) -> list[Grade]:
    """Grade in this process, one after another (main thread only: math-verify uses signals).

    No outer deadline: an input that hangs inside C code hangs this call. The baseline of
    ``bench/verify.py``; the stage uses :class:`GradingPool`.
    """
    return [GRADERS[r.grader](r.response, r.gold, limits) for r in requests]


# ---------------------------------------------------------------------------------------------
# Params


@dataclass(frozen=True)
class VerifyParams:
    """``verify:`` section of params.yaml."""

    default_grader: str = "math_verify"
    graders_by_source: dict[str, str] = field(default_factory=lambda: {"gsm8k": "string"})
    workers: int = 2
    start_method: Literal["forkserver", "fork", "spawn"] = "forkserver"
    parse_timeout_s: int = 3
    verify_timeout_s: int = 3
    row_deadline_s: float = 10.0
    worker_memory_mb: int = 4096

    def __post_init__(self) -> None:
        known = ", ".join(GRADERS)
        if self.default_grader not in GRADERS:
            raise ValueError(f"default_grader {self.default_grader!r} is not a grader; known: {known}")
        for source, name in self.graders_by_source.items():
            if not isinstance(name, str) or name not in GRADERS:
                raise ValueError(f"graders_by_source[{source!r}] = {name!r} is not a grader; known: {known}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.parse_timeout_s < 1 or self.verify_timeout_s < 1:
            raise ValueError("parse_timeout_s and verify_timeout_s must be whole seconds >= 1 "
                             "(math-verify's signal.alarm ignores anything else)")
        if not self.row_deadline_s > 0:
            raise ValueError(f"row_deadline_s must be > 0, got {self.row_deadline_s}")
        if self.worker_memory_mb < 0:
            raise ValueError(f"worker_memory_mb must be >= 0 (0 = no limit), got {self.worker_memory_mb}")

    @property
    def limits(self) -> GradeLimits:
        return GradeLimits(self.parse_timeout_s, self.verify_timeout_s)


def grader_for_source(source: str, params: VerifyParams) -> str:
    return params.graders_by_source.get(source, params.default_grader)


# ---------------------------------------------------------------------------------------------
# The process pool


def _die_with_parent() -> None:
    """Linux: make sure a worker stuck in a huge computation never outlives a killed stage.

    The worker asks for SIGKILL when its parent exits (prctl PR_SET_PDEATHSIG). Under fork the
    parent is the stage. Under forkserver it is the fork server, which exits once no process
    holds its "alive" pipe: the stage holds one end and every forked child inherits a copy, so the
    worker closes its copy (the worker never forks). Elsewhere: a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    try:
        from multiprocessing import forkserver

        fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
        if fd is not None and fd >= 0:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None
    except OSError:
        pass


def _worker_main(conn, limits: GradeLimits, memory_mb: int) -> None:
    """Worker loop: receive (key, grader, response, gold), send back (key, Grade)."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _die_with_parent()
    if memory_mb:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = memory_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # math-verify logs every timeout with the whole input (up to 1 MB) at WARNING.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import tcrlsd.mathverify_compat  # noqa: F401 -- warm import (a no-op when preloaded)

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, grader, response, gold = msg
        try:
            grade = GRADERS[grader](response, gold, limits)
        except MemoryError:
            grade = Grade(0.0, None, "unparsable")
        except Exception:  # noqa: BLE001 -- never let one row kill the worker
            grade = Grade(0.0, None, "unparsable")
        conn.send((key, tuple(grade)))


class VerifyError(ValueError):
    """Bad input to the verify stage (a rollout without its prompt, an unknown grader)."""


class WorkerStartError(RuntimeError):
    """A grading worker could not start (an environment problem, not a problem of any row)."""


_STARTUP_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self, ctx, limits: GradeLimits, memory_mb: int):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, limits, memory_mb), daemon=True,
                                name="tcrlsd-grader")
        # forkserver/spawn children re-run the parent's main script (as __mp_main__) before the
        # target unless __main__ has no path: that would re-import pytest, a stage's pyarrow, or
        # fail outright for `python -` (no file). The target lives in this module and needs nothing
        # from __main__, so the child is started with a path-less stand-in, swapped back at once.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.proc.start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        child_conn.close()
        self.conn = parent_conn
        self.key: int | None = None  # the request it is grading
        self.deadline = 0.0
        # Handshake: a worker that dies while importing is an environment error, raised here with
        # its exit code, instead of every row being graded as a crash.
        ok = False
        try:
            ok = self.conn.poll(_STARTUP_TIMEOUT_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            self.kill()
            raise WorkerStartError(
                f"grading worker (start method {ctx.get_start_method()!r}) did not start: exit code "
                f"{self.proc.exitcode}; see its traceback above on stderr"
            )

    def kill(self) -> None:
        try:
            self.proc.kill()
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class GradingPool:
    """Grade many requests in worker processes with a wall-clock deadline per row.

    Use as a context manager. ``grade(requests)`` returns one :class:`Grade` per request, in order.
    Identical requests are graded once. A worker still busy ``row_deadline_s`` after it got a row
    is killed (SIGKILL) and replaced; that row is ``timeout``. A worker that dies on a row (out of
    memory, segfault) is replaced and the row is ``unparsable``; ``stats`` counts both.
    """

    def __init__(self, workers: int = 2, limits: GradeLimits | None = None, row_deadline_s: float = 10.0,
                 start_method: str = "forkserver", worker_memory_mb: int = 4096):
        import multiprocessing as mp

        limits = limits or GradeLimits()
        self.num_workers = max(1, int(workers))
        self.limits = GradeLimits(int(limits.parse_timeout_s), int(limits.verify_timeout_s))
        self.row_deadline_s = float(row_deadline_s)
        self.memory_mb = int(worker_memory_mb)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Affects only a fork server not yet started; modules every worker needs, imported once.
            self._ctx.set_forkserver_preload(["tcrlsd.verify", "tcrlsd.mathverify_compat"])
        self._workers: list[_Worker | None] = []
        self.stats: Counter = Counter()

    @classmethod
    def from_params(cls, params: VerifyParams, max_workers: int | None = None) -> GradingPool:
        n = params.workers if max_workers is None else max(1, min(params.workers, max_workers))
        return cls(n, params.limits, params.row_deadline_s, params.start_method, params.worker_memory_mb)

    def __enter__(self) -> GradingPool:  # noqa: PYI034 -- py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely, or at once with ``kill``: they may be mid-row)."""
        for w in self._workers:
            if w is not None:
                w.kill() if kill else w.stop()
        self._workers = []

    def _spawn(self) -> _Worker:
        self.stats["workers_started"] += 1
        return _Worker(self._ctx, self.limits, self.memory_mb)

    def grade(self, requests: Sequence[GradeRequest], on_result: Callable[[int], None] | None = None) -> list[Grade]:
        """Grade ``requests`` (in order). ``on_result(n)`` is called as rows finish (progress bars)."""
        from multiprocessing.connection import wait

        for r in requests:
            if r.grader not in GRADERS:
                raise VerifyError(f"unknown grader {r.grader!r}; known: {', '.join(GRADERS)}")
        unique: dict[GradeRequest, int] = {}
        slot = [unique.setdefault(GradeRequest(*r), len(unique)) for r in requests]
        todo = list(unique)  # index = key
        counts = Counter(slot)
        results: list[Grade | None] = [None] * len(todo)
        n_workers = min(self.num_workers, len(todo))
        while len(self._workers) < n_workers:
            self._workers.append(None)
        next_key = 0
        busy: dict[int, _Worker] = {}  # worker index -> worker

        def finish(key: int, grade: Grade) -> None:
            results[key] = grade
            if on_result is not None:
                on_result(counts[key])

        try:
            while next_key < len(todo) or busy:
                # Dispatch one row to every idle worker.
                for i in range(n_workers):
                    if i in busy or next_key >= len(todo):
                        continue
                    w = self._workers[i]
                    if w is None or not w.proc.is_alive():
                        if w is not None:
                            w.kill()
                        w = self._workers[i] = self._spawn()
                    req = todo[next_key]
                    try:
                        w.conn.send((next_key, req.grader, req.response, req.gold))
                    except (OSError, ValueError):  # died while idle: replace and retry the row
                        w.kill()
                        self._workers[i] = None
                        continue
                    w.key, w.deadline = next_key, time.monotonic() + self.row_deadline_s
                    busy[i] = w
                    next_key += 1
                if not busy:
                    continue
                timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
                # Wait on the pipes and on the process sentinels: a worker that dies mid-row is seen
                # even if its pipe end lingers in another process.
                waitables = {}
                for i, w in busy.items():
                    waitables[w.conn] = i
                    waitables[w.proc.sentinel] = i
                ready = {waitables[x] for x in wait(list(waitables), timeout=timeout)}
                for i in sorted(ready):
                    w = busy.pop(i)
                    try:
                        if not w.conn.poll():
                            raise EOFError
                        key, grade = w.conn.recv()
                    except (EOFError, OSError):
                        # The worker died on this row (e.g. out of memory): a verdict, then a new worker.
                        self.stats["worker_crashes"] += 1
                        w.kill()
                        self._workers[i] = None
                        finish(w.key, Grade(0.0, None, "unparsable"))
                        continue
                    finish(key, Grade(*grade))
                now = time.monotonic()
                for i, w in list(busy.items()):
                    if now >= w.deadline:
                        self.stats["deadline_kills"] += 1
                        busy.pop(i)
                        w.kill()
                        self._workers[i] = None
                        req = todo[w.key]
                        box = last_boxed(req.response)
                        finish(w.key, Grade(0.0, _clip(box) if box is not None else None, "timeout"))
        except BaseException:
            # Ctrl-C or a bug: never leave workers behind (busy ones would finish their row first).
            self.close(kill=True)
            raise
        return [results[k] for k in slot]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The stage's one library call


def _gold_by_rollout(rollouts, prompts, prompts_source: str | None) -> tuple[list[str], list[str]]:
    ids = prompts.column("prompt_id").to_pylist()
    answers = prompts.column("answer").to_pylist()
    sources = prompts.column("source").to_pylist()
    index = {pid: i for i, pid in enumerate(ids)}
    golds, srcs = [], []
    for row, (rid, pid) in enumerate(zip(rollouts.column("rollout_id").to_pylist(),
                                         rollouts.column("prompt_id").to_pylist())):
        i = index.get(pid)
        if i is None:
            where = f"{prompts_source}" if prompts_source else "the prompts table"
            raise VerifyError(
                f"rollouts row {row} (rollout_id {rid!r}) has prompt_id {pid!r}, which is not in {where} "
                f"({len(ids)} prompts); were the rollouts generated from another prompts file?"
            )
        golds.append(answers[i])
        srcs.append(sources[i])
    return golds, srcs


def verdict_metrics(verdicts, sources: Sequence[str], prompt_ids: Sequence[str]) -> dict:
    """Reward mean, counts by reason, per source and per grader, and GRPO group mix."""
    rewards = verdicts.column("reward").to_pylist()
    reasons = verdicts.column("reason").to_pylist()
    graders = verdicts.column("verifier").to_pylist()
    n = len(rewards)

    def summary(idx: list[int]) -> dict:
        return {"n": len(idx), "reward_mean": (sum(rewards[i] for i in idx) / len(idx)) if idx else 0.0}

    by_source: dict[str, list[int]] = {}
    by_grader: dict[str, list[int]] = {}
    groups: dict[str, list[float]] = {}
    for i in range(n):
        by_source.setdefault(sources[i], []).append(i)
        by_grader.setdefault(graders[i], []).append(i)
        groups.setdefault(prompt_ids[i], []).append(rewards[i])
    counts = Counter(reasons)
    all_right = sum(1 for g in groups.values() if min(g) == 1.0)
    all_wrong = sum(1 for g in groups.values() if max(g) == 0.0)
    return {
        "n_rollouts": n,
        "reward_mean": (sum(rewards) / n) if n else 0.0,
        "by_reason": {r: counts.get(r, 0) for r in REASONS},
        "by_source": {s: summary(idx) for s, idx in sorted(by_source.items())},
        "by_grader": {g: summary(idx) for g, idx in sorted(by_grader.items())},
        # GRPO learns only from groups with mixed rewards (the others have A = 0 for every sample).
        "groups": {
            "n": len(groups),
            "all_correct": all_right,
            "all_incorrect": all_wrong,
            "mixed": len(groups) - all_right - all_wrong,
        },
    }


def verify_rollouts(rollouts, prompts, params: VerifyParams, progress: bool = False,
                    prompts_source: str | None = None):
    """Grade every rollout; returns (verdicts table ordered like ``rollouts``, metrics dict).

    ``rollouts`` needs rollout_id, prompt_id, response_text; ``prompts`` needs prompt_id, answer,
    source. A rollout whose prompt_id is not in ``prompts`` is an error naming it.
    """
    import pyarrow as pa

    from tcrlsd.schemas import schema_for

    golds, sources = _gold_by_rollout(rollouts, prompts, prompts_source)
    responses = rollouts.column("response_text").to_pylist()
    requests = [GradeRequest(grader_for_source(s, params), r, g) for r, g, s in zip(responses, golds, sources)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="verify", unit="rollout", dynamic_ncols=True)
    try:
        with GradingPool.from_params(params, max_workers=max(1, len(set(requests)))) as pool:
            grades = pool.grade(requests, on_result=bar.update if bar is not None else None)
            stats = dict(pool.stats)
    finally:
        if bar is not None:
            bar.close()
    verdicts = pa.table(
        {
            "rollout_id": rollouts.column("rollout_id").cast(pa.string()),
            "reward": pa.array([g.reward for g in grades], pa.float32()),
            "is_correct": pa.array([g.reason == "correct" for g in grades], pa.bool_()),
            "extracted_answer": pa.array([g.extracted_answer for g in grades], pa.string()),
            "reason": pa.array([g.reason for g in grades], pa.string()),
            "verifier": pa.array([r.grader for r in requests], pa.string()),
        },
        schema=schema_for("verdicts"),
    )
    metrics = verdict_metrics(verdicts, sources, rollouts.column("prompt_id").to_pylist())
    # Deadline kills and crashes depend on machine load; they are reported but kept out of the
    # verdicts' bytes (a timeout row is already visible through its reason).
    metrics["pool"] = {"deadline_kills": stats.get("deadline_kills", 0),
                       "worker_crashes": stats.get("worker_crashes", 0)}
    return verdicts, metrics

