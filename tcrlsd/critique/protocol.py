"""What a critic is: requests in, replies out (:class:`Critic`), and cleaning of model replies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from tcrlsd.errors import TcrlsdError
from tcrlsd.reference_critic import CriticReply


@dataclass(frozen=True)
class CritiqueRequest:
    """One rollout to critique: the rendered prompt (what a model critic reads) and its row."""

    rollout_id: str
    prompt: str  # rendered critic prompt (one user message); response already truncated inside
    problem: str
    response_text: str  # the full response (the reference critic reads it directly)
    gold_solution: str | None
    gold_answer: str
    is_correct: bool
    extracted_answer: str | None


OnReply = Callable[[int, CriticReply], None]


class Critic(Protocol):
    label: str  # recorded in the `critic` column: backend and model
    journaled: bool  # answers are slow or remote: keep the per-part answered-rows journal
    # The critic's own phrasing version (recorded in `template`) when it reads the structured row
    # instead of a rendered prompt; None for model critics (the prompt template's id is recorded).
    template_id: str | None

    def critique(self, requests: Sequence[CritiqueRequest], on_reply: OnReply) -> None:
        """Call ``on_reply(i, reply)`` exactly once per request ``i`` (any order, from the calling thread)."""
        ...


class CriticAborted(TcrlsdError, RuntimeError):
    """The critic failed so many rows in a row that it is probably down; stop and resume later."""


class CriticRetryLater(TcrlsdError, RuntimeError):
    """Some rows failed transiently; their parts stay unfinished (journals kept) for a rerun."""


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def clean_feedback(text: str, max_chars: int) -> CriticReply:
    """Drop reasoning blocks, strip, cut to ``max_chars``; an empty result is an error."""
    out = _THINK.sub("", text)
    if "<think>" in out:  # unterminated: the reply ran out of tokens while still reasoning
        out = out.split("<think>", 1)[0]
    out = out.strip()
    if not out:
        return CriticReply(None, "empty critique")
    if len(out) > max_chars:
        out = out[:max_chars].rstrip() + " [...]"
    return CriticReply(out, None)
