"""Batching and the forward pass: per-token log-probs of response ids after a context."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tcrlsd.batching import plan_padded_batches
from tcrlsd.score.params import ScoreError

# ----------------------------------------------------------------------------- batching + forward


def plan_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, padded size within the budget
    (:func:`tcrlsd.batching.plan_padded_batches`, shared with the update stage's micro-batches)."""
    return plan_padded_batches(lengths, max_tokens_per_batch)


# What a causal LM's forward does to the lm head's output, by config attribute: (name, fn(logits, value)).
# The stage applies the head itself (only at response positions), so each must be repeated here;
# :func:`check_head_path` refuses a model whose forward does anything else.
LOGIT_POSTPROCESS: dict[str, Callable] = {
    "final_logit_softcapping": lambda logits, cap: (logits / cap).tanh() * cap,  # Gemma-2/3
    "logits_scaling": lambda logits, scale: logits / scale,  # Granite
    "logit_scale": lambda logits, scale: logits * scale,  # Cohere
}


class _Head:
    """The lm head applied in fp32: hidden states and weight cast up, then the model's post-processing.

    bf16 logits cast afterwards would carry rounding errors of ~2^-8 of their size (0.05 nats at a
    logit of 12), the order of the Delta-gap itself. The fp32 copy of the weight (V x H x 4 bytes,
    1.6 GB for Llama-3.2-3B) lives while one call of :func:`response_logprobs` runs.
    """

    def __init__(self, model):
        self.decoder = model.base_model
        head = model.get_output_embeddings()
        if self.decoder is model or head is None or getattr(head, "weight", None) is None:
            raise ScoreError(f"{_arch(model)}: cannot split the model into decoder and lm head")
        self.weight = head.weight.float()  # (V, H) fp32 (no copy when already fp32)
        bias = getattr(head, "bias", None)
        self.bias = bias.float() if bias is not None else None  # (V,)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.post = [(key, fn, getattr(config, key)) for key, fn in LOGIT_POSTPROCESS.items()
                     if getattr(config, key, None) not in (None, 0)]

    @property
    def device(self):
        return self.weight.device

    def logits(self, h):
        """fp32 logits ``(n, V)`` of hidden states ``h`` ``(n, H)`` (any dtype)."""
        logits = h.float() @ self.weight.T  # (n, V) fp32
        if self.bias is not None:
            logits = logits + self.bias
        for _, fn, value in self.post:
            logits = fn(logits, value)
        return logits


def _arch(model) -> str:
    names = getattr(model.config, "architectures", None) or []
    name = type(model).__name__
    return name if not names or names[0] == name else f"{name} ({names[0]})"


def check_head_path(model, ids: Sequence[int]) -> None:
    """Raise :class:`ScoreError`, naming the architecture, unless the stage's head path reproduces
    ``model(ids).logits`` on ``ids`` (one short sequence).

    Tolerance per position: (2 eps(dtype) + 1e-4) x max |logit| + 1e-4, i.e. the rounding of the
    model's own logits in its dtype; a logit scale or soft-cap the stage does not apply is far off.
    """
    import torch

    head = _Head(model)
    x = torch.tensor([list(ids)], dtype=torch.long, device=head.device)  # (1, T)
    with torch.inference_mode():
        want = model(input_ids=x, use_cache=False).logits[0].float()  # (T, V)
        got = head.logits(head.decoder(input_ids=x, use_cache=False).last_hidden_state[0])  # (T, V)
    dtype = model.get_output_embeddings().weight.dtype
    scale = want.abs().amax(dim=-1, keepdim=True)  # (T, 1)
    tol = (2 * torch.finfo(dtype).eps + 1e-4) * scale + 1e-4  # (T, 1)
    err = (got - want).abs()  # (T, V)
    if bool((err > tol).any()):
        applied = ", ".join(f"{key}={value}" for key, _, value in head.post) or "none"
        raise ScoreError(
            f"{_arch(model)}: the score stage's log-prob head (decoder hidden states x lm head in fp32, "
            f"post-processing applied: {applied}) and the model's forward logits differ by up to "
            f"{float(err.max()):.4g} (tolerance {float(tol.max()):.3g}) on a {x.shape[1]}-token check sequence; "
            "this architecture transforms its logits in a way the stage does not reproduce (a logit scale or "
            "soft-cap?): add it to tcrlsd.score.logprobs.LOGIT_POSTPROCESS"
        )


def _batch_logprobs(head: _Head, contexts, responses, logits_chunk_tokens: int) -> list[np.ndarray]:
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
    hidden = head.decoder(input_ids=torch.from_numpy(ids).to(device), use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[row_idx, col_idx]  # (N, H): only the response positions reach the lm head
    del hidden
    out = torch.empty(len(tgt), dtype=torch.float32, device=device)  # (N,)
    for s in range(0, len(tgt), logits_chunk_tokens):
        logits = head.logits(h[s : s + logits_chunk_tokens])  # (n, V) fp32
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
    if not todo:
        return out
    with torch.inference_mode():
        head = _Head(model)
        for batch in plan_batches(lengths, max_tokens_per_batch):
            idx = [todo[j] for j in batch]
            got = _batch_logprobs(head, [contexts[i] for i in idx], [responses[i] for i in idx], logits_chunk_tokens)
            for i, lp in zip(idx, got):
                out[i] = lp
            if on_batch is not None:
                on_batch(sum(lengths[j] for j in batch))
    return out
