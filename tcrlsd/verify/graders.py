"""Graders: pure functions ``grader(response, gold, limits) -> Grade`` in one registry, :data:`GRADERS`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import NamedTuple

from tcrlsd.answers import final_answer, last_boxed

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


def _clip(text: str) -> str:
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
    from tcrlsd.verify.mathverify_compat import ExprExtractionConfig, LatexExtractionConfig

    # Gold and prediction alike: LaTeX first, then a plain expression (``1/2``, ``3*x``).
    return [LatexExtractionConfig(), ExprExtractionConfig()]


@lru_cache(maxsize=4096)
def _parse_gold(gold_answer: str, parse_timeout_s: int) -> tuple:
    """Parse a gold answer once per worker (8 rollouts of a group share it). Raises on timeout."""
    from tcrlsd.verify.mathverify_compat import parse

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

    from tcrlsd.verify.mathverify_compat import TimeoutException, parse, verify

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
