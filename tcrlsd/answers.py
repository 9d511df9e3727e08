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

:func:`final_boxes` is the rule for answers of several parts: the last box together with the boxes
written just before it, joined only by short glue (``\\boxed{(2,2)} and \\boxed{(6,2)}``,
``x = \\boxed{3}, y = \\boxed{5}``, ``\\boxed{1}\\boxed{2}``). A sentence end, a blank line, more
than :data:`MAX_GLUE_CHARS` characters, or a word that revises or offers an alternative (``or``,
``wait``, ``actually``, ...) ends a group, so ``\\boxed{3}. Wait, that is wrong: \\boxed{5}`` has the
one-part final answer ``5``. :func:`final_boxed_answer` joins the parts into one string
(``"(2,2), (6,2)"``), the form a gold answer is stored and compared in. How the verify stage uses
both (the last box first, the joined parts as a second reading) is in
:func:`tcrlsd.verify.graders.grade_math_verify`.

:func:`last_number` is the fallback of the ``string`` grader (GSM8K): the last number written in
the text, as written (``'1,234.50'``). :func:`final_answer` combines them: the last box, or -- only
for a text that opens no box at all -- the last number.

All of them scan each character at most a constant number of times, so a 1 MB response costs linear time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = [
    "MAX_GLUE_CHARS",
    "boxes_joined",
    "final_answer",
    "final_boxed_answer",
    "final_boxes",
    "join_parts",
    "last_boxed",
    "last_number",
]

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


def _boxes(text: str) -> Iterator[tuple[int, int, str | None]]:
    """Every top-level box of ``text`` in order, as ``(start, end, content)``: ``text[start:end]``
    is the whole ``\\boxed{...}``, ``content`` is stripped. A box that is never closed is
    yielded with content ``None`` and ends the scan (it runs to the end of the text)."""
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        j = i
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is None:
                yield m.start(), len(text), None
                return
            yield m.start(), got[1], got[0].strip()
            pos = got[1]
        elif j > i:  # "\boxed 5": a space, then a bare argument up to "$" or the line end
            end = j
            while end < len(text) and text[end] not in "$\n":
                end += 1
            arg = text[j:end].strip()
            if arg:
                yield m.start(), end, arg
            pos = max(end, i)
        else:  # "\boxed" with nothing after it
            pos = i


def last_boxed(text: str) -> str | None:
    """Content (stripped) of the last top-level ``\\boxed{...}`` / ``\\fbox{...}`` of ``text``.

    ``None`` when there is no box or when the last box is never closed (see the module docstring).
    """
    found: str | None = None
    for _, _, content in _boxes(text):
        found = content  # None for an unclosed box, which is always the last one
    return found


# What may stand between two boxes of one final answer: at most this many characters ...
MAX_GLUE_CHARS = 48
# ... and none of: a paragraph break, a sentence end, a word that revises or offers an alternative.
_BREAK_RE = re.compile(
    r"\n[ \t]*\n|[.!?](?:\s|$)"
    r"|\b(?:or|but|wait|actually|instead|rather|alternatively|no|not|hmm|oops|sorry|wrong|mistake|incorrect)\b",
    re.IGNORECASE,
)


def boxes_joined(gap: str) -> bool:
    """Whether two boxes with ``gap`` between them belong to one answer (see :func:`final_boxes`)."""
    return len(gap) <= MAX_GLUE_CHARS and _BREAK_RE.search(gap) is None


def final_boxes(text: str) -> list[str] | None:
    """The boxes that together make the final answer of ``text``: the last box and the boxes
    written just before it, in order (``["(2,2)", "(6,2)"]`` for ``\\boxed{(2,2)} and \\boxed{(6,2)}``).

    Two consecutive boxes belong together when the text between them is short glue
    (:func:`boxes_joined`): at most :data:`MAX_GLUE_CHARS` characters with no blank line, no
    sentence end (``.``, ``!``, ``?`` before a space or the end) and none of the words ``or``,
    ``but``, ``wait``, ``actually``, ``instead``, ``rather``, ``alternatively``, ``no``, ``not``,
    ``hmm``, ``oops``, ``sorry``, ``wrong``, ``mistake``, ``incorrect``. So ``x = \\boxed{3},
    y = \\boxed{5}`` and ``\\boxed{1}\\boxed{2}`` are one answer of two parts, while ``\\boxed{3}.
    Wait, that is wrong: \\boxed{5}`` and ``\\boxed{3} or \\boxed{5}`` end in the one-part answer
    ``5`` (an abandoned value, or an alternative, is not part of the final answer).

    ``None`` exactly when :func:`last_boxed` is ``None`` (no box, or the last box unclosed), and
    ``final_boxes(t)[-1] == last_boxed(t)`` otherwise. An empty box is an empty string part.
    """
    group: list[str] = []
    prev_end = -1
    for start, end, content in _boxes(text):
        if content is None:
            return None
        if prev_end >= 0 and boxes_joined(text[prev_end:start]):
            group.append(content)
        else:
            group = [content]
        prev_end = end
    return group or None


def join_parts(parts: list[str]) -> str:
    """One answer string from the parts of a multi-part answer, as if written in one box."""
    return ", ".join(parts)


def final_boxed_answer(text: str) -> str | None:
    """The final answer of a solution text as one string: :func:`final_boxes` joined with ``", "``
    (``"(-2,18), (8,38)"`` for ``... $\\boxed{(-2,18)}$ and $\\boxed{(8,38)}$.``); None when
    :func:`final_boxes` is None. The gold answer that ``prepare`` stores and ``verify`` compares."""
    parts = final_boxes(text)
    return join_parts(parts) if parts is not None else None


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
