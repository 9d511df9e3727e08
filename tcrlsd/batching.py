"""Token-budget batching shared by the stages that run forward passes over variable-length sequences.

The score stage (log-probs) and the update stage (micro-batches) cut sequences the same way: sorted
by length, longest first, so that a batch's sequences are nearly equal and right padding wastes
little; a batch's padded size ``len(batch) * longest`` stays within the budget, and a sequence
longer than the budget runs alone. The tie-break on index keeps the plan, and so the float results,
deterministic.

Packed batches (the update's ``pack_tokens``) hold several sequences per row with no padding:
:func:`plan_packed_batches` fills each batch to a budget of real tokens, first-fit over the
sequences sorted longest first, so few batches run nearly full.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["plan_padded_batches", "plan_packed_batches"]


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


def plan_packed_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches with ``sum(lengths) <= max_tokens`` each: longest
    first, each into the first batch it fits (first-fit decreasing); a sequence longer than the
    budget runs alone. Within a batch, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        k = next((b for b, free in enumerate(room) if n <= free), None)
        if k is None:
            batches.append([i])
            room.append(max_tokens - n)
        else:
            batches[k].append(i)
            room[k] -= n
    return batches
