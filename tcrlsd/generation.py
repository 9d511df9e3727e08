"""The generation interface shared by rollouts (generate stage) and self-critique (critique stage).

A backend turns prompt token ids into sampled completions. Backends live in one registry
(``tcrlsd.generate.backends.BACKENDS``, name -> factory); all return the same :class:`Completion`
records, so the stages never know which engine ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

__all__ = ["SamplingConfig", "Completion", "GenerationBackend"]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # the sampled ids, EOS excluded, never re-tokenised text
    text: str  # decoded token_ids, special tokens skipped
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class GenerationBackend(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """For each prompt (token ids), ``samples_per_prompt`` completions, in order.

        Deterministic: the same prompts, sampling config (seed included) and weights give the same
        completions on CPU.
        """
        ...
