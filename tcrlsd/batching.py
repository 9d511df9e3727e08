"""Token-budget batching shared by the stages that run forward passes over variable-length sequences.

The score stage (log-probs) and the update stage (micro-batches) cut sequences the same way: sorted
by length, longest first, so that a batch's sequences are nearly equal and right padding wastes
little; a batch's padded size ``len(batch) * longest`` stays within the budget, and a sequence
longer than the budget runs alone. The tie-break on index keeps the plan, and so the float results,
deterministic.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["plan_padded_batches"]


def plan_padded_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, ``len(batch) * longest <= max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches
