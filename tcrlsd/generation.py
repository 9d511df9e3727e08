"""The generation interface shared by rollouts (generate stage) and self-critique (critique stage).

A backend turns prompt token ids into sampled completions. Backends live in one registry
(``tcrlsd.generate.backends.BACKENDS``, name -> factory); all return the same :class:`Completion`
records, so the stages never know which engine ran.

The stop-token contract (every backend keeps it; :func:`check_completions` enforces it):

- ``finish_reason == "stop"``: the response ended because a stop id was sampled (one of the
  backend's ``stop_ids``: the tokenizer's EOS plus the generation config's EOS list, e.g. Llama-3's
  ``<|eot_id|>``). ``token_ids`` END WITH that stop id: "stop here" is an action the policy took,
  so the score, advantages and update stages cover it like any other token (verl and TRL keep the
  first EOS inside the response mask; without it the policy could never learn when to end).
  Nothing after the first stop id is kept. No stop strings are used, so "stop" always means a stop id.
- ``finish_reason == "length"``: ``max_new_tokens`` ids were sampled and none was a stop id; the
  last id is not a stop id.
- ``text`` is the decoded ids WITHOUT the trailing stop id, special tokens skipped (what verify and
  the critic read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

__all__ = ["SamplingConfig", "Completion", "GenerationBackend", "check_completions"]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # the sampled ids, never re-tokenised text; a "stop" one ends with its stop id
    text: str  # decoded token_ids without the trailing stop id, special tokens skipped
    finish_reason: str  # "stop" (a stop id was sampled, and is the last id) or "length" (max_new_tokens ids)


class GenerationBackend(Protocol):
    stop_ids: tuple[int, ...]  # every id that ends a response (see the module's stop-token contract)

    def generate(
        self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """For each prompt (token ids), ``samples_per_prompt`` completions, in order.

        Deterministic: the same prompts, sampling config (seed included) and weights give the same
        completions on CPU.
        """
        ...


def check_completions(groups: Sequence[Sequence[Completion]], stop_ids: Sequence[int], max_new_tokens: int,
                      backend: str = "generation backend") -> None:
    """Raise if ``groups`` break the stop-token contract (module docstring); the error names the row.

    Every "stop" completion ends with a stop id and holds no other; every "length" completion has
    ``max_new_tokens`` ids, none of them a stop id.
    """
    stops = {int(t) for t in stop_ids}
    for i, group in enumerate(groups):
        for j, c in enumerate(group):
            where = f"{backend}: prompt {i} sample {j}"
            ids = c.token_ids
            if c.finish_reason == "stop":
                if not ids or ids[-1] not in stops:
                    raise RuntimeError(f"{where}: finish_reason 'stop' but the ids do not end with a stop id "
                                       f"{sorted(stops)} (last id {ids[-1] if ids else None}); the stop id must "
                                       "be the response's last token")
                if any(t in stops for t in ids[:-1]):
                    raise RuntimeError(f"{where}: a stop id occurs before the end of the response")
            elif c.finish_reason == "length":
                if len(ids) != max_new_tokens or any(t in stops for t in ids):
                    raise RuntimeError(f"{where}: finish_reason 'length' needs {max_new_tokens} ids and no stop id; "
                                       f"got {len(ids)} ids" + (" with a stop id" if any(t in stops for t in ids)
                                                                else ""))
            else:
                raise RuntimeError(f"{where}: finish_reason {c.finish_reason!r}; expected 'stop' or 'length'")
