"""Batching and the forward pass: per-token log-probs of response ids after a context."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tcrlsd.score.params import ScoreError

# ----------------------------------------------------------------------------- batching + forward


def plan_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, padded size within the budget.

    Sorting by length makes each batch's sequences nearly equal, so right padding wastes little;
    the tie-break on index keeps the plan (and hence the float results) deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) + 1) * max(longest, n) > max_tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def _lm_parts(model):
    """(decoder without head, lm head, final logit soft-cap or None) of a Hugging Face causal LM."""
    decoder = model.base_model
    head = model.get_output_embeddings()
    if decoder is model or head is None:
        raise ScoreError(f"{type(model).__name__}: cannot split the model into decoder and lm head")
    # The lm head is applied here instead of in model.forward, so any logit post-processing of a
    # forward must be repeated: Gemma-2/3's soft-cap is; an architecture with another (Cohere's
    # logit_scale) would need a line here.
    cap = getattr(model.config, "final_logit_softcapping", None)
    return decoder, head, cap


def _batch_logprobs(model, contexts, responses, logits_chunk_tokens: int) -> list[np.ndarray]:
    """Response-token log-probs of one batch (lists of id lists), one float32 array per sequence."""
    import torch

    decoder, head, cap = _lm_parts(model)
    device = head.weight.device
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
    hidden = decoder(input_ids=torch.from_numpy(ids).to(device), use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[row_idx, col_idx]  # (N, H): only the response positions reach the lm head
    del hidden
    out = torch.empty(len(tgt), dtype=torch.float32, device=device)  # (N,)
    for s in range(0, len(tgt), logits_chunk_tokens):
        logits = head(h[s : s + logits_chunk_tokens]).float()  # (n, V) fp32
        if cap:
            logits = torch.tanh(logits / cap) * cap
        picked = logits.gather(1, tgt[s : s + logits_chunk_tokens, None]).squeeze(1)  # (n,)
        out[s : s + logits_chunk_tokens] = picked - torch.logsumexp(logits, dim=-1)
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
    with torch.inference_mode():
        for batch in plan_batches(lengths, max_tokens_per_batch):
            idx = [todo[j] for j in batch]
            got = _batch_logprobs(model, [contexts[i] for i in idx], [responses[i] for i in idx], logits_chunk_tokens)
            for i, lp in zip(idx, got):
                out[i] = lp
            if on_batch is not None:
                on_batch(sum(lengths[j] for j in batch))
    return out
