"""Batching and the forward pass: per-token log-probs of response ids after a context.

The lm head (fp32 projection, the architecture's logit post-processing, the load-time check) is
:mod:`tcrlsd.lm_head`, shared with the update stage so that its first PPO ratio is 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tcrlsd.batching import plan_padded_batches
from tcrlsd.lm_head import FrozenHead

# ----------------------------------------------------------------------------- batching + forward


def plan_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, padded size within the budget
    (:func:`tcrlsd.batching.plan_padded_batches`, shared with the update stage's micro-batches)."""
    return plan_padded_batches(lengths, max_tokens_per_batch)


def _batch_logprobs(head: FrozenHead, contexts, responses, logits_chunk_tokens: int) -> list[np.ndarray]:
    """Response-token log-probs of one batch (lists of id lists), one float32 array per sequence."""
    import torch

    device = head.device
    lengths = [len(c) + len(r) for c, r in zip(contexts, responses)]
    B, T = len(lengths), max(lengths)
    ids = np.zeros((B, T), dtype=np.int64)  # right padding with id 0: never attended by real tokens
    rows, cols, targets = [], [], []
    for i, (c, r) in enumerate(zip(contexts, responses)):
        ids[i, : len(c)] = c
        ids[i, len(c) : lengths[i]] = r
        # logits at position p predict token p + 1: response token t sits at len(c) + t
        rows.append(np.full(len(r), i, dtype=np.int64))
        cols.append(np.arange(len(c) - 1, len(c) - 1 + len(r), dtype=np.int64))
        targets.append(np.asarray(r, dtype=np.int64))
    row_idx = torch.from_numpy(np.concatenate(rows)).to(device)  # (N,)
    col_idx = torch.from_numpy(np.concatenate(cols)).to(device)  # (N,)
    tgt = torch.from_numpy(np.concatenate(targets)).to(device)  # (N,)
    out = head.logprobs_at(torch.from_numpy(ids).to(device), row_idx, col_idx, tgt, logits_chunk_tokens)  # (N,)
    flat = out.cpu().numpy()
    bounds = np.cumsum([0] + [len(r) for r in responses])
    return [flat[bounds[i] : bounds[i + 1]].copy() for i in range(B)]


def response_logprobs(
    model,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    max_tokens_per_batch: int,
    logits_chunk_tokens: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log p(response[t] | context, response[:t]) for each (context, response) pair, float32.

    ``contexts`` must be non-empty (the first response token is predicted from the last context
    position). Empty responses give empty arrays without a forward pass. ``on_batch`` is called
    with the number of real tokens after each forward pass (progress bars).
    """
    import torch

    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(contexts)
    todo = [i for i, r in enumerate(responses) if len(r)]
    for i in todo:
        if not len(contexts[i]):
            raise ValueError(f"sequence {i}: empty context; the first response token needs a preceding token")
    lengths = [len(contexts[i]) + len(responses[i]) for i in todo]
    if not todo:
        return out
    with torch.inference_mode():
        head = FrozenHead(model)
        for batch in plan_batches(lengths, max_tokens_per_batch):
            idx = [todo[j] for j in batch]
            got = _batch_logprobs(head, [contexts[i] for i in idx], [responses[i] for i in idx], logits_chunk_tokens)
            for i, lp in zip(idx, got):
                out[i] = lp
            if on_batch is not None:
                on_batch(sum(lengths[j] for j in batch))
    return out
