"""maj@k: is the answer most of a prompt's k samples give the right one?

The votes are the grader's own readings, so maj@k, avg@k and pass@k agree on what "correct" means:

- every sample the grader marked correct is equivalent to the gold, hence to each other: they are
  one class, however they wrote it (``1/2``, ``0.5``, ``\\frac{1}{2}``);
- a wrong sample votes for its extracted answer (the grader's ``extracted_answer``) after
  :func:`vote_key`'s light normalisation (spaces, ``$``, ``\\left``/``\\right``, ``\\dfrac``, a
  trailing period, the spelling of a plain decimal number). Two wrong answers that are equal as
  math but written differently (``0.5`` vs ``\\frac12``) stay two classes: comparing every pair with
  math-verify would cost k² comparisons per prompt, and splitting a wrong class can only help the
  correct one, by at most what a wrong majority written two ways would have taken from it;
- a sample with no answer (``no_answer``: nothing extracted) does not vote.

The majority class wins; a tie between the top classes is shared: the prompt scores 1/c when the
correct class is one of c tied classes (the expected value of a random tie-break, so maj@k does not
depend on the order of the samples). A prompt with no vote at all scores 0. (verl's ``maj@N``
takes the first of the tied answers, and bootstraps over subsets of the samples; this is one
value over all k.)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

__all__ = ["vote_key", "majority_score"]

_DROP_RE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_CORRECT = object()  # the class of every sample graded correct


def vote_key(answer: str | None) -> str | None:
    """The class a wrong answer votes for; None (no vote) for a missing or empty answer.

    ``' \\dfrac{1}{2} '`` -> ``'\\frac{1}{2}'``, ``'$18.50$'`` -> ``'18.5'``, ``'x = 3.'`` -> ``'x=3'``.
    Commas are kept: ``1,22`` is a list of two numbers in the project's answers, not 122.
    """
    if answer is None:
        return None
    s = _TEXT_RE.sub(r"\1", answer)
    s = _DROP_RE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    if _NUMBER_RE.fullmatch(s):
        try:
            d = Decimal(s).normalize()
        except InvalidOperation:  # pragma: no cover -- the pattern admits only decimals
            return s
        s = "0" if d == 0 else format(d, "f")
    return s or None


def majority_score(samples: Iterable[tuple[str | None, float]]) -> float:
    """maj@k of one prompt from its samples' (extracted_answer, reward): 1 when the correct answer
    has the most votes, 1/c when it ties with c - 1 others, else 0 (module docstring)."""
    votes: Counter = Counter()
    for answer, reward in samples:
        if reward > 0:
            votes[_CORRECT] += 1
        elif (key := vote_key(answer)) is not None:
            votes[key] += 1
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [c for c, n in votes.items() if n == top]
    return 1.0 / len(leaders) if _CORRECT in leaders else 0.0
