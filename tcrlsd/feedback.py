"""Which rollouts get feedback: the one rule the critique stage applies and the generate stage's
dynamic sampling predicts (tcrlsd/generate/dynamic.py), so both read it from here.

A rollout gets feedback when the mode is not ``none`` and ``which`` covers it (``all``, or
``incorrect`` and the rollout is wrong; ``auto`` is ``all`` for modes ``gold`` and ``sibling``, else
``incorrect``),
except, with ``critique.skip_truncated``, a response cut by the token limit (finish_reason
``length``) in a mode that asks a critic about the response (critique, critique_gold, self): half a
solution would get a critique of half a solution, so the row is left without feedback and records
:data:`TRUNCATED_NOT_CRITIQUED` as its ``error``. Mode ``gold`` needs no critic (the feedback is the
gold solution, whatever the response), so it is not skipped.
"""

from __future__ import annotations

__all__ = ["CRITIC_MODES", "TRUNCATED_NOT_CRITIQUED", "effective_which", "wants_feedback", "skipped_as_truncated",
           "gets_feedback"]

CRITIC_MODES = ("critique", "critique_gold", "self")  # modes whose feedback reads the response
TRUNCATED_NOT_CRITIQUED = "truncated: not critiqued (finish_reason length)"


def effective_which(mode: str, which: str) -> str:
    """``which`` with ``auto`` resolved: all rollouts for modes gold and sibling, the incorrect ones otherwise."""
    if which != "auto":
        return which
    return "all" if mode in ("gold", "sibling") else "incorrect"  # sibling: SDPO covers every sample


def wants_feedback(mode: str, which: str, is_correct: bool) -> bool:
    """The mode and ``which`` (resolved) cover this rollout."""
    return mode != "none" and (effective_which(mode, which) == "all" or not is_correct)


def skipped_as_truncated(mode: str, finish_reason: str, skip_truncated: bool) -> bool:
    """A response cut by the token limit that the critic is not asked about (module notes)."""
    return skip_truncated and mode in CRITIC_MODES and finish_reason == "length"


def gets_feedback(mode: str, which: str, is_correct: bool, finish_reason: str, skip_truncated: bool) -> bool:
    """Feedback will be asked for this rollout (a critic may still fail to give it)."""
    return wants_feedback(mode, which, is_correct) and not skipped_as_truncated(mode, finish_reason, skip_truncated)
