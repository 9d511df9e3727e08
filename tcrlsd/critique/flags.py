"""Per-row flags: leakage of the gold answer, suspected false negatives of the grader."""

from __future__ import annotations

import math
import re

# --------------------------------------------------------------------------------------------------
# Leakage and verdict checks


def _answer_pattern(answer: str) -> re.Pattern | None:
    answer = answer.strip()
    if not answer:
        return None
    # A token match: "12" must not match inside "112", "12.5", "x12", nor "-12" (another number).
    before = r"(?<![0-9A-Za-z_.\-])" if answer[0].isdigit() else r"(?<![0-9A-Za-z_])"
    after = r"(?![0-9A-Za-z_])(?!\.[0-9])" if answer[-1].isalnum() else ""
    return re.compile(before + re.escape(answer) + after)


def contains_answer(text: str | None, answer: str) -> bool:
    """Whether ``text`` contains the gold final answer verbatim, as a token."""
    pat = _answer_pattern(answer)
    return bool(text) and pat is not None and pat.search(text) is not None


def mask_answer(text: str, answer: str, mask: str) -> str:
    pat = _answer_pattern(answer)
    return text if pat is None else pat.sub(lambda _: mask, text)


def _normalise(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("\\!", ""),
                 ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                 ("%", ""), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[A-Za-z]\s*=", "", s.strip())  # "x = 5"
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    return s


def _number(s: str) -> float | None:
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def relaxed_equal(predicted: str | None, gold: str) -> bool:
    """A lenient second opinion: equal after stripping formatting, or numerically equal."""
    if predicted is None:
        return False
    p, g = _normalise(predicted), _normalise(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    a, b = _number(p), _number(g)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


_CLAIMS_CORRECT = re.compile(
    r"(?<!not )(?<!n't )\b(?:"
    r"(?:the |your |this |its )?(?:final )?answer (?:is|was) (?:actually |in fact |indeed )?(?:correct|right)"
    r"|(?:the |this |your )(?:attempt|solution|response|reasoning|work) is (?:actually |in fact |entirely |fully )?"
    r"(?:correct|right)"
    r"|(?:i |we )?(?:find|found|see|saw) no (?:errors?|mistakes?)"
    r"|there (?:is|are) no (?:errors?|mistakes?)"
    r"|no (?:errors?|mistakes?) (?:in|were)"
    r"|(?:grader|verdict|grading) (?:is|was|seems|appears) (?:wrong|mistaken|incorrect)"
    r"|should (?:have been|be) (?:marked|graded|accepted) (?:as )?correct"
    r"|false negative"
    r")",
    re.IGNORECASE,
)


def claims_correct(feedback: str | None) -> bool:
    """Whether a critique says the attempt is right after all (phrase match)."""
    return bool(feedback) and _CLAIMS_CORRECT.search(feedback) is not None

