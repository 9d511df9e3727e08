"""The final answer of a text: the one extractor that prepare, warmstart, verify and critique use.

:func:`last_boxed` is the rule for "what did this text box last":

- Boxes are ``\\boxed{...}`` and ``\\fbox{...}``; braces nest (``\\boxed{\\frac{1}{2}}`` gives
  ``\\frac{1}{2}``) and escaped braces (``\\{``, ``\\}``) neither open nor close a group.
- A box inside a box is part of the outer box's content (``\\boxed{\\boxed{1}}`` gives
  ``\\boxed{1}``): the LAST TOP-LEVEL box is the answer.
- ``\\boxed 5`` (a space, then a bare argument; MATH writes that twice) takes the text up to the
  next ``$`` or line end.
- If the last box is never closed (a response cut off by ``max_new_tokens`` inside its answer), the
  text has NO boxed answer: an earlier box is not used, so a hedged or truncated answer is never
  credited with a value it abandoned. ``\\boxed{1} and \\boxed{2`` therefore gives ``None``
  everywhere (grader, gold extraction, warm-start accuracy, critique flags).
- The content is stripped of surrounding whitespace; an empty box gives ``""`` (callers decide
  whether that counts as an answer).

:func:`last_number` is the fallback of the ``string`` grader (GSM8K): the last number written in
the text, as written (``'1,234.50'``). :func:`final_answer` combines them: the last box, or -- only
for a text that opens no box at all -- the last number.

Both scan each character at most a constant number of times, so a 1 MB response costs linear time.
"""

from __future__ import annotations

import re

__all__ = ["final_answer", "last_boxed", "last_number"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it; None if unclosed."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # an escaped character (\{ or \}) never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content (stripped) of the last top-level ``\\boxed{...}`` / ``\\fbox{...}`` of ``text``.

    ``None`` when there is no box or when the last box is never closed (see the module docstring).
    """
    found: str | None = None
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        j = i
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is None:  # the last box is unclosed: it runs to the end, nothing after it counts
                return None
            found, pos = got[0].strip(), got[1]
        elif j > i:  # "\boxed 5": a space, then a bare argument up to "$" or the line end
            end = j
            while end < len(text) and text[end] not in "$\n":
                end += 1
            arg = text[j:end].strip()
            if arg:
                found = arg
            pos = max(end, i)
        else:  # "\boxed" with nothing after it
            pos = i
    return found


# A number: 1,234,567.89 (with thousands separators) or 1234.5 or .5, optionally negative.
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (as written, e.g. ``'1,234.50'``), or None."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last.group(0) if last else None


def final_answer(text: str, number_fallback: bool = False) -> str | None:
    """The final answer of ``text``: :func:`last_boxed`; with ``number_fallback``, a text that opens
    no box at all gives its last number instead. A text whose last box is unclosed has no answer
    either way (its number is the abandoned or truncated one)."""
    boxed = last_boxed(text)
    if boxed is not None or not number_fallback or _BOX_RE.search(text) is not None:
        return boxed
    return last_number(text)
