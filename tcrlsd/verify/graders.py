"""Graders: pure functions ``grader(response, gold, limits) -> Grade`` in one registry, :data:`GRADERS`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import NamedTuple

from tcrlsd.answers import final_answer, final_boxed_answer, final_boxes, join_parts

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


def clip_extracted(text: str) -> str:
    return text if len(text) <= MAX_EXTRACTED_CHARS else text[:MAX_EXTRACTED_CHARS] + "..."


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
    raw = final_answer(response, number_fallback=True)
    pred = normalize_number(raw) if raw is not None else None
    if not pred:
        return Grade(0.0, None, "no_answer")
    extracted = clip_extracted(pred)
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
    from tcrlsd.verify.mathverify_compat import ExprExtractionConfig, LatexExtractionConfig

    # Gold and prediction alike: LaTeX first, then a plain expression (``1/2``, ``3*x``).
    return [LatexExtractionConfig(), ExprExtractionConfig()]


def _as_math_text(answer: str) -> str:
    """The string math-verify parses for one answer (a gold, or a box's content): the answer inside
    ``\\boxed{}``, so that it is read whole as LaTeX. As written, ``-2,1`` (MATH's way of listing
    two solutions) would be read as the decimal -2.1 and ``3, 5, 7`` as its last number. So a bare
    ``1,22`` is the list {1, 22} too, never the decimal 1.22 (Math-Verify's plain-text number
    extraction reads it that way; its LaTeX reading of ``$1,22$`` is also {1, 22})."""
    return "\\boxed{" + answer + "}"


def gold_answer(gold: str) -> str:
    """The answer a gold string stands for: its final boxes joined (:func:`tcrlsd.answers.final_boxed_answer`:
    a gold solution, or a gold written as several boxes), else the whole string, stripped."""
    joined = final_boxed_answer(gold)
    return joined if joined is not None else gold.strip()


@lru_cache(maxsize=4096)
def _parse_gold(gold_text: str, parse_timeout_s: int) -> tuple:
    """Parse a gold answer once per worker (8 rollouts of a group share it). Raises on timeout."""
    from tcrlsd.verify.mathverify_compat import parse

    return tuple(parse(_as_math_text(gold_text), extraction_config=_math_targets(),
                       parsing_timeout=parse_timeout_s, raise_on_error=True))


def grade_math_verify(response: str, gold: str, limits: GradeLimits) -> Grade:
    """math-verify grader: the response's final answer vs :func:`gold_answer`.

    The response is read in at most two ways, and is correct if either matches the gold:

    1. its LAST box (``\\boxed{3}. Wait, that is wrong: \\boxed{5}`` is graded as ``5``);
    2. when its last box was written together with boxes just before it
       (:func:`tcrlsd.answers.final_boxes`: ``\\boxed{(2,2)} and \\boxed{(6,2)}``), all those parts
       joined as if written in one box (``(2,2), (6,2)``).

    Why this is safe for one-part golds: the joined reading is a list of several values, which
    equals a one-part gold only when every part equals it, in which case the last box matches
    too. So a gold of one part gets exactly the verdict of reading 1 (an abandoned box never
    helps), and only a gold of several parts (a set, several solutions, several boxes) can be
    matched by boxing its parts one by one -- all of them, no more.

    ``extracted_answer`` is the reading that matched, else the last box. ``verify`` is called gold
    first (it is not symmetric), pair by pair, so that a timeout in one pair is seen (math-verify
    would report it as a plain False) while an error in one pair does not hide a match in another.
    Reasons when nothing matched: ``timeout`` if any parse or comparison timed out, ``unparsable``
    if the gold or the last box gave no math, else ``incorrect``.
    """
    from sympy import Basic
    from sympy.matrices import MatrixBase

    from tcrlsd.verify.mathverify_compat import TimeoutException, parse, verify

    parts = final_boxes(response)
    if parts is None or not parts[-1]:
        return Grade(0.0, None, "no_answer")
    readings = [parts[-1]] if len(parts) == 1 else [parts[-1], join_parts(parts)]
    extracted = clip_extracted(parts[-1])
    try:
        gold_parsed = _parse_gold(gold_answer(gold), int(limits.parse_timeout_s))
    except TimeoutException:
        return Grade(0.0, extracted, "timeout")
    except Exception:  # noqa: BLE001 -- any parser failure is a verdict, not a crash
        return Grade(0.0, extracted, "unparsable")
    if not gold_parsed:
        return Grade(0.0, extracted, "unparsable")
    timed_out = False
    last_is_math = False
    for k, reading in enumerate(readings):
        try:
            pred_parsed = parse(_as_math_text(reading), extraction_config=_math_targets(),
                                parsing_timeout=int(limits.parse_timeout_s), raise_on_error=True)
        except TimeoutException:
            timed_out = True
            continue
        except Exception:  # noqa: BLE001, S112 -- model text that does not parse is not a match
            continue
        if k == 0:
            # Only the raw-string fallback surviving means the box holds something that is not math.
            last_is_math = any(isinstance(p, (Basic, MatrixBase)) for p in pred_parsed)
        for g in gold_parsed:
            for p in pred_parsed:
                try:
                    if verify(g, p, timeout_seconds=int(limits.verify_timeout_s), raise_on_error=True):
                        return Grade(1.0, clip_extracted(reading), "correct")
                except TimeoutException:
                    timed_out = True
                except Exception:  # noqa: BLE001, S110 -- one failing comparison pair is not a match
                    pass
    if timed_out:
        return Grade(0.0, extracted, "timeout")
    if not last_is_math:
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
